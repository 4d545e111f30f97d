"""The ``prune`` pass: structured channel / head pruning, checked against the masked twin.

Example::

    res = fxopt.optimize(model, (x,), "prune(ratio=0.5)")
    plan = res.report.records[-1].stats["plan"]     # JSON: per group, members and indices
    fxopt.optimize(model, (x,), "prune(plan='plan.json')")   # the same pruned graph
"""

from __future__ import annotations

import time

import numpy as np
import torch

import fxopt.progress
from fxopt.errors import PassError
from fxopt.graph_utils import annotate, copy_graph_module
from fxopt.ops import _set_path, fetch_attr
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass
from fxopt.passes.prune.attention import decompose_attention
from fxopt.passes.prune.groups import graph_path, groups, param_key
from fxopt.passes.prune.plan import Refine, load_plan, replay, search_ratio
from fxopt.passes.prune.report import layer_counts, layer_report, totals
from fxopt.passes.prune.shrink import (
    indices_by_axis,
    next_drop,
    score,
    select,
    shrink,
    tensor_of,
)
from fxopt.passes.prune.taylor import calibration_batches
from fxopt.passes.prune.twin import check_twin, zero_consumers


def _macs(gm) -> int:
    from fxopt.manager import graph_stats  # the manager imports the passes

    return graph_stats(gm)[2]


