"""Submodules of an eager artifact: recorded as constructor calls, rebuilt without pickle.

Every ``call_module`` leaf is stored as its class name (only ``torch.nn`` and ``fxopt``
classes) and the constructor kwargs read back from its attributes, checked to rebuild the
same ``extra_repr`` before anything is written. Containers become plain modules; nested
GraphModules come back from ``graph.json``. Tensors are not handled here (see
``fxopt.lowering.eager_storage``).

Example:
    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(2, 3)))
    >>> specs, leaves = module_specs(gm)
    >>> specs["0"]["class"], rebuild_modules(specs).get_submodule("0")
    ('torch.nn.modules.linear.Linear', Linear(in_features=2, out_features=3, bias=True))
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterator
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import LoweringError
from fxopt.lowering.allowlist import check_attr_path
from fxopt.lowering.graph_json import decode_value, encode_value
from fxopt.lowering.input_guard import input_guard_for, is_export_guard

PLAIN = "torch.nn.modules.module.Module"
GRAPH = "torch.fx.graph_module.GraphModule"
_NOT_ARGS = {"self", "device", "dtype"}
# Constructor arguments that are not stored under their own name.
_KWARG_RULES: dict[type, dict[str, Any]] = {
    torch.nn.MultiheadAttention: {
        "bias": lambda m: m.in_proj_bias is not None,
        "add_bias_kv": lambda m: m.bias_k is not None,
    },
}
_RNN_ARGS = ["input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout"]
_EXTRA_ARGS: dict[type, list[str]] = {  # classes whose __init__ takes *args, **kwargs
    torch.nn.RNN: [*_RNN_ARGS, "bidirectional", "nonlinearity"],
    torch.nn.LSTM: [*_RNN_ARGS, "bidirectional", "proj_size"],
    torch.nn.GRU: [*_RNN_ARGS, "bidirectional"],
}
# Classes that moved since artifacts were first written: the name a manifest may hold ->
# where the class lives now (format_version 1 stays loadable).
_MOVED_CLASSES = {
    "fxopt.lowering.graph_json.InputGuard": "fxopt.lowering.input_guard.InputGuard",
}


def class_name(cls: type) -> str:
    """The qualified name a manifest stores for a module class.

    >>> class_name(torch.nn.Linear)
    'torch.nn.modules.linear.Linear'
    """
    return f"{cls.__module__}.{cls.__qualname__}"


def walk(mod: torch.nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.nn.Module]]:
    """Every ``(path, submodule)`` below ``mod``, parents first, aliases included.

    >>> [p for p, _ in walk(torch.nn.Sequential(torch.nn.Sequential(torch.nn.ReLU())))]
    ['0', '0.0']
    """
    for name, child in mod._modules.items():
        if child is not None:
            path = f"{prefix}.{name}" if prefix else name
            yield path, child
            yield from walk(child, path)


def module_specs(gm: fx.GraphModule) -> tuple[dict, set[str]]:
    """Manifest entries for every submodule, and the call_module (leaf) paths.

    Refuses, before anything is written, a leaf whose class is outside ``torch.nn`` and
    ``fxopt`` or that does not rebuild from its recovered constructor arguments.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Sequential(torch.nn.ReLU()))
    >>> module_specs(gm)[0]["0"]["class"]
    'torch.nn.modules.activation.ReLU'
    """
    leaves: dict[str, fx.Node] = {}
    for path, mod in [("", gm), *((p, m) for p, m in walk(gm) if isinstance(m, fx.GraphModule))]:
        for n in mod.graph.find_nodes(op="call_module"):
            leaves.setdefault(f"{path}.{n.target}" if path else n.target, n)
    rebuilt = [p for p in leaves if not isinstance(gm.get_submodule(p), fx.GraphModule)]
    specs: dict[str, dict] = {}
    seen: dict[int, str] = {}
    for path, mod in walk(gm):
        check_attr_path(path, f"submodule {path!r}")
        if any(path.startswith(f"{a}.") for a, s in specs.items() if "alias_of" in s):
            continue  # comes along with its aliased ancestor
        if id(mod) in seen:
            specs[path] = {"alias_of": seen[id(mod)]}
            continue
        seen[id(mod)] = path
        leaf = next((p for p in rebuilt if path == p or path.startswith(p + ".")), None)
        if is_export_guard(mod):
            specs[path] = _leaf_spec(input_guard_for(gm), path)
        elif isinstance(mod, fx.GraphModule):
            specs[path] = {"class": GRAPH}
        elif leaf is None:
            specs[path] = {"class": PLAIN}  # a container: holds tensors and submodules
        elif _allowed_class(class_name(type(mod))):
            specs[path] = _leaf_spec(mod, path)
        else:
            raise LoweringError(
                f"node '{leaves[leaf].name}' calls submodule '{path}' of class "
                f"{class_name(type(mod))}, which an eager artifact cannot rebuild without "
                "pickle. Capture without that leaf module (let tracing go through it) or with "
                "mode='export'."
            )
    return specs, set(leaves)


def _allowed_class(name: str) -> bool:
    return name.startswith(("torch.nn.", "fxopt."))


def _leaf_spec(mod: torch.nn.Module, path: str) -> dict:
    spec = {
        "class": class_name(type(mod)),
        "kwargs": encode_value(_recover_kwargs(mod, path), f"submodule {path!r}"),
        "extra_repr": mod.extra_repr(),
    }
    _check_repr(_construct(spec, path), spec, path)  # refuse before writing anything
    return spec


def _check_repr(mod: torch.nn.Module, spec: dict, path: str) -> None:
    if "extra_repr" in spec and mod.extra_repr() != spec["extra_repr"]:
        raise LoweringError(
            f"submodule '{path}' ({spec['class']}) does not rebuild from its constructor "
            f"arguments: got {mod.extra_repr()!r}, expected {spec['extra_repr']!r}"
        )


def _recover_kwargs(mod: torch.nn.Module, path: str) -> dict:
    """Constructor kwargs read back from same-named attributes (plus a few rules)."""
    cls = type(mod)
    rules = _KWARG_RULES.get(cls, {})
    params: dict[str, Any] = {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name not in _NOT_ARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    }
    for name in _EXTRA_ARGS.get(cls, []):
        params.setdefault(name, None)
    kwargs = {}
    for name, p in params.items():
        optional = p is None or p.default is not p.empty
        attr = getattr(mod, name, None)
        if name in rules:
            value = rules[name](mod)
        elif name == "bias" and not isinstance(attr, bool):
            value = attr is not None  # a Parameter or None
        elif hasattr(mod, name) and not isinstance(attr, (torch.Tensor, torch.nn.Module)):
            value = attr
        elif optional:
            continue
        else:
            raise LoweringError(
                f"submodule '{path}' ({class_name(cls)}): cannot recover constructor argument "
                f"{name!r}; add a rule for it in fxopt.lowering.eager_rebuild._KWARG_RULES"
            )
        try:
            encode_value(value, "kwarg")
        except LoweringError:
            if optional:
                continue
            raise LoweringError(
                f"submodule '{path}': constructor argument {name}={value!r} is not plain data"
            ) from None
        kwargs[name] = value
    return kwargs


def _resolve_class(name: Any, where: str) -> type:
    if not isinstance(name, str) or not _allowed_class(name):
        raise LoweringError(f"{where}: class {name!r} is not allowed; only torch.nn and fxopt")
    name = _MOVED_CLASSES.get(name, name)
    parts = name.split(".")
    for cut in range(len(parts) - 1, 1, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for p in parts[cut:]:
            obj = None if p.startswith("__") else getattr(obj, p, None)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and class_name(obj) == name:
            return obj
        break
    raise LoweringError(f"{where}: class {name} does not exist in this torch/fxopt version")


def _construct(spec: dict, path: str) -> torch.nn.Module:
    where = f"submodule {path!r}"
    cls = _resolve_class(spec.get("class"), where)
    kwargs = decode_value(spec.get("kwargs", {}), None, where)
    try:
        with torch.device("meta"):  # no allocation, no RNG use: tensors come from safetensors
            return cls(**kwargs)
    except Exception as e:
        raise LoweringError(f"{where}: {spec['class']}(**{kwargs}) failed: {e}") from e


def rebuild_modules(specs: dict) -> torch.nn.Module:
    """The module tree of a manifest's ``modules`` entry, on the meta device (no tensors yet).

    >>> rebuild_modules({"fc": {"class": "torch.nn.modules.linear.Linear",
    ...                         "kwargs": {"in_features": 2, "out_features": 1}}}).fc.weight.device
    device(type='meta')
    """
    root = torch.nn.Module()
    built: dict[str, torch.nn.Module] = {"": root}
    for path, spec in specs.items():
        check_attr_path(path, f"submodule {path!r}")
        parent_path, _, name = path.rpartition(".")
        if parent_path not in built:
            raise LoweringError(f"submodule {path!r} comes before its parent")
        parent = built[parent_path]
        if "alias_of" in spec:
            mod = parent._modules[name] = built[spec["alias_of"]]
            built.update(walk(mod, path))
            built[path] = mod
            continue
        existing = parent._modules.get(name)
        if existing is not None and class_name(type(existing)) == spec["class"]:
            mod = existing  # made by the parent's constructor
        elif spec["class"] in (PLAIN, GRAPH):
            mod = torch.nn.Module()
        else:
            mod = _construct(spec, path)
        _check_repr(mod, spec, path)
        parent._modules[name] = built[path] = mod
    extra = sorted(p for p, _ in walk(root) if p not in built)
    if extra:
        raise LoweringError(f"rebuilt modules have unexpected submodules {extra}")
    return root
