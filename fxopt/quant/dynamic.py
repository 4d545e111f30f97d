"""Dynamic int8 quantization of linear layers, the way ONNX Runtime runs it.

Weights are quantized once, symmetrically to int8 (per output channel by default);
activations are quantized at run time, per tensor, to uint8 with ONNX's
``DynamicQuantizeLinear`` rule. Every quantized layer becomes one call to the custom op
``torch.ops.fxopt.dynamic_int8_linear``, whose eager kernel computes bit for bit what
ONNX Runtime computes for ``DynamicQuantizeLinear`` + ``MatMulInteger`` + scale + bias,
and which the ONNX exporter writes as exactly those nodes (ORT then fuses them into its
integer ``DynamicQuantizeMatMul`` / ``MatMulIntegerToFloat`` kernels).

Example::

    gm = fxopt.optimize(model, inputs, "default").module
    stats = apply_dynamic_int8(gm, skip=["head"])
    fxopt.lower(gm, "onnx", inputs, path="out/model.onnx")   # verified in ORT
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from collections.abc import Collection

import torch
import torch.fx as fx
from onnxscript import opset18 as op
from torch import nn

from fxopt.errors import QuantizationError
from fxopt.lowering.onnx_export import register_translation
from fxopt.ops import OpDef, OpView, fetch_attr, fresh_attr, op_of, register_op
from fxopt.quant.select import layer_name, matches

# Partial sums of (uint8 - zp) * int8 products are integers below 255 * 127 * K: float32
# holds them exactly while that stays under 2**24 (K <= 518), float64 for any realistic K.
# Off the CPU, or with a float32 matmul precision below "highest", float32 matmul may run
# in TF32 / bf16, so float64 it is.
_EXACT_F32 = 2**24
_FLOAT = 1  # onnx.TensorProto.FLOAT
# apply_dynamic_int8(fuse=None) joins layers only up to this many output values per call
FUSE_MAX_ELEMENTS = 2**16


# --------------------------------------------------------------------------- kernels


def dynamic_quantize_linear(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ONNX ``DynamicQuantizeLinear`` as ONNX Runtime computes it: ``(x_q, scale, zero_point)``.

    The range is widened to include 0, ``scale = (max - min) / 255`` (1 when the range is
    empty), ``zero_point = round(clamp(-min / scale, 0, 255))`` and ``x_q = clamp(round(x /
    scale) + zero_point, 0, 255)``, all in float32 with rounding half to even.

    >>> q, s, zp = dynamic_quantize_linear(torch.tensor([-1.0, 0.0, 2.0]))
    >>> q.tolist(), zp.item()
    ([0, 85, 255], 85)
    """
    x = x.float()
    if x.numel() == 0:
        lo = hi = torch.zeros((), dtype=torch.float32, device=x.device)
    else:
        lo, hi = torch.clamp(x.min(), max=0.0), torch.clamp(x.max(), min=0.0)
    scale = torch.where(hi == lo, torch.ones_like(hi), (hi - lo) / torch.full_like(hi, 255.0))
    zero_point = torch.round(torch.clamp(-(lo / scale), 0.0, 255.0))
    q = torch.clamp(torch.round(x / scale) + zero_point, 0.0, 255.0)
    return q.to(torch.uint8), scale, zero_point.to(torch.uint8)


