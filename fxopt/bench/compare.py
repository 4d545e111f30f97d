"""Every candidate side by side: build each (failures become rows), check its outputs
against the reference model, time them all in one interleaved run with the same threads
and batch, and report median, spread, speed-up over PyTorch eager, accuracy, size, memory
and build time.

Example::

    import fxopt.bench

    res = fxopt.bench.compare(model, (x,), rounds=5, threads=2, out_dir="bench-out")
    print(res.table())
    res.to_json("bench-out/bench.json"); res.plot("bench-out/bench.png")
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxopt.bench.accuracy import agreement, evaluate, split_batch
from fxopt.bench.candidates import (
    Built,
    Candidate,
    build,
    default_candidates,
    error_text,
    with_batch,
)
from fxopt.bench.report import BenchResult, Row
from fxopt.bench.timing import Comparison, LatencyStats, compare_latency, threads
from fxopt.errors import SpecError

__all__ = ["compare", "interleave", "measure", "select_candidates"]

# one timed round per candidate: at least REPEAT calls and MIN_TIME_S seconds
REPEAT, MIN_TIME_S = 5, 0.05


def interleave(builts: Sequence[Built], inputs: Sequence[Any], *, rounds: int = 5,
               warmup: int = 3, threads: int | None = None, repeat: int = REPEAT,
               min_time_s: float = MIN_TIME_S) -> Comparison | None:
    """``compare_latency`` over the built candidates that work (``None`` if none does):
    every candidate warmed up, then ``rounds`` rounds in alternating order, under
    ``threads`` torch threads (ONNX Runtime's come from each session, see ``build``).
    The first working candidate is the ``Comparison``'s baseline.

    Example::

        cmp = interleave(builts, (x,), rounds=5)
        cmp.round_speedups["ort-fxopt-int8"]      # the spread the noise allows
    """
    fns = {b.candidate.name: b.fn for b in builts if b.ok}
    if not fns:
        return None
    with _threads(threads):
        return compare_latency(fns, tuple(inputs), rounds=rounds, warmup=warmup,
                               repeat=repeat, min_time_s=min_time_s)


def measure(builts: Sequence[Built], inputs: Sequence[Any], *, rounds: int = 5,
            warmup: int = 3, threads: int | None = None) -> dict[str, LatencyStats]:
    """Per-call latency of every working built candidate, measured interleaved (see
    ``interleave``): ``{name: LatencyStats}`` over all rounds' samples.

    Example::

        stats = measure(builts, (x,), rounds=3)
        stats["torch"].median_ms
    """
    cmp = interleave(builts, inputs, rounds=rounds, warmup=warmup, threads=threads)
    return {} if cmp is None else dict(cmp.stats)


def _threads(n: int | None):
    return threads(n)


def select_candidates(model: nn.Module, inputs: Sequence[Any],
                      candidates: Sequence[Candidate | str] | None, *, compile: bool = False,
                      calibration: Sequence | None = None) -> list[Candidate]:
    """The candidates to run: ``None`` gives ``default_candidates``; names pick from them
    (``torch.compile`` included); ``Candidate`` objects are taken as they are. An unknown
    or repeated name raises ``SpecError`` listing the known ones.

    Example::

        select_candidates(model, (x,), ["torch", "ort-plain"])
    """
    defaults = default_candidates(model, inputs, compile=compile, calibration=calibration)
    if candidates is None:
        return defaults
    known = {c.name: c for c in default_candidates(model, inputs, compile=True,
                                                   calibration=calibration)}
    out: list[Candidate] = []
    for c in candidates:
        if isinstance(c, str):
            if c not in known:
                raise SpecError(f"unknown candidate {c!r}; known candidates: "
                                f"{', '.join(known)}")
            c = known[c]
        elif not isinstance(c, Candidate):
            raise SpecError(f"a candidate is a name or a fxopt.bench.Candidate, got "
                            f"{type(c).__name__}")
        if any(o.name == c.name for o in out):
            raise SpecError(f"candidate {c.name!r} is listed twice")
        out.append(c)
    if not out:
        raise SpecError("no candidates to compare; name at least one, e.g. torch,ort-plain")
    return out


def _call(fn: Callable[..., Any], inputs: tuple) -> Any:
    with torch.inference_mode():
        return fn(*inputs)


def _load_average() -> float | None:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else None


def compare(
    model: nn.Module,
    inputs: Sequence[Any],
    candidates: Sequence[Candidate | str] | None = None,
    *,
    rounds: int = 5,
    warmup: int = 3,
    threads: int | None = None,
    batch: int | None = None,
    val_data: Iterable | None = None,
    metric: Callable[[Any, Any], float] | None = None,
    calibration: Sequence | None = None,
    out_dir: str | os.PathLike | None = None,
    compile: bool = False,
    name: str | None = None,
    progress: Callable[[str], None] | None = None,
) -> BenchResult:
    """Build and measure ``candidates`` (default: ``default_candidates``) side by side.

    All of it runs under ``threads`` torch threads, and every ONNX Runtime session gets the
    same number of intra-op threads (default: torch's current count). ``batch`` resizes
    the example inputs first (rows repeated). Accuracy is each candidate's agreement with
    the model on the inputs (cosine, max relative error) and, with ``val_data`` (batches of
    ``(inputs, target)``) and ``metric(outputs, target) -> float`` (higher is better), the
    metric on it. ``calibration``: batches for the static int8 candidates (default: random
    batches like the inputs). Timing: ``warmup`` calls each, then ``rounds`` interleaved
    rounds; median and p10/p90 per call, speed-up = torch median / candidate median with
    the per-round min/max, the noise in ``BenchResult.noise``. With ``out_dir`` the
    artifacts are kept in ``out_dir/artifacts`` and bench.json, bench.png and table.txt
    are written there.

    Example::

        res = compare(model, (x,), ["torch", "ort-plain", "ort-fxopt-int8"], rounds=3)
        res.row("ort-fxopt-int8").speedup, res.row("ort-fxopt-int8").cosine
    """
    if rounds < 1 or warmup < 0:
        raise SpecError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    if (val_data is None) != (metric is None):
        raise SpecError("val_data and metric go together: pass both or neither")
    if threads is not None and threads < 1:
        raise SpecError(f"threads must be >= 1, got {threads}")
    say = progress or (lambda msg: None)
    inputs = with_batch(inputs, batch)
    model = model.eval()
    val = [split_batch(b) for b in val_data] if val_data is not None else None
    load_before, started = _load_average(), time.perf_counter()
    with _threads(threads) as n_threads:
        chosen = select_candidates(model, inputs, candidates, compile=compile,
                                   calibration=calibration)
        reference = _call(model, inputs)
        ref_metric = evaluate(model, val, metric) if val is not None else None
        with tempfile.TemporaryDirectory(prefix="fxopt-bench-") as tmp:
            workdir = Path(out_dir) / "artifacts" if out_dir is not None else Path(tmp)
            builts, accuracy = [], {}
            for cand in chosen:
                say(f"building {cand.name}")
                b = build(cand, model, inputs, workdir=workdir, calibration=calibration,
                          threads=n_threads)
                if b.ok:
                    try:
                        accuracy[cand.name] = agreement(reference, _call(b.fn, inputs))
                        if val is not None:
                            accuracy[cand.name]["metric"] = evaluate(b.fn, val, metric)
                    except Exception as e:  # noqa: BLE001 - a failing candidate is a row
                        b.error, b.fn = f"running it failed: {error_text(e)}", None
                say(f"  {cand.name}: " + (b.error or f"built in {b.build_s:.1f} s"))
                builts.append(b)
            say(f"timing {sum(b.ok for b in builts)} candidates, {rounds} interleaved rounds")
            cmp = interleave(builts, inputs, rounds=rounds, warmup=warmup, threads=n_threads)
    rows = [_row(b, cmp, accuracy.get(b.candidate.name, {}), ref_metric) for b in builts]
    settings = {
        "model": name or type(model).__name__,
        "inputs": [f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')}"
                   for x in inputs if isinstance(x, torch.Tensor)],
        "batch": _batch_of(inputs), "threads": n_threads, "rounds": rounds, "warmup": warmup,
        "repeat": REPEAT, "min_time_s": MIN_TIME_S, "reference_metric": ref_metric,
        "seconds": time.perf_counter() - started, **_versions(),
    }
    result = BenchResult(rows, _noise(cmp, load_before), settings)
    if out_dir is not None:
        result.write(out_dir)
    return result


def _batch_of(inputs: tuple) -> int | None:
    first = next((x for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0), None)
    return None if first is None else int(first.shape[0])


def _versions() -> dict:
    import platform

    from fxopt.bench.report import machine

    out = {"machine": machine(), "python": platform.python_version(),
           "torch": torch.__version__}
    try:
        import onnxruntime

        out["onnxruntime"] = onnxruntime.__version__
    except ImportError:  # pragma: no cover
        pass
    return out


def _row(b: Built, cmp: Comparison | None, acc: dict, ref_metric: float | None) -> Row:
    c = b.candidate
    row = Row(name=c.name, runtime=c.runtime, pipeline=c.pipeline, baseline=c.baseline,
              status="skipped" if b.skipped else ("ok" if b.ok else "failed"),
              build_s=b.build_s, size_bytes=b.size_bytes, peak_mem_bytes=b.peak_mem_bytes,
              error=b.error, key=c.key())
    if b.ok and cmp is not None and c.name in cmp.stats:
        s = cmp.stats[c.name]
        row.median_ms, row.p10_ms, row.p90_ms, row.n = s.median_ms, s.p10_ms, s.p90_ms, s.n
        if cmp.baseline == "torch":
            rs = cmp.round_speedups[c.name]
            row.speedup, row.speedup_min, row.speedup_max = cmp.speedups[c.name], min(rs), max(rs)
        row.cosine, row.max_rel = acc.get("cosine"), acc.get("max_rel")
        row.metric = acc.get("metric")
        if row.metric is not None and ref_metric is not None:
            row.metric_drop = ref_metric - row.metric
    return row


def _noise(cmp: Comparison | None, load_before: float | None) -> dict:
    """What the noise was: per candidate the p90/p10 ratio of its call times and the
    spread of its per-round speed-ups, the worst of each, and the load average."""
    out: dict[str, Any] = {"load_before": load_before, "load_after": _load_average()}
    if cmp is None:
        return out
    per = {}
    for name, s in cmp.stats.items():
        rounds = [r.median for r in cmp.per_round[name]]
        per[name] = {"p90_over_p10": s.p90 / s.p10 if s.p10 > 0 else None,
                     "round_median_spread": (max(rounds) - min(rounds)) / s.median
                     if s.median > 0 else None}
    out["per_candidate"] = per
    spreads = [v["round_median_spread"] for v in per.values() if v["round_median_spread"]]
    out["worst_round_spread"] = max(spreads) if spreads else 0.0
    out["baseline"] = cmp.baseline
    return out
