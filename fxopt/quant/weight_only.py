"""Weight-only quantization: linear (and conv) weights stored as int8 or packed int4,
dequantized in ``forward``; activations stay in floating point.

* ``bits=8``: symmetric int8 (zero point 0, values in [-127, 127]), one scale per output
  channel, or per group of ``group_size`` input features. Conv weights (2-D conv, any
  kernel size and groups) are always per output channel.
* ``bits=4``: linear only, symmetric signed int4 in [-8, 7] (scale = group max / 7), one
  scale per group of ``group_size`` (32, 64 or 128; default 128) input features. Two values
  share a byte: element ``2i`` in the low nibble, ``2i+1`` in the high one, each stored as
  ``q + 8`` (``pack_int4`` / ``unpack_int4``).
* Scales are float32 (``scale`` has shape ``(out, in // group_size)``); the bias keeps
  its dtype. The weight is dequantized on every call, to the activation's dtype.

Run it after BN folding (a weight-only conv is opaque to ``fold_bn``). The modules rebuild
in eager artifacts from their constructor attributes; the ONNX exporter turns dequantizing
into Cast/Mul (int4: bit ops first) on the int8/uint8 initializer.

Example::

    gm = fxopt.capture(model, (x,))
    stats = apply_weight_only(gm, bits=4, group_size=64, skip=["head"])
    stats["bytes_before"], stats["bytes_after"]
"""

from __future__ import annotations

import re
from collections.abc import Collection
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxopt.errors import QuantizationError
from fxopt.ops import OpView, fetch_attr, fresh_attr, model_bytes, op_of
from fxopt.quant.select import layer_name, matches

