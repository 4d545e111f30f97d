"""A torch.fx graph as plain JSON data, and back, without pickle or arbitrary imports.

Nodes keep their name, op, target, args, kwargs and the JSON-plain ``fxopt_*`` meta fields.
``call_function`` targets are stored as qualified names and decoded only through
``fxopt.lowering.allowlist``, so a tampered ``graph.json`` cannot make the loader import or
call anything else. Nested GraphModules (for example the branches of ``torch.cond``) are
stored under ``"subgraphs"``. Tensors and leaf modules are not stored here: the caller
supplies them in ``root`` (see ``fxopt.lowering.eager``).
"""

from __future__ import annotations

import builtins
import json
import math
from typing import Any

import torch
import torch.fx as fx
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.utils import _pytree as pytree

from fxopt.errors import LoweringError
from fxopt.lowering.allowlist import check_attr_path, check_method_name, resolve_target, target_name

GRAPH_FORMAT = "fxopt-graph"
GRAPH_VERSION = 1

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")


# --------------------------------------------------------------------------- values


def _by_name(kind: type) -> dict[str, Any]:
    return {str(v).removeprefix("torch."): v for v in vars(torch).values() if isinstance(v, kind)}


_DTYPES = _by_name(torch.dtype)
_ENUMS = {"__memory_format__": _by_name(torch.memory_format), "__layout__": _by_name(torch.layout)}


def dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str, where: str = "artifact") -> torch.dtype:
    """torch.float32 for 'float32'; unknown names raise LoweringError."""
    if name not in _DTYPES:
        raise LoweringError(f"{where}: unknown dtype {name!r}")
    return _DTYPES[name]


