"""What ``fxopt bench`` compares: one ``Candidate`` per way of running the model (PyTorch
eager, ``torch.compile``, fxopt's eager artifact, ONNX Runtime on the plain export and on
fxopt's fp32 / int8 / fp16 exports, ONNX Runtime's own quantizers, TensorRT), and
``build``, which turns a candidate into a callable and never raises for one that fails.

A candidate is data: a runtime, an fxopt pipeline (``None``: the model as given) and a
peer baseline, so the tuner can add its own (``pipeline="prune(ratio=0.3),default,
quantize(scheme=int8)"``) and cache them by ``Candidate.key()``.

Example::

    from fxopt.bench.candidates import build, default_candidates

    for cand in default_candidates(model, (x,)):
        built = build(cand, model, (x,), workdir="out")
        print(cand.name, built.error or f"{built.build_s:.1f} s, {built.size_bytes} bytes")
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from fxopt.verify import Tolerance, random_like_inputs

__all__ = ["RUNTIMES", "Built", "Candidate", "build", "calibration_batches",
           "default_candidates", "error_text", "with_batch"]

RUNTIMES = ("torch", "torch.compile", "eager", "onnx", "tensorrt")
BASELINES = ("plain-export", "ort-quantize-static", "ort-quantize-dynamic")
# the bench measures accuracy itself (agreement, metric): approximate passes and lower()
# must not refuse a candidate, or its row could not say how far off it is
LOOSE = Tolerance(rtol=1e6, atol=1e6, min_cosine=None)
CALIBRATION_BATCHES, CALIBRATION_SEED = 8, 4242


@dataclass(frozen=True)
class Candidate:
    """One way to run the model. ``runtime``: one of ``RUNTIMES``; ``pipeline``: fxopt
    pipeline text run first (``None``: the model as given); ``baseline``: ``None`` or a
    peer built without fxopt (``BASELINES``: the plain ``torch.onnx.export``, ONNX
    Runtime's ``quantize_static`` / ``quantize_dynamic`` of it); ``options``: sorted
    ``(name, value)`` pairs (``threads``: ONNX Runtime intra-op threads;
    ``dynamic_batch``: an ONNX file with a symbolic batch dimension, where the default is
    static shapes at the example batch, as the plain export has them; for TensorRT,
    ``lower`` options).

    Example::

        Candidate("ort-fxopt-int8", "onnx", "default,quantize(scheme=int8,target=ort)", None)
        Candidate("ort-plain", "onnx", None, "plain-export").key()   # 'a3f0...'
    """

    name: str
    runtime: str
    pipeline: str | None = None
    baseline: str | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        from fxopt.errors import SpecError

        if self.runtime not in RUNTIMES:
            raise SpecError(f"candidate {self.name!r}: unknown runtime {self.runtime!r}; use "
                            f"one of {', '.join(RUNTIMES)}")
        if self.baseline is not None and self.baseline not in BASELINES:
            raise SpecError(f"candidate {self.name!r}: unknown baseline {self.baseline!r}; use "
                            f"None or one of {', '.join(BASELINES)}")
        if self.baseline is not None and (self.runtime != "onnx" or self.pipeline):
            raise SpecError(f"candidate {self.name!r}: a baseline is an ONNX Runtime peer of the "
                            "model as given (runtime 'onnx', pipeline None)")

    def key(self) -> str:
        """A stable hash of everything that defines the candidate (a cache key).

        Example::

            Candidate("torch", "torch").key() == Candidate("torch", "torch").key()  # True
        """
        text = json.dumps([self.name, self.runtime, self.pipeline, self.baseline,
                           sorted(self.options)], default=repr)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def option(self, name: str, default: Any = None) -> Any:
        return dict(self.options).get(name, default)


@dataclass
class Built:
    """A built candidate: ``fn`` runs it on the example inputs (``None`` when it failed or
    was skipped, and ``error`` says why); ``build_s``: seconds to build (export, optimize,
    quantize, calibrate, compile: the first call of ``torch.compile`` included);
    ``size_bytes``: the artifact's files (for in-memory candidates: their weights);
    ``peak_mem_bytes``: peak resident memory above the level before the build, over the
    build and one call (Linux: VmHWM after resetting it via /proc/self/clear_refs; else
    the growth of ``getrusage`` maxrss, which only sees new process-wide peaks);
    ``skipped``: the runtime is not available here (not a failure of the candidate).

    Example::

        built = build(Candidate("torch", "torch"), model, (x,), workdir="out")
        built.fn(x), built.build_s
    """

    candidate: Candidate
    fn: Callable[..., Any] | None
    build_s: float
    size_bytes: int | None = None
    path: str | None = None
    error: str | None = None
    peak_mem_bytes: int | None = None
    skipped: bool = False
    info: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.fn is not None and self.error is None


def error_text(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters.

    Example::

        error_text(ValueError("bad\\nthing"))   # 'ValueError: bad thing'
    """
    text = f"{type(e).__name__}: {' '.join(str(e).split())}"
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


# --------------------------------------------------------------------------- inputs
def with_batch(inputs: Sequence[Any], batch: int | None) -> tuple:
    """``inputs`` with ``batch`` rows in dimension 0 (the example rows repeated, so token
    ids stay valid); ``None`` keeps them as they are.

    Example::

        with_batch((torch.randn(2, 8),), 5)[0].shape   # torch.Size([5, 8])
    """
    if batch is None:
        return tuple(inputs)
    if batch < 1:
        from fxopt.errors import SpecError

        raise SpecError(f"batch must be >= 1, got {batch}")
    out = []
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            reps = -(-batch // x.shape[0])
            x = x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].contiguous()
        out.append(x)
    return tuple(out)


def calibration_batches(inputs: Sequence[Any], count: int = CALIBRATION_BATCHES,
                        seed: int = CALIBRATION_SEED) -> list[tuple]:
    """``count`` random batches shaped like ``inputs``, for static int8 when the user gives
    no data: the zoo's random images (per-image, per-channel offsets) for image inputs,
    ``fxopt.verify.random_like_inputs`` otherwise. A smoke test of calibration, not a data
    set: pass real batches where accuracy matters.

    Example::

        batches = calibration_batches((torch.randn(1, 3, 32, 32),), count=4)
    """
    from fxopt.zoo.registry import _random_images

    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(count):
        rest = random_like_inputs(inputs, seed=seed + i)
        out.append(tuple(
            _random_images(x.shape[0], x.shape[-1], gen).to(x.dtype)
            if (isinstance(x, torch.Tensor) and x.is_floating_point() and x.dim() == 4
                and x.shape[1] == 3) else r
            for x, r in zip(inputs, rest)))
    return out


# --------------------------------------------------------------------------- candidates
INT8 = "default,quantize(scheme=int8,target=ort)"
DYNAMIC_INT8 = "default,quantize(scheme=dynamic_int8,target=ort)"
FP16 = "default,half(dtype=fp16)"
TRT_INT8 = "default,quantize(scheme=int8,target=tensorrt)"


def _linear_heavy(model: nn.Module) -> bool:
    """More weights in Linear layers than in convolutions (transformers, MLPs)."""
    lin = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    conv = sum(m.weight.numel() for m in model.modules()
               if isinstance(m, nn.modules.conv._ConvNd))
    return lin > conv


def default_candidates(model: nn.Module, inputs: Sequence[Any], *, compile: bool = False,
                       calibration: Sequence | None = None) -> list[Candidate]:
    """Every candidate ``fxopt bench`` measures by default, PyTorch eager first (the
    reference for speed-ups): ``torch``, ``torch.compile`` (only with ``compile=True``: it
    takes long), ``fxopt-eager``, ``ort-plain``, ``ort-fxopt-fp32``, ``ort-fxopt-int8``
    (static; calibrated on ``calibration`` or ``calibration_batches``),
    ``ort-fxopt-dynamic_int8`` (models whose weights are mostly Linear), ``ort-fxopt-fp16``,
    ``ort-quantize_static``, ``ort-quantize_dynamic``, ``torch-cuda`` (only where CUDA is
    available) and ``tensorrt-fp32`` / ``tensorrt-fp16`` (the typed graph of ``half``) /
    ``tensorrt-int8`` (Q/DQ placed for TensorRT), skipped with the reason where TensorRT or
    a GPU is missing.

    Example::

        [c.name for c in default_candidates(model, (x,))][:3]
        # ['torch', 'fxopt-eager', 'ort-plain']
    """
    out = [Candidate("torch", "torch")]
    if torch.cuda.is_available():
        out.append(Candidate("torch-cuda", "torch", None, None, (("device", "cuda"),)))
    if compile:
        out.append(Candidate("torch.compile", "torch.compile"))
    out += [
        Candidate("fxopt-eager", "eager", "default"),
        Candidate("ort-plain", "onnx", None, "plain-export"),
        Candidate("ort-fxopt-fp32", "onnx", "default"),
        Candidate("ort-fxopt-int8", "onnx", INT8),
    ]
    if _linear_heavy(model):
        out.append(Candidate("ort-fxopt-dynamic_int8", "onnx", DYNAMIC_INT8))
    out += [
        Candidate("ort-fxopt-fp16", "onnx", FP16),
        Candidate("ort-quantize_static", "onnx", None, "ort-quantize-static"),
        Candidate("ort-quantize_dynamic", "onnx", None, "ort-quantize-dynamic"),
        Candidate("tensorrt-fp32", "tensorrt", "default"),
        Candidate("tensorrt-fp16", "tensorrt", FP16),
        Candidate("tensorrt-int8", "tensorrt", TRT_INT8),
    ]
    return out


# --------------------------------------------------------------------------- memory
def _status_kib(key: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


class _PeakMemory:
    """Peak resident memory of a block above the level when it started (bytes)."""

    def __enter__(self) -> _PeakMemory:
        self.peak: int | None = None
        self._mode = "none"
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
            self._start = _status_kib("VmRSS")
            self._mode = "hwm" if self._start is not None else "none"
        except OSError:
            try:
                import resource

                self._start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
                self._mode = "maxrss"
            except ImportError:  # pragma: no cover - Windows
                pass
        return self

    def __exit__(self, *exc: object) -> None:
        if self._mode == "hwm":
            hwm = _status_kib("VmHWM")
            self.peak = None if hwm is None else max(hwm - self._start, 0) * 1024
        elif self._mode == "maxrss":
            import resource

            grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - self._start
            self.peak = max(grown, 0) * 1024


# --------------------------------------------------------------------------- building
def _weights_bytes(model: nn.Module) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def _files_bytes(path: Path) -> int:
    if path.is_file():
        extra = [Path(f"{path}{s}") for s in (".data", ".json")]  # external data, manifest
        return path.stat().st_size + sum(p.stat().st_size for p in extra if p.is_file())
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _optimized(cand: Candidate, model: nn.Module, inputs: tuple,
               calibration: Sequence | None, info: dict | None = None) -> torch.fx.GraphModule:
    """``cand``'s pipeline run on ``model``; a ``finetune`` stage trains on
    ``info["train_data"]`` (the original model as teacher) and leaves its steps, stop
    reason and last loss in ``info["finetune"]``."""
    import fxopt

    needs_data = "quantize" in (cand.pipeline or "")
    batches = None
    if needs_data:
        batches = list(calibration) if calibration is not None else calibration_batches(inputs)
    info = {} if info is None else info
    res = fxopt.optimize(model, inputs, cand.pipeline, calibration=batches,
                         tolerance={"approximate": LOOSE}, train_data=info.get("train_data"))
    for rec in res.report.records:
        if rec.name == "finetune":
            last = rec.stats["history"][-1] if rec.stats["history"] else {}
            info["finetune"] = {"steps": rec.stats["steps"], "stop": rec.stats["stop"],
                                "seconds": rec.seconds, "loss": last.get("loss"),
                                "threads": torch.get_num_threads()}
    return res.module.eval()


def _fingerprint(model: nn.Module, inputs: tuple) -> str:
    """Which model and inputs a shared plain export belongs to (class, weights, shapes)."""
    with torch.no_grad():
        parts = [type(model).__qualname__,
                 *(f"{tuple(x.shape)}{x.dtype}" for x in inputs if isinstance(x, torch.Tensor)),
                 *(f"{n}{tuple(t.shape)}{float(t.double().sum()):.10g}"
                   for n, t in model.state_dict().items() if t.is_floating_point())]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


def _plain(model: nn.Module, inputs: tuple, workdir: Path, dynamic_batch: bool
           ) -> tuple[Path, float, bool]:
    """The plain export, shared by the baselines of one workdir (its export time is kept
    beside it, so every baseline's build time includes it)."""
    from fxopt.bench.onnx_runtime import plain_export

    sig = _fingerprint(model, inputs) + ("-dynamic" if dynamic_batch else "")
    path, meta = workdir / f"plain-export-{sig}.onnx", workdir / f"plain-export-{sig}.json"
    if path.is_file() and meta.is_file():
        return path, json.loads(meta.read_text())["export_s"], True
    start = time.perf_counter()
    plain_export(model, inputs, path, dynamic_batch=dynamic_batch)
    export_s = time.perf_counter() - start
    meta.write_text(json.dumps({"export_s": export_s}))
    return path, export_s, False


def _build_onnx(cand: Candidate, model: nn.Module, inputs: tuple, workdir: Path,
                calibration: Sequence | None, threads: int, info: dict) -> tuple[Any, Path]:
    from fxopt.bench import onnx_runtime as ortb

    path = workdir / f"{cand.name}-{cand.key()}.onnx"
    if cand.baseline is None:
        import fxopt

        gm = _optimized(cand, model, inputs, calibration, info)
        # static shapes like the plain peer's, unless asked (validation batches of
        # another size): measured at one batch, and exported in half the time
        fxopt.lower(gm, "onnx", inputs, path=path, tolerance=LOOSE,
                    dynamic=bool(cand.option("dynamic_batch")))
    else:
        plain, info["plain_export_s"], info["plain_reused"] = _plain(
            model, inputs, workdir, bool(cand.option("dynamic_batch")))
        if cand.baseline == "plain-export":
            path = plain
        elif cand.baseline == "ort-quantize-static":
            batches = list(calibration) if calibration is not None else calibration_batches(inputs)
            info["pre_process"] = ortb.ort_quantize_static(plain, path, batches, workdir=workdir)
        else:
            ortb.ort_quantize_dynamic(plain, path)
    return ortb.OrtRunner(path, cand.option("threads", threads)), path


def _tensorrt_missing() -> str | None:
    """Why the TensorRT candidate cannot run here (None: it can)."""
    import importlib.util

    from fxopt.lowering import targets

    if importlib.util.find_spec("tensorrt") is None:
        return ("TensorRT is not installed (pip install 'fxopt[tensorrt]'; needs an NVIDIA "
                "GPU)")
    if not torch.cuda.is_available():
        return "no CUDA GPU here (torch.cuda.is_available() is False); TensorRT needs one"
    if "tensorrt" not in targets():
        return "this fxopt has no 'tensorrt' lowering target registered"
    return None


def _build_fn(cand: Candidate, model: nn.Module, inputs: tuple, workdir: Path,
              calibration: Sequence | None, threads: int, info: dict
              ) -> tuple[Callable[..., Any], Path | None, int | None]:
    import fxopt

    if cand.runtime == "torch":
        base = _optimized(cand, model, inputs, calibration, info) if cand.pipeline else model
        device = dict(cand.options).get("device")
        if device is not None:
            return _on_device(base, device), None, _weights_bytes(base)
        return base, None, _weights_bytes(base)
    if cand.runtime == "torch.compile":
        base = _optimized(cand, model, inputs, calibration, info) if cand.pipeline else model
        return torch.compile(base), None, _weights_bytes(base)
    if cand.runtime == "eager":
        path = workdir / f"{cand.name}-{cand.key()}"
        gm = _optimized(cand, model, inputs, calibration, info)
        fxopt.lower(gm, "eager", inputs, path=path)
        return fxopt.load(path).module, path, _files_bytes(path)
    if cand.runtime == "onnx":
        fn, path = _build_onnx(cand, model, inputs, workdir, calibration, threads, info)
        return fn, path, _files_bytes(path)
    # tensorrt: through fxopt's lowering target, registered by its optional backend
    path = workdir / f"{cand.name}-{cand.key()}.engine"
    gm = _optimized(cand, model, inputs, calibration, info)
    art = fxopt.lower(gm, "tensorrt", inputs, path=path, tolerance=LOOSE,
                      **{k: v for k, v in cand.options if k not in ("threads", "dynamic_batch")})
    return art, path, _files_bytes(path)


def _on_device(module: nn.Module, device: str) -> Callable[..., Any]:
    """``module`` on ``device``, called with CPU inputs: they are copied over per call and
    the outputs copied back (the copy back also waits for the device's work, so timing
    sees the whole call)."""
    import copy

    moved = copy.deepcopy(module).to(device)

    def to(obj, dev):
        return pytree.tree_map(lambda t: t.to(dev) if isinstance(t, torch.Tensor) else t, obj)

    def call(*args):
        with torch.no_grad():
            return to(moved(*to(args, device)), "cpu")

    return call


def build(candidate: Candidate, model: nn.Module, inputs: Sequence[Any], *,
          workdir: str | os.PathLike, calibration: Sequence | None = None,
          threads: int | None = None, train_data: Any = None) -> Built:
    """Build ``candidate`` for ``model`` on ``inputs`` in ``workdir`` (files go there) and
    call it once. Never raises for a candidate that fails: ``Built.error`` holds the
    exception type and message (``Built.skipped``: its runtime is not installed).
    ``calibration``: batches for static int8 (default: ``calibration_batches(inputs)``);
    ``threads``: ONNX Runtime intra-op threads (default: torch's current count);
    ``train_data``: what a ``finetune(...)`` stage in the pipeline trains on (its steps and
    stop reason land in ``Built.info["finetune"]``).

    Example::

        built = build(Candidate("ort-plain", "onnx", None, "plain-export"), model, (x,),
                      workdir="out")
        built.fn(x) if built.ok else print(built.error)
    """
    inputs = tuple(inputs)
    workdir = Path(workdir)
    threads = threads or torch.get_num_threads()
    info: dict = {"train_data": train_data} if train_data is not None else {}
    if candidate.runtime == "tensorrt":
        why = _tensorrt_missing()
        if why is not None:
            return Built(candidate, None, 0.0, error=why, skipped=True)
    model = model.eval()
    start = time.perf_counter()
    fn = path = size = None
    error = None
    with _PeakMemory() as mem:
        try:
            workdir.mkdir(parents=True, exist_ok=True)
            fn, path, size = _build_fn(candidate, model, inputs, workdir, calibration,
                                       threads, info)
            with torch.inference_mode():
                fn(*inputs)  # the first call: lazy init (torch.compile compiles here)
        except Exception as e:  # noqa: BLE001 - a failed candidate is a row, not a crash
            error, fn = error_text(e), None
    build_s = time.perf_counter() - start
    if info.get("plain_reused"):
        build_s += info["plain_export_s"]  # the shared export, timed when it was made
    info.pop("train_data", None)
    return Built(candidate, fn, build_s, size, None if path is None else str(path), error,
                 mem.peak, info=info)
