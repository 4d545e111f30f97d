"""prepare_for_tensorrt: the zoo (fp32, fp16 from half, int8 from quantize(target=tensorrt))
and the real-architecture suite verified in ONNX Runtime, one hand-built graph per rewrite,
and every user mistake."""

from __future__ import annotations

import collections
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import fxopt
from fxopt.errors import LoweringError
from fxopt.lowering import trt_prepare
from fxopt.lowering.trt_prepare import PrepareReport, prepare_for_tensorrt

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _feeds(path: Path, inputs: tuple) -> dict[str, np.ndarray]:
    model = onnx.load(str(path), load_external_data=False)
    inits = {i.name for i in model.graph.initializer}
    names = [i.name for i in model.graph.input if i.name not in inits]
    return {n: x.numpy() for n, x in zip(names, inputs)}


def _ort(model: onnx.ModelProto | Path, feeds: dict) -> list[np.ndarray]:
    data = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"]).run(None, feeds)


def _ops(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


def _prepared(tmp_path, gm, inputs, name="m"):
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / f"{name}.onnx",
                      dim_bounds={"batch": (1, 2, 8)})
    feeds = _feeds(art.path, inputs)
    model, report = prepare_for_tensorrt(art.path, inputs=feeds, trt_version=10,
                                         out_path=tmp_path / f"{name}.trt.onnx")
    return art, feeds, model, report


