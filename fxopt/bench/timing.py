"""Latency measurement helpers: one callable, several callables side by side, thread count.

Speed is reported as a ratio against a peer measured in the same process and run (see the
Benchmarks section of the design notes). ``compare_latency`` interleaves the candidates
round by round, so that load from other processes on a shared machine hits all of them
alike instead of whichever happened to run during the noisy second.

Example::

    from fxopt.bench import compare_latency, threads

    with threads(2):
        cmp = compare_latency({"eager": model, "fxopt": res.module}, (x,))
    print(cmp.stats["eager"].median_ms, cmp.speedups["fxopt"])

Nothing here asserts anything about the numbers; they are measurements, not checks.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = ["Comparison", "LatencyStats", "compare_latency", "measure_latency", "threads"]


# --------------------------------------------------------------------------- statistics
def _quantile(ordered: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile of an already sorted, non-empty sequence."""
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass(frozen=True)
class LatencyStats:
    """Summary of per-call wall-clock times, in **seconds** (``*_ms`` give milliseconds).

    Example::

        s = LatencyStats.from_samples([0.010, 0.011, 0.012])
        s.median_ms, s.n        # (11.0, 3)
    """

    median: float
    p10: float
    p90: float
    mean: float
    n: int
    samples: tuple[float, ...] = field(default=(), repr=False)

    @classmethod
    def from_samples(cls, samples: Sequence[float]) -> LatencyStats:
        """Summarise raw per-call times (seconds); raises ``ValueError`` when empty."""
        if not samples:
            raise ValueError("LatencyStats needs at least one sample")
        ordered = sorted(float(s) for s in samples)
        return cls(
            median=statistics.median(ordered),
            p10=_quantile(ordered, 0.1),
            p90=_quantile(ordered, 0.9),
            mean=statistics.fmean(ordered),
            n=len(ordered),
            samples=tuple(float(s) for s in samples),
        )

    @property
    def median_ms(self) -> float:
        return self.median * 1e3

    @property
    def p10_ms(self) -> float:
        return self.p10 * 1e3

    @property
    def p90_ms(self) -> float:
        return self.p90 * 1e3

    @property
    def mean_ms(self) -> float:
        return self.mean * 1e3

    def __str__(self) -> str:
        return (f"median {self.median_ms:.3f} ms (p10 {self.p10_ms:.3f}, p90 {self.p90_ms:.3f},"
                f" mean {self.mean_ms:.3f}, n={self.n})")


# --------------------------------------------------------------------------- threads
@contextmanager
def threads(n: int | None) -> Iterator[int]:
    """Run a block with ``torch.set_num_threads(n)``, restoring the previous count after.

    ``None`` leaves the current setting alone (handy for an optional ``--threads`` flag).
    Yields the thread count in effect inside the block.

    Example::

        with threads(1) as n:
            stats = measure_latency(model, (x,))   # single-threaded; n == 1
    """
    previous = torch.get_num_threads()
    if n is not None:
        if n < 1:
            raise ValueError(f"threads(n) needs n >= 1, got {n}")
        torch.set_num_threads(n)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(previous)


# --------------------------------------------------------------------------- measuring
def _as_tuple(inputs: Any) -> tuple:
    if isinstance(inputs, tuple):
        return inputs
    if isinstance(inputs, list):
        return tuple(inputs)
    return (inputs,)


def _sync_for(inputs: tuple) -> Callable[[], None] | None:
    """A CUDA synchronize when any input lives on a GPU (kernels run asynchronously)."""
    if any(isinstance(x, torch.Tensor) and x.is_cuda for x in inputs):
        return torch.cuda.synchronize
    return None


def _check_counts(warmup: int, repeat: int, min_time_s: float) -> None:
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if min_time_s < 0:
        raise ValueError(f"min_time_s must be >= 0, got {min_time_s}")


def _samples(fn: Callable[..., Any], inputs: tuple, warmup: int, repeat: int,
             min_time_s: float, sync: Callable[[], None] | None) -> list[float]:
    """Per-call seconds: ``warmup`` untimed calls, then at least ``repeat`` timed calls and
    at least ``min_time_s`` of timed calls (capped at ``100 * repeat`` calls)."""
    for _ in range(warmup):
        fn(*inputs)
    if sync is not None:
        sync()
    clock = time.perf_counter_ns
    out: list[float] = []
    total_ns, min_ns, cap = 0, int(min_time_s * 1e9), 100 * repeat
    while len(out) < repeat or (total_ns < min_ns and len(out) < cap):
        start = clock()
        fn(*inputs)
        if sync is not None:
            sync()
        elapsed = clock() - start
        total_ns += elapsed
        out.append(elapsed * 1e-9)
    return out


