"""Weight-only int8/int4 quantization: pack/unpack, the modules, the graph rewrite on the zoo
(both capture modes), sizes, accuracy, eager artifacts, ONNX export and every user error."""

from __future__ import annotations

import copy

import onnx
import pytest
import safetensors.torch
import torch
import torch.fx as fx
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

import fxopt
from fxopt.errors import QuantizationError
from fxopt.ops import count_kinds
from fxopt.quant.weight_only import (
    WeightOnlyConv2d,
    WeightOnlyLinear,
    apply_weight_only,
    model_bytes,
    pack_int4,
    quantize_weight,
    unpack_int4,
)

MODES = ("symbolic", "export")
WO = (WeightOnlyLinear, WeightOnlyConv2d)


def _cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return F.cosine_similarity(a.flatten().double(), b.flatten().double(), dim=0).item()


def _wo_modules(gm: fx.GraphModule) -> list[nn.Module]:
    return [gm.get_submodule(n.target) for n in gm.graph.find_nodes(op="call_module")
            if isinstance(gm.get_submodule(n.target), WO)]


def _run(gm, inputs):
    with torch.no_grad():
        return gm(*inputs)


# --------------------------------------------------------------------------- pack / unpack


def test_pack_int4_every_value_and_byte_layout():
    q = torch.arange(-8, 8, dtype=torch.int8)  # all 16 values, odd and negative included
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (8,)
    # element 2i in the low nibble, 2i+1 in the high nibble, each stored as q + 8
    assert packed.tolist() == [(2 * i) | ((2 * i + 1) << 4) for i in range(8)]
    assert torch.equal(unpack_int4(packed), q)
    assert pack_int4(torch.tensor([[-8, 7, 1, -1]], dtype=torch.int8)).tolist() == [[240, 121]]
    assert unpack_int4(torch.tensor([[240, 121]], dtype=torch.uint8)).tolist() == [[-8, 7, 1, -1]]


def test_pack_unpack_round_trip_random():
    q = torch.randint(-8, 8, (37, 2, 64), dtype=torch.int8)
    assert torch.equal(unpack_int4(pack_int4(q)), q)
    every_byte = torch.arange(256, dtype=torch.int16).to(torch.uint8).reshape(16, 16)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)


