"""Run a serialized TensorRT engine with torch tensors: buffers and the CUDA stream come
from torch (no pycuda).

Per call the runner checks the inputs (count, dtype, rank, static dims, and that every
dynamic dim lies within one of the engine's optimization profiles), copies CPU inputs to
the GPU, calls ``set_input_shape`` for each input, allocates each output for the shape
TensorRT reports after that (``get_tensor_shape``), binds every buffer with
``set_tensor_address`` and enqueues ``execute_async_v3`` on torch's current stream. CPU
inputs give CPU outputs; CUDA inputs give CUDA outputs, ordered on the current stream.

An engine runs only under the TensorRT version and on the GPU architecture it was built
for: ``check_compatible`` compares the manifest with what is running here and says what
to rebuild before TensorRT gets to fail on it.

Example::

    trt = import_tensorrt()
    runner = TrtRunner(trt, Path("m.engine").read_bytes(), cuda_device(), "m.engine")
    y, = runner(torch.randn(4, 3, 32, 32))
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import torch

from fxopt.errors import ArtifactVersionError, InputSpecError, LoweringError
from fxopt.lowering.input_spec import check_inputs
from fxopt.lowering.trt_config import INSTALL_HINT, trt_version

# tensorrt.DataType member names -> torch dtypes
TORCH_DTYPES = {
    "FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16,
    "INT8": torch.int8, "UINT8": torch.uint8, "INT32": torch.int32, "INT64": torch.int64,
    "BOOL": torch.bool,
}


def import_tensorrt() -> ModuleType:
    """The ``tensorrt`` module, imported only here (``import fxopt`` never imports it).

    >>> trt = import_tensorrt()  # doctest: +SKIP
    """
    try:
        import tensorrt
    except ImportError as e:
        raise LoweringError(
            f"the tensorrt target needs NVIDIA TensorRT 10 or 11, which is not installed here "
            f"({e}); install it with {INSTALL_HINT} on a machine with an NVIDIA GPU and its "
            "CUDA driver (or export ONNX instead: fxopt.lower(gm, 'onnx', ...))") from e
    trt_version(getattr(tensorrt, "__version__", "?"))
    return tensorrt


def cuda_device(device: Any = None) -> torch.device:
    """The CUDA device engines are built and run on (``device`` or torch's current one).

    >>> cuda_device()  # doctest: +SKIP
    device(type='cuda', index=0)
    """
    if not torch.cuda.is_available():
        raise LoweringError(
            "TensorRT builds and runs engines on an NVIDIA GPU, and torch sees none here "
            "(torch.cuda.is_available() is False): use a machine with a CUDA GPU and a CUDA "
            "build of torch (pip install torch --index-url https://download.pytorch.org/whl/"
            "cu124), or export ONNX instead: fxopt.lower(gm, 'onnx', ...)")
    dev = torch.device(device if device is not None else "cuda")
    if dev.type != "cuda":
        raise LoweringError(f"device={device!r}: TensorRT engines run on CUDA devices only")
    return torch.device("cuda", dev.index if dev.index is not None else torch.cuda.current_device())


def gpu_info(device: torch.device) -> dict:
    """``{"name": ..., "compute_capability": "9.0"}`` of ``device`` (what an engine is for)."""
    major, minor = torch.cuda.get_device_capability(device)
    return {"name": torch.cuda.get_device_name(device), "compute_capability": f"{major}.{minor}"}


def _release(version: str) -> str:
    return ".".join(str(version).split(".")[:3])


def check_compatible(manifest: dict, where: str, running_trt: str, gpu: dict) -> None:
    """Raise ArtifactVersionError when the engine at ``where`` was built for another
    TensorRT release (major.minor.patch) or another GPU architecture than ``gpu``.

    >>> check_compatible({"tensorrt": "10.7.0.23", "gpu": {"compute_capability": "9.0"}},
    ...                  "m.engine", "10.7.0.23", {"name": "H100", "compute_capability": "9.0"})
    """
    built, built_gpu = manifest.get("tensorrt"), manifest.get("gpu") or {}
    here = f"TensorRT {running_trt} on {gpu.get('name')} (sm {gpu.get('compute_capability')})"
    there = (f"TensorRT {built} for {built_gpu.get('name')} "
             f"(sm {built_gpu.get('compute_capability')})")
    rebuild = (f"rebuild it here with fxopt.lower(gm, 'tensorrt', inputs, path={where!r}, ...) "
               "from the same graph")
    if built and _release(built) != _release(running_trt):
        raise ArtifactVersionError(
            f"{where} was built with {there}; this is {here}. TensorRT engines run only under "
            f"the TensorRT release that built them: {rebuild}, or install "
            f"tensorrt=={_release(built)}")
    cc = built_gpu.get("compute_capability")
    if cc and cc != gpu.get("compute_capability"):
        raise ArtifactVersionError(
            f"{where} was built with {there}; this is {here}. A TensorRT engine runs only on "
            f"the GPU architecture it was built for: {rebuild}, or run it on an sm {cc} GPU")


@functools.cache
def _logger_class(trt: ModuleType) -> type:
    class _Logger(trt.ILogger):
        """Collects TensorRT's messages: errors and warnings go into the manifest."""

        def __init__(self) -> None:
            trt.ILogger.__init__(self)
            # bounded: a runner's logger lives as long as its engine, and TensorRT may warn
            # on every execute (e.g. about the default stream)
            self.messages: collections.deque[tuple[str, str]] = collections.deque(maxlen=500)

        def log(self, severity: Any, msg: str) -> None:
            name = getattr(severity, "name", str(severity)).upper()
            if int(severity) <= int(trt.ILogger.Severity.WARNING):
                self.messages.append((name, str(msg)))

        def of(self, *severities: str) -> list[str]:
            return [m for s, m in self.messages if s in severities]

    return _Logger


def make_logger(trt: ModuleType) -> Any:
    """A ``tensorrt.ILogger`` that collects errors and warnings (``.of("WARNING")``)."""
    return _logger_class(trt)()


@dataclass(frozen=True)
class TensorIO:
    """One engine I/O tensor: its torch dtype, engine shape (-1 for dynamic dims) and, for
    inputs, (min, max) per dim per optimization profile."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    ranges: tuple[tuple[tuple[int, int], ...], ...] = ()


def engine_io(trt: ModuleType, engine: Any) -> tuple[list[TensorIO], list[TensorIO]]:
    """(inputs, outputs) of a deserialized engine, by TensorRT's name-based tensor API."""
    inputs, outputs = [], []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        dt = engine.get_tensor_dtype(name)
        dtype = TORCH_DTYPES.get(getattr(dt, "name", str(dt)).upper().removeprefix("DATATYPE."))
        if dtype is None:
            raise LoweringError(f"engine tensor {name!r} has TensorRT type {dt}, which fxopt's "
                                "runner cannot hold in a torch tensor")
        shape = tuple(int(d) for d in engine.get_tensor_shape(name))
        if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
            ranges = tuple(_profile_ranges(engine, name, shape))
            inputs.append(TensorIO(name, dtype, shape, ranges))
        else:
            outputs.append(TensorIO(name, dtype, shape))
    return inputs, outputs


def _profile_ranges(engine: Any, name: str, shape: tuple[int, ...]):
    if -1 not in shape:
        yield tuple((d, d) for d in shape)
        return
    for k in range(engine.num_optimization_profiles):
        lo, _, hi = (tuple(int(d) for d in s) for s in engine.get_tensor_profile_shape(name, k))
        yield tuple(zip(lo, hi))


def on_device(device: torch.device) -> Any:
    """``with on_device(dev):`` makes ``dev`` torch's (and so TensorRT's) current device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _stream_handle(device: torch.device) -> int:
    return torch.cuda.current_stream(device).cuda_stream


def _synchronize(device: torch.device) -> None:
    torch.cuda.current_stream(device).synchronize()


class TrtRunner:
    """Deserializes an engine on ``device`` and runs it: ``runner(*tensors) -> [outputs]``.

    ``specs`` (the manifest's input spec: names, dtypes, dims with their names) makes the
    errors name the dynamic dims; without it the engine's own I/O description is used.

    >>> runner = TrtRunner(trt, plan_bytes, cuda_device(), "m.engine")  # doctest: +SKIP
    >>> runner(torch.randn(2, 3, 32, 32))[0].shape  # doctest: +SKIP
    torch.Size([2, 10])
    """

    def __init__(self, trt: ModuleType, plan: bytes, device: torch.device, where: str,
                 specs: Sequence[dict] | None = None) -> None:
        self.trt, self.device, self.where = trt, device, where
        self.logger = make_logger(trt)
        self.runtime = trt.Runtime(self.logger)
        with on_device(device):
            self.engine = self.runtime.deserialize_cuda_engine(bytes(plan))
        if self.engine is None:
            errors = "; ".join(self.logger.of("ERROR", "INTERNAL_ERROR"))[:600]
            raise LoweringError(
                f"TensorRT {trt.__version__} cannot deserialize {where} "
                f"({errors or 'no reason given'}): it was built by another TensorRT release or "
                "for another GPU, or it is damaged; rebuild it here with "
                "fxopt.lower(gm, 'tensorrt', ...)")
        with on_device(device):
            self.context = self.engine.create_execution_context()
        self.inputs, self.outputs = engine_io(trt, self.engine)
        self.specs = list(specs) if specs else [
            {"name": t.name, "dtype": str(t.dtype).removeprefix("torch."),
             "shape": [d if d >= 0 else None for d in t.shape]} for t in self.inputs]
        self.profile = 0

    def check(self, inputs: Sequence[Any]) -> int:
        """Raise InputSpecError unless ``inputs`` fit; return the profile they fall in."""
        check_inputs(self.specs, inputs, self.where)
        n_profiles = max(len(t.ranges) for t in self.inputs) if self.inputs else 1
        for k in [self.profile, *(k for k in range(n_profiles) if k != self.profile)]:
            if all(_fits(tuple(x.shape), t.ranges[min(k, len(t.ranges) - 1)])
                   for t, x in zip(self.inputs, inputs)):
                return k
        bad_input = next(((t, x) for t, x in zip(self.inputs, inputs)
                          if not any(_fits(tuple(x.shape), r) for r in t.ranges)), None)
        if bad_input is None:
            shapes = ", ".join(f"{t.name}={tuple(x.shape)}" for t, x in zip(self.inputs, inputs))
            raise InputSpecError(f"{self.where}: the input shapes ({shapes}) each fit some "
                                 "optimization profile, but no single profile fits them all")
        t, x = bad_input
        spec = next((s for s in self.specs if s["name"] == t.name), {"shape": []})
        bad = []
        for axis, size in enumerate(x.shape):
            spans = [r[axis] for r in t.ranges]
            if not any(lo <= size <= hi for lo, hi in spans):
                dim = spec["shape"][axis] if axis < len(spec["shape"]) else None
                label = f"{dim!r} " if isinstance(dim, str) else ""
                allowed = " or ".join(f"{lo}..{hi}" for lo, hi in spans)
                hint = (f"; rebuild with dim_bounds={{{dim!r}: (min, opt, max)}} covering "
                        f"{size}") if isinstance(dim, str) else ""
                bad.append(f"dim {axis} {label}= {size} is outside the engine's optimization "
                           f"profile{'s' * (len(spans) > 1)} ({allowed}){hint}")
        raise InputSpecError(f"{self.where}: input {t.name!r} has shape {tuple(x.shape)}: "
                             + "; ".join(bad))

    def __call__(self, *inputs: Any) -> list[torch.Tensor]:
        inputs = tuple(torch.from_numpy(np.ascontiguousarray(x)) if isinstance(x, np.ndarray)
                       else x for x in inputs)
        profile = self.check(inputs)
        on_gpu = any(isinstance(x, torch.Tensor) and x.device.type == "cuda" for x in inputs)
        with on_device(self.device):
            return self._run(inputs, profile, on_gpu)

    def _run(self, inputs: tuple, profile: int, on_gpu: bool) -> list[torch.Tensor]:
        stream = _stream_handle(self.device)
        ctx = self.context
        if profile != self.profile:
            ctx.set_optimization_profile_async(profile, stream)
            self.profile = profile
        feeds = [x.detach().to(self.device, non_blocking=True).contiguous() for x in inputs]
        for t, x in zip(self.inputs, feeds):
            if not ctx.set_input_shape(t.name, tuple(x.shape)):
                raise InputSpecError(f"{self.where}: TensorRT refused shape {tuple(x.shape)} "
                                     f"for input {t.name!r}")
            ctx.set_tensor_address(t.name, x.data_ptr())
        outs = []
        for t in self.outputs:
            shape = tuple(int(d) for d in ctx.get_tensor_shape(t.name))
            if any(d < 0 for d in shape):
                raise LoweringError(f"{self.where}: output {t.name!r} has a data-dependent shape "
                                    f"{shape}, which fxopt's runner does not allocate")
            out = torch.empty(shape, dtype=t.dtype, device=self.device)
            ctx.set_tensor_address(t.name, out.data_ptr())
            outs.append(out)
        if not ctx.execute_async_v3(stream):
            errors = "; ".join(self.logger.of("ERROR", "INTERNAL_ERROR"))[:600]
            raise LoweringError(f"{self.where}: TensorRT failed to run the engine "
                                f"({errors or 'execute_async_v3 returned False'})")
        if not on_gpu:
            _synchronize(self.device)
            outs = [o.cpu() for o in outs]
        return outs


def _fits(shape: tuple[int, ...], ranges: tuple[tuple[int, int], ...]) -> bool:
    return len(shape) == len(ranges) and all(lo <= s <= hi for s, (lo, hi) in zip(shape, ranges))


__all__ = ["TORCH_DTYPES", "TensorIO", "TrtRunner", "check_compatible", "cuda_device",
           "engine_io", "gpu_info", "import_tensorrt", "make_logger", "on_device"]
