"""The ONNX backend: a GraphModule as an ``.onnx`` file, verified in ONNX Runtime.

``lower`` exports with the torch.export-based exporter (or the TorchScript one, as an
explicit choice or an automatic fallback), cleans the graph, checks it with
``onnx.checker``, writes weights as external data when they are too big for one protobuf,
then runs the file in ONNX Runtime on the example inputs and on random inputs with every
dynamic dimension grown, and compares with the GraphModule. Only a verified file is
moved into place. What fxopt knows about the file (exporter, opset, dynamic dimensions,
output structure) is kept in the model's ``metadata_props["fxopt"]``.

Example::

    art = fxopt.lower(gm, "onnx", (x,), path="out/model.onnx", dynamic_dims={0: {1: "seq"}})
    art = fxopt.load("out/model.onnx", threads=4)
    y = art(x)                      # torch or numpy in, torch out
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import re
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import FxoptWarning, LoweringError
from fxopt.lowering import Artifact, destination, onnx_export, run_module, write_files
from fxopt.lowering.input_spec import check_inputs, spec_for_onnx
from fxopt.lowering.onnx_session import (
    ACCELERATOR_TOLERANCE,
    CPU,
    open_session,
    provider_name,
    session_config,
    verification_configs,
)
from fxopt.lowering.versions import check_versions, pack_outputs
from fxopt.progress import stage
from fxopt.verify import Tolerance, compare_outputs, graph_tolerance, loosest, random_like_inputs

FORMAT = "fxopt-onnx"
FORMAT_VERSION = 1
OLDEST_FORMAT_VERSION = 1
VERSION_KEYS = ("fxopt", "torch")
DEFAULT_OPSET = 20  # torch.onnx's default too; opset 20 has a native Gelu
DEFAULT_FILE = "model.onnx"
# protobuf cannot serialize a message over 2 GiB; keep headroom for the graph itself
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**27
class OnnxArtifact(Artifact):
    """An ONNX file with an ONNX Runtime session: ``art(*inputs)``, ``art.session``,
    ``art.manifest`` (what fxopt recorded; empty for files fxopt did not write) and
    ``art.input_spec`` (read from the model's graph inputs: names, dtypes, static and named
    dynamic dims). A call that does not fit it raises InputSpecError before anything runs.
    """

    kind = "onnx"

    def __init__(self, path: Path, manifest: dict, session: ort.InferenceSession,
                 session_config: dict) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.session = session
        self.session_config = session_config
        self.input_names = [i.name for i in session.get_inputs()]
        self.output_names = [o.name for o in session.get_outputs()]
        self.input_spec = spec_for_onnx(session.get_inputs())

    def __call__(self, *inputs: Any) -> Any:
        check_inputs(self.input_spec, inputs, self.path.name)
        feeds = {name: _to_numpy(x, name) for name, x in zip(self.input_names, inputs)}
        outs = [torch.from_numpy(np.asarray(o)) for o in self.session.run(None, feeds)]
        return pack_outputs(outs, self.manifest, self.path.name, VERSION_KEYS)

    def save(self, path: str | os.PathLike) -> OnnxArtifact:
        """Write the model to ``path`` (a ``.onnx`` file or a folder) and load it from there.

        >>> art.save("backup/model.onnx")  # doctest: +SKIP
        """
        dest = _model_file(path)
        if dest == self.path.absolute():
            return self
        model = ir.external_data.load_to_model(ir.load(self.path))
        threshold = self.manifest.get("external_data_threshold", EXTERNAL_DATA_THRESHOLD)
        write_files(dest, lambda f: _write_model(model, f, threshold), _check_replaceable)
        return load(dest, **self.session_config)

    def __repr__(self) -> str:
        return (f"OnnxArtifact(path={str(self.path)!r}, inputs={self.input_names}, "
                f"providers={self.session.get_providers()})")


# --------------------------------------------------------------------------- lower


def lower(
    gm: fx.GraphModule,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    *,
    opset: int = DEFAULT_OPSET,
    dynamic: bool = True,
    dynamic_dims: Mapping[int | str, Mapping[int, str]] | None = None,
    dim_bounds: Mapping[str, Sequence[int]] | None = None,
    exporter: str = "auto",
    external_data_threshold: int = EXTERNAL_DATA_THRESHOLD,
    tolerance: Tolerance | None = None,
    threads: int | None = None,
    graph_optimization_level: str = "all",
    providers: Sequence[Any] | None = None,
    provider_fallback: bool = False,
) -> OnnxArtifact:
    """Export ``gm`` to ONNX at ``path``, verified in ONNX Runtime before it is moved there.

    ``dynamic`` makes dimension 0 of every input a ``"batch"`` dimension;
    ``dynamic_dims`` names more, by input position or name: ``{"ids": {1: "seq"}}``.
    ``exporter`` is ``"dynamo"`` (torch.export-based), ``"torchscript"``, or ``"auto"``
    (dynamo, then TorchScript with a warning if dynamo fails or does not verify).
    ``dim_bounds`` ({"batch": (min, opt, max)}) is recorded for TensorRT profiles.
    ``tolerance`` defaults to the graph's own (``fxopt.verify.graph_tolerance``): 1e-4
    relative for float32, ``QUANTIZED`` for a graph the ``quantize`` pass changed (ONNX
    Runtime runs real int8 kernels there), ``HALF_FP16`` / ``HALF_BF16`` where half tensors
    flow (ONNX Runtime's half kernels accumulate in another order).
    Session options (``threads``, ``graph_optimization_level``, ``providers``) apply to
    the returned artifact. Verification runs on ONNX Runtime's CPU provider and, when
    ``providers`` names others (``["TensorrtExecutionProvider", "CUDAExecutionProvider",
    "CPUExecutionProvider"]``), on those too (within ``ACCELERATOR_TOLERANCE`` at least);
    a provider this ONNX Runtime lacks, or one the session silently drops, is a
    LoweringError naming it, unless ``provider_fallback=True`` verifies on the rest. The
    manifest records the providers used (``providers``) and those missing.

    >>> art = lower(gm, (x,), "out/model.onnx", opset=18)  # doctest: +SKIP
    >>> art(x)  # doctest: +SKIP
    """
    if path is None:
        raise LoweringError("the onnx target writes a file: pass path='out/model.onnx'")
    if not isinstance(gm, fx.GraphModule):
        raise LoweringError(
            f"lower() takes a torch.fx.GraphModule, got {type(gm).__name__}; "
            "capture the model first with fxopt.capture(model, example_inputs)"
        )
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (
        example_inputs,)
    input_names = _input_names(gm, inputs)
    dims = _dynamic_dims(inputs, input_names, dynamic, dynamic_dims)
    bounds = _check_bounds(dim_bounds, dims)
    config = session_config(threads, graph_optimization_level, providers, provider_fallback)
    if not isinstance(opset, int) or not 7 <= opset <= onnx.defs.onnx_opset_version():
        raise LoweringError(
            f"opset {opset!r} is not available; use 7..{onnx.defs.onnx_opset_version()}")
    exporters = {"auto": ["dynamo", "torchscript"]}.get(exporter, [exporter])
    if exporter not in ("auto", *onnx_export.EXPORTERS):
        raise LoweringError(f"unknown exporter {exporter!r}; use auto, dynamo or torchscript")
    dest = _model_file(path)
    _check_replaceable(dest)  # before any work: refuse early, touch nothing

    if tolerance is None:
        tolerance = graph_tolerance(gm)
    reference = run_module(gm, inputs, "the GraphModule")
    job = _Job(gm, inputs, input_names, _output_names(reference), dims, bounds, opset,
               external_data_threshold, tolerance,
               checks=[("the example inputs", inputs, pytree.tree_leaves(reference))]
               + _grown_checks(gm, inputs, dims),
               out_spec=pytree.tree_structure(reference),
               verify_on=verification_configs(config, providers is not None),
               missing_providers=config["missing"])
    failures: list[str] = []
    for name in exporters:
        try:
            write_files(dest, lambda f, name=name: job.write(f, name, failures),
                        _check_replaceable)
        except LoweringError as e:
            if len(exporters) == 1 or isinstance(e.__cause__, OSError):
                raise
            failures.append(f"{name}: {e}")
            continue
        if failures:
            warnings.warn(
                f"fxopt: exported {dest.name} with the {name} exporter because "
                + "; ".join(failures), FxoptWarning, stacklevel=2)
        return load(dest, **_artifact_config(config))
    raise LoweringError(f"no exporter produced a verified ONNX model: {' | '.join(failures)}")


@dataclass
class _Job:
    """Everything one export attempt needs; ``write`` runs inside ``write_files``."""

    gm: fx.GraphModule
    inputs: tuple
    input_names: list[str]
    output_names: list[str]
    dims: dict[int, dict[int, str]]
    bounds: dict[str, list[int]]
    opset: int
    threshold: int
    tolerance: Tolerance
    checks: list
    out_spec: Any
    verify_on: list[dict]
    missing_providers: list[str]

    def write(self, f: Path, exporter: str, failures: list[str]) -> Path:
        start = time.perf_counter()
        with stage(f"exporting to ONNX ({exporter}, opset {self.opset})"):
            model = onnx_export.export(
                self.gm, _export_inputs(self.inputs, self.dims), exporter, opset=self.opset,
                input_names=self.input_names, output_names=self.output_names,
                dynamic_dims=self.dims)
            stats = onnx_export.clean(model)
        _check_opset(model, self.opset, exporter)
        manifest = self.manifest(exporter, stats, time.perf_counter() - start, failures)
        model.metadata_props["fxopt"] = json.dumps(manifest)
        _write_model(model, f, self.threshold)
        _check_model(f)
        with stage("verifying in ONNX Runtime"):
            verified = {}
            for config in self.verify_on:
                key = ",".join(provider_name(p) for p in config["providers"])
                verified[key], used = _verify(f, self.checks, self.output_names,
                                              self.tolerance, exporter, config)
            manifest["verified"] = verified.pop(CPU)
            manifest["verified_providers"] = verified
            manifest["providers"] = used
            manifest["providers_missing"] = self.missing_providers
        model.metadata_props["fxopt"] = json.dumps(manifest)
        _write_model(model, f, self.threshold)  # again, with the verified errors recorded
        return f

    def manifest(self, exporter: str, stats: dict, export_s: float, failures: list) -> dict:
        meta = self.gm.meta.get("fxopt", {})
        try:
            spec = pytree.treespec_dumps(self.out_spec)
        except Exception:  # a custom output class without a serializer: return flat outputs
            spec = None
        return {
            "format": FORMAT,
            "format_version": FORMAT_VERSION,
            "fxopt": _version("fxopt"),
            "torch": torch.__version__,
            "onnx": onnx.__version__,
            "onnxruntime": ort.__version__,
            "exporter": exporter,
            "fallback_from": failures[:],
            "opset": self.opset,
            "export_seconds": round(export_s, 3),
            "clean": stats,
            "inputs": [
                {"name": n, "dtype": str(x.dtype).removeprefix("torch."),
                 "shape": [self.dims.get(i, {}).get(d, s) for d, s in enumerate(x.shape)]}
                for i, (n, x) in enumerate(zip(self.input_names, self.inputs))
            ],
            "outputs": self.output_names,
            "output_spec": spec,
            "dim_bounds": self.bounds,
            "external_data_threshold": self.threshold,
            "capture": (meta.get("capture") or {}).get("frontend"),
            "pipeline": meta.get("pipeline"),
            # what "verified" was checked against: a loaded artifact's caller compares with it
            "tolerance": dataclasses.asdict(self.tolerance),
        }


def _input_names(gm: fx.GraphModule, inputs: tuple) -> list[str]:
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(inputs):
        raise LoweringError(
            f"the GraphModule takes {len(placeholders)} inputs, {len(inputs)} example inputs "
            "were given")
    for p, x in zip(placeholders, inputs):
        if not isinstance(x, torch.Tensor):
            raise LoweringError(
                f"input {p.target!r} is a {type(x).__name__}; ONNX inputs must be tensors "
                "(capture with concrete_args={...} to bake Python values into the graph)")
    return [str(p.target) for p in placeholders]


def _dynamic_dims(inputs: tuple, names: list[str], dynamic: bool,
                  extra: Mapping[int | str, Mapping[int, str]] | None) -> dict[int, dict[int, str]]:
    dims: dict[int, dict[int, str]] = {
        i: ({0: "batch"} if dynamic and x.dim() > 0 else {}) for i, x in enumerate(inputs)}
    for key, named in (extra or {}).items():
        i = names.index(key) if key in names else key
        if not isinstance(i, int) or not 0 <= i < len(inputs):
            raise LoweringError(
                f"dynamic_dims names input {key!r}; the inputs are {', '.join(names)} "
                "(by position 0..{})".format(len(inputs) - 1))
        for d, dim_name in named.items():
            rank = inputs[i].dim()
            if not isinstance(d, int) or not -rank <= d < rank or not str(dim_name).isidentifier():
                raise LoweringError(
                    f"dynamic_dims[{key!r}]: {d!r}: {dim_name!r} is not a dimension of a "
                    f"rank-{rank} input with an identifier name (e.g. {{1: 'seq'}})")
            dims[i][d % rank] = str(dim_name)
    return dims


def _check_bounds(bounds: Mapping[str, Sequence[int]] | None,
                  dims: dict[int, dict[int, str]]) -> dict[str, list[int]]:
    known = {n for d in dims.values() for n in d.values()}
    out = {}
    for name, b in (bounds or {}).items():
        if name not in known:
            raise LoweringError(f"dim_bounds names {name!r}, which is not a dynamic dimension "
                                f"(dynamic: {', '.join(sorted(known)) or 'none'})")
        b = list(b)
        if len(b) != 3 or not all(isinstance(v, int) for v in b) or not 1 <= b[0] <= b[1] <= b[2]:
            raise LoweringError(f"dim_bounds[{name!r}] must be (min, opt, max) with "
                                f"1 <= min <= opt <= max, got {tuple(b)}")
        out[name] = b
    return out


def _grow(inputs: tuple, dims: dict[int, dict[int, str]], to_at_least: int, delta: int) -> tuple:
    out = []
    for i, x in enumerate(inputs):
        for d in dims.get(i, {}):
            size = max(x.shape[d] + delta, to_at_least)
            reps = [1] * x.dim()
            reps[d] = math.ceil(size / max(x.shape[d], 1))
            x = x.repeat(*reps).narrow(d, 0, size)
        out.append(x)
    return tuple(out)


def _export_inputs(inputs: tuple, dims: dict[int, dict[int, str]]) -> tuple:
    # torch.export specializes dimensions of size 0 and 1: trace dynamic ones at size >= 2
    return _grow(inputs, dims, to_at_least=2, delta=0)


def _grown_checks(gm: fx.GraphModule, inputs: tuple,
                  dims: dict[int, dict[int, str]]) -> list[tuple[str, tuple, list]]:
    if not any(dims.values()):
        return []
    grown = random_like_inputs(_grow(inputs, dims, to_at_least=1, delta=1), seed=1)
    sizes = ", ".join(f"{n}={grown[i].shape[d]}" for i, dd in dims.items() for d, n in dd.items())
    try:
        ref = run_module(gm, grown, "the GraphModule")
    except LoweringError as e:
        cause = e.__cause__ or e
        raise LoweringError(
            f"the GraphModule itself fails with {sizes} ({type(cause).__name__}: {cause}), so "
            "it is not dynamic in those dimensions: name only dimensions it accepts at any "
            "size in dynamic_dims, or export with dynamic=False") from None
    return [(f"random inputs with {sizes}", grown, pytree.tree_leaves(ref))]


def _output_names(reference: Any) -> list[str]:
    leaves = pytree.tree_flatten_with_path(reference)[0]
    if len(leaves) == 1 and not leaves[0][0]:
        return ["output"]
    names = []
    for keypath, _ in leaves:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
                 for k in keypath]
        name = "_".join(p for p in parts if p) or "output"
        name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
        names.append(name if name and not name[0].isdigit() else f"output_{name}")
    seen: dict[str, int] = {}
    for i, n in enumerate(names):
        if n in seen:
            names[i] = f"{n}_{i}"
        seen[n] = i
    return names


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _check_opset(model: ir.Model, opset: int, exporter: str) -> None:
    got = model.opset_imports.get("", model.opset_imports.get("ai.onnx"))
    if got != opset:
        raise LoweringError(
            f"the {exporter} exporter wrote opset {got}, not the requested {opset}; the "
            "torch.export-based exporter implements opset 18 and newer, so ask for opset>=18 "
            "or use exporter='torchscript' for older opsets")


def _write_model(model: ir.Model, f: Path, threshold: int) -> None:
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                  if v.const_value is not None)
    if weights > threshold:
        ir.save(model, f, external_data=f"{f.name}.data", size_threshold_bytes=1024)
    else:
        ir.save(model, f)


def _check_model(f: Path) -> None:
    try:
        onnx.checker.check_model(str(f))
    except onnx.checker.ValidationError as e:
        raise LoweringError(f"onnx.checker rejected the exported model: {e}") from e


def _verify(f: Path, checks: list, output_names: list[str], tolerance: Tolerance,
            exporter: str, config: dict) -> tuple[dict, list[str]]:
    """Per check ``{max_abs, max_rel}`` on the providers of ``config``, and the providers
    the session used."""
    session = open_session(f, config, log_level=4, strict=True)
    on = "" if session.get_providers() == [CPU] else f" on {session.get_providers()[0]}"
    if on:
        tolerance = loosest([tolerance, ACCELERATOR_TOLERANCE])
    got_names = [o.name for o in session.get_outputs()]
    if got_names != output_names:
        raise LoweringError(f"the ONNX model has outputs {got_names}, expected {output_names}")
    names = [i.name for i in session.get_inputs()]
    results = {}
    for k, (what, inputs, ref) in enumerate(checks):
        hint = "" if k == 0 else (
            " (the exporter fixed a dynamic dimension to its traced size"
            + (", as the TorchScript exporter does with ATen graphs from torch.export;"
               " use exporter='dynamo'" if exporter == "torchscript" else ";")
            + " or export with dynamic=False)")
        feeds = {n: _to_numpy(x, n) for n, x in zip(names, inputs)}
        try:
            outs = [torch.from_numpy(np.asarray(o)) for o in session.run(None, feeds)]
        except Exception as e:
            raise LoweringError(f"ONNX Runtime{on} failed on {what}: {_ort_reason(e)}{hint}") from e
        report = compare_outputs(ref, outs, tolerance)
        if not report.ok():
            bad = report.structure_error or _worst(report, output_names, tolerance)
            raise LoweringError(
                f"ONNX Runtime{on} does not reproduce the GraphModule on {what}: {bad}{hint}; "
                "the file was not written")
        results[what] = {"max_abs": report.max_abs, "max_rel": report.rel}
    return results, list(session.get_providers())


def _ort_reason(e: Exception) -> str:
    """ONNX Runtime's message without its source paths and C++ signatures."""
    text = " ".join(str(e).split())
    text = re.sub(r"\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+ ", "", text)
    text = re.sub(r"(\w+::)+\w+\([^)]*\)( const)? ", "", text)
    return text[:500]


def _worst(report, output_names: list[str], tolerance: Tolerance) -> str:
    bad = [o for o in report.per_output
           if not tolerance.allows(o["max_abs"], o["ref_scale"], o["cosine"])]
    o = bad[0]
    return (f"output {output_names[o['index']]!r} differs by {o['max_abs']:.3g} "
            f"(scale {o['ref_scale']:.3g}, allowed {tolerance.atol:g} + "
            f"{tolerance.rtol:g}*scale, cosine {o['cosine']:.6f})")


# --------------------------------------------------------------------------- load / session


def detect(path: str | os.PathLike) -> bool:
    """True for a ``.onnx`` file, or a folder holding ``model.onnx`` and no manifest.json."""
    p = Path(path)
    if p.is_dir():
        return (p / DEFAULT_FILE).is_file() and not (p / "manifest.json").exists()
    return p.is_file() and p.suffix == ".onnx"


def load(path: str | os.PathLike, threads: int | None = None,
         graph_optimization_level: str = "all",
         providers: Sequence[Any] | None = None,
         provider_fallback: bool = False) -> OnnxArtifact:
    """Open an ONNX file (or a folder with ``model.onnx``) in ONNX Runtime.

    >>> art = load("out/model.onnx", threads=2, providers=["CPUExecutionProvider"])
    ... # doctest: +SKIP
    """
    config = session_config(threads, graph_optimization_level, providers, provider_fallback)
    p = Path(path)
    f = p / DEFAULT_FILE if p.is_dir() else p
    if not f.is_file():
        raise LoweringError(f"cannot load {p}: no ONNX file there")
    try:
        proto = onnx.load_model(str(f), load_external_data=False)
    except Exception as e:
        raise LoweringError(f"{f} is not a readable ONNX model: {e}") from e
    manifest = {}
    for prop in proto.metadata_props:
        if prop.key == "fxopt":
            try:
                manifest = json.loads(prop.value)
            except ValueError:
                manifest = {}
    if manifest.get("format") == FORMAT:
        check_versions(manifest, str(f), supported=(OLDEST_FORMAT_VERSION, FORMAT_VERSION),
                       keys=VERSION_KEYS)
    return OnnxArtifact(f.absolute(), manifest, open_session(f, config), _artifact_config(config))


def _artifact_config(config: dict) -> dict:
    """What ``load`` takes again (missing providers were already dropped or refused)."""
    return {k: config[k] for k in ("threads", "graph_optimization_level", "providers")}


def _to_numpy(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        if x.dtype == torch.bfloat16:
            raise LoweringError(f"input {name!r} is bfloat16, which numpy cannot hold; cast it")
        return x.detach().cpu().contiguous().numpy()
    return np.asarray(x)


# --------------------------------------------------------------------------- files


def _model_file(path: str | os.PathLike) -> Path:
    dest = destination(path)
    return dest if dest.suffix == ".onnx" else dest / DEFAULT_FILE


def _check_replaceable(dest: Path) -> None:
    """Refuse to overwrite anything but an ONNX model file."""
    if not dest.exists() and not dest.is_symlink():
        return
    if dest.is_file() and not dest.is_symlink():
        try:
            onnx.load_model(str(dest), load_external_data=False)
            return
        except Exception:
            pass
    raise LoweringError(f"{dest} exists and is not an ONNX model file; refusing to overwrite "
                        "it. Remove it or choose another path.")
