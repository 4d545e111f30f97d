"""Cleanup passes: dead code, dropout (and stochastic depth), identities, no-op arithmetic.

All are exact. ``cleanup`` runs the four to a fixed point. ``drop_unused_attributes``
lives in fxopt/graph_utils.py and is importable from here as before.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.graph_utils import drop_unused_attributes, fresh_attr  # noqa: F401 - re-exported
from fxopt.op_props import Prop
from fxopt.ops import effects, has_prop, kind_of, op_of
from fxopt.passes import builtin_rules  # noqa: F401  (registers the eliminate_noops pass)
from fxopt.passes.base import REGISTRY, PassContext, PassResult, Semantics, register_pass


@register_pass("dce", Semantics.EXACT)
def dce(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove nodes whose results are never used and whose ``fxopt.ops.effects`` say they may
    go (not random, in-place, a check, or unknown), then unused submodules and tensors."""
    removed = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if effects(node).removable_if_unused or _checks_dead_value(node):
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


def _bypass(node: fx.Node, replacement: fx.Node) -> None:
    node.replace_all_uses_with(replacement)
    node.graph.erase_node(node)


@register_pass("remove_dropout", Semantics.EXACT)
def remove_dropout(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Remove inactive ops that the op table declares ``Prop.IDENTITY_IN_EVAL`` (dropout,
    stochastic depth, drop path): eval-mode modules, ``training=False`` calls, ``p == 0``."""
    removed, kept = 0, []
    for node in list(gm.graph.nodes):
        view = op_of(node) if node.op.startswith("call") else None
        if view is None or not has_prop(view, Prop.IDENTITY_IN_EVAL) or view.input is None:
            continue
        if view.module is not None:
            active = view.module.training
        else:
            active = bool(view.arg("training", view.arg("train", True))) and view.arg("p") != 0
        if active:
            kept.append((node.name, view.kind))
            continue
        _bypass(node, view.input)
        removed += 1
    if removed:
        drop_unused_attributes(gm)
    stats = {"removed": removed}
    if kept:
        stats["kept"] = {n: f"{k} is active (training=True): it is random" for n, k in kept}
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


# the registered ``eliminate_noops`` pass itself (the rule set of builtin_rules.py), so the
# pass and this cleanup step are one function with one stats shape: {"fired", "by_kind"}
eliminate_noops = REGISTRY["eliminate_noops"].fn


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
                n = _removed(res.stats)
                name = fn.__name__
                totals[name] = totals.get(name, 0) + n
        if not round_modified:
            break
    gm.recompile()
    return PassResult(gm, modified=modified, stats={"removed": totals})


def _removed(stats: dict) -> int:
    """How many nodes a cleanup step removed: ``removed`` (a count), or the op kinds a
    rule set took out (``by_kind``)."""
    if "by_kind" in stats:
        return sum(stats["by_kind"].values())
    n = stats.get("removed", 0)
    return sum(n.values()) if isinstance(n, dict) else n


@register_pass("flatten_modules", Semantics.EXACT)
def flatten_modules(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Move called submodules and read tensors to the top level (``blocks.0.fc`` becomes
    ``blocks_0_fc``): generated code then does one attribute lookup per use instead of a
    chain of ``nn.Module.__getattr__`` calls, which costs real time on small models.
    The original path stays in ``node.meta["fxopt_module_path"]``."""
    renamed: dict[str, str] = {}
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or "." not in str(node.target):
            continue
        old = str(node.target)
        if old not in renamed:
            new = fresh_attr(gm, old.replace(".", "_"))
            owner, _, leaf = old.rpartition(".")
            value = getattr(gm.get_submodule(owner), leaf)
            if isinstance(value, torch.nn.Module):
                gm.add_submodule(new, value)
            elif isinstance(value, torch.nn.Parameter):
                gm.register_parameter(new, value)
            elif isinstance(value, torch.Tensor):
                gm.register_buffer(new, value)
            else:
                continue
            renamed[old] = new
        node.meta.setdefault(
            "fxopt_module_path", old if node.op == "call_module" else old.rpartition(".")[0]
        )
        node.target = renamed[old]
    if renamed:
        drop_unused_attributes(gm)
        gm.recompile()
    return PassResult(gm, modified=bool(renamed), stats={"moved": len(renamed)})
