"""MAC counts of the op table against ``torch.utils.flop_counter.FlopCounterMode``
(FLOPs = 2 x MACs), on hand-built modules and on the zoo, in both capture modes.

What FlopCounterMode counts by itself on CPU: matrix products and convolutions (``mm``,
``addmm``, ``bmm``, ``baddbmm``, ``convolution``), not ``mv`` (a batched matrix @ vector
counts 0; the test checks fxopt's analytic number instead). Of attention it has formulas
only for the CUDA sdpa kernels: a CPU ``F.scaled_dot_product_attention`` counts only when
it falls back to its math path (value head dim != query head dim: two ``bmm``), not when
it runs ``_scaled_dot_product_flash_attention_for_cpu``, and the fused fast paths of
``nn.MultiheadAttention`` / ``nn.TransformerEncoderLayer`` (eval, grad off) count nothing.
So the reference adds torch's own ``sdpa_flop`` formula for the CPU flash kernel and runs
with the MHA fast path off; ``test_sdpa`` shows both paths.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

import fxopt
from fxopt import zoo

DENSE = ("conv", "conv_transpose", "linear", "matmul")
MODES = ("symbolic", "export")
# module and functional forms; torch.export turns both into the same ATen op
FORMS = [pytest.param(False, "symbolic", id="module-symbolic"),
         pytest.param(False, "export", id="module-export"),
         pytest.param(True, "symbolic", id="functional-symbolic")]


CPU_FLASH = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu


def _cpu_flash_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs):
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)  # torch's own


def _reference(model: nn.Module, inputs: tuple, cpu_flash: bool = True) -> dict[str, int]:
    """MACs per ATen op as FlopCounterMode counts them in an eager run (``cpu_flash``:
    with torch's sdpa formula registered for the CPU flash kernel too)."""
    mapping = {CPU_FLASH: _cpu_flash_flops} if cpu_flash else {}
    counter = FlopCounterMode(display=False, custom_mapping=mapping)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)  # its fused kernels count nothing
    try:
        with torch.no_grad(), counter:
            model(*inputs)
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    counts = counter.get_flop_counts().get("Global", {})
    return {str(op): flops // 2 for op, flops in counts.items()}


def _counted(model: nn.Module, inputs: tuple, mode: str) -> dict[str, int]:
    """fxopt's MACs per op kind on the capture in ``mode``."""
    gm = fxopt.capture(model, inputs, mode=mode)
    return dict(fxopt.inspect(gm).macs_by_kind)


def _dense(by_kind: dict[str, int]) -> int:
    return sum(by_kind.get(k, 0) for k in DENSE)


def _total(by_kind: dict[str, int]) -> int:
    return sum(by_kind.values())


# --------------------------------------------------------------------------- hand-built


class _Conv(nn.Module):
    """The conv as a submodule (``call_module``) or through ``F.conv*d``."""

    def __init__(self, conv: nn.Module, functional: bool = False):
        super().__init__()
        self.conv, self.functional = conv, functional
        self.fn = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d}.get(type(conv))

    def forward(self, x):
        if not self.functional:
            return self.conv(x)
        c = self.conv
        return self.fn(x, c.weight, c.bias, c.stride, c.padding, c.dilation, c.groups)


