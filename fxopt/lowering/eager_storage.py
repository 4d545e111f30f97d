"""The files of an eager artifact: manifest, weights, graph and readable code.

``manifest.json`` records versions, input/output shapes, the pipeline, submodule
constructors and every tensor (kind, dtype, shape, device, and how tensors that share
storage re-alias it, since safetensors refuses shared storage); ``weights.safetensors``
holds the data; ``graph.json`` the fx graph; ``model.py`` readable code, never executed.

A mostly-zero float tensor (``sparsify``'s output) is stored compactly: its nonzero
values and a bitmask of where they sit (``__sparse__.NAME.values`` / ``.bitmask``, plain
safetensors tensors), rebuilt dense on load, bit for bit. Such artifacts are
``format_version`` 2; artifacts without one stay version 1.

Example:
    >>> gm = torch.fx.symbolic_trace(torch.nn.Linear(2, 3))
    >>> tensors, to_save = tensor_specs(gm)
    >>> sorted(to_save), tensors["weight"]["kind"]
    (['bias', 'weight'], 'parameter')
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import LoweringError
from fxopt.lowering.allowlist import check_attr_path
from fxopt.lowering.eager_rebuild import GRAPH, PLAIN, walk
from fxopt.lowering.graph_json import decode_value, dtype_name
from fxopt.lowering.input_spec import spec_for_eager
from fxopt.lowering.versions import check_versions, running_fxopt

FORMAT = "fxopt-eager"
FORMAT_VERSION = 2  # the newest this fxopt reads and writes (2: compact sparse tensors)
OLDEST_FORMAT_VERSION = 1  # the oldest layout read_manifest still understands
VERSION_KEYS = ("fxopt_version", "torch_version")
SPARSE_MIN_NUMEL = 256  # smaller tensors are not worth a second entry
SPARSE_MAX_FRACTION = 0.75  # compact only when it takes at most this much of the dense bytes
FILES = ("model.py", "graph.json", "weights.safetensors", "manifest.json")


# --------------------------------------------------------------------------- files


def write_files(
    tmp: Path, gm: fx.GraphModule, graph_doc: dict, to_save: dict, manifest: dict
) -> None:
    """Write the four files of an eager artifact into the folder ``tmp``.

    >>> write_files(tmp, gm, graph_to_json(gm), to_save, manifest)  # doctest: +SKIP
    """
    (tmp / "model.py").write_text(model_py(gm, manifest), encoding="utf-8")
    (tmp / "graph.json").write_text(json.dumps(graph_doc, indent=1, allow_nan=False))
    safetensors.torch.save_file(to_save, str(tmp / "weights.safetensors"), {"format": "pt"})
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1, allow_nan=False))


def read_files(folder: Path) -> tuple[dict, dict, dict[str, torch.Tensor]]:
    """The manifest, graph document and saved tensors (on CPU) of an eager folder.

    >>> manifest, graph_doc, saved = read_files(Path("out/model"))  # doctest: +SKIP
    """
    manifest = read_manifest(folder)
    for f in FILES:
        if not (folder / f).is_file():
            raise LoweringError(f"{folder} is incomplete: {f} is missing; lower the model again")
    try:
        graph_doc = json.loads((folder / "graph.json").read_text())
        saved = safetensors.torch.load_file(str(folder / "weights.safetensors"), device="cpu")
    except Exception as e:  # OSError, JSON errors, safetensors' own error type
        raise LoweringError(f"{folder}: graph.json or weights.safetensors is corrupt ({e})") from e
    # safetensors hands out views at the file's byte offsets (8-byte aligned); oneDNN takes
    # other code paths for unaligned weights and sums in another order (HF RegNet's SE conv
    # differed by 1e-6): a copy into the allocator's 64-byte aligned memory computes bit for
    # bit like the graph the artifact was written from
    return manifest, graph_doc, {k: _aligned(v) for k, v in saved.items()}


def _aligned(t: torch.Tensor) -> torch.Tensor:
    return t if t.data_ptr() % 64 == 0 else t.clone()


# --------------------------------------------------------------------------- manifest


def manifest_for(
    gm: fx.GraphModule, inputs: tuple, outputs: Any, modules: dict, tensors: dict
) -> dict:
    """The manifest of ``gm``: versions, input/output shapes, the input spec that calls are
    checked against, pipeline, modules and tensors.

    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> manifest_for(gm, (torch.ones(2),), torch.ones(2), {}, {})["inputs"]
    [{'shape': [2], 'dtype': 'float32'}]
    """
    info = gm.meta.get("fxopt") or {}
    return {
        "format": FORMAT,
        "format_version": 2 if any("sparse" in t for t in tensors.values()) else 1,
        "fxopt_version": running_fxopt(),
        "torch_version": torch.__version__,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "inputs": [_describe(x) for x in pytree.tree_leaves(inputs)],
        "outputs": [_describe(x) for x in pytree.tree_leaves(outputs)],
        "input_spec": spec_for_eager(gm, inputs),
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


def read_manifest(folder: Path) -> dict:
    """The manifest of an eager folder, refusing other formats, and format or torch
    versions this fxopt cannot read (ArtifactVersionError, see ``fxopt.lowering.versions``).

    >>> read_manifest(Path("out/model"))["format"]  # doctest: +SKIP
    'fxopt-eager'
    """
    f = folder / "manifest.json"
    if not f.is_file():
        raise LoweringError(f"{folder} is not an eager artifact: no manifest.json")
    try:
        manifest = json.loads(f.read_text())
    except (OSError, ValueError) as e:
        raise LoweringError(f"{f} is unreadable ({e})") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise LoweringError(f"{f} does not describe an {FORMAT} artifact")
    check_versions(manifest, str(folder), supported=(OLDEST_FORMAT_VERSION, FORMAT_VERSION),
                   keys=VERSION_KEYS, torch_major=True)
    return manifest


# --------------------------------------------------------------------------- tensors


def tensor_specs(gm: fx.GraphModule) -> tuple[dict, dict[str, torch.Tensor]]:
    """Manifest entries for every parameter/buffer/tensor attribute, and what to save.

    Tensors that share storage are saved once, with each name's way back recorded.

    >>> specs, to_save = tensor_specs(torch.fx.symbolic_trace(torch.nn.Linear(2, 1)))
    >>> specs["weight"]["shape"], sorted(to_save)
    ([1, 2], ['bias', 'weight'])
    """
    entries: list[tuple[str, torch.Tensor, dict]] = []
    seen_mods: set[int] = set()
    for path, mod in [("", gm), *walk(gm)]:
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
            by_view[geo(t)] = name
            data = t.detach().cpu().contiguous()
            compact = compact_tensor(data)
            if compact is None:
                info["key"] = name
                to_save[name] = data.clone() if len(views) > 1 else data
            else:
                info["sparse"] = {part: f"__sparse__.{name}.{part}" for part in compact}
                to_save.update({info["sparse"][p]: v for p, v in compact.items()})


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


def _pack(bits: torch.Tensor) -> torch.Tensor:
    padded = torch.nn.functional.pad(bits.to(torch.uint8), (0, -bits.numel() % 8))
    return (padded.reshape(-1, 8) * _BITS).sum(dim=1).to(torch.uint8)


def _unpack(packed: torch.Tensor, numel: int, what: str) -> torch.Tensor:
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise LoweringError(f"sparse {what} of {packed.numel()} bytes does not fit {numel} values")
    return (packed.unsqueeze(1) & _BITS).ne(0).reshape(-1)[:numel]


def compact_tensor(t: torch.Tensor) -> dict[str, torch.Tensor] | None:
    """``{"values", "bitmask"}`` (and ``"negzero"`` where ``-0.0`` occurs) of a mostly-zero
    float tensor, or None when dense storage is smaller. NaN counts as a value and the
    sign of zero is kept, so ``expand_tensor`` gives the tensor back bit for bit.

    >>> w = torch.zeros(1024); w[::8] = 1.0
    >>> parts = compact_tensor(w)
    >>> parts["values"].numel(), parts["bitmask"].numel()
    (128, 128)
    >>> torch.equal(expand_tensor(parts, w.shape), w)
    True
    """
    if not t.is_floating_point() or t.numel() < SPARSE_MIN_NUMEL:
        return None
    flat = t.contiguous().reshape(-1)
    zero = flat == 0
    nnz = flat.numel() - int(zero.sum())
    compact_bytes = nnz * flat.element_size() + (flat.numel() + 7) // 8
    if compact_bytes > SPARSE_MAX_FRACTION * flat.numel() * flat.element_size():
        return None
    parts = {"values": flat[~zero].clone(), "bitmask": _pack(~zero)}
    negzero = zero & torch.signbit(flat)
    if bool(negzero.any()):
        parts["negzero"] = _pack(negzero)
    return parts


def expand_tensor(parts: dict[str, torch.Tensor], shape: list | tuple) -> torch.Tensor:
    """The dense tensor of ``shape`` that ``compact_tensor`` stored as ``parts``; a bitmask
    or value count that does not fit the shape raises ``LoweringError``.

    >>> bits = torch.tensor([64], dtype=torch.uint8)
    >>> expand_tensor({"values": torch.tensor([2.0]), "bitmask": bits}, [2, 2])
    tensor([[0., 2.],
            [0., 0.]])
    """
    numel = 1
    for s in shape:
        numel *= int(s)
    values = parts["values"]
    bits = _unpack(parts["bitmask"], numel, "bitmask")
    if values.dim() != 1 or int(bits.sum()) != values.numel():
        raise LoweringError(
            f"sparse values ({values.numel()}) do not match the bitmask ({int(bits.sum())} set)"
        )
    dense = torch.zeros(numel, dtype=values.dtype)
    if "negzero" in parts:
        dense[_unpack(parts["negzero"], numel, "negzero mask")] = -0.0
    dense[bits] = values
    return dense.reshape([int(s) for s in shape])


def assign_tensors(root: torch.nn.Module, specs: dict, saved: dict, device: Any) -> None:
    """Put the saved tensors onto the rebuilt modules of ``root``, re-aliasing shared ones.

    ``device`` moves every tensor there; None puts each back where it was saved from.

    >>> assign_tensors(root, manifest["tensors"], saved, "cpu")  # doctest: +SKIP
    """

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
            elif "sparse" in info:
                keys = info["sparse"]
                missing = [k for k in keys.values() if k not in saved]
                if missing or not {"values", "bitmask"} <= set(keys):
                    raise LoweringError(
                        f"weights.safetensors lacks the compact parts of {where} ({missing})")
                parts = {p: saved[k] for p, k in keys.items()}
                data = to_device(expand_tensor(parts, info["shape"]), info)
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
    for path, mod in [("", root), *walk(root)]:
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


# --------------------------------------------------------------------------- model.py


def model_py(gm: fx.GraphModule, manifest: dict) -> str:
    """The readable ``model.py`` of an artifact: a header (modules, tensors) and the code.

    >>> print(model_py(gm, manifest))  # doctest: +SKIP
    """
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
        elif spec["class"] in (PLAIN, GRAPH):
            desc = "container" if spec["class"] == PLAIN else "nested graph (see below)"
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
