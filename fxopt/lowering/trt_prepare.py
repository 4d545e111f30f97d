"""Prepare an ONNX model for TensorRT's ONNX parser with onnx-graphsurgeon, every rewrite
verified in ONNX Runtime against the model as it came.

The stages, in order (each one checked on ``inputs`` before the next starts):

1. **fold** — constant subgraphs and shape arithmetic whose shapes are static
   (graphsurgeon's ``fold_constants`` with ``fold_shapes``). DequantizeLinear is never
   folded: folding ``Q(weight) -> DQ`` into a float constant would drop the int8 weight
   TensorRT's explicit quantization needs; ``Q(float weight) -> DQ`` becomes
   ``DQ(int8 weight)`` instead, the pre-quantized form TensorRT documents.
2. **int64** — the nodes ``check_trt`` reports as int64 compute run in int32 (in float32
   where TensorRT has no integer kernel and the op is exact on integers), with casts at
   the edges of each such region, where the values allow it: constants that fit, values
   observed on ``inputs`` that fit, or (without inputs) values that derive from shapes only.
3. **qdq** — only what TensorRT's explicit-quantization fusions cannot take:
   ``Q -> DQ -> Relu`` becomes ``Relu -> Q -> DQ`` (exact for a zero point of 0;
   TensorRT then fuses conv + relu + Q) and ``Q -> Clip -> DQ`` becomes
   ``Q -> DQ -> Clip`` with float bounds (a Clip on the int8 tensor separates the pair).
   fxopt's own ``quantize(target=tensorrt)`` graphs need neither; graphs from other tools may.
4. **report** — unsupported ops and plugins by node, from ``check_trt`` on the result.

Example::

    model, report = prepare_for_tensorrt("m.onnx", inputs={"x": x}, trt_version=10,
                                         out_path="m.trt.onnx")
    print(report.format())
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import torch
from onnx_graphsurgeon.logger import G_LOGGER

from fxopt.errors import LoweringError
from fxopt.lowering.trt_qdq import move_qdq as _qdq
from fxopt.lowering.trt_qdq import replace_uses as _replace_uses
from fxopt.trt_check import check_trt, support_data
from fxopt.verify import EXACT, Tolerance, compare_outputs

_INT64, _INT32, _FLOAT = onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.FLOAT
_LIMITS = {_INT32: 2**31 - 1, _FLOAT: 2**24}  # |value| each compute type holds exactly
_NUMPY = {_INT32: np.int32, _FLOAT: np.float32}
# ops whose float32 result on integer-valued inputs is the integer result while every value
# stays below 2**24 (Div, Mod, Pow and Mean round or truncate differently, so they are absent)
_EXACT_IN_FLOAT = frozenset({"Add", "Sub", "Mul", "Neg", "Abs", "Sign", "Sum", "Max", "Min",
                             "Clip", "Relu", "CumSum", "ReduceSum", "ReduceMax", "ReduceMin",
                             "MatMul"})
# largest constant (bytes) the fold stage creates: an int8 weight of a 4096x4096 linear fits
FOLD_LIMIT = 1 << 24
# protobuf cannot serialize a message over 2 GiB: bigger models go to external data
_EXTERNAL_DATA = 2**31 - 2**27
_EXTERNAL_MIN = 1024  # tensors smaller than this stay inside the .onnx file


@dataclass
class PrepareReport:
    """What :func:`prepare_for_tensorrt` did: rewrites per node, what TensorRT lacks by node,
    the plugins it needs, and the ONNX Runtime error of the prepared graph vs the original."""

    rewrites: list[str] = field(default_factory=list)
    unsupported: list[tuple[str, str, str]] = field(default_factory=list)  # (node, op, why)
    plugins: list[str] = field(default_factory=list)
    max_abs_error: float | None = None
    notes: list[str] = field(default_factory=list)

    def format(self) -> str:
        """Readable lines: rewrites, unsupported nodes, plugins, notes, the verified error.

        >>> print(report.format())  # doctest: +SKIP
        """
        out = [f"rewrite: {r}" for r in self.rewrites]
        out += [f"unsupported: {n} ({op}): {why}" for n, op, why in self.unsupported]
        out += [f"plugin: {p}" for p in self.plugins] + [f"note: {n}" for n in self.notes]
        err = "not verified" if self.max_abs_error is None else \
            f"max abs error vs the original in ONNX Runtime: {self.max_abs_error:.3g}"
        return "\n".join([*out, f"{len(self.rewrites)} rewrite(s), {err}"])


def prepare_for_tensorrt(
    model: onnx.ModelProto | str | os.PathLike,
    *,
    inputs: Mapping[str, Any] | None,
    trt_version: int,
    out_path: str | os.PathLike | None = None,
    tolerance: Tolerance | None = None,
) -> tuple[onnx.ModelProto, PrepareReport]:
    """Rewrite ``model`` for TensorRT ``trt_version`` and verify it in ONNX Runtime.

    ``inputs`` maps every graph input name to an array (numpy or torch); each stage's
    result is compared with the original on them within ``tolerance`` (default
    ``fxopt.verify.EXACT``: every rewrite is exact up to float re-association). A mismatch
    raises LoweringError naming the stage and its rewrites, and nothing is written.
    ``out_path`` receives the prepared model (weights over 2 GiB as ``<name>.data``).

    >>> m, report = prepare_for_tensorrt("m.onnx", inputs={"x": x}, trt_version=10)
    ... # doctest: +SKIP
    >>> report.rewrites  # doctest: +SKIP
    ['int64: CumSum node_cumsum runs in float32 (values observed in [0, 12] on the inputs)']
    """
    if type(trt_version) is not int or trt_version not in support_data()["versions"]:
        raise LoweringError(f"trt_version must be one of {support_data()['versions']}, "
                            f"got {trt_version!r}")
    if out_path is not None:
        _check_out(out_path)  # refuse early: before any work
    proto, source = _load(model)
    feeds = _feeds(proto, inputs)
    report = PrepareReport()
    tolerance = tolerance or EXACT
    with tempfile.TemporaryDirectory(prefix="fxopt-trt-") as tmp:
        job = _Job(Path(tmp), feeds, tolerance, report, proto)
        job.reference(source or job.save(proto, "original.onnx"))
        graph = gs.import_onnx(_infer(proto, Path(tmp)))
        _name_nodes(graph)
        stages: list[tuple[str, Callable[[gs.Graph], list[str]]]] = [
            ("fold", lambda g: _fold(g, job)),
            ("int64", lambda g: _int64_to_int32(g, job)),
            ("qdq", _qdq),
            ("fold", lambda g: _fold(g, job)),  # the casts of constants the int64 stage made
        ]
        for name, stage in stages:
            done = stage(graph)
            report.rewrites += [f"{name}: {r}" for r in done]
            if done:
                job.verify(_export(graph, proto), name, done)
        prepared = _export(graph, proto)
        if job.ref is not None and report.max_abs_error is None:
            job.verify(prepared, "prepare", ["no rewrite"])
        checked = job.save(prepared, "prepared.onnx")
        _report_support(check_trt(checked, trt_version), report)
        if job.ref is None:
            report.notes.append(job.why_unverified)
    if out_path is not None:
        from fxopt.lowering import write_files

        write_files(_check_out(out_path), lambda f: _save(prepared, f), _check_out)
    return prepared, report


# --------------------------------------------------------------------------- loading


def _check_out(path: str | os.PathLike) -> Path:
    """The absolute destination; only an ONNX model file there may be replaced."""
    from fxopt.lowering import destination
    from fxopt.lowering.onnx import _check_replaceable

    dest = destination(path)
    _check_replaceable(dest)
    return dest


def _load(model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, Path | None]:
    if isinstance(model, onnx.ModelProto):
        return model, None
    path = Path(os.fspath(model))
    if not path.is_file():
        raise LoweringError(f"cannot prepare {path}: no such file")
    try:
        return onnx.load(str(path), load_external_data=True), path
    except Exception as e:
        raise LoweringError(f"cannot read {path} as ONNX ({type(e).__name__}: {e}); keep its "
                            "external data files next to it") from e


def _graph_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    inits = {i.name for i in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in inits]


def _feeds(proto: onnx.ModelProto, inputs: Mapping[str, Any] | None) -> dict | None:
    if inputs is None:
        return None
    names = [i.name for i in _graph_inputs(proto)]
    if not isinstance(inputs, Mapping) or set(inputs) != set(names):
        got = sorted(inputs) if isinstance(inputs, Mapping) else type(inputs).__name__
        raise LoweringError(f"inputs must map every graph input to an array: expected "
                            f"{names}, got {got}")
    out = {}
    for name in names:
        x = inputs[name]
        if isinstance(x, torch.Tensor):
            x = x.detach().cpu().numpy()
        out[name] = np.asarray(x)
    return out


def _infer(proto: onnx.ModelProto, tmp: Path) -> onnx.ModelProto:
    """Types of every value (the int64 stage reads them); on the file path above 2 GiB."""
    try:
        if _weight_bytes(proto) < _EXTERNAL_DATA:
            return onnx.shape_inference.infer_shapes(proto, data_prop=True)
        src, dst = _save(proto, tmp / "infer_in.onnx"), tmp / "infer_out.onnx"
        onnx.shape_inference.infer_shapes_path(str(src), str(dst), data_prop=True)
        inferred = onnx.load(str(dst), load_external_data=False)
        onnx.external_data_helper.load_external_data_for_model(inferred, str(tmp))
        return inferred
    except Exception:
        return proto  # an invalid or unusual graph: the stages use the types it declares


def _name_nodes(graph: gs.Graph) -> None:
    """Give unnamed nodes check_trt's label (``OpType#index``) so reports name them."""
    taken = {n.name for n in graph.nodes if n.name}
    for i, node in enumerate(graph.nodes):
        if not node.name:
            name = f"{node.op}#{i}"
            while name in taken:
                name += "_"
            node.name = name
            taken.add(name)