CONVS = {
    "conv1d": (nn.Conv1d(4, 6, 3, stride=2, padding=1), (2, 4, 17)),
    "conv1d_grouped": (nn.Conv1d(6, 9, 5, groups=3, dilation=2), (2, 6, 30)),
    "conv2d": (nn.Conv2d(3, 8, 3, stride=2, padding=1), (2, 3, 15, 16)),
    "conv2d_grouped": (nn.Conv2d(8, 12, 3, groups=4, bias=False), (1, 8, 9, 9)),
    "conv2d_depthwise": (nn.Conv2d(8, 8, 3, padding=1, groups=8), (2, 8, 10, 10)),
    "conv2d_depthwise_multiplier": (nn.Conv2d(4, 8, (3, 5), groups=4), (1, 4, 11, 12)),
    "conv2d_pointwise": (nn.Conv2d(16, 4, 1), (2, 16, 7, 7)),
    "conv2d_same": (nn.Conv2d(3, 5, (3, 4), padding="same", dilation=2), (1, 3, 9, 10)),
    "conv3d": (nn.Conv3d(2, 4, 3, padding=(0, 1, 1), stride=(1, 2, 2)), (1, 2, 6, 8, 8)),
    "conv3d_grouped": (nn.Conv3d(4, 6, 2, groups=2), (1, 4, 5, 5, 5)),
}
CONV_TRANSPOSES = {
    "convt1d": (nn.ConvTranspose1d(4, 6, 3, stride=2), (2, 4, 9)),
    "convt2d": (nn.ConvTranspose2d(6, 4, 4, stride=2, padding=1), (2, 6, 8, 8)),
    "convt2d_grouped_output_padding": (
        nn.ConvTranspose2d(6, 9, 3, stride=2, padding=1, output_padding=1, groups=3),
        (1, 6, 5, 7)),
    "convt2d_depthwise": (nn.ConvTranspose2d(5, 5, 3, groups=5), (1, 5, 6, 6)),
    "convt2d_dilated": (nn.ConvTranspose2d(4, 6, 3, stride=2, dilation=2), (1, 4, 5, 5)),
    "convt1d_grouped": (nn.ConvTranspose1d(4, 6, 3, groups=2), (2, 4, 11)),
    "convt3d": (nn.ConvTranspose3d(3, 2, 2, stride=2), (1, 3, 3, 4, 4)),
}


@pytest.mark.parametrize("functional,mode", FORMS)
@pytest.mark.parametrize("name", list(CONVS))
def test_conv(name, functional, mode):
    conv, shape = CONVS[name]
    model, inputs = _Conv(conv, functional).eval(), (torch.randn(shape),)
    ref, got = _reference(model, inputs), _counted(model, inputs, mode)
    assert got["conv"] == ref["aten.convolution"] > 0
    assert _dense(got) == sum(ref.values())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(CONV_TRANSPOSES))
def test_conv_transpose(name, mode):
    conv, shape = CONV_TRANSPOSES[name]
    model, inputs = _Conv(conv).eval(), (torch.randn(shape),)
    ref, got = _reference(model, inputs), _counted(model, inputs, mode)
    assert got["conv_transpose"] == ref["aten.convolution"] > 0
    assert _dense(got) == sum(ref.values())


class _Linear(nn.Module):
    def __init__(self, bias: bool, functional: bool):
        super().__init__()
        self.fc, self.functional = nn.Linear(12, 5, bias=bias), functional

    def forward(self, x):
        return F.linear(x, self.fc.weight, self.fc.bias) if self.functional else self.fc(x)


