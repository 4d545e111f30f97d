"""``fxopt bench`` over the zoo: every candidate artifact of every zoo model side by side.

Run:  .venv/bin/python benchmarks/bench_zoo.py   (rewrites the "bench-zoo" section of
benchmarks/RESULTS.md and the plots benchmarks/bench_<model>.png)

It runs the command itself, ``fxopt bench --zoo`` with its default settings, in a fresh
process and times it end to end (the issue asks for under 5 minutes on the 2-core
machine), then ``fxopt bench resnet50`` (the heavy ResNet-50-sized model, not part of
``--zoo``) the same way, and reads the bench.json each wrote. Table: per model, the median
latency of PyTorch eager and, for every candidate, its speed-up over eager (eager median /
candidate median, same interleaved run) and its output cosine against the model on the
example inputs; *best at cosine >= 0.99*: the fastest candidate within that agreement.

Flags: ``--models a,b`` (default: ``--zoo``, then resnet50), ``--no-heavy`` (skip
resnet50), ``--rounds N`` / ``--threads N`` (passed on; default: the command's own),
``--no-write`` (print only; leave RESULTS.md and the plots alone).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_support import cell, load_average, machine  # noqa: E402
from results_file import publish  # noqa: E402

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SECTION = "bench-zoo"
BUDGET = 0.99


def _run(args: list[str], flags: list[str]) -> tuple[float, float]:
    """``python -m fxopt.cli bench *args *flags`` in a fresh process: its wall seconds and
    CPU seconds (user + system; on a shared machine the wall time depends on the load)."""
    import resource

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "fxopt.cli", "bench", *args, *flags],
                          env=env, cwd=ROOT, text=True, stdout=subprocess.PIPE)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    print(proc.stdout)
    if proc.returncode != 0:
        raise SystemExit(f"fxopt bench {' '.join(args)} failed (exit {proc.returncode})")
    return seconds, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _cellof(row: dict) -> str:
    if row["status"] == "skipped":
        return "skipped"
    if row["status"] != "ok" or row["median_ms"] is None:
        return "failed"
    cos = "" if row["cosine"] is None else f" / {row['cosine']:.5f}"
    return f"{row['speedup']:.2f}x{cos}" if row["speedup"] is not None else "?"


def _best(rows: list[dict]) -> str:
    ok = [r for r in rows if r["status"] == "ok" and r["median_ms"] is not None
          and r["cosine"] is not None and r["cosine"] >= BUDGET]
    if not ok:
        return "none"
    r = min(ok, key=lambda r: r["median_ms"])
    return f"{r['name']} ({r['speedup']:.2f}x)"


def section(results: dict[str, dict], commands: list[tuple[str, tuple[float, float]]],
            load: tuple) -> str:
    names = []
    for data in results.values():
        for r in data["rows"]:
            if r["name"] not in names:
                names.append(r["name"])
    all_skipped = [n for n in names if all(
        r["status"] == "skipped" for d in results.values() for r in d["rows"] if r["name"] == n)]
    shown = [n for n in names if n != "torch" and n not in all_skipped]
    first = next(iter(results.values()))["settings"]
    lines = [
        "## `fxopt bench` over the zoo: every artifact side by side",
        "",
        *[f"`{cmd}`: {sec:.0f} s wall ({cpu:.0f} s CPU), end to end in a fresh process  "
          for cmd, (sec, cpu) in commands],
        "",
        f"Machine: {machine()}; torch {first.get('torch')}, onnxruntime "
        f"{first.get('onnxruntime')}; {first['threads']} threads (torch and ONNX Runtime "
        f"intra-op), {first['rounds']} interleaved rounds after {first['warmup']} warm-up "
        f"calls, at least {first['repeat']} calls and {first['min_time_s']:g} s per candidate "
        f"per round; 1-min load average {load[0]:.2f} before, {load[1]:.2f} after "
        "(shared machine: compare ratios within a row, not milliseconds across rows).",
        "",
        "Cells: speed-up over PyTorch eager (eager median / candidate median, same run) / "
        "output cosine against the model on the example inputs. Candidates: *fxopt-eager* "
        "the `default` pipeline's eager artifact; *ort-plain* ONNX Runtime on "
        "`torch.onnx.export` with torch's defaults; *ort-fxopt-fp32 / int8 / dynamic_int8 / "
        "fp16* ONNX Runtime on `fxopt.lower(..., \"onnx\")` after `default`, "
        "`quantize(scheme=int8)` (static, 8 random calibration batches), "
        "`quantize(scheme=dynamic_int8)` (Linear-heavy models only), `half(dtype=fp16)`; "
        "*ort-quantize_static / _dynamic* ONNX Runtime's own quantizers on the plain export "
        "(same calibration batches). "
        + (f"Not shown: {', '.join(all_skipped)} (skipped everywhere: "
           f"{_why(results, all_skipped[0])}). " if all_skipped else "")
        + f"*best*: the fastest candidate whose cosine is >= {BUDGET}. *noise*: the largest "
        "spread of one candidate's per-round medians (max - min) / median; *load*: the "
        "1-minute load average when that model finished (2 CPUs: above ~2, other processes "
        "compete for the cores and multi-threaded kernels stall).",
        "",
        "| model | batch | eager ms | " + " | ".join(shown)
        + " | best at cosine >= 0.99 | noise | load |",
        "|---|---:|---:|" + "---:|" * len(shown) + "---|---:|---:|",
    ]
    failures = []
    for model, data in results.items():
        rows = {r["name"]: r for r in data["rows"]}
        eager = rows.get("torch", {}).get("median_ms")
        cells = [_cellof(rows[n]) if n in rows else "" for n in shown]
        lines.append(f"| {model} | {data['settings']['batch']} | "
                     f"{'' if eager is None else f'{eager:.3f}'} | " + " | ".join(cells)
                     + f" | {_best(data['rows'])} | {_noise(data)} "
                     f"| {_fmt(data['noise'].get('load_after'))} |")
        failures += [f"{model} {r['name']}: {cell(r['error'] or '?')}" for r in data["rows"]
                     if r["status"] == "failed"]
    if failures:
        lines += ["", "Failed: " + "; ".join(failures) + "."]
    lines += ["", "Plots (latency vs 1 - cosine, Pareto front in red): "
              + ", ".join(f"[{m}](bench_{m}.png)" for m in results) + "."]
    return "\n".join(lines) + "\n"


def _noise(data: dict) -> str:
    spread = data["noise"].get("worst_round_spread")
    return "" if spread is None else f"{100 * spread:.0f}%"


def _fmt(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _why(results: dict, name: str) -> str:
    for data in results.values():
        for r in data["rows"]:
            if r["name"] == name:
                return r["error"] or "?"
    return "?"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help="comma-separated models (default: --zoo, resnet50)")
    parser.add_argument("--no-heavy", action="store_true", help="skip resnet50")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default: the "
                        "command's)")
    parser.add_argument("--threads", type=int, help="threads (default: the command's)")
    parser.add_argument("--no-write", action="store_true",
                        help="print the results without writing RESULTS.md or the plots")
    args = parser.parse_args(argv)
    flags = [*(["--rounds", str(args.rounds)] if args.rounds else []),
             *(["--threads", str(args.threads)] if args.threads else [])]
    load_before = load_average()
    commands, results, plots = [], {}, {}
    with tempfile.TemporaryDirectory(prefix="fxopt-bench-zoo-") as tmp:
        out = Path(tmp)
        jobs: list[tuple[list[str], list[str]]] = []  # (model arguments, models it writes)
        if args.models:
            jobs += [([m], [m]) for m in args.models.split(",") if m]
        else:
            from fxopt import zoo

            jobs.append((["--zoo"], zoo.names()))
            if not args.no_heavy:
                jobs.append((["resnet50"], ["resnet50"]))
        for what, models in jobs:
            dest = out if what == ["--zoo"] else out / what[0]
            seconds = _run([*what, "-o", str(dest)], flags)
            print(f"  {' '.join(what)}: {seconds[0]:.0f} s wall, {seconds[1]:.0f} s CPU, "
                  f"load {load_average():.2f}", file=sys.stderr, flush=True)
            commands.append((" ".join(["fxopt bench", *what, *flags]), seconds))
            for m in models:
                results[m] = json.loads((out / m / "bench.json").read_text())
                plots[m] = (out / m / "bench.png").read_bytes()
    text = section(results, commands, (load_before, load_average()))
    if not args.no_write:
        for m, png in plots.items():
            tmp_png = HERE / f"bench_{m}.png.tmp"
            tmp_png.write_bytes(png)
            tmp_png.replace(HERE / f"bench_{m}.png")
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