def _weight_bytes(proto: onnx.ModelProto) -> int:
    return sum(len(t.raw_data) for t in proto.graph.initializer)


def _save(proto: onnx.ModelProto, f: Path) -> Path:
    if _weight_bytes(proto) >= _EXTERNAL_DATA:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)  # saving as external data empties the tensors it writes out
        onnx.save_model(copy, str(f), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=f"{f.name}.data", size_threshold=_EXTERNAL_MIN)
    else:
        onnx.save_model(proto, str(f))
    return f


def _export(graph: gs.Graph, original: onnx.ModelProto) -> onnx.ModelProto:
    graph.cleanup().toposort()
    out = gs.export_onnx(graph)
    out.ir_version = original.ir_version
    del out.metadata_props[:]
    out.metadata_props.extend(original.metadata_props)
    for key in ("producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(out, key, getattr(original, key))
    return out


# --------------------------------------------------------------------------- verification


@dataclass
class _Job:
    tmp: Path
    feeds: dict | None
    tolerance: Tolerance
    report: PrepareReport
    original: onnx.ModelProto
    ref: list[torch.Tensor] | None = None
    why_unverified: str = "not verified: no inputs were given"
    count: int = 0

    def save(self, proto: onnx.ModelProto, name: str) -> Path:
        return _save(proto, self.tmp / name)

    def run(self, path: Path, extra: list[str] = ()) -> list[np.ndarray]:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        # the rewrite is checked, not ONNX Runtime's own fusions of it
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        if extra:
            proto = onnx.load(str(path), load_external_data=False)
            proto.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n)
                                      for n in extra)
            path = path.with_name(f"observe-{path.name}")
            onnx.save_model(proto, str(path))
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        return session.run(None, self.feeds)

    def run_model(self, proto: onnx.ModelProto, name: str) -> list[np.ndarray]:
        """Outputs of an input-free helper model (constants computed by ONNX Runtime)."""
        path = self.save(proto, name)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {})

    def reference(self, path: Path) -> None:
        if self.feeds is None:
            return
        try:
            self.ref = [torch.from_numpy(np.asarray(o)) for o in self.run(path)]
        except Exception as e:
            self.why_unverified = (f"not verified: ONNX Runtime cannot run the original model "
                                   f"({_short(e)}); every rewrite is exact by construction")

    def observe(self, graph: gs.Graph, names: list[str]) -> dict[str, tuple[int, int]]:
        """(min, max) of each named value on the inputs (empty without inputs/reference)."""
        if self.ref is None or not names:
            return {}
        path = self.save(_export(graph.copy(), self.original), f"observe{self.count}.onnx")
        self.count += 1
        values = self.run(path, names)[len(self.ref):]
        return {n: (int(v.min()), int(v.max())) if v.size else (0, 0)
                for n, v in zip(names, values)}

    def verify(self, proto: onnx.ModelProto, stage: str, done: list[str]) -> None:
        if self.ref is None:
            return
        path = self.save(proto, f"stage{self.count}.onnx")
        self.count += 1
        what = f"the {stage} stage ({'; '.join(done[:3])}{' ...' if len(done) > 3 else ''})"
        try:
            got = [torch.from_numpy(np.asarray(o)) for o in self.run(path)]
        except Exception as e:
            raise LoweringError(f"ONNX Runtime cannot run the model after {what}: {_short(e)}; "
                                "nothing was written") from e
        cmp = compare_outputs(self.ref, got, self.tolerance)
        if not cmp.ok():
            raise LoweringError(
                f"{what} changed the model's outputs in ONNX Runtime: max abs error "
                f"{cmp.max_abs:.3g} (scale {cmp.ref_scale:.3g}, allowed {self.tolerance.atol:g}"
                f" + {self.tolerance.rtol:g}*scale); nothing was written")
        prev = self.report.max_abs_error or 0.0
        self.report.max_abs_error = max(prev, cmp.max_abs)


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


