"""The eager backend: a GraphModule as a folder that rebuilds without pickle.

``DIR/model.py`` (readable code, never executed), ``DIR/graph.json`` (the fx graph as
data), ``DIR/weights.safetensors`` and ``DIR/manifest.json`` (versions, shapes, pipeline,
submodule constructors, tensor kinds and aliases). Call_module submodules are rebuilt
from their class name and constructor kwargs, only from ``torch.nn`` and ``fxopt``.
Calls to helper functions outside the allowlist (``torch.fx.wrap``-ped library code) are
inlined by tracing through them (``fxopt.lowering.inline``); what cannot be inlined needs
``trusted=["pkg.module"]``, recorded in the manifest: loading imports only those modules.

Example::

    art = fxopt.lower(gm, "eager", (x,), path="out/model")
    art = fxopt.load("out/model")
    y = art(x)
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import ArtifactVersionError, InputSpecError, LoweringError
from fxopt.lowering import (
    Artifact,
    assert_artifact_matches,
    check_replaceable,
    destination,
    run_module,
    write_folder,
)
from fxopt.lowering.allowlist import check_trusted, trusting
from fxopt.lowering.eager_rebuild import module_specs, rebuild_modules
from fxopt.lowering.eager_storage import (
    FILES,
    FORMAT,
    VERSION_KEYS,
    assign_tensors,
    manifest_for,
    read_files,
    tensor_specs,
    write_files,
)
from fxopt.lowering.graph_json import graph_from_json, graph_to_json
from fxopt.lowering.inline import inline_helpers
from fxopt.lowering.input_guard import is_export_guard
from fxopt.lowering.input_spec import check_inputs, read_spec
from fxopt.lowering.versions import version_note


class EagerArtifact(Artifact):
    """A loaded eager folder: ``art(*inputs)``, ``art.module``, ``art.manifest``.

    Calls are checked against ``art.input_spec`` (from the manifest) before anything runs:
    a wrong count, dtype, rank or static dim raises InputSpecError. Loaded with a
    ``device``, ``art.device`` is it and tensor inputs are copied there (outputs stay there).
    """

    kind = "eager"

    def __init__(self, path: Path, manifest: dict, module: fx.GraphModule,
                 device: torch.device | None = None) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.module = module
        self.device = device
        self.input_spec = read_spec(manifest.get("input_spec"), f"cannot load {self.path}")

    def __call__(self, *inputs: Any, **kwargs: Any) -> Any:
        if self.device is not None:
            inputs, kwargs = pytree.tree_map_only(
                torch.Tensor, lambda t: t.to(self.device), (inputs, kwargs))
        if self.input_spec is not None:
            inputs, kwargs = _by_position(self.input_spec, inputs, kwargs), {}
            check_inputs(self.input_spec, inputs, f"eager artifact {self.path.name}")
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


def _by_position(specs: list, inputs: tuple, kwargs: dict) -> tuple:
    """``inputs`` followed by the keyword arguments in spec order (unknown names refused)."""
    if not kwargs:
        return inputs
    names = [(s or {}).get("name") for s in specs]
    unknown = sorted(k for k in kwargs if k not in names[len(inputs):])
    if unknown:
        raise InputSpecError(
            f"unexpected keyword argument(s) {unknown}; the inputs are {names} "
            f"({len(inputs)} given by position)")
    rest = names[len(inputs):]
    missing = [n for n in rest if n not in kwargs]
    if missing:
        raise InputSpecError(f"missing input(s) {missing}; the inputs are {names}")
    return (*inputs, *(kwargs[n] for n in rest))


# --------------------------------------------------------------------------- lower


def lower(
    gm: fx.GraphModule,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    trusted: list[str] | tuple[str, ...] = (),
    **options: Any,
) -> EagerArtifact:
    """Write ``gm`` as an eager folder at ``path``, verified by loading it back.

    Helper calls outside the allowlist are inlined; ``trusted`` module prefixes (recorded in
    the manifest) may be called as they are when a helper cannot be inlined.

    >>> gm = torch.fx.symbolic_trace(torch.nn.ReLU())
    >>> art = lower(gm, (torch.ones(2),), "out/relu")  # doctest: +SKIP
    >>> art(-torch.ones(2))  # doctest: +SKIP
    tensor([0., 0.])
    """
    trusted = check_trusted(trusted)
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
    original, (gm, inlined) = gm, inline_helpers(gm, trusted)
    modules, leaves = module_specs(gm)
    with trusting(trusted):
        graph_doc = graph_to_json(gm)
    tensors, to_save = tensor_specs(gm)
    reference = run_module(_reference_module(original, leaves), inputs, "the GraphModule")
    manifest = manifest_for(gm, inputs, reference, modules, tensors)
    if trusted:
        manifest["trusted"] = list(trusted)
    if inlined:
        manifest["inlined"] = inlined

    def write(tmp: Path) -> EagerArtifact:
        write_files(tmp, gm, graph_doc, to_save, manifest)
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

    ``device`` (``"cpu"``, ``"cuda"``, ``"cuda:1"``, a ``torch.device``) moves every weight
    there and the devices the graph names (``torch.arange(..., device=...)``, ``.to(...)``
    after torch.export) with them, as ``torch.export.passes.move_to_device_pass`` does;
    inputs are then copied there per call. By default each tensor goes back where it was
    saved from. CUDA asked for where torch has none is a LoweringError before any work.

    >>> art = load("out/model", device="cuda")  # doctest: +SKIP
    >>> art(torch.randn(2, 3)).device  # doctest: +SKIP
    device(type='cuda', index=0)
    """
    folder = Path(path)
    target = _target_device(device)
    manifest, graph_doc, saved = read_files(folder)
    try:
        trusted = check_trusted(manifest.get("trusted", []), "manifest 'trusted'")
        root = rebuild_modules(manifest["modules"])
        assign_tensors(root, manifest["tensors"], saved, target)
        with trusting(trusted):  # only the modules the manifest declares may be imported
            gm = graph_from_json(graph_doc, root)
        if target is not None:
            _move_graph_devices(gm, target)
    except ArtifactVersionError:
        raise
    except LoweringError as e:
        note = version_note(manifest, VERSION_KEYS)
        raise LoweringError(f"cannot load {folder}: {e}{note}") from e
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError) as e:
        note = version_note(manifest, VERSION_KEYS)
        raise LoweringError(f"cannot load {folder}: malformed manifest ({e!r}){note}") from e
    gm.eval()
    gm.meta["fxopt"] = {
        "pipeline": manifest.get("pipeline", []),
        "capture": manifest.get("capture"),
        "artifact": str(folder),
    }
    return EagerArtifact(folder, manifest, gm, target)


