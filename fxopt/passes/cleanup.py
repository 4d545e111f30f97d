"""Cleanup passes: dead code, dropout, identities and no-op arithmetic/casts.

All are exact. ``cleanup`` runs the four to a fixed point.
"""

from __future__ import annotations

import numbers

import torch
import torch.fx as fx

from fxopt.ops import is_inplace, is_pure, kind_of, op_of
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass


@register_pass("dce", Semantics.EXACT)
def dce(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove nodes whose results are never used, then unused submodules and tensors."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.op == "get_attr" or is_pure(node) or kind_of(node) == "dropout" or (
            _checks_dead_value(node)
        ):
            gm.graph.erase_node(node)
            removed += 1
    dropped = drop_unused_attributes(gm) if removed else 0
    return PassResult(gm, modified=bool(removed or dropped), stats={"removed": removed,
                                                                    "tensors_dropped": dropped})


def _checks_dead_value(node: fx.Node) -> bool:
    """An export metadata check on a tensor only other checks read: it guards nothing, and
    keeping it would keep the dead computation behind it alive."""
    if kind_of(node) != "assert_metadata" or not node.args:
        return False
    value = node.args[0]
    return isinstance(value, fx.Node) and all(
        kind_of(u) == "assert_metadata" for u in value.users
    )


def drop_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete submodules and tensors that no node refers to; returns how many went."""
    used_modules = {n.target for n in gm.graph.nodes if n.op == "call_module"}
    used_attrs = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    before = len(list(gm.named_modules()))
    gm.delete_all_unused_submodules()
    count = before - len(list(gm.named_modules()))
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if name in used_attrs or owner in used_modules:
            continue
        if any(owner.startswith(m + ".") for m in used_modules):
            continue
        module = gm.get_submodule(owner) if owner else gm
        module._parameters.pop(leaf, None)
        module._buffers.pop(leaf, None)
        count += 1
    return count


def _bypass(node: fx.Node, replacement: fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)


@register_pass("remove_dropout", Semantics.EXACT)
def remove_dropout(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove dropout ops that are inactive (eval-mode modules, ``training=False`` calls)."""
    removed, kept = 0, []
    for node in list(gm.graph.nodes):
        view = op_of(node) if node.op.startswith("call") else None
        if view is None or view.kind != "dropout" or view.input is None:
            continue
        if view.module is not None:
            active = view.module.training
        else:
            active = bool(view.arg("training", view.arg("train", True))) and view.arg("p") != 0
        if active:
            kept.append(node.name)
            continue
        _bypass(node, view.input)
        removed += 1
    if removed:
        drop_unused_attributes(gm)
    stats = {"removed": removed}
    if kept:
        stats["kept"] = {n: "dropout is active (training=True): it is random" for n in kept}
    return PassResult(gm, modified=removed > 0, stats=stats)


@register_pass("remove_identity", Semantics.EXACT)
def remove_identity(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove identity ops (``nn.Identity``, ``aten.alias``)."""
    removed = 0
    for node in list(gm.graph.nodes):
        if node.op.startswith("call") and kind_of(node) == "identity":
            view = op_of(node)
            if view.input is not None:
                _bypass(node, view.input)
                removed += 1
    if removed:
        drop_unused_attributes(gm)
    return PassResult(gm, modified=removed > 0, stats={"removed": removed})


_NEUTRAL = {"mul": 1, "div": 1, "add": 0, "sub": 0}


def _same_tensor_type(node: fx.Node, source: fx.Node) -> bool:
    shape, dtype = node.meta.get("shape"), node.meta.get("dtype")
    return (
        shape is not None
        and shape == source.meta.get("shape")
        and dtype == source.meta.get("dtype")
        and node.meta.get("device") == source.meta.get("device")
    )


def _noop_source(node: fx.Node) -> fx.Node | None:
    """The node this one merely passes through, or None."""
    view = op_of(node)
    kind, x = view.kind, view.input
    if x is None or any(is_inplace(user) for user in node.users):
        return None  # a user writes into this result: bypassing it would write into x
    if kind in _NEUTRAL:
        other = view.arg("other")
        alpha = view.arg("alpha", 1)
        if view.arg("rounding_mode") is not None:
            return None  # x / 1 rounded is floor(x) or trunc(x), not x
        neutral = _NEUTRAL[kind]
        if isinstance(other, numbers.Number) and not isinstance(other, bool):
            if other == neutral and (kind in ("mul", "div") or alpha == 1 or other == 0):
                return x if _same_tensor_type(node, x) else None
        return None
    if kind == "contiguous":
        fmt = view.arg("memory_format", torch.contiguous_format)
        meta = x.meta.get("tensor_meta")
        layout = getattr(meta, "memory_format", None)
        if fmt in (None, torch.contiguous_format) and layout == torch.contiguous_format:
            return x if _same_tensor_type(node, x) else None
        return None
    if kind == "to" and _same_tensor_type(node, x) and not _has_copy_flag(view):
        return x
    return None


def _has_copy_flag(view) -> bool:
    # bound by name, so aten.to.dtype(x, dtype, False, True) counts as copy=True too
    return bool(view.arg("copy")) or view.arg("memory_format") is not None


@register_pass("eliminate_noops", Semantics.EXACT)
def eliminate_noops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove ``x*1``, ``x/1``, ``x+0``, ``x-0``, ``.contiguous()`` on contiguous tensors and
    ``.to()`` / ``.float()`` to the dtype and device the tensor already has."""
    removed: dict[str, int] = {}
    for node in list(gm.graph.nodes):
        if not node.op.startswith("call"):
            continue
        source = _noop_source(node)
        if source is not None:
            kind = kind_of(node)
            _bypass(node, source)
            removed[kind] = removed.get(kind, 0) + 1
    return PassResult(gm, modified=bool(removed), stats={"removed": removed})


CLEANUP_PASSES = (remove_dropout, remove_identity, eliminate_noops, dce)


@register_pass("cleanup", Semantics.EXACT)
def cleanup(gm: fx.GraphModule, ctx: PassContext, *, max_rounds: int = 10) -> PassResult:
    """Run dropout/identity/no-op removal and dead-code elimination to a fixed point."""
    totals: dict[str, int] = {}
    modified = False
    for _ in range(max_rounds):
        round_modified = False
        for fn in CLEANUP_PASSES:
            res = fn(gm, ctx)
            gm = res.gm
            if res.modified:
                round_modified = modified = True
                gm.graph.lint()
                n = res.stats.get("removed", 0)
                n = sum(n.values()) if isinstance(n, dict) else n
                name = fn.__name__
                totals[name] = totals.get(name, 0) + n
        if not round_modified:
            break
    gm.recompile()
    return PassResult(gm, modified=modified, stats={"removed": totals})