# --------------------------------------------------------------------------- stages


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    level = G_LOGGER.severity
    G_LOGGER.severity = G_LOGGER.ERROR
    try:
        yield
    finally:
        G_LOGGER.severity = level


def _fold(graph: gs.Graph, job: _Job) -> list[str]:
    before = {n.name: n for n in graph.nodes}
    with _quiet():
        graph.fold_constants(fold_shapes=True, size_threshold=FOLD_LIMIT)
        graph.cleanup().toposort()
    after = {n.name for n in graph.nodes}
    done = [f"{node.op} {name} folded into a constant" for name, node in before.items()
            if name not in after and node.op != "Constant"]
    return done + _quantize_weights(graph, job)


def _quantize_weights(graph: gs.Graph, job: _Job) -> list[str]:
    """``QuantizeLinear(constant)`` -> an int8 constant, computed by ONNX Runtime itself
    (graphsurgeon never folds Q/DQ nodes, and numpy may round a half differently)."""
    nodes = [n for n in graph.nodes if n.op == "QuantizeLinear"
             and all(isinstance(t, gs.Constant) for t in n.inputs if t.name)
             and n.outputs[0] not in graph.outputs
             and np.asarray(n.inputs[0].values).nbytes <= 4 * FOLD_LIMIT]
    if not nodes:
        return []
    # fresh tensors: sharing the graph's would list these nodes among their consumers
    consts: dict[str, gs.Tensor] = {}

    def fresh_input(t: gs.Tensor) -> gs.Tensor:
        if not t.name:
            return gs.Variable.empty()
        return consts.setdefault(t.name, gs.Constant(t.name, t.values))

    fresh = [gs.Node(n.op, n.name, dict(n.attrs), [fresh_input(t) for t in n.inputs],
                     [gs.Variable(n.outputs[0].name, dtype=n.outputs[0].dtype or np.int8)])
             for n in nodes]
    sub = gs.Graph(nodes=fresh, outputs=[n.outputs[0] for n in fresh], opset=graph.opset,
                   import_domains=graph.import_domains)
    values = job.run_model(_export(sub, job.original), "weights.onnx")
    done = []
    for node, value in zip(nodes, values):
        q = node.outputs[0]
        const = gs.Constant(f"{q.name}__int8", np.asarray(value))
        _replace_uses(q, const)
        node.outputs.clear()
        done.append(f"QuantizeLinear {node.name} of weight {node.inputs[0].name} folded into "
                    f"a constant of type {np.asarray(value).dtype} (its DequantizeLinear stays)")
    graph.cleanup().toposort()
    return done


