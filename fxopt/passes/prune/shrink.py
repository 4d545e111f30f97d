"""Ranking channel units and physically removing them: weights through
``OpView.set_param``, channel-count attributes, and the shape constants of ``view`` /
``reshape`` / ``split`` calls.

Example::

    gs = [g for g in groups(gm) if g.prunable]
    removed = select(gs, score(gs, gm, "l1"), ratio=0.5)
    plan = shrink(gm, gs, removed)
"""

from __future__ import annotations

import math
from collections import defaultdict

import numpy as np
import torch
import torch.fx as fx

from fxopt.errors import PassError
from fxopt.op_flow import Param, piece_sizes, shape
from fxopt.ops import _set_path, fetch_attr, op_of
from fxopt.passes.prune.groups import Group, param_key, plan_members

IMPORTANCE = ("l1", "l2", "bn_scale", "random", "taylor")


def tensor_of(gm: fx.GraphModule, p: Param) -> torch.Tensor | None:
    if p.view is None:
        return fetch_attr(gm, p.name)
    return p.view.params.get(p.name)


def score(groups: list[Group], gm: fx.GraphModule, importance: str,
          seed: int = 0, batches: list[tuple] | None = None,
          progress=None) -> list[np.ndarray]:
    """One importance per unit of each group (higher = keep); ``taylor`` needs ``batches``
    (``fxopt.passes.prune.taylor``)."""
    if importance not in IMPORTANCE:
        raise PassError(f"prune: unknown importance {importance!r}; use one of "
                        f"{', '.join(IMPORTANCE)}")
    if importance == "taylor":
        from fxopt.passes.prune.taylor import calibration_batches, taylor_scores

        if batches is None:
            batches = calibration_batches(None, 0)
        return taylor_scores(groups, gm, batches, progress)
    gen = np.random.default_rng(seed)
    out = []
    for g in groups:
        if importance == "random":
            out.append(gen.random(g.n_units))
            continue
        total = _norms(g, gm, importance)
        if importance == "bn_scale" and not total.any():
            total = _norms(g, gm, "l1")  # a group without batch norm (squeeze-excite, MLP)
        out.append(total)
    return out


def _norms(g: Group, gm: fx.GraphModule, importance: str) -> np.ndarray:
    """Per unit: the L1 / squared L2 norm of its producer rows, or ``|gamma|`` of its
    batch norms (``bn_scale``)."""
    total = np.zeros(g.n_units)
    for p in g.params:
        is_bn = p.view is not None and p.view.kind == "batch_norm" and p.name == "weight"
        if importance == "bn_scale" and not is_bn or importance != "bn_scale" and (
                p.role != "producer" or p.name == "bias"):
            continue
        t = tensor_of(gm, p)
        if t is None:
            continue
        t = t.detach().float().movedim(p.dim, 0).reshape(t.shape[p.dim], -1)
        per = t.abs().sum(1) if importance in ("l1", "bn_scale") else t.pow(2).sum(1)
        labels = g.units[(p.axis[0].name, p.axis[1])]
        total += np.bincount(labels, weights=per.numpy(), minlength=g.n_units)
    return total


# round_to="auto": kept counts are multiples of AUTO_ROUND channels in groups of at least
# AUTO_MIN_CHANNELS channels that hold at least two rounding steps. CPU conv / GEMM kernels
# (oneDNN blocked layouts, ONNX Runtime's NCHWc convs) work in blocks of 8 / 16 channels
# and a ragged width costs a full block or a layout change (RESULTS.md "prune", macs=0.5:
# resnet50 with round_to=1 has 52 of 53 convs off the multiple, ORT 1.50x vs 1.98x auto;
# MobileNet's 16-40-wide groups ragged make ORT slower than unpruned, 0.67x vs 1.11x; an
# auto floor of 64 channels, which left them ragged, measured 0.85x).
# Rounding moves a group's count by under one step; the MAC search then takes steps in other
# groups (plan.Refine), so the MAC target still holds. A group of one step or less (8
# channels) would not be pruned at all, so it is left alone.
AUTO_ROUND = 8
AUTO_MIN_CHANNELS = 16


