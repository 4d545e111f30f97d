"""The Q/DQ node: a module that observes, fake-quantizes, or trains with straight-through
gradients, and exports to ONNX ``QuantizeLinear`` + ``DequantizeLinear``.

States (``mode``): ``"observe"`` records statistics and passes values through;
``"quantize"`` applies ``torch.fake_quantize_per_{tensor,channel}_affine`` with frozen
scales; ``"qat"`` does both (observed scales, or learnable ones with ``learnable=True``)
with straight-through gradients. Constructor arguments are plain data kept under the same
names, so an eager artifact rebuilds it; the observer is dropped once scales are frozen.

Example::

    fq = FakeQuantize(bits=8, signed=False, symmetric=False, mode="observe")
    fq(x); fq.freeze()            # scale / zero_point from what it saw
    y = fq(x)                     # quantize -> dequantize
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fxopt.errors import QuantizationError
from fxopt.quant.observers import make_observer, observed, qrange
from fxopt.quant.qdq import PER_TENSOR

MODES = ("observe", "quantize", "qat", "off")  # "off": pass through (sensitivity probes)


class FakeQuantize(nn.Module):
    """Quantize-dequantize ``x`` to ``bits``-bit integers (per tensor, or per channel along
    ``axis``). ``channels`` sizes the per-channel scale buffers."""

    def __init__(
        self,
        bits: int = 8,
        signed: bool = True,
        symmetric: bool = True,
        axis: int | None = None,
        channels: int = 1,
        observer_kind: str = "minmax",
        mode: str = "quantize",
        learnable: bool = False,
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise QuantizationError(f"FakeQuantize mode {mode!r}: use one of {', '.join(MODES)}")
        self.bits, self.signed, self.symmetric = bits, signed, symmetric
        self.axis, self.channels, self.observer_kind = axis, channels, observer_kind
        self.mode, self.learnable = mode, learnable
        self.qmin, self.qmax = qrange(bits, signed)
        shape = (channels,) if axis is not None else ()
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("zero_point", torch.zeros(shape, dtype=torch.int32))
        self.observer: nn.Module | None = None
        if mode in ("observe", "qat"):
            self.observer = self._new_observer()

    @property
    def frozen(self) -> bool:
        """True when forward is a pure function of ``x`` (no observing, no learning), so
        readers such as ``fxopt.passes.sparsify.effective_weight`` may evaluate it."""
        return self.mode in ("quantize", "off")

    def _new_observer(self) -> nn.Module:
        return make_observer(self.observer_kind, bits=self.bits, signed=self.signed,
                             symmetric=self.symmetric, ch_axis=self.axis)

    # ------------------------------------------------------------------ state changes
    def observe(self) -> None:
        """Start (or restart) collecting statistics; values pass through unchanged."""
        self.observer = self._new_observer()
        self.mode = "observe"

    def freeze(self, where: str = "") -> None:
        """Compute scale / zero point from the observer and switch to ``"quantize"``."""
        if self.mode == "qat" and self.learnable:
            self._set_qparams(self.scale.detach().abs().clamp_min(1e-8), self.zero_point)
        elif self.observer is not None:
            if not observed(self.observer):
                raise QuantizationError(
                    f"the observer of {where or 'a fake-quant node'} was never fed: the "
                    "calibration data did not reach it (run fxopt.calibrate(gm, batches) "
                    "with batches that exercise this branch, or skip=[...] this layer)")
            scale, zp = self.observer.calculate_qparams()
            self._set_qparams(scale, zp)
        self.observer = None
        self.mode = "quantize"
        self.learnable = False

    def train_qat(self, learnable: bool = False) -> None:
        """Fake-quantize with straight-through gradients; scales keep following the data
        (observed) or become a trained parameter (``learnable``)."""
        if learnable:
            self.scale = nn.Parameter(self.scale.detach().clone())
        elif self.observer is None:
            self.observer = self._new_observer()
        self.mode, self.learnable = "qat", learnable

    def _set_qparams(self, scale: torch.Tensor, zero_point: torch.Tensor) -> None:
        shape = (self.channels,) if self.axis is not None else ()
        scale = scale.detach().float().reshape(shape).clamp_min(torch.finfo(torch.float32).eps)
        if isinstance(self.scale, nn.Parameter):
            del self.scale
        self.register_buffer("scale", scale.clone())
        self.register_buffer("zero_point", zero_point.detach().to(torch.int32).reshape(shape))

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "off":
            return x
        if self.mode == "observe":
            self.observer(x.detach())
            return x
        if self.mode == "qat" and not self.learnable and self.training:
            # observe only while training: evaluating mid-QAT must not move the scales
            self.observer(x.detach())
            scale, zp = self.observer.calculate_qparams()
            self._set_qparams(scale.to(x.device), zp.to(x.device))
        if self.learnable and self.mode == "qat":
            return self._learnable(x)
        if self.mode == "quantize":  # frozen: the exportable op
            return torch.ops.fxopt.quantize_dequantize(
                x, self.scale, self.zero_point, PER_TENSOR if self.axis is None else self.axis,
                self.qmin, self.qmax)
        if self.axis is not None:
            return torch.fake_quantize_per_channel_affine(
                x, self.scale, self.zero_point, self.axis, self.qmin, self.qmax)
        return torch.fake_quantize_per_tensor_affine(
            x, self.scale, self.zero_point, self.qmin, self.qmax)

    def _learnable(self, x: torch.Tensor) -> torch.Tensor:
        zp = self.zero_point.float()
        # LSQ's gradient scale 1/sqrt(elements per scale * qmax): without it one SGD step
        # at an ordinary learning rate can push a scale below zero
        per_scale = x.numel() / max(self.scale.numel(), 1)
        grad_factor = 1.0 / math.sqrt(max(per_scale * self.qmax, 1.0))
        if self.axis is not None:
            return torch._fake_quantize_learnable_per_channel_affine(
                x, self.scale, zp, self.axis, self.qmin, self.qmax, grad_factor)
        return torch._fake_quantize_learnable_per_tensor_affine(
            x, self.scale.reshape(1), zp.reshape(1), self.qmin, self.qmax, grad_factor)

    def extra_repr(self) -> str:
        kind = f"per-channel(axis={self.axis})" if self.axis is not None else "per-tensor"
        sign = "int" if self.signed else "uint"
        sym = "symmetric" if self.symmetric else "asymmetric"
        return f"{sign}{self.bits} {kind} {sym}, observer={self.observer_kind}, mode={self.mode}"
