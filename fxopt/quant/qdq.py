"""``fxopt::quantize_dequantize``: the frozen Q/DQ op, exportable by both ONNX exporters.

torch 2.13's ``fake_quantize_per_*_affine`` ops have no fake-tensor kernels, so
torch.export (and with it the dynamo ONNX exporter) cannot trace them. This custom op
runs them in eager PyTorch, has a fake kernel for torch.export, and is written as ONNX
``QuantizeLinear`` + ``DequantizeLinear`` by the dynamo exporter (a custom translation)
and by the TorchScript exporter (a custom symbolic). The integer type follows the range:
``qmin < 0`` is int8, else uint8. A range narrower than the type's (int8's -127..127, a
4-bit -8..7 or 0..15) puts a ``Clip`` to ``[qmin, qmax]`` between the two, as torch's own
translation of ``fake_quantize_per_tensor_affine(..., 0, 127)`` does.

Example::

    y = torch.ops.fxopt.quantize_dequantize(x, scale, zero_point, -1, 0, 255)
"""

from __future__ import annotations

import onnx
import torch
from onnxscript import opset18 as op

from fxopt.lowering.onnx_export import register_translation

PER_TENSOR = -1


@torch.library.custom_op("fxopt::quantize_dequantize", mutates_args=())
def quantize_dequantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor,
                        axis: int, qmin: int, qmax: int) -> torch.Tensor:
    """Quantize ``x`` to [qmin, qmax] and back (``axis`` = -1: one scale for the tensor).

    >>> s, z = torch.tensor(0.1), torch.tensor(0, dtype=torch.int32)
    >>> torch.ops.fxopt.quantize_dequantize(torch.tensor([0.26]), s, z, -1, -128, 127)
    tensor([0.3000])
    """
    if axis == PER_TENSOR:
        return torch.fake_quantize_per_tensor_affine(
            x, scale.reshape(()).float(), zero_point.reshape(()).to(torch.int32), qmin, qmax)
    return torch.fake_quantize_per_channel_affine(
        x, scale.float(), zero_point.to(torch.int32), axis, qmin, qmax)


@quantize_dequantize.register_fake
def _(x, scale, zero_point, axis, qmin, qmax):
    return torch.empty_like(x)


def _narrowed(qmin: int, qmax: int) -> tuple[int, bool]:
    """The ONNX integer type for ``[qmin, qmax]`` and whether the range needs a Clip."""
    if qmin < 0:
        return onnx.TensorProto.INT8, (qmin, qmax) != (-128, 127)
    return onnx.TensorProto.UINT8, (qmin, qmax) != (0, 255)


def _onnx_qdq(x, scale, zero_point, axis: int, qmin: int, qmax: int):
    to, clip = _narrowed(qmin, qmax)
    zp = op.Cast(zero_point, to=to)
    extra = {} if axis == PER_TENSOR else {"axis": axis}
    q = op.QuantizeLinear(x, scale, zp, **extra)
    if clip:
        q = op.Clip(q, op.Cast(qmin, to=to), op.Cast(qmax, to=to))
    return op.DequantizeLinear(q, scale, zp, **extra)


def _torchscript_qdq(g, x, scale, zero_point, axis, qmin, qmax):
    from torch.onnx import symbolic_helper as sh

    axis = sh._get_const(axis, "i", "axis")
    qmin, qmax = sh._get_const(qmin, "i", "qmin"), sh._get_const(qmax, "i", "qmax")
    to, clip = _narrowed(qmin, qmax)
    zp = g.op("Cast", zero_point, to_i=to)
    extra = {} if axis == PER_TENSOR else {"axis_i": axis}
    q = g.op("QuantizeLinear", x, scale, zp, **extra)
    if clip:
        dtype = torch.int8 if to == onnx.TensorProto.INT8 else torch.uint8
        low = g.op("Constant", value_t=torch.tensor(qmin, dtype=dtype))
        high = g.op("Constant", value_t=torch.tensor(qmax, dtype=dtype))
        q = g.op("Clip", q, low, high)
    return g.op("DequantizeLinear", q, scale, zp, **extra)


register_translation(torch.ops.fxopt.quantize_dequantize.default, _onnx_qdq)
torch.onnx.register_custom_op_symbolic("fxopt::quantize_dequantize", _torchscript_qdq, 13)


@torch.library.custom_op("fxopt::dequantize_int32", mutates_args=())
def dequantize_int32(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * scale`` for an int32 bias quantized with scale = input scale x weight scale,
    as ONNX Runtime's QDQ format wants it (so ``DQ -> Gemm`` becomes ``QGemm``).

    >>> torch.ops.fxopt.dequantize_int32(torch.tensor([3], dtype=torch.int32),
    ...                                  torch.tensor([0.5]))
    tensor([1.5000])
    """
    return q.float() * scale.float()


@dequantize_int32.register_fake
def _(q, scale):
    return torch.empty(q.shape, dtype=torch.float32, device=q.device)


def _onnx_dequantize_int32(q, scale):  # no zero point: it defaults to 0
    return op.DequantizeLinear(q, scale, axis=0)


def _torchscript_dequantize_int32(g, q, scale):
    return g.op("DequantizeLinear", q, scale, axis_i=0)


register_translation(torch.ops.fxopt.dequantize_int32.default, _onnx_dequantize_int32)
torch.onnx.register_custom_op_symbolic("fxopt::dequantize_int32",
                                       _torchscript_dequantize_int32, 13)
