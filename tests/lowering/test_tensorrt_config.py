"""Every TensorRT build decision of fxopt.lowering.trt_config, for TensorRT 10 and 11,
checked without TensorRT."""

from __future__ import annotations

import fake_tensorrt  # tests/lowering is on sys.path (rootdir-relative test import)
import pytest
from onnx import TensorProto, helper

from fxopt.errors import LoweringError
from fxopt.lowering import trt_config as cfg
from fxopt.lowering.trt_config import GraphPrecision, TensorSpec, TrtConfigError, TrtPrecisionError
from fxopt.verify import EXACT, HALF_BF16, HALF_FP16, QUANTIZED

FP32 = GraphPrecision()
FP16 = GraphPrecision(frozenset({"float32", "float16"}))
BF16 = GraphPrecision(frozenset({"float32", "bfloat16"}))
INT8 = GraphPrecision(frozenset({"float32"}), quantized=True)
INT8_FP16 = GraphPrecision(frozenset({"float32", "float16"}), quantized=True)


# --------------------------------------------------------------------------- version


@pytest.mark.parametrize("text, major", [("10.0.1.6", 10), ("10.7.0.23", 10), ("11.0.0", 11),
                                         ("11.4.1.2", 11)])
def test_version_detection(text, major):
    assert cfg.trt_version(text) == major


@pytest.mark.parametrize("text", ["8.6.1", "9.3.0", "12.0.0", "nonsense", ""])
def test_unsupported_version_is_a_typed_error(text):
    with pytest.raises(TrtConfigError, match="TensorRT|fxopt\\[tensorrt\\]"):
        cfg.trt_version(text)


# --------------------------------------------------------------------------- workspace


@pytest.mark.parametrize("value, size", [
    ("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("1.5GiB", 3 * 2**29), ("2 GB", 2 * 10**9),
    ("100MB", 10**8), ("64KiB", 65536), (1024, 1024), ("4096", 4096), (None, None),
])
def test_workspace_sizes(value, size):
    assert cfg.parse_workspace(value) == size


@pytest.mark.parametrize("value", ["4 parsecs", "GiB", "-1GiB", 0, -5, True, 4.5, "4,5GiB"])
def test_bad_workspace_is_refused(value):
    with pytest.raises(TrtConfigError, match="workspace"):
        cfg.parse_workspace(value)


@pytest.mark.parametrize("level", [0, 3, 5])
def test_optimization_levels(level):
    assert cfg.check_optimization_level(level) == level


@pytest.mark.parametrize("level", [-1, 6, "3", 3.0, True, None])
def test_bad_optimization_level(level):
    with pytest.raises(TrtConfigError, match="optimization_level"):
        cfg.check_optimization_level(level)


# --------------------------------------------------------------------------- profiles


def _model(inputs, nodes=(), inits=(), outputs=None, value_info=()):
    ins = [helper.make_tensor_value_info(n, t, s) for n, t, s in inputs]
    outs = outputs or [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)]
    graph = helper.make_graph(list(nodes), "g", ins, outs, initializer=list(inits),
                              value_info=list(value_info))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 20)])


def test_onnx_inputs_reads_dim_names_and_skips_initializers():
    w = helper.make_tensor("w", TensorProto.FLOAT, [3], [1.0, 2.0, 3.0])
    m = _model([("x", TensorProto.FLOAT, ["batch", 3]), ("ids", TensorProto.INT64, [2, "seq"]),
                ("w", TensorProto.FLOAT, [3])], inits=[w])
    assert cfg.onnx_inputs(m) == [TensorSpec("x", "float32", ("batch", 3)),
                                  TensorSpec("ids", "int64", (2, "seq"))]


def test_profiles_from_dim_bounds():
    specs = [TensorSpec("x", "float32", ("batch", 3, "seq")),
             TensorSpec("m", "bool", ("batch", "seq"))]
    (p,) = cfg.derive_profiles(specs, {"batch": (1, 8, 32), "seq": (4, 16, 64)})
    assert p == {"x": {"min": [1, 3, 4], "opt": [8, 3, 16], "max": [32, 3, 64]},
                 "m": {"min": [1, 4], "opt": [8, 16], "max": [32, 64]}}


def test_several_profiles():
    specs = [TensorSpec("x", "float32", ("batch", 3))]
    profiles = cfg.derive_profiles(specs, [{"batch": (1, 1, 4)}, {"batch": (8, 16, 32)}])
    assert [p["x"]["max"] for p in profiles] == [[4, 3], [32, 3]]


def test_static_graph_has_no_profile():
    assert cfg.derive_profiles([TensorSpec("x", "float32", (2, 3))], None) == []
    with pytest.raises(TrtConfigError, match="no dynamic dimensions"):
        cfg.derive_profiles([TensorSpec("x", "float32", (2, 3))], {"batch": (1, 2, 4)})


