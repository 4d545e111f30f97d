"""fxopt.bench: the structure of the results (never the timings), thread restore, and a
smoke run of benchmarks/latency.py that leaves RESULTS.md alone."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from fxopt.bench import Comparison, LatencyStats, compare_latency, measure_latency, threads

ROOT = Path(__file__).resolve().parents[2]


def _tiny() -> tuple[nn.Module, tuple]:
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU()).eval(), (torch.randn(2, 8),)


def _check_stats(s: LatencyStats, n: int | None = None) -> None:
    assert isinstance(s, LatencyStats)
    if n is not None:
        assert s.n == n
    assert len(s.samples) == s.n >= 1
    assert all(t > 0 for t in s.samples)
    assert s.p10 <= s.median <= s.p90
    assert min(s.samples) <= s.mean <= max(s.samples)
    assert s.median_ms == pytest.approx(s.median * 1e3)
    assert "median" in str(s)


def test_measure_latency_structure():
    model, inputs = _tiny()
    s = measure_latency(model, inputs, warmup=1, repeat=3, min_time_s=0.0)
    _check_stats(s, n=3)


def test_measure_latency_runs_under_inference_mode_and_accepts_a_lone_tensor():
    seen = []

    def fn(x):
        seen.append(torch.is_inference_mode_enabled())
        return x + 1

    s = measure_latency(fn, torch.ones(2), warmup=2, repeat=2, min_time_s=0.0)
    assert s.n == 2 and len(seen) == 4 and all(seen)


def test_measure_latency_min_time_adds_samples_up_to_the_cap():
    s = measure_latency(lambda: None, (), warmup=0, repeat=2, min_time_s=60.0)
    assert s.n == 200  # 100 * repeat: a trivial function never reaches 60 s


def test_latency_stats_quantiles():
    s = LatencyStats.from_samples([5.0, 1.0, 3.0, 2.0, 4.0])
    assert (s.median, s.p10, s.p90, s.mean, s.n) == (3.0, pytest.approx(1.4),
                                                     pytest.approx(4.6), 3.0, 5)
    assert s.samples == (5.0, 1.0, 3.0, 2.0, 4.0)  # call order kept
    with pytest.raises(ValueError):
        LatencyStats.from_samples([])


def test_compare_latency_structure_and_interleaving():
    model, inputs = _tiny()
    order = []

    def named(name):
        def fn(*args):
            order.append(name)
            return model(*args)
        return fn

    cmp = compare_latency({"a": named("a"), "b": named("b")}, inputs, rounds=3, warmup=1,
                          repeat=2, min_time_s=0.0, round_warmup=0)
    assert isinstance(cmp, Comparison)
    assert cmp.baseline == "a" and cmp.rounds == 3
    assert list(cmp.stats) == ["a", "b"]
    for name in ("a", "b"):
        _check_stats(cmp.stats[name], n=6)
        assert len(cmp.per_round[name]) == 3
        for s in cmp.per_round[name]:
            _check_stats(s, n=2)
        assert len(cmp.round_speedups[name]) == 3
    assert cmp.speedups["a"] == 1.0 and cmp.round_speedups["a"] == [1.0] * 3
    assert cmp.speedups["b"] == pytest.approx(cmp.stats["a"].median / cmp.stats["b"].median)
    assert cmp.ratio("b") == pytest.approx(1 / cmp.speedups["b"])
    # warm-up (1 + 1 discarded timed call each), then rounds AB, BA, AB of 2 calls each
    assert order == ["a", "a", "b", "b"] + ["a"] * 2 + ["b"] * 4 + ["a"] * 4 + ["b"] * 2
    assert "speed-up vs a" in cmp.table()


def test_compare_latency_rejects_bad_arguments():
    model, inputs = _tiny()
    with pytest.raises(ValueError):
        compare_latency({}, inputs)
    with pytest.raises(ValueError):
        compare_latency({"m": model}, inputs, rounds=0)
    with pytest.raises(ValueError):
        measure_latency(model, inputs, repeat=0)


def test_threads_sets_and_restores():
    before = torch.get_num_threads()
    with threads(1) as n:
        assert n == 1 == torch.get_num_threads()
    assert torch.get_num_threads() == before
    with threads(None) as n:
        assert n == before
    with pytest.raises(RuntimeError), threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_latency_script_smoke():
    results = ROOT / "benchmarks" / "RESULTS.md"
    before = results.read_bytes() if results.exists() else None
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run(
        # two models: each is measured in its own child process, as in the full run
        [sys.executable, str(ROOT / "benchmarks" / "latency.py"), "--models", "mlp,mlp",
         "--quick", "--no-write", "--threads", "1"],
        capture_output=True, text=True, env=env, timeout=300, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("| mlp | symbolic | 4 | 1 |") == 2
    assert "speed-up" in proc.stdout
    after = results.read_bytes() if results.exists() else None
    assert after == before
