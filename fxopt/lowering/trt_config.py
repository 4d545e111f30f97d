"""Every TensorRT build decision as a pure function of plain data (testable without TensorRT).

``fxopt.lowering.tensorrt`` asks these functions what to do and then does exactly that:

- ``trt_version(tensorrt.__version__)``: which major version (10 or 11) the rules follow;
- ``parse_workspace("4GiB")``: the workspace memory-pool limit in bytes;
- ``onnx_inputs(model)`` + ``derive_profiles(inputs, dim_bounds)``: one optimization profile
  per ``dim_bounds`` mapping, with (min, opt, max) shapes for every input, and a typed error
  naming each dynamic dim that has no bounds;
- ``graph_precision(model)`` + ``decide_precision(graph, requested, version)``: the network
  creation flags (``STRONGLY_TYPED`` when the graph's types carry the precision), the
  builder flags (TensorRT 10's classic ``FP16`` / ``INT8`` for a request the graph does
  not carry) and the tolerance the engine is verified with; TensorRT 11 has no precision
  flags, so such a request is refused (``TrtPrecisionError``), never built as fp32;
- ``check_optimization_level`` and ``timing_cache_plan``: the builder's effort and whether
  a timing cache file is reused and updated.

Example::

    v = trt_version("10.7.0.23")                                     # 10
    profiles = derive_profiles(onnx_inputs(model), {"batch": (1, 8, 32)})
    plan = decide_precision(graph_precision(model), "fp16", v)
    plan.network_flags, plan.builder_flags                           # (), ("FP16",)
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import onnx

from fxopt.errors import LoweringError
from fxopt.verify import EXACT, HALF_BF16, HALF_FP16, QUANTIZED, Tolerance, loosest

SUPPORTED_MAJORS = (10, 11)
INSTALL_HINT = "pip install 'fxopt[tensorrt]'"
PRECISIONS = ("fp32", "tf32", "fp16", "bf16", "int8")
OPTIMIZATION_LEVELS = range(0, 6)  # builder_optimization_level: 0 (fastest build) .. 5
DEFAULT_OPTIMIZATION_LEVEL = 3  # TensorRT's own default
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9,
          "gb": 10**9, "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30,
          "tib": 2**40}
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32", onnx.TensorProto.FLOAT16: "float16",
    onnx.TensorProto.BFLOAT16: "bfloat16", onnx.TensorProto.DOUBLE: "float64",
    onnx.TensorProto.INT64: "int64", onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.INT8: "int8", onnx.TensorProto.UINT8: "uint8",
    onnx.TensorProto.BOOL: "bool",
}
_FLOAT_NAMES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


class TrtConfigError(LoweringError):
    """A TensorRT build option that cannot be honoured (bad value, missing bounds)."""


class TrtPrecisionError(TrtConfigError):
    """A precision the graph does not carry and this TensorRT cannot add by itself."""


# --------------------------------------------------------------------------- version


def trt_version(version: str) -> int:
    """The major version of ``tensorrt.__version__`` whose build rules apply.

    >>> trt_version("10.7.0.23"), trt_version("11.1.0")
    (10, 11)
    """
    m = re.match(r"\s*(\d+)\.(\d+)", str(version))
    if m is None:
        raise TrtConfigError(f"cannot read the TensorRT version {version!r}; reinstall TensorRT "
                             f"({INSTALL_HINT})")
    major = int(m.group(1))
    if major not in SUPPORTED_MAJORS:
        raise TrtConfigError(
            f"TensorRT {version} is not supported; fxopt builds with TensorRT "
            f"{' or '.join(map(str, SUPPORTED_MAJORS))} ({INSTALL_HINT}, or pip install "
            "'tensorrt>=10,<12')")
    return major


# --------------------------------------------------------------------------- workspace


def parse_workspace(value: int | str | None) -> int | None:
    """The workspace pool limit in bytes: an int, or a string with a unit (``"4GiB"``,
    ``"512 MiB"``, ``"1.5GB"``); None leaves TensorRT's default (the device's memory).

    >>> parse_workspace("4GiB"), parse_workspace("512MB"), parse_workspace(None)
    (4294967296, 512000000, None)
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise TrtConfigError(f"workspace={value!r}: give bytes or a size like '4GiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*",
                                                        value)):
        unit = m.group(2).lower()
        if unit not in _UNITS:
            raise TrtConfigError(f"workspace={value!r}: unknown unit {m.group(2)!r}; use B, KB, "
                                 "MB, GB, KiB, MiB or GiB (e.g. '4GiB')")
        size = int(float(m.group(1)) * _UNITS[unit])
    else:
        raise TrtConfigError(f"workspace={value!r}: give bytes or a size like '4GiB'")
    if size <= 0:
        raise TrtConfigError(f"workspace={value!r} must be positive, e.g. '4GiB'")
    return size


