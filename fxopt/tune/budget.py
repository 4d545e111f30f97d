"""Accuracy budgets for ``fxopt tune``: what a candidate must keep to be considered at all.

A budget is one or more bounds on how far a candidate may drift from the original model:

* ``"cosine>=0.99"``: cosine similarity of the outputs with the original model's, on every
  accuracy batch (the worst batch counts);
* ``"max_rel<=0.05"``: the largest element error relative to the largest reference
  magnitude, on every batch (the worst batch counts);
* a user metric on a validation set, ``metric=fn, max_drop=0.5``: the candidate's metric
  may be at most ``max_drop`` below the original model's (higher is better).

Bounds combine with ``,`` (all must hold): ``"cosine>=0.999,max_rel<=0.1"``.

Example::

    budget = parse_budget("cosine>=0.99")
    check = budget.check({"cosine": 0.985})
    check.ok, check.misses          # (False, {'cosine': 0.005})
    parse_budget(metric=accuracy, max_drop=0.5).describe()   # 'metric drop<=0.5'
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fxopt.errors import SpecError

# measure -> (the comparison it takes, the range its threshold must lie in, what it is)
MEASURES: dict[str, tuple[str, tuple[float, float], str]] = {
    "cosine": (">=", (-1.0, 1.0), "output cosine similarity with the original model"),
    "max_rel": ("<=", (0.0, math.inf), "max |error| / max |reference| of the outputs"),
}
_BOUND = re.compile(r"^\s*([A-Za-z_]\w*)\s*(>=|<=|=>|=<|>|<|==|=)\s*(\S+)\s*$")


@dataclass(frozen=True)
class Bound:
    """One bound: ``measure op threshold`` (``cosine >= 0.99``); ``measure="drop"`` is the
    user metric's drop from the original model's value."""

    measure: str
    op: str
    threshold: float

    def miss(self, value: float) -> float:
        """How far ``value`` is on the wrong side of the threshold (0.0: it holds)."""
        if value is None or not math.isfinite(value):
            return math.inf
        gap = self.threshold - value if self.op == ">=" else value - self.threshold
        return max(gap, 0.0)

    def __str__(self) -> str:
        return f"{self.measure}{self.op}{self.threshold:g}"


@dataclass(frozen=True)
class BudgetCheck:
    """The verdict on one candidate: ``ok``, and per measure by how much it missed."""

    ok: bool
    misses: dict[str, float]
    values: dict[str, float]

    def describe(self) -> str:
        """``"over budget: cosine 0.9812 (needs >= 0.99, short by 0.0088)"``."""
        if self.ok:
            return "within budget"
        return "over budget: " + "; ".join(
            f"{m} {self.values.get(m, math.nan):.6g} (short by {v:.3g})"
            for m, v in self.misses.items())


@dataclass(frozen=True)
class Budget:
    """The accuracy a tuned artifact must keep; see the module docstring.

    ``metric``: the user's metric callable (``fxopt.bench.accuracy.evaluate`` runs it on
    ``val_data``), ``metric_name``: how to show it (``pkg.mod:fn``).

    Example::

        b = Budget((Bound("cosine", ">=", 0.99),))
        b.check({"cosine": 0.995}).ok     # True
    """

    bounds: tuple[Bound, ...]
    metric: Callable[..., float] | None = field(default=None, compare=False)
    metric_name: str | None = None

    @property
    def needs_metric(self) -> bool:
        return any(b.measure == "drop" for b in self.bounds)

    @property
    def max_drop(self) -> float | None:
        return next((b.threshold for b in self.bounds if b.measure == "drop"), None)

    def check(self, values: Mapping[str, float]) -> BudgetCheck:
        """Judge measured ``values`` (``cosine``, ``max_rel``, ``drop``) against every
        bound; a measure that is missing counts as an infinite miss."""
        misses = {}
        for b in self.bounds:
            gap = b.miss(values.get(b.measure))
            if gap > 0:
                misses[b.measure] = gap
        return BudgetCheck(not misses, misses, {k: float(v) for k, v in values.items()
                                                if v is not None})

    def shortfall(self, values: Mapping[str, float]) -> float:
        """One number to rank candidates that all miss: the largest miss, relative to the
        threshold's scale (so cosine and max_rel misses compare)."""
        misses = self.check(values).misses
        return max((v / max(abs(self._bound(m).threshold), 1e-12) for m, v in misses.items()),
                   default=0.0)

    def _bound(self, measure: str) -> Bound:
        return next(b for b in self.bounds if b.measure == measure)

    def describe(self) -> str:
        parts = [str(b) for b in self.bounds if b.measure != "drop"]
        if self.needs_metric:
            parts.append(f"{self.metric_name or 'metric'} drop<={self.max_drop:g}")
        return ",".join(parts)

    def headroom(self, margin: float) -> Budget:
        """The same budget tightened by ``margin`` of each threshold's room (a stricter
        target for a proxy measurement, e.g. the fake-quant graph standing in for the
        artifact): ``cosine>=0.99`` with margin 0.2 -> ``cosine>=0.992``."""
        out = []
        for b in self.bounds:
            if b.measure == "cosine":
                out.append(Bound(b.measure, b.op, b.threshold + (1 - b.threshold) * margin))
            else:
                out.append(Bound(b.measure, b.op, b.threshold * (1 - margin)))
        return Budget(tuple(out), self.metric, self.metric_name)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"text": self.describe()}
        if self.needs_metric:
            out |= {"metric": self.metric_name or "metric", "max_drop": self.max_drop}
        return out


