"""Folding passes: batch norm and per-channel affine constants into conv / linear weights.

``fold_bn`` turns ``conv -> batch_norm`` (and conv_transpose, linear) into one op with
adjusted weight and bias, in every capture form, and also folds a per-channel ``mul`` /
``div`` / ``add`` / ``sub`` by a constant that directly follows a conv or linear. Where it
must not fold it leaves the graph alone and says why in ``stats["refused"]``.
"""

from __future__ import annotations

import numbers

import torch
import torch.fx as fx

from fxopt.graph_utils import attr_key, state_key
from fxopt.op_props import Prop
from fxopt.ops import OpView, fetch_attr, has_prop, kind_of, kinds_with, op_of
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass
from fxopt.passes.cleanup import drop_unused_attributes


def _call_view(node: object) -> OpView | None:
    if isinstance(node, fx.Node) and node.op.startswith("call"):
        return op_of(node)
    return None


def _channel_dim(producer: OpView) -> int:
    return -1 if producer.kind == "linear" else 1


def _why_not_foldable(producer: OpView | None, consumer: fx.Node) -> str | None:
    """Reason the producer cannot absorb a per-channel transform, or None if it can."""
    if producer is None or not has_prop(producer, Prop.FOLD_INTO):
        kind = producer.kind if producer else getattr(consumer.args[0], "op", "a constant")
        return f"input is {kind}, not {'/'.join(sorted(kinds_with(Prop.FOLD_INTO)))}"
    node = producer.node
    if len(node.users) > 1:
        others = sorted(u.name for u in node.users if u is not consumer)
        return f"{node.name} output is also used by {', '.join(others)}"
    if producer.module is not None:
        calls = [n for n in node.graph.nodes if n.op == "call_module" and n.target == node.target]
        if len(calls) > 1:
            return f"module {node.target} is called {len(calls)} times (shared weights)"
    weight = producer.params.get("weight")
    if weight is None:
        return f"{node.name} weight is computed in the graph (run fold_constants first)"
    if not weight.is_floating_point():
        return f"{node.name} weight is {weight.dtype}, not floating point"
    bias_node = producer.param_node("bias")
    if producer.params.get("bias") is None and bias_node is not None:
        return f"{node.name} bias is computed in the graph (run fold_constants first)"
    return None


def _apply_channel_affine(producer: OpView, scale: torch.Tensor | None,
                          shift: torch.Tensor | None, sources: list[dict] = ()) -> None:
    """W' = W * scale (per output channel), b' = b * scale + shift.

    The producer node remembers what it absorbed, for plans on the user's model (prune):
    ``meta["fxopt_folded"]`` lists the per-channel tensors folded in (state_dict key and
    the dim that runs along the channels), ``meta["fxopt_created"]`` the parameters the
    fold created (a bias the user's layer does not have)."""
    weight = producer.params["weight"].detach()
    bias = producer.params.get("bias")
    meta = producer.node.meta
    if bias is None and "bias" not in meta.get("fxopt_created", ()):
        meta["fxopt_created"] = [*meta.get("fxopt_created", ()), "bias"]
    meta["fxopt_folded"] = [*meta.get("fxopt_folded", ()), *sources]
    out_channels = _out_channels(producer, weight)
    bias = torch.zeros(out_channels, dtype=weight.dtype) if bias is None else bias.detach()
    if scale is not None:
        scale = scale.to(weight.dtype)
        weight = weight * _weight_scale_shape(producer, weight, scale)
        bias = bias * scale
    if shift is not None:
        bias = bias + shift.to(bias.dtype)
    producer.set_param("weight", weight.contiguous())
    producer.set_param("bias", bias.contiguous())


def _out_channels(producer: OpView, weight: torch.Tensor) -> int:
    if producer.kind == "conv_transpose":
        return weight.shape[1] * int(producer.attrs.get("groups", 1))
    return weight.shape[0]


