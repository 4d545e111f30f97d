"""A fake ``tensorrt`` module for CPU tests: it records every builder / config / network /
parser / context call and "builds" engines that run the parsed ONNX graph in ONNX Runtime.

It follows the TensorRT 10/11 Python API that fxopt uses (names, argument order, return
values) so the backend's decisions can be checked without TensorRT: ``make(version)``
returns a fresh module; ``TensorRT 11`` has no FP16/INT8/BF16 builder flags. The fake
context reads and writes tensors at the addresses it is given (``set_tensor_address``)
with ctypes, so tests that run it must hand it CPU memory (the real runner hands CUDA
memory; that path runs only in tests/gpu).

Knobs on the module: ``parse_errors`` (list of (node_name, op, desc)) makes the parser
fail; ``build_fails`` makes ``build_serialized_network`` return None; ``output_offset``
adds a constant to every output (a wrong engine); ``calls`` lists every recorded call.
"""

from __future__ import annotations

import ctypes
import enum
import importlib.machinery
import json
import types

import numpy as np
import onnx
import onnxruntime as ort

_NP = {onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16,
       onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32,
       onnx.TensorProto.INT8: np.int8, onnx.TensorProto.UINT8: np.uint8,
       onnx.TensorProto.BOOL: np.bool_}
_TRT_NAMES = {onnx.TensorProto.FLOAT: "FLOAT", onnx.TensorProto.FLOAT16: "HALF",
              onnx.TensorProto.INT64: "INT64", onnx.TensorProto.INT32: "INT32",
              onnx.TensorProto.INT8: "INT8", onnx.TensorProto.UINT8: "UINT8",
              onnx.TensorProto.BOOL: "BOOL"}
MAGIC = b"FAKETRT\n"


