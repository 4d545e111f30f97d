"""Static int8 (ORT target): the output of a shared op (pool, add) is quantized only when
an int8 op reads it, so leaving a layer float removes the error of its input tensor too."""

from __future__ import annotations

import torch
from torch import nn

import fxopt
from fxopt.ops import op_of
from fxopt.quant import static
from fxopt.quant.fake_quant import FakeQuantize


class _Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(torch.relu(self.conv(x))), 1))


def _prepared(skip=()):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 8, 8)
    gm = fxopt.optimize(_Head().eval(), (x,), "default", verify=False).module
    static.prepare(gm, "ort", skip=skip)
    return gm, x


def _quantized_kinds(gm) -> list[str]:
    """The op kind whose output each activation fake-quant node reads."""
    kinds = []
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(gm.get_submodule(node.target), FakeQuantize):
            src = node.args[0]
            if src.op != "get_attr":
                kinds.append(op_of(src).kind)
    return kinds


def test_pool_output_quantized_when_an_int8_linear_reads_it():
    gm, _ = _prepared()
    kinds = _quantized_kinds(gm)
    assert "adaptive_avg_pool" in kinds  # QLinearGlobalAveragePool feeds the int8 Gemm
    assert "flatten" in kinds  # the fc's activation input


def test_float_fc_leaves_the_pooled_vector_float():
    gm, x = _prepared(skip=["fc"])
    kinds = _quantized_kinds(gm)
    assert "adaptive_avg_pool" not in kinds and "flatten" not in kinds
    assert "relu" in kinds  # the conv's output (after its fused ReLU) is still int8
    static.calibrate(gm, [(x,)])
    static.freeze(gm)
    assert gm(x).shape == (2, 4)


def test_sensitivity_layer_of_fc_includes_the_pooled_quantizer():
    from fxopt.quant.sensitivity import layer_quantizers

    gm, _ = _prepared()
    by_kind = {op_of(n).kind: [op_of(f.args[0]).kind for f in fqs
                               if f.args[0].op != "get_attr"]  # not the weight's
               for n, fqs in layer_quantizers(gm).items()}
    # fc's input is flatten(pool_fq(...)) re-quantized: leaving fc float must drop both
    assert sorted(by_kind["linear"]) == [
        "adaptive_avg_pool", "flatten"]