def check_optimization_level(level: Any) -> int:
    """``builder_optimization_level``: an int 0 (fastest build) .. 5 (most tactics).

    >>> check_optimization_level(3)
    3
    """
    if isinstance(level, bool) or not isinstance(level, int) or level not in OPTIMIZATION_LEVELS:
        raise TrtConfigError(f"optimization_level={level!r}: use an integer 0..5 (TensorRT's "
                             f"default is {DEFAULT_OPTIMIZATION_LEVEL}; higher builds longer)")
    return level


# --------------------------------------------------------------------------- profiles


@dataclass(frozen=True)
class TensorSpec:
    """One engine input: ``shape`` holds ints (static) and dim names (dynamic); an unnamed
    dynamic dim is None."""

    name: str
    dtype: str
    shape: tuple[int | str | None, ...]


def onnx_inputs(model: onnx.ModelProto) -> list[TensorSpec]:
    """The graph inputs of ``model`` (initializers excluded) with their dim names.

    >>> onnx_inputs(model)  # doctest: +SKIP
    [TensorSpec(name='x', dtype='float32', shape=('batch', 3, 32, 32))]
    """
    inits = {i.name for i in model.graph.initializer}
    out = []
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in t.shape.dim)
        out.append(TensorSpec(vi.name, _ONNX_DTYPES.get(t.elem_type, str(t.elem_type)), dims))
    return out


def derive_profiles(inputs: Sequence[TensorSpec],
                    dim_bounds: Mapping[str, Sequence[int]] | Sequence[Mapping] | None
                    ) -> list[dict[str, dict[str, list[int]]]]:
    """Optimization profiles: ``[{input: {"min": shape, "opt": shape, "max": shape}}]``, one
    per mapping in ``dim_bounds`` (a single mapping is one profile). Every dynamic dim of
    every input needs bounds in each profile; a graph without dynamic dims has none.

    >>> x = TensorSpec("x", "float32", ("batch", 3))
    >>> derive_profiles([x], {"batch": (1, 8, 32)})
    [{'x': {'min': [1, 3], 'opt': [8, 3], 'max': [32, 3]}}]
    """
    dynamic = {d for s in inputs for d in s.shape if not isinstance(d, int)}
    if dim_bounds is None:
        dim_bounds = {}
    groups = [dim_bounds] if isinstance(dim_bounds, Mapping) else list(dim_bounds)
    if not groups or (not dynamic and groups == [{}]):
        groups = [{}]
    if not dynamic:
        extra = sorted({k for g in groups for k in g})
        if extra:
            raise TrtConfigError(f"dim_bounds names {', '.join(map(repr, extra))}, but the graph "
                                 "has no dynamic dimensions (export with dynamic_dims=... to "
                                 "make them dynamic)")
        return []
    return [_profile(inputs, _check_group(g, k, dynamic), k) for k, g in enumerate(groups)]


def _check_group(group: Any, k: int, dynamic: set) -> dict[str, tuple[int, int, int]]:
    where = "dim_bounds" if k == 0 else f"dim_bounds[{k}]"
    if not isinstance(group, Mapping):
        raise TrtConfigError(f"{where} must map dim names to (min, opt, max), got {group!r}")
    named = {d for d in dynamic if isinstance(d, str)}
    out = {}
    for name, b in group.items():
        if name not in named:
            raise TrtConfigError(f"{where} names {name!r}, which is not a dynamic dimension of "
                                 f"the graph (dynamic: {', '.join(sorted(named)) or 'none'})")
        ok = (isinstance(b, (tuple, list)) and len(b) == 3
              and all(isinstance(v, int) and not isinstance(v, bool) for v in b))
        if not ok or not 1 <= b[0] <= b[1] <= b[2]:
            raise TrtConfigError(f"{where}[{name!r}] = {b!r}: give (min, opt, max) integers "
                                 "with 1 <= min <= opt <= max, e.g. (1, 8, 32)")
        out[name] = tuple(b)
    return out


