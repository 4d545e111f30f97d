"""Static int8: Q/DQ (FakeQuantize) placement per target, calibration, freezing.

``prepare(gm, target)`` inserts observing FakeQuantize nodes where the target runs int8:

* ``ort`` — ONNX Runtime's QDQ format: the activation inputs and weights of
  conv/linear/matmul, and the inputs and outputs of the ops ORT runs in int8 (add, cat,
  pooling); an op's output is quantized after a following ReLU/ReLU6/clamp (ORT fuses
  them). Activations uint8 asymmetric per tensor, weights int8 symmetric per channel.
* ``tensorrt`` — TensorRT explicit quantization: Q/DQ on the activation inputs and weights
  of conv/linear/matmul only (TensorRT fuses outputs itself), and on the residual input of
  an add whose other input comes from a quantized conv, per NVIDIA's placement guidance.
  Everything int8 symmetric (zero point 0), weights per channel on axis 0.

Weights get their scales at once; activations after ``calibrate(gm, batches)`` and
``freeze(gm)``.

Example::

    prepare(gm, "ort", observer="percentile")
    calibrate(gm, batches)
    freeze(gm)
"""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxopt.errors import QuantizationError
from fxopt.op_props import Category, Prop
from fxopt.ops import fresh_attr, has_prop, op_of
from fxopt.progress import Mode, bar
from fxopt.quant import qdq  # noqa: F401  (registers fxopt::dequantize_int32)
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.quant.select import layer_name, matches

_FUNCTIONAL = {nn.Conv1d: F.conv1d, nn.Conv2d: F.conv2d, nn.Conv3d: F.conv3d, nn.Linear: F.linear}


@dataclass(frozen=True)
class Target:
    """Where a backend wants Q/DQ nodes and in which integer format."""

    name: str
    compute: frozenset[str]  # ops whose activation inputs (and weights) are quantized
    shared: frozenset[str]  # ops run in int8 whose inputs and outputs are quantized
    fused_after: frozenset[str]  # activations folded into the op before its output Q
    activation_signed: bool
    activation_symmetric: bool
    quantize_outputs: bool
    residual_inputs: bool


TARGETS = {
    "ort": Target("ort", frozenset({"conv", "linear", "matmul"}),
                  frozenset({"add", "cat", "avg_pool", "adaptive_avg_pool", "max_pool",
                             "adaptive_max_pool"}),
                  frozenset({"relu", "relu6", "hardtanh", "clamp"}),
                  activation_signed=False, activation_symmetric=False,
                  quantize_outputs=True, residual_inputs=False),
    "tensorrt": Target("tensorrt", frozenset({"conv", "linear", "matmul"}), frozenset(),
                       frozenset(), activation_signed=True, activation_symmetric=True,
                       quantize_outputs=False, residual_inputs=True),
}


def fake_quant_modules(gm: nn.Module) -> dict[str, FakeQuantize]:
    """Every FakeQuantize submodule of ``gm`` by path."""
    return {p: m for p, m in gm.named_modules() if isinstance(m, FakeQuantize)}


def compute_layers(gm: fx.GraphModule, target: str = "ort",
                   skip: Collection[str] = ()) -> list[fx.Node]:
    """The conv / linear / matmul nodes ``prepare`` quantizes for ``target`` (weights and
    activation inputs), outside ``skip``."""
    if target not in TARGETS:
        raise QuantizationError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    compute = TARGETS[target].compute
    return [n for n in gm.graph.nodes
            if n.op in ("call_module", "call_function", "call_method")
            and op_of(n).kind in compute and _is_float(n) and not matches(n, skip)]