def test_missing_bounds_name_the_dim():
    specs = [TensorSpec("x", "float32", ("batch", 3, "seq"))]
    with pytest.raises(TrtConfigError, match=r"input 'x' dim 2 .*'seq'.*dim_bounds=\{'seq'"):
        cfg.derive_profiles(specs, {"batch": (1, 8, 32)})
    with pytest.raises(TrtConfigError, match="'batch'"):
        cfg.derive_profiles(specs, None)
    with pytest.raises(TrtConfigError, match=r"dim_bounds\[1\]"):
        cfg.derive_profiles(specs, [{"batch": (1, 2, 3), "seq": (1, 2, 3)}, {"batch": (1, 2, 3)}])


def test_unnamed_dynamic_dim_cannot_be_bounded():
    with pytest.raises(TrtConfigError, match="dynamic without a name"):
        cfg.derive_profiles([TensorSpec("x", "float32", (None, 3))], {})


@pytest.mark.parametrize("bounds, match", [
    ({"batch": (8, 1, 32)}, "min <= opt <= max"), ({"batch": (0, 1, 2)}, "1 <= min"),
    ({"batch": (1, 8)}, "min, opt, max"), ({"batch": (1.0, 2, 3)}, "integers"),
    ({"batch": (1, 2, 3), "width": (1, 2, 3)}, "'width', which is not a dynamic"),
])
def test_bad_bounds(bounds, match):
    with pytest.raises(TrtConfigError, match=match):
        cfg.derive_profiles([TensorSpec("x", "float32", ("batch", 3))], bounds)


def test_config_errors_are_lowering_errors():
    assert issubclass(TrtPrecisionError, TrtConfigError)
    assert issubclass(TrtConfigError, LoweringError)


# --------------------------------------------------------------------------- graph precision


def test_graph_precision_fp32_fp16_int8():
    fp32 = _model([("x", TensorProto.FLOAT, [2])], [helper.make_node("Relu", ["x"], ["y"])])
    assert cfg.graph_precision(fp32) == FP32 and not FP32.typed
    half = _model([("x", TensorProto.FLOAT, [2])],
                  [helper.make_node("Cast", ["x"], ["h"], to=TensorProto.FLOAT16),
                   helper.make_node("Cast", ["h"], ["y"], to=TensorProto.FLOAT)])
    assert cfg.graph_precision(half).name == "fp16" and cfg.graph_precision(half).typed
    s = helper.make_tensor("s", TensorProto.FLOAT, [], [0.1])
    z = helper.make_tensor("z", TensorProto.INT8, [], [0])
    q = _model([("x", TensorProto.FLOAT, [2])],
               [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
                helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])], inits=[s, z])
    assert cfg.graph_precision(q).name == "int8"


def test_graph_precision_sees_half_initializers_and_subgraphs():
    w = helper.make_tensor("w", TensorProto.BFLOAT16, [1], [0])
    assert cfg.graph_precision(_model([("x", TensorProto.FLOAT, [1])], inits=[w])).name == "bf16"
    body = helper.make_graph([helper.make_node("Cast", ["x"], ["o"], to=TensorProto.FLOAT16)],
                             "body", [], [helper.make_tensor_value_info("o", 10, None)])
    m = _model([("c", TensorProto.BOOL, [])],
               [helper.make_node("If", ["c"], ["y"], then_branch=body, else_branch=body)])
    assert cfg.graph_precision(m).name == "fp16"
    assert INT8_FP16.name == "int8+fp16"


# --------------------------------------------------------------------------- precision plans


@pytest.mark.parametrize("version", [10, 11])
@pytest.mark.parametrize("graph, requested, precision, tol", [
    (FP16, None, "fp16", HALF_FP16), (FP16, "fp16", "fp16", HALF_FP16),
    (BF16, None, "bf16", HALF_BF16), (INT8, None, "int8", QUANTIZED),
    (INT8, "int8", "int8", QUANTIZED), (INT8_FP16, None, "int8+fp16", None),
    (INT8_FP16, "int8", "int8+fp16", None), (INT8_FP16, "fp16", "int8+fp16", None),
])
def test_typed_graphs_build_strongly_typed(version, graph, requested, precision, tol):
    plan = cfg.decide_precision(graph, requested, version)
    assert plan.strongly_typed and plan.network_flags == ("STRONGLY_TYPED",)
    assert plan.builder_flags == ()  # the types carry the precision, never a flag
    assert plan.precision == precision and plan.cleared_flags == ("TF32",)
    if tol is not None:
        assert plan.tolerance == tol


def test_int8_fp16_tolerance_is_the_loosest():
    plan = cfg.decide_precision(INT8_FP16, None, 10)
    assert plan.tolerance.rtol == QUANTIZED.rtol and plan.tolerance.min_cosine == 0.99


def test_fp32_graph_v10_is_weakly_typed_without_flags():
    plan = cfg.decide_precision(FP32, None, 10)
    assert (plan.precision, plan.strongly_typed, plan.network_flags, plan.builder_flags) == (
        "fp32", False, (), ())
    assert plan.cleared_flags == ("TF32",) and plan.tolerance == EXACT