def _check_prepared(art, feeds, model, report: PrepareReport, version: int = 10) -> None:
    assert report.max_abs_error is not None and report.max_abs_error <= 1e-4, report.format()
    assert [o.name for o in model.graph.output] == art.output_names
    onnx.checker.check_model(model)
    for want, got in zip(_ort(art.path, feeds), _ort(model, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    trt = fxopt.check_trt(model, trt_version=version)
    assert trt.ok and not report.unsupported, trt.format()
    assert not [f for f in trt.findings if f.code == "int64-compute"], trt.format()


# --------------------------------------------------------------------------- the zoo


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "transformer", "gqa"])
def test_zoo_fp32_is_prepared_and_verified(zoo_case, tmp_path, name):
    model, inputs, gm = zoo_case(name, "export")
    gm = fxopt.optimize(gm, inputs, "default").module
    art, feeds, prepared, report = _prepared(tmp_path, gm, inputs)
    _check_prepared(art, feeds, prepared, report)
    written = onnx.load(str(tmp_path / "m.trt.onnx"))
    assert _ops(written) == _ops(prepared)
    # the metadata fxopt wrote (dim bounds for the profiles) travels with the graph
    assert {p.key for p in written.metadata_props} == {p.key for p in onnx.load(
        str(art.path)).metadata_props}


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_zoo_fp16_from_half_is_prepared_and_stays_fp16(zoo_case, tmp_path, name):
    model, inputs, gm = zoo_case(name, "symbolic")
    gm = fxopt.optimize(gm, inputs, "default,half(dtype=fp16)").module
    art, feeds, prepared, report = _prepared(tmp_path, gm, inputs)
    _check_prepared(art, feeds, prepared, report)
    sizes = collections.Counter()
    for init in prepared.graph.initializer:
        sizes[init.data_type] += len(init.raw_data)
    assert sizes[TensorProto.FLOAT16] > 0.95 * sum(sizes.values()), sizes


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_zoo_int8_weights_become_int8_constants_and_dq_stays(zoo_case, tmp_path, name):
    model, inputs, gm = zoo_case(name, "symbolic")
    gen = torch.Generator().manual_seed(1)
    calibration = [inputs] + [tuple(torch.randn(x.shape, generator=gen)
                                    if x.is_floating_point() else x for x in inputs)
                              for _ in range(3)]
    gm = fxopt.optimize(gm, inputs, "default,quantize(scheme=int8,target=tensorrt)",
                        calibration=calibration).module
    art, feeds, prepared, report = _prepared(tmp_path, gm, inputs)
    _check_prepared(art, feeds, prepared, report)
    before, after = _ops(onnx.load(str(art.path))), _ops(prepared)
    inits = {i.name: i for i in prepared.graph.initializer}
    weight_dqs = [n for n in prepared.graph.node
                  if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    folded = [r for r in report.rewrites if "QuantizeLinear" in r and "of weight" in r]
    assert weight_dqs and len(folded) == len(weight_dqs)
    assert all(inits[n.input[0]].data_type == TensorProto.INT8 for n in weight_dqs)
    assert after["DequantizeLinear"] == before["DequantizeLinear"]
    assert after["QuantizeLinear"] == before["QuantizeLinear"] - len(weight_dqs)
    # fxopt's TensorRT placement needs no Q/DQ moves
    assert not [r for r in report.rewrites if r.startswith("qdq:")], report.rewrites
    trt = fxopt.check_trt(prepared)
    assert not [f for f in trt.findings if f.code.startswith("qdq")], trt.format()


# --------------------------------------------------------------------------- int64


def _model(nodes, inputs, outputs, inits=(), opset=19, domains=()) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    return model


def _int64_model(offset: int = 1) -> onnx.ModelProto:
    """Shape arithmetic (Shape -> Mul by a constant) and a data-dependent int64 CumSum (of
    token ids), both on TensorRT's int64 compute path."""
    nodes = [helper.make_node("Shape", ["ids"], ["s"], name="shape"),
             helper.make_node("Mul", ["s", "two"], ["s2"], name="mul_shape"),
             helper.make_node("CumSum", ["ids", "axis"], ["c"], name="cumsum"),
             helper.make_node("Add", ["c", "offset"], ["pos"], name="add_offset"),
             helper.make_node("Reshape", ["pos", "flat"], ["y"], name="reshape")]
    inits = [numpy_helper.from_array(np.array(2, np.int64), "two"),
             numpy_helper.from_array(np.array(1, np.int64), "axis"),
             numpy_helper.from_array(np.array(offset, np.int64), "offset"),
             numpy_helper.from_array(np.array([-1], np.int64), "flat")]
    return _model(nodes, [helper.make_tensor_value_info("ids", I64, ["batch", 5])],
                  [helper.make_tensor_value_info("y", I64, [None]),
                   helper.make_tensor_value_info("s2", I64, [2])], inits)


def test_int64_compute_runs_in_int32_or_float32_where_values_allow():
    model = _int64_model()
    ids = {"ids": np.arange(10, dtype=np.int64).reshape(2, 5)}
    assert {f.node for f in fxopt.check_trt(model).findings} >= {"mul_shape", "cumsum"}
    prepared, report = prepare_for_tensorrt(model, inputs=ids, trt_version=10)
    text = "\n".join(report.rewrites)
    assert "Mul mul_shape runs in int32" in text and "computed from shapes" in text
    assert "CumSum cumsum runs in float32" in text  # TensorRT has no integer CumSum
    assert "Add add_offset runs in int32" in text and "observed on the inputs" in text
    assert report.max_abs_error == 0.0
    for want, got in zip(_ort(model, ids), _ort(prepared, ids)):
        assert got.dtype == want.dtype == np.int64 and np.array_equal(got, want)
    assert not [f for f in fxopt.check_trt(prepared).findings if f.code == "int64-compute"]
    # CumSum's float32 result goes straight into the int32 Add: one Cast between them
    casts = [n for n in prepared.graph.node if n.op_type == "Cast"]
    assert len(casts) <= 5, [(n.name, list(n.input)) for n in casts]


def test_int64_without_inputs_keeps_data_dependent_values_and_says_why():
    prepared, report = prepare_for_tensorrt(_int64_model(), inputs=None, trt_version=11)
    assert any("Mul mul_shape runs in int32" in r for r in report.rewrites)
    assert any(n.startswith("CumSum cumsum stays int64") and "pass inputs" in n
               for n in report.notes), report.notes
    assert report.max_abs_error is None and "not verified" in report.format()
    assert ("cumsum", "CumSum") in {(n, op) for n, op, _ in report.unsupported}


def test_int64_values_beyond_int32_stay_int64():
    ids = {"ids": np.arange(10, dtype=np.int64).reshape(2, 5)}
    _, report = prepare_for_tensorrt(_int64_model(offset=2**40), inputs=ids, trt_version=10)
    assert any(n.startswith("Add add_offset stays int64") and "beyond int32" in n
               for n in report.notes), report.notes
    assert not any("add_offset" in r for r in report.rewrites)


# --------------------------------------------------------------------------- Q/DQ


def _qdq_nodes(between: list, after: list, zp: int = 0) -> tuple[list, list]:
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("QuantizeLinear", ["c", "s", "zp"], ["q"], name="q"),
             *between,
             helper.make_node("DequantizeLinear", [between[-1].output[0] if between else "q",
                                                   "s", "zp"], ["dq"], name="dq"),
             *after]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             numpy_helper.from_array(np.array(zp, np.int8), "zp")]
    return nodes, inits


