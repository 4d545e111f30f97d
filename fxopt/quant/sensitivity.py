"""Which layers quantization hurts, and keeping the worst in float until a budget holds.

``sensitivity`` quantizes one layer at a time (every other fake-quant node switched off)
and ranks layers by the error they add alone. ``fallback`` starts from the fully
quantized graph and returns the most sensitive layers to float, one by one, until the
metric (cosine similarity of the outputs with the float model's by default, or any
``metric(reference, outputs) -> float``, higher is better) reaches ``tolerance``.

Example::

    ranking = sensitivity(qgm, batches, reference)      # [(layer, error), ...] worst first
    kept = fallback(qgm, batches, reference, tolerance=0.999)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import QuantizationError
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.quant.select import layer_name
from fxopt.verify import cosine

Metric = Callable[[list, list], float]


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
            out[node] = feeding
    return out


def sensitivity(gm: fx.GraphModule, batches: Sequence[tuple], reference: list,
                metric: Metric = output_cosine) -> list[tuple[str, float]]:
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
        for node, fqs in layers.items():
            mine = {n.target for n in fqs}
            for name, m in modules.items():
                m.mode = saved[name] if name in mine else "off"
            scores.append((names[node], 1.0 - metric(reference, run_batches(gm, batches))))
    finally:
        for name, m in modules.items():
            m.mode = saved[name]
    return sorted(scores, key=lambda s: -s[1])


def fallback(gm: fx.GraphModule, batches: Sequence[tuple], reference: list, *,
             tolerance: float, metric: Metric = output_cosine,
             ranking: list[tuple[str, float]] | None = None) -> dict[str, Any]:
    """Return the most sensitive layers to float until ``metric >= tolerance``; edits ``gm``.

    Returns ``{"kept_float": [...], "metric_before": m0, "metric_after": m1,
    "ranking": [...]}``. Raises QuantizationError if even all-float misses the tolerance.

    >>> fallback(qgm, batches, reference, tolerance=0.999)["kept_float"]  # doctest: +SKIP
    ['fc']
    """
    ranking = ranking if ranking is not None else sensitivity(gm, batches, reference, metric)
    before = current = metric(reference, run_batches(gm, batches))
    kept: list[str] = []
    by_name = {name: n for n, name in _unique_names(layer_quantizers(gm)).items()}
    for name, _ in ranking:
        if current >= tolerance:
            break
        node = by_name.get(name)
        if node is None:
            continue
        _to_float(gm, node)
        kept.append(name)
        current = metric(reference, run_batches(gm, batches))
    if current < tolerance:
        raise QuantizationError(
            f"the quantized model reaches {current:.6f}, below tolerance={tolerance} even with "
            f"{len(kept)} layers kept in float; lower the tolerance or use a better observer "
            "(observer=percentile|entropy|mse)")
    return {"kept_float": kept, "metric_before": before, "metric_after": current,
            "ranking": ranking}


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
