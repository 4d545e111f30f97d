"""Plans: replaying a saved plan on the original model, and searching the ratio that
leaves a fraction of the MACs.

Example::

    removed = replay(chosen_groups, json.load(open("plan.json")))
    ratio, kept, removed = search_ratio(pick, measure, total, 0.5, scores)
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from fxopt.errors import PassError
from fxopt.passes.prune.groups import Group, plan_members
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
    for g in plan:
        for m in g["members"]:
            bad = _bad_member(m)
            if bad:
                raise PassError(f"prune plan: group {g.get('group')}: member "
                                f"{m.get('param') if isinstance(m, dict) else m!r} {bad}")
    return plan


def _bad_member(m) -> str | None:
    """What is wrong with one plan member's fields, or None."""
    if not isinstance(m, dict):
        return "is not an object with param, dim, role and indices"
    if not isinstance(m.get("param"), str):
        return "has no 'param' (a state_dict key)"
    if not isinstance(m.get("dim"), int) or isinstance(m.get("dim"), bool):
        return "has no integer 'dim'"
    if m.get("role") not in ("producer", "consumer", "passthrough"):
        return "has a 'role' other than producer, consumer or passthrough"
    idx = m.get("indices")
    if not isinstance(idx, list) or not all(isinstance(i, int) and not isinstance(i, bool)
                                            for i in idx):
        return "has no list of integer 'indices'"
    return None


def replay(groups: list[Group], plan: list[dict]) -> list[np.ndarray]:
    """The units to remove from each of ``groups`` so that the shrink removes exactly the
    indices of ``plan``; ``PassError`` naming the first member that does not match this
    model (a key it does not have, another group, other indices, an index out of range).

    Members are the user's state_dict keys (``groups.plan_members``), so a plan made after
    ``fold_bn`` (batch norms as passthrough members of their conv) replays on the model
    with or without the fold."""
    members = [{(m.param, m.dim): m for m in plan_members(g)} for g in groups]
    where = {key: i for i, ms in enumerate(members) for key in ms}
    removed = [np.zeros(0, dtype=np.int64) for _ in groups]
    for entry in plan:
        name = f"group {entry.get('group')}"
        hits = {where.get((m["param"], m["dim"])) for m in entry["members"]}
        first = next((m for m in entry["members"] if where.get((m["param"], m["dim"])) is None),
                     None)
        if first is not None:
            raise PassError(f"prune plan: member {first['param']} (dim {first['dim']}) of "
                            f"{name} is not in any prunable channel group of this model: the "
                            "plan was made for another model (or with other skip= / hidden= "
                            "settings)")
        if len(hits) != 1:
            lead = next((m for m in entry["members"] if m["role"] == "producer"),
                        entry["members"][0])
            i = where[(lead["param"], lead["dim"])]
            odd = next(m for m in entry["members"] if where[(m["param"], m["dim"])] != i)
            raise PassError(f"prune plan: member {odd['param']} (dim {odd['dim']}) of {name} "
                            f"is in another channel group of this model than {lead['param']} "
                            f"(dim {lead['dim']}): the plan was made for another model")
        i = hits.pop()
        g, mine = groups[i], members[i]
        units = []
        for m in entry["members"]:  # a cat's producers each hold some of the units
            labels = g.units[mine[(m["param"], m["dim"])].axis]
            idx = np.asarray(m["indices"], dtype=np.int64)
            if len(idx) and (idx.max() >= len(labels) or idx.min() < 0):
                raise PassError(f"prune plan: member {m['param']} (dim {m['dim']}) of {name} "
                                f"has {len(labels)} channels, the plan removes index "
                                f"{idx.max()}: made for another model")
            units.append(labels[idx])
        units = np.unique(np.concatenate(units)) if units else np.zeros(0, dtype=np.int64)
        by_axis = indices_by_axis(g, units)
        for m in entry["members"]:
            if by_axis[mine[(m["param"], m["dim"])].axis].tolist() != sorted(m["indices"]):
                raise PassError(f"prune plan: member {m['param']} (dim {m['dim']}) of {name} "
                                "removes other channels than its group's other members do in "
                                "this model: the plan was made for another model")
        removed[i] = units
    return removed


