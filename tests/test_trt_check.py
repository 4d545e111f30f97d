"""check_trt: one hand-built bad graph per finding code, clean real exports, and bad input."""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from fxopt.errors import LoweringError
from fxopt.trt_check import Finding, TrtReport, check_trt, support_data

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

F, I64 = TensorProto.FLOAT, TensorProto.INT64


def _vi(name: str, dtype: int, shape: list | int) -> onnx.ValueInfoProto:
    """A value info; an int ``shape`` is a rank with unknown dims."""
    dims = [None] * shape if isinstance(shape, int) else shape
    return helper.make_tensor_value_info(name, dtype, dims)


def _init(name: str, array: np.ndarray) -> onnx.TensorProto:
    return numpy_helper.from_array(np.asarray(array), name)


def _model(nodes, inputs, outputs, inits=(), opset=19, domains=()) -> onnx.ModelProto:
    """A model that passes onnx.checker (each bad graph is valid ONNX, just not TensorRT's)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    opsets = [helper.make_opsetid("", opset), *(helper.make_opsetid(d, 1) for d in domains)]
    model = helper.make_model(graph, opset_imports=opsets)
    onnx.checker.check_model(model)
    return model


def _only(report: TrtReport, code: str, severity: str) -> list[Finding]:
    """Assert every finding has ``code`` and ``severity``; return them."""
    assert report.findings, "expected a finding"
    assert {f.code for f in report.findings} == {code}, report.format()
    assert {f.severity for f in report.findings} == {severity}
    assert report.ok is (severity != "blocker")
    return report.findings


def _unary(op: str, **attrs) -> onnx.ModelProto:
    return _model([helper.make_node(op, ["x"], ["y"], name="n", **attrs)],
                  [_vi("x", F, [2, 3])], [_vi("y", F, 2)])


# --------------------------------------------------------------------------- op support


@pytest.mark.parametrize("version", [10, 11])
def test_unsupported_op_is_a_blocker(version):
    model = _model([helper.make_node("Unique", ["x"], ["y"], name="uniq")],
                   [_vi("x", F, [5])], [_vi("y", F, 1)])
    (f,) = _only(check_trt(model, version), "unsupported-op", "blocker")
    assert (f.node, f.op_type) == ("uniq", "Unique") and f.fix


def test_com_microsoft_op_is_a_custom_domain_blocker():
    node = helper.make_node("FastGelu", ["x"], ["y"], name="fg", domain="com.microsoft")
    model = _model([node], [_vi("x", F, [2, 3])], [_vi("y", F, 2)], domains=["com.microsoft"])
    (f,) = _only(check_trt(model), "custom-domain", "blocker")
    assert f.node == "fg" and "ORT_ENABLE_BASIC" in f.fix


def test_trt_plugin_domain_is_a_warning_and_removed_plugins_block_on_11():
    node = helper.make_node("LReLU_TRT", ["x"], ["y"], name="lrelu", domain="trt.plugins")
    model = _model([node], [_vi("x", F, [2, 3])], [_vi("y", F, 2)], domains=["trt.plugins"])
    assert _only(check_trt(model, 10), "trt-plugin", "warning")[0].node == "lrelu"
    assert _only(check_trt(model, 11), "removed-plugin", "blocker")[0].node == "lrelu"


def test_unknown_op_in_a_plugin_domain_is_a_plugin_warning():
    node = helper.make_node("MyFusedOp", ["x"], ["y"], name="mine", domain="trt.plugins")
    model = _model([node], [_vi("x", F, [2, 3])], [_vi("y", F, 2)], domains=["trt.plugins"])
    assert _only(check_trt(model), "trt-plugin", "warning")[0].node == "mine"


def test_versions_differ_where_the_data_says_so():
    model = _model([helper.make_node("DFT", ["x"], ["y"], name="dft")],
                   [_vi("x", F, [1, 8, 1])], [_vi("y", F, 3)])
    _only(check_trt(model, 10), "unsupported-op", "blocker")
    assert check_trt(model, 11).findings == []  # DFT is supported from TensorRT 11.2


def test_unnamed_node_is_named_by_op_type_and_index():
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Unique", ["r"], ["y"])]
    model = _model(nodes, [_vi("x", F, [5])], [_vi("y", F, 1)])
    assert _only(check_trt(model), "unsupported-op", "blocker")[0].node == "Unique#1"


def test_node_inside_an_if_subgraph_is_checked():
    then_g = helper.make_graph([helper.make_node("Det", ["m"], ["t"], name="inner_det")],
                               "then", [], [_vi("t", F, [])])
    else_g = helper.make_graph(
        [helper.make_node("ReduceSum", ["m"], ["e"], name="inner_sum", keepdims=0)],
        "else", [], [_vi("e", F, [])])
    node = helper.make_node("If", ["c"], ["y"], name="branch", then_branch=then_g,
                            else_branch=else_g)
    model = _model([node], [_vi("c", TensorProto.BOOL, []), _vi("m", F, [2, 2])],
                   [_vi("y", F, [])])
    (f,) = _only(check_trt(model), "unsupported-op", "blocker")
    assert (f.node, f.op_type) == ("inner_det", "Det")


# --------------------------------------------------------------------------- restrictions


def test_unsupported_attribute_value_from_the_data():
    node = helper.make_node("Resize", ["x", "", "scales"], ["y"], name="up", mode="cubic")
    model = _model([node], [_vi("x", F, [1, 1, 4, 4])], [_vi("y", F, 4)],
                   [_init("scales", np.array([1, 1, 2, 2], np.float32))])
    (f,) = _only(check_trt(model), "unsupported-attribute", "blocker")
    assert f.node == "up" and "cubic" in f.message
    assert any(r["op"] == "Resize" and r.get("attribute") == "mode"
               for r in support_data()["restrictions"])


def test_non_constant_reduction_axes_are_reported():
    node = helper.make_node("ReduceSum", ["x", "axes"], ["y"], name="rs")
    model = _model([node], [_vi("x", F, [2, 3]), _vi("axes", I64, [1])], [_vi("y", F, 2)])
    assert _only(check_trt(model), "unsupported-input", "blocker")[0].node == "rs"


# --------------------------------------------------------------------------- int64


@pytest.mark.parametrize("op", ["Add", "Mul"])
def test_int64_arithmetic_is_a_warning(op):
    model = _model([helper.make_node(op, ["a", "b"], ["y"], name="arith")],
                   [_vi("a", I64, [4]), _vi("b", I64, [4])], [_vi("y", I64, 1)])
    (f,) = _only(check_trt(model), "int64-compute", "warning")
    assert f.node == "arith" and "int32" in f.fix


def test_int64_matmul_is_a_blocker_because_tensorrt_has_no_int64_matmul():
    model = _model([helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")],
                   [_vi("a", I64, [2, 2]), _vi("b", I64, [2, 2])], [_vi("y", I64, 2)])
    assert _only(check_trt(model), "int64-compute", "blocker")[0].node == "mm"


def test_int64_only_as_reshape_shape_is_fine():
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Reshape", ["x", "s"], ["y"], name="reshape"),
             helper.make_node("Reshape", ["y", "flat"], ["z"], name="flatten")]
    model = _model(nodes, [_vi("x", F, [2, 3])], [_vi("z", F, 1)],
                   [_init("flat", np.array([-1], np.int64))])
    assert check_trt(model).findings == []


# --------------------------------------------------------------------------- dynamic dims


def _dynamic(metadata: dict | None = None) -> onnx.ModelProto:
    model = _model([helper.make_node("Relu", ["x"], ["y"], name="r")],
                   [_vi("x", F, ["batch", 3])], [_vi("y", F, ["batch", 3])])
    if metadata is not None:
        helper.set_model_props(model, {"fxopt": json.dumps(metadata)})
    return model


def test_unbounded_dynamic_dim_is_a_warning():
    (f,) = _only(check_trt(_dynamic()), "unbounded-dynamic-dim", "warning")
    assert f.node == "x" and "batch" in f.message and "dim_bounds" in f.fix


def test_dim_bounds_argument_silences_the_warning():
    assert check_trt(_dynamic(), dim_bounds={"batch": (1, 8, 32)}).findings == []


def test_dim_bounds_from_metadata_props_silence_the_warning():
    assert check_trt(_dynamic({"dim_bounds": {"batch": [1, 4, 16]}})).findings == []


def test_explicit_dim_bounds_win_over_metadata():
    model = _dynamic({"dim_bounds": {"batch": [9, 4, 1]}})  # invalid, but overridden
    assert check_trt(model, dim_bounds={"batch": (1, 2, 4)}).findings == []


@pytest.mark.parametrize("bounds", [(8, 4, 32), (0, 1, 2), (1, 2), (1.0, 2, 3), "batch"])
def test_invalid_dim_bounds_raise(bounds):
    with pytest.raises(LoweringError, match="min <= opt <= max"):
        check_trt(_dynamic(), dim_bounds={"batch": bounds})
    with pytest.raises(LoweringError, match="metadata_props"):
        check_trt(_dynamic({"dim_bounds": {"batch": bounds}}))


# --------------------------------------------------------------------------- Q/DQ


def _qdq_activation(zp: np.ndarray | None, scale: np.ndarray, axis: int = 1,
                    zp_as_constant_node: bool = False) -> onnx.ModelProto:
    names = ["x", "s"] + (["zp"] if zp is not None else [])
    nodes = [helper.make_node("QuantizeLinear", names, ["q"], name="q", axis=axis),
             helper.make_node("DequantizeLinear", ["q", *names[1:]], ["y"], name="dq", axis=axis)]
    inits = [_init("s", scale)]
    if zp is not None and zp_as_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["zp"], value=_init("zp", zp)))
    elif zp is not None:
        inits.append(_init("zp", zp))
    return _model(nodes, [_vi("x", F, [1, 3, 4, 4])], [_vi("y", F, 4)], inits)


def test_symmetric_int8_qdq_is_clean():
    model = _qdq_activation(np.array(0, np.int8), np.array(0.1, np.float32))
    assert check_trt(model).findings == []


@pytest.mark.parametrize("as_constant_node", [False, True])
def test_asymmetric_qdq_is_a_blocker(as_constant_node):
    model = _qdq_activation(np.array(5, np.int8), np.array(0.1, np.float32),
                            zp_as_constant_node=as_constant_node)
    found = _only(check_trt(model), "qdq-asymmetric", "blocker")
    assert {f.node for f in found} == {"q", "dq"}


def test_uint8_qdq_is_a_dtype_blocker():
    model = _qdq_activation(np.array(0, np.uint8), np.array(0.1, np.float32))
    found = _only(check_trt(model, 11), "qdq-dtype", "blocker")
    assert {f.node for f in found} == {"q", "dq"} and "UINT8" in found[0].message


def test_per_channel_activation_qdq_is_a_blocker():
    model = _qdq_activation(np.zeros(3, np.int8), np.full(3, 0.1, np.float32))
    found = _only(check_trt(model), "qdq-activation-per-channel", "blocker")
    assert {f.node for f in found} == {"q", "dq"}


def _dq_weight(consumer: onnx.NodeProto, w_shape: list, axis: int, x_shape: list,
               as_constant_node: bool = False) -> onnx.ModelProto:
    n = w_shape[axis]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s", "w_zp"], ["w"], name="dq_w",
                              axis=axis), consumer]
    inits = [_init("w_q", np.ones(w_shape, np.int8)), _init("w_zp", np.zeros(n, np.int8))]
    if as_constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["w_s"],
                                         value=_init("w_s", np.full(n, 0.02, np.float32))))
    else:
        inits.append(_init("w_s", np.full(n, 0.02, np.float32)))
    return _model(nodes, [_vi("x", F, x_shape)], [_vi("y", F, len(x_shape))], inits)


@pytest.mark.parametrize("as_constant_node", [False, True])
def test_conv_weight_per_channel_on_the_wrong_axis_is_a_blocker(as_constant_node):
    conv = helper.make_node("Conv", ["x", "w"], ["y"], name="conv")
    model = _dq_weight(conv, [4, 3, 3, 3], 1, [1, 3, 8, 8], as_constant_node)
    (f,) = _only(check_trt(model), "qdq-weight-axis", "blocker")
    assert f.node == "dq_w" and "axis 0" in f.message
    assert check_trt(_dq_weight(conv, [4, 3, 3, 3], 0, [1, 3, 8, 8])).findings == []


def test_weight_axis_follows_gemm_transb_and_transpose_into_matmul():
    gemm = helper.make_node("Gemm", ["x", "w"], ["y"], name="fc", transB=1)
    assert check_trt(_dq_weight(gemm, [4, 6], 0, [2, 6])).findings == []
    _only(check_trt(_dq_weight(gemm, [4, 6], 1, [2, 6])), "qdq-weight-axis", "blocker")
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w", axis=0),
             helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "wt"], ["y"], name="mm")]
    inits = [_init("w_q", np.ones([4, 6], np.int8)), _init("w_s", np.full(4, 0.1, np.float32))]
    model = _model(nodes, [_vi("x", F, [2, 6])], [_vi("y", F, 2)], inits)
    assert check_trt(model).findings == []  # [N, K] weight, per N, transposed into MatMul


def test_int4_is_allowed_for_weight_only_dequantize_but_not_for_activations():
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_s"], ["w"], name="dq_w"),
             helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    inits = [_init("w_s", np.array(0.1, np.float32)),
             helper.make_tensor("w_q", TensorProto.INT4, [6, 4], np.ones(24, np.int8))]
    model = _model(nodes, [_vi("x", F, [2, 6])], [_vi("y", F, 2)], inits, opset=21)
    assert check_trt(model).findings == []
    zp4 = helper.make_tensor("zp", TensorProto.INT4, [], [0])
    nodes = [helper.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "s", "zp"], ["y"], name="dq")]
    model = _model(nodes, [_vi("x", F, [2, 6])], [_vi("y", F, 2)],
                   [_init("s", np.array(0.1, np.float32)), zp4], opset=21)
    assert {f.node for f in _only(check_trt(model), "qdq-dtype", "blocker")} == {"q", "dq"}


# --------------------------------------------------------------------------- real exports


class _CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1))
        self.fc = nn.Linear(16, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.features(x), 1))


class _FakeQuantCNN(nn.Module):
    """Symmetric int8 fake-quant: per-tensor activations, per-channel weights on axis 0 (the
    exporter turns each fake_quantize into QuantizeLinear + DequantizeLinear)."""

    def __init__(self):
        super().__init__()
        self.conv, self.fc = nn.Conv2d(3, 8, 3, padding=1), nn.Linear(8, 4)

    def forward(self, x):
        def act(t):
            return torch.fake_quantize_per_tensor_affine(t, 0.05, 0, -128, 127)

        def weight(w):
            n, zero = w.shape[0], torch.zeros(w.shape[0], dtype=torch.int32)
            return torch.fake_quantize_per_channel_affine(w, torch.full((n,), 0.01), zero, 0,
                                                          -128, 127)

        y = torch.relu(nn.functional.conv2d(act(x), weight(self.conv.weight), self.conv.bias,
                                            padding=1))
        return nn.functional.linear(act(y.mean((2, 3))), weight(self.fc.weight), self.fc.bias)


_EXPORTS = {
    "cnn": (_CNN, (2, 3, 16, 16)),
    "qdq_cnn": (_FakeQuantCNN, (2, 3, 16, 16)),
    "mlp": (lambda: nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 4)), (2, 16)),
    "transformer": (lambda: nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0,
                                                       batch_first=True), (2, 5, 32)),
}


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    folder, paths = tmp_path_factory.mktemp("trt_exports"), {}
    level = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            for name, (factory, shape) in _EXPORTS.items():
                torch.manual_seed(0)
                model = factory().eval()
                paths[name] = folder / f"{name}.onnx"
                torch.onnx.export(model, (torch.randn(shape),), paths[name], dynamo=True,
                                  verbose=False)
    finally:
        logging.disable(level)
    return paths


@pytest.mark.parametrize("version", [10, 11])
@pytest.mark.parametrize("name", list(_EXPORTS))
def test_clean_exports_have_no_findings(exported, name, version):
    report = check_trt(exported[name], trt_version=version)
    assert report.findings == [], report.format()
    ops = {n.op_type for n in onnx.load(exported[name]).graph.node}
    assert ("QuantizeLinear" in ops) is (name == "qdq_cnn")
    assert report.ok and report.path == str(exported[name])


# --------------------------------------------------------------------------- report and errors


def test_report_format_and_dict():
    nodes = [helper.make_node("Unique", ["x"], ["u"], name="uniq"),
             helper.make_node("Add", ["a", "a"], ["y"], name="add")]
    model = _model(nodes, [_vi("x", F, [5]), _vi("a", I64, ["n"])],
                   [_vi("u", F, 1), _vi("y", I64, 1)])
    report = check_trt(model)
    assert [f.code for f in report.blockers] == ["unsupported-op"]
    assert {f.code for f in report.warnings} == {"int64-compute", "unbounded-dynamic-dim"}
    text = report.format()
    assert text.index("unsupported-op") < text.index("int64-compute")
    assert "fix:" in text and "NOT ready (1 blocker, 2 warnings)" in text.splitlines()[-1]
    data = json.loads(json.dumps(report.to_dict()))
    assert data["ok"] is False and data["blockers"] == 1 and len(data["findings"]) == 3
    assert {"severity", "code", "node", "op_type", "message", "fix"} <= set(data["findings"][0])


def test_support_data_is_loaded_once_and_cites_sources():
    data = support_data()
    assert data is support_data()
    assert data["sources"] and all(s["url"].startswith("https://") for s in data["sources"])
    assert all(r.get("fix") for r in data["restrictions"])


def test_support_data_ships_as_package_data_beside_the_checker():
    # the JSON must move with the module and be named in pyproject's package-data, or an
    # installed (non-editable) fxopt has no support data at all
    import fxopt.trt_check

    here = Path(fxopt.trt_check.__file__).parent
    assert (here / "trt_onnx_support.json").is_file()
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    globs = pyproject["tool"]["setuptools"]["package-data"]["fxopt"]
    assert any(fnmatch.fnmatch("trt_onnx_support.json", g) for g in globs)


def test_non_onnx_file_raises(tmp_path):
    bad = tmp_path / "model.onnx"
    bad.write_text("this is not a protobuf, just text\n")
    with pytest.raises(LoweringError, match="not an ONNX model|cannot read"):
        check_trt(bad)


def test_missing_file_raises(tmp_path):
    with pytest.raises(LoweringError, match="no such file"):
        check_trt(tmp_path / "missing.onnx")


@pytest.mark.parametrize("version", [9, 12, "10", 10.0, True])
def test_unknown_trt_version_raises(version):
    with pytest.raises(LoweringError, match="trt_version"):
        check_trt(_unary("Relu"), trt_version=version)


# --------------------------------------------------------------------------- external data


def _external_model(folder: Path) -> Path:
    """int64 shape arithmetic whose types only shape inference knows, and an asymmetric Q/DQ
    whose zero point lives in the external data file."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Add", ["s", "s"], ["twice"], name="add64"),
             helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["q"], name="q"),
             helper.make_node("DequantizeLinear", ["q", "sc", "zp"], ["y"], name="dq")]
    model = _model(nodes, [_vi("x", F, [2, 3])], [_vi("y", F, 2), _vi("twice", I64, 1)],
                   [_init("sc", np.array(0.1, np.float32)), _init("zp", np.array(5, np.int8))])
    path = folder / "ext.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="ext.onnx.data", size_threshold=0)
    assert (folder / "ext.onnx.data").is_file()
    assert all(t.data_location == TensorProto.EXTERNAL
               for t in onnx.load(str(path), load_external_data=False).graph.initializer)
    return path