def multiple_of(g: Group, round_to: int | str | None) -> int:
    """The multiple of units that ``g``'s kept count is rounded up to: ``round_to`` itself
    when it is an integer (1 or ``None``: no rounding), and for ``"auto"`` the number of
    units that makes every channel axis's kept width a multiple of ``AUTO_ROUND`` (a unit
    of 1 channel: 8 units; a head of 16 columns: 1 unit; a head-count axis, one index per
    head beside the columns, is not a width), in a group at least ``AUTO_MIN_CHANNELS``
    wide that holds at least two such steps (else 1).

    Example::

        [multiple_of(g, "auto") for g in gs]   # e.g. [1, 8, 8, 1] for widths 8, 24, 256, 2 heads
    """
    if round_to is None:
        return 1
    if not isinstance(round_to, str):
        return round_to
    widths = {}
    for ax, labels in g.units.items():
        per_unit = np.bincount(labels, minlength=g.n_units)
        widths[ax] = (len(labels), int(per_unit[per_unit > 0].min()) if len(labels) else 1)
    if not widths or max(n for n, _ in widths.values()) < AUTO_MIN_CHANNELS:
        return 1
    columns = max(w for _, w in widths.values()) > 1  # then 1-per-unit axes count heads
    multiple = 1
    for _, w in widths.values():
        if w > 1 or not columns:
            multiple = math.lcm(multiple, AUTO_ROUND // math.gcd(AUTO_ROUND, w))
    return multiple if 2 * multiple <= g.n_units else 1


def _keep_count(n: int, drop: int, multiple: int, cap: float) -> int:
    drop = min(drop, math.floor(cap * n), n - 1)
    keep = n - max(drop, 0)
    if multiple > 1:
        keep = min(n, math.ceil(keep / multiple) * multiple)
    return keep


def next_drop(g: Group, count: int, round_to: int | str | None = None,
              max_layer_ratio: float = 1.0) -> int | None:
    """How many units ``g`` removes after one more rounding step from removing ``count``:
    its kept count goes down to the next multiple of ``multiple_of(g, round_to)``; ``None``
    when that would pass ``max_layer_ratio`` or remove the last multiple.

    Example::

        next_drop(g, 16, "auto")   # 24 for a group of 64 channels (keeps 40 instead of 48)
    """
    n, m = g.n_units, multiple_of(g, round_to)
    keep = n - count
    new_keep = (keep - 1) // m * m
    if new_keep < 1 or n - new_keep > min(math.floor(max_layer_ratio * n), n - 1):
        return None
    return n - new_keep


def select(groups: list[Group], scores: list[np.ndarray], *, ratio: float,
           scope: str = "local", round_to: int | str | None = None,
           max_layer_ratio: float = 1.0, counts: list[int] | None = None) -> list[np.ndarray]:
    """The units to remove from each group (sorted unit ids): ``ratio`` of each group
    (``scope=local``) or of all units by score normalized per group (``global``), kept
    counts rounded up to ``multiple_of(group, round_to)``. ``counts`` instead gives the
    number of units to remove per group (a MAC search's result), taken as they are.

    Example::

        removed = select(gs, score(gs, gm, "l1"), ratio=0.5, round_to="auto")
    """
    if scope not in ("local", "global"):
        raise PassError(f"prune: scope must be 'local' or 'global', not {scope!r}")
    if counts is not None:
        return [_take(g, np.argsort(s, kind="stable"), c)
                for g, s, c in zip(groups, scores, counts, strict=True)]
    drops = [math.floor(ratio * g.n_units) for g in groups]
    if scope == "global" and groups:
        normed = [s / (s.mean() + 1e-12) for s in scores]
        flat = np.concatenate(normed)
        k = math.floor(ratio * len(flat))
        cut = np.sort(flat)[k - 1] if k > 0 else -np.inf
        drops = [int((s <= cut).sum()) for s in normed]
    removed = []
    for g, s, drop in zip(groups, scores, drops, strict=True):
        keep = _keep_count(g.n_units, drop, multiple_of(g, round_to), max_layer_ratio)
        removed.append(_take(g, np.argsort(s, kind="stable"), g.n_units - keep))
    return removed


def _take(g: Group, order: np.ndarray, count: int) -> np.ndarray:
    """The first ``count`` units of ``order`` whose removal leaves every axis of the group
    at least one index (a cat input, a conv's outputs); others are skipped over."""
    axes = list(g.units)
    left = np.array([len(g.units[ax]) for ax in axes])
    per_unit = np.zeros((g.n_units, len(axes)), dtype=np.int64)
    for j, ax in enumerate(axes):
        np.add.at(per_unit[:, j], g.units[ax], 1)
    taken = []
    for u in order:
        if len(taken) == count:
            break
        if np.all(left - per_unit[u] > 0):
            left -= per_unit[u]
            taken.append(u)
    return np.sort(np.array(taken, dtype=np.int64))


def indices_by_axis(group: Group, units: np.ndarray) -> dict[tuple[str, int], np.ndarray]:
    """Removed indices of every axis of the group, in the captured (original) numbering."""
    mask = np.zeros(group.n_units, dtype=bool)
    mask[units] = True
    return {ax: np.nonzero(mask[labels])[0] for ax, labels in group.units.items()}


def plan_of(group: Group, by_axis: dict, units: np.ndarray, exact: bool = True) -> dict:
    """The JSON-ready plan entry of one group."""
    members = [{"param": m.param, "dim": m.dim, "role": m.role,
                "indices": [int(i) for i in by_axis[m.axis]], "attr": m.attr}
               for m in plan_members(group)]
    return {"group": group.id, "units": group.n_units, "removed_units": len(units),
            "removed_unit_ids": [int(u) for u in units], "exact": exact, "members": members}


def shrink(gm: fx.GraphModule, groups: list[Group], removed: list[np.ndarray]) -> list[dict]:
    """Remove the units ``removed[i]`` of ``groups[i]`` from ``gm`` (in place); returns the
    plan. All groups are cut against the captured numbering at once, so indices stay
    those of the original tensors."""
    cuts: dict[tuple[int, str], dict[int, np.ndarray]] = defaultdict(dict)
    owners: dict[tuple[int, str], Param] = {}
    new_size: dict[tuple[str, int], int] = {}
    plan = []
    nodes = {n.name: n for n in gm.graph.nodes}
    for g, units in zip(groups, removed, strict=True):
        if len(units) == 0:
            continue
        by_axis = indices_by_axis(g, units)
        for ax, idx in by_axis.items():
            new_size[ax] = shape(nodes[ax[0]])[ax[1]] - len(idx)
        for p in g.params:
            key = (id(p.view.module) if p.view is not None and p.view.module is not None
                   else id(p.view.node) if p.view is not None else 0, param_key(p))
            cuts[key][p.dim] = by_axis[(p.axis[0].name, p.axis[1])]
            owners[key] = p
        plan.append(plan_of(g, by_axis, units, exact=g.exact))
    for key, dims in cuts.items():
        p = owners[key]
        t = tensor_of(gm, p)
        for dim, idx in dims.items():
            keep = torch.as_tensor(np.setdiff1d(np.arange(t.shape[dim]), idx))
            t = t.index_select(dim, keep)
        t = t.contiguous()
        if p.view is None:
            _set_path(gm, p.name, t)
        else:
            p.view.set_param(p.name, t)
    _fix_attrs(gm, new_size)
    _fix_shape_constants(gm, new_size)
    gm.graph.lint()
    gm.recompile()
    return plan


def _fix_attrs(gm: fx.GraphModule, new_size: dict) -> None:
    """Channel counts and ``groups`` of the ops whose axes shrank."""
    for node in gm.graph.nodes:
        view = op_of(node)
        if view.kind in ("layer_norm", "rms_norm"):
            _fix_normalized_shape(view, new_size)
            continue
        if view.kind not in ("conv", "conv_transpose", "linear", "batch_norm", "embedding"):
            continue
        x, so = view.input, shape(node)
        if so is None or x is None:
            continue
        ch = -1 if view.kind in ("linear", "embedding") else 1
        old_in = shape(x)[ch] if shape(x) else None
        old_out = so[ch]
        cin = new_size.get((x.name, len(shape(x)) + ch if ch < 0 else ch), old_in)
        cout = new_size.get((node.name, len(so) + ch if ch < 0 else ch), old_out)
        if (cin, cout) == (old_in, old_out):
            continue
        if view.kind in ("conv", "conv_transpose"):
            groups = view.attrs.get("groups", 1)
            if groups > 1:
                groups = groups * cin // old_in
            if view.module is not None:
                view.module.in_channels, view.module.out_channels = cin, cout
                view.module.groups = groups
            elif view.attrs.get("groups", 1) != groups:
                view.set_arg("groups", groups)
        elif view.module is not None and view.kind == "linear":
            view.module.in_features, view.module.out_features = cin, cout
        elif view.module is not None and view.kind == "batch_norm":
            view.module.num_features = cout
        elif view.module is not None and view.kind == "embedding":
            view.module.embedding_dim = cout


def _fix_normalized_shape(view, new_size: dict) -> None:
    """The ``normalized_shape`` of a LayerNorm / RMSNorm whose last axis shrank
    (``prune(hidden=True)``)."""
    so = shape(view.node)
    if not so or (view.node.name, len(so) - 1) not in new_size:
        return
    ns = (new_size[(view.node.name, len(so) - 1)],)
    if view.module is not None:
        view.module.normalized_shape = ns
    else:
        view.set_arg("normalized_shape", list(ns))


def _fix_shape_constants(gm: fx.GraphModule, new_size: dict) -> None:
    """``x.view(b, 4, 16)``- and ``x.expand(b, 2, 2, s, d)``-style constants of the axes that
    shrank (an expand's is the kv head count grouped-query attention repeats); -1 and sizes
    computed in the graph stay as they are."""
    for node in gm.graph.nodes:
        view = op_of(node)
        so = shape(node)
        if (view.kind == "reshape" or _is_expand(node)) and so is not None:
            changed = {k: new_size[(node.name, k)] for k in range(len(so))
                       if (node.name, k) in new_size}
            if not changed:
                continue
            args = list(node.args)
            if len(args) == 2 and isinstance(args[1], (list, tuple)):
                sizes = list(args[1])
                for k, v in changed.items():
                    if isinstance(sizes[k], int) and sizes[k] != -1:
                        sizes[k] = v
                args[1] = type(args[1])(sizes)
            else:
                for k, v in changed.items():
                    if isinstance(args[1 + k], int) and args[1 + k] != -1:
                        args[1 + k] = v
            node.args = tuple(args)
        elif view.kind in ("split", "chunk"):
            _fix_pieces(node, view, new_size)


def _is_expand(node: fx.Node) -> bool:
    """``x.expand(*sizes)`` / ``aten.expand``: sizes like a reshape's (not ``repeat`` counts,
    nor ``expand_as``, which takes a tensor)."""
    target = node.target if isinstance(node.target, str) else str(node.target)
    return target == "expand" or target.startswith("aten.expand.")


def _fix_pieces(node: fx.Node, view, new_size: dict) -> None:
    """A split / chunk whose pieces shrank becomes a split by the new sizes (a chunk's
    pieces may no longer be equal)."""
    x = view.input
    sizes = piece_sizes(view)
    if x is None or sizes is None:
        return
    dim = view.arg("dim", 0) % len(shape(x))
    new = list(sizes)
    for u in node.users:
        new[u.args[1]] = new_size.get((u.name, dim), sizes[u.args[1]])
    if new == sizes:
        return
    if node.op == "call_method":
        node.target, node.args, node.kwargs = "split", (x, new), {"dim": dim}
    elif view.form == "aten":
        node.target = torch.ops.aten.split_with_sizes.default
        node.args, node.kwargs = (x, new, dim), {}
    else:
        node.target, node.args, node.kwargs = torch.split, (x, new), {"dim": dim}