INT4_GROUP_SIZES = (32, 64, 128)
_MIN_SCALE = 1e-12  # an all-zero group gets this scale and zeros as values


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Pack int4 values (int8 tensor in [-8, 7], even last dim) two per uint8 byte.

    >>> pack_int4(torch.tensor([[-8, 7, 1, -1]], dtype=torch.int8))
    tensor([[240, 121]], dtype=torch.uint8)
    """
    if q.shape[-1] % 2 or q.numel() and (int(q.min()) < -8 or int(q.max()) > 7):
        raise QuantizationError("pack_int4 takes values in [-8, 7] with an even last dimension")
    u = (q.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of ``pack_int4``: uint8 ``(..., n)`` to int8 ``(..., 2n)`` in [-8, 7].

    >>> unpack_int4(torch.tensor([[240, 121]], dtype=torch.uint8))
    tensor([[-8,  7,  1, -1]], dtype=torch.int8)
    """
    lo = (packed & 15).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def quantize_weight(weight: torch.Tensor, bits: int,
                    group_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric quantization of a 2-D ``(out, in)`` weight: int8 values (in [-8, 7] for
    ``bits=4``, unpacked) and float32 scales ``(out, in // group_size)``; one group per row
    when ``group_size`` is None.

    >>> q, scale = quantize_weight(torch.randn(16, 64), bits=8)
    >>> q.dtype, tuple(scale.shape)
    (torch.int8, (16, 1))
    """
    out, k = weight.shape
    gs = group_size or k
    w = weight.detach().float().reshape(out, k // gs, gs)
    qmax = 127 if bits == 8 else 7
    scale = (w.abs().amax(-1, keepdim=True) / qmax).clamp(min=_MIN_SCALE)
    q = torch.round(w / scale).clamp(-qmax - (bits == 4), qmax).to(torch.int8)
    return q.reshape(out, k), scale.squeeze(-1)


def _dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``q * scale`` per group, as ``dtype``; ``q`` is ``(out, in)``, ``scale`` ``(out, g)``."""
    out = q.shape[0]
    w = q.to(dtype).reshape(out, scale.shape[1], -1) * scale.to(dtype).unsqueeze(-1)
    return w.reshape(q.shape)


class WeightOnlyLinear(nn.Module):
    """``nn.Linear`` whose weight is ``qweight`` (int8 ``(out, in)``, or uint8 ``(out, in/2)``
    holding packed int4) times float32 ``scale`` ``(out, groups)``, dequantized per call.

    >>> m = WeightOnlyLinear.from_float(torch.randn(32, 64), bits=4, group_size=32)
    >>> m(torch.randn(2, 64)).shape
    torch.Size([2, 32])
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 8,
                 group_size: int | None = None, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        packed = (out_features, in_features // 2) if bits == 4 else (out_features, in_features)
        dtype = torch.uint8 if bits == 4 else torch.int8
        self.register_buffer("qweight", torch.zeros(packed, dtype=dtype))
        groups = in_features // (group_size or in_features)
        self.register_buffer("scale", torch.ones(out_features, groups))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                   bits: int = 8, group_size: int | None = None) -> WeightOnlyLinear:
        """Quantize a float ``(out, in)`` weight (and keep ``bias`` as it is).

        >>> WeightOnlyLinear.from_float(torch.randn(8, 32)).qweight.dtype
        torch.int8
        """
        mod = cls(weight.shape[1], weight.shape[0], bits, group_size, bias is not None)
        q, mod.scale = quantize_weight(weight, bits, group_size)
        mod.qweight = pack_int4(q) if bits == 4 else q
        mod.bias = None if bias is None else bias.detach().clone()
        return mod.to(weight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in)`` weight these buffers encode, as ``dtype``."""
        q = unpack_int4(self.qweight) if self.bits == 4 else self.qweight
        return _dequantize(q, self.scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bits={self.bits}, group_size={self.group_size}, bias={self.bias is not None}"
        )


class WeightOnlyConv2d(nn.Module):
    """``nn.Conv2d`` (zero padding) whose weight is int8 ``qweight`` times one float32
    ``scale`` per output channel (``(out, 1)``), dequantized per call.

    >>> m = WeightOnlyConv2d.from_float(torch.randn(8, 3, 3, 3), padding=1)
    >>> m(torch.randn(1, 3, 8, 8)).shape
    torch.Size([1, 8, 8, 8])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: tuple[int, int],
                 stride: tuple[int, int] = (1, 1), padding: tuple[int, int] | str = (0, 0),
                 dilation: tuple[int, int] = (1, 1), groups: int = 1,
                 bias: bool = True) -> None:
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation, self.groups = _pair(padding), _pair(dilation), groups
        shape = (out_channels, in_channels // groups, *self.kernel_size)
        self.register_buffer("qweight", torch.zeros(shape, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_channels, 1))
        self.register_buffer("bias", torch.zeros(out_channels) if bias else None)

    @classmethod
    def from_float(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                   **attrs: Any) -> WeightOnlyConv2d:
        """Quantize a float ``(out, in/groups, kh, kw)`` weight; ``attrs`` are the conv's
        stride, padding, dilation and groups.

        >>> WeightOnlyConv2d.from_float(torch.randn(8, 3, 3, 3), stride=2).stride
        (2, 2)
        """
        out_c, in_per_group, kh, kw = weight.shape
        in_c = in_per_group * attrs.get("groups", 1)
        mod = cls(in_c, out_c, (kh, kw), bias=bias is not None, **attrs)
        q, mod.scale = quantize_weight(weight.reshape(out_c, -1), 8)
        mod.qweight = q.reshape(weight.shape)
        mod.bias = None if bias is None else bias.detach().clone()
        return mod.to(weight.device)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The ``(out, in/groups, kh, kw)`` weight these buffers encode, as ``dtype``."""
        flat = self.qweight.reshape(self.out_channels, -1)
        return _dequantize(flat, self.scale, dtype).reshape(self.qweight.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        w = self.dequantize(x.dtype)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
            f"groups={self.groups}, bias={self.bias is not None}"
        )


WEIGHT_ONLY_MODULES = (WeightOnlyLinear, WeightOnlyConv2d)


def _pair(v: Any) -> Any:
    """``2`` -> ``(2, 2)``; lists become tuples; ``"same"`` stays."""
    return (v, v) if isinstance(v, int) else v if isinstance(v, str) else tuple(v)


def apply_weight_only(gm: fx.GraphModule, *, bits: int = 8, group_size: int | None = None,
                      skip: Collection[str] = (), include_conv: bool = True) -> dict:
    """Replace linear (and, for ``bits=8``, 2-D conv) nodes of ``gm`` in place by calls of
    ``WeightOnlyLinear`` / ``WeightOnlyConv2d`` submodules; returns statistics.

    Any capture form works (``nn.Linear`` modules, ``F.linear``, ``aten.linear``; conv
    alike). ``skip`` holds layer names or globs (see ``fxopt.quant.select``). Returns
    ``{"quantized": [names], "skipped": [(name, reason)], "bytes_before", "bytes_after"}``.

    >>> gm = fxopt.capture(model, (x,))  # doctest: +SKIP
    >>> apply_weight_only(gm, bits=4, group_size=64, skip=["net.6"])  # doctest: +SKIP
    {'quantized': ['net.0', 'net.3'], 'skipped': [('net.6', 'skip pattern')], ...}
    """
    if bits not in (4, 8):
        raise QuantizationError(f"weight-only quantization takes bits=8 or bits=4, got {bits!r}")
    if bits == 4:
        group_size = 128 if group_size is None else group_size
        if group_size not in INT4_GROUP_SIZES:
            raise QuantizationError(f"int4 weight-only quantization needs group_size in "
                                    f"{INT4_GROUP_SIZES}, got {group_size!r}")
    elif group_size is not None and (type(group_size) is not int or group_size < 1):
        raise QuantizationError(f"group_size must be a positive int or None, got {group_size!r}")
    before = model_bytes(gm)
    graph = gm.graph
    readers = _weight_readers(gm)
    plan, skipped = [], []
    for node in graph.nodes:
        view = op_of(node)
        if view.kind not in ("linear", "conv", "conv_transpose"):
            continue
        name = layer_name(node)
        reason = "skip pattern" if matches(node, skip) else _ineligible(view, bits, include_conv)
        if not reason and _storage(view.params["weight"]) in readers:
            other = readers[_storage(view.params["weight"])]
            reason = f"weight is also read by node '{other}' (tied); both copies would stay"
        if reason:
            skipped.append((name, reason))
            continue
        k = view.params["weight"].shape[1]
        if view.kind == "linear" and group_size and k % group_size:
            sizes = (128, 64, 32) if bits == 4 else (128, 64, 32, 16, 8)
            fits = [f"group_size={g}" for g in sizes if k % g == 0]
            hint = (fits or ["bits=8 with group_size=None" if bits == 4 else "group_size=None"])[0]
            raise QuantizationError(
                f"layer '{name}' has in_features={k}, which group_size={group_size} does not "
                f"divide: use {hint}, or skip=['{name}']"
            )
        plan.append((node, view, name))
    if not plan:
        called = [gm.get_submodule(n.target) for n in graph.find_nodes(op="call_module")]
        if any(isinstance(m, WEIGHT_ONLY_MODULES) for m in called):
            raise QuantizationError(
                "already quantized: the graph holds weight-only layers and nothing else to "
                "quantize; quantize the float model instead of quantizing twice"
            )
        why = "; ".join(f"{n}: {r}" for n, r in skipped) or "no linear or conv layer"
        raise QuantizationError(f"nothing to quantize ({why}); check skip= and the model")
    made: dict[tuple, str] = {}
    dead: set[fx.Node] = set()
    for node, view, name in plan:
        weight, bias = view.params["weight"], view.params["bias"]
        # by storage, not id(): an op whose weight is stored transposed (addmm) gives a fresh
        # view each time, and a freed view's id can be reused by the next layer's
        key = (_view_key(weight), _view_key(bias) if bias is not None else None,
               repr(view.attrs))
        if key not in made:
            made[key] = fresh_attr(gm, re.sub(r"\W", "_", name) + f"_w{bits}")
            if view.kind == "linear":
                mod = WeightOnlyLinear.from_float(weight, bias, bits=bits, group_size=group_size)
            else:
                mod = WeightOnlyConv2d.from_float(weight, bias, **view.attrs)
            gm.add_submodule(made[key], mod)
        with graph.inserting_before(node):
            new = graph.call_module(made[key], (view.input,))
        new.meta = dict(node.meta)
        dead.update(n for n in (view.param_node("weight"), view.param_node("bias")) if n)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
    for n in dead:
        if not n.users:
            graph.erase_node(n)
            _drop_attr(gm, str(n.target))
    gm.delete_all_unused_submodules()
    graph.lint()
    gm.recompile()
    quantized = [name for _, _, name in plan]
    return {"quantized": quantized, "skipped": skipped, "bytes_before": before,
            "bytes_after": model_bytes(gm)}


def _ineligible(view: OpView, bits: int, include_conv: bool) -> str | None:
    """Why this linear/conv node stays in float, or None."""
    if view.kind == "conv_transpose":
        return "transposed conv is not weight-only quantized"
    if view.kind == "conv" and not include_conv:
        return "conv excluded (include_conv=False)"
    if view.kind == "conv" and bits == 4:
        return "int4 covers linear layers only"
    weight = view.params["weight"]
    if view.input is None:
        return "its input is not a graph value"
    if weight is None or (view.module is None and view.param_node("weight") is None):
        return "weight is computed in the graph, not a stored tensor"
    if not weight.is_floating_point():
        return f"weight dtype is {weight.dtype}, not floating point"
    if view.param_node("bias") is not None and view.params["bias"] is None:
        return "bias is computed in the graph"
    if view.kind == "conv":
        if weight.dim() != 4:
            return f"conv{weight.dim() - 2}d: only 2-D conv is supported"
        if getattr(view.module, "padding_mode", "zeros") != "zeros":
            return f"padding_mode={view.module.padding_mode!r}: only zero padding"
    elif weight.dim() != 2:
        return f"linear weight has {weight.dim()} dims"
    return None


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _view_key(t: torch.Tensor) -> tuple:
    return (_storage(t), t.storage_offset(), tuple(t.shape), tuple(t.stride()))


def _weight_readers(gm: fx.GraphModule) -> dict[int, str]:
    """Storage of a tensor -> a node reading it other than as a linear/conv weight (tied
    weights)."""
    out: dict[int, str] = {}
    for n in gm.graph.nodes:
        if n.op == "get_attr":
            t = fetch_attr(gm, str(n.target))
            for u in n.users:
                uv = op_of(u)
                if uv.kind not in ("linear", "conv") or uv.param_node("weight") is not n:
                    out.setdefault(_storage(t), u.name)
        elif n.op == "call_module" and op_of(n).kind not in ("linear", "conv"):
            mod = gm.get_submodule(str(n.target))
            for t in [*mod.parameters(), *mod.buffers()]:
                out.setdefault(_storage(t), n.name)
    return out


def _drop_attr(gm: fx.GraphModule, path: str) -> None:
    """Delete the tensor at ``path`` unless some node still reads it."""
    for n in gm.graph.nodes:
        if n.op == "get_attr" and n.target == path:
            return
        if n.op == "call_module" and path.startswith(f"{n.target}."):
            return
    parent, _, leaf = path.rpartition(".")
    owner = fetch_attr(gm, parent)
    if isinstance(owner, nn.Module) and isinstance(getattr(owner, leaf, None), torch.Tensor):
        delattr(owner, leaf)  # a parameter, buffer or plain tensor attribute
