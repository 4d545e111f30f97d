"""Static int8: Q/DQ placement per target, calibration, numerics, ONNX export with int8
kernels in ONNX Runtime's optimized graph, TensorRT readiness, and every user mistake."""

from __future__ import annotations

import collections

import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
from torch import nn

import fxopt
import fxopt.progress
from fxopt.errors import LoweringError, QuantizationError
from fxopt.ops import op_of
from fxopt.quant import static
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.verify import cosine

CNNS = ["resnet", "mobilenet", "densenet", "shufflenet"]


def _calibration(zoo_model, name: str, batches: int = 4) -> list[tuple]:
    from fxopt import zoo

    spec = zoo.get(name)
    gen = torch.Generator().manual_seed(1)
    _, inputs = zoo_model(name)
    out = []
    for _ in range(batches):
        out.append(tuple(torch.randn(x.shape, generator=gen) if x.is_floating_point() else x
                         for x in inputs))
    return out if spec else out


def _quantized(zoo_model, name: str, target: str, mode: str = "auto", **options):
    model, inputs = zoo_model(name)
    opts = ",".join(f"{k}={v}" for k, v in options.items())
    pipeline = f"default,quantize(scheme=int8,target={target}{',' + opts if opts else ''})"
    res = fxopt.optimize(model, inputs, pipeline, mode=mode,
                         calibration=[inputs] + _calibration(zoo_model, name))
    return model, inputs, res


def _fq_users(gm: fx.GraphModule) -> collections.Counter:
    """How many fake-quant nodes feed each op kind."""
    fqs = {p for p, m in gm.named_modules() if isinstance(m, FakeQuantize)}
    counts: collections.Counter = collections.Counter()
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in fqs:
            for u in n.users:
                counts[op_of(u).kind if u.op != "output" else "output"] += 1
    return counts


def _optimized_ops(path) -> collections.Counter:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    so.optimized_model_filepath = str(path) + ".opt.onnx"
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("name", CNNS)
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_ort_int8_cnn_is_close_exports_and_runs_int8_kernels(zoo_model, tmp_path, name, mode):
    model, inputs, res = _quantized(zoo_model, name, "ort", mode)
    gm = res.module
    gm.graph.lint()
    with torch.no_grad():
        assert cosine(model(*inputs), gm(*inputs)) > 0.995
    users = _fq_users(gm)
    convs = sum(1 for n in gm.graph.nodes if op_of(n).kind == "conv")
    assert users["conv"] >= 2 * convs  # every conv: a quantized input and a quantized weight
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx")
    assert art.manifest["exporter"] == "dynamo"
    kernels = _optimized_ops(art.path)
    assert kernels["QLinearConv"] >= convs - 1, kernels


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "transformer"])
def test_tensorrt_placement_is_symmetric_and_passes_check_trt(zoo_model, tmp_path, name):
    model, inputs, res = _quantized(zoo_model, name, "tensorrt")
    gm = res.module
    for fq in (m for m in gm.modules() if isinstance(m, FakeQuantize)):
        assert fq.signed and fq.symmetric and bool((fq.zero_point == 0).all())
        assert fq.axis in (None, 0)
    users = _fq_users(gm)
    assert set(users) <= {"conv", "linear", "matmul", "add"}, users
    with torch.no_grad():
        assert cosine(model(*inputs), gm(*inputs)) > 0.995
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx",
                      dim_bounds={"batch": (1, 2, 8)})
    report = fxopt.check_trt(art.path)
    assert not [f for f in report.findings if f.code.startswith("qdq")], report.format()


def test_tensorrt_quantizes_the_residual_input_of_adds(zoo_model):
    _, _, res = _quantized(zoo_model, "resnet", "tensorrt")
    adds = [n for n in res.module.graph.nodes if op_of(n).kind == "add"]
    residual = [a for n in adds for a in n.all_input_nodes if op_of(a).kind != "conv"]
    assert residual and all(a.op == "call_module" and "fq" in a.target for a in residual)


