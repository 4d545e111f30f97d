"""SmoothQuant-style scale migration for dynamic int8, folded exactly into the producer.

Dynamic int8 quantizes a linear layer's input per tensor at run time, so one channel with
a wide range coarsens the grid for all of them. Dividing input channel ``j`` by ``s_j``
and multiplying the layer's weight column ``j`` by ``s_j`` leaves the float function
unchanged and moves range from the activations to the (per-channel quantized) weights:
``s_j = max|X_j|**alpha / max|W_j|**(1 - alpha)`` (Xiao et al., SmoothQuant, 2023).

The division costs nothing at run time when it is folded into the op that produces the
input: a LayerNorm's weight and bias, an RMSNorm's weight, or an elementwise multiply by
a constant channel vector (how RMSNorm is written out in plain torch), and only where
every reader of that output is a linear layer that takes the same scales (q/k/v after one
norm, an MLP's up projections), seen through layout ops that keep the channel axis last
(transpose, permute, reshape to ``[..., C]``). The exported graph has the same ops.

``alpha="auto"`` measures, per producer, the consumers' dynamic int8 output error for no
migration and for each alpha of ``AUTO_ALPHAS``, with scales fitted on half of the
calibration batches and scored on the other half, and keeps the best, so a group is only
migrated where that lowers the error on data the scales were not fitted to.

Example::

    stats = smooth_for_dynamic_int8(gm, batches, alpha="auto")
    stats["smoothed"]   # [{'producer': 'layer_norm', 'layers': [...], 'alpha': 0.5, ...}]
    apply_dynamic_int8(gm)
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import QuantizationError
from fxopt.ops import fetch_attr, fresh_attr, op_of
from fxopt.quant.dynamic import candidate_layers, dynamic_int8_linear, quantize_weight
from fxopt.quant.select import layer_name

AUTO_ALPHAS = (0.25, 0.5, 0.75, 1.0)
_PASS_THROUGH = ("transpose", "permute", "reshape", "contiguous", "clone", "identity",
                 "dropout")
_MIN_GAIN = 0.98  # "auto" migrates a group only if its error drops below this share
_MAX_ROWS = 65536  # activation rows kept per producer for choosing alpha


def check_alpha(alpha: Any) -> None:
    """Raise QuantizationError unless ``alpha`` is ``"auto"`` or a number in [0, 1]."""
    if alpha == "auto":
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
        raise QuantizationError(
            f"smooth={alpha!r}: give the migration strength alpha as a number in [0, 1] "
            "(0.5 is SmoothQuant's usual value) or 'auto' to measure it per layer group")


def smooth_for_dynamic_int8(
    gm: fx.GraphModule,
    batches: Sequence[tuple],
    *,
    alpha: float | str = "auto",
    skip: Collection[str] = (),
    per_channel: bool = True,
    reduce_range: bool = False,
) -> dict:
    """Migrate activation range into the weights of ``gm``'s linear layers, in place, for
    every producer the scales fold into exactly (see the module docstring). ``batches``
    (input tuples) give each channel's range. Returns ``{"smoothed": [{"producer",
    "layers", "alpha", "error_before", "error_after"}], "refused": [{"producer",
    "reason"}]}``; errors are the consumers' relative squared dynamic int8 output error
    on ``batches``. Float outputs do not change (up to float rounding).

    >>> stats = smooth_for_dynamic_int8(gm, [example_inputs], alpha=0.5)  # doctest: +SKIP
    """
    check_alpha(alpha)
    if not batches:
        raise QuantizationError("smoothing needs at least one batch of inputs to measure "
                                "activation ranges on; pass calibration data")
    layers = candidate_layers(gm, skip=skip, per_channel=per_channel,
                              reduce_range=reduce_range)
    groups, refused = _groups(gm, layers)
    if not groups:
        return {"smoothed": [], "refused": refused}
    inputs = _record(gm, list(groups), batches)
    smoothed = []
    for producer, consumers in groups.items():
        weights = [layers[c][1].detach().float() for c in consumers]
        fit, held = _split(inputs[producer])
        wmax = torch.stack([w.abs().amax(0) for w in weights]).amax(0)
        # scales from one half of the batches, scored on the other: a channel's calibration
        # maximum is partly chance, and scoring where it was fitted rewards chasing that
        xmax = torch.cat(fit).abs().amax(0)
        before = _error(held, weights, None, per_channel, reduce_range)
        tried = AUTO_ALPHAS if alpha == "auto" else (float(alpha),)
        scored = [(_error(held, weights, _scales(xmax, wmax, a), per_channel, reduce_range), a)
                  for a in tried]
        err, best_alpha = min(scored)
        s = _scales(torch.cat(inputs[producer]).abs().amax(0), wmax, best_alpha)
        if alpha == "auto" and not err < _MIN_GAIN * before:
            refused.append({"producer": producer.name,
                            "reason": f"no alpha lowers the error (best {err:.3g} at alpha "
                                      f"{best_alpha:g} vs {before:.3g} without)"})
            continue
        _fold(gm, producer, consumers, s)
        smoothed.append({"producer": producer.name,
                         "layers": [layer_name(c) for c in consumers], "alpha": best_alpha,
                         "error_before": float(f"{before:.4g}"),
                         "error_after": float(f"{err:.4g}")})
    gm.graph.lint()
    gm.recompile()
    return {"smoothed": smoothed, "refused": refused}


# --------------------------------------------------------------------------- groups


def _producer_const(node: fx.Node) -> tuple[str, Any] | None:
    """How ``node``'s output channels can absorb a scale: ``("norm", None)`` for a layer /
    RMS norm with a weight, ``("mul", operand)`` for ``x * c`` with a constant vector."""
    view = op_of(node)
    channels = (view.out_shape or (None,))[-1]
    if view.kind in ("layer_norm", "rms_norm"):
        shape = view.attrs.get("normalized_shape")
        w = view.params.get("weight")
        if w is not None and shape is not None and len(shape) == 1 and w.dim() == 1:
            return "norm", None
        return None
    if view.kind != "mul" or view.module is not None:
        return None
    for operand in (view.arg("input"), view.arg("other")):
        const = operand
        if isinstance(operand, fx.Node):
            if operand.op != "get_attr":
                continue
            const = fetch_attr(node.graph.owning_module, str(operand.target))
        if (isinstance(const, torch.Tensor) and const.is_floating_point()
                and const.shape == (channels,)):
            other = view.arg("other") if operand is view.arg("input") else view.arg("input")
            if isinstance(other, fx.Node) and other.op != "get_attr":
                return "mul", operand
    return None


def _keeps_last_axis(node: fx.Node, channels: int) -> bool:
    """True when ``node`` moves data without mixing or moving the last (channel) axis."""
    view = op_of(node)
    if view.kind not in _PASS_THROUGH or view.module is not None and view.kind != "dropout":
        return False
    src, out = view.in_shape(0), view.out_shape
    if not src or not out or src[-1] != channels or out[-1] != channels:
        return False
    last = len(src) - 1
    if view.kind == "transpose":  # t() / mT swap the last axis: never channel-keeping
        dims = [view.arg("dim0"), view.arg("dim1")]
        return all(isinstance(d, int) and d % len(src) != last for d in dims)
    if view.kind == "permute":
        dims = view.arg("dims")
        return isinstance(dims, (tuple, list)) and dims[-1] % len(src) == last
    return True


def _groups(gm: fx.GraphModule, layers: dict) -> tuple[dict, list]:
    """``{producer: [linear nodes]}`` for producers whose every reader is a quantizable
    linear (through channel-keeping layout ops), and why the others were refused."""
    by_input: dict[fx.Node, list[fx.Node]] = {}
    for node, (x, *_rest) in layers.items():
        by_input.setdefault(x, []).append(node)
    groups: dict[fx.Node, list[fx.Node]] = {}
    refused: list[dict] = []
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        found = _producer_const(node)
        if found is None:
            continue
        channels = op_of(node).out_shape[-1]
        consumers, reason, stack = [], None, [node]
        while stack and reason is None:
            cur = stack.pop()
            for user in cur.users:
                if user in layers and layers[user][0] is cur:
                    consumers.append(user)
                elif _keeps_last_axis(user, channels) and op_of(user).input is cur:
                    stack.append(user)
                else:
                    reason = f"{user.name} ({op_of(user).kind}) also reads it"
                    break
        if not consumers:
            continue
        if reason is None:
            reason = _shared_module(gm, consumers)
        if reason is not None:
            refused.append({"producer": node.name, "reason": reason})
            continue
        groups[node] = consumers
    return groups, refused


def _shared_module(gm: fx.GraphModule, consumers: list[fx.Node]) -> str | None:
    mine = {c.target for c in consumers if c.op == "call_module"}
    for n in gm.graph.nodes:
        if n.op == "call_module" and n.target in mine and n not in consumers:
            return f"module {n.target} is also called at {n.name}"
    return None


# --------------------------------------------------------------------------- measuring


class _Recorder(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, watch: set[fx.Node], seen: dict):
        super().__init__(gm)
        self.watch, self.seen = watch, seen

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if n in self.watch:
            rows = self.seen.setdefault(n, [])
            if sum(r.shape[0] for r in rows) < _MAX_ROWS:
                rows.append(out.detach().float().reshape(-1, out.shape[-1]))
        return out


def _record(gm: fx.GraphModule, producers: list[fx.Node], batches: Sequence[tuple]) -> dict:
    """Each producer's output per batch, flattened to ``[rows, channels]``."""
    seen: dict[fx.Node, list[torch.Tensor]] = {}
    with torch.no_grad():
        for batch in batches:
            _Recorder(gm, set(producers), seen).run(*batch)
    return seen


