"""Dynamic int8 quantization: the eager op matches ONNX Runtime bit for bit, the rewrite
covers every linear of the transformer zoo in both capture modes, and the ONNX export
runs on ORT's integer kernels."""

from __future__ import annotations

import copy
import functools
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from onnx import TensorProto, helper, numpy_helper

import fxopt
from fxopt.errors import QuantizationError
from fxopt.ops import count_kinds, fetch_attr, kind_of
from fxopt.quant.dynamic import (
    OP,
    apply_dynamic_int8,
    dynamic_int8_linear,
    dynamic_quantize_linear,
    quantize_weight,
)
from fxopt.quant.select import layer_name

ZOO = [(name, mode) for name in ("transformer", "gqa", "mlp") for mode in ("symbolic", "export")]
INTEGER_KERNELS = {"MatMulInteger", "DynamicQuantizeMatMul", "MatMulIntegerToFloat"}


# --------------------------------------------------------------------------- references


def _numpy_reference(
    x: np.ndarray, w_t: np.ndarray, w_scale: np.ndarray, bias: np.ndarray | None
) -> np.ndarray:
    """ONNX DynamicQuantizeLinear + MatMulInteger + Cast + Mul + Add, written from the spec."""
    lo, hi = np.float32(min(x.min(), 0)), np.float32(max(x.max(), 0))
    scale = np.float32(1.0) if lo == hi else np.float32((hi - lo) / np.float32(255))
    zp = np.rint(np.clip(np.float32(0) - lo / scale, 0, 255))
    xq = np.clip(np.rint(x / scale) + zp, 0, 255).astype(np.int64)
    acc = (xq - int(zp)) @ w_t.astype(np.int64)  # exact integers, like MatMulInteger's int32
    y = acc.astype(np.float32) * (scale * w_scale)
    return y if bias is None else y + bias


def _tie_inputs(shape: tuple, seed: int) -> np.ndarray:
    """Values on exact rounding ties: scale is 2**-6, every x / scale ends in .5, and the
    zero point -min / scale is 100.5 (rounds to 100, half to even)."""
    g = np.random.default_rng(seed)
    u = 2.0**-6
    x = ((g.integers(-100, 154, size=shape) + 0.5) * u).astype(np.float32)
    x.flat[0], x.flat[1] = -100.5 * u, 154.5 * u
    return x


def _ort_model(w_t: np.ndarray, w_scale: np.ndarray, bias: np.ndarray) -> bytes:
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xzp"]),
        helper.make_node("MatMulInteger", ["xq", "w", "xzp"], ["acc"]),
        helper.make_node("Cast", ["acc"], ["accf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xs", "s"], ["scale"]),
        helper.make_node("Mul", ["accf", "scale"], ["y0"]),
        helper.make_node("Add", ["y0", "b"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "dq",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(a, n) for a, n in ((w_t, "w"), (w_scale, "s"), (bias, "b"))],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString()


@pytest.mark.parametrize("k", [300, 600])  # float32 and float64 exact accumulation paths
@pytest.mark.parametrize("per_channel", [True, False])
def test_op_matches_numpy_and_onnxruntime_exactly(k, per_channel):
    x = _tie_inputs((3, 5, k), seed=k)
    assert np.any(np.abs(np.modf(x / np.float32(2.0**-6))[0]) == 0.5)  # ties are present
    w_q, w_scale = quantize_weight(torch.randn(48, k), per_channel)
    w_t, bias = w_q.t().contiguous(), torch.randn(48)
    got = dynamic_int8_linear(torch.from_numpy(x), w_t, w_scale, bias).numpy()
    assert got.shape == (3, 5, 48) and got.dtype == np.float32
    want = _numpy_reference(x, w_t.numpy(), w_scale.numpy(), bias.numpy())
    np.testing.assert_array_equal(got, want)
    for level in (
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    ):
        options = ort.SessionOptions()
        options.graph_optimization_level = level
        session = ort.InferenceSession(
            _ort_model(w_t.numpy(), w_scale.numpy(), bias.numpy()),
            options,
            providers=["CPUExecutionProvider"],
        )
        np.testing.assert_array_equal(session.run(None, {"x": x})[0], got)


def test_quantize_linear_matches_spec_on_random_data_and_edge_cases():
    for x in (torch.randn(7, 33), torch.rand(50) + 1.0, -torch.rand(50), torch.zeros(4)):
        q, s, zp = dynamic_quantize_linear(x)
        xn = x.numpy()
        lo, hi = np.float32(min(xn.min(), 0)), np.float32(max(xn.max(), 0))
        scale = np.float32(1.0) if lo == hi else np.float32((hi - lo) / np.float32(255))
        want_zp = np.rint(np.clip(-lo / scale, 0, 255))
        assert s.item() == scale and zp.item() == want_zp
        np.testing.assert_array_equal(q.numpy(), np.clip(np.rint(xn / scale) + want_zp, 0, 255))
    out = dynamic_int8_linear(
        torch.randn(0, 8), torch.zeros(8, 3, dtype=torch.int8), torch.ones(3), None
    )
    assert out.shape == (0, 3)


def test_weight_quantization_is_symmetric_per_channel_or_per_tensor():
    w = torch.randn(16, 32) * torch.linspace(0.1, 4.0, 16)[:, None]
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (16,)
    assert q.abs().amax(dim=1).eq(127).all()
    torch.testing.assert_close(q.float() * s[:, None], w, atol=s.max().item() / 2, rtol=0)
    q1, s1 = quantize_weight(w, per_channel=False)
    assert s1.shape == (1,) and q1.abs().max() == 127
    q2, s2 = quantize_weight(w, reduce_range=True)  # no u8s8 16-bit saturation on AVX2
    assert q2.abs().amax(dim=1).eq(64).all()
    torch.testing.assert_close(q2.float() * s2[:, None], w, atol=s2.max().item() / 2, rtol=0)


# --------------------------------------------------------------------------- zoo


@functools.cache
def _optimized(name: str, mode: str) -> tuple[fx.GraphModule, tuple]:
    model, inputs = fxopt.zoo.load(name)
    return fxopt.optimize(model, inputs, "default", mode=mode).module, inputs


def _case(name: str, mode: str) -> tuple[fx.GraphModule, tuple]:
    gm, inputs = _optimized(name, mode)
    return copy.deepcopy(gm), inputs


def _state_bytes(gm: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in gm.state_dict().values())


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0).item()