@pytest.mark.parametrize("bad", [[1, 2, 3], [8, 0], [-9, 0]])
def test_pack_int4_refuses_bad_input(bad):
    with pytest.raises(QuantizationError, match=r"\[-8, 7\]"):
        pack_int4(torch.tensor(bad, dtype=torch.int8))


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 16), (4, 32)])
def test_quantize_weight_error_is_half_a_step(bits, group_size):
    w = torch.randn(24, 64)
    w[3] = 0.0  # an all-zero row quantizes to zeros, no NaN
    q, scale = quantize_weight(w, bits, group_size)
    groups = 64 // (group_size or 64)
    assert q.dtype == torch.int8 and scale.shape == (24, groups) and scale.dtype == torch.float32
    qmax = 127 if bits == 8 else 7
    assert int(q.abs().max()) == qmax and int(q.min()) >= -qmax - 1
    deq = (q.float().reshape(24, groups, -1) * scale[..., None]).reshape(24, 64)
    step = scale.repeat_interleave(64 // groups, dim=1)
    assert ((deq - w).abs() <= step / 2 + 1e-7).all()
    assert torch.equal(deq[3], torch.zeros(64))


# --------------------------------------------------------------------------- the modules


@pytest.mark.parametrize("bits,group_size", [(8, None), (8, 32), (4, 32), (4, 128)])
def test_linear_module_matches_dequantized_weight(bits, group_size):
    w, b, x = torch.randn(48, 128), torch.randn(48), torch.randn(5, 7, 128)
    m = WeightOnlyLinear.from_float(w, b, bits=bits, group_size=group_size)
    assert m.qweight.dtype == (torch.uint8 if bits == 4 else torch.int8)
    assert m.qweight.shape == (48, 64 if bits == 4 else 128)
    q, scale = quantize_weight(w, bits, group_size)
    assert torch.equal(m.scale, scale)
    ref = (q.float().reshape(48, scale.shape[1], -1) * scale[..., None]).reshape(48, 128)
    assert torch.equal(m.dequantize(), ref)
    assert torch.allclose(m(x), F.linear(x, ref, b), atol=1e-5)
    assert _cosine(m(x), F.linear(x, w, b)) > (0.9999 if bits == 8 else 0.99)
    assert m(x.to(torch.bfloat16)).dtype == torch.bfloat16


def test_conv_module_depthwise_strided_and_same_padding():
    w, b, x = torch.randn(8, 1, 3, 3), torch.randn(8), torch.randn(2, 8, 9, 9)
    m = WeightOnlyConv2d.from_float(w, b, stride=2, padding=1, groups=8)
    assert m.qweight.dtype == torch.int8 and m.qweight.shape == w.shape
    assert m.scale.shape == (8, 1)
    assert torch.allclose(m(x), F.conv2d(x, m.dequantize(), b, 2, 1, 1, 8), atol=1e-5)
    same = WeightOnlyConv2d.from_float(torch.randn(4, 8, 3, 3), None, padding="same")
    assert same(x).shape == (2, 4, 9, 9) and same.bias is None


def test_model_bytes_counts_packed_storage():
    assert model_bytes(nn.Linear(64, 32)) == (64 * 32 + 32) * 4
    m = WeightOnlyLinear.from_float(torch.randn(32, 64), torch.randn(32), bits=4, group_size=32)
    assert model_bytes(m) == 32 * 32 + 32 * 2 * 4 + 32 * 4  # packed bytes, scales, bias
    shared = nn.Linear(4, 4)
    assert model_bytes(nn.Sequential(shared, shared)) == model_bytes(shared)


# --------------------------------------------------------------------------- zoo graphs

ZOO = [
    # (model, mode, bits, group_size, min cosine vs float)
    *[("mlp", mode, 8, None, 0.9999) for mode in MODES],
    *[("mlp", mode, 4, 64, 0.99) for mode in MODES],
    *[("transformer", mode, 8, 32, 0.9999) for mode in MODES],
    *[("transformer", mode, 4, 32, 0.99) for mode in MODES],
    *[("resnet", mode, 8, None, 0.9999) for mode in MODES],
]


@pytest.mark.parametrize("name,mode,bits,group_size,min_cos", ZOO)
def test_zoo(zoo_case, name, mode, bits, group_size, min_cos):
    model, inputs, gm = zoo_case(name, mode)
    ref = _run(model, inputs)
    kinds = count_kinds(gm)
    expected = kinds["linear"] + (kinds["conv"] if bits == 8 else 0)
    floats = [n for n in gm.graph.nodes if fxopt.ops.op_of(n).kind in ("linear", "conv")]
    float_weight_bytes = sum(
        fxopt.ops.op_of(n).params["weight"].numel() * 4 for n in floats
        if bits == 8 or fxopt.ops.op_of(n).kind == "linear")

    stats = apply_weight_only(gm, bits=bits, group_size=group_size)

    gm.graph.lint()
    mods = _wo_modules(gm)
    assert len(stats["quantized"]) == len(mods) == expected > 0
    after = count_kinds(gm)
    assert after["linear"] == 0 and after["conv"] == (kinds["conv"] if bits == 4 else 0)
    assert all(m.bits == bits for m in mods if isinstance(m, WeightOnlyLinear))
    assert stats["bytes_before"] == model_bytes(model)
    packed = sum(m.qweight.numel() + m.scale.numel() * 4 for m in mods)
    # exact: the float weights are gone, biases are kept as they were
    assert stats["bytes_after"] == stats["bytes_before"] - float_weight_bytes + packed
    assert float_weight_bytes / packed > (3.7 if bits == 8 and not group_size else
                                          3.4 if bits == 8 else 6.3)
    assert _cosine(_run(gm, inputs), ref) >= min_cos


def test_int4_linear_weights_shrink_about_7x(zoo_case):
    _, _, gm = zoo_case("mlp", "symbolic")
    stats = apply_weight_only(gm, bits=4, group_size=64)
    floats = (64 * 128 + 128 * 128 + 128 * 10) * 4
    packed = sum(m.qweight.numel() + m.scale.numel() * 4 for m in _wo_modules(gm))
    assert floats / packed > 7.0
    assert stats["bytes_before"] / stats["bytes_after"] > 6.5  # biases stay float


@pytest.mark.parametrize("name,count", [("mlp", 3), ("resnet", 10)])
def test_after_default_pipeline(zoo_model, name, count):
    """The place for weight-only quantization: after BN folding (a WeightOnlyConv2d is
    opaque to fold_bn), on the folded weights."""
    model, inputs = zoo_model(name)
    gm = fxopt.optimize(model, inputs, "default").module
    stats = apply_weight_only(gm, bits=8, group_size=32)
    assert len(stats["quantized"]) == count and count_kinds(gm)["batch_norm"] == 0
    assert _cosine(_run(gm, inputs), _run(model, inputs)) > 0.9999


def test_transformer_symbolic_leaves_mha_float(zoo_case):
    """nn.MultiheadAttention is one leaf module in a symbolic capture: its projections are
    not linear nodes, so only the MLPs and the head are quantized."""
    _, _, gm = zoo_case("transformer", "symbolic")
    stats = apply_weight_only(gm)
    assert stats["quantized"] == [
        "blocks.0.mlp.0", "blocks.0.mlp.3", "blocks.1.mlp.0", "blocks.1.mlp.3", "head"]
    assert count_kinds(gm)["attention"] == 2


def test_include_conv_false_and_int4_skip_convs(zoo_case):
    _, inputs, gm = zoo_case("resnet", "symbolic")
    stats = apply_weight_only(copy.deepcopy(gm), include_conv=False)
    assert stats["quantized"] == ["fc"]
    assert ("stem.0", "conv excluded (include_conv=False)") in stats["skipped"]
    stats = apply_weight_only(gm, bits=4, group_size=32)
    assert stats["quantized"] == ["fc"] and len(stats["skipped"]) == 9
    assert all(r == "int4 covers linear layers only" for _, r in stats["skipped"])


@pytest.mark.parametrize("mode", MODES)
def test_skip_patterns(zoo_case, mode):
    _, _, gm = zoo_case("transformer", mode)
    stats = apply_weight_only(gm, skip=["blocks.1.*", "head"])
    attn = 2 if mode == "export" else 0  # MHA is one leaf module in a symbolic capture
    skipped = ["blocks.1.attn"] * attn + ["blocks.1.mlp.0", "blocks.1.mlp.3", "head"]
    assert stats["skipped"] == [(n, "skip pattern") for n in skipped]
    assert stats["quantized"] == ["blocks.0.attn"] * attn + ["blocks.0.mlp.0", "blocks.0.mlp.3"]
    assert count_kinds(gm)["linear"] == len(stats["skipped"])


# --------------------------------------------------------------------------- capture forms


class Functional(nn.Module):
    """F.linear / torch.conv2d on parameters: get_attr + call_function after tracing."""

    def __init__(self) -> None:
        super().__init__()
        self.cw, self.cb = nn.Parameter(torch.randn(8, 3, 3, 3)), nn.Parameter(torch.randn(8))
        self.w, self.b = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(16))
        self.shared = nn.Linear(16, 16)

    def forward(self, x):
        h = torch.conv2d(x, self.cw, self.cb, 1, 1).flatten(2).mean(-1)
        h = F.linear(h.repeat(1, 4), self.w, self.b)
        return self.shared(self.shared(h))  # one module called twice


