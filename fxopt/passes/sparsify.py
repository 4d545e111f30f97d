"""The ``sparsify`` pass: zero weights by magnitude, unstructured or in the 2:4 pattern.

Which ops are sparsified is data: the op table marks them ``Prop.SPARSIFY`` (conv and
linear), and their weights are read and written through ``fxopt.ops.OpView`` so that
``call_module`` graphs and ``torch.export`` graphs with ``get_attr`` weights behave alike::

    res = fxopt.optimize(model, inputs, "default,sparsify(ratio=0.7,scope=global)")
    res = fxopt.optimize(model, inputs, "default,sparsify(pattern='2:4')")
    res = fxopt.optimize(model, inputs, "sparsify(threshold=1e-3)")

* ``unstructured``: the ``ratio`` smallest-magnitude weights are zeroed, ranked over all
  sparsified layers together (``scope=global``) or within each layer (``scope=local``);
  ``threshold=t`` instead zeroes every weight with ``|w| <= t``.
* ``2:4``: in every group of 4 consecutive weights along the input-channel axis (dim 1,
  the reduction axis of conv and linear), the 2 smallest are zeroed: the pattern sparse
  tensor cores run (TensorRT, ``torch.sparse.to_sparse_semi_structured``). Layers whose
  input channels are not a multiple of 4 are skipped, with the reason in the stats.

Zeros make no dense CPU kernel faster; they make the eager artifact smaller (compact
storage in ``fxopt.lowering.eager_storage``) and, in 2:4, fast on sparse tensor cores.

The pass changes the function on purpose (``Semantics.CHANGES``) and checks itself: the
result must equal a copy of its input graph whose weights were multiplied by the same
masks, to float round-off. The masks are kept on the sparsified nodes
(``node.meta["fxopt_sparsity_mask"]``, carried to a node's replacement), and the
PassManager re-applies them after any later pass that rewrites a sparsified weight
(``keep_sparsity``), so ``sparsify,...,quantize`` or ``half`` keep the pattern.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import PassError, SpecError
from fxopt.graph_utils import copy_graph_module, layer_name, matches
from fxopt.op_props import Prop
from fxopt.ops import effects, fetch_attr, has_prop, kinds_with, op_of
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass
from fxopt.verify import EXACT, compare_outputs

PATTERNS = ("unstructured", "2:4")
SCOPES = ("global", "local")
META_KEY = "sparsity"  # gm.meta["fxopt"][META_KEY]: the pattern last applied
MASK_META = "fxopt_sparsity_mask"  # node.meta: the keep-mask, carried by passes that
# replace a node (they copy its meta), never serialized (graph.json keeps plain JSON only)


# --------------------------------------------------------------------------- weights
def effective_weight(node: fx.Node) -> torch.Tensor | None:
    """The weight ``node`` computes with: the stored tensor, or, when the graph computes it
    from stored tensors alone (a fake-quantized weight after ``quantize``), that value.

    >>> effective_weight(conv_node).shape  # doctest: +SKIP
    torch.Size([16, 16, 3, 3])
    """
    view = op_of(node)
    w = view.params.get("weight") if view.known else None
    if isinstance(w, torch.Tensor) or view.param_node("weight") is None:
        return w
    root = node.graph.owning_module
    env: dict[fx.Node, Any] = {}

    def value(n: fx.Node) -> Any:
        if n not in env:
            if n.op == "get_attr":
                env[n] = fetch_attr(root, n.target)
            elif n.op.startswith("call") and (effects(n).foldable or getattr(
                    root.get_submodule(n.target) if n.op == "call_module" else None,
                    "frozen", False)):  # a frozen fake-quant is pure
                args = fx.node.map_arg((n.args, n.kwargs), value)
                if n.op == "call_module":
                    env[n] = root.get_submodule(n.target)(*args[0], **args[1])
                elif n.op == "call_method":
                    env[n] = getattr(args[0][0], n.target)(*args[0][1:], **args[1])
                else:
                    env[n] = n.target(*args[0], **args[1])
            else:
                raise LookupError(n.name)  # depends on an input: not a constant
        return env[n]

    try:
        with torch.no_grad():
            out = value(view.param_node("weight"))
    except (LookupError, RuntimeError, TypeError):
        return None
    return out if isinstance(out, torch.Tensor) else None


# --------------------------------------------------------------------------- masks
def _group_view(w: torch.Tensor) -> torch.Tensor:
    """``w`` with the input-channel axis (dim 1) last, as rows of 4 consecutive weights."""
    return w.movedim(1, -1).reshape(-1, 4)


def mask_2to4(w: torch.Tensor) -> torch.Tensor:
    """Keep-mask (True = kept) holding the 2 largest-magnitude of every 4 consecutive
    weights along dim 1.

    >>> mask_2to4(torch.tensor([[1.0, -4.0, 3.0, 0.5]])).tolist()
    [[False, True, True, False]]
    """
    groups = _group_view(w.detach().abs().float())
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(1, groups.topk(2, dim=1).indices, True)
    moved = w.movedim(1, -1).shape
    return keep.reshape(moved).movedim(-1, 1)


def violations_2to4(w: torch.Tensor) -> int:
    """How many groups of 4 consecutive weights along dim 1 hold fewer than 2 zeros
    (-1 when dim 1 is not a multiple of 4, so the pattern cannot hold at all).

    >>> violations_2to4(torch.tensor([[0.0, 1.0, 0.0, 2.0], [1.0, 1.0, 0.0, 1.0]]))
    1
    """
    if w.dim() < 2 or w.shape[1] % 4:
        return -1
    zeros = (_group_view(w.detach()) == 0).sum(dim=1)
    return int((zeros < 2).sum())


def validate_pattern(gm: fx.GraphModule, pattern: str = "2:4", *,
                     layers: list[str] | None = None) -> dict[str, float]:
    """Check that the sparsified layers of ``gm`` hold ``pattern``; return their sparsity.

    ``layers`` are node names (default: the layers ``sparsify`` zeroed, else every
    ``Prop.SPARSIFY`` op). A 2:4 violation raises ``PassError``
    naming the layer and how many groups of 4 break it.

    >>> validate_pattern(res.module, "2:4")  # doctest: +SKIP
    {'conv1': 0.5, 'fc': 0.5}
    """
    if pattern not in PATTERNS:
        raise SpecError(f"unknown sparsity pattern {pattern!r}; use one of {PATTERNS}")
    if layers is None:
        layers = [n.name for n in gm.graph.nodes if MASK_META in n.meta] or [
            n.name for n in gm.graph.nodes if n.op.startswith("call") and has_prop(n, Prop.SPARSIFY)
        ]
    nodes = {n.name: n for n in gm.graph.nodes}
    out: dict[str, float] = {}
    for name in layers:
        if name not in nodes:
            raise PassError(f"validate_pattern: the graph has no node {name!r}")
        w = effective_weight(nodes[name])
        if not isinstance(w, torch.Tensor):
            raise PassError(f"validate_pattern: {name}'s weight is not a constant to check")
        if pattern == "2:4":
            bad = violations_2to4(w)
            if bad:
                why = (f"its input channels ({w.shape[1]}) are not a multiple of 4"
                       if bad < 0 else f"{bad} of {w.numel() // 4} groups of 4 hold < 2 zeros")
                raise PassError(
                    f"layer {layer_name(nodes[name])} ({name}) is not 2:4 sparse: {why}; "
                    "run sparsify(pattern='2:4') as the last weight-rewriting pass, or "
                    "leave this layer out of the check"
                )
        out[name] = float((w == 0).sum()) / max(w.numel(), 1)
    return out


def sparsity(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Per sparsifiable layer (node name): its layer name, weight size and zero fraction.

    >>> sparsity(fxopt.capture(nn.Linear(4, 2), (torch.ones(1, 4),)))  # doctest: +SKIP
    {'linear': {'layer': 'linear', 'numel': 8, 'zeros': 0, 'sparsity': 0.0}}
    """
    out = {}
    for node in gm.graph.nodes:
        if not node.op.startswith("call") or not has_prop(node, Prop.SPARSIFY):
            continue
        w = effective_weight(node)
        if isinstance(w, torch.Tensor):
            zeros = int((w == 0).sum())
            out[node.name] = {"layer": layer_name(node), "numel": w.numel(), "zeros": zeros,
                              "sparsity": round(zeros / max(w.numel(), 1), 4)}
    return out