@pytest.mark.parametrize("functional,mode", FORMS)
@pytest.mark.parametrize("shape", [(12,), (4, 12), (2, 3, 12), (2, 2, 3, 12)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear(shape, bias, functional, mode):
    model, inputs = _Linear(bias, functional).eval(), (torch.randn(shape),)
    ref, got = _reference(model, inputs), _counted(model, inputs, mode)
    assert got["linear"] == sum(ref.values()) > 0


class _Matmul(nn.Module):
    """Products of two activations, or of an activation and a constant weight."""

    def __init__(self, how: str, weight_shape: tuple[int, ...] | None = None):
        super().__init__()
        self.how = how
        if weight_shape is not None:
            self.weight = nn.Parameter(torch.randn(weight_shape))

    def forward(self, a, b=None):
        if self.how == "weight_right":
            return a @ self.weight
        if self.how == "weight_left":
            return torch.matmul(self.weight, a)
        return {"matmul": torch.matmul, "bmm": torch.bmm, "mm": torch.mm,
                "method": lambda x, y: x.matmul(y)}[self.how](a, b)


MATMULS = {  # name: (how, weight shape, input shapes)
    "mm": ("mm", None, [(5, 7), (7, 3)]),
    "bmm": ("bmm", None, [(4, 5, 7), (4, 7, 3)]),
    "matmul_2d": ("matmul", None, [(5, 7), (7, 3)]),
    "matmul_batched": ("matmul", None, [(2, 4, 5, 7), (2, 4, 7, 3)]),
    "matmul_broadcast": ("matmul", None, [(2, 1, 5, 7), (3, 7, 6)]),
    "matmul_vector_matrix": ("matmul", None, [(7,), (7, 3)]),
    "matmul_matrix_vector": ("method", None, [(2, 5, 7), (7,)]),
    "batched_x_constant_weight": ("weight_right", (7, 6), [(2, 3, 5, 7)]),
    "constant_weight_x_batched": ("weight_left", (4, 5), [(3, 5, 6)]),
    "batched_constant_weight": ("weight_right", (3, 7, 2), [(3, 5, 7)]),
}


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", list(MATMULS))
def test_matmul(name, mode):
    how, weight, shapes = MATMULS[name]
    model, inputs = _Matmul(how, weight).eval(), tuple(torch.randn(s) for s in shapes)
    ref, got = _reference(model, inputs), _counted(model, inputs, mode)
    if name == "matmul_matrix_vector":  # aten.mv: FlopCounterMode has no formula for it
        assert ref == {} and got["matmul"] == 2 * 5 * 7
        return
    assert got["matmul"] == sum(ref.values()) > 0


class _SDPA(nn.Module):
    def forward(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("ev", [8, 4])
def test_sdpa(mode, ev):
    shapes = [(2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, ev)]  # 3 heads, L 5, S 7, E 8
    model, inputs = _SDPA(), tuple(torch.randn(s) for s in shapes)
    products = 2 * 3 * 5 * 7 * (8 + ev)  # q @ k^T and attn @ v
    plain = _reference(model, inputs, cpu_flash=False)  # FlopCounterMode as shipped
    assert plain == ({} if ev == 8 else {"aten.bmm": products})  # flash kernel / math path
    got = _counted(model, inputs, mode)
    assert got["scaled_dot_product"] == sum(_reference(model, inputs).values()) == products


class _MHA(nn.Module):
    def __init__(self, mha):
        super().__init__()
        self.mha = mha

    def forward(self, q, k, v):
        return self.mha(q, k, v, need_weights=False)[0]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("kdim", [None, 6])
def test_multihead_attention(mode, batch_first, kdim):
    mha = nn.MultiheadAttention(16, 4, batch_first=batch_first, kdim=kdim, vdim=kdim).eval()
    q = torch.randn((2, 5, 16) if batch_first else (5, 2, 16))
    kv_shape = (2, 7, kdim or 16) if batch_first else (7, 2, kdim or 16)
    inputs = (q, torch.randn(kv_shape), torch.randn(kv_shape))
    model = _MHA(mha)
    ref, got = _reference(model, inputs), _counted(model, inputs, mode)
    assert _total(got) == sum(ref.values()) > 0
    # the attention products: q @ k^T and attn @ v, B L S E each over 4 heads of 4
    assert ref[str(CPU_FLASH.default.overloadpacket)] == 2 * 5 * 7 * 16 * 2


# --------------------------------------------------------------------------- the zoo

ZOO = [(name, mode) for name in zoo.names() for mode in MODES
       if not (name == "dynamic" and mode == "symbolic")]


@pytest.mark.parametrize("name,mode", ZOO)
def test_zoo(zoo_case, name, mode):
    model, inputs, gm = zoo_case(name, mode)
    ref = _reference(model, inputs)
    got = dict(fxopt.inspect(gm).macs_by_kind)
    assert _total(got) == sum(ref.values()) > 0
    convolution = got.get("conv", 0) + got.get("conv_transpose", 0)
    assert convolution == ref.get("aten.convolution", 0)