def _no_in_memory_inference(monkeypatch):
    """What a model over protobuf's 2 GB limit does to in-memory shape inference."""
    def refuse(*args, **kwargs):
        raise ValueError("Message onnx.ModelProto exceeds maximum protobuf size of 2GB")
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", refuse)


def test_external_data_model_is_checked_from_the_file(tmp_path, monkeypatch):
    path = _external_model(tmp_path)
    loads = []
    real_load = onnx.load
    monkeypatch.setattr(onnx, "load", lambda *a, **k: loads.append(k) or real_load(*a, **k))
    _no_in_memory_inference(monkeypatch)  # the file path is what must be used
    report = check_trt(path)
    codes = {(f.code, f.node) for f in report.findings}
    assert ("int64-compute", "add64") in codes  # types from infer_shapes_path
    assert {("qdq-asymmetric", "q"), ("qdq-asymmetric", "dq")} <= codes  # zp from .data
    assert loads and all(k.get("load_external_data") is False for k in loads)
    assert not [n for n in report.notes if n.startswith("could not")], report.notes


def test_failed_shape_inference_is_said_in_the_report(tmp_path, monkeypatch):
    model = onnx.load(str(_external_model(tmp_path)))  # an in-memory proto: no file path
    _no_in_memory_inference(monkeypatch)
    report = check_trt(model)
    assert "int64-compute" not in {f.code for f in report.findings}
    (note,) = [n for n in report.notes if n.startswith("could not run ONNX shape inference")]
    assert "2GB" in note and "int64 and rank checks" in note
    assert f"note: {note}" in report.format() and note in report.to_dict()["notes"]
    monkeypatch.setattr(onnx.shape_inference, "infer_shapes_path", lambda *a, **k: 1 / 0)
    from_file = check_trt(tmp_path / "ext.onnx")
    assert any("ZeroDivisionError" in n for n in from_file.notes), from_file.notes


def test_unreadable_external_value_is_a_note(tmp_path):
    path = _external_model(tmp_path)
    (tmp_path / "ext.onnx.data").unlink()
    report = check_trt(path)
    assert any(n.startswith("could not read the value of zp") for n in report.notes)
    assert "int64-compute" in {f.code for f in report.findings}  # inference still ran