def _split(xs: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Batches to fit scales on and batches to score them on (one batch: its two halves)."""
    if len(xs) >= 2:
        return xs[0::2], xs[1::2]
    rows = xs[0].shape[0]
    if rows < 2:
        return xs, xs
    return [xs[0][: rows // 2]], [xs[0][rows // 2:]]


def _scales(xmax: torch.Tensor, wmax: torch.Tensor, alpha: float) -> torch.Tensor:
    """``max|X_j|**alpha / max|W_j|**(1 - alpha)``, 1 for dead channels, geometric mean 1."""
    live = (xmax > 0) & (wmax > 0)
    s = torch.ones_like(xmax)
    s[live] = xmax[live] ** alpha / wmax[live] ** (1 - alpha)
    s[live] = s[live] / torch.exp(torch.log(s[live]).mean())
    return s


def _error(xs: list[torch.Tensor], weights: list[torch.Tensor], s: torch.Tensor | None,
           per_channel: bool, reduce_range: bool) -> float:
    """Mean over consumers of ``|int8(X/s) int8(W s)^T - X W^T|^2 / |X W^T|^2`` (one
    dynamic quantization per recorded batch, as at run time)."""
    total = 0.0
    for w in weights:
        ws = w if s is None else w * s
        q, scale = quantize_weight(ws, per_channel, reduce_range)
        num = den = 0.0
        for x in xs:
            want = x @ w.t()
            got = dynamic_int8_linear(x if s is None else x / s, q.t().contiguous(), scale)
            num += float((got - want).double().pow(2).sum())
            den += float(want.double().pow(2).sum())
        total += num / max(den, 1e-30)
    return total / len(weights)


# --------------------------------------------------------------------------- folding


def _fold(gm: fx.GraphModule, producer: fx.Node, consumers: list[fx.Node],
          s: torch.Tensor) -> None:
    kind, operand = _producer_const(producer)
    view = op_of(producer)
    if kind == "norm":
        for name in ("weight", "bias"):
            p = view.params.get(name)
            if p is not None:
                view.set_param(name, p.detach() / s.to(p.dtype))
    else:
        const = operand if isinstance(operand, torch.Tensor) else fetch_attr(
            gm, str(operand.target))
        attr = fresh_attr(gm, f"{producer.name}_smoothed")
        gm.register_buffer(attr, (const.detach() / s.to(const.dtype)).contiguous())
        with gm.graph.inserting_before(producer):
            new = gm.graph.get_attr(attr)
        new.meta.update(operand.meta if isinstance(operand, fx.Node) else {})
        if isinstance(operand, fx.Node):
            producer.replace_input_with(operand, new)
            if not operand.users:
                gm.graph.erase_node(operand)
        else:
            _replace_literal(producer, operand, new)
    for c in consumers:
        cv = op_of(c)
        w = cv.params["weight"]
        cv.set_param("weight", (w.detach() * s.to(w.dtype)).contiguous())


def _replace_literal(node: fx.Node, literal: torch.Tensor, new: fx.Node) -> None:
    node.args = tuple(new if a is literal else a for a in node.args)
    node.kwargs = {k: new if v is literal else v for k, v in node.kwargs.items()}
