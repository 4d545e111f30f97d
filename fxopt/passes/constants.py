"""Constant folding and common-subexpression elimination.

``fold_constants`` computes once every subgraph that depends only on parameters, buffers
and literals (weight re-parametrisations, ``weight * scale``, ``arange``-based masks) and
stores the result as a buffer. ``cse`` merges identical pure nodes. Both ask
``fxopt.ops.effects`` (as ``dce`` does), so random, in-place and unknown ops are never folded
or merged, and what they fold away ``dce`` would remove too.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.op_props import Effects
from fxopt.ops import effects, fetch_attr, fresh_attr, is_inplace
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass
from fxopt.passes.cleanup import drop_unused_attributes


def written_values(gm: fx.GraphModule) -> set[fx.Node]:
    """Nodes whose value an in-place op may change: the in-place op's inputs and everything
    that may share storage with them (views of them, and what they are views of). Such a
    value is not a constant, and two reads of it on either side of the write differ."""
    alias: dict[fx.Node, set[fx.Node]] = {}
    for node in gm.graph.nodes:
        if not node.op.startswith("call"):
            continue
        if effects(node) & (Effects.INPLACE | Effects.ALIAS):
            for a in node.all_input_nodes:
                alias.setdefault(node, set()).add(a)
                alias.setdefault(a, set()).add(node)
    todo = [a for n in gm.graph.nodes if is_inplace(n) for a in n.all_input_nodes]
    written: set[fx.Node] = set()
    while todo:
        node = todo.pop()
        if node not in written:
            written.add(node)
            todo.extend(alias.get(node, ()))
    return written


def _evaluate(gm: fx.GraphModule, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
    args = fx.node.map_arg(node.args, lambda n: env[n])
    kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
    with torch.no_grad():
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return gm.get_submodule(node.target)(*args, **kwargs)


def _storable(value: Any, max_bytes: int) -> bool:
    if not isinstance(value, torch.Tensor):
        return False
    if value.numel() * value.element_size() > max_bytes:
        return False
    return 0 not in value.stride() or value.numel() <= 1  # don't materialise broadcasts


@register_pass("fold_constants", Semantics.EXACT)
def fold_constants(gm: fx.GraphModule, ctx: PassContext, *,
                   max_bytes: int = 1 << 28) -> PassResult:
    """Compute parameter/literal-only subgraphs once and store the results as buffers."""
    env: dict[fx.Node, Any] = {}
    written = written_values(gm)
    for node in gm.graph.nodes:
        if node in written:
            continue  # changed in place at run time: not a constant
        if node.op == "get_attr":
            env[node] = fetch_attr(gm, node.target)
        elif node.op.startswith("call") and all(a in env for a in node.all_input_nodes):
            if not effects(node).foldable:
                continue
            try:
                env[node] = _evaluate(gm, node, env)
            except Exception:  # noqa: BLE001 - an op we cannot evaluate stays in the graph
                continue
    folded: list[str] = []
    for node in list(gm.graph.nodes):
        if node.op == "get_attr" or node not in env:
            continue
        live_users = [u for u in node.users if u not in env or u.op == "output"]
        if not live_users or not _storable(env[node], max_bytes):
            continue
        if any(is_inplace(u) for u in node.users):
            continue  # a stored buffer would be mutated on every call
        name = fresh_attr(gm, f"_folded_{node.name}")
        gm.register_buffer(name, env[node].detach().clone())
        with gm.graph.inserting_before(node):
            attr = gm.graph.get_attr(name)
        attr.meta = dict(node.meta)
        node.replace_all_uses_with(attr)
        folded.append(node.name)
    if folded:
        _erase_dead(gm)
        drop_unused_attributes(gm)
    return PassResult(gm, modified=bool(folded), stats={"folded": len(folded),
                                                        "nodes": folded[:20]})


def _erase_dead(gm: fx.GraphModule) -> None:
    for node in reversed(list(gm.graph.nodes)):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if effects(node).removable_if_unused:
            gm.graph.erase_node(node)


# --------------------------------------------------------------------------- CSE
def _key(value: Any) -> Any:
    if isinstance(value, fx.Node):
        return ("node", value)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(_key(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple(sorted((k, _key(v)) for k, v in value.items())))
    if isinstance(value, slice):
        return ("slice", _key(value.start), _key(value.stop), _key(value.step))
    if isinstance(value, torch.Tensor):
        return ("tensor", id(value))
    if isinstance(value, float) and value != value:
        return ("nan",)
    try:
        hash(value)
    except TypeError:
        return ("id", id(value))
    return (type(value).__name__, value)


@register_pass("cse", Semantics.EXACT)
def cse(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Merge identical pure nodes (same op, target and arguments); keep impure/random ones."""
    seen: dict[Any, fx.Node] = {}
    merged = 0
    written = written_values(gm)
    for node in list(gm.graph.nodes):
        if node.op in ("placeholder", "output"):
            continue
        if node in written or any(a in written for a in node.all_input_nodes):
            continue  # a read before an in-place write and one after it differ
        if not effects(node).cse_safe:
            continue
        try:
            key = (node.op, _key(node.target), _key(node.args), _key(node.kwargs))
            hash(key)
        except TypeError:
            continue
        if any(is_inplace(u) for u in node.users):
            continue  # its value is written to later: a merged copy would see the write
        if key in seen and not any(is_inplace(u) for u in seen[key].users):
            node.replace_all_uses_with(seen[key])
            gm.graph.erase_node(node)
            merged += 1
        else:
            seen[key] = node
    return PassResult(gm, modified=merged > 0, stats={"merged": merged})