@register_pass("prune", Semantics.CHANGES)
def prune(gm, ctx: PassContext, *, ratio: float = 0.5, macs: float | None = None,
          importance: str = "l1", scope: str = "local", round_to: int | str | None = "auto",
          max_layer_ratio: float = 1.0, skip: list[str] | None = None, plan=None,
          seed: int = 0, hidden: bool = False, steps: int = 1) -> PassResult:
    """Remove ``ratio`` of the channels of every prunable group (heads, MLP width, conv
    channels), or the ratio that keeps ``macs`` of the MACs, ranked by ``importance`` (l1,
    l2, bn_scale, random), per group (``scope=local``) or across groups (``global``); kept
    counts are multiples of ``round_to`` (``"auto"``, the default: of 8 channels in groups
    of at least 64, ``shrink.multiple_of``; 1: no rounding); no group loses more than
    ``max_layer_ratio``;
    ``skip`` names layers to leave whole; ``plan`` replays a saved plan; ``hidden=True``
    also prunes the residual / embedding width under LayerNorm / RMSNorm (plan entries
    ``"exact": false``). The result is verified against its masked twin (exact groups;
    non-exact ones are shrunk in the twin too, so they are checked only to run).

    ``importance=taylor`` ranks by ``|w * dL/dw|`` over the ``calibration=`` batches
    (``fxopt.passes.prune.taylor``: the loss is the outputs' squared norm). ``steps=N``
    prunes in N steps of ``ratio / N``, masking the removed units of a private copy and
    re-ranking between steps; the plan is the cumulative one in the original numbering,
    applied as one shrink and checked against its masked twin. With ``macs=``, the ratio
    for the target is searched once (one-shot ranking), then the N steps run to it;
    ``stats["macs_kept"]`` is what the pruned graph keeps, next to ``macs_target``.

    Example::

        fxopt.optimize(model, (x,), "prune(ratio=0.5,importance=l2,round_to=8)")
        fxopt.optimize(model, (x,), "prune(macs=0.5)")
        fxopt.optimize(model, (x,), "prune(ratio=0.5,importance=taylor,steps=3)",
                       calibration=batches)
        fxopt.optimize(model, (x,), "prune(macs=0.5,steps=3)")
    """
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PassError(f"prune: ratio must be in [0, 1), not {ratio!r}")
    if macs is not None and (not isinstance(macs, (int, float)) or not 0 < macs < 1):
        raise PassError(f"prune: macs is the fraction of MACs to keep, in (0, 1), not {macs!r}")
    if not 0 < max_layer_ratio <= 1:
        raise PassError(f"prune: max_layer_ratio must be in (0, 1], not {max_layer_ratio!r}")
    if round_to is not None and round_to != "auto" and (
            not isinstance(round_to, int) or isinstance(round_to, bool) or round_to < 1):
        raise PassError(f"prune: round_to must be 'auto' or a positive integer (1: no "
                        f"rounding), not {round_to!r}")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise PassError(f"prune: steps must be a positive integer, not {steps!r}")
    if isinstance(skip, str):
        skip = [skip]
    if not isinstance(hidden, bool):
        raise PassError(f"prune: hidden must be True or False, not {hidden!r}")
    saved = load_plan(plan) if plan is not None else None
    asked = ratio
    start = time.perf_counter()
    original = gm
    gm, decomposed, whole = decompose_attention(gm, tuple(ctx.example_inputs))
    found = groups(gm, skip=skip, hidden=hidden)
    refused = [{"group": g.id, "members": [m.param for m in g.members][:4],
                "reasons": g.reasons or ["a single channel unit"]}
               for g in found if not g.prunable]
    chosen = [g for g in found if g.prunable]
    if not chosen:
        why = "; ".join(f"group {r['group']} ({', '.join(r['members'][:2])}): "
                        f"{r['reasons'][0]}" for r in refused[:8])
        raise PassError(f"prune: nothing in this model can be pruned exactly: {why}")
    stats = {"groups": len(found), "prunable": len(chosen), "refused": refused}
    if decomposed or whole:
        stats["attention"] = {"decomposed": decomposed, "kept_whole": whole}
    shown = ctx.options.get("progress")
    batches = None
    if importance == "taylor" and saved is None:
        batches = calibration_batches(ctx.calibration, len(ctx.example_inputs))

    def rank(gs, module):
        return score(gs, module, importance, seed, batches, shown)

    scores = rank(chosen, gm) if saved is None and (steps == 1 or macs is not None) else None

    def pick(r: float, s=None, counts=None):
        return select(chosen, scores if s is None else s, ratio=r, scope=scope,
                      round_to=round_to, max_layer_ratio=max_layer_ratio, counts=counts)

    total = _macs(gm) if macs is not None else None
    if saved is None and macs is not None:  # the one-shot ratio for the target, found once

        def measure(removed) -> int:
            trial = copy_graph_module(gm)  # same node names, so the same groups in order
            shrink(trial, [g for g in groups(trial, skip=skip, hidden=hidden) if g.prunable],
                   removed)
            return _macs(annotate(trial, tuple(ctx.example_inputs)))

        refine = Refine(  # one rounding step of one group at a time, if the ratio is coarse
            lambda i, c: next_drop(chosen[i], c, round_to, max_layer_ratio),
            lambda counts: pick(0.0, counts=counts),
            [np.argsort(s, kind="stable") for s in scores])
        ratio, kept, searched = search_ratio(pick, measure, total, macs, scores, refine=refine)
        stats |= {"ratio": ratio, "macs_target": macs, "macs_kept_search": kept}
        counts = [len(r) for r in searched]  # per group: the search may mix ratios
    if saved is not None:
        removed = replay(chosen, saved)
    elif steps > 1:  # the N-step schedule to that ratio, re-ranking in between
        final = counts if macs is not None and scope == "local" else None
        removed, per_step = _iterate(gm, chosen, skip, hidden, ratio, steps, rank, pick, shown,
                                     final)
        stats |= {"steps": steps, "units_removed_per_step": per_step}
    elif macs is not None:
        removed = searched
    else:
        removed = pick(ratio)
    if not any(len(r) for r in removed):
        return PassResult(original, False, stats | {"plan": []})
    copied = time.perf_counter()
    twin = copy_graph_module(gm)  # verification and the report, not counted in ``seconds``
    layers_before, totals_before = layer_counts(original), totals(original)  # as given
    widths = _producer_widths(gm, chosen)
    start += time.perf_counter() - copied
    done = shrink(gm, chosen, removed)
    seconds = time.perf_counter() - start
    approx = _shrink_inexact(twin, chosen, removed, skip)
    zero_consumers(twin, done, key="attr")
    error = check_twin(gm, twin, tuple(ctx.example_inputs))
    annotate(gm, tuple(ctx.example_inputs))  # shapes after the shrink, for the MACs
    if macs is not None:  # what the pruned graph keeps (steps= may pick other channels)
        stats["macs_kept"] = _macs(gm) / total
        if abs(stats["macs_kept"] - macs) > 0.03:
            stats["macs_note"] = (
                f"keeps {stats['macs_kept']:.3f} of the MACs for a target of {macs:.3f}: "
                f"the {steps} steps re-ranked channels into other layers than the one-shot "
                "search at that ratio (scope=local keeps the per-layer counts)")
    report = layer_report(layers_before, layer_counts(gm), _kept(widths, done), totals_before,
                          totals(gm))
    units = sum(g.n_units for g in chosen)
    report["target"] = {"ratio": None if saved is not None else asked, "macs": macs,
                        "plan": saved is not None, "ratio_used": ratio if saved is None else None}
    report["achieved"]["channels_removed"] = round(sum(len(r) for r in removed) / units, 4)
    report["not_exact"] = [_inexact_entry(g, entry) for g, entry in
                           zip([g for g, r in zip(chosen, removed, strict=True) if len(r)],
                               done, strict=True) if not g.exact]
    inexact_layers = {x for e in report["not_exact"] for x in e["layers"]}
    for row in report["layers"]:
        row["exact"] = row["layer"] not in inexact_layers
    stats |= {"plan": done, "twin_error": error, "seconds": seconds, "report": report,
              "units_removed": sum(len(r) for r in removed),
              "units_in_pruned_groups": sum(p["units"] for p in done)}
    if approx:
        stats["not_exact"] = {
            "groups": approx,
            "note": "hidden=True: these groups sit under LayerNorm / RMSNorm statistics, so "
                    "the pruned model is not exact; the masked-twin check covers the exact "
                    "groups only (these are shrunk in the twin too, so they are verified only "
                    "to run with consistent shapes)"}
    return PassResult(gm, True, stats)


