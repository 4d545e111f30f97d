"""Lowering: turn a GraphModule into a deployable artifact, and load artifacts back.

Each backend is one registry entry naming a module that provides
``lower(gm, example_inputs, path=None, **options)``, ``load(path, **options)`` and
``detect(path) -> bool``. Backend modules are imported only when used, so a missing
optional dependency (TensorRT) is an error at ``lower(..., "tensorrt")``, never at import.

Example::

    art = lower(gm, "eager", (x,), path="out/model")
    art = load("out/model")
    y = art(x)
"""

from __future__ import annotations

import importlib
import json
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, NoReturn, TypeVar

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import FxoptError, LoweringError
from fxopt.verify import Tolerance

T = TypeVar("T")


class Artifact:
    """What ``lower`` and ``load`` return: callable like the GraphModule it was made from.

    Subclasses set ``path``, ``manifest`` and implement ``__call__`` and ``save``.
    """

    kind = "artifact"
    path: Path | None = None
    manifest: dict

    def __call__(self, *inputs: Any) -> Any:
        raise NotImplementedError

    def save(self, path: str | os.PathLike) -> Artifact:
        """Write the artifact to ``path`` and return the artifact found there."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={str(self.path)!r})"


@dataclass(frozen=True)
class Backend:
    """One lowering target: ``module`` is imported lazily."""

    name: str
    module: str
    description: str = ""


_BACKENDS: dict[str, Backend] = {}


def register_backend(name: str, module: str, description: str = "") -> None:
    """Add (or replace) a lowering target.

    >>> register_backend("eager", "fxopt.lowering.eager", "folder with graph.json")
    """
    _BACKENDS[name] = Backend(name, module, description)


register_backend("eager", "fxopt.lowering.eager", "folder: readable code, graph.json, safetensors")
register_backend("onnx", "fxopt.lowering.onnx", "a .onnx file verified in ONNX Runtime")
register_backend("tensorrt", "fxopt.lowering.tensorrt",
                 "a TensorRT .engine file with its .engine.json manifest")


def targets() -> list[str]:
    """Names of the registered lowering targets.

    >>> "eager" in targets()
    True
    """
    return sorted(_BACKENDS)


def _backend_module(backend: Backend) -> ModuleType:
    try:
        return importlib.import_module(backend.module)
    except ImportError as e:
        raise LoweringError(
            f"the {backend.name!r} target is unavailable: {e}. Install its optional "
            f"dependencies (pip install 'fxopt[{backend.name}]')."
        ) from e


def lower(
    gm: fx.GraphModule,
    target: str,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    **options: Any,
) -> Artifact:
    """Lower ``gm`` to ``target`` (verified against ``gm`` on ``example_inputs``).

    >>> art = lower(gm, "eager", (x,), path="out/model")  # doctest: +SKIP
    >>> art(x)  # doctest: +SKIP
    """
    backend = _BACKENDS.get(target) if isinstance(target, str) else None
    if backend is None:
        raise LoweringError(f"unknown target {target!r}; known targets: {', '.join(targets())}")
    check_frozen(gm)
    return _backend_module(backend).lower(gm, example_inputs, path=path, **options)


def check_frozen(gm: fx.GraphModule) -> None:
    """Raise LoweringError if ``gm`` still holds fake-quant nodes that observe (calibrated
    but not frozen) or train (QAT): their scales are not fixed, so no artifact would run
    what ``gm`` will compute once they are.

    >>> check_frozen(gm)  # doctest: +SKIP
    """
    if "fxopt.quant.fake_quant" not in sys.modules:
        return  # no fake-quant node can exist yet (and ONNX stays unimported)
    from fxopt.quant.fake_quant import FakeQuantize

    open_fqs = {m.mode: p for p, m in gm.named_modules()
                if isinstance(m, FakeQuantize) and m.mode in ("observe", "qat")}
    if "observe" in open_fqs:
        raise LoweringError(
            f"fake-quant node {open_fqs['observe']} is still observing: the graph was "
            "calibrated but its scales are not frozen; call fxopt.freeze_calibration(gm) "
            "(fxopt.quant.static.freeze) after fxopt.calibrate(gm, batches), then lower")
    if "qat" in open_fqs:
        raise LoweringError(
            f"fake-quant node {open_fqs['qat']} is in QAT mode; call "
            "fxopt.quant.qat.freeze_qat(gm) after training, then lower")


def load(path: str | os.PathLike, **options: Any) -> Artifact:
    """Load any artifact written by ``lower``; its kind is detected from the files.

    >>> art = load("out/model")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.exists():
        raise LoweringError(f"cannot load {p}: no such file or folder")
    for backend in _BACKENDS.values():
        try:
            module = importlib.import_module(backend.module)
        except ImportError:
            continue  # a backend whose dependencies are missing cannot have written it
        if module.detect(p):
            return module.load(p, **options)
    hint = ""
    if (p / "manifest.json").is_file():
        hint = " (its manifest.json names a format this fxopt does not know; upgrade fxopt?)"
    raise LoweringError(
        f"cannot tell what kind of artifact {p} is{hint}; expected one of: "
        + "; ".join(f"{b.name}: {b.description}" for b in _BACKENDS.values())
    )