def _weight_scale_shape(producer: OpView, weight: torch.Tensor,
                        scale: torch.Tensor) -> torch.Tensor:
    if producer.kind == "conv_transpose":
        # weight is [Cin, Cout/groups, *k]; output channel g*Cout/groups + j scales W[g-block, j]
        groups = int(producer.attrs.get("groups", 1))
        cin, cout_g = weight.shape[0], weight.shape[1]
        per_group = scale.view(groups, 1, cout_g)
        full = per_group.expand(groups, cin // groups, cout_g).reshape(cin, cout_g)
        return full.view(cin, cout_g, *([1] * (weight.dim() - 2)))
    return scale.view(-1, *([1] * (weight.dim() - 1)))


# --------------------------------------------------------------------------- batch norm
def _bn_training(bn: OpView) -> bool:
    if bn.module is not None:
        return bool(bn.module.training) or not bn.module.track_running_stats
    return bool(bn.arg("training", False))


def _bn_affine(bn: OpView) -> tuple[torch.Tensor, torch.Tensor] | None:
    p = bn.params
    mean, var = p.get("running_mean"), p.get("running_var")
    if mean is None or var is None:
        return None
    eps = float(bn.attrs.get("eps", 1e-5))
    inv_std = torch.rsqrt(var.detach().double() + eps)
    gamma = p.get("weight")
    beta = p.get("bias")
    scale = inv_std if gamma is None else gamma.detach().double() * inv_std
    shift = -mean.detach().double() * scale
    if beta is not None:
        shift = shift + beta.detach().double()
    return scale, shift


def _bn_output_users(node: fx.Node) -> list[fx.Node] | None:
    """Nodes to rewire: the BN node itself, or getitem(0) users of a tuple-valued BN."""
    if not isinstance(node.meta.get("shape"), list):
        return [node]
    users = []
    for u in node.users:
        if u.op == "call_function" and u.target.__name__ == "getitem" and u.args[1] == 0:
            users.append(u)
        elif u.op == "call_function" and u.target.__name__ == "getitem" and not u.users:
            continue
        else:
            return None
    return users


def _fold_one_bn(node: fx.Node) -> str | None:
    bn = op_of(node)
    producer = _call_view(bn.input)
    reason = _why_not_foldable(producer, node)
    if reason:
        return reason
    if _bn_training(bn):
        return "batch norm is in training mode (uses batch statistics)"
    affine = _bn_affine(bn)
    if affine is None:
        return "batch norm has no running statistics"
    scale, shift = affine
    weight = producer.params["weight"]
    if scale.numel() != _out_channels(producer, weight):
        return (f"channel mismatch: batch norm has {scale.numel()} channels, "
                f"{producer.node.name} produces {_out_channels(producer, weight)}")
    out_shape = producer.out_shape
    if producer.kind == "linear" and (out_shape is None or len(out_shape) != 2):
        return "batch norm after linear folds only on 2-D (N, C) activations"
    targets = _bn_output_users(node)
    if targets is None:
        return "batch norm auxiliary outputs (saved statistics) are used"
    sources = [{"param": state_key(bn, name), "dim": 0} for name in
               ("weight", "bias", "running_mean", "running_var") if bn.params.get(name) is not None]
    _apply_channel_affine(producer, scale, shift, sources)
    for target in targets:
        target.replace_all_uses_with(producer.node)
    for target in targets:
        if target is not node:
            node.graph.erase_node(target)
    for u in list(node.users):
        node.graph.erase_node(u)
    node.graph.erase_node(node)
    return None


# --------------------------------------------------------------------------- affine constants
_AFFINE = {"mul": "scale", "div": "scale", "add": "shift", "sub": "shift"}


def _constant_value(arg: object) -> torch.Tensor | None:
    if isinstance(arg, numbers.Number) and not isinstance(arg, bool):
        return torch.tensor(float(arg))
    if not (isinstance(arg, fx.Node) and arg.op == "get_attr"):
        return None
    value = fetch_attr(arg.graph.owning_module, arg.target)
    return value if isinstance(value, torch.Tensor) and value.is_floating_point() else None


def _per_channel(const: torch.Tensor, out_shape: tuple, channel_dim: int) -> torch.Tensor | None:
    """The length-C vector a constant broadcasts to along ``channel_dim``, if it is one."""
    ndim = len(out_shape)
    if const.dim() > ndim:
        return None
    shape = (1,) * (ndim - const.dim()) + tuple(const.shape)
    cdim = channel_dim % ndim
    for d, size in enumerate(shape):
        if d != cdim and size != 1:
            return None
    channels = out_shape[cdim]
    if shape[cdim] not in (1, channels):
        return None
    return const.detach().reshape(-1).expand(channels).double()


def _fold_one_affine(node: fx.Node) -> bool:
    view = op_of(node)
    if view.kind not in _AFFINE or view.arg("alpha", 1) != 1:
        return False
    a, b = view.arg("input"), view.arg("other")
    if has_prop(view, Prop.COMMUTATIVE) and _call_view(b) is not None and _call_view(a) is None:
        a, b = b, a  # const * conv -> conv * const
    producer = _call_view(a)
    if producer is None or not has_prop(producer, Prop.FOLD_INTO):
        return False
    if _why_not_foldable(producer, node) is not None or producer.out_shape is None:
        return False
    if node.meta.get("shape") != producer.out_shape:
        return False  # the constant broadcasts the output to a new shape
    if node.meta.get("dtype") != producer.node.meta.get("dtype"):
        return False
    const = _constant_value(b)
    if const is None:
        return False
    vec = _per_channel(const, producer.out_shape, _channel_dim(producer))
    if vec is None:
        return False
    src = _channel_source(b, const, producer.out_shape, _channel_dim(producer))
    if view.kind == "mul":
        _apply_channel_affine(producer, vec, None, src)
    elif view.kind == "div":
        if bool((vec == 0).any()):
            return False
        _apply_channel_affine(producer, 1.0 / vec, None, src)
    elif view.kind == "add":
        _apply_channel_affine(producer, None, vec, src)
    else:
        _apply_channel_affine(producer, None, -vec, src)
    node.replace_all_uses_with(producer.node)
    node.graph.erase_node(node)
    return True


def _channel_source(arg: object, const: torch.Tensor, out_shape: tuple,
                    channel_dim: int) -> list[dict]:
    """The folded constant as a plan source: its state_dict key and the dim of it that runs
    along the channels (none for a number or a constant broadcast over them)."""
    if not isinstance(arg, fx.Node):
        return []
    dim = channel_dim % len(out_shape) - (len(out_shape) - const.dim())
    if dim < 0 or const.shape[dim] == 1:
        return []
    return [{"param": attr_key(arg), "dim": dim}]


@register_pass("fold_bn", Semantics.EXACT)
def fold_bn(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Fold eval-mode batch norm and per-channel affine constants into conv/linear."""
    folded, affine, refused = 0, 0, {}
    for node in list(gm.graph.nodes):
        if kind_of(node) == "batch_norm":
            reason = _fold_one_bn(node)
            if reason:
                refused[node.name] = reason
            else:
                folded += 1
    changed = True
    while changed:
        changed = False
        for node in list(gm.graph.nodes):
            if kind_of(node) in _AFFINE:
                if _fold_one_affine(node):
                    affine += 1
                    changed = True
    if folded or affine:
        for node in list(gm.graph.nodes):
            if node.op == "get_attr" and not node.users:
                gm.graph.erase_node(node)
        drop_unused_attributes(gm)
    stats = {"folded_bn": folded, "folded_affine": affine}
    if refused:
        stats["refused"] = refused
    return PassResult(gm, modified=bool(folded or affine), stats=stats)