def _optimized_ort_ops(path, tmp_path) -> Counter:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "ort_optimized.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("name,mode", ZOO)
def test_zoo_all_linears_quantized_accurate_and_exported(name, mode, tmp_path):
    gm, inputs = _case(name, mode)
    linears, macs = count_kinds(gm)["linear"], fxopt.inspect(gm).macs
    with torch.no_grad():
        ref = gm(*inputs)
    bytes_before = _state_bytes(gm)

    stats = apply_dynamic_int8(gm)

    gm.graph.lint()
    kinds = count_kinds(gm)
    # gqa's q/k/v read one input: each triple shares one int8 matmul
    assert [len(g) for g in stats["fused"]] == ([3, 3] if name == "gqa" else [])
    int8_ops = linears - sum(len(g) - 1 for g in stats["fused"])
    assert kinds["linear"] == 0 and kinds["dynamic_int8_linear"] == int8_ops
    assert len(stats["quantized"]) == linears
    assert fxopt.inspect(gm).macs == macs  # the op table knows the new op
    attention = [s for s in stats["skipped"] if "MultiheadAttention" in s["reason"]]
    assert len(attention) == (2 if (name, mode) == ("transformer", "symbolic") else 0)
    with torch.no_grad():
        out = gm(*inputs)
    assert _cosine(out, ref) >= 0.99
    before, after = stats["weight_bytes_before"], stats["weight_bytes_after"]
    assert 3.5 < before / after <= 4
    assert bytes_before - _state_bytes(gm) == before - after  # float weights are gone

    path = tmp_path / "model.onnx"
    # default tolerance (rtol 1e-4); a dynamic batch, verified again at another batch size,
    # in one capture mode is enough: the other exports static to keep the suite fast
    art = fxopt.lower(gm, "onnx", inputs, path=path, dynamic=mode == "export")
    assert art.manifest["exporter"] == "dynamo"
    ops = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert ops["MatMulInteger"] == int8_ops
    assert 0 < ops["DynamicQuantizeLinear"] <= int8_ops
    optimized = _optimized_ort_ops(path, tmp_path)
    assert sum(optimized[k] for k in INTEGER_KERNELS) == int8_ops, optimized


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_fused_projections_compute_what_separate_layers_compute(mode, tmp_path):
    gm, inputs = _case("gqa", mode)
    apart = copy.deepcopy(gm)
    assert apply_dynamic_int8(apart, fuse=False)["fused"] == []
    stats = apply_dynamic_int8(gm, skip=["blocks.1.attn.q_proj"])
    gm.graph.lint()
    assert stats["fused"] == [["blocks.0.attn.q_proj", "blocks.0.attn.k_proj",
                               "blocks.0.attn.v_proj"],
                              ["blocks.1.attn.k_proj", "blocks.1.attn.v_proj"]]
    assert count_kinds(gm)["linear"] == 1  # the skipped q_proj
    joined = next(n for n in gm.graph.nodes if n.target is OP)
    assert fetch_attr(gm, joined.args[1].target).shape == (64, 64 + 32 + 32)
    assert joined.meta["fxopt_module_path"] == "blocks.0.attn"
    apart = _case("gqa", mode)[0]
    apply_dynamic_int8(apart, skip=["blocks.1.attn.q_proj"], fuse=False)
    for seed in (3, 4):
        x = (torch.randn(3, 16, 64, generator=torch.Generator().manual_seed(seed)),)
        with torch.no_grad():
            assert torch.equal(gm(*x), apart(*x))  # bit for bit
    per_tensor = _case("gqa", mode)[0]
    apply_dynamic_int8(per_tensor, per_channel=False)  # scales differ per fused layer
    ref = _case("gqa", mode)[0]
    apply_dynamic_int8(ref, per_channel=False, fuse=False)
    with torch.no_grad():
        assert torch.equal(per_tensor(*inputs), ref(*inputs))
    fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", dynamic=mode == "export")