def _inexact_entry(group, entry: dict) -> dict:
    """The report's line for a group pruned with ``hidden=True``: its layers and why it is
    not exact."""
    order = {"producer": 0, "passthrough": 1, "consumer": 2}
    members = sorted(entry["members"], key=lambda m: order[m["role"]])
    layers = list(dict.fromkeys(m["param"].rpartition(".")[0] or m["param"] for m in members))
    return {"group": entry["group"], "layers": layers, "removed_units": entry["removed_units"],
            "units": entry["units"], "reason": group.inexact[0]}


def _shrink_inexact(twin, chosen, removed, skip) -> list[int]:
    """Shrink the non-exact groups of ``chosen`` in ``twin`` (a copy of the graph made
    before the shrink: same node names, so the same groups in order), so that the twin
    differs from the pruned graph only by the exact groups' masked consumers. Returns the
    non-exact group ids."""
    ids = [i for i, (g, r) in enumerate(zip(chosen, removed, strict=True))
           if not g.exact and len(r)]
    if not ids:
        return []
    mine = [g for g in groups(twin, skip=skip, hidden=True) if g.prunable]
    shrink(twin, [mine[i] for i in ids], [removed[i] for i in ids])
    return [chosen[i].id for i in ids]


def _iterate(gm, chosen, skip, hidden, ratio, steps, rank, pick, progress, final=None):
    """The cumulative units removed after ``steps`` steps to ``ratio``: each step ranks a
    masked copy (the units removed so far zeroed in every member), keeps them removed and
    removes more up to ``ratio * k / steps`` (the last step: ``final`` units per group when
    given, a MAC search's counts); returns the units per group and how many each step
    added."""
    work = copy_graph_module(gm)  # same node names, so the same groups in order
    mirror = [g for g in groups(work, skip=skip, hidden=hidden) if g.prunable]
    if [g.n_units for g in mirror] != [g.n_units for g in chosen]:
        raise PassError("prune: steps= found other channel groups on a copy of the graph; "
                        "report it with the model, or use steps=1")
    removed = [np.zeros(0, dtype=np.int64) for _ in chosen]
    per_step = []
    for k in fxopt.progress.bar(range(1, steps + 1), "prune steps", unit="step",
                                progress=progress):
        scores = [np.asarray(s, dtype=float).copy() for s in rank(mirror, work)]
        for s, r in zip(scores, removed, strict=True):
            s[r] = -1.0  # every importance is >= 0: what is gone stays first in line
        new = (pick(ratio, scores, final) if k == steps and final is not None
               else pick(ratio if k == steps else ratio * k / steps, scores))
        before = sum(len(r) for r in removed)
        removed = [np.union1d(a, b).astype(np.int64) for a, b in zip(removed, new, strict=True)]
        per_step.append(sum(len(r) for r in removed) - before)
        for g, units in zip(mirror, removed, strict=True):
            _mask(work, g, units)
    return removed, per_step


def _mask(module, group, units) -> None:
    """Zero, in ``module``, every member slice (producer, consumer, passthrough) of
    ``units``: the masked model computes what the model with them removed computes."""
    if not len(units):
        return
    by_axis = indices_by_axis(group, units)
    for p in group.params:
        idx = by_axis[(p.axis[0].name, p.axis[1])]
        path = graph_path(p)
        t = fetch_attr(module, path) if len(idx) else None
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            fill = torch.as_tensor(idx, dtype=torch.long)
            _set_path(module, path, t.detach().clone().index_fill_(p.dim, fill, 0))


def _producer_widths(gm, chosen) -> dict[tuple[str, int], int]:
    """Size of every producer tensor's channel dim before the shrink, by (state_dict key,
    dim)."""
    out = {}
    for g in chosen:
        for p in g.params:
            t = tensor_of(gm, p) if p.role == "producer" else None
            if t is not None:
                out.setdefault((param_key(p), p.dim), int(t.shape[p.dim]))
    return out


def _kept(widths: dict[tuple[str, int], int], plan: list[dict]) -> dict[str, tuple[int, int]]:
    """(channels before, channels kept) per layer whose output channels were pruned: the
    producer weight's dim (its bias gives the same numbers)."""
    out: dict[str, tuple[int, int]] = {}
    for entry in plan:
        for m in entry["members"]:
            width = widths.get((m["param"], m["dim"]))
            if m["role"] != "producer" or width is None:
                continue
            layer = m["param"].rpartition(".")[0] or m["param"]
            before, kept = out.get(layer, (0, 0))
            if not before or m["param"].endswith("weight"):
                out[layer] = (width, width - len(m["indices"]))
    return out