def make(version: str = "10.7.0.23") -> types.ModuleType:
    """A fresh fake ``tensorrt`` module reporting ``version``."""
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version
    # importlib.util.find_spec("tensorrt") (torch asks it) needs a spec on a module in sys.modules
    trt.__spec__ = importlib.machinery.ModuleSpec("tensorrt", None)
    major = int(version.split(".")[0])
    trt.calls = []
    trt.parse_errors = []
    trt.build_fails = False
    trt.output_offset = 0.0

    def record(what, *args):
        trt.calls.append((what, *args))

    class Severity(enum.IntEnum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4

    class ILogger:
        def __init__(self):
            self.inited = True

    ILogger.Severity = Severity
    trt.ILogger = ILogger

    class IProgressMonitor:
        def __init__(self):
            self.inited = True

    trt.IProgressMonitor = IProgressMonitor
    trt.NetworkDefinitionCreationFlag = enum.IntEnum(
        "NetworkDefinitionCreationFlag",
        {"STRONGLY_TYPED": 0} if major >= 11 else {"EXPLICIT_BATCH": 0, "STRONGLY_TYPED": 1})
    flags = ["DEBUG", "GPU_FALLBACK", "REFIT", "DISABLE_TIMING_CACHE", "TF32", "SPARSE_WEIGHTS"]
    if major < 11:
        flags = ["FP16", "INT8", *flags, "BF16", "FP8", "OBEY_PRECISION_CONSTRAINTS"]
    trt.BuilderFlag = enum.IntEnum("BuilderFlag", {n: i for i, n in enumerate(flags)})
    trt.MemoryPoolType = enum.IntEnum("MemoryPoolType", {"WORKSPACE": 0})
    trt.DataType = enum.IntEnum("DataType", {n: i for i, n in enumerate(
        ["FLOAT", "HALF", "INT8", "INT32", "BOOL", "UINT8", "BF16", "INT64"])})
    trt.TensorIOMode = enum.IntEnum("TensorIOMode", {"NONE": 0, "INPUT": 1, "OUTPUT": 2})

    class Network:
        def __init__(self, flags):
            self.flags, self.model = flags, None

    class ParserError:
        def __init__(self, k, node, op, desc):
            self.k, self._node, self._op, self._desc = k, node, op, desc

        def desc(self):
            return self._desc

        def node(self):
            return self.k

        def node_name(self):
            return self._node

        def node_operator(self):
            return self._op

        def code(self):
            return 8

    class OnnxParser:
        def __init__(self, network, logger):
            self.network, self.logger, self.errors = network, logger, []

        def parse_from_file(self, path):
            record("parse_from_file", path)
            if trt.parse_errors:
                self.errors = [ParserError(k, *e) for k, e in enumerate(trt.parse_errors)]
                return False
            self.network.model = onnx.load(path).SerializeToString()
            return True

        @property
        def num_errors(self):
            return len(self.errors)

        def get_error(self, i):
            return self.errors[i]

    class TimingCache:
        def __init__(self, data):
            self.data = bytes(data)

        def serialize(self):
            return memoryview(f"FAKECACHE {trt.__version__} built".encode())

    class Profile:
        def __init__(self):
            self.shapes = {}

        def set_shape(self, name, mn, opt, mx):
            record("set_shape", name, list(mn), list(opt), list(mx))
            self.shapes[name] = [list(mn), list(opt), list(mx)]

    class Config:
        def __init__(self):
            self.flags = {trt.BuilderFlag.TF32}  # on by default, as in TensorRT
            self.profiles, self.pool, self.cache = [], {}, None
            self.builder_optimization_level = 3
            self.progress_monitor = None

        def set_memory_pool_limit(self, pool, size):
            record("set_memory_pool_limit", pool.name, size)
            self.pool[pool.name] = size

        def set_flag(self, flag):
            record("set_flag", flag.name)
            self.flags.add(flag)

        def clear_flag(self, flag):
            record("clear_flag", flag.name)
            self.flags.discard(flag)

        def add_optimization_profile(self, profile):
            self.profiles.append(profile)
            return len(self.profiles) - 1

        def create_timing_cache(self, data):
            record("create_timing_cache", bytes(data))
            return TimingCache(data)

        def set_timing_cache(self, cache, ignore_mismatch):
            ok = not cache.data or cache.data.startswith(f"FAKECACHE {trt.__version__}".encode())
            record("set_timing_cache", cache.data, ignore_mismatch, ok)
            if ok:
                self.cache = cache
            return ok

        def get_timing_cache(self):
            return self.cache

    class Builder:
        def __init__(self, logger):
            self.logger = logger

        def create_network(self, flags):
            record("create_network", flags)
            return Network(flags)

        def create_builder_config(self):
            return Config()

        def create_optimization_profile(self):
            return Profile()

        def build_serialized_network(self, network, config):
            record("build", network.flags, sorted(f.name for f in config.flags),
                   config.builder_optimization_level, len(config.profiles))
            m = config.progress_monitor
            record("progress_monitor", type(m).__name__ if m is not None else None)
            if m is not None:
                m.phase_start("Building engine", None, 2)
                for step in range(2):
                    assert m.step_complete("Building engine", step) is True
                m.phase_finish("Building engine")
            self.logger.log(Severity.WARNING, "fake: weights cast from INT64 to INT32")
            self.logger.log(Severity.INFO, "fake: info messages are not collected")
            if trt.build_fails:
                self.logger.log(Severity.ERROR, "fake: out of workspace memory")
                return None
            header = {"version": trt.__version__, "profiles": [p.shapes for p in config.profiles]}
            return memoryview(MAGIC + json.dumps(header).encode() + b"\n" + network.model)

    class Runtime:
        def __init__(self, logger):
            self.logger = logger

        def deserialize_cuda_engine(self, data):
            record("deserialize")
            if not data.startswith(MAGIC):
                self.logger.log(Severity.ERROR, "fake: not an engine")
                return None
            head, model = data[len(MAGIC):].split(b"\n", 1)
            header = json.loads(head)
            if header["version"] != trt.__version__:
                self.logger.log(Severity.ERROR, "fake: serialized by another version")
                return None
            return Engine(header, model)

    class Engine:
        def __init__(self, header, model):
            self.header = header
            self.session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
            proto = onnx.load_from_string(model)
            inits = {i.name for i in proto.graph.initializer}
            self.io = [(v, trt.TensorIOMode.INPUT) for v in proto.graph.input
                       if v.name not in inits]
            self.io += [(v, trt.TensorIOMode.OUTPUT) for v in proto.graph.output]

        @property
        def num_io_tensors(self):
            return len(self.io)

        @property
        def num_optimization_profiles(self):
            return max(1, len(self.header["profiles"]))

        def _vi(self, name):
            return next(v for v, _ in self.io if v.name == name)

        def get_tensor_name(self, i):
            return self.io[i][0].name

        def get_tensor_mode(self, name):
            return next(m for v, m in self.io if v.name == name)

        def get_tensor_dtype(self, name):
            return trt.DataType[_TRT_NAMES[self._vi(name).type.tensor_type.elem_type]]

        def get_tensor_shape(self, name):
            return [d.dim_value if d.HasField("dim_value") else -1
                    for d in self._vi(name).type.tensor_type.shape.dim]

        def get_tensor_profile_shape(self, name, k):
            return self.header["profiles"][k][name]

        def create_execution_context(self):
            return Context(self)

    class Context:
        def __init__(self, engine):
            self.engine, self.shapes, self.addresses = engine, {}, {}

        def set_optimization_profile_async(self, k, stream):
            record("set_optimization_profile_async", k)
            return True

        def set_input_shape(self, name, shape):
            record("set_input_shape", name, tuple(shape))
            self.shapes[name] = tuple(shape)
            return True

        def _feeds(self, zeros):
            feeds = {}
            for v, mode in self.engine.io:
                if mode != trt.TensorIOMode.INPUT:
                    continue
                dt, shape = np.dtype(_NP[v.type.tensor_type.elem_type]), self.shapes[v.name]
                if zeros:
                    feeds[v.name] = np.zeros(shape, dt)
                else:
                    n = int(np.prod(shape)) * dt.itemsize
                    raw = (ctypes.c_byte * n).from_address(self.addresses[v.name])
                    feeds[v.name] = np.frombuffer(bytes(raw), dt).reshape(shape)
            return feeds

        def get_tensor_shape(self, name):
            outs = self.engine.session.run([name], self._feeds(zeros=True))
            return list(outs[0].shape)

        def set_tensor_address(self, name, ptr):
            self.addresses[name] = ptr
            return True

        def execute_async_v3(self, stream):
            record("execute_async_v3", stream)
            names = [v.name for v, m in self.engine.io if m == trt.TensorIOMode.OUTPUT]
            outs = self.engine.session.run(names, self._feeds(zeros=False))
            for name, out in zip(names, outs):
                out = np.ascontiguousarray(out)
                if out.dtype.kind == "f":
                    out = (out + trt.output_offset).astype(out.dtype)
                ctypes.memmove(self.addresses[name], out.ctypes.data, out.nbytes)
            return True

    trt.Builder, trt.OnnxParser, trt.Runtime = Builder, OnnxParser, Runtime
    return trt