def test_skip_pattern_keeps_matching_layers_float():
    gm, inputs = _case("transformer", "export")
    stats = apply_dynamic_int8(gm, skip=["blocks.0.*"])
    float_layers = {layer_name(n) for n in gm.graph.nodes if kind_of(n) == "linear"}
    assert float_layers == {"blocks.0.attn", "blocks.0.mlp.0", "blocks.0.mlp.3"}
    assert {s["layer"] for s in stats["skipped"]} == float_layers
    assert all(s["reason"] == "matched skip" for s in stats["skipped"])
    assert not any(q.startswith("blocks.0.") for q in stats["quantized"])
    assert "head" in stats["quantized"] and len(stats["quantized"]) == 5
    gm.graph.lint()


def test_only_selects_layers_per_tensor_reduced_range_exports(tmp_path):
    gm, inputs = _case("gqa", "symbolic")
    stats = apply_dynamic_int8(gm, only=["*.mlp.*", "head"], per_channel=False, reduce_range=True)
    assert sorted(stats["quantized"]) == sorted(
        ["blocks.0.mlp.0", "blocks.0.mlp.2", "blocks.1.mlp.0", "blocks.1.mlp.2", "head"]
    )
    assert count_kinds(gm)["linear"] == 8  # the attention projections stay float
    layers = [n for n in gm.graph.nodes if n.target is OP]
    assert all(fetch_attr(gm, n.args[2].target).shape == (1,) for n in layers)
    assert all(fetch_attr(gm, n.args[1].target).abs().max() <= 64 for n in layers)
    fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", dynamic=False)


def test_no_linear_raises_and_leaves_graph_unchanged():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()).eval()
    gm = fxopt.capture(model, (torch.randn(1, 3, 8, 8),), mode="symbolic")
    code = gm.code
    with pytest.raises(QuantizationError, match="nothing to quantize"):
        apply_dynamic_int8(gm)
    assert gm.code == code


def test_everything_skipped_raises_nothing_to_quantize():
    gm, _ = _case("mlp", "symbolic")
    code = gm.code
    with pytest.raises(QuantizationError, match="nothing to quantize.*matched skip"):
        apply_dynamic_int8(gm, skip=["*"])
    assert gm.code == code


def test_applying_twice_raises_already_quantized():
    gm, _ = _case("mlp", "export")
    apply_dynamic_int8(gm)
    with pytest.raises(QuantizationError, match="already quantized"):
        apply_dynamic_int8(gm)