def quantize_weight(
    weight: torch.Tensor, per_channel: bool = True, reduce_range: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weights in [-127, 127] ([-64, 64] with ``reduce_range``), zero point 0,
    and float32 scales, one per output channel (``[out]``) or one for the tensor (``[1]``).

    >>> q, s = quantize_weight(torch.tensor([[0.5, -1.0], [2.0, 0.0]]))
    >>> q.tolist(), s.tolist()
    ([[64, -127], [127, 0]], [0.007874015718698502, 0.015748031437397003])
    """
    qmax = 64 if reduce_range else 127
    w = weight.detach().float()
    amax = w.abs().amax(dim=1) if per_channel else w.abs().amax().reshape(1)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    q = torch.clamp(torch.round(w / scale[:, None]), -qmax, qmax).to(torch.int8)
    return q, scale


@torch.library.custom_op("fxopt::dynamic_int8_linear", mutates_args=())
def dynamic_int8_linear(
    x: torch.Tensor, w_int8: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequant(w) + bias`` with ``x`` quantized on the fly, as ONNX Runtime does it.

    ``x`` is float ``[..., in]``; ``w_int8`` is the int8 weight *transposed*, ``[in, out]``
    (MatMulInteger's B); ``w_scale`` float32 ``[out]`` or ``[1]``; ``bias`` ``[out]`` or None.
    Returns float32 ``[..., out]``.

    >>> q, s = quantize_weight(torch.randn(8, 4))
    >>> torch.ops.fxopt.dynamic_int8_linear(torch.randn(2, 4), q.t(), s, None).shape
    torch.Size([2, 8])
    """
    xq, xs, xzp = dynamic_quantize_linear(x)
    k = w_int8.shape[0]
    exact_f32 = x.device.type == "cpu" and torch.get_float32_matmul_precision() == "highest"
    dtype = torch.float32 if exact_f32 and 255 * 127 * k < _EXACT_F32 else torch.float64
    a = xq.reshape(-1, k).to(dtype) - xzp.to(dtype)
    acc = (a @ w_int8.to(dtype)).to(torch.float32)  # == Cast(MatMulInteger(...), float)
    y = acc * (xs * w_scale.float())
    if bias is not None:
        y = y + bias.float()
    return y.reshape(*x.shape[:-1], w_int8.shape[1])


@dynamic_int8_linear.register_fake
def _(x, w_int8, w_scale, bias=None):
    return x.new_empty((*x.shape[:-1], w_int8.shape[1]), dtype=torch.float32)


def _onnx_dynamic_int8_linear(x, w_int8, w_scale, bias=None):
    xq, xs, xzp = op.DynamicQuantizeLinear(x)
    acc = op.MatMulInteger(xq, w_int8, xzp)
    y = op.Mul(op.Cast(acc, to=_FLOAT), op.Mul(xs, w_scale))
    return y if bias is None else op.Add(y, bias)


def _macs(view: OpView) -> int:
    out = view.out_shape
    k = fetch_attr(view.node.graph.owning_module, view.node.args[1].target).shape[0]
    return math.prod(out) * k if out is not None else 0


OP = torch.ops.fxopt.dynamic_int8_linear.default
register_translation(OP, _onnx_dynamic_int8_linear)
register_op(
    OpDef(
        "dynamic_int8_linear",
        "linear",
        functions=(OP,),
        signature=("input", "w_int8", "w_scale", "bias"),
        macs=_macs,
    )
)


# --------------------------------------------------------------------------- rewrite


def apply_dynamic_int8(
    gm: fx.GraphModule,
    *,
    skip: Collection[str] = (),
    per_channel: bool = True,
    only: Collection[str] | None = None,
    reduce_range: bool = False,
    fuse: bool | None = None,
) -> dict:
    """Quantize, in place, every linear layer of ``gm`` with a constant weight (and every
    ``x @ W`` with a constant 2-D ``W``) to dynamic int8; returns what it did.

    ``skip`` / ``only`` are layer names, node names or globs (see ``fxopt.quant.select``).
    Int8 weights (stored transposed, ``[in, out]``) and scales become buffers on ``gm``;
    float weights nothing else reads are removed. Raises ``QuantizationError`` when ``gm``
    is already quantized or no layer is left to quantize.

    ``reduce_range`` keeps weights in [-64, 64], like ORT's ``quantize_dynamic(...,
    reduce_range=True)``: on x86 CPUs without VNNI, ORT's uint8 x int8 kernel adds products
    in pairs in 16 bits, which can saturate with full-range weights; 7-bit weights cannot.

    ``fuse`` joins layers that read the same input (q / k / v after one norm, an MLP's
    gate and up projections) into one int8 matmul and a split: their per-channel weights
    and scales side by side, one int8 kernel instead of one per layer, and outputs bit for
    bit those of the separate layers (listed in ``fused``). ``None`` (the default) fuses
    where the joined output at the captured shapes has at most ``FUSE_MAX_ELEMENTS``
    values: there fewer kernel calls pay (zoo gqa, 4 K values: ONNX Runtime 7-10% faster),
    while on big layers the split's copy costs more than they save (all-MiniLM-L6-v2's
    q/k/v, 590 K values: 4% slower); ``True`` / ``False``: always / never.

    Stats: ``quantized`` (layer names), ``skipped`` (``{"layer", "reason"}``), ``fused``
    (lists of layer names that share one int8 matmul),
    ``weight_bytes_before`` (float weights of the quantized layers) and
    ``weight_bytes_after`` (int8 weights + scales + float weights still held elsewhere).

    Example::

        stats = apply_dynamic_int8(gm, skip=["blocks.0.*"])
        stats["quantized"]        # ['blocks.1.mlp.0', 'blocks.1.mlp.3', 'head']
    """
    done = [n for n in gm.graph.nodes if n.op == "call_function" and n.target is OP]
    if done:
        raise QuantizationError(
            f"the graph is already quantized ({len(done)} dynamic int8 layers, e.g. "
            f"{layer_name(done[0])}); apply dynamic int8 quantization to the float graph once"
        )
    quantized: list[str] = []
    skipped: list[dict] = []
    before = after = 0
    replaced: list[torch.Tensor] = []
    shared: dict[tuple, str] = {}  # one int8 copy of a weight that several layers read
    chosen: dict[fx.Node, list[tuple]] = {}  # input -> (layer, weight, bias), graph order
    for node in list(gm.graph.nodes):
        found = _candidate(node)
        if found is None:
            continue
        x, weight, bias, reason = found
        name = layer_name(node)
        if reason is None and matches(node, skip):
            reason = "matched skip"
        if reason is None and only is not None and not matches(node, only):
            reason = "not matched by only"
        if reason is not None:
            skipped.append({"layer": name, "reason": reason})
            continue
        chosen.setdefault(x, []).append((node, weight, bias))
        quantized.append(name)
    fused: list[list[str]] = []
    uses = Counter(_weight_key(w) for members in chosen.values() for _, w, _ in members)
    for x, members in chosen.items():
        # a weight tied to another layer keeps its one shared int8 copy instead
        if (fuse is not False and len(members) > 1 and _fusable(members)
                and all(uses[_weight_key(w)] == 1 for _, w, _ in members)
                and (fuse or _small(members))):
            q, scale, bias = _joined(members, per_channel, reduce_range)
            before += sum(w.numel() * w.element_size() for _, w, _ in members)
            after += q.numel() + scale.numel() * 4
            replaced.extend(w for _, w, _ in members)
            base = _store(gm, f"{members[0][0].name}_fused_int8", q.t().contiguous(), scale)
            _rewrite_fused(gm, [m[0] for m in members], x, base, bias,
                           [w.shape[0] for _, w, _ in members])
            fused.append([layer_name(m[0]) for m in members])
            continue
        for node, weight, bias in members:
            key = _weight_key(weight)
            if key not in shared:
                q, scale = quantize_weight(weight, per_channel, reduce_range)
                shared[key] = _store(gm, f"{node.name}_int8", q.t().contiguous(), scale)
                before += weight.numel() * weight.element_size()
                after += q.numel() + scale.numel() * 4
                replaced.append(weight)
            _rewrite(gm, node, x, shared[key], bias)
    if not quantized:
        why = "; ".join(f"{s['layer']}: {s['reason']}" for s in skipped) or "no linear layers"
        raise QuantizationError(
            f"nothing to quantize: dynamic int8 covers linear layers (and x @ W with a constant "
            f"W), and none is left ({why}); check skip/only or quantize another model"
        )
    gm.graph.lint()
    gm.recompile()
    after += _still_held(gm, replaced)
    return {
        "quantized": quantized,
        "skipped": skipped,
        "fused": fused,
        "weight_bytes_before": before,
        "weight_bytes_after": after,
    }


def candidate_layers(gm: fx.GraphModule, *, skip: Collection[str] = (),
                     per_channel: bool = True, reduce_range: bool = False) -> dict:
    """Every layer ``apply_dynamic_int8(gm, skip=skip)`` would quantize, with what its
    kernel needs: ``{node: (x, weight, int8 weight [in, out], scale, bias)}``.

    >>> list(candidate_layers(gm))  # doctest: +SKIP
    [blocks_0_mlp_0, blocks_0_mlp_3, head]
    """
    out = {}
    for node in gm.graph.nodes:
        found = _candidate(node)
        if found is None or found[3] is not None or matches(node, skip):
            continue
        x, weight, bias, _ = found
        q, scale = quantize_weight(weight, per_channel, reduce_range)
        out[node] = (x, weight, q.t().contiguous(), scale, bias)
    return out


def _candidate(node: fx.Node):
    """``(x, weight [out, in], bias, reason)`` for a layer this pass handles, else None.
    ``reason`` is None when the layer can be quantized."""
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    view = op_of(node)
    if view.kind == "attention" and isinstance(view.module, nn.MultiheadAttention):
        return (
            None,
            None,
            None,
            "nn.MultiheadAttention computes its projections inside "
            "one module; capture with mode='export' to quantize them",
        )
    if view.kind == "linear":
        x, weight = view.input, view.params.get("weight")
        if view.module is not None:
            bias = view.module.bias
        else:
            bias = view.arg("bias")
    elif view.kind == "matmul":
        x, other = view.input, view.arg("other")
        if not (isinstance(other, fx.Node) and other.op == "get_attr"):
            return None  # activation @ activation (attention scores): not a layer
        weight = fetch_attr(node.graph.owning_module, str(other.target))
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
            return None
        weight, bias = weight.t(), None
    else:
        return None
    reason = None
    if weight is None:
        reason = "the weight is computed in the graph, not a constant"
    elif not weight.is_floating_point():
        reason = f"the weight is {weight.dtype}, not floating point"
    elif not isinstance(x, fx.Node) or x.op == "get_attr":
        reason = "the input is a constant"
    elif x.meta.get("dtype", torch.float32) != torch.float32:
        reason = f"the input is {x.meta['dtype']}; dynamic int8 takes float32 activations"
    return x, weight, bias, reason


def _small(members: list[tuple]) -> bool:
    """The joined output at the captured shapes has at most ``FUSE_MAX_ELEMENTS`` values."""
    shape = members[0][0].meta.get("shape")
    if not isinstance(shape, (tuple, list, torch.Size)) or not all(
            isinstance(d, int) for d in shape):
        return False
    return math.prod(shape[:-1]) * sum(w.shape[0] for _, w, _ in members) <= FUSE_MAX_ELEMENTS


def _weight_key(weight: torch.Tensor) -> tuple:
    return (weight.untyped_storage().data_ptr(), weight.storage_offset(), *weight.stride())


def _fusable(members: list[tuple]) -> bool:
    """Layers that can share one int8 matmul: no bias computed in the graph, and no module
    called from elsewhere (its other calls would lose their weight)."""
    for node, _, bias in members:
        if isinstance(bias, fx.Node) and bias.op != "get_attr":
            return False
        if node.op == "call_module":
            calls = [n for n in node.graph.nodes
                     if n.op == "call_module" and n.target == node.target]
            if len(calls) > 1:
                return False
    return True


def _joined(members: list[tuple], per_channel: bool, reduce_range: bool):
    """Int8 weights ``[sum out, in]``, per-output-channel scales and the bias (zeros where
    a layer has none, None where none has one) of ``members`` side by side."""
    qs, scales, biases = [], [], []
    for node, weight, bias in members:
        if isinstance(bias, fx.Node):  # a get_attr (checked by _fusable)
            bias = fetch_attr(node.graph.owning_module, str(bias.target))
        q, scale = quantize_weight(weight, per_channel, reduce_range)
        qs.append(q)
        scales.append(scale.expand(weight.shape[0]))  # a per-tensor scale, per channel
        biases.append(None if bias is None else bias.detach().float())
    bias = None
    if any(b is not None for b in biases):
        bias = torch.cat([torch.zeros(q.shape[0]) if b is None else b
                          for q, b in zip(qs, biases)])
    return torch.cat(qs), torch.cat(scales).contiguous(), bias


def _rewrite_fused(gm: fx.GraphModule, nodes: list[fx.Node], x: fx.Node, base: str,
                   bias: torch.Tensor | None, sizes: list[int]) -> None:
    """One dynamic int8 op for ``nodes`` (all reading ``x``), then a split into their
    outputs."""
    graph = gm.graph
    paths = [n.meta.get("fxopt_module_path") or layer_name(n) for n in nodes]
    with graph.inserting_before(nodes[0]):
        w_node, s_node = graph.get_attr(f"{base}_weight"), graph.get_attr(f"{base}_scale")
        b_node = None
        if bias is not None:
            b_name = fresh_attr(gm, f"{base}_bias", "")
            gm.register_buffer(b_name, bias)
            b_node = graph.get_attr(b_name)
        new = graph.create_node("call_function", OP, (x, w_node, s_node, b_node),
                                name=f"{nodes[0].name}_fused_int8")
        parts = graph.create_node("call_function", torch.ops.aten.split_with_sizes.default,
                                  (new, sizes, -1), name=f"{nodes[0].name}_fused_split")
    shape = nodes[0].meta.get("shape")
    new.meta.update(nodes[0].meta)
    new.meta["fxopt_module_path"] = _common_path(paths)
    if isinstance(shape, (tuple, torch.Size)):
        new.meta["shape"] = (*tuple(shape)[:-1], sum(sizes))
    parts.meta["fxopt_module_path"] = new.meta["fxopt_module_path"]
    for extra in (w_node, s_node, b_node):
        if extra is not None:
            extra.meta["fxopt_module_path"] = new.meta["fxopt_module_path"]
    for i, node in enumerate(nodes):
        with graph.inserting_after(parts):
            piece = graph.call_function(operator.getitem, (parts, i))
        piece.meta.update(node.meta)
        view = op_of(node)
        old_weight = view.param_node("weight") if view.kind == "linear" else view.arg("other")
        old_bias = view.param_node("bias") if view.kind == "linear" else None
        node.replace_all_uses_with(piece)
        graph.erase_node(node)
        if node.op == "call_module":
            _drop_if_unused(gm, str(node.target), module=True)
        for old in (old_weight, old_bias):
            if isinstance(old, fx.Node) and old.op == "get_attr" and not old.users:
                graph.erase_node(old)
                _drop_if_unused(gm, str(old.target), module=False)


def _common_path(paths: list[str]) -> str:
    """``blocks.0.attn`` for ``blocks.0.attn.q_proj`` / ``.k_proj`` / ``.v_proj``."""
    parts = [p.split(".") for p in paths]
    common = []
    for level in zip(*parts):
        if len(set(level)) > 1:
            break
        common.append(level[0])
    return ".".join(common) or "+".join(paths)


def _store(gm: fx.GraphModule, base: str, w_t: torch.Tensor, scale: torch.Tensor) -> str:
    """Register ``{base}_weight`` / ``{base}_scale`` buffers under a fresh ``base``."""
    base = fresh_attr(gm, base, "_weight", "_scale")
    gm.register_buffer(f"{base}_weight", w_t)
    gm.register_buffer(f"{base}_scale", scale)
    return base


def _rewrite(gm: fx.GraphModule, node: fx.Node, x: fx.Node, base: str, bias) -> None:
    graph = gm.graph
    view = op_of(node)
    with graph.inserting_before(node):
        w_node, s_node = graph.get_attr(f"{base}_weight"), graph.get_attr(f"{base}_scale")
        if isinstance(bias, torch.Tensor):  # a module's bias, or a tensor literal
            b_name = fresh_attr(gm, f"{node.name}_int8_bias", "")
            gm.register_buffer(b_name, bias.detach().float().clone())
            bias = graph.get_attr(b_name)
        new = graph.create_node(
            "call_function", OP, (x, w_node, s_node, bias), name=f"{node.name}_int8"
        )
    new.meta.update(node.meta)
    new.meta["fxopt_module_path"] = node.meta.get("fxopt_module_path") or layer_name(node)
    for extra in (w_node, s_node, bias):
        if isinstance(extra, fx.Node) and extra.op == "get_attr":
            extra.meta["fxopt_module_path"] = new.meta["fxopt_module_path"]
    old_weight = view.param_node("weight") if view.kind == "linear" else view.arg("other")
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    if node.op == "call_module":
        _drop_if_unused(gm, str(node.target), module=True)
    elif isinstance(old_weight, fx.Node) and old_weight.op == "get_attr" and not old_weight.users:
        graph.erase_node(old_weight)
        _drop_if_unused(gm, str(old_weight.target), module=False)


def _drop_if_unused(gm: fx.GraphModule, path: str, *, module: bool) -> None:
    """Delete submodule / attribute ``path`` when no node reads it any more."""
    for n in gm.graph.nodes:
        target = str(n.target)
        if n.op == "get_attr" and (target == path or target.startswith(f"{path}.")):
            return
        if n.op == "call_module" and (target == path or path.startswith(f"{target}.")):
            return
    if module:
        gm.delete_submodule(path)
        return
    *parents, leaf = path.split(".")
    owner = fetch_attr(gm, ".".join(parents))
    if isinstance(owner, nn.Module) and hasattr(owner, leaf):
        delattr(owner, leaf)


def _still_held(gm: fx.GraphModule, weights: list[torch.Tensor]) -> int:
    """Bytes of replaced float weights that ``gm`` still holds (tied to another layer)."""
    held = {t.untyped_storage().data_ptr() for t in gm.state_dict(keep_vars=True).values()}
    held |= {
        v.untyped_storage().data_ptr() for v in vars(gm).values() if isinstance(v, torch.Tensor)
    }
    seen, total = set(), 0
    for w in weights:
        ptr = w.untyped_storage().data_ptr()
        if ptr in held and ptr not in seen:
            seen.add(ptr)
            total += w.untyped_storage().nbytes()
    return total