def _target_device(device: str | torch.device | None) -> torch.device | None:
    if device is None:
        return None
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise LoweringError(f"device {device!r} is not a torch device; use 'cpu', 'cuda' or "
                            "'cuda:N'") from e
    if target.type == "cuda":
        if not torch.cuda.is_available():
            raise LoweringError(
                f"device {str(device)!r}: CUDA is not available here (torch "
                f"{torch.__version__}, torch.cuda.is_available() is False: a CPU-only torch "
                "build, no GPU or no driver); load with device='cpu', or install a CUDA "
                "build of torch on a GPU machine")
        count = torch.cuda.device_count()
        if target.index is not None and target.index >= count:
            raise LoweringError(f"device {str(device)!r}: this machine has {count} CUDA "
                                f"device(s) (cuda:0..cuda:{count - 1})")
        if target.index is None:
            target = torch.device("cuda", torch.cuda.current_device())
    return target


def _move_graph_devices(gm: fx.GraphModule, target: torch.device) -> None:
    """Point every device the graph names at ``target`` (device literals in arguments,
    ``device=`` strings, and the device of ``.to(...)``)."""

    def move(v: Any) -> Any:
        return target if isinstance(v, torch.device) else v

    changed = False
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        args = fx.node.map_aggregate(node.args, move)
        kwargs = dict(fx.node.map_aggregate(node.kwargs, move))
        if isinstance(kwargs.get("device"), str):
            kwargs["device"] = target
        if node.op == "call_method" and node.target == "to":
            args = tuple(target if isinstance(a, str) and _is_device(a) else a for a in args)
        if args != node.args or kwargs != dict(node.kwargs):
            node.args, node.kwargs, changed = args, kwargs, True
    if changed:
        gm.recompile()


def _is_device(name: str) -> bool:
    try:
        torch.device(name)
    except (RuntimeError, TypeError):
        return False
    return True