class SharedWeights(nn.Module):
    """``x @ W`` with a constant W, one Linear called twice, a second Linear tied to its
    weight with a bias of its own, and an output head tied to the embedding."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.w = nn.Parameter(torch.randn(32, 32) / 6)
        self.a, self.b = nn.Linear(32, 32), nn.Linear(32, 32)
        self.b.weight = self.a.weight
        with torch.no_grad():
            self.b.bias.fill_(3.0)  # a mixed-up bias would show in the output

    def forward(self, ids):
        h = torch.relu(self.embed(ids) @ self.w)
        h = self.a(h) + self.b(h) + self.a(h.flip(-1))
        return nn.functional.linear(h, self.embed.weight)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_matmul_with_constant_weight_and_shared_weights(mode, tmp_path):
    model, ids = SharedWeights().eval(), torch.randint(0, 50, (2, 7))
    gm = fxopt.capture(model, (ids,), mode=mode)
    with torch.no_grad():
        ref = gm(ids)
    stats = apply_dynamic_int8(gm)
    assert len(stats["quantized"]) == 5 and count_kinds(gm)["matmul"] == 0
    int8 = [t for t in gm.state_dict().values() if t.dtype == torch.int8]
    assert len(int8) == 3  # one copy per distinct weight: w, a.weight (x3 layers), embed
    assert count_kinds(gm)["embedding"] == 1  # the tied embedding weight stays float...
    assert stats["weight_bytes_before"] == (32 * 32 * 2 + 50 * 32) * 4
    assert stats["weight_bytes_after"] >= 50 * 32 * 4  # ... and is counted as still held
    with torch.no_grad():
        assert _cosine(gm(ids), ref) >= 0.99
    fxopt.lower(gm, "onnx", (ids,), path=tmp_path / "m.onnx", dynamic=False)


class ComputedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(16, 8))
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(nn.functional.linear(x, self.w.t()))


def test_weight_computed_in_graph_is_skipped_with_reason():
    x = torch.randn(3, 16)
    gm = fxopt.capture(ComputedWeight().eval(), (x,), mode="symbolic")
    stats = apply_dynamic_int8(gm)
    assert stats["quantized"] == ["fc"]
    assert [s["reason"] for s in stats["skipped"]] == [
        "the weight is computed in the graph, not a constant"
    ]
    assert count_kinds(gm)["linear"] == 1


class Conv1DBlock(nn.Module):
    """GPT-2's MLP: two Conv1D layers, ``addmm(bias, x, W)`` with ``W`` stored ``[in, out]``."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 32) / 4), nn.Parameter(torch.randn(32))
        self.w2, self.b2 = nn.Parameter(torch.randn(32, 16) / 6), nn.Parameter(torch.randn(16))

    def forward(self, x):
        h = torch.addmm(self.b1, x.reshape(-1, 16), self.w1)
        h = torch.addmm(self.b2, torch.nn.functional.gelu(h), self.w2)
        return h.reshape(2, 5, 16)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_addmm_layers_quantized_like_linear_and_exported(mode, tmp_path):
    model, x = Conv1DBlock().eval(), torch.randn(2, 5, 16)
    gm = fxopt.capture(model, (x,), mode=mode)
    with torch.no_grad():
        ref = gm(x)
    stats = apply_dynamic_int8(gm)
    kinds = count_kinds(gm)
    assert len(stats["quantized"]) == 2 and kinds["dynamic_int8_linear"] == 2
    assert not kinds["linear"] and not kinds["opaque"]
    # the int8 weights are the [in, out] matrices themselves, quantized per output column
    (q1, s1), (q2, s2) = quantize_weight(model.w1.t()), quantize_weight(model.w2.t())
    int8 = sorted((t for t in gm.state_dict().values() if t.dtype == torch.int8), key=len)
    assert [tuple(t.shape) for t in int8] == [(16, 32), (32, 16)]
    assert torch.equal(int8[0], q1.t()) and torch.equal(int8[1], q2.t())
    assert stats["weight_bytes_before"] == (16 * 32 * 2) * 4
    with torch.no_grad():
        out = gm(x)
        h = dynamic_int8_linear(x.reshape(-1, 16), q1.t(), s1, model.b1)
        expected = dynamic_int8_linear(nn.functional.gelu(h), q2.t(), s2, model.b2)
    assert torch.equal(out, expected.reshape(2, 5, 16))
    assert _cosine(out, ref) >= 0.99
    fxopt.lower(gm, "onnx", (x,), path=tmp_path / "m.onnx", dynamic=False)


# --------------------------------------------------------------------------- eager artifacts


def test_eager_artifact_round_trip(tmp_path):
    gm, inputs = _case("gqa", "export")
    apply_dynamic_int8(gm)
    fxopt.lower(gm, "eager", inputs, path=tmp_path / "model")
    art = fxopt.load(tmp_path / "model")
    assert sum(n.target is OP for n in art.module.graph.nodes) == 9  # 13 layers: q/k/v share one op
    assert torch.equal(art(*inputs), gm(*inputs))


def test_eager_artifact_loads_in_a_fresh_process(tmp_path):
    gm, inputs = _case("mlp", "symbolic")
    apply_dynamic_int8(gm)
    fxopt.lower(gm, "eager", inputs, path=tmp_path / "model")
    torch.save({"x": inputs[0], "y": gm(*inputs)}, tmp_path / "io.pt")
    script = (
        "import sys, torch, fxopt\n"
        f"io = torch.load({str(tmp_path / 'io.pt')!r})\n"
        f"art = fxopt.load({str(tmp_path / 'model')!r})\n"
        "sys.exit(0 if torch.equal(art(io['x']), io['y']) else 1)\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {**os.environ, "PYTHONPATH": root}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_fuse_by_default_only_where_the_joined_output_is_small():
    from fxopt import zoo
    from fxopt.quant.dynamic import FUSE_MAX_ELEMENTS

    model, _ = zoo.load("gqa")
    big = (torch.randn(64, 16, 64),)  # q/k/v joined: 64 * 16 rows x 128 values
    assert 64 * 16 * 128 > FUSE_MAX_ELEMENTS
    gm = fxopt.optimize(model, big, "default", mode="export").module
    assert apply_dynamic_int8(copy.deepcopy(gm))["fused"] == []
    assert len(apply_dynamic_int8(copy.deepcopy(gm), fuse=True)["fused"]) == 2
