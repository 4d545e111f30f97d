"""The eager backend: a GraphModule as a folder that rebuilds without pickle.

``DIR/model.py`` (readable code, never executed), ``DIR/graph.json`` (the fx graph as
data), ``DIR/weights.safetensors`` and ``DIR/manifest.json`` (versions, shapes, pipeline,
submodule constructors, tensor kinds and aliases). Call_module submodules are rebuilt
from their class name and constructor kwargs, only from ``torch.nn`` and ``fxopt``.

Example::

    art = fxopt.lower(gm, "eager", (x,), path="out/model")
    art = fxopt.load("out/model")
    y = art(x)
"""

from __future__ import annotations

import copy
import datetime
import importlib
import importlib.metadata
import inspect
import json
import os
import shutil
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import LoweringError
from fxopt.lowering import (
    Artifact,
    assert_artifact_matches,
    check_replaceable,
    destination,
    run_module,
    write_folder,
)
from fxopt.lowering.graph_json import (
    check_attr_path,
    decode_value,
    dtype_name,
    encode_value,
    graph_from_json,
    graph_to_json,
    input_guard_for,
    is_export_guard,
)

FORMAT = "fxopt-eager"
FORMAT_VERSION = 1
FILES = ("model.py", "graph.json", "weights.safetensors", "manifest.json")
_PLAIN = "torch.nn.modules.module.Module"
_GRAPH = "torch.fx.graph_module.GraphModule"
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


class EagerArtifact(Artifact):
    """A loaded eager folder: ``art(*inputs)``, ``art.module``, ``art.manifest``."""

    kind = "eager"

    def __init__(self, path: Path, manifest: dict, module: fx.GraphModule) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.module = module

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        with torch.no_grad():
            return self.module(*inputs, **kwargs)

    def save(self, path: str | os.PathLike) -> EagerArtifact:
        """Copy the folder to ``path`` (atomically, checked by loading the copy).

        >>> art.save("backup/model")  # doctest: +SKIP
        """
        dest = destination(path)
        if dest == self.path.absolute():
            return self

        def write(tmp: Path) -> EagerArtifact:
            for f in FILES:
                shutil.copyfile(self.path / f, tmp / f)
            return load(tmp)

        art = write_folder(dest, write, FILES)
        art.path = dest
        return art

    def __repr__(self) -> str:
        return f"EagerArtifact(path={str(self.path)!r}, nodes={len(self.module.graph.nodes)})"


# --------------------------------------------------------------------------- lower


def lower(
    gm: fx.GraphModule, example_inputs: Any, path: str | os.PathLike | None = None, **options: Any
) -> EagerArtifact:
    """Write ``gm`` as an eager folder at ``path``, verified by loading it back.

    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> art = lower(gm, (torch.ones(2),), "out/relu")  # doctest: +SKIP
    >>> art(-torch.ones(2))  # doctest: +SKIP
    tensor([0., 0.])
    """
    if options:
        raise LoweringError(f"eager lowering takes no options, got {sorted(options)}")
    if path is None:
        raise LoweringError("the eager target writes a folder: pass path='out/model'")
    if not isinstance(gm, fx.GraphModule):
        raise LoweringError(
            f"lower() takes a torch.fx.GraphModule, got {type(gm).__name__}; "
            "capture the model first with fxopt.capture(model, example_inputs)"
        )
    single = not isinstance(example_inputs, (tuple, list))
    inputs = (example_inputs,) if single else tuple(example_inputs)
    dest = destination(path)
    check_replaceable(dest, FILES)  # before any work: refuse early, touch nothing
    modules, leaves = _module_specs(gm)
    graph_doc = graph_to_json(gm)
    tensors, to_save = _tensor_specs(gm)
    reference = run_module(_reference_module(gm, leaves), inputs, "the GraphModule")
    manifest = _manifest(gm, inputs, reference, modules, tensors)

    def write(tmp: Path) -> EagerArtifact:
        (tmp / "model.py").write_text(_model_py(gm, manifest), encoding="utf-8")
        (tmp / "graph.json").write_text(json.dumps(graph_doc, indent=1, allow_nan=False))
        safetensors.torch.save_file(to_save, str(tmp / "weights.safetensors"), {"format": "pt"})
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False))
        art = load(tmp)
        assert_artifact_matches(reference, run_module(art.module, inputs, "the rebuilt module"))
        return art

    art = write_folder(dest, write, FILES)
    art.path = dest
    art.module.meta["fxopt"]["artifact"] = str(dest)
    return art


