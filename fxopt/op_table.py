"""The op table: one ``OpDef`` per op kind (see ``fxopt.ops``).

Supporting a new op is one ``register_op(OpDef(...))`` call. MACs are counted for the
ops that dominate compute (conv, conv_transpose, linear, matmul, attention); everything
else counts 0, as fvcore and ptflops do for element-wise work.

Properties beyond the category's defaults (``fxopt.op_props.CATEGORY_PROPS``) are listed on
each entry: ``HALF_COMPUTE`` (run in fp16/bf16 by ``half``), ``FP32_SENSITIVE`` (kept fp32 by
``half``), ``COMMUTATIVE`` (rules match both operand orders), ``FOLD_INTO`` (``fold_bn``
folds into it), ``WEIGHT_QUANT`` (static int8 quantizes its weight), ``SPARSIFY``
(``sparsify`` zeroes its weight; dim 1 is the input-channel axis 2:4 groups run along).
"""

from __future__ import annotations

import builtins
import math
import operator
import re

import torch
import torch.nn.functional as F
from torch import nn

from fxopt.op_props import Effects, Prop
from fxopt.ops import OpDef, OpView, register_op

_HALF = Prop.HALF_COMPUTE
_FP32 = Prop.FP32_SENSITIVE


def _numel(shape) -> int:
    return math.prod(shape) if shape is not None else 0


def _weight_shape(view: OpView) -> tuple[int, ...]:
    w = view.params.get("weight")
    if w is not None:
        return tuple(w.shape)
    node = view.param_node("weight")
    shape = tuple(node.meta["shape"])
    return shape[::-1] if "weight" in view.entry.transposed else shape


def _conv_macs(view: OpView) -> int:
    # each output element: (Cin / groups) * prod(kernel) multiply-adds
    return _numel(view.out_shape) * _numel(_weight_shape(view)[1:])


def _conv_transpose_macs(view: OpView) -> int:
    # each input element scatters into Cout / groups * prod(kernel) outputs
    return _numel(view.in_shape(0)) * _numel(_weight_shape(view)[1:])


def _linear_macs(view: OpView) -> int:
    return _numel(view.out_shape) * _weight_shape(view)[-1]


def _matmul_macs(view: OpView) -> int:
    # K is the first operand's last dim, whether it is an activation or a get_attr weight
    first = view.node.args[0]
    a = first.meta["shape"] if hasattr(first, "meta") else tuple(first.shape)
    return _numel(view.out_shape or (1,)) * a[-1]


def _sdpa_macs(view: OpView) -> int:
    q, k, v = view.in_shape(0), view.in_shape(1), view.in_shape(2)
    batch = _numel(q[:-2])
    length, source = q[-2], k[-2]
    # q @ k^T (E per score) + attn @ v (Ev per output), per query head
    return batch * length * source * (q[-1] + v[-1])


def _mha_macs(view: OpView) -> int:
    m: nn.MultiheadAttention = view.module
    q, k, v = view.in_shape(0), view.in_shape(1), view.in_shape(2)
    e = m.embed_dim
    if not m.batch_first:  # (L, B, E) -> count the same way
        q, k, v = (s[1:2] + s[0:1] + s[2:] for s in (q, k, v))
    b, length, source = q[0], q[1], k[1]
    proj = b * (length * q[-1] * e + source * k[-1] * e + source * v[-1] * e)
    attention = b * length * source * e * 2
    out = b * length * e * e
    return proj + attention + out


def _spatial_rank(view: OpView) -> int | None:
    """2 for Conv2d / F.max_pool2d / aten.conv2d.default, from the op's own name."""
    target = view.module if view.module is not None else view.node.target
    name = type(target).__name__ if view.module is not None else getattr(target, "__name__", "")
    found = re.search(r"([123])d", str(name))
    return int(found.group(1)) if found else None


def _per_dim(*keys: str):
    """``normalize`` for conv/pool attrs: ints become one entry per spatial dim, and a pool's
    missing stride is its kernel size (as nn.MaxPool2d and F.max_pool2d define it)."""

    def normalize(attrs: dict, view: OpView) -> dict:
        if "kernel_size" in attrs and attrs.get("stride") in (None, ()):
            attrs["stride"] = attrs["kernel_size"]
        rank = _spatial_rank(view)
        for key in keys:
            value = attrs.get(key)
            if rank and isinstance(value, int) and not isinstance(value, bool):
                attrs[key] = (value,) * rank
        return attrs

    return normalize