def test_fp32_graph_v11_is_always_strongly_typed():
    plan = cfg.decide_precision(FP32, "fp32", 11)
    assert plan.strongly_typed and plan.builder_flags == () and plan.tolerance == EXACT


@pytest.mark.parametrize("version", [10, 11])
def test_tf32_keeps_tf32(version):
    plan = cfg.decide_precision(FP32, "tf32", version)
    assert plan.cleared_flags == () and plan.tolerance == HALF_FP16 and plan.precision == "tf32"


@pytest.mark.parametrize("requested, flags, tol", [("fp16", ("FP16",), HALF_FP16),
                                                   ("bf16", ("BF16",), HALF_BF16)])
def test_v10_classic_flags_for_an_untyped_graph(requested, flags, tol):
    plan = cfg.decide_precision(FP32, requested, 10)
    assert not plan.strongly_typed and plan.network_flags == ()
    assert plan.builder_flags == flags and plan.tolerance == tol
    assert "weakly typed" in plan.notes[0]


def test_v10_fp16_flag_on_a_qdq_graph_also_sets_int8():
    plan = cfg.decide_precision(INT8, "fp16", 10)
    assert plan.builder_flags == ("FP16", "INT8") and plan.precision == "int8+fp16"
    assert plan.tolerance.min_cosine == QUANTIZED.min_cosine


@pytest.mark.parametrize("requested", ["fp16", "bf16"])
@pytest.mark.parametrize("graph", [FP32, INT8])
def test_v11_refuses_a_precision_the_graph_does_not_carry(graph, requested):
    match = rf"TensorRT 11 removed BuilderFlag.{requested.upper()}.*will not build fp32.*half"
    with pytest.raises(TrtPrecisionError, match=match):
        cfg.decide_precision(graph, requested, 11)


@pytest.mark.parametrize("version, match", [(10, "implicitly, with INT8 calibration"),
                                            (11, "removed implicit quantization")])
def test_int8_without_qdq_is_refused_in_both(version, match):
    with pytest.raises(TrtPrecisionError, match=f"no QuantizeLinear.*{match}.*quantize"):
        cfg.decide_precision(FP32, "int8", version)


@pytest.mark.parametrize("version", [10, 11])
@pytest.mark.parametrize("graph", [FP16, INT8])
def test_fp32_request_on_a_typed_graph_is_refused(version, graph):
    with pytest.raises(TrtPrecisionError, match="cannot undo"):
        cfg.decide_precision(graph, "fp32", version)


@pytest.mark.parametrize("version", [10, 11])
def test_other_half_type_is_refused(version):
    with pytest.raises(TrtPrecisionError, match="computes in fp16"):
        cfg.decide_precision(FP16, "bf16", version)


def test_unknown_precision_and_version():
    with pytest.raises(TrtConfigError, match="precision='fp8'"):
        cfg.decide_precision(FP32, "fp8", 10)
    with pytest.raises(TrtConfigError, match="TensorRT 9"):
        cfg.decide_precision(FP32, None, 9)


def test_network_flag_bits_follow_the_module_enum():
    typed = cfg.decide_precision(FP16, None, 10)
    assert cfg.network_flag_bits(fake_tensorrt.make("10.7.0"), typed) == 1 << 1
    assert cfg.network_flag_bits(fake_tensorrt.make("11.0.0"), typed) == 1 << 0
    assert cfg.network_flag_bits(fake_tensorrt.make("10.7.0"), cfg.decide_precision(
        FP32, None, 10)) == 0
    trt = fake_tensorrt.make("11.9.0")
    del trt.NetworkDefinitionCreationFlag  # a release without the (ignored) flag
    trt.NetworkDefinitionCreationFlag = type("F", (), {})
    assert cfg.network_flag_bits(trt, cfg.decide_precision(FP32, None, 11)) == 0


def test_plan_to_dict_is_json_ready():
    import json

    d = cfg.decide_precision(FP32, "fp16", 10).to_dict()
    assert json.loads(json.dumps(d))["builder_flags"] == ["FP16"]


# --------------------------------------------------------------------------- timing cache


def test_timing_cache_plans(tmp_path):
    assert cfg.timing_cache_plan(None) == cfg.TimingCachePlan(None, b"", False)
    fresh = cfg.timing_cache_plan(tmp_path / "trt.cache")
    assert (fresh.data, fresh.reused) == (b"", False)
    (tmp_path / "trt.cache").write_bytes(b"cache bytes")
    reused = cfg.timing_cache_plan(str(tmp_path / "trt.cache"))
    assert (reused.data, reused.reused, reused.path) == (b"cache bytes", True,
                                                         tmp_path / "trt.cache")


def test_bad_timing_cache_paths(tmp_path):
    with pytest.raises(TrtConfigError, match="is a folder"):
        cfg.timing_cache_plan(tmp_path)
    with pytest.raises(TrtConfigError, match="does not exist"):
        cfg.timing_cache_plan(tmp_path / "nope" / "trt.cache")
    with pytest.raises(TrtConfigError, match="file path"):
        cfg.timing_cache_plan(3)

