"""Eager CPU latency of each model before vs after the default pipeline, side by side.

Run:  .venv/bin/python benchmarks/latency.py   (rewrites its section of benchmarks/RESULTS.md)

For each model (the zoo CNNs, the ResNet-50-sized zoo model, the zoo transformer / GQA /
MLP, and two Hugging Face CNNs built from their default configs with random weights) it
runs ``fxopt.optimize(model, inputs, "default")`` and times the original model, the same
capture with no passes, and the optimized GraphModule with ``fxopt.bench.compare_latency``:
interleaved rounds in one process, median per call after warm-up, under
``torch.inference_mode()``. The speed-up is eager median / fxopt median (> 1: the optimized
module is faster), with its per-round spread; "pipeline" is captured / fxopt, the passes'
own share. It also counts minor page faults per call (eager vs fxopt), because glibc's
heap trimming can make a model's cost depend on how long Python keeps its intermediates
alive. The error columns compare the optimized module's outputs with the model's on the
example inputs.

Flags: ``--models a,b`` (default: all), ``--threads N`` (default: torch's default for this
machine), ``--rounds N``, ``--quick`` (few repeats: a smoke test, numbers meaningless),
``--no-write`` (print only; leave RESULTS.md alone).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import warnings
from collections.abc import Callable

import torch
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.bench import compare_latency, threads
from fxopt.verify import compare_outputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_support import (  # noqa: E402
    add_run_flags,
    load_average,
    parse_models,
    print_row,
    run_isolated,
    spread,
)
from results_file import publish  # noqa: E402

ZOO_MODELS = ("resnet", "mobilenet", "densenet", "shufflenet", "decoder", "dynamic",
              "resnet50", "transformer", "gqa", "mlp")


def _hf_cnn(kind: str, seed: int) -> Callable[[], tuple[nn.Module, tuple]]:
    """A Hugging Face CNN from its default config (random init, no download), batch 1 at
    3x224x224, with batch-norm statistics made data-driven the way the zoo does it (random
    BN statistics shrink activations towards ~1e-10, which makes the error columns noise
    and can push CPU kernels onto denormal slow paths)."""

    def build() -> tuple[nn.Module, tuple]:
        import transformers

        with zoo._seeded(seed):
            if kind == "resnet":
                model = transformers.ResNetModel(transformers.ResNetConfig())
            else:
                model = transformers.MobileNetV2Model(transformers.MobileNetV2Config())
            zoo._calibrate_bn(model, zoo._calibration_images(2, 224), steps=2)
        gen = torch.Generator().manual_seed(1000 + seed)
        return model.eval(), (zoo._random_images(1, 224, gen),)

    return build


def _zoo(name: str) -> Callable[[], tuple[nn.Module, tuple]]:
    return lambda: zoo.load(name)


MODELS: dict[str, Callable[[], tuple[nn.Module, tuple]]] = {
    **{name: _zoo(name) for name in ZOO_MODELS},
    "hf-resnet50": _hf_cnn("resnet", 20),
    "hf-mobilenet-v2": _hf_cnn("mobilenet", 21),
}


def minor_faults_per_call(fn: Callable, inputs: tuple, calls: int = 5) -> float | None:
    """Minor page faults per call (after 2 warm-up calls); None where getrusage is missing.

    glibc serves large allocations (activations) with mmap or trims the heap back to the
    OS once freed, so a model can fault in fresh pages on every call; how often depends on
    how long the Python code keeps intermediates alive, which differs between an eager
    ``forward`` and the GraphModule's generated code (it drops each value after last use).
    """
    try:
        import resource
    except ImportError:  # pragma: no cover - Windows
        return None
    with torch.inference_mode():
        for _ in range(2):
            fn(*inputs)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            fn(*inputs)
        after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    return (after - before) / calls


def measure(name: str, timing: dict) -> dict:
    model, inputs = MODELS[name]()
    model.eval()
    # the capture with no passes is timed too: it separates what the GraphModule itself
    # costs or saves (generated Python, tensor lifetimes) from what the pipeline changes.
    # optimize() runs the passes on a copy of an already captured GraphModule, so this is
    # exactly fxopt.optimize(model, inputs, "default") with mode="auto", captured once.
    captured = fxopt.capture(model, inputs, mode="auto").eval()
    res = fxopt.optimize(captured, inputs, "default")
    gm = res.module.eval()
    with torch.inference_mode():
        err = compare_outputs(model(*inputs), gm(*inputs))
    cmp = compare_latency({"eager": model, "captured": captured, "fxopt": gm}, inputs, **timing)
    folded = sum(r.stats.get("folded_bn", 0) for r in res.report)
    return {
        "model": name,
        "frontend": res.capture.get("frontend", "?"),
        "batch": int(inputs[0].shape[0]),
        "threads": torch.get_num_threads(),
        "nodes": f"{res.report[0].nodes[0]} -> {res.report[-1].nodes[1]}",
        "folded_bn": folded,
        "eager_ms": cmp.stats["eager"].median_ms,
        "captured_ms": cmp.stats["captured"].median_ms,
        "fxopt_ms": cmp.stats["fxopt"].median_ms,
        "speedup": cmp.speedups["fxopt"],
        "pipeline_speedup": cmp.stats["captured"].median / cmp.stats["fxopt"].median,
        "pipeline_faster": sum(c.median > f.median for c, f in
                               zip(cmp.per_round["captured"], cmp.per_round["fxopt"])),
        "rounds": sorted(cmp.round_speedups["fxopt"]),
        "faults": (minor_faults_per_call(model, inputs), minor_faults_per_call(gm, inputs)),
        "max_abs": err.max_abs,
        "rel": err.rel,
    }


def _faults(pair: tuple[float | None, float | None]) -> str:
    return " -> ".join("?" if f is None else f"{f:.0f}" for f in pair)


ROW_MARK = "latency-row-json: "


def measure_isolated(name: str, args: argparse.Namespace) -> dict:
    """``measure(name)`` in a fresh Python process (this script with ``--row-json``).

    One process per model keeps one model's allocator state (glibc's adaptive mmap / trim
    thresholds, see ``minor_faults_per_call``), oneDNN caches and thread pools from
    changing the next model's numbers: in one shared process the same model was seen to
    fault ~4,700 pages per eager call in one run and none in the next.
    """
    flags = ["--threads", str(args.threads)] if args.threads else []
    flags += ["--rounds", str(args.rounds)] if args.rounds else []
    flags += ["--quick"] if args.quick else []
    row = run_isolated(__file__, name, ROW_MARK, flags)
    row["faults"] = tuple(row["faults"])
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated subset of: {', '.join(MODELS)}")
    parser.add_argument("--threads", type=int, default=None,
                        help="intra-op threads (default: torch's default on this machine)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved eager/fxopt rounds (default 10; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="few repeats: checks the script runs, numbers are meaningless")
    add_run_flags(parser)
    args = parser.parse_args(argv)
    names = parse_models(parser, args.models, MODELS, MODELS)
    if args.quick:
        timing = {"rounds": args.rounds or 2, "warmup": 2, "repeat": 3, "min_time_s": 0.0}
    else:
        timing = {"rounds": args.rounds or 10, "warmup": 10, "repeat": 10, "min_time_s": 0.2}
    warnings.simplefilter("ignore")
    load_before = load_average()
    isolate = len(names) > 1 and not args.in_process and not args.row_json
    with threads(args.threads) as n_threads:
        rows = []
        for name in names:
            rows.append(measure_isolated(name, args) if isolate else measure(name, timing))
            print(f"  {name}: {rows[-1]['speedup']:.3f}x", file=sys.stderr, flush=True)
    if args.row_json:
        for row in rows:
            print_row(ROW_MARK, row)
        return
    load_after = load_average()

    per_round = (f"{timing['repeat']} calls and {timing['min_time_s']:g} s per candidate per "
                 f"round, after {timing['warmup']} warm-up calls")
    command = "python benchmarks/latency.py" + (f" --threads {args.threads}" if args.threads
                                                 else "") + (" --quick" if args.quick else "")
    where = "each model in a fresh process" if isolate else "all models in one process"
    malloc = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    lines = [
        "## Eager CPU latency: model vs default pipeline",
        "",
        f"`{command}`{' (smoke test: numbers meaningless)' if args.quick else ''} — "
        f"torch {torch.__version__}, {n_threads} intra-op threads"
        f"{'' if args.threads else ' (torch default)'}, "
        f"{platform.processor() or platform.machine()} ({platform.machine()}), "
        f"{os.cpu_count()} CPUs, Python {platform.python_version()}, glibc malloc "
        f"{' '.join(f'{k}={v}' for k, v in sorted(malloc.items())) or 'defaults'}; "
        f"1-min load average {load_before:.2f} before, {load_after:.2f} after.",
        "",
        f"Eager PyTorch module vs the `fxopt.optimize(model, inputs, \"default\")` GraphModule "
        f"(pipeline: {', '.join(fxopt.PIPELINES['default'])}), timed with "
        f"`fxopt.bench.compare_latency`, {where}, "
        f"eager / captured / fxopt side by side: {timing['rounds']} interleaved rounds "
        f"(ABC, CBA, ...), {per_round}; median per call under `torch.inference_mode()`, "
        "models in eval mode. *captured*: the same `mode=\"auto\"` capture with no passes, "
        "timed alongside, so that what the GraphModule itself costs or saves (generated "
        "Python, tensor lifetimes) is not credited to the pipeline. *Speed-up* = eager "
        "median / fxopt median over all samples (> 1: fxopt is faster); *per round*: the "
        "same ratio round by round as min / median / max, and in how many rounds fxopt was "
        "faster (a load burst from another process shows up as extreme rounds; where the "
        "pooled speed-up and the per-round median disagree, trust the per-round median); "
        "*pipeline* = captured median / fxopt median, the passes' own effect (in brackets: "
        "rounds in which fxopt beat the capture). *Faults*: minor page faults per call, "
        "eager -> fxopt: glibc can hand freed activation memory back to the OS and fault it "
        "in again on the next call, and whether it does depends on how long the Python code "
        "keeps intermediates alive and on the process's allocation history (the same model "
        "faulted thousands of pages per eager call in one run and none in another); rerun "
        "with `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=4294967296` to take "
        "that out. Errors: optimized vs original outputs on the example "
        "inputs (rel = max abs / max |output|). `hf-*`: Hugging Face `transformers` models "
        "from their default configs (ResNet-50 and MobileNetV2 layouts), random init with "
        "batch-norm statistics from two seeded batches.",
        "",
        "| model | front end | batch | threads | BN folded | nodes | eager ms | captured ms "
        "| fxopt default ms | speed-up | per round min / med / max | fxopt faster "
        "| pipeline | faults/call | max abs err | rel err |",
        "|---|---|---:|---:|---:|---|---:|---:|---:|---:|---|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        rs = r["rounds"]
        faster = sum(x > 1 for x in rs)
        lines.append(
            f"| {r['model']} | {r['frontend']} | {r['batch']} | {r['threads']} "
            f"| {r['folded_bn']} | {r['nodes']} | {r['eager_ms']:.3f} | {r['captured_ms']:.3f} "
            f"| {r['fxopt_ms']:.3f} | {r['speedup']:.3f} "
            f"| {spread(rs)} | {faster}/{len(rs)} "
            f"| {r['pipeline_speedup']:.3f} ({r['pipeline_faster']}/{len(rs)}) "
            f"| {_faults(r['faults'])} "
            f"| {r['max_abs']:.2e} | {r['rel']:.1e} |"
        )
    publish("latency", "\n".join(lines) + "\n", write=not args.no_write)


if __name__ == "__main__":
    main()