def test_functional_forms_and_shared_module():
    m, x = Functional(), torch.randn(2, 3, 6, 6)
    gm = fx.symbolic_trace(m)
    stats = apply_weight_only(gm)
    assert len(stats["quantized"]) == 4
    assert len(_wo_modules(gm)) == 4 and len({id(m) for m in _wo_modules(gm)}) == 3
    assert not any(hasattr(gm, a) for a in ("w", "b", "cw", "cb", "shared"))
    assert not gm.graph.find_nodes(op="get_attr")
    assert _cosine(_run(gm, (x,)), _run(m, (x,))) > 0.9999


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 32)
        self.proj = nn.Linear(32, 32)

    def forward(self, ids):
        return F.linear(self.proj(self.embed(ids)), self.embed.weight)


def test_tied_weight_is_skipped():
    gm = fx.symbolic_trace(Tied())
    stats = apply_weight_only(gm)
    assert stats["quantized"] == ["proj"]
    ((name, reason),) = stats["skipped"]
    assert "tied" in reason and "embed" in reason
    assert gm.embed.weight.dtype == torch.float32


class Conv1DPair(nn.Module):
    """GPT-2's Conv1D twice (``addmm(bias, x, W)``, ``W`` stored ``[in, out]``), the second
    weight also read by a matmul: distinct layers get distinct modules, the tie is seen."""

    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(16, 32)), nn.Parameter(torch.randn(32))
        self.w2, self.b2 = nn.Parameter(torch.randn(32, 32)), nn.Parameter(torch.randn(32))

    def forward(self, x):
        h = torch.addmm(self.b1, x, self.w1)
        return torch.addmm(self.b2, torch.relu(h), self.w2) + h @ self.w2


