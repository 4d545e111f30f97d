"""Which layers quantization hurts, and keeping the worst in float until a budget holds.

``sensitivity`` quantizes one layer at a time (every other fake-quant node switched off)
and ranks layers by the error they add alone. ``fallback`` starts from the fully
quantized graph and returns the most sensitive layers to float, one by one, until the
budget holds: ``metric >= budget`` for a float budget (the metric is the cosine similarity
of the outputs with the float model's by default, or any ``metric(reference, outputs) ->
float``, higher is better), or ``budget(reference, outputs)`` true for a callable one.
``dynamic_fallback`` does the same for dynamic int8, ranking layers by damage per
multiply-accumulate (keeping a big layer in float costs more speed than a small one).
Both walk the ranking with one loop (``_walk``).

Example::

    ranking = sensitivity(qgm, batches, reference)      # [(layer, error), ...] worst first
    kept = fallback(qgm, batches, reference, budget=0.999)
    kept = dynamic_fallback(float_gm, batches, budget=0.99)["kept_float"]
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import QuantizationError
from fxopt.op_props import Category
from fxopt.ops import op_of
from fxopt.progress import Mode, bar
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.quant.select import layer_name
from fxopt.verify import cosine

Metric = Callable[[list, list], float]
Budget = float | Callable[[list, list], bool]


def output_cosine(reference: list, outputs: list) -> float:
    """Cosine similarity of all float outputs over all batches, flattened together.

    >>> output_cosine([torch.ones(3)], [torch.ones(3)])
    1.0
    """
    ref = torch.cat([t.flatten().double() for t in _floats(reference)])
    out = torch.cat([t.flatten().double() for t in _floats(outputs)])
    return cosine(ref, out)


def run_batches(gm: torch.nn.Module, batches: Sequence[tuple]) -> list:
    """``gm`` on every batch, without grad (outputs kept in order)."""
    with torch.no_grad():
        return [gm(*b) for b in batches]


def layer_quantizers(gm: fx.GraphModule) -> dict[fx.Node, list[fx.Node]]:
    """Each node that reads fake-quantized values (conv/linear/matmul with their weights,
    and adds, concats, pools… that run in int8) and the fake-quant nodes feeding it."""
    fqs = {p for p, m in gm.named_modules() if isinstance(m, FakeQuantize)}
    out: dict[fx.Node, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "output" or (node.op == "call_module" and node.target in fqs):
            continue
        feeding = [a for a in node.all_input_nodes if a.op == "call_module" and a.target in fqs]
        if feeding:
            out[node] = feeding + _requantized(feeding, fqs)
    return out


def _requantized(feeding: list[fx.Node], fqs: set[str]) -> list[fx.Node]:
    """The fake-quant nodes upstream of ``feeding`` through shape-only ops read by nothing
    else (ResNet's ``pool_fq -> flatten -> flatten_fq -> fc``): the same tensor quantized
    twice with the same range, so leaving ``fc`` float gains nothing unless both go."""
    extra = []
    for fq in feeding:
        src = fq.args[0] if fq.args else None
        while (isinstance(src, fx.Node) and src.op.startswith("call")
               and op_of(src).category == Category.SHAPE and len(src.users) == 1):
            src = src.args[0] if src.args else None
            if isinstance(src, fx.Node) and src.op == "call_module" and src.target in fqs:
                if len(src.users) == 1:
                    extra.append(src)
                break
    return extra


def sensitivity(gm: fx.GraphModule, batches: Sequence[tuple], reference: list,
                metric: Metric = output_cosine, *,
                progress: Mode = None) -> list[tuple[str, float]]:
    """Rank layers by the error each adds when it alone is quantized (worst first).

    >>> sensitivity(qgm, [(x,)], [float_model(x)])[:2]  # doctest: +SKIP
    [('layer4.1.conv2', 0.0031), ('fc', 0.0012)]
    """
    layers = layer_quantizers(gm)
    if not layers:
        raise QuantizationError("no quantized layer to analyse: run the quantize pass first")
    names = _unique_names(layers)
    modules = {n.target: gm.get_submodule(n.target) for fqs in layers.values() for n in fqs}
    saved = {name: m.mode for name, m in modules.items()}
    scores = []
    try:
        for node, fqs in bar(layers.items(), "sensitivity", total=len(layers), unit="layer",
                             progress=progress):
            mine = {n.target for n in fqs}
            for name, m in modules.items():
                m.mode = saved[name] if name in mine else "off"
            scores.append((names[node], 1.0 - metric(reference, run_batches(gm, batches))))
    finally:
        for name, m in modules.items():
            m.mode = saved[name]
    return sorted(scores, key=lambda s: -s[1])


def fallback(gm: fx.GraphModule, batches: Sequence[tuple], reference: list, *,
             budget: Budget, metric: Metric = output_cosine,
             ranking: list[tuple[str, float]] | None = None,
             progress: Mode = None) -> dict[str, Any]:
    """Return the most sensitive layers of a static int8 graph to float until the budget
    holds; edits ``gm``.

    Returns ``{"kept_float": [...], "metric_before": m0, "metric_after": m1,
    "ranking": [...]}``. Raises QuantizationError if even all-float misses the budget.

    >>> fallback(qgm, batches, reference, budget=0.999)["kept_float"]  # doctest: +SKIP
    ['fc']
    """
    ranking = (ranking if ranking is not None
               else sensitivity(gm, batches, reference, metric, progress=progress))
    by_name = {name: n for n, name in _unique_names(layer_quantizers(gm)).items()}

    def keep(name: str) -> bool:
        node = by_name.get(name)
        if node is not None:
            _to_float(gm, node)
        return node is not None

    result = _walk([name for name, _ in ranking], keep, lambda: run_batches(gm, batches),
                   reference, budget, metric, progress)
    return {**result, "ranking": ranking}


def dynamic_fallback(gm: fx.GraphModule, batches: Sequence[tuple], *, budget: Budget,
                     metric: Metric = output_cosine, skip: Collection[str] = (),
                     per_channel: bool = True, progress: Mode = None) -> dict[str, Any]:
    """Choose which linear layers dynamic int8 leaves in float so that the budget holds on
    ``batches``; ``gm`` is the float graph and is not changed.

    Each layer is quantized alone (fxopt's kernel, which computes what ONNX Runtime's
    integer kernels compute) and its damage measured (the metric's value on the float
    outputs minus its value with that layer quantized); layers are ranked by damage per
    multiply-accumulate, and kept float down that ranking, from everything quantized,
    until the budget holds; then each kept layer the budget turns out not to need goes
    back to int8 (``requantized``). Returns ``{"kept_float": [...], "metric_before": m0,
    "metric_after": m1, "requantized": [...], "ranking": [(layer, damage, macs), ...],
    "float_mac_share": s}``;
    pass ``skip=[*skip, *kept_float]`` to ``apply_dynamic_int8``. Raises
    QuantizationError when even all-float misses the budget.

    >>> dynamic_fallback(gm, [(x,)], budget=0.99)["kept_float"]  # doctest: +SKIP
    ['blocks.1.mlp.3']
    """
    from fxopt.quant.dynamic import candidate_layers

    probe = _DynamicProbe(gm, candidate_layers(gm, skip=skip, per_channel=per_channel))
    if not probe.layers:
        raise QuantizationError("nothing to quantize: no linear layer outside skip= has a "
                                "constant float weight")
    names = _skip_keys(list(probe.layers))
    reference = probe.run_all(batches, set())
    ideal = metric(reference, reference)
    damage, macs = {}, {}
    for node in bar(list(probe.layers), "sensitivity (dynamic int8)", unit="layer",
                    progress=progress):
        damage[node] = ideal - metric(reference, probe.run_all(batches, {node}))
        macs[node] = op_of(node).macs() or probe.layers[node][1].numel()
    order = sorted(probe.layers, key=lambda n: damage[n] / max(macs[n], 1), reverse=True)
    active = set(probe.layers)
    by_name = {names[n]: n for n in order}

    def keep(name: str) -> bool:
        active.discard(by_name[name])
        return True

    result = _walk([names[n] for n in order], keep, lambda: probe.run_all(batches, active),
                   reference, budget, metric, progress)
    result |= _requantize_unneeded(result, by_name, macs, active, batches, probe, reference,
                                   budget, metric)
    total = sum(macs.values()) or 1
    kept_macs = sum(macs[by_name[name]] for name in result["kept_float"])
    return {**result, "float_mac_share": kept_macs / total,
            "ranking": [(names[n], damage[n], macs[n]) for n in order]}


def _requantize_unneeded(result: dict, by_name: dict, macs: dict, active: set,
                         batches: Sequence[tuple], probe: _DynamicProbe, reference: list,
                         budget: Budget, metric: Metric) -> dict:
    """Return to int8 each layer the walk kept float that the budget does not need.

    Damage is not additive: a layer kept early for its damage alone (attention's value
    projections in MiniLM) may add nothing once the layers kept after it are float. Each
    kept layer, the one with the most MACs first (the most speed to win back), goes back
    to int8 where the budget still holds without it. Returns the updated
    ``kept_float`` / ``metric_after`` and ``requantized`` (the layers it returned)."""
    kept, back = list(result["kept_float"]), []
    current = result["metric_after"]
    if len(kept) < 2:
        return {"requantized": back}
    for name in sorted(kept, key=lambda k: macs[by_name[k]], reverse=True):
        active.add(by_name[name])
        out = probe.run_all(batches, active)
        value = metric(reference, out)
        if _met(budget, reference, out, value):
            kept.remove(name)
            back.append(name)
            current = value
        else:
            active.discard(by_name[name])
    return {"kept_float": kept, "metric_after": current, "requantized": back}


def _walk(order: list[str], keep: Callable[[str], bool], outputs: Callable[[], list],
          reference: list, budget: Budget, metric: Metric, progress: Mode) -> dict[str, Any]:
    """Keep layers float in ``order`` (``keep(name)`` returns False for one it cannot)
    until the budget holds on ``outputs()``; the loop both fallbacks share."""
    out = outputs()
    before = current = metric(reference, out)
    met = _met(budget, reference, out, current)
    kept: list[str] = []
    with bar(desc="keeping layers float", total=len(order), unit="layer",
             progress=progress) as shown:
        for name in order:
            if met:
                break
            shown.update(1)
            if not keep(name):
                continue
            kept.append(name)
            out = outputs()
            current = metric(reference, out)
            met = _met(budget, reference, out, current)
    if not met:
        target = f"budget={budget}" if not callable(budget) else "the budget callable"
        raise QuantizationError(
            f"the quantized model reaches {current:.6f}, below {target} even with "
            f"{len(kept)} layers kept in float; lower the budget or use a better observer "
            "(observer=percentile|entropy|mse)")
    return {"kept_float": kept, "metric_before": before, "metric_after": current}


def _met(budget: Budget, reference: list, outputs: list, value: float) -> bool:
    return bool(budget(reference, outputs)) if callable(budget) else value >= float(budget)


class _DynamicProbe(fx.Interpreter):
    """Runs the float graph with a chosen set of its linear layers computed by the dynamic
    int8 kernel instead, without rewriting or copying the graph."""

    def __init__(self, gm: fx.GraphModule, layers: dict[fx.Node, tuple]):
        super().__init__(gm)
        self.layers = layers  # node -> (x node, float weight, int8 weight [in,out], scale, bias)
        self.active: set[fx.Node] = set()

    def run_node(self, n: fx.Node) -> Any:
        if n not in self.active:
            return super().run_node(n)
        x, _, w_t, scale, bias = self.layers[n]
        bias = self.env[bias] if isinstance(bias, fx.Node) else bias
        return torch.ops.fxopt.dynamic_int8_linear(self.env[x], w_t, scale, bias)

    def run_all(self, batches: Sequence[tuple], active: set[fx.Node]) -> list:
        self.active = active
        with torch.no_grad():  # run() flattens inputs and rebuilds outputs as gm(*b) does
            return [self.run(*b) for b in batches]


def _skip_keys(nodes: list[fx.Node]) -> dict[fx.Node, str]:
    """Names ``skip=`` matches each node by alone: its layer name, or its node name where
    several nodes share one (function calls inside one block)."""
    counts: dict[str, int] = {}
    for node in nodes:
        counts[layer_name(node)] = counts.get(layer_name(node), 0) + 1
    return {n: layer_name(n) if counts[layer_name(n)] == 1 else n.name for n in nodes}


def _unique_names(layers: dict[fx.Node, list[fx.Node]]) -> dict[fx.Node, str]:
    """Layer names, with the node name added where several nodes share a module path
    (function calls inside one block)."""
    counts: dict[str, int] = {}
    for node in layers:
        counts[layer_name(node)] = counts.get(layer_name(node), 0) + 1
    return {n: layer_name(n) if counts[layer_name(n)] == 1 else f"{layer_name(n)}:{n.name}"
            for n in layers}


def _to_float(gm: fx.GraphModule, node: fx.Node) -> None:
    """Feed ``node`` its unquantized inputs and weight; drop fake-quant nodes left unused."""
    for fq in [a for a in node.all_input_nodes if a.op == "call_module"
               and isinstance(gm.get_submodule(a.target), FakeQuantize)]:
        node.replace_input_with(fq, fq.args[0])
        if not fq.users:
            gm.graph.erase_node(fq)
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()


def _floats(outputs: Any) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(outputs)
            if isinstance(t, torch.Tensor) and t.is_floating_point()]
