"""Plans: replaying a saved plan on the original model, and searching the ratio that
leaves a fraction of the MACs.

Example::

    removed = replay(chosen_groups, json.load(open("plan.json")))
    ratio, macs = search_ratio(lambda r: macs_after(r), target=0.5)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

from fxopt.errors import PassError
from fxopt.passes.prune.groups import Group, param_key, stored_dim
from fxopt.passes.prune.shrink import indices_by_axis


def load_plan(plan) -> list[dict]:
    """A plan given as a list of group entries, a stats dict holding one, or a JSON file."""
    if isinstance(plan, (str, os.PathLike)):
        path = Path(plan)
        if not path.is_file():
            raise PassError(f"prune: plan file {str(path)!r} does not exist")
        try:
            plan = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise PassError(f"prune: plan file {str(path)!r} is not JSON: {e}") from None
    if isinstance(plan, dict):
        plan = plan.get("plan", plan.get("groups"))
    if not isinstance(plan, list) or not all(isinstance(g, dict) and "members" in g
                                             for g in plan):
        raise PassError("prune: a plan is a list of groups, each with 'members' (as in the "
                        "pass's stats['plan']); got something else")
    return plan


def replay(groups: list[Group], plan: list[dict]) -> list[np.ndarray]:
    """The units to remove from each of ``groups`` so that the shrink removes exactly the
    indices of ``plan``; ``PassError`` when the plan does not describe this model."""
    by_member = {}
    for i, g in enumerate(groups):
        for p in g.params:
            by_member.setdefault((param_key(p), stored_dim(p)), (i, p))
    removed = [np.zeros(0, dtype=np.int64) for _ in groups]
    for entry in plan:
        producer = next((m for m in entry["members"] if m["role"] == "producer"), None)
        hit = by_member.get((producer["param"], producer["dim"])) if producer else None
        if hit is None:
            name = producer["param"] if producer else "(no producer)"
            raise PassError(f"prune plan: group {entry.get('group')} names {name!r}, which "
                            "is no prunable group of this model: the plan was made for "
                            "another model (or with other skip= settings)")
        i, p = hit
        g = groups[i]
        units = []
        for m in entry["members"]:  # a cat's producers each hold some of the units
            mine = [q for q in g.params if param_key(q) == m["param"] and stored_dim(q) == m["dim"]]
            if not mine:
                raise PassError(f"prune plan: member {m['param']} (dim {m['dim']}) is not in "
                                "this model's channel group: made for another model")
            labels = g.units[(mine[0].axis[0].name, mine[0].axis[1])]
            idx = np.asarray(m["indices"], dtype=np.int64)
            if len(idx) and idx.max() >= len(labels):
                raise PassError(f"prune plan: {m['param']} has {len(labels)} channels on dim "
                                f"{m['dim']}, the plan removes index {idx.max()}: made for "
                                "another model")
            units.append(labels[idx])
        units = np.unique(np.concatenate(units)) if units else np.zeros(0, dtype=np.int64)
        by_axis = indices_by_axis(g, units)
        for m in entry["members"]:
            mine = [q for q in g.params if param_key(q) == m["param"] and stored_dim(q) == m["dim"]]
            if not mine or sorted(by_axis[(mine[0].axis[0].name, mine[0].axis[1])].tolist()) \
                    != sorted(m["indices"]):
                raise PassError(f"prune plan: member {m['param']} (dim {m['dim']}) of group "
                                f"{entry.get('group')} does not match this model's channel "
                                "groups: the plan was made for another model")
        removed[i] = units
    return removed


def search_ratio(macs_after: Callable[[float], int], total: int, target: float,
                 tolerance: float = 0.03, steps: int = 14) -> tuple[float, float]:
    """Bisect the ratio whose pruned graph keeps ``target`` of ``total`` MACs; returns
    ``(ratio, achieved fraction)``; ``PassError`` if no ratio gets within ``tolerance``."""
    lo, hi = 0.0, 0.95
    best = (0.0, 1.0)
    for _ in range(steps):
        mid = (lo + hi) / 2
        kept = macs_after(mid) / total
        if abs(kept - target) < abs(best[1] - target):
            best = (mid, kept)
        if abs(kept - target) <= tolerance / 2:
            break
        lo, hi = (mid, hi) if kept > target else (lo, mid)
    smallest = macs_after(0.95) / total if best[1] - target > tolerance else None
    if abs(best[1] - target) > tolerance:
        floor = f"; the most pruning keeps {smallest:.3f}" if smallest is not None else ""
        raise PassError(f"prune: no ratio keeps {target:.3f} of the MACs within "
                        f"{tolerance:.2f} (closest: ratio {best[0]:.3f} keeps "
                        f"{best[1]:.3f}{floor}); ask for a reachable macs=")
    return best