@pytest.mark.parametrize("mode", MODES)
def test_addmm_layers_are_linears_and_ties_through_them_are_seen(mode):
    m, x = Conv1DPair().eval(), torch.randn(4, 16)
    gm = fxopt.capture(m, (x,), mode=mode)
    stats = apply_weight_only(gm, bits=8, group_size=None)
    assert len(stats["quantized"]) == 1
    ((_, reason),) = stats["skipped"]
    assert "tied" in reason
    (wo,) = _wo_modules(gm)
    # the int8 layer holds the [in, out] matrix as an [out, in] linear weight
    assert _cosine(_run(wo, (torch.eye(16),)) - m.b1, m.w1) > 0.999
    assert _cosine(_run(gm, (x,)), _run(m, (x,))) > 0.999


# --------------------------------------------------------------------------- errors


def test_bad_bits_and_group_sizes(zoo_case):
    _, _, gm = zoo_case("mlp", "symbolic")
    code = gm.code
    for kwargs, pattern in [
        ({"bits": 3}, "bits=8 or bits=4"),
        ({"bits": 4, "group_size": 48}, r"group_size in \(32, 64, 128\)"),
        ({"bits": 8, "group_size": 0}, "positive int"),
    ]:
        with pytest.raises(QuantizationError, match=pattern):
            apply_weight_only(gm, **kwargs)
    # int4's default group of 128 does not divide net.0's 64 inputs
    with pytest.raises(QuantizationError, match=r"'net\.0'.*in_features=64.*group_size=64.*skip"):
        apply_weight_only(gm, bits=4)
    with pytest.raises(QuantizationError, match=r"'net\.0'.*group_size=100.*group_size=64"):
        apply_weight_only(gm, bits=8, group_size=100)
    assert gm.code == code and not _wo_modules(gm)  # nothing was touched
    odd = fx.symbolic_trace(nn.Sequential(nn.Linear(8, 4), nn.Linear(4, 6), nn.Linear(6, 2)))
    with pytest.raises(QuantizationError, match=r"'2'.*in_features=6.*use group_size=None"):
        apply_weight_only(odd, bits=8, group_size=4)
    with pytest.raises(QuantizationError, match=r"'0'.*in_features=8.*bits=8 with group_size=None"):
        apply_weight_only(odd, bits=4, group_size=32)


