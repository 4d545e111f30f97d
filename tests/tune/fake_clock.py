"""A fake clock for the tuner's timing: ``fxopt.tune.search.interleave`` replaced by one
that returns chosen per-round times, so that tests of the decision (re-measurement, ties)
do not depend on the load of the machine. Only the clock is fake: builds and accuracy
checks are real."""

from __future__ import annotations

import importlib

from fxopt.bench.timing import Comparison, LatencyStats

search_mod = importlib.import_module("fxopt.tune.search")


def fake_comparison(times_ms: dict[str, list[float]]) -> Comparison:
    per_round = {n: [LatencyStats.from_samples([t / 1e3]) for t in ts]
                 for n, ts in times_ms.items()}
    stats = {n: LatencyStats.from_samples([t / 1e3 for t in ts]) for n, ts in times_ms.items()}
    base = next(iter(times_ms))
    speedups = {n: stats[base].median / s.median for n, s in stats.items()}
    rs = {n: [a.median / b.median for a, b in zip(per_round[base], per_round[n])]
          for n in times_ms}
    return Comparison(base, stats, per_round, speedups, rs, len(times_ms[base]))


def fake_interleave(monkeypatch, first: dict[str, float], again: dict[str, list[float]]):
    calls = []

    def fake(builts, inputs, rounds=5, **kw):
        names = [b.candidate.name for b in builts]
        calls.append(names)
        if len(calls) == 1:
            return fake_comparison({n: [first.get(n, 5.0)] * rounds for n in names})
        return fake_comparison({n: again[n] for n in names})

    monkeypatch.setattr(search_mod, "interleave", fake)
    return calls