# --------------------------------------------------------------------------- shared by backends


def destination(path: str | os.PathLike) -> Path:
    """Absolute form of a user path (symlinks in it are left alone)."""
    return Path(os.path.abspath(os.path.expanduser(os.fspath(path))))


def check_replaceable(dest: Path, own_files: Collection[str]) -> None:
    """Refuse ``dest`` unless it is absent, an empty folder, or an fxopt artifact folder
    holding only ``own_files`` (one of which is a manifest.json with an "fxopt-" format)."""
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_dir() and not dest.is_symlink():
        names = {p.name for p in dest.iterdir()}
        if not names or ("manifest.json" in names and names <= set(own_files) and _is_ours(dest)):
            return
        what = "a folder that is not an fxopt artifact"
    else:
        what = "a file or link"
    raise LoweringError(
        f"{dest} exists and is {what}; refusing to overwrite it. Remove it or choose another path."
    )


def _is_ours(folder: Path) -> bool:
    try:
        fmt = json.loads((folder / "manifest.json").read_text()).get("format", "")
    except (OSError, ValueError, AttributeError):
        return False
    return isinstance(fmt, str) and fmt.startswith("fxopt-")


def write_folder(dest: Path, write: Callable[[Path], T], own_files: Collection[str]) -> T:
    """Run ``write(tmp)`` in a sibling temp folder ``.<name>.tmp-<random>``, then rename it
    to ``dest`` (replacing a previous artifact there only at the very end).

    On any failure the temp folder and any parent folders made for it are removed and a
    LoweringError is raised, so a crash never leaves a half-written artifact.

    >>> write_folder(Path("out/m"), lambda tmp: (tmp / "manifest.json").write_text("{}"),
    ...              ["manifest.json"])  # doctest: +SKIP
    """
    check_replaceable(dest, own_files)
    made = _make_parents(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        result = write(tmp)
        for f in [*tmp.iterdir(), tmp]:
            _fsync(f)
        check_replaceable(dest, own_files)
        if dest.exists():
            old = dest.parent / f".{dest.name}.old-{secrets.token_hex(4)}"
            os.rename(dest, old)
            try:
                os.rename(tmp, dest)
            except BaseException:
                os.rename(old, dest)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, dest)
        return result
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_parents(made)
        _reraise_as_lowering_error(e, dest)


def write_files(
    dest: Path, write: Callable[[Path], T], check: Callable[[Path], None] | None = None
) -> T:
    """Run ``write(tmp_file)`` where ``tmp_file`` has ``dest``'s name inside a sibling temp
    folder; every file ``write`` puts in that folder (``m.onnx`` and ``m.onnx.data``, say)
    is then moved beside ``dest``, the main file last. ``check(dest)`` runs first and again
    just before the move, to refuse replacing something that is not ours.

    On any failure nothing is moved, the temp folder and any parent folders made for it
    are removed, and a LoweringError is raised.

    >>> write_files(Path("out/m.onnx"), lambda f: f.write_bytes(b"..."))  # doctest: +SKIP
    """
    if check is not None:
        check(dest)
    made = _make_parents(dest)
    tmp = dest.parent / f".{dest.name}.tmp-{secrets.token_hex(4)}"
    try:
        tmp.mkdir()
        result = write(tmp / dest.name)
        files = sorted(tmp.iterdir(), key=lambda f: f.name == dest.name)  # main file last
        for f in [*files, tmp]:
            _fsync(f)
        if check is not None:
            check(dest)
        for f in files:
            os.replace(f, dest.parent / f.name)
        tmp.rmdir()
        return result
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_parents(made)
        _reraise_as_lowering_error(e, dest)