def _conv_model(nodes, inits, out: str) -> onnx.ModelProto:
    return _model(nodes, [helper.make_tensor_value_info("x", F, [1, 3, 8, 8])],
                  [helper.make_tensor_value_info(out, F, [1, 4, 6, 6])], inits)


def _x() -> dict:
    return {"x": np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)}


def test_relu_after_qdq_moves_before_it():
    nodes, inits = _qdq_nodes([], [helper.make_node("Relu", ["dq"], ["y"], name="relu")])
    model = _conv_model(nodes, inits, "y")
    prepared, report = prepare_for_tensorrt(model, inputs=_x(), trt_version=10)
    assert [n.op_type for n in prepared.graph.node] == ["Conv", "Relu", "QuantizeLinear",
                                                         "DequantizeLinear"]
    assert any(r.startswith("qdq: Relu relu moved before QuantizeLinear q")
               for r in report.rewrites)
    assert report.max_abs_error == 0.0 and prepared.graph.output[0].name == "y"


def test_relu_move_needs_a_zero_point_of_zero():
    nodes, inits = _qdq_nodes([], [helper.make_node("Relu", ["dq"], ["y"], name="relu")],
                              zp=3)
    prepared, report = prepare_for_tensorrt(_conv_model(nodes, inits, "y"), inputs=_x(),
                                            trt_version=10)
    assert _ops(prepared)["Relu"] == 1 and prepared.graph.node[-1].op_type == "Relu"
    assert not [r for r in report.rewrites if r.startswith("qdq:")]


def test_clip_between_q_and_dq_moves_after_dq_with_float_bounds():
    clip = helper.make_node("Clip", ["q", "lo", "hi"], ["qc"], name="narrow")
    nodes, inits = _qdq_nodes([clip], [])
    inits += [numpy_helper.from_array(np.array(-7, np.int8), "lo"),
              numpy_helper.from_array(np.array(7, np.int8), "hi")]
    model = _conv_model(nodes, inits, "dq")
    prepared, report = prepare_for_tensorrt(model, inputs=_x(), trt_version=10)
    assert [n.op_type for n in prepared.graph.node] == ["Conv", "QuantizeLinear",
                                                         "DequantizeLinear", "Clip"]
    assert report.max_abs_error == 0.0, report.format()
    assert np.abs(_ort(prepared, _x())[0]).max() <= 7 * 0.05 + 1e-7


# --------------------------------------------------------------------------- report and errors


def test_unsupported_ops_are_reported_by_node_and_plugins_listed():
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="uniq"),
             helper.make_node("LReLU_TRT", ["x"], ["p"], name="lrelu", domain="trt.plugins")]
    model = _model(nodes, [helper.make_tensor_value_info("x", F, [5])],
                   [helper.make_tensor_value_info("u", F, [None]),
                    helper.make_tensor_value_info("p", F, [5])], domains=["trt.plugins"])
    x = {"x": np.arange(5, dtype=np.float32)}
    _, report = prepare_for_tensorrt(model, inputs=x, trt_version=10)
    assert ("uniq", "Unique") in {(n, op) for n, op, _ in report.unsupported}
    assert report.plugins == ["lrelu (LReLU_TRT)"]
    # ONNX Runtime cannot run a TensorRT plugin: nothing to verify against, and it says so
    assert report.max_abs_error is None
    assert any("ONNX Runtime cannot run the original" in n for n in report.notes)


def test_a_stage_that_changes_the_outputs_raises_and_writes_nothing(tmp_path, monkeypatch):
    nodes, inits = _qdq_nodes([], [helper.make_node("Relu", ["dq"], ["y"], name="relu")])

    def broken(graph):
        scale = next(t for name, t in graph.tensors().items() if name == "s")
        scale.values = np.array(0.5, np.float32)
        return ["broke the scale"]

    monkeypatch.setattr(trt_prepare, "_qdq", broken)
    out = tmp_path / "new" / "m.onnx"
    with pytest.raises(LoweringError, match="the qdq stage .broke the scale. changed the "
                                            "model's outputs"):
        prepare_for_tensorrt(_conv_model(nodes, inits, "y"), inputs=_x(), trt_version=10,
                             out_path=out)
    assert not (tmp_path / "new").exists()