def test_nothing_to_quantize():
    gm = fx.symbolic_trace(nn.Sequential(nn.ReLU(), nn.Tanh()))
    code = gm.code
    with pytest.raises(QuantizationError, match="nothing to quantize"):
        apply_weight_only(gm)
    assert gm.code == code
    gm = fx.symbolic_trace(nn.Sequential(nn.Linear(4, 4)))
    with pytest.raises(QuantizationError, match=r"nothing to quantize \(0: skip pattern\)"):
        apply_weight_only(gm, skip=["*"])


def test_already_quantized(zoo_case):
    _, _, gm = zoo_case("mlp", "export")
    apply_weight_only(gm, bits=4, group_size=32)
    code = gm.code
    with pytest.raises(QuantizationError, match="already quantized"):
        apply_weight_only(gm, bits=8)
    assert gm.code == code


# --------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("name,mode,bits,group_size", [
    ("mlp", "export", 4, 64), ("resnet", "symbolic", 8, None), ("transformer", "symbolic", 8, 32),
])
def test_eager_artifact_round_trip(zoo_case, tmp_path, name, mode, bits, group_size):
    _, inputs, gm = zoo_case(name, mode)
    stats = apply_weight_only(gm, bits=bits, group_size=group_size)
    fxopt.lower(gm, "eager", inputs, path=tmp_path / "art")
    loaded = fxopt.load(tmp_path / "art")
    assert torch.equal(loaded(*inputs), _run(gm, inputs))
    saved = safetensors.torch.load_file(str(tmp_path / "art" / "weights.safetensors"))
    for path, mod in gm.named_modules():
        if isinstance(mod, WO):
            assert torch.equal(saved[f"{path}.qweight"], mod.qweight)
            assert saved[f"{path}.qweight"].dtype == (torch.uint8 if bits == 4 else torch.int8)
            assert type(loaded.module.get_submodule(path)) is type(mod)
    assert not {f"{layer}.weight" for layer in stats["quantized"]} & set(saved)  # no float copy


class Wide(nn.Module):
    """Layers big enough that ONNX constant folding leaves their packed weights alone."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(256, 256), nn.Linear(256, 64)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _initializer_bytes(path) -> dict[str, int]:
    out: dict[str, int] = {}
    for init in onnx.load(str(path)).graph.initializer:
        dtype = onnx.TensorProto.DataType.Name(init.data_type)
        out[dtype] = out.get(dtype, 0) + numpy_helper.to_array(init).nbytes
    return out


@pytest.mark.parametrize("bits,packed", [(8, "INT8"), (4, "UINT8")])
def test_onnx_export_keeps_weights_packed(tmp_path, bits, packed):
    x = torch.randn(3, 256)
    gm = fx.symbolic_trace(Wide())
    float_bytes = model_bytes(gm)  # the fp32 export is this plus ~4 KB
    apply_weight_only(gm, bits=bits, group_size=64 if bits == 4 else None)
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "q.onnx")  # verified in ORT
    assert art.manifest["exporter"] == "dynamo"
    assert torch.allclose(art(x), _run(gm, (x,)), atol=1e-4)
    sizes = _initializer_bytes(tmp_path / "q.onnx")
    assert sizes[packed] >= 256 * 256 * bits // 8  # fc1 stays packed in the file
    assert (tmp_path / "q.onnx").stat().st_size < float_bytes / (3 if bits == 8 else 4)


@pytest.mark.parametrize("name,mode,bits", [("resnet", "export", 8), ("transformer", "export", 4)])
def test_onnx_export_of_zoo_verifies(zoo_case, tmp_path, name, mode, bits):
    _, inputs, gm = zoo_case(name, mode)
    apply_weight_only(gm, bits=bits, group_size=32 if bits == 4 else None)
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx")
    assert art.manifest["exporter"] == "dynamo"
    assert torch.allclose(art(*inputs), _run(gm, inputs), atol=1e-4)
