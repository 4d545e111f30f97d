"""A torch.fx graph as plain JSON data, and back, without pickle or arbitrary imports.

Nodes keep their name, op, target, args, kwargs and the JSON-plain ``fxopt_*`` meta fields.
``call_function`` targets are stored as qualified names ("torch.ops.aten.conv2d.default",
"torch.nn.functional.relu", "_operator.add") and decoded only from an allowlist of
namespaces, so a tampered ``graph.json`` cannot make the loader import or call anything
else. Nested GraphModules (for example the branches of ``torch.cond``) are stored under
``"subgraphs"``. Tensors and leaf modules are not stored here: the caller supplies them
in ``root`` (see ``fxopt.lowering.eager``).
"""

from __future__ import annotations

import builtins
import importlib
import json
import math
import operator
import re
import types
from typing import Any

import torch
import torch.fx as fx
from torch.fx.graph import CodeGen, _PyTreeCodeGen, _PyTreeInfo
from torch.fx.node import _get_qualified_name
from torch.utils import _pytree as pytree

from fxopt.errors import LoweringError

GRAPH_FORMAT = "fxopt-graph"
GRAPH_VERSION = 1

_OPS = ("placeholder", "get_attr", "call_function", "call_method", "call_module", "output")
# Modules whose functions a graph may call by "<namespace>.<name>".
_NAMESPACES: dict[str, Any] = {
    "torch": torch,
    "torch.Tensor": torch.Tensor,
    "torch.nn.functional": torch.nn.functional,
    "torch.functional": torch.functional,
    "torch.linalg": torch.linalg,
    "torch.fft": torch.fft,
    "torch.special": torch.special,
    "torch._C._nn": torch._C._nn,
    "torch._C._linalg": torch._C._linalg,
    "torch._C._fft": torch._C._fft,
    "torch._C._special": torch._C._special,
    "_operator": operator,
    "math": math,
}
_EXACT = {
    "builtins.getattr": builtins.getattr,
    "torch._C._set_grad_enabled": torch._C._set_grad_enabled,
}
# Reachable from allowed namespaces, but they read/write files, compile code or build
# arbitrary callables: never loaded from an artifact.
_DENIED = set(
    "torch.load torch.save torch.from_file torch.compile "
    "_operator.attrgetter _operator.methodcaller _operator.call".split()
)
_PRIVATE_TORCH_OK = {"_assert", "_check", "_check_is_size", "_check_index", "_check_value"}
# Tensor dunders a call_method node may name; introspection dunders stay forbidden.
_DUNDER_METHODS = {
    f"__{n}__"
    for n in (
        "add radd iadd sub rsub isub mul rmul imul truediv rtruediv itruediv floordiv rfloordiv "
        "mod rmod pow rpow matmul rmatmul neg pos abs invert and rand or ror xor rxor lshift "
        "rshift eq ne lt le gt ge getitem setitem len contains bool float int index"
    ).split()
}
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
_OPERATOR_TYPES = (
    torch._ops.OpOverload,
    torch._ops.OpOverloadPacket,
    torch._ops.HigherOrderOperator,
)


# --------------------------------------------------------------------------- targets


def target_name(fn: Any, where: str = "graph") -> str:
    """Qualified name of a call_function target, checked to decode back to ``fn``.

    >>> target_name(torch.ops.aten.add.Tensor)
    'torch.ops.aten.add.Tensor'
    """
    if isinstance(fn, torch._ops.OpOverload):
        name = f"torch.ops.{fn.namespace}.{fn._opname}.{fn._overloadname}"
    elif isinstance(fn, torch._ops.OpOverloadPacket):
        name = f"torch.ops.{fn._qualified_op_name.replace('::', '.')}"
    elif isinstance(fn, torch._ops.HigherOrderOperator):
        name = f"torch.ops.{fn.namespace}.{fn.name()}"
    else:
        try:
            name = _canonical(fn)
        except Exception as e:
            raise LoweringError(f"{where}: cannot name the callable {fn!r} ({e})") from e
    try:
        ok = resolve_target(name, where) is fn
    except LoweringError as e:
        raise LoweringError(
            f"{e}. Loaded artifacts may only call torch, torch.ops, torch.nn.functional, "
            "operator, math, builtins.getattr and fxopt functions: rewrite that call, or "
            "capture with mode='export' so it becomes aten ops."
        ) from None
    if not ok:
        raise LoweringError(f"{where}: {fn!r} is not reachable under its name {name}")
    return name


