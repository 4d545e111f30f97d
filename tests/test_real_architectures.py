"""Published architectures end to end (issue 11): Hugging Face ``transformers`` models built
from small configs with seeded random weights (tests/real_architectures.py), each through
every stage a user runs, one test per stage so a failure names the stage:

    capture (auto) -> default -> eager artifact round trip -> ONNX (dynamic batch, in ONNX
    Runtime) -> static int8 (CNNs) / dynamic int8 (transformers) in ONNX Runtime
    -> half fp16 / bf16 -> ONNX

Every stage compares numbers against the model's own outputs. What cannot pass today is an
``xfail(strict=True)`` in ``XFAIL`` below with the error it fails with, so the fix that makes
it pass has to remove the entry. Models, captures and optimized graphs are built once per
module and shared by the stages; a failure is cached too, so the stages after a failed one
fail with the same error without redoing the work.
"""

from __future__ import annotations

import onnx
import pytest
import torch
from torch.utils import _pytree as pytree

import fxopt
from fxopt.ops import op_of
from fxopt.verify import EXACT, Tolerance, compare_outputs, cosine

transformers = pytest.importorskip("transformers")

from real_architectures import ARCHITECTURES  # noqa: E402  (needs transformers)

pytestmark = pytest.mark.slow  # every test builds a third-party model

CNNS = sorted(n for n, a in ARCHITECTURES.items() if a.family == "cnn")
TRANSFORMERS = sorted(n for n, a in ARCHITECTURES.items() if a.family != "cnn")
ALL = CNNS + TRANSFORMERS

# half precision vs the float32 model: fp16 keeps ~3 decimal digits, bf16 ~2
HALF_CHECK = {
    "fp16": Tolerance(rtol=3e-2, atol=1e-3, min_cosine=0.999),
    "bf16": Tolerance(rtol=1e-1, atol=1e-2, min_cosine=0.995),
}
# bf16 in ONNX Runtime: its CPU provider has no bfloat16 Conv, MatMul or Add kernels; one
# CNN and one text model say so (a skip naming the kernel) or, once it has them, verify
BF16_ONNX = ["convnext", "bert"]
# static int8: batches of 4 random images; 4 batches left ResNet's and RegNet's fresh-input
# cosine under 0.99 (ranges from 16 images do not cover unseen offsets), 16 reach it
CALIBRATION_BATCHES = 16
# pruned, then ONNX with a dynamic batch: Swin's window partition read through a pruned
# projection is a chain of reshapes that onnxscript's rewriter fused twice under one name
# (fixed in onnx_export.clean; the benchmarks' prune-coverage row found it)
PRUNED_ONNX = ["swin"]

# ---------------------------------------------------------------------------- known failures
_MOBILENET_HALF = (
    "half precision error grows over MobileNetV2's 16 inverted residuals (ReLU6 after "
    "every expansion) as int8's does, no single layer breaks: {observed}"
)
_INT8_CNN = (
    "static int8 of this random-weight CNN falls below the 0.99 cosine floor (random weights "
    "with data-driven BN amplify rounding noise layer after layer); ONNX Runtime's own "
    "quantize_static (QDQ, per-channel, MinMax) on the same fp32 export and calibration "
    "batches reaches {ort}: {observed}"
)