def _no_padding_is_none(attrs: dict, view: OpView) -> dict:
    """nn.Embedding says ``padding_idx=None`` where torch.embedding / ATen say -1."""
    if attrs.get("padding_idx", -1) == -1:
        attrs["padding_idx"] = None
    return attrs


def _dims_as_tuple(attrs: dict, view: OpView) -> dict:
    """``x.sum(1)`` reduces over ``(1,)``, as aten.sum.dim_IntList spells it."""
    if isinstance(attrs.get("dim"), int):
        attrs["dim"] = (attrs["dim"],)
    return attrs


# how channels flow through each kind (rules in fxopt/op_flow.py); kinds absent here block
_FLOW = {
    "conv": "conv", "conv_transpose": "conv_transpose", "linear": "linear",
    "embedding": "embedding", "batch_norm": "batch_norm", "layer_norm": "normalized_last",
    "rms_norm": "normalized_last", "scaled_dot_product": "sdpa", "matmul": "matmul",
    "softmax": "over_dim", "log_softmax": "over_dim", "cat": "concat", "split": "split",
    "chunk": "split", "reshape": "reshape", "flatten": "reshape", "unflatten": "reshape",
    "squeeze": "reshape", "unsqueeze": "reshape", "permute": "axis_move",
    "transpose": "axis_move", "contiguous": "same_index", "clone": "same_index",
    "to": "same_index", "expand": "repeat", "getitem": "index", "size": "neutral",
    "interpolate": "channel_first", "max_pool": "channel_first", "avg_pool": "channel_first",
    "adaptive_avg_pool": "channel_first", "adaptive_max_pool": "channel_first",
    "dropout": "same_index", "identity": "same_index", "assert_metadata": "neutral",
    "cumsum": "over_dim", "pad": "pad", "attention": "mha_module",
}


def _op(kind, category, **kw) -> OpDef:
    flow = kw.pop("flow", None) or _FLOW.get(kind) or (
        "same_index" if category in ("activation", "elementwise") else
        "over_dim" if category == "reduction" else None)
    return register_op(OpDef(kind, category, flow=flow, **kw))


_CONV_SIG = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
_CONV_T_SIG = (
    "input", "weight", "bias", "stride", "padding", "output_padding", "groups", "dilation",
)
_CONV_ATTRS = ("stride", "padding", "dilation", "groups")
_CONV_DEFAULTS = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1}

# ---------------------------------------------------------------- weighted ops
_op("conv", "conv",
    modules=(nn.Conv1d, nn.Conv2d, nn.Conv3d),
    functions=(F.conv1d, F.conv2d, F.conv3d, torch.conv1d, torch.conv2d, torch.conv3d),
    aten=("conv1d", "conv2d", "conv3d", "conv1d.padding", "conv2d.padding", "conv3d.padding"),
    signature=_CONV_SIG, defaults=_CONV_DEFAULTS, params=("weight", "bias"),
    attrs=_CONV_ATTRS, macs=_conv_macs, normalize=_per_dim("stride", "padding", "dilation"),
    props=(_HALF, Prop.FOLD_INTO, Prop.WEIGHT_QUANT, Prop.SPARSIFY))
_op("conv_transpose", "conv",
    modules=(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d),
    functions=(F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
               torch.conv_transpose1d, torch.conv_transpose2d, torch.conv_transpose3d),
    aten=("conv_transpose1d", "conv_transpose2d", "conv_transpose3d",
          "conv_transpose2d.input", "conv_transpose1d.default", "conv_transpose3d.input"),
    signature=_CONV_T_SIG, defaults={**_CONV_DEFAULTS, "output_padding": 0},
    params=("weight", "bias"), attrs=(*_CONV_ATTRS, "output_padding"),
    macs=_conv_transpose_macs,
    normalize=_per_dim("stride", "padding", "dilation", "output_padding"),
    props=(_HALF, Prop.FOLD_INTO))
_op("linear", "linear",
    modules=(nn.Linear,), functions=(F.linear, torch._C._nn.linear), aten=("linear",),
    signature=("input", "weight", "bias"), defaults={"bias": None},
    params=("weight", "bias"), macs=_linear_macs,
    props=(_HALF, Prop.FOLD_INTO, Prop.WEIGHT_QUANT, Prop.SPARSIFY))


