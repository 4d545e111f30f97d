"""``fxopt::quantize_dequantize`` in ONNX: narrow and sub-8-bit ranges are clipped to
``[qmin, qmax]`` in ONNX Runtime exactly as in PyTorch, with both exporters."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

import fxopt
from fxopt.quant import qdq  # noqa: F401  (registers the op and its translations)

# (qmin, qmax, zero point): int8 narrow, 3-bit, 4-bit signed, 4-bit unsigned, 7-bit unsigned
RANGES = [(-127, 127, 0), (-4, 3, 0), (-8, 7, -1), (0, 15, 8), (0, 127, 60)]
FULL = [(-128, 127, 0), (0, 255, 128)]


class _FakeQuants(nn.Module):
    """Per-tensor Q/DQ of the input at every range, plus a 4-bit per-channel one (axis 1)."""

    def __init__(self, ranges, per_channel=True):
        super().__init__()
        self.ranges, self.per_channel = ranges, per_channel
        self.register_buffer("scale", torch.tensor(0.05))
        self.register_buffer("c_scale", torch.linspace(0.05, 0.4, 8))
        self.register_buffer("c_zp", torch.arange(-4, 4, dtype=torch.int32))

    def forward(self, x):
        outs = []
        for qmin, qmax, zp in self.ranges:
            z = torch.full((), zp, dtype=torch.int32)
            outs.append(torch.ops.fxopt.quantize_dequantize(x, self.scale, z, -1, qmin, qmax))
        if not self.per_channel:
            return torch.cat(outs, -1)
        per_channel = torch.ops.fxopt.quantize_dequantize(x, self.c_scale, self.c_zp, 1, -8, 7)
        return torch.cat(outs, -1), per_channel


def _inputs():
    torch.manual_seed(0)
    return (torch.randn(4, 8) * 4,)  # up to ~300 steps of 0.05: far outside every range


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_narrow_and_low_bit_ranges_match_pytorch_in_ort(tmp_path, exporter, mode):
    if exporter == "torchscript" and mode == "export":
        pytest.skip("the TorchScript exporter cannot take a torch.export graph")
    model = _FakeQuants(RANGES).eval()
    inputs = _inputs()
    gm = fxopt.capture(model, inputs, mode=mode)
    with torch.no_grad():
        want = gm(*inputs)
    for (qmin, qmax, zp), got in zip(RANGES, want[0].chunk(len(RANGES), -1), strict=True):
        levels = torch.round(got / 0.05) + zp  # the data really reaches both ends
        assert (levels.min().item(), levels.max().item()) == (qmin, qmax)
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", exporter=exporter)
    onnx.checker.check_model(str(art.path))
    proto = onnx.load(str(art.path))
    assert sum(n.op_type == "Clip" for n in proto.graph.node) == len(RANGES) + 1
    x = (torch.randn(5, 8) * 4,)
    with torch.no_grad():
        want = gm(*x)
    got = art(*x)
    for w, g in zip(want, got, strict=True):
        torch.testing.assert_close(torch.as_tensor(g), w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_full_ranges_need_no_clip(tmp_path, exporter):
    model = _FakeQuants(FULL, per_channel=False).eval()
    inputs = _inputs()
    gm = fxopt.capture(model, inputs, mode="symbolic")
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", exporter=exporter)
    ops = [n.op_type for n in onnx.load(str(art.path)).graph.node]
    assert "Clip" not in ops and ops.count("QuantizeLinear") == len(FULL)
    with torch.no_grad():
        want = gm(*inputs)
    torch.testing.assert_close(torch.as_tensor(art(*inputs)), want, rtol=0, atol=1e-6)

