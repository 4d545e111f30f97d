"""First-order Taylor importance: ``|w * dL/dw|`` summed per channel unit over calibration
batches, with gradients taken on a private copy of the graph.

No labels exist at optimization time, so the loss is half the squared norm of the
model's outputs, ``L = 0.5 * sum(out ** 2)`` over every output tensor. (The distance to the
original outputs is zero, and so is its gradient, at the unpruned weights.) A unit whose
weights are zero, or whose gradient is zero on every batch (a dead ReLU channel), scores 0
and goes first.

Example::

    gs = [g for g in groups(gm) if g.prunable]
    scores = taylor_scores(gs, gm, [(torch.randn(8, 3, 32, 32),)])
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.fx as fx
from torch.utils._pytree import tree_leaves

import fxopt.progress
from fxopt.errors import PassError
from fxopt.graph_utils import copy_graph_module
from fxopt.ops import _set_path, fetch_attr
from fxopt.passes.prune.groups import Group, graph_path


def calibration_batches(calibration: Iterable | None, n_inputs: int) -> list[tuple]:
    """The calibration batches as tuples of the graph's inputs; ``PassError`` when none."""
    if calibration is None:
        raise PassError("prune: importance=taylor needs calibration batches for its "
                        "gradients: pass fxopt.optimize(..., calibration=batches) (a list "
                        "or DataLoader of input batches; fxopt optimize: --calibration-data), or "
                        "use importance=l1")
    batches = []
    for batch in calibration:
        batch = batch if isinstance(batch, (tuple, list)) else (batch,)
        batches.append(tuple(batch)[:n_inputs])
    if not batches:
        raise PassError("prune: importance=taylor got an empty calibration set; give at "
                        "least one input batch")
    return batches


_STATS = ("running_mean", "running_var")  # batch-norm statistics: inputs, not weights


def _scored(p) -> bool:
    # the weights that make a channel's output: producer rows (and bias), batch-norm scales
    return p.role != "consumer" and not graph_path(p).endswith(_STATS)


def taylor_scores(groups: list[Group], gm: fx.GraphModule, batches: list[tuple],
                  progress=None) -> list[np.ndarray]:
    """Per group, per unit: ``sum over batches and weights of |w * dL/dw|`` (see the module
    docstring for the loss); ``gm`` is never modified (gradients flow in a copy)."""
    work = copy_graph_module(gm)
    leaves: dict[str, torch.Tensor] = {}
    for g in groups:
        for p in g.params:
            path = graph_path(p)
            if not _scored(p) or path in leaves:
                continue
            try:
                t = fetch_attr(work, path)
            except AttributeError:
                continue
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                continue
            leaf = torch.nn.Parameter(t.detach().clone(), requires_grad=True)
            _set_path(work, path, leaf)
            leaves[path] = leaf
    for leaf in leaves.values():
        leaf.grad = None
    for prm in work.parameters():  # only the scored weights collect gradients
        if all(prm is not leaf for leaf in leaves.values()):
            prm.requires_grad_(False)
    acc = {path: torch.zeros_like(leaf, dtype=torch.float32) for path, leaf in leaves.items()}
    for batch in fxopt.progress.bar(batches, "taylor importance", unit="batch",
                                    progress=progress):
        with torch.enable_grad():
            outs = [o for o in tree_leaves(work(*batch))
                    if isinstance(o, torch.Tensor) and o.is_floating_point()]
            loss = sum(0.5 * o.float().pow(2).sum() for o in outs)
            if not isinstance(loss, torch.Tensor) or not loss.requires_grad:
                raise PassError("prune: importance=taylor found no gradient from the "
                                "outputs to the prunable weights; use importance=l1")
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        for (path, leaf), grad in zip(leaves.items(), grads, strict=True):
            if grad is not None:
                acc[path] += (leaf.detach() * grad).abs().float()
    out = []
    for g in groups:
        total = np.zeros(g.n_units)
        seen = set()
        for p in g.params:
            path = graph_path(p)
            if path not in acc or (path, p.dim) in seen:
                continue
            seen.add((path, p.dim))
            t = acc[path].movedim(p.dim, 0).reshape(acc[path].shape[p.dim], -1).sum(1)
            labels = g.units[(p.axis[0].name, p.axis[1])]
            total += np.bincount(labels, weights=t.numpy(), minlength=g.n_units)
        out.append(total)
    return out