def prepare(gm: fx.GraphModule, target: str = "ort", *, observer: str = "minmax",
            weight_observer: str = "minmax", per_channel: bool = True,
            skip: Collection[str] = ()) -> dict[str, Any]:
    """Insert observing FakeQuantize nodes for ``target``; weights are quantized at once.

    Returns ``{"layers": [...], "skipped": [...], "activations": n, "weights": n}``.

    >>> prepare(gm, "tensorrt", observer="entropy", skip=["fc"])  # doctest: +SKIP
    """
    if target not in TARGETS:
        raise QuantizationError(f"unknown target {target!r}; use one of {', '.join(TARGETS)}")
    spec = TARGETS[target]
    _functional_adds(gm)
    chosen, skipped = [], []
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function", "call_method"):
            continue
        kind = op_of(node).kind
        if kind not in spec.compute | spec.shared or not _is_float(node):
            continue
        if matches(node, skip):
            skipped.append(layer_name(node))
        else:
            chosen.append(node)
    if not chosen:
        raise QuantizationError(
            "nothing to quantize: no floating-point conv/linear/matmul"
            + (f" outside skip={sorted(skip)}" if skip else "")
            + " in this graph (an integer-only model, or everything skipped)")
    weights = 0
    chosen_set = set(chosen)
    values: dict[fx.Node, set[fx.Node] | None] = {}  # value -> consumers to rewire (None: all)
    for i, node in enumerate(chosen):
        if has_prop(node, Prop.WEIGHT_QUANT):
            node = chosen[i] = _functional(gm, node)
            weights += _quantize_weight(gm, node, weight_observer, per_channel)
        for a in _activation_inputs(node):
            if values.get(a, set()) is not None:
                values.setdefault(a, set()).add(node)
        if spec.quantize_outputs:
            out = _after_fused_activation(node, spec)
            if not all(u.op == "output" for u in out.users) and (
                    op_of(node).kind in spec.compute or _feeds_int8(out, chosen_set, spec)):
                values[out] = None
    if spec.residual_inputs:
        _residual_inputs(gm, chosen, values)
    for value, users in values.items():
        _insert_activation_fq(gm, value, users, spec, observer)
    gm.graph.lint()
    gm.recompile()
    return {"layers": [layer_name(n) for n in chosen if op_of(n).kind in spec.compute],
            "skipped": skipped, "activations": len(values), "weights": weights}


def calibrate(gm: fx.GraphModule, batches: Iterable, *, progress: Mode = None,
              max_batches: int | None = None) -> int:
    """Run ``batches`` (tensors, tuples, or ``(inputs..., labels)`` from a DataLoader)
    through ``gm`` so its observers see real data; returns the number of batches used.
    Only observes: ``freeze(gm)`` then fixes the scales (lowering refuses a graph that is
    still observing). ``progress``: see ``fxopt.progress``.

    >>> calibrate(gm, loader, max_batches=32)  # doctest: +SKIP
    32
    >>> freeze(gm)  # doctest: +SKIP
    """
    if batches is None:
        raise QuantizationError(
            "static quantization needs calibration data: pass calibration=batches to "
            "fxopt.optimize (any iterable of input batches; a DataLoader works)")
    n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
    observing = [m for m in fake_quant_modules(gm).values() if m.mode == "observe"]
    if not observing:
        raise QuantizationError("nothing to calibrate: no observing fake-quant node "
                                "(run fxopt.quant.static.prepare first)")
    count = 0
    with torch.no_grad(), bar(desc="calibrating", total=_length(batches, max_batches),
                              unit="batch", progress=progress) as shown:
        for batch in batches:
            if max_batches is not None and count >= max_batches:
                break
            inputs = batch if isinstance(batch, (tuple, list)) else (batch,)
            gm(*tuple(inputs)[:n_inputs])
            count += 1
            shown.update(1)
    if count == 0:
        raise QuantizationError("the calibration data was empty: pass at least one batch")
    return count


def freeze(gm: fx.GraphModule) -> int:
    """Turn every observing/QAT FakeQuantize into a fixed quantize-dequantize; returns how
    many were frozen. Raises QuantizationError naming any observer that saw no data.
    ``fxopt.freeze_calibration(gm)`` is the same step.

    >>> calibrate(gm, batches); freeze(gm)  # doctest: +SKIP
    12
    """
    frozen = 0
    for path, fq in fake_quant_modules(gm).items():
        if fq.mode != "quantize" or fq.observer is not None:
            fq.freeze(where=path)
            frozen += 1
    return frozen