def _dtype(t: gs.Tensor) -> int | None:
    if t.dtype is None:
        return None
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype))
    except (TypeError, KeyError, ValueError):
        return t.dtype if isinstance(t.dtype, int) else None


def _int64_to_int32(graph: gs.Graph, job: _Job) -> list[str]:
    data = support_data()
    spec, groups = data["int64"], data["type_groups"]
    plan: list[tuple[gs.Node, int, list[int], list[int]]] = []  # node, type, ins, outs
    notes = job.report.notes
    for node in graph.nodes:
        if (node.domain or "") not in ("", "ai.onnx") or node.op not in spec["compute_ops"]:
            continue
        shape_like = spec["shape_inputs"].get(node.op, [])
        ins = [k for k, t in enumerate(node.inputs) if k not in shape_like and t.name
               and _dtype(t) == _INT64]
        if not ins:
            continue
        types = data["ops"].get(node.op, [])
        types = groups.get(types, types) if isinstance(types, str) else types
        to = _INT32 if "INT32" in types else _FLOAT if node.op in _EXACT_IN_FLOAT else None
        if to is None:
            notes.append(f"{node.op} {node.name} stays int64: TensorRT has no int32 kernel for "
                         "it and float32 would round its result")
            continue
        outs = [k for k, t in enumerate(node.outputs) if _dtype(t) == _INT64
                and _follows_input_type(node.op, k)]
        plan.append((node, to, ins, outs))
    if not plan:
        return []
    watch = {t.name for node, to, ins, outs in plan
             for t in [*(node.inputs[k] for k in ins), *(node.outputs[k] for k in outs)]
             if not isinstance(t, gs.Constant) and (to != _INT32 or not _from_shapes(t))}
    seen = job.observe(graph, sorted(watch))
    # every decision before any rewrite: a rewrite changes the ancestry _from_shapes walks
    whys = [_values_allow([node.inputs[k] for k in ins] + [node.outputs[k] for k in outs],
                          to, seen, job.feeds is not None) for node, to, ins, outs in plan]
    done, casts, taken = [], {}, set(graph.tensors())
    for (node, to, ins, outs), why in zip(plan, whys):
        if why.startswith("!"):
            notes.append(f"{node.op} {node.name} stays int64: {why[1:]}")
            continue
        for k in ins:
            node.inputs[k] = _cast(graph, node.inputs[k], to, casts, taken)
        for k in outs:
            wide = node.outputs[k]
            narrow = gs.Variable(_fresh(f"{wide.name}__{_NUMPY[to].__name__}", taken),
                                 dtype=_NUMPY[to])
            node.outputs[k] = narrow
            graph.nodes.append(gs.Node("Cast", f"{node.name}/to_int64", {"to": _INT64},
                                       [narrow], [wide]))
        name = "int32" if to == _INT32 else "float32"
        done.append(f"{node.op} {node.name} runs in {name} ({why})")
    _cancel_casts(graph)
    return done


