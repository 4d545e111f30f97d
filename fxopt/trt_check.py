"""Check an ONNX model for TensorRT readiness without TensorRT installed.

What TensorRT's ONNX parser accepts is data (``trt_onnx_support.json``: ops and their types,
attribute/input restrictions, int64 shape-like inputs, Q/DQ rules, per-version differences,
with sources); this module only walks the graph and applies it.

Example::

    report = check_trt("model.onnx", trt_version=10, dim_bounds={"batch": (1, 8, 32)})
    print(report.format())
    if not report.ok:
        raise SystemExit(1)
"""

from __future__ import annotations

import functools
import importlib.resources
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import numpy_helper

from fxopt.errors import LoweringError

_DEFAULT_DOMAINS = ("", "ai.onnx")
# never folded into build-time constants: random draws and control flow
_NOT_CONSTANT = ("RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike",
                 "Bernoulli", "Multinomial", "If", "Loop", "Scan")


@dataclass(frozen=True)
class Finding:
    """One problem TensorRT would have with the model, and what to do about it."""

    severity: str  # "blocker" (the build fails or computes something else) | "warning"
    code: str  # stable id, e.g. "unsupported-op", "int64-compute", "qdq-asymmetric"
    node: str  # node name (or f"{op_type}#{index}"), or a graph input name
    op_type: str
    message: str
    fix: str