def _profile(inputs: Sequence[TensorSpec], bounds: dict, k: int) -> dict:
    profile = {}
    for spec in inputs:
        shapes: dict[str, list[int]] = {"min": [], "opt": [], "max": []}
        for axis, d in enumerate(spec.shape):
            if isinstance(d, int):
                b = (d, d, d)
            elif d is None:
                raise TrtConfigError(
                    f"input {spec.name!r} dim {axis} is dynamic without a name, so no bounds "
                    "can be given for it; export with dynamic_dims={...: {" + str(axis) +
                    ": 'name'}} and pass dim_bounds={'name': (min, opt, max)}")
            elif d not in bounds:
                where = "dim_bounds" if k == 0 else f"dim_bounds[{k}]"
                raise TrtConfigError(
                    f"input {spec.name!r} dim {axis} is the dynamic dimension {d!r}, which has "
                    f"no bounds in {where}; TensorRT needs min/opt/max for every dynamic "
                    f"dimension: pass dim_bounds={{{d!r}: (1, 8, 32)}} (your sizes), or "
                    "export it static (dynamic=False)")
            else:
                b = bounds[d]
            for key, v in zip(("min", "opt", "max"), b):
                shapes[key].append(int(v))
        profile[spec.name] = shapes
    return profile


# --------------------------------------------------------------------------- precision


@dataclass(frozen=True)
class GraphPrecision:
    """What the ONNX graph's own types carry: float types that flow, and Q/DQ nodes."""

    floats: frozenset[str] = frozenset({"float32"})
    quantized: bool = False

    @property
    def name(self) -> str:
        """``fp32``, ``fp16``, ``bf16``, ``int8`` or a mix such as ``int8+fp16``.

        >>> GraphPrecision(frozenset({"float32", "float16"}), True).name
        'int8+fp16'
        """
        parts = ["int8"] if self.quantized else []
        parts += [_FLOAT_NAMES[f] for f in ("float16", "bfloat16") if f in self.floats]
        return "+".join(parts) or "fp32"

    @property
    def typed(self) -> bool:
        """True when the types carry a precision below fp32 (half types or Q/DQ)."""
        return self.quantized or bool({"float16", "bfloat16"} & self.floats)


def graph_precision(model: onnx.ModelProto) -> GraphPrecision:
    """The precision ``model``'s types carry: float types of its inputs, outputs, value
    infos, initializers and Cast targets (subgraphs included), and whether it has Q/DQ.

    >>> graph_precision(model).name  # doctest: +SKIP
    'fp16'
    """
    floats: set[str] = set()
    quantized = False

    def visit(g: onnx.GraphProto) -> None:
        nonlocal quantized
        for vi in [*g.input, *g.output, *g.value_info]:
            floats.add(_ONNX_DTYPES.get(vi.type.tensor_type.elem_type, ""))
        floats.update(_ONNX_DTYPES.get(t.data_type, "") for t in g.initializer)
        for node in g.node:
            if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                quantized = True
            for a in node.attribute:
                if node.op_type == "Cast" and a.name == "to":
                    floats.add(_ONNX_DTYPES.get(a.i, ""))
                elif node.op_type == "Constant" and a.type == onnx.AttributeProto.TENSOR:
                    floats.add(_ONNX_DTYPES.get(a.t.data_type, ""))
                for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else a.graphs:
                    visit(sub)

    visit(model.graph)
    found = frozenset(f for f in floats if f in _FLOAT_NAMES) or frozenset({"float32"})
    return GraphPrecision(found, quantized)