def measure_latency(
    fn: Callable[..., Any],
    inputs: Any,
    *,
    warmup: int = 10,
    repeat: int = 50,
    min_time_s: float = 0.2,
) -> LatencyStats:
    """Time ``fn(*inputs)`` per call under ``torch.inference_mode()``.

    ``warmup`` untimed calls come first (allocator, oneDNN primitive caches, lazy init);
    then at least ``repeat`` timed calls, continuing until ``min_time_s`` seconds of timed
    calls have accumulated (so very fast functions get enough samples), but never more
    than ``100 * repeat`` calls. A lone tensor as ``inputs`` is treated as a 1-tuple.
    When an input is a CUDA tensor every call is followed by ``torch.cuda.synchronize``.

    Example::

        stats = measure_latency(model, (torch.randn(1, 3, 224, 224),), repeat=20)
        print(stats)              # median 12.345 ms (p10 ..., p90 ..., n=...)
        stats.median_ms
    """
    _check_counts(warmup, repeat, min_time_s)
    args = _as_tuple(inputs)
    with torch.inference_mode():
        samples = _samples(fn, args, warmup, repeat, min_time_s, _sync_for(args))
    return LatencyStats.from_samples(samples)


@dataclass(frozen=True)
class Comparison:
    """Result of ``compare_latency``.

    ``stats[name]``: over all samples of every round; ``per_round[name]``: one
    ``LatencyStats`` per round; ``speedups[name]``: baseline median / candidate median over
    all samples (> 1 means faster than the baseline, the baseline itself is 1.0);
    ``round_speedups[name]``: the same ratio computed round by round, whose spread shows how
    much of a difference is noise. ``baseline`` is the first candidate's name.

    Example::

        cmp = compare_latency({"eager": model, "fxopt": gm}, (x,))
        cmp.speedups["fxopt"], min(cmp.round_speedups["fxopt"])
    """

    baseline: str
    stats: dict[str, LatencyStats]
    per_round: dict[str, list[LatencyStats]]
    speedups: dict[str, float]
    round_speedups: dict[str, list[float]]
    rounds: int

    def ratio(self, name: str) -> float:
        """Candidate median / baseline median (time ratio: < 1 means faster)."""
        return 1.0 / self.speedups[name]

    def table(self) -> str:
        """A small text table: name, median/p10/p90 ms, n, speed-up vs the baseline."""
        rows = [("candidate", "median ms", "p10 ms", "p90 ms", "n", f"speed-up vs {self.baseline}")]
        for name, s in self.stats.items():
            rs = self.round_speedups[name]
            rows.append((name, f"{s.median_ms:.3f}", f"{s.p10_ms:.3f}", f"{s.p90_ms:.3f}",
                         str(s.n), f"{self.speedups[name]:.3f} [{min(rs):.3f}-{max(rs):.3f}]"))
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)

    __str__ = table


def _speedup(base: LatencyStats, other: LatencyStats) -> float:
    return base.median / other.median if other.median > 0 else math.inf


def compare_latency(
    candidates: Mapping[str, Callable[..., Any]],
    inputs: Any,
    *,
    rounds: int = 5,
    warmup: int = 10,
    repeat: int = 20,
    min_time_s: float = 0.2,
    round_warmup: int = 1,
) -> Comparison:
    """Time several callables on the same ``inputs``, interleaved round by round.

    Every candidate first gets ``warmup`` untimed calls. Then each of ``rounds`` rounds
    measures every candidate in turn (at least ``repeat`` calls and ``min_time_s`` seconds
    each, after ``round_warmup`` untimed calls that refill caches the other candidate
    evicted); the order is reversed on every other round (AB, BA, AB, ...) so that slow
    drift in machine load does not systematically favour whichever runs first. Everything
    runs under ``torch.inference_mode()``. The first candidate is the baseline.

    Example::

        cmp = compare_latency({"eager": model, "fxopt": res.module}, (x,), rounds=5)
        print(cmp.table())
        cmp.stats["fxopt"].median_ms, cmp.speedups["fxopt"]
    """
    if not candidates:
        raise ValueError("compare_latency needs at least one candidate")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if round_warmup < 0:
        raise ValueError(f"round_warmup must be >= 0, got {round_warmup}")
    _check_counts(warmup, repeat, min_time_s)
    names = list(candidates)
    args = _as_tuple(inputs)
    sync = _sync_for(args)
    per_round: dict[str, list[LatencyStats]] = {n: [] for n in names}
    with torch.inference_mode():
        for name in names:
            _samples(candidates[name], args, warmup, 1, 0.0, sync)
        for r in range(rounds):
            for name in (names if r % 2 == 0 else names[::-1]):
                samples = _samples(candidates[name], args, round_warmup, repeat, min_time_s, sync)
                per_round[name].append(LatencyStats.from_samples(samples))
    stats = {
        n: LatencyStats.from_samples([s for st in per_round[n] for s in st.samples])
        for n in names
    }
    base = names[0]
    speedups = {n: _speedup(stats[base], stats[n]) for n in names}
    round_speedups = {
        n: [_speedup(b, c) for b, c in zip(per_round[base], per_round[n])] for n in names
    }
    return Comparison(base, stats, per_round, speedups, round_speedups, rounds)
