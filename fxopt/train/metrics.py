"""Validation metrics for ``fxopt.finetune``: accuracy against labels, output cosine
against the teacher, or a user function; higher is better for all of them.

A user metric is ``fn(student_output, target) -> float`` per batch, ``target`` being the
batch's labels when the validation items carry them, else the teacher's outputs; batch
values are averaged weighted by batch size.

Example::

    value = evaluate(module, loader, n_inputs=1, metric="accuracy", device=cpu)
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.errors import TrainingError
from fxopt.train.data import split_batch
from fxopt.train.losses import output_leaves

METRICS = ("accuracy", "cosine")


def choose_metric(metric: str | Callable | None, has_labels: bool, has_teacher: bool
                  ) -> str | Callable:
    """The metric to use: ``metric`` checked, or accuracy with labels, cosine without."""
    if callable(metric):
        return metric
    if metric is None:
        if has_labels:
            return "accuracy"
        if has_teacher:
            return "cosine"
        raise TrainingError("val_data items carry no labels and there is no teacher, so no "
                            "metric can be measured; give (inputs, label) items, a teacher, "
                            "or metric=callable")
    if metric not in METRICS:
        raise TrainingError(f"metric={metric!r}: use 'accuracy', 'cosine' or a callable "
                            "fn(output, target) -> float")
    if metric == "accuracy" and not has_labels:
        raise TrainingError("metric='accuracy' needs labels: val_data items must be "
                            "(inputs..., label)")
    if metric == "cosine" and not has_teacher:
        raise TrainingError("metric='cosine' compares with the teacher's outputs: give "
                            "teacher=...")
    return metric


def accuracy(output: Any, label: torch.Tensor) -> float:
    """Fraction of rows whose arg-max over the last dim of the first output is ``label``.

    >>> accuracy(torch.tensor([[0.1, 0.9], [0.8, 0.2]]), torch.tensor([1, 1]))
    0.5
    """
    logits = output_leaves(output)[0]
    pred = logits.reshape(-1, logits.shape[-1]).argmax(-1)
    return float((pred == label.reshape(-1).to(pred.device)).float().mean())


def output_cosine(output: Any, teacher: Any) -> float:
    """Mean per-sample cosine between the student's and the teacher's outputs (every
    output tensor, flattened per sample).

    >>> output_cosine(torch.ones(2, 3), 2 * torch.ones(2, 3))
    1.0
    """
    s = torch.cat([t.reshape(t.shape[0], -1).float() for t in output_leaves(output)], 1)
    t = torch.cat([u.reshape(u.shape[0], -1).float() for u in output_leaves(teacher)], 1)
    return float(F.cosine_similarity(s, t.to(s.device), dim=1, eps=1e-12).mean())


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Evaluate ``module`` in eval mode, then give every submodule its own mode back."""
    modes = {m: m.training for m in module.modules()}
    module.eval()
    try:
        yield
    finally:
        for m, training in modes.items():
            m.training = training


def evaluate(module: nn.Module, loader, *, n_inputs: int, metric: str | Callable,
             device: torch.device, teacher: nn.Module | None = None) -> float:
    """``metric`` of ``module`` over every batch of ``loader``, in eval mode, no grad."""
    total, count = 0.0, 0
    with torch.no_grad(), eval_mode(module):
        for batch in loader:
            inputs, label = split_batch(batch, n_inputs)
            inputs = tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in inputs)
            out = module(*inputs)
            n = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()), 1)
            if metric == "accuracy":
                if label is None:
                    raise TrainingError("metric='accuracy': a val_data batch has no labels")
                value = accuracy(out, label)
            else:
                target = label
                if metric == "cosine" or label is None:
                    if teacher is None:
                        raise TrainingError("the metric needs the teacher's outputs: give "
                                            "teacher=...")
                    target = teacher(*inputs)
                value = output_cosine(out, target) if metric == "cosine" else float(
                    metric(out, target))
            total += value * n
            count += n
    if not count:
        raise TrainingError("val_data is empty")
    return total / count


__all__ = ["METRICS", "accuracy", "choose_metric", "eval_mode", "evaluate", "output_cosine"]