def _reference_module(gm: fx.GraphModule, leaves: set[str]) -> torch.nn.Module:
    # The artifact runs in eval mode; never switch (or update BN stats of) the user's module.
    leaves = {p for p in leaves if not _skip_eval(gm.get_submodule(p))}
    if not any(gm.get_submodule(p).training for p in leaves):
        return gm
    ref = copy.deepcopy(gm)
    for p in leaves:
        ref.get_submodule(p).eval()
    return ref


def _skip_eval(mod: torch.nn.Module) -> bool:
    return is_export_guard(mod) or isinstance(mod, fx.GraphModule)


def _manifest(gm: fx.GraphModule, inputs: tuple, outputs: Any, modules: dict, tensors: dict):
    info = gm.meta.get("fxopt") or {}
    try:
        fxopt_version = importlib.metadata.version("fxopt")
    except importlib.metadata.PackageNotFoundError:
        fxopt_version = "0+unknown"
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "fxopt_version": fxopt_version,
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [_describe(x) for x in pytree.tree_leaves(inputs)],
        "outputs": [_describe(x) for x in pytree.tree_leaves(outputs)],
        "pipeline": _jsonable(info.get("pipeline", [])),
        "capture": _jsonable(info.get("capture")),
        "modules": modules,
        "tensors": tensors,
    }


def _describe(x: Any) -> dict:
    if isinstance(x, torch.Tensor):
        return {"shape": list(x.shape), "dtype": dtype_name(x.dtype)}
    return {"type": type(x).__name__, "value": _jsonable(x)}


def _jsonable(v: Any) -> Any:
    try:
        return json.loads(json.dumps(v, allow_nan=False))
    except (TypeError, ValueError):
        return [_jsonable(x) for x in v] if isinstance(v, (list, tuple)) else str(v)


# --------------------------------------------------------------------------- modules


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _walk(mod: torch.nn.Module, prefix: str = ""):
    for name, child in mod._modules.items():
        if child is not None:
            path = f"{prefix}.{name}" if prefix else name
            yield path, child
            yield from _walk(child, path)


def _module_specs(gm: fx.GraphModule) -> tuple[dict, set[str]]:
    """Manifest entries for every submodule, and the call_module (leaf) paths."""
    leaves: dict[str, fx.Node] = {}
    for path, mod in [("", gm), *((p, m) for p, m in _walk(gm) if isinstance(m, fx.GraphModule))]:
        for n in mod.graph.find_nodes(op="call_module"):
            leaves.setdefault(f"{path}.{n.target}" if path else n.target, n)
    rebuilt = [p for p in leaves if not isinstance(gm.get_submodule(p), fx.GraphModule)]
    specs: dict[str, dict] = {}
    seen: dict[int, str] = {}
    for path, mod in _walk(gm):
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
            specs[path] = {"class": _GRAPH}
        elif leaf is None:
            specs[path] = {"class": _PLAIN}  # a container: holds tensors and submodules
        elif _allowed_class(_class_name(type(mod))):
            specs[path] = _leaf_spec(mod, path)
        else:
            raise LoweringError(
                f"node '{leaves[leaf].name}' calls submodule '{path}' of class "
                f"{_class_name(type(mod))}, which an eager artifact cannot rebuild without "
                "pickle. Capture without that leaf module (let tracing go through it) or with "
                "mode='export'."
            )
    return specs, set(leaves)