def _addmm_is_linear(node) -> bool:
    # beta * bias + alpha * (x @ W) is a linear layer when both scales are 1 and the bias is
    # a vector; a matrix ``self`` is a residual add, not a bias
    bias = node.args[0] if node.args else node.kwargs.get("self")
    shape = bias.meta.get("shape") if hasattr(bias, "meta") else getattr(bias, "shape", None)
    return (
        node.kwargs.get("beta", 1) == 1
        and node.kwargs.get("alpha", 1) == 1
        and (shape is None or len(shape) == 1)
    )


# aten.addmm(bias, x, W) with W [in, out]: GPT-2's Conv1D and some exports of nn.Linear. The
# same kind as linear (static int8 puts its per-channel weight fake-quant on the stored
# tensor's axis 1); fold_bn keeps to the other entry, its rewrites scale axis 0
_op("linear", "linear",
    functions=(torch.addmm,), aten=("addmm", "addmm.default"),
    signature=("bias", "input", "weight", "beta", "alpha"),
    aten_names={"self": "bias", "mat1": "input", "mat2": "weight"},
    transposed=("weight",), applies=_addmm_is_linear,
    params=("weight", "bias"), attrs=(), macs=_linear_macs,
    props=(_HALF, Prop.WEIGHT_QUANT))