@dataclass(frozen=True)
class PrecisionPlan:
    """How an engine gets its precision: flags by member name, and its verification bound."""

    version: int
    precision: str  # what the engine computes in: fp32, tf32, fp16, bf16, int8, int8+fp16, ...
    graph: str  # what the graph's types carry
    strongly_typed: bool
    network_flags: tuple[str, ...]  # NetworkDefinitionCreationFlag members to set
    builder_flags: tuple[str, ...]  # BuilderFlag members to set
    cleared_flags: tuple[str, ...]  # BuilderFlag members to clear (TF32 is on by default)
    tolerance: Tolerance = EXACT
    notes: tuple[str, ...] = field(default=())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["tolerance"] = asdict(self.tolerance)
        return d


_TOLERANCES = {"fp32": EXACT, "tf32": HALF_FP16, "fp16": HALF_FP16, "bf16": HALF_BF16,
               "int8": QUANTIZED}
_HALF_FIX = {"fp16": "fxopt.optimize(model, inputs, 'half')",
             "bf16": "fxopt.optimize(model, inputs, 'half(dtype=bf16)')"}
_QUANT_FIX = ("insert Q/DQ nodes first: fxopt.optimize(model, inputs, 'quantize(scheme=int8)'), "
              "fxopt.calibrate(gm, batches), fxopt.freeze_calibration(gm), then lower that graph")


def decide_precision(graph: GraphPrecision, requested: str | None, version: int) -> PrecisionPlan:
    """Flags and tolerance for building ``graph`` at ``requested`` precision (None: what the
    graph's types carry) with TensorRT ``version``.

    A graph whose types carry fp16 / bf16 / Q/DQ is built ``STRONGLY_TYPED`` (both
    versions; TensorRT 11 is always strongly typed and keeps the flag only for
    compatibility). A reduced precision the graph does not carry is TensorRT 10's classic
    builder flag (``FP16``, ``BF16``, plus ``INT8`` for the graph's Q/DQ layers), and a
    ``TrtPrecisionError`` on TensorRT 11, which removed those flags. int8 needs Q/DQ nodes
    in both (fxopt never uses implicit INT8 calibration). fp32 clears ``TF32``; ask for
    ``"tf32"`` to allow it.

    >>> decide_precision(GraphPrecision(), "fp16", 10).builder_flags
    ('FP16',)
    >>> decide_precision(GraphPrecision(frozenset({"float16"})), None, 11).strongly_typed
    True
    """
    if version not in SUPPORTED_MAJORS:
        raise TrtConfigError(f"TensorRT {version} is not supported (use 10 or 11)")
    if requested is not None and requested not in PRECISIONS:
        raise TrtConfigError(f"precision={requested!r}: use one of {', '.join(PRECISIONS)}, or "
                             "None for the precision the graph's types carry")
    want = requested or ("fp32" if not graph.typed else graph.name)
    base = want.split("+")
    half_in_graph = [p for p in ("fp16", "bf16") if _name_float(p) in graph.floats]
    # the precision the engine computes in, and tolerance keys it is verified with
    if want in ("fp32", "tf32"):
        if graph.typed:
            raise TrtPrecisionError(
                f"precision={want!r}, but the graph computes in {graph.name} (its types come "
                "from the half / quantize passes), which a TensorRT build cannot undo: lower "
                "the graph from before those passes, or use precision=None")
        precision, keys = want, [want]
    elif want == "int8" or base[0] == "int8":
        if not graph.quantized:
            how = ("TensorRT 10 could only quantize it implicitly, with INT8 calibration, "
                   "which fxopt does not use" if version == 10 else
                   "TensorRT 11 removed implicit quantization (BuilderFlag.INT8)")
            raise TrtPrecisionError(
                f"precision='int8', but the graph has no QuantizeLinear/DequantizeLinear "
                f"nodes; {how}. {_QUANT_FIX[0].upper()}{_QUANT_FIX[1:]}")
        precision, keys = graph.name, ["int8", *half_in_graph]
    else:  # fp16 / bf16
        keys = ["int8"] if graph.quantized else []
        precision = "+".join([*keys, want])
        keys.append(want)
        other = [p for p in half_in_graph if p != want]
        if other:
            raise TrtPrecisionError(
                f"precision={want!r}, but the graph computes in {other[0]} (from the half "
                f"pass); lower the graph converted with {_HALF_FIX[want]} instead, or use "
                "precision=None")
        if want not in half_in_graph and version == 11:
            raise TrtPrecisionError(
                f"precision={want!r}, but the graph computes in {graph.name}, and TensorRT 11 "
                f"removed BuilderFlag.{want.upper()}: precision comes only from the graph's "
                f"types and Q/DQ nodes, and fxopt will not build fp32 instead. Convert the "
                f"graph first ({_HALF_FIX[want]}) and lower that, or build with TensorRT 10")
        if want not in half_in_graph:  # TensorRT 10: the classic weakly typed flags
            flags = [want.upper(), *(["INT8"] if graph.quantized else [])]
            return PrecisionPlan(
                version, precision, graph.name, False, (), tuple(flags), ("TF32",),
                _tolerance(keys),
                (f"TensorRT 10 weakly typed build: BuilderFlag.{want.upper()} lets TensorRT "
                 f"pick {want} kernels per layer (deprecated; TensorRT 11 needs the graph "
                 f"converted to {want})",))
    typed = graph.typed or version == 11
    cleared = () if want == "tf32" else ("TF32",)
    notes = ("TensorRT 11 networks are always strongly typed",) if version == 11 else ()
    return PrecisionPlan(version, precision, graph.name, typed,
                         ("STRONGLY_TYPED",) if typed else (), (), cleared, _tolerance(keys),
                         notes)


