"""The ``prune`` pass: structured channel / head pruning, checked against the masked twin.

Example::

    res = fxopt.optimize(model, (x,), "prune(ratio=0.5)")
    plan = res.report.records[-1].stats["plan"]     # JSON: per group, members and indices
"""

from __future__ import annotations

import copy
import time

from fxopt.errors import PassError
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass
from fxopt.passes.prune.groups import groups
from fxopt.passes.prune.shrink import score, select, shrink
from fxopt.passes.prune.twin import check_twin, zero_consumers


@register_pass("prune", Semantics.CHANGES)
def prune(gm, ctx: PassContext, *, ratio: float = 0.5, importance: str = "l1",
          scope: str = "local", round_to: int | None = None, max_layer_ratio: float = 1.0,
          skip: list[str] | None = None, seed: int = 0) -> PassResult:
    """Remove ``ratio`` of the channels of every prunable group (heads, MLP width, conv
    channels), ranked by ``importance`` (l1, l2, bn_scale, random), per group
    (``scope=local``) or across groups (``global``); kept counts are multiples of
    ``round_to``; no group loses more than ``max_layer_ratio``; ``skip`` names layers to
    leave whole. The result is verified against its masked twin.

    Example::

        fxopt.optimize(model, (x,), "prune(ratio=0.5,importance=l2,round_to=8)")
    """
    if not isinstance(ratio, (int, float)) or not 0 <= ratio < 1:
        raise PassError(f"prune: ratio must be in [0, 1), not {ratio!r}")
    if not 0 < max_layer_ratio <= 1:
        raise PassError(f"prune: max_layer_ratio must be in (0, 1], not {max_layer_ratio!r}")
    if round_to is not None and (not isinstance(round_to, int) or round_to < 1):
        raise PassError(f"prune: round_to must be a positive integer, not {round_to!r}")
    if isinstance(skip, str):
        skip = [skip]
    start = time.perf_counter()
    found = groups(gm, skip=skip)
    refused = [{"group": g.id, "members": [m.param for m in g.members][:4],
                "reasons": g.reasons or ["a single channel unit"]}
               for g in found if not g.prunable]
    chosen = [g for g in found if g.prunable]
    if not chosen:
        why = "; ".join(f"group {r['group']} ({', '.join(r['members'][:2])}): "
                        f"{r['reasons'][0]}" for r in refused[:8])
        raise PassError(f"prune: nothing in this model can be pruned exactly: {why}")
    scores = score(chosen, gm, importance, seed)
    removed = select(chosen, scores, ratio=ratio, scope=scope, round_to=round_to,
                     max_layer_ratio=max_layer_ratio)
    stats = {"groups": len(found), "prunable": len(chosen), "refused": refused}
    if not any(len(r) for r in removed):
        return PassResult(gm, False, stats | {"plan": []})
    twin = copy.deepcopy(gm)
    plan = shrink(gm, chosen, removed)
    seconds = time.perf_counter() - start
    zero_consumers(twin, plan)
    error = check_twin(gm, twin, tuple(ctx.example_inputs))
    before = sum(p["units"] for p in plan)
    stats |= {"plan": plan, "twin_error": error, "seconds": seconds,
              "units_removed": sum(len(r) for r in removed), "units_in_pruned_groups": before}
    return PassResult(gm, True, stats)