_op("batch_norm", "norm",
    modules=(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d),
    functions=(F.batch_norm,),
    aten=("batch_norm", "_native_batch_norm_legit_no_training", "native_batch_norm"),
    signature=("input", "running_mean", "running_var", "weight", "bias", "training",
               "momentum", "eps"),
    defaults={"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5},
    params=("weight", "bias", "running_mean", "running_var"), attrs=("eps", "momentum"))
_op("batch_norm", "norm",  # torch.batch_norm orders its arguments like the ATen schema
    functions=(torch.batch_norm,),
    signature=("input", "weight", "bias", "running_mean", "running_var", "training",
               "momentum", "eps", "cudnn_enabled"),
    defaults={"training": False, "momentum": 0.1, "eps": 1e-5},
    params=("weight", "bias", "running_mean", "running_var"), attrs=("eps", "momentum"))
_op("layer_norm", "norm",
    modules=(nn.LayerNorm,), functions=(F.layer_norm, torch.layer_norm),
    aten=("layer_norm", "native_layer_norm"),
    signature=("input", "normalized_shape", "weight", "bias", "eps"),
    defaults={"weight": None, "bias": None, "eps": 1e-5},
    params=("weight", "bias"), attrs=("normalized_shape", "eps"))
_op("group_norm", "norm",
    modules=(nn.GroupNorm,), functions=(F.group_norm, torch.group_norm),
    aten=("group_norm", "native_group_norm"),
    signature=("input", "num_groups", "weight", "bias", "eps"),
    defaults={"weight": None, "bias": None, "eps": 1e-5},
    params=("weight", "bias"), attrs=("num_groups", "eps"))
_op("rms_norm", "norm",
    modules=tuple(m for m in (getattr(nn, "RMSNorm", None),) if m),
    functions=tuple(f for f in (getattr(F, "rms_norm", None),) if f), aten=("rms_norm",),
    signature=("input", "normalized_shape", "weight", "eps"), defaults={"weight": None},
    params=("weight",), attrs=("normalized_shape", "eps"))
_op("embedding", "embedding",
    modules=(nn.Embedding,), functions=(F.embedding,), aten=("embedding",),
    signature=("input", "weight", "padding_idx"), params=("weight",), attrs=("padding_idx",),
    normalize=_no_padding_is_none, props=(_HALF,))
_op("embedding", "embedding",  # torch.embedding takes the table first, like aten.embedding
    functions=(torch.embedding,), signature=("weight", "input", "padding_idx"),
    params=("weight",), attrs=("padding_idx",), normalize=_no_padding_is_none, props=(_HALF,))
_op("attention", "attention",
    modules=(nn.MultiheadAttention,), params=("in_proj_weight", "in_proj_bias"),
    attrs=("embed_dim", "num_heads", "batch_first"), macs=_mha_macs, props=(_HALF,))
_op("scaled_dot_product", "attention",
    functions=(F.scaled_dot_product_attention,),
    aten=("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu"),
    signature=("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale"),
    defaults={"attn_mask": None, "dropout_p": 0.0, "is_causal": False, "scale": None},
    attrs=("is_causal", "scale", "dropout_p"), macs=_sdpa_macs, props=(_HALF,))
_op("matmul", "matmul",
    functions=(torch.matmul, torch.bmm, torch.mm, operator.matmul),
    methods=("matmul", "bmm", "mm"), aten=("matmul", "bmm", "mm"),
    signature=("input", "other"), macs=_matmul_macs, props=(_HALF,))

# ---------------------------------------------------------------- activations
_ACTIVATIONS = {
    "relu": ((nn.ReLU,), (F.relu, torch.relu), ("relu", "relu_")),
    "relu6": ((nn.ReLU6,), (F.relu6,), ("relu6",)),
    "gelu": ((nn.GELU,), (F.gelu,), ("gelu",)),
    "silu": ((nn.SiLU,), (F.silu,), ("silu", "silu_")),
    "sigmoid": ((nn.Sigmoid,), (torch.sigmoid, F.sigmoid), ("sigmoid",)),
    "tanh": ((nn.Tanh,), (torch.tanh, F.tanh), ("tanh",)),
    "hardswish": ((nn.Hardswish,), (F.hardswish,), ("hardswish", "hardswish_")),
    "hardsigmoid": ((nn.Hardsigmoid,), (F.hardsigmoid,), ("hardsigmoid", "hardsigmoid_")),
    "hardtanh": ((nn.Hardtanh,), (F.hardtanh,), ("hardtanh", "hardtanh_")),
    "leaky_relu": ((nn.LeakyReLU,), (F.leaky_relu,), ("leaky_relu", "leaky_relu_")),
    "elu": ((nn.ELU,), (F.elu,), ("elu",)),
    "mish": ((nn.Mish,), (F.mish,), ("mish",)),
    "softplus": ((nn.Softplus,), (F.softplus,), ("softplus",)),
}
for _kind, (_mods, _fns, _aten) in _ACTIVATIONS.items():
    _op(_kind, "activation", modules=_mods, functions=_fns, methods=(_kind, _kind + "_"),
        aten=_aten)
_op("softmax", "softmax", modules=(nn.Softmax,), functions=(F.softmax, torch.softmax),
    methods=("softmax",), aten=("softmax", "_softmax"), signature=("input", "dim"),
    attrs=("dim",))
_op("log_softmax", "softmax", modules=(nn.LogSoftmax,),
    functions=(F.log_softmax, torch.log_softmax), methods=("log_softmax",),
    aten=("log_softmax", "_log_softmax"), signature=("input", "dim"), attrs=("dim",))

# ---------------------------------------------------------------- element-wise arithmetic
_BINARY = ("input", "other")
_op("add", "elementwise", functions=(operator.add, operator.iadd, torch.add),
    methods=("add", "add_"), aten=("add", "add_"), signature=(*_BINARY, "alpha"),
    defaults={"alpha": 1}, props=(Prop.COMMUTATIVE,))
_op("sub", "elementwise", functions=(operator.sub, operator.isub, torch.sub),
    methods=("sub", "sub_"), aten=("sub", "sub_"), signature=(*_BINARY, "alpha"),
    defaults={"alpha": 1})
# rsub(x, c) is c - x (export writes ``1 - x`` so): not a sub whose "x - 0" is a no-op
_op("rsub", "elementwise", functions=(torch.rsub,), methods=("rsub",), aten=("rsub",),
    signature=(*_BINARY, "alpha"), defaults={"alpha": 1})
_op("mul", "elementwise", functions=(operator.mul, operator.imul, torch.mul),
    methods=("mul", "mul_"), aten=("mul", "mul_"), signature=_BINARY, props=(Prop.COMMUTATIVE,))
_op("div", "elementwise", functions=(operator.truediv, operator.itruediv, torch.div),
    methods=("div", "div_"), aten=("div", "div_"), signature=_BINARY)
_op("clamp", "elementwise", functions=(torch.clamp, torch.clip), methods=("clamp", "clip"),
    aten=("clamp", "clip"), signature=("input", "min", "max"),
    defaults={"min": None, "max": None})
_op("neg", "elementwise", functions=(operator.neg, torch.neg), methods=("neg",),
    aten=("neg",))
_op("pow", "elementwise", functions=(operator.pow, torch.pow), methods=("pow",),
    aten=("pow",), signature=("input", "exponent"), props=(_FP32,))
for _kind, _fn, _props in (("exp", torch.exp, (_FP32,)), ("log", torch.log, (_FP32,)),
                           ("sqrt", torch.sqrt, ()), ("rsqrt", torch.rsqrt, ()),
                           ("abs", torch.abs, ()), ("erf", torch.erf, ())):
    _op(_kind, "elementwise", functions=(_fn,), methods=(_kind,), aten=(_kind,), props=_props)

# ---------------------------------------------------------------- tensor plumbing
_op("cat", "concat", functions=(torch.cat, torch.concat, torch.concatenate),
    aten=("cat", "concat"), signature=("tensors", "dim"), defaults={"dim": 0},
    attrs=("dim",))
_op("stack", "concat", functions=(torch.stack,), aten=("stack",),
    signature=("tensors", "dim"), defaults={"dim": 0}, attrs=("dim",))
_op("split", "split", functions=(torch.split, torch.split_with_sizes, torch.tensor_split),
    methods=("split", "split_with_sizes", "tensor_split"),
    aten=("split", "split_with_sizes", "tensor_split"),
    signature=("input", "split_size", "dim"), defaults={"dim": 0}, attrs=("dim",))
_op("chunk", "split", functions=(torch.chunk,), methods=("chunk",), aten=("chunk",),
    signature=("input", "chunks", "dim"), defaults={"dim": 0}, attrs=("chunks", "dim"))
_op("unbind", "split", functions=(torch.unbind,), methods=("unbind",), aten=("unbind",),
    signature=("input", "dim"), defaults={"dim": 0}, attrs=("dim",))
_op("reshape", "shape", functions=(torch.reshape,),
    methods=("view", "reshape", "view_as", "reshape_as"),
    aten=("view", "reshape", "_unsafe_view", "view_as", "_reshape_alias"),
    signature=("input", "shape"))
_op("flatten", "shape", modules=(nn.Flatten,), functions=(torch.flatten,), methods=("flatten",),
    aten=("flatten",), signature=("input", "start_dim", "end_dim"),
    defaults={"start_dim": 0, "end_dim": -1}, module_attrs={}, attrs=("start_dim", "end_dim"))
_op("unflatten", "shape", modules=(nn.Unflatten,), functions=(torch.unflatten,),
    methods=("unflatten",), aten=("unflatten",), signature=("input", "dim", "sizes"))
_op("squeeze", "shape", functions=(torch.squeeze,), methods=("squeeze",), aten=("squeeze",),
    signature=("input", "dim"))
_op("unsqueeze", "shape", functions=(torch.unsqueeze,), methods=("unsqueeze",),
    aten=("unsqueeze",), signature=("input", "dim"))
_op("permute", "layout", functions=(torch.permute,), methods=("permute",), aten=("permute",),
    signature=("input", "dims"), attrs=("dims",))
_op("transpose", "layout", functions=(torch.transpose, torch.t),
    methods=("transpose", "t", "mT"), aten=("transpose", "t", "swapaxes"),
    signature=("input", "dim0", "dim1"), attrs=("dim0", "dim1"))
_op("contiguous", "layout", methods=("contiguous",), aten=("contiguous",),
    signature=("input", "memory_format"))
_op("clone", "layout", functions=(torch.clone,), methods=("clone",), aten=("clone",))
_op("to", "cast", methods=("to", "type", "float", "half", "bfloat16", "double", "bool", "int",
                          "long", "short", "char", "byte"),
    aten=("to", "_to_copy"), signature=("input", "dtype"))
_op("expand", "broadcast", methods=("expand", "expand_as", "repeat", "repeat_interleave"),
    functions=(torch.repeat_interleave,),
    aten=("expand", "repeat", "repeat_interleave", "expand_as"))
_op("getitem", "index", functions=(operator.getitem,), aten=("select", "slice", "index"),
    signature=("input", "index"))
_op("size", "shape_query", functions=(builtins.getattr,), methods=("size", "dim", "numel"),
    aten=("sym_size", "sym_numel", "sym_stride", "size", "dim"))
_op("pad", "shape", functions=(F.pad,), aten=("pad", "constant_pad_nd"),
    signature=("input", "pad", "mode", "value"), defaults={"mode": "constant", "value": None})
_op("interpolate", "resize", modules=(nn.Upsample,), functions=(F.interpolate,),
    aten=("upsample_nearest2d", "upsample_bilinear2d", "upsample_nearest2d.vec",
          "upsample_bilinear2d.vec"))

# ---------------------------------------------------------------- pooling and reductions
_POOL = ("input", "kernel_size", "stride", "padding")
_POOL_DEFAULTS = {"stride": None, "padding": 0}
_POOL_NORMALIZE = _per_dim("kernel_size", "stride", "padding")
_op("max_pool", "pooling", modules=(nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d),
    functions=(F.max_pool1d, F.max_pool2d, F.max_pool3d, torch.max_pool2d),
    aten=("max_pool1d", "max_pool2d", "max_pool3d", "max_pool2d_with_indices"),
    signature=_POOL, defaults=_POOL_DEFAULTS, attrs=("kernel_size", "stride", "padding"),
    normalize=_POOL_NORMALIZE)
_op("avg_pool", "pooling", modules=(nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d),
    functions=(F.avg_pool1d, F.avg_pool2d, F.avg_pool3d),
    aten=("avg_pool1d", "avg_pool2d", "avg_pool3d"),
    signature=_POOL, defaults=_POOL_DEFAULTS, attrs=("kernel_size", "stride", "padding"),
    normalize=_POOL_NORMALIZE)
_op("adaptive_avg_pool", "pooling",
    modules=(nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d),
    functions=(F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d),
    aten=("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_avg_pool3d",
          "_adaptive_avg_pool2d"),
    signature=("input", "output_size"), attrs=("output_size",),
    normalize=_per_dim("output_size"))
_op("adaptive_max_pool", "pooling", modules=(nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d),
    functions=(F.adaptive_max_pool1d, F.adaptive_max_pool2d),
    aten=("adaptive_max_pool1d", "adaptive_max_pool2d"),
    signature=("input", "output_size"), attrs=("output_size",),
    normalize=_per_dim("output_size"))
_RED = ("input", "dim", "keepdim")
# sums and moments accumulate (fp32-sensitive); a max or min is exact in any precision
for _kind, _fn, _props in (("mean", torch.mean, (_FP32,)), ("sum", torch.sum, (_FP32,)),
                           ("amax", torch.amax, ()), ("amin", torch.amin, ()),
                           ("prod", torch.prod, (_FP32,)), ("var", torch.var, (_FP32,)),
                           ("std", torch.std, (_FP32,))):
    _op(_kind, "reduction", functions=(_fn,), methods=(_kind,), aten=(_kind,), signature=_RED,
        defaults={"keepdim": False}, attrs=("dim", "keepdim"), normalize=_dims_as_tuple,
        props=_props)
# a p-norm over ``dim`` (GRN in ConvNeXt-V2 takes it over the spatial axes, keeping channels)
_op("vector_norm", "reduction", functions=(torch.linalg.vector_norm,),
    aten=("linalg_vector_norm",), signature=("input", "ord", "dim", "keepdim", "dtype"),
    defaults={"ord": 2, "dim": None, "keepdim": False, "dtype": None},
    attrs=("ord", "dim", "keepdim"), normalize=_dims_as_tuple, props=(_FP32,))
_op("cumsum", "reduction", functions=(torch.cumsum,), methods=("cumsum",), aten=("cumsum",),
    signature=("input", "dim"), attrs=("dim",), props=(_FP32,))

# ---------------------------------------------------------------- no-ops in inference
_op("dropout", "dropout",
    modules=(nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout),
    functions=(F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout,
               torch.dropout),
    aten=("dropout", "native_dropout", "feature_dropout", "alpha_dropout"),
    signature=("input", "p", "training", "inplace"),
    defaults={"p": 0.5, "training": True, "inplace": False}, attrs=("p",),
    effects=Effects.RANDOM)  # random in training; remove_dropout is what removes an eval one
# Library helpers that symbolic_trace keeps as leaf calls (they are torch.fx.wrap-ped), named
# so that the libraries need not be importable; the zoo's copies are named alongside.
_op("stochastic_depth", "dropout",
    qualnames=("torchvision.ops.stochastic_depth.stochastic_depth",
               "fxopt.zoo.layers.stochastic_depth"),
    signature=("input", "p", "mode", "training"), defaults={"training": True},
    attrs=("p", "mode"), effects=Effects.RANDOM)
_op("drop_path", "dropout",
    qualnames=("timm.layers.drop.drop_path", "timm.models.layers.drop.drop_path",
               "fxopt.zoo.layers.drop_path"),
    signature=("input", "p", "training", "scale_by_keep"),
    defaults={"p": 0.0, "training": False, "scale_by_keep": True}, attrs=("p",),
    effects=Effects.RANDOM)
_op("identity", "identity", modules=(nn.Identity,), aten=("alias",))
# torch.export checks dtype/device after casts; a check has effects, so it is not pure
_op("assert_metadata", "check", aten=("_assert_tensor_metadata",), effects=Effects.SIDE_EFFECT)