def quantize_biases(gm: fx.GraphModule) -> int:
    """Store the bias of every conv/linear whose input and weight are quantized as int32
    with scale = input scale x weight scale (ONNX Runtime's QDQ convention: it turns
    ``DQ -> Gemm`` into ``QGemm``); returns how many. Call after ``freeze``.

    >>> quantize_biases(gm)  # doctest: +SKIP
    10
    """
    done = 0
    for node in list(gm.graph.nodes):
        if not has_prop(node, Prop.WEIGHT_QUANT):
            continue
        view = op_of(node)
        x, w, b = view.input, view.param_node("weight"), view.param_node("bias")
        fq_x, fq_w = _fq_module(gm, x), _fq_module(gm, w)
        if fq_x is None or fq_w is None or b is None or b.op != "get_attr":
            continue
        if fq_x.axis is not None or fq_w.axis not in (None, 0):
            continue
        bias = view.params.get("bias")
        if bias is None or bias.dim() != 1:
            continue
        scale = (fq_x.scale.reshape(()) * fq_w.scale).float().expand(bias.shape[0]).clone()
        q = torch.round(bias.detach().float() / scale).clamp(-(2**31), 2**31 - 1)
        name = fresh_attr(gm, f"{node.name}_bias")
        gm.register_buffer(f"{name}_int32", q.to(torch.int32))
        gm.register_buffer(f"{name}_scale", scale)
        with gm.graph.inserting_before(node):
            qn = gm.graph.get_attr(f"{name}_int32")
            sn = gm.graph.get_attr(f"{name}_scale")
            dq = gm.graph.call_function(torch.ops.fxopt.dequantize_int32.default, (qn, sn))
        dq.meta.update({k: v for k, v in b.meta.items() if k in ("shape", "dtype")})
        node.replace_input_with(b, dq)
        if not b.users:
            gm.graph.erase_node(b)
        done += 1
    gm.graph.lint()
    gm.recompile()
    return done


def share_pooling_qparams(gm: fx.GraphModule) -> int:
    """Give the quantized output of a max pool its input's scale and zero point: ONNX
    Runtime only runs a uint8 MaxPool when both sides match (values are a subset of the
    input's, so the input's range is exact); returns how many."""
    shared = 0
    for node in gm.graph.nodes:
        if node.op == "output" or op_of(node).kind not in ("max_pool", "adaptive_max_pool"):
            continue
        fq_in = _fq_module(gm, op_of(node).input)
        outs = [u for u in node.users if _fq_module(gm, u) is not None]
        if fq_in is None or fq_in.axis is not None:
            continue
        for u in outs:
            fq_out = _fq_module(gm, u)
            fq_out.scale.copy_(fq_in.scale.reshape(fq_out.scale.shape))
            fq_out.zero_point.copy_(fq_in.zero_point.reshape(fq_out.zero_point.shape))
            shared += 1
    return shared


def _fq_module(gm: fx.GraphModule, node: Any) -> FakeQuantize | None:
    if isinstance(node, fx.Node) and node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if isinstance(mod, FakeQuantize) and mod.mode == "quantize":
            return mod
    return None


# --------------------------------------------------------------------------- placement


def _is_float(node: fx.Node) -> bool:
    dtype = node.meta.get("dtype")
    return not isinstance(dtype, torch.dtype) or dtype.is_floating_point


def _activation_inputs(node: fx.Node) -> list[fx.Node]:
    view = op_of(node)
    if has_prop(view, Prop.WEIGHT_QUANT):
        x = view.input
        return [x] if isinstance(x, fx.Node) and _is_float(x) else []
    params = {view.param_node(p) for p in ("weight", "bias")}
    return [a for a in node.all_input_nodes
            if a not in params and a.op != "get_attr" and _is_float(a)]


def _after_fused_activation(node: fx.Node, spec: Target) -> fx.Node:
    users = list(node.users)
    if len(users) == 1 and op_of(users[0]).kind in spec.fused_after:
        return users[0]
    return node


def _feeds_int8(value: fx.Node, chosen: set[fx.Node], spec: Target) -> bool:
    """Whether some reader of a shared op's output (an add, a pool) runs in int8, looking
    through shape-only ops (a pooled map's ``flatten``). A Q/DQ on a value only float ops
    read buys no int8 kernel and costs accuracy: the global-pool output of a ResNet-50 is
    its single most damaging tensor (a 2048-vector of channel means with a ~100x spread
    under one per-tensor scale), and skipping ``fc`` must remove that error too."""
    seen, todo = set(), list(value.users)
    while todo:
        user = todo.pop()
        if user in seen or user.op == "output":
            continue
        seen.add(user)
        if user in chosen and (op_of(user).kind in spec.compute | spec.shared):
            return True
        if op_of(user).category == Category.SHAPE:
            todo.extend(user.users)
    return False


def _residual_inputs(gm: fx.GraphModule, chosen: list[fx.Node],
                     values: dict[fx.Node, set[fx.Node] | None]) -> None:
    quantized = {n for n in chosen if op_of(n).kind == "conv"}
    for add in gm.graph.nodes:
        if add.op == "output" or op_of(add).kind != "add" or len(add.all_input_nodes) != 2:
            continue
        a, b = add.all_input_nodes
        for mine, other in ((a, b), (b, a)):
            if other in quantized and mine not in quantized and _is_float(mine):
                if values.get(mine, set()) is not None:
                    values.setdefault(mine, set()).add(add)