@dataclass
class TrtReport:
    """The result of :func:`check_trt`: findings plus what was checked."""

    findings: list[Finding]
    trt_version: int
    model_name: str
    path: str | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def blockers(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "blocker"]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == "warning"]

    @property
    def ok(self) -> bool:
        """True when nothing blocks a TensorRT build (warnings may remain)."""
        return not self.blockers

    def summary(self) -> str:
        """One line: version, model, verdict and counts, e.g. ``TensorRT 10: m.onnx is ready
        (0 blockers, 1 warning)``."""
        nb, nw = len(self.blockers), len(self.warnings)
        verdict = "ready" if self.ok else "NOT ready"
        return (f"TensorRT {self.trt_version}: {self.model_name} is {verdict} "
                f"({nb} blocker{'s' * (nb != 1)}, {nw} warning{'s' * (nw != 1)})")

    def format(self) -> str:
        """A readable table (blockers first), each row followed by its fix, then a summary.

        >>> print(check_trt("model.onnx").format())  # doctest: +SKIP
        """
        rows = sorted(self.findings, key=lambda f: f.severity != "blocker")
        head = ("SEVERITY", "CODE", "NODE", "OP", "MESSAGE")
        cells = [(f.severity, f.code, f.node, f.op_type, f.message) for f in rows]
        widths = [max([len(head[i])] + [min(len(c[i]), 40) for c in cells]) for i in range(4)]
        line = lambda c: "  ".join(str(v).ljust(w) for v, w in zip(c[:4], widths)) + "  " + c[4]
        out = [line(head)] if rows else []
        for f, c in zip(rows, cells):
            out += [line(c), " " * (sum(widths) + 8) + f"fix: {f.fix}"]
        out += [*(f"note: {n}" for n in self.notes), self.summary()]
        return "\n".join(out)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form: model, version, verdict, counts, findings and notes.

        >>> json.dumps(check_trt("model.onnx").to_dict())  # doctest: +SKIP
        """
        return {"model": self.model_name, "path": self.path, "trt_version": self.trt_version,
                "ok": self.ok, "blockers": len(self.blockers), "warnings": len(self.warnings),
                "findings": [asdict(f) for f in self.findings], "notes": list(self.notes)}


@functools.cache
def support_data() -> dict[str, Any]:
    """The TensorRT ONNX support data shipped with fxopt (loaded once).

    >>> sorted(support_data()["opsets"])
    ['10', '11']
    """
    res = importlib.resources.files("fxopt") / "trt_onnx_support.json"
    return json.loads(res.read_text(encoding="utf-8"))


def check_trt(
    model: str | os.PathLike | onnx.ModelProto,
    trt_version: int = 10,
    dim_bounds: Mapping[str, tuple[int, int, int]] | None = None,
) -> TrtReport:
    """Report what would stop (blockers) or slow (warnings) a TensorRT build of an ONNX model.

    Checks op support (also inside If/Loop/Scan bodies and custom domains), documented
    attribute/input restrictions, int64 tensors on the compute path, dynamic input dims
    without min/opt/max bounds, and Q/DQ nodes against TensorRT's explicit quantization rules.
    ``dim_bounds`` maps a dim_param name to ``(min, opt, max)``; bounds are also read from the
    model's ``metadata_props["fxopt"]`` JSON (``{"dim_bounds": {...}}``), the argument wins.

    >>> report = check_trt("model.onnx", 11, dim_bounds={"batch": (1, 8, 32)})  # doctest: +SKIP
    >>> report.ok, [f.code for f in report.blockers]  # doctest: +SKIP
    (False, ['unsupported-op'])
    """
    data = support_data()
    if type(trt_version) is not int or trt_version not in data["versions"]:
        raise LoweringError(f"trt_version must be one of {data['versions']}, got {trt_version!r}")
    path = None if isinstance(model, onnx.ModelProto) else os.fspath(model)
    proto = model if isinstance(model, onnx.ModelProto) else _load(path)
    bounds = _validate_bounds(dim_bounds or {}, "dim_bounds")
    meta = {k: v for k, v in _metadata_bounds(proto).items() if k not in bounds}
    bounds.update(_validate_bounds(meta, "metadata_props['fxopt'].dim_bounds"))
    notes: list[str] = []
    proto = _prepare(proto, path, notes)
    base_dir = os.path.dirname(os.path.abspath(path)) if path else ""
    checker = _Checker(proto, trt_version, data, bounds, base_dir, notes)
    findings = list(dict.fromkeys(checker.run()))
    name = path or proto.graph.name or "model"
    return TrtReport(findings, trt_version, name, path,
                     [data["precision"][str(trt_version)], *dict.fromkeys(notes)])


# --------------------------------------------------------------------------- loading


def _load(path: str) -> onnx.ModelProto:
    if not os.path.isfile(path):
        what = "it is a folder; pass the .onnx file inside it" if os.path.isdir(path) else \
            "no such file"
        raise LoweringError(f"cannot check {path}: {what}")
    hint = "export it with torch.onnx.export or check the path"
    try:
        # weights stay on disk: a model over protobuf's 2 GB limit loads, and values are
        # read one tensor at a time when a check needs them
        proto = onnx.load(path, load_external_data=False)
    except (FileNotFoundError, onnx.checker.ValidationError) as e:
        raise LoweringError(f"cannot load {path}: {e}. Keep its external data files next to "
                            "the model, or re-save it with save_as_external_data=False.") from e
    except Exception as e:  # protobuf DecodeError, OSError, ...
        raise LoweringError(f"cannot read {path} as ONNX ({type(e).__name__}: {e}); {hint}") from e
    if not proto.ir_version or not proto.HasField("graph") or not proto.opset_import:
        raise LoweringError(f"{path} is not an ONNX model (no IR version, graph or opset); {hint}")
    return proto


def _prepare(proto: onnx.ModelProto, path: str | None, notes: list[str]) -> onnx.ModelProto:
    """Inline model-local functions (TensorRT inlines them too) and infer value types: on
    the file itself when there is one (``infer_shapes_path`` works above protobuf's 2 GB),
    else in memory. What could not run is said in ``notes``."""
    inlined = False
    if proto.functions:
        try:
            proto, inlined = onnx.inliner.inline_local_functions(proto), True
        except Exception as e:
            notes.append(f"could not inline the model's local functions ({_short(e)}): the "
                         "nodes inside them were checked without their value types")
    try:
        if path is None or inlined:
            return onnx.shape_inference.infer_shapes(proto, data_prop=True)
        with tempfile.TemporaryDirectory(prefix="fxopt-check-trt-") as tmp:
            out = os.path.join(tmp, "inferred.onnx")
            onnx.shape_inference.infer_shapes_path(path, out, data_prop=True)
            return onnx.load(out, load_external_data=False)
    except Exception as e:
        notes.append(f"could not run ONNX shape inference ({_short(e)}): the int64 and rank "
                     "checks used only the types and shapes the model declares, so they may "
                     "have missed problems")
        return proto


def _short(e: Exception) -> str:
    return f"{type(e).__name__}: " + " ".join(str(e).split())[:200]


def _metadata_bounds(proto: onnx.ModelProto) -> dict:
    raw = next((p.value for p in proto.metadata_props if p.key == "fxopt"), "{}")
    try:
        meta = json.loads(raw)
    except ValueError as e:
        raise LoweringError(f"metadata_props['fxopt'] is not valid JSON: {e}") from e
    found = meta.get("dim_bounds", {}) if isinstance(meta, dict) else {}
    if not isinstance(found, dict):
        raise LoweringError("metadata_props['fxopt'].dim_bounds must be {name: [min, opt, max]}")
    return found


def _validate_bounds(bounds: Mapping[str, Any], where: str) -> dict[str, tuple[int, int, int]]:
    out = {}
    for name, value in bounds.items():
        ok = (isinstance(value, (tuple, list)) and len(value) == 3
              and all(isinstance(v, int) and not isinstance(v, bool) for v in value))
        if not ok or not 1 <= value[0] <= value[1] <= value[2]:
            raise LoweringError(f"{where}[{name!r}] = {value!r} is invalid: give (min, opt, max) "
                                "integers with 1 <= min <= opt <= max, e.g. (1, 8, 32)")
        out[str(name)] = tuple(value)
    return out


# --------------------------------------------------------------------------- checking


class _Checker:
    def __init__(self, proto: onnx.ModelProto, version: int, data: dict, bounds: dict,
                 base_dir: str = "", notes: list[str] | None = None):
        self.proto, self.v, self.data, self.bounds = proto, version, data, bounds
        self.base_dir, self.notes = base_dir, notes if notes is not None else []
        self.types: dict[str, int] = {}
        self.shapes: dict[str, list[int | None]] = {}
        self.tensors: dict[str, onnx.TensorProto] = {}  # converted to numpy only when read
        self.arrays: dict[str, np.ndarray] = {}
        self.constant: set[str] = set()
        self.consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
        self.nodes = list(self._walk(proto.graph, ""))
        groups = data["type_groups"]
        self.ops = {op: groups.get(t, t) if isinstance(t, str) else t
                    for op, t in data["ops"].items()}
        self.ops.update({op: e["types"] for op, e in data["ops_by_version"].items()
                         if version in e["versions"]})

    def _walk(self, graph: onnx.GraphProto, prefix: str) -> Iterator[tuple[str, onnx.NodeProto]]:
        for vi in [*graph.input, *graph.value_info, *graph.output]:
            t = vi.type.tensor_type
            if t.elem_type:
                self.types[vi.name] = t.elem_type
            if t.HasField("shape"):
                self.shapes[vi.name] = [d.dim_value if d.HasField("dim_value") else None
                                        for d in t.shape.dim]
        for init in graph.initializer:
            self._set_tensor(init.name, init)
        for sparse in graph.sparse_initializer:
            self.constant.add(sparse.values.name)
        for i, node in enumerate(graph.node):
            label = node.name or f"{prefix}{node.op_type}#{i}"
            for k, name in enumerate(node.input):
                self.consumers.setdefault(name, []).append((node, k))
            self._propagate_constant(node)
            yield label, node
            for attr in node.attribute:
                for sub in [attr.g] if attr.type == onnx.AttributeProto.GRAPH else attr.graphs:
                    yield from self._walk(sub, f"{label}/")

    def _set_tensor(self, name: str, tensor: onnx.TensorProto) -> None:
        self.constant.add(name)
        self.types.setdefault(name, tensor.data_type)
        self.tensors[name] = tensor
        self.shapes[name] = list(tensor.dims)

    def _value(self, name: str) -> np.ndarray | None:
        if name not in self.arrays and name in self.tensors:
            try:  # external data is read from beside the model file, only when needed
                self.arrays[name] = numpy_helper.to_array(self.tensors[name], self.base_dir)
            except Exception as e:
                self.notes.append(f"could not read the value of {name} ({_short(e)}): the "
                                  "checks that need it treated it as unknown")
                self.tensors.pop(name)
                return None
        return self.arrays.get(name)

    def _propagate_constant(self, node: onnx.NodeProto) -> None:
        if node.op_type == "Constant" and node.domain in _DEFAULT_DOMAINS and node.attribute:
            attr = node.attribute[0]
            if attr.type == onnx.AttributeProto.TENSOR:
                self._set_tensor(node.output[0], attr.t)
            elif attr.name in ("value_int", "value_ints", "value_float", "value_floats"):
                value = np.array(onnx.helper.get_attribute_value(attr))
                self._set_tensor(node.output[0], numpy_helper.from_array(value))
            return
        inputs = [n for n in node.input if n]
        if inputs and all(n in self.constant for n in inputs) and node.op_type not in _NOT_CONSTANT:
            self.constant.update(n for n in node.output if n)

    def run(self) -> Iterator[Finding]:
        yield from self._check_opset()
        yield from self._check_inputs()
        for label, node in self.nodes:
            if node.domain not in _DEFAULT_DOMAINS:
                yield from self._check_custom(label, node)
            elif (yield from self._check_op(label, node)):
                yield from self._check_restrictions(label, node)
                yield from self._check_int64(label, node)
                if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
                    yield from self._check_qdq(label, node)

    # ---- opset and graph inputs

    def _check_opset(self) -> Iterator[Finding]:
        lo, hi = self.data["opsets"][str(self.v)]
        for imp in self.proto.opset_import:
            if imp.domain in _DEFAULT_DOMAINS and not lo <= imp.version <= hi:
                yield Finding("blocker" if imp.version < lo else "warning", "unsupported-opset",
                              "<model>", "", f"default-domain opset {imp.version} is outside "
                              f"TensorRT {self.v}'s range {lo}-{hi}",
                              f"re-export with opset_version between {lo} and {hi} "
                              "(torch.onnx.export(..., opset_version=N)) or convert it with "
                              "onnx.version_converter")

    def _check_inputs(self) -> Iterator[Finding]:
        fixes = self.data["dynamic_dims"]
        inits = {i.name for i in self.proto.graph.initializer}
        for vi in self.proto.graph.input:
            for k, d in enumerate(vi.type.tensor_type.shape.dim if vi.name not in inits else []):
                if d.HasField("dim_value") or (d.dim_param and d.dim_param in self.bounds):
                    continue
                what = f"dim_param {d.dim_param!r}" if d.dim_param else "an unnamed dynamic size"
                fix = fixes["fix"].replace("{name}", d.dim_param) if d.dim_param else \
                    fixes["fix_unnamed"]
                yield Finding("warning", "unbounded-dynamic-dim", vi.name, "", f"input dim {k} "
                              f"is {what} with no min/opt/max bounds; TensorRT needs an "
                              "optimization profile for it", fix)

    # ---- op support

    def _check_op(self, label: str, node: onnx.NodeProto) -> Iterator[Finding]:
        """Yields findings; returns True when the op is a supported ONNX op."""
        op = node.op_type
        if op in self.ops:
            return True
        if not (yield from self._check_plugin(label, node)):
            unsupported = self.data["unsupported_ops"]
            why = ("is marked unsupported in TensorRT's ONNX operator matrix"
                   if op in unsupported["list"]
                   else "is not in TensorRT's published ONNX operator support list")
            yield Finding("blocker", "unsupported-op", label, op, f"ONNX op {op} {why} "
                          f"(TensorRT {self.v})",
                          unsupported["fixes"].get(op, unsupported["default_fix"]))
        return False

    def _check_plugin(self, label: str, node: onnx.NodeProto) -> Iterator[Finding]:
        """Yields findings; returns True when the op is a known TensorRT plugin."""
        op, removed = node.op_type, self.data["removed_plugins"].get(str(self.v))
        where = f"in domain {node.domain!r}" if node.domain else "in the default domain"
        if removed and op in removed["names"]:
            yield Finding("blocker", "removed-plugin", label, op, f"{op} ({where}) is a TensorRT "
                          f"plugin removed in TensorRT {self.v}", removed["fix"])
        elif op in self.data["known_plugins"]:
            yield Finding("warning", "trt-plugin", label, op, f"{op} ({where}) is a TensorRT "
                          "plugin, not an ONNX op", self.data["domains"]["trt.plugins"]["fix"])
        else:
            return False
        return True

    def _check_custom(self, label: str, node: onnx.NodeProto) -> Iterator[Finding]:
        rule = self.data["domains"].get(node.domain, self.data["domains"]["default"])
        if (yield from self._check_plugin(label, node)) or \
                self.v in rule.get("builtin", {}).get(node.op_type, []):
            return
        code = rule.get("code", "custom-domain")
        what = "needs a registered TensorRT plugin" if code == "trt-plugin" else \
            "is not an op TensorRT implements"
        yield Finding(rule["severity"], code, label, node.op_type,
                      f"{node.domain}::{node.op_type} {what}", rule["fix"])

    # ---- documented restrictions

    def _check_restrictions(self, label: str, node: onnx.NodeProto) -> Iterator[Finding]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        for rule in self.data["restrictions"]:
            if rule["op"] != node.op_type or self.v not in rule.get("versions", [self.v]):
                continue
            if "attribute" in rule:
                name, code = rule["attribute"], "unsupported-attribute"
                msg = self._bad_value(rule, attrs[name], f"attribute {name}") \
                    if name in attrs else None
            elif "max_outputs" in rule:
                used = [k for k, o in enumerate(node.output) if o and self._used(o)]
                msg = (f"uses output(s) {used}; only the first {rule['max_outputs']} supported"
                       if any(k >= rule["max_outputs"] for k in used) else None)
                code = "unsupported-output"
            else:
                msg, code = self._bad_input(rule, node), "unsupported-input"
            if msg:
                yield Finding("blocker", code, label, node.op_type,
                              f"{node.op_type} {msg} (TensorRT {self.v})", rule["fix"])

    def _bad_value(self, rule: dict, value: Any, what: str) -> str | None:
        if rule.get("forbidden"):
            return f"has {what}, which TensorRT does not support"
        items = [value] if isinstance(value, (str, bytes)) else np.ravel(value).tolist()
        items = [v.decode() if isinstance(v, bytes) else v for v in items]
        bad = [v for v in items if v not in rule.get("supported_values", [v])]
        bad += [v for v in items if "max_value" in rule and v > rule["max_value"]]
        if not bad:
            return None
        allowed = rule.get("supported_values", f"<= {rule.get('max_value')}")
        return f"{what} = {bad[0]!r} is unsupported (supported: {allowed})"

    def _bad_input(self, rule: dict, node: onnx.NodeProto) -> str | None:
        k = rule["input"]
        name = node.input[k] if k < len(node.input) else ""
        if not name:
            return None
        rank = len(self.shapes[name]) if self.shapes.get(name) is not None else None
        if "ranks" in rule and rank is not None and rank not in rule["ranks"]:
            return f"input {k} has rank {rank}; supported ranks: {rule['ranks']}"
        if rule.get("constant") and name not in self.constant:
            return f"input {k} ({name}) must be a build-time constant"
        value = self._value(name)
        return None if value is None else self._bad_value(rule, value, f"input {k}")

    def _used(self, name: str) -> bool:
        return bool(self.consumers.get(name)) or name in {o.name for o in self.proto.graph.output}

    # ---- int64 on the compute path

    def _check_int64(self, label: str, node: onnx.NodeProto) -> Iterator[Finding]:
        spec = self.data["int64"]
        shape_like = spec["shape_inputs"].get(node.op_type, [])
        hits = list(dict.fromkeys(n for k, n in enumerate(node.input) if n and k not in shape_like
                                  and self.types.get(n) == onnx.TensorProto.INT64))
        if not hits or node.op_type not in spec["compute_ops"]:
            return
        types = self.ops.get(node.op_type)
        hard = types is not None and "INT64" not in types
        impact = "TensorRT has no INT64 kernel for it" if hard else \
            "TensorRT runs it in INT64 with reduced support and speed"
        yield Finding("blocker" if hard else "warning", "int64-compute", label, node.op_type,
                      f"{node.op_type} computes on INT64 tensor(s) {', '.join(hits)}; {impact}",
                      spec["fix"])

    # ---- Q/DQ (explicit quantization)

    def _check_qdq(self, label: str, node: onnx.NodeProto) -> Iterator[Finding]:
        spec, op, is_dq = self.data["qdq"], node.op_type, node.op_type == "DequantizeLinear"
        if len(node.input) < 2:
            return  # malformed; onnx.checker reports it
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        data_in, zp = node.input[0], node.input[2] if len(node.input) > 2 else ""
        weight = data_in in self.constant
        if is_dq:
            qtype = self.types.get(data_in) or self.types.get(zp)
        else:  # without a zero point QuantizeLinear produces uint8 (or output_dtype)
            qtype = self.types.get(zp) or attrs.get("output_dtype") or onnx.TensorProto.UINT8
        qtype = onnx.TensorProto.DataType.Name(qtype) if qtype else None
        allowed = [t for t, vs in spec["dtypes"].items() if self.v in vs]
        weight_only = [t for t, vs in spec["weight_only_dtypes"].items() if self.v in vs]
        if qtype and qtype not in allowed and not (is_dq and weight and qtype in weight_only):
            extra = " (INT4 only for weight-only DequantizeLinear)" if qtype in weight_only else ""
            yield Finding("blocker", "qdq-dtype", label, op, f"quantized type {qtype} is not "
                          f"supported; TensorRT {self.v} accepts {', '.join(allowed)}{extra}",
                          spec["dtype_fix"])
        value = self._value(zp) if zp else None
        if zp and value is None:
            yield Finding("blocker", "qdq-asymmetric", label, op, f"zero point {zp} is not a "
                          "constant, so it cannot be shown to be 0", spec["asymmetric_fix"])
        elif value is not None and np.any(value.astype(np.float64) != 0):
            yield Finding("blocker", "qdq-asymmetric", label, op, "non-zero zero point "
                          f"{np.ravel(value)[:4].tolist()}: TensorRT quantization is symmetric "
                          "only", spec["asymmetric_fix"])
        scale_shape = self.shapes.get(node.input[1])
        if (scale_shape is None or None in scale_shape or int(np.prod(scale_shape)) <= 1
                or attrs.get("block_size", 0)):
            return  # per-tensor (or blocked, or unknown)
        if not weight:
            yield Finding("blocker", "qdq-activation-per-channel", label, op, "per-channel "
                          f"scale on activation {data_in}; TensorRT quantizes activations per "
                          "tensor only", spec["activation_per_channel_fix"])
        elif is_dq:
            yield from self._check_weight_axis(label, node, attrs.get("axis", 1))

    def _check_weight_axis(self, label: str, node: onnx.NodeProto, axis: int) -> Iterator[Finding]:
        rank = len(self.shapes.get(node.input[0]) or [])
        axis = axis + rank if axis < 0 else axis
        for consumer, required, why in self._required_axes(node.output[0], list(range(rank))):
            if required != axis:
                yield Finding("blocker", "qdq-weight-axis", label, node.op_type,
                              f"per-channel weight scale on axis {axis} feeds {consumer.op_type} "
                              f"{consumer.name or '(unnamed)'}, but TensorRT needs axis "
                              f"{required}: {why}", self.data["qdq"]["weight_axis_fix"])

    def _required_axes(self, tensor: str, dims: list[int]) -> Iterator[tuple]:
        """(consumer, required axis of the DQ input, why) for each weight consumer of
        ``tensor``; ``dims`` maps the axes of ``tensor`` to the DQ input's axes."""
        rules = self.data["qdq"]["weight_axis"]
        for consumer, k in self.consumers.get(tensor, []) if dims else []:
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in consumer.attribute}
            if consumer.op_type == "Transpose":
                perm = attrs.get("perm") or list(reversed(range(len(dims))))
                if sorted(perm) == list(range(len(dims))):
                    yield from self._required_axes(consumer.output[0], [dims[p] for p in perm])
            elif (rule := rules.get(consumer.op_type)) and rule["input"] == k:
                cond = rule.get("axis_if")
                use_cond = cond and attrs.get(cond["attribute"], 0) == cond["value"]
                axis = cond["axis"] if use_cond else rule["axis"]
                if -len(dims) <= axis < len(dims):
                    yield consumer, dims[axis], rule["why"]


__all__ = ["Finding", "TrtReport", "check_trt", "support_data"]