XFAIL: dict[tuple[str, str], tuple[str, type[BaseException]]] = {
    ("mobilenet-v2", "bf16"): (_MOBILENET_HALF.format(
        observed="\"PassError: pass half(dtype=bf16) changed the model's outputs: max abs "
                 "error 1.09 (relative 0.182, cosine 0.994456) exceeds the approximate "
                 "tolerance rtol=0.1, atol=0.01\" (HALF_BF16); it misses HALF_CHECK['bf16'] "
                 "too"), fxopt.PassError),
    ("mobilenet-v2", "fp16-onnx"): (_MOBILENET_HALF.format(
        observed="ONNX Runtime's fp16 file vs the float32 model: \"max abs 0.225 (relative "
                 "0.0707, cosine 0.999371)\" against HALF_CHECK['fp16'] (rtol 0.03) (onnx "
                 "1.23.2, onnxruntime 1.32.0: lowering's own check, ORT fp16 vs PyTorch fp16, "
                 "passes; it used to refuse the file, LoweringError at 0.031 of the scale "
                 "against 0.03, which either exception records)"),
        (fxopt.LoweringError, AssertionError)),
    ("mobilenet-v2", "int8"): (_INT8_CNN.format(
        ort="cosine 0.929 on the example inputs and 0.737 on fresh ones; fxopt 0.893 and "
            "0.749 in its own simulation",
        observed="\"PassError: pass quantize(scheme=int8) changed the model's outputs ...\"; "
                 "the float model alone loses to cosine 0.941 when only its input gets "
                 "half an 8-bit step of noise, and the error grows block by block over the "
                 "16 inverted residuals, no single quantizer breaks it (64 calibration "
                 "batches: 0.912 / 0.719; percentile, entropy, mse observers: no better)"),
        fxopt.PassError),
    ("efficientnet", "int8"): (_INT8_CNN.format(
        ort="cosine 0.954 / 0.923 on last_hidden_state and 0.0 on pooler_output; fxopt "
            "0.935 / 0.949 and 0.934 / 0.949",
        observed="\"PassError: pass quantize(scheme=int8) changed the model's outputs ...\"; "
                 "per-layer attribution: quantizing one activation alone (the input of a "
                 "squeeze-excite project conv, mul_3, or conv2d_16's output) costs 0.19 of "
                 "cosine each, more calibration batches do not converge (64: 0.880 / 0.954)"),
        fxopt.PassError),
}


def _params(names: list[str], stage: str, dtypes: tuple[str, ...] = ()) -> list:
    """``pytest.param`` per model (and dtype: the stage is then ``stage.format(dtype)``),
    carrying the strict xfail of a known failure."""
    out = []
    for name in names:
        for dtype in dtypes or (None,):
            known = XFAIL.get((name, stage.format(dtype)))
            marks = ([pytest.mark.xfail(strict=True, reason=known[0], raises=known[1])]
                     if known else [])
            args = (name, dtype) if dtypes else (name,)
            out.append(pytest.param(*args, marks=marks, id="-".join(a for a in args)))
    return out


# ---------------------------------------------------------------------------- shared state
class Case:
    """One architecture's model, inputs and derived graphs, each computed on first use."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.arch = ARCHITECTURES[name]
        self._memo: dict[str, tuple[bool, object]] = {}

    def _get(self, key: str, make):
        if key not in self._memo:
            try:
                self._memo[key] = (True, make())
            except Exception as e:  # cached: dependent stages fail with the same error
                self._memo[key] = (False, e)
        ok, value = self._memo[key]
        if not ok:
            raise value
        return value

    @property
    def model(self) -> torch.nn.Module:
        return self._get("model", self.arch.build)

    @property
    def inputs(self) -> tuple:
        return self.arch.make_inputs(2, seed=0)

    def fresh(self, batch: int = 2) -> tuple:
        """Inputs the graph has never seen, optionally at another batch size."""
        return self.arch.make_inputs(batch, seed=100 + batch)

    def reference(self, inputs: tuple) -> list[torch.Tensor]:
        with torch.no_grad():
            return _leaves(self.model(*inputs))

    @property
    def captured(self) -> torch.fx.GraphModule:
        return self._get("captured", lambda: fxopt.capture(self.model, self.inputs, mode="auto"))

    def optimized(self, pipeline: str = "default", **options) -> fxopt.OptimizeResult:
        return self._get(pipeline, lambda: fxopt.optimize(self.captured, self.inputs, pipeline,
                                                          **options))


@pytest.fixture(scope="module", autouse=True)
def _one_intra_op_thread():
    """These models are tiny: a second intra-op thread buys nothing, and on a shared 2-core
    machine two spinning threads per process made this module 5x slower (594 s vs 110 s)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cases():
    made: dict[str, Case] = {}

    def get(name: str) -> Case:
        if name not in made:
            made[name] = Case(name)
        return made[name]

    return get


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def _run(module, inputs: tuple) -> list[torch.Tensor]:
    with torch.no_grad():
        return [t.float() for t in _leaves(module(*inputs))]


def _assert_close(want, got, tolerance: Tolerance = EXACT, what: str = "") -> None:
    report = compare_outputs(want, got, tolerance)
    assert report.ok(), (
        f"{what}: max abs {report.max_abs:.3g} (relative {report.rel:.3g}, cosine "
        f"{report.cosine:.6f}, {report.structure_error or 'same structure'}) exceeds {tolerance}"
    )