def encode_value(v: Any, where: str = "value") -> Any:
    """A node argument (or constructor kwarg) as JSON; unknown types raise LoweringError.

    >>> encode_value((1, float("inf"), torch.float16))
    {'__tuple__': [1, {'__float__': 'inf'}, {'__dtype__': 'float16'}]}
    """
    if isinstance(v, fx.Node):
        return {"__node__": v.name}
    if v is None or isinstance(v, (bool, str)):
        return v
    if isinstance(v, int):
        return int(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else {"__float__": repr(float(v))}
    if isinstance(v, complex):
        return {"__complex__": [encode_value(v.real, where), encode_value(v.imag, where)]}
    if isinstance(v, torch.Size):
        return {"__size__": [int(d) for d in v]}
    if type(v) is tuple:
        return {"__tuple__": [encode_value(x, where) for x in v]}
    if isinstance(v, list):
        return [encode_value(x, where) for x in v]
    if isinstance(v, dict):
        if all(isinstance(k, str) and not _is_tag(k) for k in v):
            return {k: encode_value(x, where) for k, x in v.items()}
        pairs = [[encode_value(k, where), encode_value(x, where)] for k, x in v.items()]
        return {"__dict__": pairs}
    if isinstance(v, slice):
        return {"__slice__": [encode_value(x, where) for x in (v.start, v.stop, v.step)]}
    if v is Ellipsis:
        return {"__ellipsis__": True}
    if isinstance(v, torch.dtype):
        return {"__dtype__": dtype_name(v)}
    if isinstance(v, torch.device):
        return {"__device__": str(v)}
    if isinstance(v, torch.memory_format):
        return {"__memory_format__": str(v).removeprefix("torch.")}
    if isinstance(v, torch.layout):
        return {"__layout__": str(v).removeprefix("torch.")}
    if callable(v) and not isinstance(v, (type, torch.Tensor)):
        return {"__fn__": target_name(v, where)}
    kind = (
        "a tensor"
        if isinstance(v, torch.Tensor)
        else f"a {type(v).__module__}.{type(v).__qualname__}"
    )
    raise LoweringError(
        f"{where}: argument is {kind}, which graph.json cannot store; make it a get_attr "
        "constant or a plain Python value"
    )


def _is_tag(key: str) -> bool:
    return key.startswith("__") and key.endswith("__")


def decode_value(d: Any, nodes: dict[str, fx.Node] | None = None, where: str = "value") -> Any:
    """Inverse of ``encode_value``; node references are looked up in ``nodes``."""
    if d is None or isinstance(d, (bool, int, float, str)):
        return d
    if isinstance(d, list):
        return [decode_value(x, nodes, where) for x in d]
    if not isinstance(d, dict):
        raise LoweringError(f"{where}: malformed value {d!r}")
    if len(d) != 1 or not _is_tag(next(iter(d))):
        return {k: decode_value(v, nodes, where) for k, v in d.items()}
    ((tag, x),) = d.items()
    if tag == "__node__":
        if nodes is None or x not in nodes:
            raise LoweringError(f"{where}: reference to unknown node {x!r}")
        return nodes[x]
    if tag == "__tuple__":
        return tuple(decode_value(e, nodes, where) for e in x)
    if tag == "__dict__":
        return {decode_value(k, nodes, where): decode_value(v, nodes, where) for k, v in x}
    if tag == "__float__" and x in ("inf", "-inf", "nan"):
        return float(x)
    if tag == "__complex__":
        return complex(*(decode_value(e, nodes, where) for e in x))
    if tag == "__size__":
        return torch.Size(int(e) for e in x)
    if tag == "__slice__":
        return slice(*(decode_value(e, nodes, where) for e in x))
    if tag == "__ellipsis__":
        return Ellipsis
    if tag == "__dtype__":
        return dtype_from_name(x, where)
    if tag == "__device__":
        try:
            return torch.device(x)
        except (RuntimeError, TypeError) as e:
            raise LoweringError(f"{where}: bad device {x!r}") from e
    if tag in _ENUMS and x in _ENUMS[tag]:
        return _ENUMS[tag][x]
    if tag == "__fn__":
        return resolve_target(x, where)
    raise LoweringError(f"{where}: unknown value tag {tag!r} (written by a newer fxopt?)")


# --------------------------------------------------------------------------- graphs


def graph_to_json(gm: fx.GraphModule) -> dict:
    """The graph of ``gm`` (and of nested GraphModules) as a JSON-ready dict.

    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> [n["op"] for n in graph_to_json(gm)["graph"]["nodes"]]
    ['placeholder', 'call_function', 'output']
    """
    subgraphs = {}
    for path, mod in gm.named_modules(remove_duplicate=False):
        if path and isinstance(mod, fx.GraphModule):
            subgraphs[path] = _graph_dict(mod, f"subgraph {path}")
    return {
        "format": GRAPH_FORMAT,
        "version": GRAPH_VERSION,
        "graph": _graph_dict(gm, "graph"),
        "subgraphs": subgraphs,
    }


def graph_from_json(d: dict, root: torch.nn.Module) -> fx.GraphModule:
    """Rebuild the GraphModule; ``root`` must already hold its submodules and tensors.

    Subgraph paths in ``root`` hold plain modules with the subgraph's tensors; they are
    replaced by GraphModules, deepest first.

    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> graph_from_json(graph_to_json(gm), gm)(torch.tensor([-1.0]))
    tensor([0.])
    """
    if not isinstance(d, dict) or d.get("format") != GRAPH_FORMAT:
        raise LoweringError("graph.json is not an fxopt graph")
    if not isinstance(d.get("version"), int) or d["version"] > GRAPH_VERSION:
        raise LoweringError(
            f"graph.json has version {d.get('version')!r}; this fxopt reads up to "
            f"{GRAPH_VERSION}. Upgrade fxopt to load it."
        )
    subgraphs = d.get("subgraphs") or {}
    for path in sorted(subgraphs, key=lambda p: p.count("."), reverse=True):
        holder = _get_module(root, path, f"subgraph {path}")
        sub = _build(subgraphs[path], holder, f"subgraph {path}")
        _replace_everywhere(root, holder, sub)
    return _build(d.get("graph"), root, "graph")


def _graph_dict(gm: fx.GraphModule, where: str) -> dict:
    nodes = []
    for n in gm.graph.nodes:
        w = f"{where}, node '{n.name}' ({n.op} {n.target})"
        if n.op == "call_function":
            target = target_name(n.target, w)
        else:
            target = n.target
            _check_target(n.op, target, w)
        entry = {
            "name": n.name,
            "op": n.op,
            "target": target,
            "args": encode_value(tuple(n.args), w)["__tuple__"],
            "kwargs": encode_value(dict(n.kwargs), w),
        }
        meta = {k: v for k, v in n.meta.items() if k.startswith("fxopt_") and _plain_json(v)}
        if meta:
            entry["meta"] = meta
        nodes.append(entry)
    return {"codegen": _codegen_dict(gm.graph._codegen, where), "nodes": nodes}


def _codegen_dict(cg: CodeGen, where: str) -> dict:
    if type(cg) is CodeGen:
        return {"kind": "default"}
    if type(cg) is _PyTreeCodeGen:
        info = cg.pytree_info
        try:
            return {
                "kind": "pytree",
                "orig_args": list(info.orig_args),
                "in_spec": None if info.in_spec is None else pytree.treespec_dumps(info.in_spec),
                "out_spec": None if info.out_spec is None else pytree.treespec_dumps(info.out_spec),
            }
        except Exception as e:
            raise LoweringError(
                f"{where}: its input/output structure cannot be stored ({e}); register the "
                "container types with torch.utils._pytree (with serialized_type_name)"
            ) from e
    raise LoweringError(f"{where}: custom codegen {type(cg).__qualname__} is not supported")


def _codegen_from(d: Any, where: str) -> CodeGen:
    kind = d.get("kind") if isinstance(d, dict) else None
    if kind == "default":
        return CodeGen()
    if kind != "pytree":
        raise LoweringError(f"{where}: unknown codegen {d!r}")
    for a in d["orig_args"]:
        if not isinstance(a, str) or not a.lstrip("*").isidentifier():
            raise LoweringError(f"{where}: bad argument name {a!r}")
    specs = []
    for key in ("in_spec", "out_spec"):
        try:
            specs.append(None if d[key] is None else pytree.treespec_loads(d[key]))
        except Exception as e:
            raise LoweringError(
                f"{where}: cannot read its {key} ({e}). If it names a container type from "
                "another library (e.g. transformers), import that library before loading."
            ) from e
    return _PyTreeCodeGen(_PyTreeInfo(list(d["orig_args"]), specs[0], specs[1]))


def _check_target(op: str, target: Any, where: str) -> None:
    if op not in _OPS:
        raise LoweringError(f"{where}: unknown op {op!r}")
    if op in ("get_attr", "call_module"):
        check_attr_path(target, where)
    elif op == "call_method":
        check_method_name(target, where)
    elif op == "placeholder":
        if not isinstance(target, str) or not target.lstrip("*").isidentifier():
            raise LoweringError(f"{where}: bad placeholder name {target!r}")
    elif target != "output":
        raise LoweringError(f"{where}: output node must have target 'output'")


def _build(d: Any, owner: torch.nn.Module, where: str) -> fx.GraphModule:
    if not isinstance(d, dict) or not isinstance(d.get("nodes"), list):
        raise LoweringError(f"{where}: malformed graph")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for nd in d["nodes"]:
        try:
            name, op, target = nd["name"], nd["op"], nd["target"]
            w = f"{where}, node '{name}'"
            if not isinstance(name, str) or not name.isidentifier() or name in env:
                raise LoweringError(f"{where}: bad or duplicate node name {name!r}")
            if op == "call_function":
                target = resolve_target(target, w)
            else:
                _check_target(op, target, w)
            args = tuple(decode_value(a, env, w) for a in nd["args"])
            kwargs = decode_value(nd["kwargs"], env, w)
            if not isinstance(kwargs, dict) or not all(
                isinstance(k, str) and k.isidentifier() for k in kwargs
            ):
                raise LoweringError(f"{w}: keyword names must be identifiers")
            if op == "call_function" and target is builtins.getattr:
                if len(args) < 2 or not isinstance(args[1], str) or args[1].startswith("__"):
                    raise LoweringError(f"{w}: getattr of {args[1:2]!r} is not allowed")
        except (KeyError, TypeError, ValueError) as e:
            raise LoweringError(f"{where}: malformed node {nd!r:.200} ({e})") from e
        node = graph.create_node(op, target, args, kwargs, name=name)
        node.meta.update(
            {k: v for k, v in (nd.get("meta") or {}).items() if k.startswith("fxopt_")}
        )
        env[name] = node
    graph._codegen = _codegen_from(d.get("codegen"), where)
    try:
        gm = fx.GraphModule(owner, graph, class_name="GraphModule")
        _adopt(gm, owner)
        gm.graph.lint()
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(f"{where}: the stored graph is inconsistent ({e})") from e
    return gm


def _adopt(gm: fx.GraphModule, owner: torch.nn.Module) -> None:
    """Give ``gm`` exactly the submodules and tensors of ``owner`` (GraphModule copies only
    the referenced ones, and turns plain tensor attributes into buffers)."""
    for key in [k for k, v in vars(gm).items() if isinstance(v, torch.Tensor)]:
        delattr(gm, key)
    gm._modules.clear()
    gm._modules.update(owner._modules)
    gm._parameters.clear()
    gm._parameters.update(owner._parameters)
    gm._buffers.clear()
    gm._buffers.update(owner._buffers)
    gm._non_persistent_buffers_set = set(owner._non_persistent_buffers_set)
    for k, v in vars(owner).items():
        if isinstance(v, torch.Tensor):
            object.__setattr__(gm, k, v)


def _get_module(root: torch.nn.Module, path: str, where: str) -> torch.nn.Module:
    mod = root
    for p in check_attr_path(path, where):
        mod = mod._modules.get(p)
        if mod is None:
            raise LoweringError(f"{where}: no module at {path!r}")
    return mod


def _replace_everywhere(root: torch.nn.Module, old: torch.nn.Module, new: torch.nn.Module) -> None:
    for mod in list(root.modules()):
        for k, child in mod._modules.items():
            if child is old:
                mod._modules[k] = new


def _plain_json(v: Any) -> bool:
    try:
        json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        return False
    return True