def _follows_input_type(op: str, k: int) -> bool:
    """True when output ``k``'s type is the inputs' type parameter (ArgMax's is int64)."""
    try:
        schema = onnx.defs.get_schema(op)
    except onnx.defs.SchemaError:
        return False
    outs = schema.outputs
    return k < len(outs) and outs[k].type_str != "tensor(int64)"


def _from_shapes(t: gs.Tensor, memo: dict | None = None) -> bool:
    """True when ``t`` is computed from constants and tensor shapes only."""
    memo = {} if memo is None else memo
    if isinstance(t, gs.Constant):
        return True
    if t.name in memo:
        return memo[t.name]
    memo[t.name] = False  # a graph input (or a cycle, never in a valid graph)
    if t.inputs:
        node = t.inputs[0]
        memo[t.name] = node.op in ("Shape", "Size", "Constant") or (
            bool(node.inputs) and all(_from_shapes(i, memo) for i in node.inputs if i.name))
    return memo[t.name]


def _values_allow(tensors: list[gs.Tensor], to: int, seen: dict, have_inputs: bool) -> str:
    """Why the values fit ``to`` exactly, or ``"!reason"`` when they may not."""
    limit, lo, hi = _LIMITS[to], 0, 0
    sources = set()
    for t in tensors:
        if isinstance(t, gs.Constant):
            v = np.asarray(t.values)
            rng = (int(v.min()), int(v.max())) if v.size else (0, 0)
            sources.add("constants")
        elif t.name in seen:
            rng = seen[t.name]
            sources.add("observed on the inputs")
        elif _from_shapes(t) and to == _INT32:
            sources.add("computed from shapes")
            continue
        else:
            what = "depends on data" if to == _INT32 else "must stay below 2**24 in float32"
            why = "pass inputs so its values can be checked" if not have_inputs else \
                "ONNX Runtime could not run the model to observe its values"
            return f"!{t.name} {what}; {why}"
        lo, hi = min(lo, rng[0]), max(hi, rng[1])
        if max(-rng[0], rng[1]) > limit:
            return f"!{t.name} reaches {rng[1] if rng[1] > limit else rng[0]}, beyond " \
                   f"{'int32' if to == _INT32 else 'the exact float32 range'}"
    return f"values in [{lo}, {hi}], {' and '.join(sorted(sources))}"