def _name_float(p: str) -> str:
    return {"fp16": "float16", "bf16": "bfloat16"}[p]


def _tolerance(keys: Sequence[str]) -> Tolerance:
    return loosest([_TOLERANCES[k] for k in keys])


def network_flag_bits(trt: Any, plan: PrecisionPlan) -> int:
    """``create_network``'s flags for ``plan`` from the ``tensorrt`` module's enum (a member
    a version no longer has, such as a removed ``STRONGLY_TYPED``, means it is always on).

    >>> network_flag_bits(tensorrt, plan)  # doctest: +SKIP
    1
    """
    bits = 0
    for name in plan.network_flags:
        member = getattr(trt.NetworkDefinitionCreationFlag, name, None)
        if member is not None:
            bits |= 1 << int(member)
    return bits


# --------------------------------------------------------------------------- timing cache


@dataclass(frozen=True)
class TimingCachePlan:
    """Where the timing cache comes from and goes to: ``data`` (b"" for a fresh cache)."""

    path: Path | None
    data: bytes
    reused: bool


def timing_cache_plan(timing_cache: str | Path | None) -> TimingCachePlan:
    """Read an existing cache file to reuse (it is updated after a verified build); a path
    that does not exist yet starts a fresh cache there; None keeps the cache in memory.

    >>> timing_cache_plan(None).reused
    False
    """
    if timing_cache is None:
        return TimingCachePlan(None, b"", False)
    if not isinstance(timing_cache, (str, Path)):
        raise TrtConfigError(f"timing_cache={timing_cache!r}: give a file path, e.g. 'trt.cache'")
    p = Path(timing_cache).expanduser().absolute()
    if p.is_dir():
        raise TrtConfigError(f"timing_cache={str(p)!r} is a folder; give a file path inside it, "
                             "e.g. 'trt.cache'")
    if not p.parent.is_dir():
        raise TrtConfigError(f"timing_cache={str(p)!r}: folder {p.parent} does not exist")
    if p.exists():
        try:
            return TimingCachePlan(p, p.read_bytes(), True)
        except OSError as e:
            raise TrtConfigError(f"cannot read timing cache {p}: {e.strerror or e}") from e
    return TimingCachePlan(p, b"", False)


__all__ = [
    "GraphPrecision", "PrecisionPlan", "TensorSpec", "TimingCachePlan", "TrtConfigError",
    "TrtPrecisionError", "check_optimization_level", "decide_precision", "derive_profiles",
    "graph_precision", "network_flag_bits", "onnx_inputs", "parse_workspace",
    "timing_cache_plan", "trt_version",
]