def resolve_target(name: str, where: str = "graph") -> Any:
    """The callable a qualified name denotes, from allowlisted namespaces only.

    >>> resolve_target("torch.nn.functional.relu") is torch.nn.functional.relu
    True
    """
    if not isinstance(name, str):
        raise LoweringError(f"{where}: call target must be a string, got {name!r}")
    if name.startswith("operator."):
        name = "_" + name
    if name in _DENIED:
        raise LoweringError(f"{where}: {name} is never called from a loaded artifact")
    if name in _EXACT:
        return _EXACT[name]
    parts = name.split(".")
    if any(not p.isidentifier() for p in parts):
        raise LoweringError(f"{where}: target {name!r} is not a plain dotted name")
    if name.startswith("torch.ops."):
        # operator names such as aten.__and__.Tensor are registry keys, not introspection
        return _resolve_op(parts, where)
    if any(p.startswith("__") for p in parts):
        raise LoweringError(f"{where}: target {name!r} is not a plain dotted name")
    if name.startswith("fxopt."):
        return _resolve_fxopt(name, parts, where)
    namespace, attr = ".".join(parts[:-1]), parts[-1]
    if namespace not in _NAMESPACES:
        raise LoweringError(f"{where}: target {name} is outside the allowed namespaces")
    if namespace == "torch" and attr.startswith("_") and attr not in _PRIVATE_TORCH_OK:
        if not attr.startswith("_sym_") and getattr(
            torch._C._VariableFunctions, attr, 0
        ) is not getattr(torch, attr, 1):
            raise LoweringError(f"{where}: private function {name} is not allowed")
    fn = getattr(_NAMESPACES[namespace], attr, None)
    if fn is None or not callable(fn) or isinstance(fn, (type, types.ModuleType)):
        raise LoweringError(f"{where}: {name} is not a function in this torch version")
    if _canonical(fn) != name:
        raise LoweringError(f"{where}: {name} is an alias of {_canonical(fn)}")
    return fn


def _canonical(fn: Any) -> str:
    name = _get_qualified_name(fn)
    if "." not in name:
        return f"builtins.{name}"
    return "_" + name if name.startswith("operator.") else name


# fxopt's own custom ops (torch.ops.fxopt.<name>) and the module that registers each: a
# fixed allowlist, so a tampered graph.json cannot trigger any other import
_FXOPT_OPS = {
    "dynamic_int8_linear": "fxopt.quant.dynamic",
    "quantize_dequantize": "fxopt.quant.qdq",
    "dequantize_int32": "fxopt.quant.qdq",
}


def _resolve_op(parts: list[str], where: str) -> Any:
    if any(p.startswith("__") for i, p in enumerate(parts) if i != 3):
        raise LoweringError(f"{where}: target {'.'.join(parts)!r} is not a plain operator name")
    if len(parts) > 3 and parts[2] == "fxopt" and parts[3] in _FXOPT_OPS:
        importlib.import_module(_FXOPT_OPS[parts[3]])
    obj: Any = torch.ops
    try:
        for p in parts[2:]:
            obj = getattr(obj, p)
    except (AttributeError, RuntimeError):
        raise LoweringError(
            f"{where}: operator {'.'.join(parts)} is not registered in this process; import the "
            "library that defines it (or upgrade torch) before loading"
        ) from None
    if not isinstance(obj, _OPERATOR_TYPES):
        raise LoweringError(f"{where}: {'.'.join(parts)} is not an operator")
    return obj


def _resolve_fxopt(name: str, parts: list[str], where: str) -> Any:
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for p in parts[cut:]:
                obj = getattr(obj, p)
        except AttributeError:
            break
        if callable(obj):
            return obj
    raise LoweringError(f"{where}: {name} does not exist in this fxopt version")


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
    ['placeholder', 'call_module', 'output']
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


