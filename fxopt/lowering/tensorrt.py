"""The TensorRT backend: a GraphModule as a serialized engine (``m.engine``) plus a JSON
manifest (``m.engine.json``), built from fxopt's verified ONNX and verified itself.

``lower`` exports and verifies ONNX (``fxopt.lowering.onnx``), runs ``check_trt`` (a
blocker stops the build with its message), prepares the graph for TensorRT
(``fxopt.lowering.trt_prepare``), parses it with ``tensorrt.OnnxParser`` (errors by node),
and builds with the decisions of ``fxopt.lowering.trt_config``: optimization profiles from
``dim_bounds``, precision flags per TensorRT version, workspace, optimization level and a
reused / updated timing cache. The engine is then run on the example inputs and on random
inputs at each profile's min and max shapes and compared with the GraphModule at the
tolerance of its precision; only then are the engine and its manifest moved into place.

TensorRT is imported only inside ``lower`` and ``load``: ``import fxopt`` never imports it,
and without it (or without a GPU) both raise a LoweringError saying what to install.

Example::

    art = fxopt.lower(gm, "tensorrt", (x,), path="m.engine", dim_bounds={"batch": (1, 8, 32)},
                      workspace="4GiB", timing_cache="trt.cache", optimization_level=3)
    art = fxopt.load("m.engine")
    y = art(x)                     # CPU in, CPU out; CUDA in, CUDA out
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import onnx
import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import LoweringError
from fxopt.lowering import Artifact, destination, run_module, write_files
from fxopt.lowering.trt_config import (
    INSTALL_HINT,
    PRECISIONS,
    PrecisionPlan,
    TimingCachePlan,
    check_optimization_level,
    decide_precision,
    derive_profiles,
    graph_precision,
    network_flag_bits,
    onnx_inputs,
    parse_workspace,
    timing_cache_plan,
    trt_version,
)
from fxopt.lowering.trt_runtime import (
    TrtRunner,
    check_compatible,
    cuda_device,
    gpu_info,
    import_tensorrt,
    make_logger,
    on_device,
)
from fxopt.lowering.versions import check_versions, pack_outputs, running_fxopt
from fxopt.progress import Mode, bar, stage
from fxopt.verify import Tolerance, compare_outputs, graph_tolerance, loosest

FORMAT = "fxopt-tensorrt"
FORMAT_VERSION = 1
VERSION_KEYS = ("fxopt", "torch")
SUFFIXES = (".engine", ".plan", ".trt")


def manifest_path(engine: Path) -> Path:
    """``m.engine`` -> ``m.engine.json``."""
    return engine.with_name(engine.name + ".json")


class TrtArtifact(Artifact):
    """A TensorRT engine on a CUDA device: ``art(*tensors)``, ``art.manifest`` (what fxopt
    recorded at build time), ``art.input_spec`` and ``art.runner`` (the TrtRunner)."""

    kind = "tensorrt"

    def __init__(self, path: Path, manifest: dict, runner: TrtRunner) -> None:
        self.path = Path(path)
        self.manifest = manifest
        self.runner = runner
        self.input_spec = runner.specs

    def __call__(self, *inputs: Any) -> Any:
        return pack_outputs(self.runner(*inputs), self.manifest, self.path.name)

    def save(self, path: str | os.PathLike) -> TrtArtifact:
        """Copy the engine and its manifest to ``path`` and load it from there.

        >>> art.save("backup/m.engine")  # doctest: +SKIP
        """
        dest = _engine_file(path)
        if dest == self.path.absolute():
            return self
        plan, manifest = self.path.read_bytes(), dict(self.manifest)
        write_files(dest, lambda f: _write_engine(f, plan, manifest), _check_replaceable)
        return load(dest, device=self.runner.device)


# --------------------------------------------------------------------------- lower


def lower(
    gm: fx.GraphModule,
    example_inputs: Any,
    path: str | os.PathLike | None = None,
    *,
    dim_bounds: Mapping[str, Sequence[int]] | Sequence[Mapping[str, Sequence[int]]] | None = None,
    dynamic: bool | None = None,
    dynamic_dims: Mapping[int | str, Mapping[int, str]] | None = None,
    workspace: int | str | None = None,
    timing_cache: str | os.PathLike | None = None,
    optimization_level: int = 3,
    precision: str | None = None,
    tolerance: Tolerance | None = None,
    opset: int | None = None,
    exporter: str = "auto",
    device: Any = None,
    progress: Mode = None,
) -> TrtArtifact:
    """Build a verified TensorRT engine of ``gm`` at ``path`` (``m.engine``; its manifest
    goes to ``m.engine.json``).

    ``dim_bounds`` gives (min, opt, max) per dynamic dim name, one mapping per optimization
    profile (a list for several). Dim 0 of every input is the dynamic ``"batch"`` when
    ``dim_bounds`` names it (or ``dynamic=True``); ``dynamic_dims`` names more, as for the
    onnx target. ``precision`` is None (what the graph's types carry: fp32, or fp16 / bf16
    from the half pass, int8 from Q/DQ), ``"fp32"``, ``"tf32"``, ``"fp16"``, ``"bf16"`` or
    ``"int8"``; see ``trt_config.decide_precision`` for what TensorRT 10 and 11 do with it.
    ``workspace`` is bytes or ``"4GiB"``; ``timing_cache`` a file that is reused when present
    and updated after a verified build. ``tolerance`` overrides the precision's own.

    >>> art = lower(gm, (x,), "m.engine", dim_bounds={"batch": (1, 8, 32)})  # doctest: +SKIP
    """
    if path is None:
        raise LoweringError("the tensorrt target writes a file: pass path='out/model.engine'")
    if not isinstance(gm, fx.GraphModule):
        raise LoweringError(f"lower() takes a torch.fx.GraphModule, got {type(gm).__name__}; "
                            "capture the model first with fxopt.capture(model, example_inputs)")
    inputs = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (
        example_inputs,)
    dest = _engine_file(path)
    _check_replaceable(dest)
    pool = parse_workspace(workspace)
    level = check_optimization_level(optimization_level)
    cache = timing_cache_plan(timing_cache)
    if precision is not None and precision not in PRECISIONS:
        raise LoweringError(f"precision={precision!r}: use one of {', '.join(PRECISIONS)}, or "
                            "None for the precision the graph's types carry")
    groups = [dim_bounds] if isinstance(dim_bounds, Mapping) else list(dim_bounds or [])
    if dynamic is None:
        dynamic = any("batch" in g for g in groups if isinstance(g, Mapping))
    trt = import_tensorrt()
    version = trt_version(trt.__version__)
    dev = cuda_device(device)

    with tempfile.TemporaryDirectory(prefix="fxopt-trt-") as td:
        onnx_file = Path(td) / "model.onnx"
        onnx_art = _export(gm, inputs, onnx_file, dynamic, dynamic_dims, groups, opset, exporter)
        model = onnx.load_model(str(onnx_file), load_external_data=False)
        specs = onnx_inputs(model)
        profiles = derive_profiles(specs, groups or None)
        plan = decide_precision(graph_precision(model), precision, version)
        _check_example_fits(specs, inputs, profiles)
        _check(onnx_file, version, groups, fixable=_PREPARE_FIXES)
        prepared, prep = _prepare(onnx_file, specs, inputs, version, Path(td) / "prepared.onnx")
        findings = _check(prepared, version, groups)
        start = time.perf_counter()
        with on_device(dev):
            engine, logger, cache_out = _build(trt, prepared, profiles, plan, pool, level,
                                               cache, progress)
        build_s = time.perf_counter() - start
    input_spec = [{"name": s.name, "dtype": s.dtype, "shape": list(s.shape)} for s in specs]
    runner = TrtRunner(trt, engine, dev, dest.name, input_spec)
    tol = tolerance or loosest([plan.tolerance, graph_tolerance(gm)])
    with stage("verifying the TensorRT engine", progress=progress):
        verified = _verify(gm, runner, inputs, input_spec, profiles, tol)
    reference = run_module(gm, inputs, "the GraphModule")
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "fxopt": running_fxopt(),
        "torch": torch.__version__, "tensorrt": trt.__version__, "gpu": gpu_info(dev),
        "precision": plan.to_dict(), "profiles": profiles, "inputs": input_spec,
        "outputs": [{"name": t.name, "dtype": str(t.dtype).removeprefix("torch."),
                     "shape": list(t.shape)} for t in runner.outputs],
        "output_spec": _treespec(reference),
        "build": {"workspace_bytes": pool, "optimization_level": level, "seconds":
                  round(build_s, 3), "timing_cache": str(cache.path) if cache.path else None,
                  "timing_cache_reused": cache.reused},
        "warnings": logger.of("WARNING"), "check_trt": findings,
        "prepare": _prepare_summary(prep), "verified": verified,
        "tolerance": {"rtol": tol.rtol, "atol": tol.atol, "min_cosine": tol.min_cosine},
        "onnx": {k: onnx_art.manifest.get(k) for k in ("exporter", "opset", "verified")},
    }
    manifest = json.loads(json.dumps(manifest, default=str))  # in memory as on disk
    write_files(dest, lambda f: _write_engine(f, engine, manifest), _check_replaceable)
    if cache.path is not None and cache_out:
        _write_cache(cache.path, cache_out)
    return TrtArtifact(dest, manifest, runner)


def _export(gm, inputs, onnx_file, dynamic, dynamic_dims, groups, opset, exporter):
    from fxopt.lowering import onnx as onnx_backend

    bounds = groups[0] if len(groups) == 1 else None  # several profiles: recorded here only
    options = {"opset": opset} if opset is not None else {}
    return onnx_backend.lower(gm, inputs, path=onnx_file, dynamic=dynamic,
                              dynamic_dims=dynamic_dims, dim_bounds=bounds, exporter=exporter,
                              **options)


def _check_example_fits(specs: list, inputs: tuple, profiles: list) -> None:
    """The engine is verified on the example inputs, so one profile must contain them."""
    shapes = [list(x.shape) for x in inputs]
    if not profiles or any(all(p[s.name]["min"][d] <= size <= p[s.name]["max"][d]
                               for s, shape in zip(specs, shapes) for d, size in enumerate(shape))
                           for p in profiles):
        return
    sizes = {str(n): shape[d] for s, shape in zip(specs, shapes)
             for d, n in enumerate(s.shape) if isinstance(n, str)}
    raise LoweringError(f"the example inputs ({', '.join(f'{k}={v}' for k, v in sizes.items())}"
                        ") lie outside every optimization profile of dim_bounds; widen the "
                        "bounds to include them (the engine is verified on them)")


# check-trt blockers the preparation rewrites away (int64 arithmetic run in int32); the
# prepared graph is checked again, so one it could not fix still stops the build
_PREPARE_FIXES = ("int64-compute",)


def _check(onnx_file: Path, version: int, groups: list, fixable: tuple = ()) -> list[dict]:
    from fxopt.trt_check import check_trt

    bounds = groups[0] if groups else None
    report = check_trt(str(onnx_file), trt_version=version, dim_bounds=bounds)
    blockers = [f for f in report.blockers if f.code not in fixable]
    if blockers:
        rows = "; ".join(f"{f.node} ({f.op_type}): {f.message} - fix: {f.fix}"
                         for f in blockers)
        raise LoweringError(f"check-trt found what stops a TensorRT {version} build: {rows}")
    return [{"code": f.code, "node": f.node, "op_type": f.op_type, "message": f.message}
            for f in report.warnings]


def _prepare(onnx_file: Path, specs, inputs: tuple, version: int, out: Path):
    try:
        from fxopt.lowering.trt_prepare import prepare_for_tensorrt
    except ImportError as e:
        raise LoweringError(f"the tensorrt target needs onnx-graphsurgeon ({e}); install it with "
                            f"{INSTALL_HINT}") from e
    feeds = {s.name: x.detach().cpu().numpy() for s, x in zip(specs, inputs)}
    model, report = prepare_for_tensorrt(onnx_file, inputs=feeds, trt_version=version,
                                         out_path=out)
    if report.unsupported:
        rows = "; ".join(f"{n} ({op}): {why}" for n, op, why in report.unsupported)
        raise LoweringError(f"TensorRT {version} cannot build these nodes: {rows}")
    if not out.exists():
        onnx.save_model(model, str(out), save_as_external_data=model.ByteSize() > 2**30)
    return out, report


def _prepare_summary(report: Any) -> dict:
    return {"rewrites": list(report.rewrites), "plugins": list(report.plugins),
            "max_abs_error": report.max_abs_error}


@functools.cache
def _monitor_class(trt: ModuleType) -> type | None:
    if not hasattr(trt, "IProgressMonitor"):
        return None

    class _Monitor(trt.IProgressMonitor):
        """One tqdm bar per build phase (nested phases get their own)."""

        def __init__(self, progress: Mode) -> None:
            trt.IProgressMonitor.__init__(self)
            self.progress, self.bars = progress, {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.bars[phase_name] = bar(desc=f"TensorRT {phase_name}", total=num_steps,
                                        unit="step", progress=self.progress)

        def step_complete(self, phase_name: str, step: int) -> bool:
            b = self.bars.get(phase_name)
            if b is not None:
                b.update(step + 1 - b.n)
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            b = self.bars.pop(phase_name, None)
            if b is not None:
                b.close()

    return _Monitor


def _build(trt: ModuleType, onnx_file: Path, profiles: list, plan: PrecisionPlan,
           pool: int | None, level: int, cache: TimingCachePlan, progress: Mode):
    """Parse and build; returns (serialized engine bytes, logger, timing cache bytes)."""
    logger = make_logger(trt)
    builder = trt.Builder(logger)
    network = builder.create_network(network_flag_bits(trt, plan))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_file)):
        raise LoweringError("TensorRT's ONNX parser rejected the graph: "
                            + "; ".join(_parser_errors(parser)))
    config = builder.create_builder_config()
    if pool is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, pool)
    config.builder_optimization_level = level
    for name in plan.builder_flags:
        config.set_flag(_flag(trt, name, plan))
    for name in plan.cleared_flags:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    for shapes in profiles:
        profile = builder.create_optimization_profile()
        for name, s in shapes.items():
            profile.set_shape(name, s["min"], s["opt"], s["max"])
        config.add_optimization_profile(profile)
    timing = config.create_timing_cache(cache.data)
    if not config.set_timing_cache(timing, False) and cache.reused:
        # written by another TensorRT or GPU: start fresh (the file is replaced on success)
        logger.messages.append(("WARNING", f"timing cache {cache.path} does not match this "
                                "TensorRT / GPU; building with a fresh cache"))
        timing = config.create_timing_cache(b"")
        config.set_timing_cache(timing, False)
    monitor_cls = _monitor_class(trt)
    monitor = monitor_cls(progress) if monitor_cls is not None else None
    if monitor is not None:
        config.progress_monitor = monitor
    with stage(f"building the TensorRT {plan.version} engine ({plan.precision})",
               progress=progress):
        serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        errors = "; ".join(logger.of("ERROR", "INTERNAL_ERROR"))[:1500]
        raise LoweringError(f"TensorRT could not build the engine: {errors or 'no reason given'}"
                            f" (precision {plan.precision}, workspace "
                            f"{pool if pool is not None else 'default'}; a larger workspace= "
                            "or a lower optimization_level may help)")
    cache_out = bytes(memoryview(config.get_timing_cache().serialize()))
    return bytes(memoryview(serialized)), logger, cache_out


def _flag(trt: ModuleType, name: str, plan: PrecisionPlan) -> Any:
    member = getattr(trt.BuilderFlag, name, None)
    if member is None:  # trt_config refuses these on TensorRT 11; a 10.x without one lands here
        raise LoweringError(f"TensorRT {trt.__version__} has no BuilderFlag.{name}, needed for "
                            f"precision {plan.precision}; convert the graph's types instead "
                            "(the half or quantize pass) and lower with precision=None")
    return member


def _parser_errors(parser: Any) -> list[str]:
    out = []
    for i in range(parser.num_errors):
        e = parser.get_error(i)
        name = _call(e, "node_name") or f"#{_call(e, 'node')}"
        op = _call(e, "node_operator")
        out.append(f"node {name}{f' ({op})' if op else ''}: {_call(e, 'desc') or e}")
    return out or ["no error was reported"]


def _call(obj: Any, method: str) -> Any:
    fn = getattr(obj, method, None)
    try:
        return fn() if callable(fn) else None
    except Exception:  # noqa: BLE001 - an older parser without that accessor
        return None


def _verify(gm: fx.GraphModule, runner: TrtRunner, inputs: tuple, specs: list,
            profiles: list, tol: Tolerance) -> dict:
    checks = [("the example inputs", inputs)]
    for k, shapes in enumerate(profiles):
        for end in ("min", "max"):
            shaped = _random_inputs(inputs, [shapes[s["name"]][end] for s in specs], seed=k * 2)
            checks.append((f"random inputs at profile {k} {end}", shaped))
    results = {}
    for what, xs in checks:
        want = run_module(gm, xs, "the GraphModule")
        try:
            got = runner(*xs)
        except LoweringError as e:
            raise LoweringError(f"the TensorRT engine failed on {what}: {e}; nothing was "
                                "written") from e
        report = compare_outputs(pytree.tree_leaves(want), got, tol)
        if not report.ok():
            bad = report.structure_error or next(
                f"output {o['index']} differs by {o['max_abs']:.3g} (scale {o['ref_scale']:.3g},"
                f" allowed {tol.atol:g} + {tol.rtol:g}*scale, cosine {o['cosine']:.6f})"
                for o in report.per_output if not tol.allows(o["max_abs"], o["ref_scale"],
                                                             o["cosine"]))
            raise LoweringError(f"the TensorRT engine does not reproduce the GraphModule on "
                                f"{what}: {bad}; nothing was written")
        results[what] = {"max_abs": report.max_abs, "max_rel": report.rel,
                         "cosine": report.cosine}
    return results


def _random_inputs(inputs: tuple, shapes: list, seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x, shape in zip(inputs, shapes):
        if x.is_floating_point():
            r = torch.randn(shape, generator=gen).to(x.dtype)
        elif x.dtype == torch.bool:
            r = torch.randint(0, 2, shape, generator=gen).bool()
        else:
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 1)
            r = torch.randint(lo, hi + 1, shape, generator=gen, dtype=x.dtype)
        out.append(r.to(x.device))  # where the GraphModule runs
    return tuple(out)


def _treespec(reference: Any) -> str | None:
    try:
        return pytree.treespec_dumps(pytree.tree_structure(reference))
    except Exception:  # a custom output class without a serializer: flat outputs
        return None


# --------------------------------------------------------------------------- files


def _engine_file(path: str | os.PathLike) -> Path:
    dest = destination(path)
    if dest.suffix not in SUFFIXES:
        raise LoweringError(f"path={os.fspath(path)!r}: a TensorRT engine file ends in "
                            f"{', '.join(SUFFIXES)}, e.g. path='out/model.engine'")
    return dest


def _check_replaceable(dest: Path) -> None:
    """Refuse to overwrite anything but an fxopt engine (a file whose manifest is ours)."""
    for p in (dest, manifest_path(dest)):
        if p.is_symlink() or (p.exists() and not p.is_file()):
            raise LoweringError(f"{p} exists and is not a file; refusing to overwrite it")
    if dest.exists() and _read_manifest(dest).get("format") != FORMAT:
        raise LoweringError(f"{dest} exists and is not an fxopt TensorRT engine (no "
                            f"{manifest_path(dest).name} written by fxopt); refusing to "
                            "overwrite it. Remove it or choose another path.")


def _write_engine(f: Path, plan: bytes, manifest: dict) -> Path:
    manifest_path(f).write_text(json.dumps(manifest, indent=1, default=str))
    f.write_bytes(plan)
    return f


def _write_cache(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise LoweringError(f"the engine was written, but timing cache {path} could not be "
                            f"updated: {e.strerror or e}") from e


def _read_manifest(engine: Path) -> dict:
    try:
        data = json.loads(manifest_path(engine).read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


# --------------------------------------------------------------------------- load


def detect(path: str | os.PathLike) -> bool:
    """True for an engine file (``.engine`` / ``.plan`` / ``.trt``, or any file with an
    fxopt TensorRT manifest beside it). Never imports TensorRT."""
    p = Path(path)
    return p.is_file() and (p.suffix in SUFFIXES or _read_manifest(p).get("format") == FORMAT)


def load(path: str | os.PathLike, device: Any = None) -> TrtArtifact:
    """Deserialize an engine on ``device`` (default: the current CUDA device), after
    checking from its manifest that it was built for this TensorRT release and GPU.

    >>> art = load("m.engine")  # doctest: +SKIP
    >>> art(x)  # doctest: +SKIP
    """
    p = Path(path).absolute()
    if not p.is_file():
        raise LoweringError(f"cannot load {p}: no engine file there")
    manifest = _read_manifest(p)
    if manifest and manifest.get("format") == FORMAT:
        check_versions(manifest, str(p), supported=(1, FORMAT_VERSION), keys=VERSION_KEYS)
    trt = import_tensorrt()
    dev = cuda_device(device)
    check_compatible(manifest, p.name, trt.__version__, gpu_info(dev))
    runner = TrtRunner(trt, p.read_bytes(), dev, p.name, manifest.get("inputs"))
    return TrtArtifact(p, manifest, runner)


__all__ = ["FORMAT", "TrtArtifact", "detect", "load", "lower", "manifest_path"]
