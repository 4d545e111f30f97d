"""How close a candidate's outputs are to the reference model's: agreement (cosine and
max relative error, the same measures ``fxopt.verify`` uses) or a user metric on a
validation set.

Example::

    from fxopt.bench.accuracy import agreement, evaluate

    agreement(model(x), artifact(x))          # {"cosine": 0.9998, "max_rel": 0.012}
    evaluate(artifact, [((x,), labels)], top1) # the user's metric, averaged over batches
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch

from fxopt.errors import SpecError
from fxopt.verify import compare_outputs

__all__ = ["agreement", "evaluate", "split_batch"]


def agreement(reference_out: Any, out: Any) -> dict:
    """Cosine (the lowest over the outputs) and max relative error (largest absolute
    difference over the largest ``|reference|``) of ``out`` against ``reference_out``;
    nested outputs are compared leaf by leaf. A structure mismatch gives cosine NaN and
    max_rel inf.

    Example::

        agreement(torch.ones(3), torch.ones(3) * 1.01)   # {"cosine": 1.0, "max_rel": 0.01}
    """
    report = compare_outputs(reference_out, out)
    if report.structure_error:
        return {"cosine": math.nan, "max_rel": math.inf, "error": report.structure_error}
    return {"cosine": float(report.cosine), "max_rel": float(report.rel)}


def split_batch(batch: Any) -> tuple[tuple, Any]:
    """One validation batch as ``(inputs, target)``: a batch is a pair ``(inputs, target)``
    where ``inputs`` is a tensor or a tuple/list of tensors.

    Example::

        split_batch((x, y))          # ((x,), y)
        split_batch(((a, b), y))     # ((a, b), y)
    """
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        size = f" of length {len(batch)}" if hasattr(batch, "__len__") else ""
        raise SpecError(
            f"a validation batch must be a pair (inputs, target), got "
            f"{type(batch).__name__}{size}; yield (x, y) or ((x1, x2), y) per batch")
    inputs, target = batch
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    if not all(isinstance(x, torch.Tensor) for x in inputs):
        raise SpecError("the inputs of a validation batch must be tensors (or a tuple of them)")
    return inputs, target


def evaluate(fn: Callable[..., Any], val_data: Iterable, metric: Callable[[Any, Any], float]
             ) -> float:
    """Mean of ``metric(fn(*inputs), target)`` over the validation batches ``val_data``
    (each ``(inputs, target)``, see ``split_batch``), under ``torch.inference_mode()``.
    Higher is taken to be better wherever fxopt compares metrics.

    Example::

        def top1(logits, labels):
            return (logits.argmax(-1) == labels).float().mean().item()

        evaluate(model, [(x, y)], top1)    # e.g. 0.91
    """
    values = []
    with torch.inference_mode():
        for batch in val_data:
            inputs, target = split_batch(batch)
            value = metric(fn(*inputs), target)
            try:
                values.append(float(value))
            except (TypeError, ValueError):
                raise SpecError(f"the metric returned {type(value).__name__}; it must return "
                                "a number (higher is better)") from None
    if not values:
        raise SpecError("the validation data yielded no batches")
    return sum(values) / len(values)
