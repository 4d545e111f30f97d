"""Which artifacts this fxopt can load: format versions, and the torch they were written with.

Every manifest records ``format_version`` and the fxopt and torch versions that wrote it.
An artifact is *incompatible* when its format version is newer than this fxopt reads (a
later fxopt changed the layout) or older than the oldest it still reads, or, where the
artifact rebuilds torch objects (eager: ATen ops and ``torch.nn`` constructors), when it
was written under another torch major version. ``check_versions`` raises
``ArtifactVersionError`` saying who wrote it, what is running and what to do; a load that
fails for another reason gets ``version_note`` appended when the versions differ.

Example:
    >>> m = {"format_version": 1, "fxopt_version": "0.1.0", "torch_version": "2.14.0"}
    >>> check_versions(m, "out/model", supported=(1, 1), keys=("fxopt_version", "torch_version"))
"""

from __future__ import annotations

import functools
import importlib.metadata
import re
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils import _pytree as pytree

from fxopt.errors import ArtifactVersionError, LoweringError


def running_fxopt() -> str:
    """The installed fxopt version (``0+unknown`` when run from a source tree)."""
    try:
        return importlib.metadata.version("fxopt")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


def check_versions(
    manifest: dict,
    where: str,
    *,
    supported: tuple[int, int],
    keys: tuple[str, str],
    torch_major: bool = False,
) -> None:
    """Raise ArtifactVersionError when the artifact at ``where`` cannot be read here.

    ``supported`` is the (oldest, newest) format version this fxopt reads; ``keys`` the
    manifest keys of the writer's fxopt and torch versions; ``torch_major`` also refuses
    an artifact written under another torch major version.

    >>> check_versions({"format_version": 9}, "m.onnx", supported=(1, 1),
    ...                keys=("fxopt", "torch"))  # doctest: +SKIP
    ArtifactVersionError: m.onnx was written by fxopt ? ... format_version 9 ...
    """
    version = manifest.get("format_version")
    wrote, now = _writer(manifest, keys), _running()
    oldest, newest = supported
    head = f"{where} was written by {wrote} (format_version {version!r})"
    if not isinstance(version, int) or isinstance(version, bool):
        raise ArtifactVersionError(
            f"{head}, which is not a format version; the manifest is damaged. Lower the "
            f"model again with this fxopt ({now}).")
    if version > newest:
        raise ArtifactVersionError(
            f"{head}, newer than this fxopt reads ({now}, format_version {oldest}..{newest}). "
            f"To load it, upgrade fxopt to the version that wrote it (pip install -U 'fxopt>="
            f"{_base(manifest.get(keys[0]))}'), or lower the model again with this fxopt.")
    if version < oldest:
        raise ArtifactVersionError(
            f"{head}, older than this fxopt still reads ({now}, format_version "
            f"{oldest}..{newest}). Lower the model again with this fxopt, or install the "
            f"fxopt that wrote it (pip install 'fxopt=={_base(manifest.get(keys[0]))}').")
    theirs = _major(manifest.get(keys[1]))
    if torch_major and theirs is not None and theirs != _major(torch.__version__):
        raise ArtifactVersionError(
            f"{head}, under torch major version {theirs}; this is {now}, and the ops and "
            f"modules it rebuilds are torch {theirs}.x ones. Lower the model again under this "
            f"torch, or load it where torch {theirs}.x is installed.")


def version_note(manifest: dict, keys: tuple[str, str]) -> str:
    """`` (written by fxopt A with torch B; this is fxopt C with torch D)`` when they
    differ, else ``""``: appended to load failures that a version change may explain."""
    wrote, now = _writer(manifest, keys), _running()
    if wrote == now:
        return ""
    return (f" (written by {wrote}; this is {now}: lowering the model again with this "
            "fxopt may fix it)")


def _writer(manifest: dict, keys: tuple[str, str]) -> str:
    return f"fxopt {manifest.get(keys[0]) or '?'} with torch {manifest.get(keys[1]) or '?'}"


def _running() -> str:
    return f"fxopt {running_fxopt()} with torch {torch.__version__}"


def _major(v: object) -> int | None:
    m = re.match(r"(\d+)\.", v) if isinstance(v, str) else None
    return int(m.group(1)) if m else None


def _base(v: object) -> str:
    m = re.match(r"\d+(\.\d+)*", v) if isinstance(v, str) else None
    return m.group(0) if m else "?"


@functools.lru_cache(maxsize=64)
def _treespec(spec: str) -> pytree.TreeSpec:
    return pytree.treespec_loads(spec)


def pack_outputs(outs: Sequence[Any], manifest: dict, name: str,
                 keys: tuple[str, str] = ("fxopt", "torch")) -> Any:
    """A runtime's flat outputs in the structure the manifest's ``output_spec`` recorded
    (read once per spec, not per call); one output alone, or a tuple, without one. A spec
    this torch cannot read is a ``LoweringError`` naming the writer's versions."""
    spec = manifest.get("output_spec")
    if not spec:
        return outs[0] if len(outs) == 1 else tuple(outs)
    try:
        tree = _treespec(spec)
    except Exception as e:  # a treespec written by another torch's pytree
        raise LoweringError(f"{name}: cannot read the recorded output structure ({e})"
                            + version_note(manifest, keys)) from e
    return pytree.tree_unflatten(list(outs), tree)