def _cosines(want: list[torch.Tensor], got: list[torch.Tensor]) -> list[float]:
    assert [tuple(t.shape) for t in got] == [tuple(t.shape) for t in want]
    return [cosine(w, g) for w, g in zip(want, got)]


def _onnx_ops(path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for node in onnx.load(str(path), load_external_data=False).graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
    return counts


# ---------------------------------------------------------------------------- stages
@pytest.mark.parametrize("name", _params(ALL, "capture"))
def test_capture(name, cases):
    case = cases(name)
    gm = case.captured
    assert gm.meta["fxopt"]["capture"]["frontend"] in ("symbolic", "export")
    gm.graph.lint()
    for inputs in (case.inputs, case.fresh()):
        _assert_close(case.reference(inputs), _run(gm, inputs), what="captured graph")


@pytest.mark.parametrize("name", _params(ALL, "default"))
def test_default_pipeline(name, cases):
    case = cases(name)
    res = case.optimized("default")
    res.module.graph.lint()
    for inputs in (case.inputs, case.fresh()):
        _assert_close(case.reference(inputs), _run(res.module, inputs), what="default pipeline")
    if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in case.model.modules()):
        left = [n.name for n in res.module.graph.nodes
                if n.op.startswith("call") and op_of(n).kind == "batch_norm"]
        assert left == [], f"batch norms fold_bn left unfolded: {left}"


@pytest.mark.parametrize("name", _params(ALL, "eager"))
def test_eager_artifact_round_trip(name, cases, tmp_path):
    case = cases(name)
    gm = case.optimized("default").module
    fxopt.lower(gm, "eager", case.inputs, path=tmp_path / name)
    loaded = fxopt.load(tmp_path / name)
    for inputs in (case.inputs, case.fresh()):
        got = _run(loaded, inputs)
        _assert_close(_run(gm, inputs), got, Tolerance(rtol=1e-6, atol=0.0),
                      what="reloaded artifact vs the graph it was written from")
        _assert_close(case.reference(inputs), got, what="reloaded artifact vs the model")


@pytest.mark.parametrize("name", _params(ALL, "onnx"))
def test_onnx_dynamic_batch_in_onnx_runtime(name, cases, tmp_path):
    case = cases(name)
    gm = case.optimized("default").module
    path = tmp_path / f"{name}.onnx"
    art = fxopt.lower(gm, "onnx", case.inputs, path=path)
    assert len(art.manifest["verified"]) == 2, art.manifest["verified"]
    loaded = fxopt.load(path)
    for inputs in (case.inputs, case.fresh(batch=3)):  # batch 3: the file is dynamic there
        _assert_close(case.reference(inputs), _run(loaded, inputs), what="ONNX Runtime")


@pytest.mark.parametrize("name", _params(CNNS, "int8"))
def test_static_int8_cnn_in_onnx_runtime(name, cases, tmp_path):
    case = cases(name)
    calibration = [case.arch.make_inputs(4, seed=10 + i) for i in range(CALIBRATION_BATCHES)]
    res = case.optimized("default,quantize(scheme=int8)", calibration=calibration)
    path = tmp_path / f"{name}-int8.onnx"
    fxopt.lower(res.module, "onnx", case.inputs, path=path)
    ops = _onnx_ops(path)
    convs = sum(op_of(n).kind == "conv" for n in case.optimized("default").module.graph.nodes
                if n.op.startswith("call"))
    assert ops.get("QuantizeLinear", 0) >= convs and ops.get("DequantizeLinear", 0) >= convs, ops
    loaded = fxopt.load(path)
    for inputs in (case.inputs, case.fresh(batch=3)):
        cos = _cosines(case.reference(inputs), _run(loaded, inputs))
        assert min(cos) >= 0.99, f"int8 in ONNX Runtime vs float: output cosines {cos}"


@pytest.mark.parametrize("name", _params(TRANSFORMERS, "int8"))
def test_dynamic_int8_transformer_in_onnx_runtime(name, cases, tmp_path):
    case = cases(name)
    res = case.optimized("default,quantize(scheme=dynamic_int8)")
    path = tmp_path / f"{name}-dynamic-int8.onnx"
    fxopt.lower(res.module, "onnx", case.inputs, path=path)
    ops = _onnx_ops(path)
    assert ops.get("DynamicQuantizeLinear", 0) >= 1 and ops.get("MatMulInteger", 0) >= 4, ops
    loaded = fxopt.load(path)
    for inputs in (case.inputs, case.fresh(batch=3)):
        cos = _cosines(case.reference(inputs), _run(loaded, inputs))
        assert min(cos) >= 0.99, f"dynamic int8 in ONNX Runtime vs float: output cosines {cos}"