def _allowed_class(name: str) -> bool:
    return name.startswith(("torch.nn.", "fxopt."))


def _leaf_spec(mod: torch.nn.Module, path: str) -> dict:
    spec = {
        "class": _class_name(type(mod)),
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
                f"submodule '{path}' ({_class_name(cls)}): cannot recover constructor argument "
                f"{name!r}; add a rule for it in fxopt.lowering.eager._KWARG_RULES"
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
    parts = name.split(".")
    for cut in range(len(parts) - 1, 1, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        for p in parts[cut:]:
            obj = None if p.startswith("__") else getattr(obj, p, None)
        if isinstance(obj, type) and issubclass(obj, torch.nn.Module) and _class_name(obj) == name:
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


# --------------------------------------------------------------------------- tensors


def _tensor_specs(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """Manifest entries for every parameter/buffer/tensor attribute, and what to save."""
    entries: list[tuple[str, torch.Tensor, dict]] = []
    seen_mods: set[int] = set()
    for path, mod in [("", gm), *_walk(gm)]:
        if id(mod) in seen_mods:
            continue  # an aliased module brings its tensors along
        seen_mods.add(id(mod))
        own = [(k, v, "parameter") for k, v in mod._parameters.items()]
        own += [(k, v, "buffer") for k, v in mod._buffers.items()]
        own += [(k, v, "attribute") for k, v in vars(mod).items() if isinstance(v, torch.Tensor)]
        for k, t, kind in own:
            if t is None:
                continue
            name = f"{path}.{k}" if path else k
            check_attr_path(name, f"tensor {name!r}")
            if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.layout != torch.strided:
                raise LoweringError(
                    f"tensor '{name}' is a {type(t).__name__} ({t.layout}); only dense tensors "
                    "can be saved with safetensors"
                )
            if t.is_quantized or t.device.type == "meta":
                raise LoweringError(f"tensor '{name}' is quantized or on the meta device")
            info = {"kind": kind, "dtype": dtype_name(t.dtype), "shape": list(t.shape)}
            info.update(requires_grad=t.requires_grad, device=str(t.device))
            if kind == "buffer":
                info["persistent"] = k not in mod._non_persistent_buffers_set
            entries.append((name, t, info))
    groups: dict[tuple, list] = {}
    for name, t, info in entries:
        shared = t.numel() and t.untyped_storage().data_ptr()
        key = (str(t.device), t.untyped_storage().data_ptr()) if shared else ("", name)
        groups.setdefault(key, []).append((name, t, info))
    to_save: dict[str, torch.Tensor] = {}
    for members in groups.values():
        _place_group(members, to_save)
    return {name: info for name, _, info in entries}, to_save


def _place_group(members: list[tuple[str, torch.Tensor, dict]], to_save: dict) -> None:
    """Tensors on one storage: save the data once and record how each name re-aliases it
    (safetensors refuses shared storage): "alias_of" (same object), "same_data_as" (same
    view, another object) or a "storage" span plus offset/stride (different views)."""
    first_name, first, _ = members[0]
    geo = lambda t: (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)  # noqa: E731
    views = {geo(t) for _, t, _ in members}
    span = len(views) > 1 and len({t.dtype for _, t, _ in members}) == 1
    if span:
        lo = min(t.storage_offset() for _, t, _ in members)
        hi = max(
            t.storage_offset()
            + sum((s - 1) * st for s, st in zip(t.shape, t.stride(), strict=True))
            for _, t, _ in members
        )
        key = f"__storage__.{first_name}"
        to_save[key] = torch.as_strided(first.detach(), (hi + 1 - lo,), (1,), lo).cpu().clone()
    by_obj: dict[int, str] = {}
    by_view: dict[tuple, str] = {}
    for name, t, info in members:
        if id(t) in by_obj:
            info["alias_of"] = by_obj[id(t)]
            continue
        by_obj[id(t)] = name
        if span:
            info.update(storage=key, offset=t.storage_offset() - lo, stride=list(t.stride()))
        elif geo(t) in by_view:
            info["same_data_as"] = by_view[geo(t)]
        else:  # its own copy (mixed-dtype views of one storage cannot share a span)
            by_view[geo(t)] = info["key"] = name
            data = t.detach().cpu().contiguous()
            to_save[name] = data.clone() if len(views) > 1 else data


# --------------------------------------------------------------------------- load


def detect(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder whose manifest says it is an eager artifact."""
    manifest = Path(path) / "manifest.json"
    try:
        return manifest.is_file() and json.loads(manifest.read_text()).get("format") == FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def load(path: str | os.PathLike, device: str | torch.device | None = None) -> EagerArtifact:
    """Rebuild the GraphModule of an eager folder (eval mode) without unpickling anything.

    ``device`` moves every tensor there; by default each goes back where it was saved from.

    >>> art = load("out/model")  # doctest: +SKIP
    >>> art.module.graph.print_tabular()  # doctest: +SKIP
    """
    folder = Path(path)
    manifest = _read_manifest(folder)
    for f in FILES:
        if not (folder / f).is_file():
            raise LoweringError(f"{folder} is incomplete: {f} is missing; lower the model again")
    try:
        graph_doc = json.loads((folder / "graph.json").read_text())
        saved = safetensors.torch.load_file(str(folder / "weights.safetensors"), device="cpu")
    except Exception as e:  # OSError, JSON errors, safetensors' own error type
        raise LoweringError(f"{folder}: graph.json or weights.safetensors is corrupt ({e})") from e
    try:
        root = _rebuild_modules(manifest["modules"])
        _assign_tensors(root, manifest["tensors"], saved, device)
        gm = graph_from_json(graph_doc, root)
    except LoweringError as e:
        raise LoweringError(f"cannot load {folder}: {e}") from e
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        raise LoweringError(f"cannot load {folder}: malformed manifest ({e!r})") from e
    gm.eval()
    gm.meta["fxopt"] = {
        "pipeline": manifest.get("pipeline", []),
        "capture": manifest.get("capture"),
        "artifact": str(folder),
    }
    return EagerArtifact(folder, manifest, gm)


def _read_manifest(folder: Path) -> dict:
    f = folder / "manifest.json"
    if not f.is_file():
        raise LoweringError(f"{folder} is not an eager artifact: no manifest.json")
    try:
        manifest = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise LoweringError(f"{f} is unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoweringError(f"{f} does not describe an {FORMAT} artifact")
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise LoweringError(
            f"{folder} has format_version {version!r}, newer than this fxopt reads "
            f"({FORMAT_VERSION}); upgrade fxopt (pip install -U fxopt) to load it"
        )
    return manifest


def _rebuild_modules(specs: dict) -> torch.nn.Module:
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
            built.update(_walk(mod, path))
            built[path] = mod
            continue
        existing = parent._modules.get(name)
        if existing is not None and _class_name(type(existing)) == spec["class"]:
            mod = existing  # made by the parent's constructor
        elif spec["class"] in (_PLAIN, _GRAPH):
            mod = torch.nn.Module()
        else:
            mod = _construct(spec, path)
        _check_repr(mod, spec, path)
        parent._modules[name] = built[path] = mod
    extra = sorted(p for p, _ in _walk(root) if p not in built)
    if extra:
        raise LoweringError(f"rebuilt modules have unexpected submodules {extra}")
    return root


def _assign_tensors(root: torch.nn.Module, specs: dict, saved: dict, device: Any) -> None:
    def to_device(t: torch.Tensor, info: dict) -> torch.Tensor:
        d = torch.device(device if device is not None else info.get("device", "cpu"))
        if d.type == "cuda" and not torch.cuda.is_available():
            raise LoweringError("weights were saved from CUDA; pass device='cpu' to load on CPU")
        return t.to(d)

    bases: dict[str, torch.Tensor] = {}
    objects: dict[str, torch.Tensor] = {}
    for name, info in specs.items():
        where = f"tensor {name!r}"
        mod_path, _, attr = name.rpartition(".")
        check_attr_path(name, where)
        mod = root.get_submodule(mod_path)
        if "alias_of" in info:
            obj = objects[info["alias_of"]]
        else:
            if "same_data_as" in info:
                data = objects[info["same_data_as"]].detach()
            else:
                key = info.get("storage", info.get("key"))
                if key not in saved:
                    raise LoweringError(f"weights.safetensors lacks {key!r} needed by {where}")
                if key not in bases:
                    bases[key] = to_device(saved[key], info)
                data = bases[key]
                if "storage" in info:
                    data = torch.as_strided(data, info["shape"], info["stride"], info["offset"])
            if list(data.shape) != info["shape"] or dtype_name(data.dtype) != info["dtype"]:
                raise LoweringError(f"{where}: stored tensor does not match the manifest")
            if info["kind"] == "parameter":
                obj = torch.nn.Parameter(data, requires_grad=info["requires_grad"])
            else:
                obj = data.requires_grad_(True) if info["requires_grad"] else data
        _set_tensor(mod, attr, obj, info, where)
        objects[name] = obj
    have, seen = [], set()
    for path, mod in [("", root), *_walk(root)]:
        if id(mod) not in seen:
            seen.add(id(mod))
            own = [k for k, v in [*mod._parameters.items(), *mod._buffers.items()] if v is not None]
            have += [f"{path}.{k}" if path else k for k in own]
    extra = sorted(n for n in have if n not in specs)
    if extra:
        raise LoweringError(f"rebuilt modules have tensors the artifact does not store: {extra}")


def _set_tensor(mod: torch.nn.Module, attr: str, obj: torch.Tensor, info: dict, where: str):
    kind = info["kind"]
    if (attr in mod._parameters and kind != "parameter") or (
        attr in mod._buffers and kind != "buffer"
    ):
        raise LoweringError(f"{where}: the rebuilt module does not hold it as a {kind}")
    old = mod._parameters.get(attr, mod._buffers.get(attr))
    if old is not None and tuple(old.shape) != tuple(obj.shape):
        raise LoweringError(f"{where}: rebuilt shape {tuple(old.shape)} != {tuple(obj.shape)}")
    if kind == "buffer":
        mod.register_buffer(attr, obj, persistent=info.get("persistent", True))
    elif kind == "attribute":
        object.__setattr__(mod, attr, obj)
    else:
        setattr(mod, attr, obj)  # setattr, so modules like LSTM refresh their weight lists


def _model_py(gm: fx.GraphModule, manifest: dict) -> str:
    lines = [
        f"# Generated by fxopt {manifest['fxopt_version']} with torch {manifest['torch_version']}"
        f" on {manifest['created']}.",
        "# For reading only: fxopt.load() rebuilds the module from graph.json and",
        "# weights.safetensors and never executes this file.",
        "#",
        "#     import fxopt",
        "#     art = fxopt.load('<this folder>')",
        "#     outputs = art(*inputs)",
        "#",
        "# Submodules:",
    ]
    for path, spec in manifest["modules"].items():
        if "alias_of" in spec:
            desc = f"same module as {spec['alias_of']}"
        elif spec["class"] in (_PLAIN, _GRAPH):
            desc = "container" if spec["class"] == _PLAIN else "nested graph (see below)"
        else:
            args = ", ".join(f"{k}={v!r}" for k, v in decode_value(spec["kwargs"]).items())
            desc = f"{spec['class']}({args})"
        lines.append(f"#   {path}: {desc}")
    lines += ["#", "# Tensors (name: kind dtype shape):"]
    for name, info in manifest["tensors"].items():
        lines.append(f"#   {name}: {info['kind']} {info['dtype']} {info['shape']}")
    try:
        code = gm.print_readable(print_output=False)
    except Exception:
        code = gm.code
    return "\n".join(lines) + "\n\nimport torch\n\n\n" + code.strip() + "\n"