def search_ratio(pick: Callable[[float], list[np.ndarray]],
                 measure: Callable[[list[np.ndarray]], int], total: int, target: float,
                 scores: list[np.ndarray], tolerance: float = 0.03, steps: int = 14,
                 refine: Refine | None = None) -> tuple[float, float, list[np.ndarray]]:
    """The units to remove so that the pruned graph keeps ``target`` of ``total`` MACs:
    ``(ratio, achieved fraction, removed units per group)``. ``pick(ratio)`` gives the
    units per group for a ratio, ``measure(removed)`` the MACs left.

    First the ratio is bisected. Rounding (``round_to``) makes many groups' kept counts
    jump at once, so the MACs can step over the target; then the gap is closed group by
    group (``close_gap``) between the last ratio above the target and the first below,
    and, with ``refine``, one rounding step of one group at a time from there.
    ``PassError`` if nothing gets within ``tolerance``.

    Example::

        ratio, kept, removed = search_ratio(pick, measure, total, 0.5, scores)
    """
    lo, hi = (0.0, 1.0, pick(0.0)), None  # (ratio, kept, removed): above / below target
    a, b = 0.0, 0.95
    best = lo
    for _ in range(steps):
        mid = (a + b) / 2
        removed = pick(mid)
        kept = measure(removed) / total
        if abs(kept - target) < abs(best[1] - target):
            best = (mid, kept, removed)
        if abs(kept - target) <= tolerance / 2:
            return best
        if kept > target:
            a, lo = mid, (mid, kept, removed)
        else:
            b, hi = mid, (mid, kept, removed)
    if hi is None:
        removed = pick(0.95)
        hi = (0.95, measure(removed) / total, removed)
        best = min((best, hi), key=lambda c: abs(c[1] - target))
    if hi[1] < target:  # a bracket: close the gap group by group
        above, mixed = close_gap(lo, hi, measure, total, target, scores, tolerance)
        best = min((best, mixed), key=lambda c: abs(c[1] - target))
        if refine is not None and abs(best[1] - target) > tolerance / 2:
            stepped = refine.step_down(above, measure, total, target, scores, tolerance)
            best = min((best, stepped), key=lambda c: abs(c[1] - target))
    if abs(best[1] - target) > tolerance:
        floor = f"; the most pruning keeps {hi[1]:.3f}" if hi[1] > target else ""
        raise PassError(f"prune: no ratio keeps {target:.3f} of the MACs within "
                        f"{tolerance:.2f} (closest: ratio {best[0]:.3f} keeps "
                        f"{best[1]:.3f}{floor}); ask for a reachable macs=")
    return best


def close_gap(lo: tuple, hi: tuple, measure: Callable[[list[np.ndarray]], int], total: int,
              target: float, scores: list[np.ndarray],
              tolerance: float = 0.03) -> tuple[tuple, tuple]:
    """Between two selections ``lo`` (keeps more than ``target``) and ``hi`` (less), each
    ``(ratio, kept, removed)`` with ``lo``'s units a subset of ``hi``'s in every group: take
    ``hi``'s extra units (one rounding step, at the end of a bisection) in some groups only,
    least important extra units first (their mean score over the group's mean), bisecting
    how many groups take them. The MACs fall with every group that does, so the crossing
    is found in log2(groups) measurements. Returns the last selection above ``target`` and
    the one closest to it.

    Example::

        above, closest = close_gap(lo, hi, measure, total, 0.5, scores)
    """
    diff = [i for i, (x, y) in enumerate(zip(lo[2], hi[2], strict=True)) if len(x) != len(y)]

    def cost(i: int) -> float:
        extra = np.setdiff1d(hi[2][i], lo[2][i])
        return _relative(scores[i], extra)

    order = sorted(diff, key=cost)

    def mix(k: int) -> list[np.ndarray]:
        take = set(order[:k])
        return [y if i in take else x for i, (x, y) in enumerate(zip(lo[2], hi[2],
                                                                     strict=True))]

    a, b = 0, len(order)  # kept(a) > target > kept(b)
    best, above = min((lo, hi), key=lambda c: abs(c[1] - target)), lo
    while b - a > 1:
        k = (a + b) // 2
        trial = (lo[0], measure(mix(k)) / total, mix(k))
        best = min((best, trial), key=lambda c: abs(c[1] - target))
        if abs(trial[1] - target) <= tolerance / 2:
            break
        if trial[1] > target:
            a, above = k, trial
        else:
            b = k
    return above, best


def _relative(s, units) -> float:
    """Mean score of ``units`` over the group's mean score (0 for none)."""
    s = np.asarray(s, dtype=float)
    return float(s[units].mean() / (s.mean() + 1e-12)) if len(units) else 0.0


@dataclass
class Refine:
    """One rounding step of one group at a time: ``next_count(i, count)`` is the number of
    units group ``i`` removes after one more rounding step from ``count`` (``None``: none
    left under ``max_layer_ratio`` / the last unit), ``take(counts)`` the units for a count
    per group, ``orders[i]`` group ``i``'s units in the order they go."""

    next_count: Callable[[int, int], int | None]
    take: Callable[[list[int]], list[np.ndarray]]
    orders: list[np.ndarray]

    def step_down(self, start: tuple, measure: Callable[[list[np.ndarray]], int], total: int,
                  target: float, scores: list[np.ndarray],
                  tolerance: float = 0.03) -> tuple[float, float, list[np.ndarray]]:
        """From ``start`` (above ``target``), take one more rounding step in the group whose
        next units matter least, keeping each step that stays above ``target -
        tolerance / 2`` and dropping for good the groups whose step falls below it (the MACs
        only fall from there), until within ``tolerance / 2`` or no step is left.

        Example::

            ratio, kept, removed = refine.step_down(above, measure, total, 0.5, scores)
        """
        counts = [len(r) for r in start[2]]
        best = cur = start
        dropped: set[int] = set()
        while abs(cur[1] - target) > tolerance / 2:
            moves = []
            for i, c in enumerate(counts):
                nxt = None if i in dropped else self.next_count(i, c)
                if nxt is not None and nxt > c:
                    moves.append((_relative(scores[i], self.orders[i][c:nxt]), i, nxt))
            if not moves:
                break
            _, i, nxt = min(moves)
            trial_counts = counts[:i] + [nxt] + counts[i + 1:]
            removed = self.take(trial_counts)
            trial = (start[0], measure(removed) / total, removed)
            best = min((best, trial), key=lambda c: abs(c[1] - target))
            if trial[1] >= target - tolerance / 2:
                counts, cur = trial_counts, trial
            else:
                dropped.add(i)
        return best