def sparsity_table(stats: dict[str, Any]) -> str:
    """The per-layer table of a ``sparsify`` record's stats (what the CLI prints).

    >>> print(sparsity_table(res.report[-1].stats))  # doctest: +SKIP
    layer     weights  zeros  sparsity
    conv1     432      216    50.0%
    """
    rows = [("layer", "weights", "zeros", "sparsity")]
    for v in stats.get("layers", {}).values():
        rows.append((v["layer"], str(v["numel"]), str(v["zeros"]), f"{v['sparsity']:.1%}"))
    rows += [(f"{k} (skipped)", "-", "-", why) for k, why in stats.get("skipped", {}).items()]
    rows.append(("total", "", "", f"{stats.get('sparsity', 0.0):.1%}"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
                     for r in rows)


# --------------------------------------------------------------------------- the pass
def _check_args(ratio, threshold, scope, pattern) -> float | None:
    if pattern not in PATTERNS:
        raise PassError(f"sparsify: unknown pattern {pattern!r}; use 'unstructured' or '2:4'")
    if scope not in SCOPES:
        raise PassError(f"sparsify: unknown scope {scope!r}; use 'global' or 'local'")
    if ratio is not None and threshold is not None:
        raise PassError(
            "sparsify: give ratio= (a fraction of weights to zero) or threshold= (zero every "
            f"|w| <= threshold), not both (got ratio={ratio}, threshold={threshold})"
        )
    if pattern == "2:4":
        if threshold is not None or ratio not in (None, 0.5):
            raise PassError(
                "sparsify: pattern='2:4' always zeroes 2 of every 4 weights (ratio 0.5); "
                f"drop ratio=/threshold= (got ratio={ratio}, threshold={threshold})"
            )
        return 0.5
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not (
            threshold >= 0
        ):
            raise PassError(f"sparsify: threshold must be a number >= 0, got {threshold!r}")
        return None
    ratio = 0.5 if ratio is None else ratio
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PassError(
            f"sparsify: ratio must be in [0, 1) (the fraction of weights zeroed), got {ratio!r}"
        )
    return float(ratio)


def _targets(gm: fx.GraphModule, skip) -> tuple[dict[int, list], dict[str, str]]:
    """Sparsifiable weights by tensor identity (a shared weight is masked once), and the
    layers left alone with the reason."""
    groups: dict[int, list] = {}
    skipped: dict[str, str] = {}
    for node in gm.graph.nodes:
        if not node.op.startswith("call") or not has_prop(node, Prop.SPARSIFY):
            continue
        w = op_of(node).params.get("weight")
        if matches(node, skip):
            skipped[node.name] = "in skip="
        elif not isinstance(w, torch.Tensor):
            skipped[node.name] = "its weight is computed in the graph, not stored"
        elif not w.is_floating_point() or w.dim() < 2:
            skipped[node.name] = f"weight is {w.dtype} of rank {w.dim()}"
        else:
            groups.setdefault(id(w), [w, []])[1].append(node)
    return groups, skipped


def _masks(weights: list[torch.Tensor], ratio, threshold, scope, pattern) -> list[torch.Tensor]:
    if pattern == "2:4":
        return [mask_2to4(w) for w in weights]
    mags = [w.detach().abs().float().flatten() for w in weights]
    if threshold is not None:
        return [(m > threshold).reshape(w.shape) for m, w in zip(mags, weights, strict=True)]
    if scope == "local":
        keep = []
        for m in mags:
            k = int(ratio * m.numel())
            flat = torch.ones_like(m, dtype=torch.bool)
            flat[m.topk(k, largest=False).indices] = False
            keep.append(flat)
    else:
        allm = torch.cat(mags)
        flat = torch.ones_like(allm, dtype=torch.bool)
        flat[allm.topk(int(ratio * allm.numel()), largest=False).indices] = False
        keep = list(flat.split([m.numel() for m in mags]))
    return [k.reshape(w.shape) for k, w in zip(keep, weights, strict=True)]


@register_pass("sparsify", Semantics.CHANGES)
def sparsify(gm: fx.GraphModule, ctx: PassContext, *, ratio: float | None = None,
             threshold: float | None = None, scope: str = "global",
             pattern: str = "unstructured", skip: list[str] | tuple = ()) -> PassResult:
    """Zero conv/linear weights by magnitude: ``ratio`` (default 0.5) or ``threshold``,
    ``scope=global|local``, ``pattern=unstructured|2:4``; ``skip`` layer names/globs."""
    ratio = _check_args(ratio, threshold, scope, pattern)
    skip = [skip] if isinstance(skip, str) else list(skip)
    groups, skipped = _targets(gm, skip)
    if pattern == "2:4":
        for key, (w, nodes) in list(groups.items()):
            if w.shape[1] % 4:
                for n in nodes:
                    skipped[n.name] = f"input channels ({w.shape[1]}) not a multiple of 4"
                del groups[key]
    if not groups:
        why = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or (
            f"the graph has no {'/'.join(sorted(kinds_with(Prop.SPARSIFY)))} op")
        raise PassError(f"sparsify found nothing to sparsify ({why})")
    weights = [w for w, _ in groups.values()]
    masks = _masks(weights, ratio, threshold, scope, pattern)
    twin = copy_graph_module(gm)  # the reference: the same graph, weights multiplied by masks
    twin_nodes = {n.name: n for n in twin.graph.nodes}
    layers: dict[str, dict[str, Any]] = {}
    gm.meta.setdefault("fxopt", {})[META_KEY] = {"pattern": pattern}
    zeroed = 0
    for (w, nodes), keep in zip(groups.values(), masks, strict=True):
        zero = torch.zeros((), dtype=w.dtype, device=w.device)
        new = torch.where(keep, w.detach(), zero)  # +0.0 where masked, never -0.0
        for name in {n.name for n in nodes}:  # the twin: a product, not a select
            view = op_of(twin_nodes[name])
            view.set_param("weight", view.params["weight"].detach() * keep.to(w.dtype))
        for node in nodes:
            op_of(node).set_param("weight", new)
            node.meta[MASK_META] = keep
            zeros = int((new == 0).sum())
            layers[node.name] = {"layer": layer_name(node), "numel": new.numel(),
                                 "zeros": zeros, "sparsity": round(zeros / new.numel(), 4)}
        zeroed += int((w != 0).sum()) - int((new != 0).sum())
    gm.recompile()
    _check_twin(gm, twin, ctx)
    if pattern == "2:4":
        validate_pattern(gm, "2:4", layers=list(layers))
    total = sum(v["numel"] for v in layers.values())
    stats = {
        "pattern": pattern, "scope": scope if threshold is None else "threshold",
        "ratio": ratio, "threshold": threshold,
        "sparsity": round(sum(v["zeros"] for v in layers.values()) / total, 4),
        "zeroed": zeroed, "layers": layers, "skipped": skipped,
    }
    return PassResult(gm, modified=zeroed > 0, stats=stats)


def _check_twin(gm: fx.GraphModule, twin: fx.GraphModule, ctx: PassContext) -> None:
    twin.recompile()
    with torch.no_grad():
        want, got = twin(*ctx.example_inputs), gm(*ctx.example_inputs)
    cmp = compare_outputs(want, got, EXACT)
    if not cmp.ok():
        raise PassError(
            "sparsify: the sparsified graph differs from its input graph with the same "
            f"weights zeroed (max abs error {cmp.max_abs:.3g}); this is a bug in fxopt, "
            "please report it with the model"
        )


# --------------------------------------------------------------------------- keeping zeros
def keep_sparsity(gm: fx.GraphModule) -> dict[str, int]:
    """Re-apply the masks ``sparsify`` left on its nodes to any sparsified weight a later
    pass rewrote (nonzeros where the mask says zero); forget masks whose weight changed
    shape or stopped being a constant. Called by the PassManager after every pass.

    >>> keep_sparsity(gm)  # doctest: +SKIP
    {'reapplied': 1, 'dropped': 0}
    """
    reapplied = dropped = 0
    for node in gm.graph.nodes:
        keep = node.meta.get(MASK_META)
        if keep is None:
            continue
        w = effective_weight(node)
        if not isinstance(w, torch.Tensor) or tuple(w.shape) != tuple(keep.shape):
            del node.meta[MASK_META]  # merged away or reshaped: the mask means nothing now
            dropped += 1
            continue
        view = op_of(node)
        stored = view.params.get("weight")
        if stored is not None and bool(((w != 0) & ~keep.to(w.device)).any()):
            zero = torch.zeros((), dtype=w.dtype, device=w.device)
            view.set_param("weight", torch.where(keep.to(w.device), w.detach(), zero))
            reapplied += 1
    if reapplied:
        gm.recompile()
    return {"reapplied": reapplied, "dropped": dropped}