def test_ort_places_qdq_around_add_cat_and_pooling(zoo_model):
    _, _, res = _quantized(zoo_model, "densenet", "ort")
    users = _fq_users(res.module)
    assert users["cat"] > 0 and users["conv"] > 0


@pytest.mark.parametrize("observer", ["minmax", "moving_average", "percentile", "entropy", "mse"])
def test_observers_are_selectable(zoo_model, observer):
    model, inputs, res = _quantized(zoo_model, "resnet", "ort", observer=observer)
    kinds = {m.observer_kind for m in res.module.modules() if isinstance(m, FakeQuantize)}
    assert observer in kinds
    with torch.no_grad():
        assert cosine(model(*inputs), res.module(*inputs)) > 0.99


def test_skip_keeps_named_layers_in_float(zoo_model):
    _, _, res = _quantized(zoo_model, "resnet", "ort", skip="['fc', 'stem*']")
    stats = next(r for r in res.report.to_dict() if r["name"] == "quantize")
    skipped = stats["stats"]["skipped"]
    assert any(s.startswith("fc") for s in skipped) and any(s.startswith("stem") for s in skipped)


def test_calibrate_api_with_a_dataloader_and_progress(zoo_model, capsys, tmp_path):
    model, inputs = zoo_model("resnet")
    gm = fxopt.optimize(model, inputs, "default").module
    static.prepare(gm, "ort")
    x = torch.randn(16, *inputs[0].shape[1:])
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(x, torch.zeros(16)), batch_size=4)
    assert fxopt.calibrate(gm, loader, progress="always") == 4
    err = capsys.readouterr().err
    assert "calibrating" in err and "/4 [" in err  # a tqdm bar over 4 batches, asked for
    # calibrate only observes; freezing is its own step, and lowering before it is refused
    assert any(m.mode == "observe" for m in gm.modules() if isinstance(m, FakeQuantize))
    with pytest.raises(LoweringError, match=r"still observing.*freeze_calibration\(gm\)"):
        fxopt.lower(gm, "eager", inputs, path=tmp_path / "unfrozen")
    assert not (tmp_path / "unfrozen").exists()
    assert fxopt.freeze_calibration(gm) > 0
    assert all(m.mode == "quantize" for m in gm.modules() if isinstance(m, FakeQuantize))
    fxopt.lower(gm, "eager", inputs, path=tmp_path / "frozen")


def test_calibrate_is_quiet_unless_asked(zoo_model, capsys):
    model, inputs = zoo_model("mlp")
    gm = fxopt.optimize(model, inputs, "default").module
    static.prepare(gm, "ort")
    assert fxopt.calibrate(gm, [inputs] * 3) == 3
    assert capsys.readouterr() == ("", "")
    previous = fxopt.progress.show_progress("always")
    try:
        static.calibrate(gm, [inputs] * 2)
    finally:
        fxopt.progress.show_progress(previous)
    assert "calibrating" in capsys.readouterr().err
    static.calibrate(gm, [inputs] * 2, progress=True)  # a terminal only: not here
    assert capsys.readouterr().err == ""


def test_eager_artifact_runs_the_simulated_quantization_and_reloads(zoo_model, tmp_path):
    _, inputs, res = _quantized(zoo_model, "mobilenet", "ort")
    fxopt.lower(res.module, "eager", inputs, path=tmp_path / "q")
    again = fxopt.load(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(again(*inputs), res.module(*inputs))


# --------------------------------------------------------------------------- mistakes


def test_no_calibration_data_is_a_typed_error(zoo_model):
    model, inputs = zoo_model("resnet")
    with pytest.raises(QuantizationError, match="calibration=batches"):
        fxopt.optimize(model, inputs, "default,quantize(scheme=int8)")


class Branchy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x, use_b):
        return self.b(x) if use_b else self.a(x)