def _make_parents(dest: Path) -> list[Path]:
    made = []
    parent = dest.parent
    while not parent.exists() and not parent.is_symlink():
        made.append(parent)
        parent = parent.parent
    try:
        for d in reversed(made):
            d.mkdir()
    except OSError as e:
        _remove_parents(made)
        _reraise_as_lowering_error(e, dest)
    return made


def _remove_parents(made: list[Path]) -> None:
    for d in made:
        try:
            d.rmdir()
        except OSError:
            break


def _fsync(f: Path) -> None:
    fd = os.open(f, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _reraise_as_lowering_error(e: BaseException, dest: Path) -> NoReturn:
    if isinstance(e, FxoptError) or not isinstance(e, Exception):
        raise e
    if isinstance(e, OSError):
        where = e.filename or dest
        raise LoweringError(f"cannot write {dest}: {e.strerror or e} ({where})") from e
    raise LoweringError(f"writing {dest} failed: {type(e).__name__}: {e}") from e


def run_module(module: Callable[..., Any], inputs: tuple, what: str) -> Any:
    """``module(*inputs)`` on copies of the inputs (in-place ops must not leak into the next
    run or the caller's tensors), without grad, with a fixed seed (so stochastic ops draw the
    same numbers in the reference and the artifact) and the caller's RNG state restored."""
    inputs = pytree.tree_map_only(torch.Tensor, torch.clone, inputs)
    tensors = [t for t in pytree.tree_leaves(inputs) if isinstance(t, torch.Tensor)]
    cuda = sorted({t.device.index or 0 for t in tensors if t.is_cuda})
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=cuda):
            torch.manual_seed(0)
            return module(*inputs)
    except FxoptError:
        raise
    except Exception as e:
        raise LoweringError(f"{what} failed on the example inputs: {type(e).__name__}: {e}") from e


ARTIFACT_MATCH = Tolerance(rtol=1e-6, atol=1e-6)


def assert_artifact_matches(want: Any, got: Any, tolerance: Tolerance = ARTIFACT_MATCH) -> None:
    """Raise LoweringError unless the artifact's outputs ``got`` match the GraphModule's
    ``want`` leaf by leaf (same structure; floats within ``atol + rtol * max|want|``, NaNs
    in the same places; others exact). The arguments are in ``fxopt.verify.compare_outputs``
    order; that one returns a report, this one raises.

    Example::

        assert_artifact_matches(gm(x), art(x))   # LoweringError if they differ
    """
    rtol, atol = tolerance.rtol, tolerance.atol
    g, g_spec = pytree.tree_flatten(got)
    w, w_spec = pytree.tree_flatten(want)
    if g_spec != w_spec:
        raise LoweringError(f"the artifact returns {g_spec}, expected {w_spec}")
    for i, (a, b) in enumerate(zip(g, w, strict=True)):
        if not isinstance(b, torch.Tensor):
            same_nan = isinstance(b, float) and b != b and a != a
            ok = not isinstance(a, torch.Tensor) and (a == b or same_nan)
        elif not (isinstance(a, torch.Tensor) and a.shape == b.shape and a.dtype == b.dtype):
            ok = False
        elif b.is_floating_point() or b.is_complex():
            a, b = a.detach().cpu(), b.detach().cpu()
            scale = b.abs().nan_to_num(0.0).max().item() if b.numel() else 0.0
            diff = (a - b).abs().nan_to_num(0.0).max().item() if b.numel() else 0.0
            ok = diff <= atol + rtol * scale and bool((a.isnan() == b.isnan()).all())
        else:
            ok = bool(torch.equal(a, b))
        if not ok:
            raise LoweringError(
                f"verification failed: output {i} of the artifact differs from the GraphModule "
                "on the example inputs; nothing was written"
            )


__all__ = [
    "Artifact",
    "Backend",
    "check_replaceable",
    "ARTIFACT_MATCH",
    "assert_artifact_matches",
    "check_frozen",
    "destination",
    "load",
    "lower",
    "register_backend",
    "run_module",
    "targets",
    "write_files",
    "write_folder",
]