def _fresh(name: str, taken: set[str]) -> str:
    """``name``, or ``name_2``, ``name_3``... so that no two tensors share a name."""
    out, k = name, 1
    while out in taken:
        k += 1
        out = f"{name}_{k}"
    taken.add(out)
    return out


def _cast(graph: gs.Graph, t: gs.Tensor, to: int, casts: dict, taken: set[str]) -> gs.Tensor:
    key = (t.name, to)
    if key in casts:
        return casts[key]
    name = _fresh(f"{t.name}__as_{_NUMPY[to].__name__}", taken)
    if isinstance(t, gs.Constant):
        casts[key] = gs.Constant(name, np.asarray(t.values).astype(_NUMPY[to]))
    else:
        out = gs.Variable(name, dtype=_NUMPY[to])
        graph.nodes.append(gs.Node("Cast", f"{t.name}/to_{_NUMPY[to].__name__}", {"to": to},
                                   [t], [out]))
        casts[key] = out
    return casts[key]


def _cancel_casts(graph: gs.Graph) -> None:
    """``Cast(to=T)(Cast(to=int64)(x))`` reads ``x`` (x of type T) or ``Cast(to=T)(x)``:
    the int64 value in between was shown to fit T."""
    for node in list(graph.nodes):
        if node.op != "Cast" or node.attrs.get("to") == _INT64 or not node.inputs[0].inputs:
            continue
        inner = node.inputs[0].inputs[0]
        if inner.op != "Cast" or inner.attrs.get("to") != _INT64:
            continue
        source, out = inner.inputs[0], node.outputs[0]
        if _dtype(source) == node.attrs.get("to") and out not in graph.outputs:
            _replace_uses(out, source)
        else:
            node.inputs[0] = source


# --------------------------------------------------------------------------- report


_UNSUPPORTED = ("unsupported-op", "custom-domain", "removed-plugin", "unsupported-attribute",
                "unsupported-input", "unsupported-output", "int64-compute")


def _report_support(trt: Any, report: PrepareReport) -> None:
    """Nodes TensorRT cannot build (check_trt's blockers on ops, attributes, inputs and int64
    compute) and the plugins the graph needs; Q/DQ and opset findings stay check_trt's."""
    for f in trt.findings:
        if f.code == "trt-plugin":
            report.plugins.append(f"{f.node} ({f.op_type})")
        elif f.code in _UNSUPPORTED and f.severity == "blocker":
            report.unsupported.append((f.node, f.op_type, f.message))
    report.notes += [n for n in trt.notes if n.startswith("could not")]


__all__ = ["FOLD_LIMIT", "PrepareReport", "prepare_for_tensorrt"]