def test_big_models_are_written_with_external_data(tmp_path, monkeypatch):
    monkeypatch.setattr(trt_prepare, "_EXTERNAL_DATA", 64)
    monkeypatch.setattr(trt_prepare, "_EXTERNAL_MIN", 0)
    nodes, inits = _qdq_nodes([], [helper.make_node("Relu", ["dq"], ["y"], name="relu")])
    src = tmp_path / "src.onnx"
    onnx.save_model(_conv_model(nodes, inits, "y"), str(src), save_as_external_data=True,
                    location="src.onnx.data", size_threshold=0)
    out = tmp_path / "out" / "m.onnx"
    prepared, report = prepare_for_tensorrt(src, inputs=_x(), trt_version=10, out_path=out)
    assert (out.parent / "m.onnx.data").is_file() and report.max_abs_error == 0.0
    np.testing.assert_array_equal(_ort(out, _x())[0], _ort(src, _x())[0])


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"inputs": {"wrong": np.zeros(1)}}, r"expected \['x'\], got \['wrong'\]"),
    ({"inputs": [np.zeros(1)]}, "must map every graph input"),
    ({"inputs": None, "trt_version": 9}, "trt_version must be one of"),
    ({"inputs": None, "trt_version": "10"}, "trt_version must be one of"),
])
def test_bad_arguments_raise(kwargs, match):
    nodes, inits = _qdq_nodes([], [])
    args = {"trt_version": 10, **kwargs}
    with pytest.raises(LoweringError, match=match):
        prepare_for_tensorrt(_conv_model(nodes, inits, "dq"), **args)


def test_missing_and_unreadable_files_raise(tmp_path):
    with pytest.raises(LoweringError, match="no such file"):
        prepare_for_tensorrt(tmp_path / "none.onnx", inputs=None, trt_version=10)
    (tmp_path / "junk.onnx").write_text("not a model")
    with pytest.raises(LoweringError, match="cannot read"):
        prepare_for_tensorrt(tmp_path / "junk.onnx", inputs=None, trt_version=10)


# --------------------------------------------------------------------------- real architectures

sys.path.insert(0, str(Path(__file__).parents[1]))


def _architectures() -> list:
    try:
        from real_architectures import ARCHITECTURES
    except ImportError:  # transformers missing: the test below skips
        return [("gpt2", "fp32")]
    int8 = [pytest.param(name, "int8", marks=pytest.mark.xfail(
        strict=True, reason=why, raises=fxopt.PassError)) for name, why in REAL_INT8.items()]
    return [(name, "fp32") for name in sorted(ARCHITECTURES)] + [
        (name, "fp16") for name in REAL_FP16] + int8


# half: the families that export and verify in fp16 (tests/test_real_architectures.py keeps
# mobilenet-v2's fp16 ONNX as a known failure)
REAL_FP16 = ["bert", "gpt2", "resnet", "vit"]
# int8 for TensorRT on a real CNN: the quantize pass itself refuses it today, before any
# ONNX exists (the zoo's int8 graphs above are prepared and verified)
REAL_INT8 = {"resnet": (
    "quantize(scheme=int8,target=tensorrt) on the random-weight Hugging Face ResNet fails its "
    "own verification (16 calibration batches): \"max abs error 0.849 (relative 0.129, "
    "cosine 0.986065) exceeds the approximate tolerance\", first at relu_2_fq; the ort "
    "target passes on the same model (tests/test_real_architectures.py)")}
_PIPELINES = {"fp32": "default", "fp16": "default,half(dtype=fp16)",
              "int8": "default,quantize(scheme=int8,target=tensorrt)"}


@pytest.mark.slow
@pytest.mark.parametrize(("name", "precision"), _architectures())
def test_real_architecture_is_prepared_and_verified(name, precision, tmp_path):
    pytest.importorskip("transformers")
    from real_architectures import ARCHITECTURES

    arch = ARCHITECTURES[name]
    model, inputs = arch.build(), arch.make_inputs()
    calibration = [arch.make_inputs(4, seed=10 + i) for i in range(16)]
    gm = fxopt.optimize(model, inputs, _PIPELINES[precision],
                        calibration=calibration if precision == "int8" else None).module
    art, feeds, prepared, report = _prepared(tmp_path, gm, inputs)
    _check_prepared(art, feeds, prepared, report)
    batch3 = arch.make_inputs(3, seed=5)  # the prepared graph is still dynamic in batch
    for want, got in zip(_ort(art.path, _feeds(art.path, batch3)),
                         _ort(prepared, _feeds(art.path, batch3))):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_out_path_never_replaces_something_that_is_not_onnx(tmp_path):
    nodes, inits = _qdq_nodes([], [])
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    with pytest.raises(LoweringError, match="not an ONNX model file; refusing to overwrite"):
        prepare_for_tensorrt(_conv_model(nodes, inits, "dq"), inputs=_x(), trt_version=10,
                             out_path=notes)
    assert notes.read_text() == "my notes"