def parse_budget(text: str | Budget | None = None, *, metric: Callable[..., float] | None = None,
                 max_drop: float | None = None, metric_name: str | None = None,
                 val_data: Any = None) -> Budget:
    """Parse ``--budget`` text and/or a user metric with ``max_drop`` into a ``Budget``.

    Raises ``SpecError`` for text it cannot read (unknown measure, a comparison that points
    the wrong way, a threshold outside the measure's range), for ``max_drop`` without a
    metric or a metric without ``max_drop``, and for a metric without ``val_data``.

    Example::

        parse_budget("cosine>=0.99")
        parse_budget("max_rel<=0.05")
        parse_budget(metric=top1, max_drop=0.5, val_data=batches)
    """
    if isinstance(text, Budget):
        if metric is None and max_drop is None:
            return text
        text = text.describe() if not text.needs_metric else None
    bounds: list[Bound] = []
    if text is not None:
        if not isinstance(text, str):
            raise SpecError(f"budget must be text like 'cosine>=0.99', not {type(text).__name__}")
        parts = [p for p in re.split(r",|\band\b", text) if p.strip()]
        if not parts:
            raise SpecError(f"budget {text!r} is empty; {_EXAMPLES}")
        bounds.extend(_parse_bound(p, text) for p in parts)
    if (metric is None) != (max_drop is None):
        missing = "--max-drop (how much the metric may fall)" if max_drop is None else \
            "--metric pkg.mod:fn (the metric that may fall by max_drop)"
        raise SpecError(f"a metric budget needs both a metric and max_drop; add {missing}")
    if metric is not None:
        if not callable(metric):
            raise SpecError(f"metric must be callable, not {type(metric).__name__}")
        if not isinstance(max_drop, (int, float)) or isinstance(max_drop, bool) \
                or not math.isfinite(max_drop) or max_drop < 0:
            raise SpecError(f"max_drop must be a number >= 0, not {max_drop!r}")
        if val_data is None:
            raise SpecError("a metric budget is measured on a validation set: pass val_data= "
                            "(--val-data pkg.mod:fn)")
        bounds.append(Bound("drop", "<=", float(max_drop)))
    if not bounds:
        raise SpecError(f"no budget given; {_EXAMPLES}")
    seen = [b.measure for b in bounds]
    if len(set(seen)) != len(seen):
        raise SpecError(f"budget {text!r} bounds the same measure twice")
    return Budget(tuple(bounds), metric, metric_name or getattr(metric, "__name__", None))


_EXAMPLES = ("use e.g. --budget 'cosine>=0.99' or 'max_rel<=0.05' (measures: "
             + ", ".join(f"{m} ({d})" for m, (_, _, d) in MEASURES.items())
             + "), or --metric pkg.mod:fn --max-drop 0.5 --val-data pkg.mod:fn")


def _parse_bound(part: str, text: str) -> Bound:
    m = _BOUND.match(part)
    if not m:
        raise SpecError(f"budget {text!r}: cannot read {part.strip()!r}; {_EXAMPLES}")
    measure, op, value = m.groups()
    op = {"=>": ">=", "=<": "<=", ">": ">=", "<": "<="}.get(op, op)
    if measure not in MEASURES:
        raise SpecError(f"budget {text!r}: unknown measure {measure!r}; {_EXAMPLES}")
    want, (lo, hi), what = MEASURES[measure]
    if op != want:
        raise SpecError(f"budget {text!r}: {measure} is the {what}, so its bound is "
                        f"'{measure}{want}VALUE', not {op!r}")
    try:
        threshold = float(value)
    except ValueError:
        raise SpecError(f"budget {text!r}: {value!r} is not a number") from None
    if not (lo <= threshold <= hi) or math.isnan(threshold):
        raise SpecError(f"budget {text!r}: {measure} must lie in [{lo:g}, {hi:g}], "
                        f"not {threshold:g}")
    return Bound(measure, op, threshold)


__all__ = ["MEASURES", "Bound", "Budget", "BudgetCheck", "parse_budget"]