def _half_graph(case: Case, dtype: str) -> torch.fx.GraphModule:
    return case.optimized(f"default,half(dtype={dtype})").module


@pytest.mark.parametrize(
    ("name", "dtype"), _params(ALL, "{}", ("fp16", "bf16")))
def test_half(name, dtype, cases):
    case = cases(name)
    gm = _half_graph(case, dtype)
    want = getattr(torch, {"fp16": "float16", "bf16": "bfloat16"}[dtype])
    sizes: dict[torch.dtype, int] = {}
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.is_floating_point():
            sizes[t.dtype] = sizes.get(t.dtype, 0) + t.numel()
    assert sizes.get(want, 0) > 0.95 * sum(sizes.values()), sizes
    inputs = case.fresh()  # the pass itself checked the example inputs
    _assert_close(case.reference(inputs), _run(gm, inputs), HALF_CHECK[dtype],
                  what=f"{dtype} graph vs the float32 model")


@pytest.mark.parametrize("name", _params(ALL, "fp16-onnx"))
def test_fp16_onnx_in_onnx_runtime(name, cases, tmp_path):
    case = cases(name)
    gm = _half_graph(case, "fp16")
    path = tmp_path / f"{name}-fp16.onnx"
    # exporter="dynamo": the TorchScript fallback would repeat the same refused verification
    fxopt.lower(gm, "onnx", case.inputs, path=path, exporter="dynamo")
    proto = onnx.load(str(path))
    sizes = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for init in proto.graph.initializer:
        if init.data_type in sizes:
            sizes[init.data_type] += len(init.raw_data)
    assert sizes[onnx.TensorProto.FLOAT16] > 0.95 * sum(sizes.values()), sizes
    loaded = fxopt.load(path)
    for inputs in (case.inputs, case.fresh(batch=3)):
        _assert_close(case.reference(inputs), _run(loaded, inputs), HALF_CHECK["fp16"],
                      what="fp16 ONNX in ONNX Runtime vs the float32 model")


@pytest.mark.parametrize("name", _params(BF16_ONNX, "bf16-onnx"))
def test_bf16_onnx_in_onnx_runtime(name, cases, tmp_path):
    case = cases(name)
    gm = _half_graph(case, "bf16")
    path = tmp_path / f"{name}-bf16.onnx"
    try:
        fxopt.lower(gm, "onnx", case.inputs, path=path, exporter="dynamo")
    except fxopt.LoweringError as e:
        msg = str(e)
        missing = ("Could not find an implementation for", "Type 'tensor(bfloat16)'")
        if any(m in msg for m in missing):
            assert "no bfloat16 kernel for" in msg, msg  # the typed error names the kernel
            pytest.skip("ONNX Runtime's CPU provider has no bfloat16 kernel here: "
                        + msg[msg.find("(no bfloat16 kernel"):][:200])
        raise
    loaded = fxopt.load(path)
    for inputs in (case.inputs, case.fresh(batch=3)):
        _assert_close(case.reference(inputs), _run(loaded, inputs), HALF_CHECK["bf16"],
                      what="bf16 ONNX in ONNX Runtime vs the float32 model")



@pytest.mark.parametrize("name", _params(PRUNED_ONNX, "prune-onnx"))
def test_pruned_onnx_dynamic_batch_in_onnx_runtime(name, cases, tmp_path):
    case = cases(name)
    gm = case.optimized("prune(ratio=0.5)").module
    path = tmp_path / f"{name}-pruned.onnx"
    # exporter="dynamo": the TorchScript fallback fixes the batch of a torch.export graph
    art = fxopt.lower(gm, "onnx", case.inputs, path=path, exporter="dynamo")
    assert len(art.manifest["verified"]) == 2, art.manifest["verified"]
    dims = onnx.load(str(path), load_external_data=False).graph.input[0].type.tensor_type
    assert dims.shape.dim[0].dim_param == "batch"
    loaded = fxopt.load(path)
    for inputs in (case.inputs, case.fresh(batch=3)):
        _assert_close(_run(gm, inputs), _run(loaded, inputs),
                      what="pruned ONNX in ONNX Runtime vs the pruned graph")