def test_observer_never_fed_names_the_layer():
    gm = fx.symbolic_trace(Branchy(), concrete_args={"use_b": False})
    gm2 = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    static.prepare(gm2, "ort")
    fq = next(m for m in gm2.modules() if isinstance(m, FakeQuantize) and m.mode == "observe")
    with pytest.raises(QuantizationError, match="never fed"):
        fq.freeze(where="x")
    with pytest.raises(QuantizationError, match="empty"):
        static.calibrate(gm2, [], progress=False)
    assert gm is not None


class IntOnly(nn.Module):
    def forward(self, x):
        return (x * 3 + 1) // 2


def test_integer_only_model_and_double_quantization_are_refused(zoo_model):
    ids = torch.arange(8).reshape(2, 4)
    with pytest.raises(QuantizationError, match="nothing to quantize"):
        fxopt.optimize(IntOnly(), (ids,), "quantize(scheme=int8)", calibration=[(ids,)])
    _, inputs, res = _quantized(zoo_model, "resnet", "ort")
    with pytest.raises(QuantizationError, match="already quantized"):
        fxopt.optimize(res.module, inputs, "quantize(scheme=int8)", calibration=[inputs])


@pytest.mark.parametrize("spec,match", [
    ("quantize(scheme=int3)", "unknown scheme"),
    ("quantize(scheme=int8,target=tflite)", "unknown target"),
    ("quantize(scheme=int8,observer=magic)", "magic"),
])
def test_bad_options(zoo_model, spec, match):
    model, inputs = zoo_model("mlp")
    with pytest.raises(QuantizationError, match=match):
        fxopt.optimize(model, inputs, spec, calibration=[inputs])


def test_no_deprecation_warning_reaches_the_user(zoo_model, recwarn):
    _quantized(zoo_model, "resnet", "ort")
    assert not [w for w in recwarn if issubclass(w.category, (DeprecationWarning, FutureWarning))]


class Conv1DBlock(nn.Module):
    """GPT-2's Conv1D twice: ``addmm(bias, x, W)`` with ``W`` stored ``[in, out]``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 32) / 4), nn.Parameter(torch.randn(32))
        self.w2, self.b2 = nn.Parameter(torch.randn(32, 16) / 6), nn.Parameter(torch.randn(16))

    def forward(self, x):
        h = torch.addmm(self.b1, x, self.w1)
        return torch.addmm(self.b2, torch.relu(h), self.w2)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_addmm_weights_are_quantized_per_output_column_and_export(tmp_path, mode):
    model, x = Conv1DBlock().eval(), torch.randn(8, 16)
    calibration = [(torch.randn(8, 16),) for _ in range(4)]
    res = fxopt.optimize(model, (x,), "quantize(scheme=int8)", mode=mode,
                         calibration=calibration)
    gm = res.module
    fqs = {n.args[0].target: gm.get_submodule(n.target) for n in gm.graph.nodes
           if n.op == "call_module" and n.target.endswith("weight_fq")}
    assert len(fqs) == 2
    for fq in fqs.values():
        assert fq.axis == 1  # the stored [in, out] weight's output columns
    for target, fq in fqs.items():
        w = fetch(gm, target)
        assert fq.scale.flatten().shape == (w.shape[1],)
        with torch.no_grad():
            steps = fq(w) / fq.scale.flatten()[None, :]  # whole steps of its column's scale
        torch.testing.assert_close(steps, steps.round(), rtol=0, atol=1e-4)
        assert steps.abs().max() <= 128
    with torch.no_grad():
        assert cosine(model(x), gm(x)) > 0.99
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "m.onnx")
    kernels = _optimized_ops(art.path)
    assert kernels["DequantizeLinear"] + kernels["MatMulIntegerToFloat"] + \
        kernels["QLinearMatMul"] >= 2, kernels



def fetch(gm: fx.GraphModule, target: str) -> torch.Tensor:
    from fxopt.ops import fetch_attr

    return fetch_attr(gm, target)