def _insert_activation_fq(gm: fx.GraphModule, value: fx.Node, users: set[fx.Node] | None,
                          spec: Target, observer: str) -> None:
    fq = FakeQuantize(bits=8, signed=spec.activation_signed,
                      symmetric=spec.activation_symmetric, observer_kind=observer, mode="observe")
    name = fresh_attr(gm, f"{value.name}_fq")
    gm.add_submodule(name, fq)
    with gm.graph.inserting_after(value):
        fq_node = gm.graph.call_module(name, (value,))
    fq_node.meta.update({k: v for k, v in value.meta.items()
                         if k in ("shape", "dtype", "device", "fxopt_module_path")})
    for user in list(value.users):
        if user is not fq_node and (users is None or user in users):
            user.replace_input_with(value, fq_node)


_INPLACE_TO_FUNCTIONAL = {
    torch.ops.aten.add_.Tensor: torch.ops.aten.add.Tensor,
    torch.ops.aten.mul_.Tensor: torch.ops.aten.mul.Tensor,
}


def _functional_adds(gm: fx.GraphModule) -> None:
    """``aten.add_(a, b)`` (a residual ``h += x`` in an export capture) as ``aten.add``, with
    later readers of ``a`` reading the result, so Q/DQ can sit on its inputs. Left alone
    when ``a`` is a graph input or a weight, whose mutation is visible outside."""
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    for node in list(gm.graph.nodes):
        functional = _INPLACE_TO_FUNCTIONAL.get(node.target) if node.op == "call_function" else None
        a = node.args[0] if node.args else None
        if functional is None or not isinstance(a, fx.Node) or a.op in ("placeholder", "get_attr"):
            continue
        for user in list(a.users):
            if user is not node and order[user] > order[node]:
                user.replace_input_with(a, node)
        node.target = functional
    gm.graph.lint()
    gm.recompile()


def _functional(gm: fx.GraphModule, node: fx.Node) -> fx.Node:
    """A conv/linear module call as F.conv*/F.linear on get_attr weights, so a weight
    fake-quant node can sit between the weight and the op (and export as Q/DQ)."""
    if node.op != "call_module":
        return node
    mod = gm.get_submodule(node.target)
    fn = _FUNCTIONAL.get(type(mod))
    if fn is None or getattr(mod, "padding_mode", "zeros") != "zeros":
        return node
    graph = gm.graph
    with graph.inserting_before(node):
        w = graph.get_attr(f"{node.target}.weight")
        b = graph.get_attr(f"{node.target}.bias") if mod.bias is not None else None
        args: tuple = (node.args[0], w, b)
        if fn is not F.linear:
            args += (mod.stride, mod.padding, mod.dilation, mod.groups)
        new = graph.call_function(fn, args)
    new.meta.update(node.meta)
    new.meta.setdefault("fxopt_module_path", str(node.target))
    node.replace_all_uses_with(new)
    graph.erase_node(node)
    return new


def _quantize_weight(gm: fx.GraphModule, node: fx.Node, observer: str, per_channel: bool) -> int:
    view = op_of(node)
    w_node = view.param_node("weight")
    weight = view.params.get("weight")
    if w_node is None or weight is None or w_node.op != "get_attr":
        return 0  # a computed weight: leave it in float
    # output channels are axis 0 of the stored weight, or axis 1 where the graph holds it
    # transposed (addmm's [in, out]): the fake-quant sits on the stored tensor
    stored, out_axis = (weight.t(), 1) if "weight" in view.entry.transposed else (weight, 0)
    axis = out_axis if per_channel else None
    fq = FakeQuantize(bits=8, signed=True, symmetric=True, axis=axis,
                      channels=weight.shape[0] if per_channel else 1,
                      observer_kind=observer, mode="observe")
    fq(stored.detach())
    fq.freeze(where=f"the weight of {layer_name(node)}")
    name = fresh_attr(gm, f"{node.name}_weight_fq")
    gm.add_submodule(name, fq)
    with gm.graph.inserting_before(node):
        fq_node = gm.graph.call_module(name, (w_node,))
    fq_node.meta.update({k: v for k, v in w_node.meta.items() if k in ("shape", "dtype")})
    node.replace_input_with(w_node, fq_node)
    return 1


def _length(batches: Iterable, limit: int | None) -> int | None:
    try:
        n = len(batches)  # type: ignore[arg-type]
    except TypeError:
        return limit
    return min(n, limit) if limit is not None else n

