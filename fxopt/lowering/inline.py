"""Inline the helper functions a graph calls by tracing through them, so an artifact needs
no import beyond the allowlist (``fxopt.lowering.allowlist``).

Libraries mark helpers with ``torch.fx.wrap`` (torchvision's Swin
``_get_relative_position_bias``, a model file's own utilities), and ``symbolic_trace`` keeps
each call as one leaf ``call_function`` node. Before lowering, every call whose target the
loader could not resolve is re-traced with a plain ``torch.fx.Tracer``, calling the original
function (not its wrapped stand-in), so its body becomes the torch calls it makes; nested
helpers are inlined in turn. A helper that cannot be traced (data-dependent control flow, a
tensor turned into a Python value) is kept only if its module is ``trusted``; otherwise
``inline_helpers`` raises ``LoweringError`` naming it and saying how to trust it.

Example::

    gm, inlined = inline_helpers(gm)          # a copy when anything changed
    inlined                                   # ['mylib.ops._get_relative_position_bias']
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch.fx as fx

from fxopt.errors import LoweringError
from fxopt.graph_utils import copy_graph_module, fresh_attr
from fxopt.lowering.allowlist import target_name, trusting

_MAX_DEPTH = 8  # helpers calling helpers: rounds of inlining before giving up


def inline_helpers(
    gm: fx.GraphModule, trusted: Sequence[str] = ()
) -> tuple[fx.GraphModule, list[str]]:
    """``gm`` with every call the artifact loader could not resolve inlined, and the names of
    the functions inlined. ``gm`` itself is never changed: a copy is returned when needed.

    Calls under a ``trusted`` module prefix that cannot be traced are kept as they are.

    >>> import torch
    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> inline_helpers(gm)[1]
    []
    """
    with trusting(trusted):
        if not _pending(gm):
            return gm, []
        gm = copy_graph_module(gm, share_tensors=True)
        inlined: list[str] = []
        kept: set[fx.Node] = set()
        for _ in range(_MAX_DEPTH):
            pending = [n for n in _pending(gm) if n not in kept]
            if not pending:
                break
            for node in pending:
                name = _name(node.target)
                reason = _inline(gm, node)
                if reason is None:
                    inlined.append(name)
                elif _trusted_call(node.target):
                    kept.add(node)
                else:
                    raise LoweringError(
                        f"node '{node.name}' calls {name}, which an eager artifact may not call "
                        f"and which cannot be inlined by tracing through it ({reason}). If you "
                        "trust that code, pass its module: fxopt.lower(gm, 'eager', inputs, "
                        f"path=..., trusted=[{_module(node.target)!r}]); it is recorded in the "
                        "manifest and imported when the artifact is loaded."
                    )
        else:
            names = sorted({_name(n.target) for n in _pending(gm)})
            raise LoweringError(
                f"helpers still call helpers after {_MAX_DEPTH} rounds of inlining: {names}"
            )
        gm.graph.lint()
        gm.recompile()
        return gm, list(dict.fromkeys(inlined))


def _pending(gm: fx.GraphModule) -> list[fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and not _nameable(n.target)]


def _nameable(fn: Any) -> bool:
    try:
        target_name(fn)
    except LoweringError:
        return False
    return True


def _trusted_call(fn: Any) -> bool:
    return _module(fn) != "" and _nameable(fn)


def _module(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    return module if isinstance(module, str) else ""


def _name(fn: Any) -> str:
    qual = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)
    return f"{_module(fn)}.{qual}" if _module(fn) else str(qual)


def _inline(gm: fx.GraphModule, node: fx.Node) -> str | None:
    """Replace ``node`` by the body of its target, traced; a reason when that fails."""
    inputs = list(dict.fromkeys(_nodes_in((node.args, node.kwargs))))
    try:
        sub = _trace(node.target, node.args, node.kwargs, inputs)
    except Exception as e:  # whatever the helper's body raised under tracing
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}".rstrip(": ")
    placeholders = [n for n in sub.graph.nodes if n.op == "placeholder"]
    env: dict[fx.Node, Any] = dict(zip(placeholders, inputs, strict=True))
    provenance = {k: v for k, v in node.meta.items() if k.startswith("fxopt_")}
    result: Any = None
    with gm.graph.inserting_before(node):
        for sn in sub.graph.nodes:
            if sn.op == "placeholder":
                continue
            if sn.op == "output":
                result = fx.node.map_arg(sn.args[0], env.__getitem__)
                continue
            if sn.op == "get_attr":  # a constant the body made: give it a home in gm
                value = getattr(sub, sn.target)
                attr = fresh_attr(gm, f"{node.name}_{sn.target.lstrip('_')}")
                gm.register_buffer(attr, value)
                new = gm.graph.get_attr(attr)
            else:
                new = gm.graph.node_copy(sn, env.__getitem__)
            new.meta.update(provenance)
            new.meta["fxopt_inlined_from"] = _name(node.target)
            env[sn] = new
    return _replace(node, result)


def _replace(node: fx.Node, result: Any) -> str | None:
    graph = node.graph
    if isinstance(result, fx.Node):
        node.replace_all_uses_with(result)
    elif isinstance(result, (tuple, list)) and all(
        u.target is operator.getitem and isinstance(u.args[1], int) for u in node.users
    ):
        for user in list(node.users):
            value = result[user.args[1]]
            if not isinstance(value, fx.Node):
                return f"it returns a non-tensor {type(value).__name__}"
            user.replace_all_uses_with(value)
            graph.erase_node(user)
    else:
        return f"it returns {type(result).__name__}, not a tensor or a tuple of tensors"
    graph.erase_node(node)
    return None


def _trace(fn: Callable, args: tuple, kwargs: dict, inputs: list[fx.Node]) -> fx.GraphModule:
    """Trace ``fn(*args, **kwargs)`` with one placeholder per node in ``inputs``. The call goes
    to ``fn`` itself, so a ``torch.fx.wrap``-ped function is traced through, not kept."""

    def call(*values: Any) -> Any:
        env = dict(zip(inputs, values, strict=True))
        a, k = fx.node.map_arg((args, kwargs), env.__getitem__)
        return fn(*a, **k)

    # the tracer makes one placeholder per named parameter, so the entry point needs one
    # name per input: a two-line function generated for this arity
    names = ", ".join(f"x{i}" for i in range(len(inputs)))
    namespace: dict[str, Any] = {"_call": call}
    exec(f"def inlined({names}):\n    return _call({names})\n", namespace)  # noqa: S102
    tracer = fx.Tracer()
    graph = tracer.trace(namespace["inlined"])
    return fx.GraphModule(tracer.root, graph)


def _nodes_in(value: Any) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg(value, out.append)
    return out

