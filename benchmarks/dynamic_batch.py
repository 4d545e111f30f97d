"""ONNX Runtime latency of fxopt's dynamic-batch export vs a fixed-batch export of the same
graph, side by side in one process.

Run:  .venv/bin/python benchmarks/dynamic_batch.py   (rewrites the "dynamic-batch" section
of benchmarks/RESULTS.md)

Per zoo model (default: the transformer encoder and the grouped-query attention model):
``fxopt.optimize(model, inputs, "default")``, then for every ``--batches`` size B
(a) *fixed*: ``fxopt.lower(gm, "onnx", inputs_at_B, dynamic=False)`` (every dimension
static, B baked in) and (b) *dynamic*: one ``fxopt.lower(gm, "onnx", inputs)`` (dimension
0 "batch", exported once at the example batch) fed the same batch-B numpy inputs. Both
files are opened with the same ``onnxruntime.SessionOptions`` (ORT_ENABLE_ALL,
``intra_op_num_threads`` = each ``--threads`` value, one inter-op thread, CPU provider)
and timed with ``fxopt.bench.compare_latency``: warm-up calls, then interleaved rounds
(AB, BA, ...), median per call. Ratio = fixed median / dynamic median (1.00: the dynamic
batch costs nothing; < 1: it is slower), with the per-round min / median / max. The node
columns count the two files' nodes; "max |diff|" is the largest absolute difference
between the two sessions' outputs on the same inputs.

Flags: ``--models a,b``, ``--batches 1,4,16``, ``--threads 1,2``, ``--rounds N``,
``--no-write`` (print only).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import torch

import fxopt
from fxopt import zoo
from fxopt.bench import compare_latency

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_support import (  # noqa: E402
    load_average,
    machine,
    ort_feeds,
    ort_options,
    ort_session,
    parse_models,
    parse_threads,
    spread,
)
from results_file import publish  # noqa: E402

MODELS = ("transformer", "gqa")
SECTION = "dynamic-batch"


def _batch(inputs: tuple, batch: int) -> tuple:
    """``inputs`` at ``batch`` rows (repeating the example rows, so token ids stay valid)."""
    out = []
    for x in inputs:
        reps = -(-batch // x.shape[0])
        out.append(x.repeat(reps, *([1] * (x.dim() - 1)))[:batch].contiguous())
    return tuple(out)


def _nodes(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def measure(name: str, batches: list[int], threads: list[int], rounds: int,
            tmp: Path) -> list[str]:
    model, inputs = zoo.load(name)
    gm = fxopt.optimize(model, inputs, "default").module
    dynamic = fxopt.lower(gm, "onnx", inputs, path=tmp / f"{name}-dynamic.onnx").path
    rows = []
    for batch in batches:
        x = _batch(inputs, batch)
        fixed = fxopt.lower(gm, "onnx", x, path=tmp / f"{name}-fixed-{batch}.onnx",
                            dynamic=False).path
        for t in threads:
            sessions = {k: ort_session(p, ort_options(t))
                        for k, p in (("fixed", fixed), ("dynamic", dynamic))}
            feeds = {k: ort_feeds(s, x) for k, s in sessions.items()}
            outs = {k: s.run(None, feeds[k]) for k, s in sessions.items()}
            diff = max(float(np.abs(a - b).max())
                       for a, b in zip(outs["fixed"], outs["dynamic"]))
            cmp = compare_latency(
                {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()},
                (), rounds=rounds)
            ratios = sorted(cmp.round_speedups["dynamic"])
            rows.append(
                f"| {name} | {batch} | {t} | {cmp.stats['fixed'].median_ms:.3f} | "
                f"{cmp.stats['dynamic'].median_ms:.3f} | {cmp.speedups['dynamic']:.3f} | "
                f"{spread(ratios)} | {_nodes(fixed)} / {_nodes(dynamic)} | {diff:.1e} |")
            print(rows[-1], file=sys.stderr, flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", help=f"comma-separated zoo models (default: "
                                         f"{','.join(MODELS)})")
    parser.add_argument("--batches", default="1,4,16", help="batch sizes (default 1,4,16)")
    parser.add_argument("--threads", default="1", help="ORT intra-op threads (default 1)")
    parser.add_argument("--rounds", type=int, default=7, help="interleaved rounds (default 7)")
    parser.add_argument("--no-write", action="store_true",
                        help="print the results without writing benchmarks/RESULTS.md")
    args = parser.parse_args()
    names = parse_models(parser, args.models, MODELS, zoo.names(include_heavy=True))
    batches = parse_threads(parser, args.batches)  # positive integers, same parsing
    threads = parse_threads(parser, args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="fxopt-dynbatch-") as tmp:
        rows = [r for n in names for r in measure(n, batches, threads, args.rounds, Path(tmp))]
    command = "python benchmarks/dynamic_batch.py " + " ".join(sys.argv[1:])
    text = "\n".join([
        "## ONNX Runtime: dynamic vs fixed batch export",
        "",
        f"Command: `{command.strip()}`  ",
        f"Machine: {machine()}, load average {load_average():.2f} at the end; onnxruntime "
        f"{__import__('onnxruntime').__version__}, CPU provider, ORT_ENABLE_ALL; median per "
        f"call over {args.rounds} interleaved rounds after warm-up.",
        "",
        "Fixed: the graph exported with every dimension static at that batch size. Dynamic: "
        "one export with dimension 0 symbolic (\"batch\"), run at that batch size. Ratio = "
        "fixed median / dynamic median (1.00 = the dynamic batch is free; the goal is >= 0.97).",
        "",
        "| model | batch | threads | fixed ms | dynamic ms | ratio | per-round min / med / max "
        "| nodes fixed / dynamic | max \\|diff\\| |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ])
    publish(SECTION, text, write=not args.no_write)


if __name__ == "__main__":
    main()