def check_attr_path(path: str, where: str) -> list[str]:
    """Split a dotted module/attribute path, refusing names unsafe for generated code."""
    parts = path.split(".") if isinstance(path, str) else [""]
    for p in parts:
        if not _COMPONENT.match(p) or p.startswith("__"):
            raise LoweringError(f"{where}: {path!r} is not a plain attribute path")
    return parts


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
        if (
            not isinstance(target, str)
            or not target.isidentifier()
            or (target.startswith("__") and target not in _DUNDER_METHODS)
        ):
            raise LoweringError(f"{where}: method name {target!r} is not allowed")
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


# --------------------------------------------------------------------------- export guards


class InputGuard(torch.nn.Module):
    """The input checks of a ``torch.export`` module (its ``_guards_fn``), kept as data
    instead of generated code so that loading never has to exec anything.

    ``inputs`` holds one entry per flat input: None (unchecked), {"name", "value"} for a
    specialized scalar, or {"name", "shape"} where a dim is an int (static), a symbol name
    (dynamic; equal symbols must match) or None; ``ranges`` maps symbols to [lo, hi].

    >>> InputGuard([{"name": "x", "shape": ["s0", 3]}])(torch.zeros(5, 3))
    """

    def __init__(self, inputs: list, ranges: dict | None = None) -> None:
        super().__init__()
        self.inputs = inputs
        self.ranges = ranges or {}

    def forward(self, *args: Any) -> None:
        if len(args) != len(self.inputs):
            raise LoweringError(f"expected {len(self.inputs)} inputs, got {len(args)}")
        seen: dict[str, tuple[int, str]] = {}
        for i, (arg, spec) in enumerate(zip(args, self.inputs, strict=True)):
            name = (spec or {}).get("name", f"input {i}")
            if spec is None or ("value" in spec and arg == spec["value"]):
                continue
            if "value" in spec:
                raise LoweringError(f"{name} must be {spec['value']!r} (specialized at export)")
            want = spec["shape"]
            if not isinstance(arg, torch.Tensor) or arg.dim() != len(want):
                got = tuple(arg.shape) if isinstance(arg, torch.Tensor) else type(arg).__name__
                raise LoweringError(f"{name}: expected a {len(want)}-d tensor, got {got}")
            for d, (size, w) in enumerate(zip(arg.shape, want, strict=True)):
                where = f"{name}.shape[{d}]"
                if isinstance(w, int) and size != w:
                    raise LoweringError(
                        f"{where} is {size} but this artifact was exported for {w}; export "
                        "with dynamic_shapes to accept other sizes"
                    )
                if isinstance(w, str):
                    if w in seen and seen[w][0] != size:
                        raise LoweringError(f"{where} is {size} but must equal {seen[w][1]}")
                    seen.setdefault(w, (size, where))
                    lo, hi = self.ranges.get(w, (None, None))
                    if (lo is not None and lo > 2 and size < lo) or (hi is not None and size > hi):
                        raise LoweringError(f"{where} is {size}, outside the range [{lo}, {hi}]")

    def extra_repr(self) -> str:
        return f"inputs={self.inputs}, ranges={self.ranges}"


def is_export_guard(mod: torch.nn.Module) -> bool:
    """True for the ``_guards_fn`` module that ``ExportedProgram.module()`` adds."""
    return type(mod).__name__ == "GuardsFn" and type(mod).__module__ == "torch.export._unlift"


def input_guard_for(gm: fx.GraphModule) -> InputGuard:
    """An InputGuard checking what torch.export's guards check on ``gm``'s placeholders
    (static sizes, equal symbolic sizes, declared ranges, specialized scalars)."""
    inputs: list = []
    for n in gm.graph.find_nodes(op="placeholder"):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = [d if isinstance(d, int) else _symbol(d) for d in val.shape]
            inputs.append({"name": n.name, "shape": dims})
        elif isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
            inputs.append({"name": n.name, "value": val})
        else:
            inputs.append(None)
    used = {d for spec in inputs if spec and "shape" in spec for d in spec["shape"]}
    ranges = {
        str(sym): [_as_int(vr.lower), _as_int(vr.upper)]
        for sym, vr in (getattr(gm, "range_constraints", None) or {}).items()
        if str(sym) in used
    }
    return InputGuard(inputs, ranges)


def _symbol(d: Any) -> str | None:
    expr = getattr(getattr(d, "node", None), "expr", None)
    return str(expr) if getattr(expr, "is_Symbol", False) else None


def _as_int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return None
