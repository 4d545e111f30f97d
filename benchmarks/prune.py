"""Structured pruning: pass time on three graph sizes, latency of the pruned models against
the unpruned fxopt graph (eager) and its ONNX export (ONNX Runtime), side by side, and where
the eager time goes after pruning.

Run:  OMP_NUM_THREADS=1 .venv/bin/python benchmarks/prune.py   (rewrites its section)
      .venv/bin/python benchmarks/prune.py --models mobilenet --depths resnet50 --no-write
      .venv/bin/python benchmarks/prune.py --prune 'prune(macs=0.5)' --rounds 9

Pass time: ``stats["seconds"]`` (grouping, ranking, shrinking; the masked-twin check is not
counted) of ``prune(ratio=0.5)`` on ResNet-50 and the same layout with ResNet-101 / -152
block counts; time per node shows whether it grows linearly. Latency: every ``--prune`` spec
(default: ``prune(macs=0.5)`` as the issue states it, i.e. ``round_to="auto"``; with
``round_to=1``, no rounding; and with ``round_to=16`` local and global) against the
unpruned graph, one interleaved ``compare_latency`` run per model for eager and one for
ONNX Runtime (one thread each). The command line is printed into the
section, so a rerun on a quieter machine is the same measurement.
"""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time

import torch
from torch.fx.interpreter import Interpreter

import fxopt
from fxopt import zoo
from fxopt.bench import compare_latency

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import publish  # noqa: E402

# ResNet-50 and the same layout made deeper (ResNet-101 / -152 block counts): the same widths,
# so nodes and parameters grow together and time per node shows whether the pass is linear
DEPTHS = {"resnet50": (0, 0), "resnet101-layout": (0, 17), "resnet152-layout": (4, 30)}


def deeper_resnet50(extra_layer2: int, extra_layer3: int) -> tuple[torch.nn.Module, tuple]:
    """The zoo's ResNet-50 with extra bottlenecks in layer2 / layer3 (new blocks keep their
    default initialisation: the pass time does not depend on the values)."""
    from fxopt.zoo.cnn import Bottleneck

    model, inputs = zoo.load("resnet50")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        for name, width, extra in (("layer2", 128, extra_layer2), ("layer3", 256, extra_layer3)):
            blocks = list(getattr(model, name))
            blocks += [Bottleneck(width * 4, width) for _ in range(extra)]
            setattr(model, name, torch.nn.Sequential(*blocks))
    return model.eval(), inputs


def pass_time(name: str, repeat: int) -> tuple[int, int, float]:
    """(nodes, parameters, median ``stats["seconds"]``) of ``prune(ratio=0.5)``."""
    model, inputs = deeper_resnet50(*DEPTHS[name])
    seconds, nodes = [], 0
    for _ in range(repeat):
        res = fxopt.optimize(model, inputs, "prune(ratio=0.5)", mode="symbolic", verify=False)
        seconds.append(res.report.records[-1].stats["seconds"])
        nodes = res.report.records[-1].nodes[0]
    return nodes, res.report.records[-1].params[0], statistics.median(seconds)


def _ort_session(gm, inputs, folder: str, label: str):
    import onnxruntime as ort

    path = os.path.join(folder, f"{label}.onnx")
    fxopt.lower(gm, "onnx", inputs, path=path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    feed = sess.get_inputs()[0].name
    return lambda x: sess.run(None, {feed: x.numpy()})


def model_specs(name: str, specs: list[str]) -> list[str]:
    """The specs as run on ``name``: mobilenet's 16-channel groups cannot keep a multiple of
    16 below 16, so there ``round_to=16`` becomes ``round_to=8``."""
    if name == "mobilenet":
        specs = [s.replace("round_to=16", "round_to=8") for s in specs]
    return list(dict.fromkeys(specs))


def latency(name: str, rounds: int, specs: list[str]) -> tuple[list[str], dict]:
    """Table rows for ``name``: every spec against the unpruned graph, eager and ONNX Runtime,
    each one interleaved ``compare_latency`` run; and the graphs, by label."""
    model, inputs = zoo.load(name)
    graphs = {"unpruned": fxopt.optimize(model, inputs, "default", mode="symbolic").module}
    kept = {}
    failed = {}
    for spec in specs:
        try:
            res = fxopt.optimize(model, inputs, f"{spec},default", mode="symbolic")
        except fxopt.PassError as e:  # an unreachable target is a result too
            failed[spec] = str(e).splitlines()[0]
            continue
        rec = res.report.records[0]
        graphs[spec] = res.module
        kept[spec] = (rec.macs[1] / rec.macs[0], rec.params[1] / rec.params[0])
    eager = compare_latency(graphs, inputs, rounds=rounds)
    with tempfile.TemporaryDirectory() as d:
        sessions = {k: _ort_session(gm, inputs, d, f"m{i}") for i, (k, gm) in
                    enumerate(graphs.items())}
        onnx = compare_latency(sessions, inputs, rounds=rounds)
    rows = [f"| {name} | `{spec}` | – | – | – | – | – | – | – | {why} |"
            for spec, why in failed.items()]
    for spec in graphs:
        macs, params = kept.get(spec, (1.0, 1.0))
        cells = [name, f"`{spec}`", f"{macs:.3f}", f"{params:.3f}"]
        for cmp in (eager, onnx):
            per_round = cmp.round_speedups[spec]
            cells += [f"{cmp.stats[spec].median_ms:.2f}",
                      f"**{cmp.speedups[spec]:.2f}x**" if spec != "unpruned" else "1",
                      f"{min(per_round):.2f}–{max(per_round):.2f}"]
        rows.append("| " + " | ".join(cells) + " |")
    return rows, graphs


class _NodeClock(Interpreter):
    """Runs a graph node by node, adding each node's thread CPU time (not wall time: on a
    shared machine the breakdown must not count time spent waiting for a core)."""

    def __init__(self, gm):
        super().__init__(gm)
        self.times: dict[str, list[float]] = {}

    def run_node(self, n):
        start = time.thread_time()
        out = super().run_node(n)
        self.times.setdefault(n.name, []).append(time.thread_time() - start)
        return out


def _breakdown(gm, inputs, runs: int = 5) -> tuple[dict[str, tuple[float, int, int]], float]:
    """Median CPU ms of every Conv2d (with its in/out channels), and of all other nodes."""
    clock = _NodeClock(gm)
    with torch.inference_mode():
        clock.run(*inputs)
        clock.times.clear()
        for _ in range(runs):
            clock.run(*inputs)
    convs, other = {}, 0.0
    for n in gm.graph.nodes:
        if n.name not in clock.times:
            continue
        ms = 1e3 * statistics.median(clock.times[n.name])
        mod = gm.get_submodule(n.target) if n.op == "call_module" else None
        if isinstance(mod, torch.nn.Conv2d):
            convs[n.name] = (ms, mod.in_channels, mod.out_channels)
        else:
            other += ms
    return convs, other


def eager_profile(graphs: dict, inputs: tuple) -> list[str]:
    """Where the eager time goes after pruning: conv time against the base conv times scaled
    by each conv's MAC ratio (same spatial size, so in*out channels), and everything else
    (ReLU, max-pool, residual adds: memory-bound, they shrink with the channels only)."""
    base_convs, base_other = _breakdown(graphs["unpruned"], inputs)
    base_conv = sum(v[0] for v in base_convs.values())
    rows = ["| graph | conv CPU ms | conv ms if MAC-proportional | convs with channels "
            "% 16 != 0 (their ms vs MAC-proportional) | other ops CPU ms | total speed-up "
            "(CPU time) |", "|---|---:|---:|---|---:|---:|"]
    for label, gm in graphs.items():
        convs, other = _breakdown(gm, inputs)
        ideal = {k: base_convs[k][0] * c_in * c_out / (base_convs[k][1] * base_convs[k][2])
                 for k, (_, c_in, c_out) in convs.items()}
        odd = [k for k, (_, c_in, c_out) in convs.items() if c_in % 16 or c_out % 16]
        conv = sum(v[0] for v in convs.values())
        rows.append(
            f"| `{label}` | {conv:.1f} | {sum(ideal.values()):.1f} | {len(odd)}/{len(convs)} "
            f"({sum(convs[k][0] for k in odd):.1f} vs {sum(ideal[k] for k in odd):.1f}) "
            f"| {other:.1f} | {(base_conv + base_other) / (conv + other):.2f}x |")
    return rows


DEFAULT_SPECS = ("prune(macs=0.5)", "prune(macs=0.5,round_to=1)",
                 "prune(macs=0.5,round_to=16)", "prune(macs=0.5,scope=global,round_to=16)")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,mobilenet,transformer")
    ap.add_argument("--depths", default=",".join(DEPTHS),
                    help="models for the pass time (comma list of " + ", ".join(DEPTHS) + ")")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prune", action="append", metavar="SPEC",
                    help=f"pruning spec (repeatable; default: {', '.join(DEFAULT_SPECS)})")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    specs = args.prune or list(DEFAULT_SPECS)
    torch.set_num_threads(1)
    load = os.getloadavg()[0]
    threads = os.environ.get("OMP_NUM_THREADS")
    command = ("OMP_NUM_THREADS=" + threads + " " if threads else "") + \
        "python benchmarks/prune.py " + shlex.join(sys.argv[1:])
    lines = ["## prune", "",
             f"`{command.strip()}` on {platform.machine()} ({os.cpu_count()} CPUs), "
             f"torch {torch.__version__}, 1 thread (torch and ONNX Runtime), zoo batch "
             f"sizes; load average {load:.1f} at the start.", "",
             "Pass time (`prune(ratio=0.5)`, symbolic capture; `stats['seconds']`: grouping + "
             "ranking + shrinking, not the twin check; median of --repeat):", ""]
    for name in args.depths.split(","):
        nodes, params, s = pass_time(name, args.repeat)
        lines.append(f"- {name}: {nodes} nodes, {params / 1e6:.1f}M params, {s:.3f} s "
                     f"({1e3 * s / nodes:.2f} ms/node)")
    lines += ["", "Latency against the unpruned fxopt graph (`default`), eager and ONNX Runtime "
              "(the unpruned fxopt export), each model's candidates in one interleaved "
              "`compare_latency` run (median of --rounds rounds; *per round*: the speed-up "
              "round by round, min–max):", "",
              "| model | pipeline before `default` | MACs kept | params kept | eager ms "
              "| eager speed-up | per round | ORT ms | ORT speed-up | per round |",
              "|---|---|---:|---:|---:|---:|---|---:|---:|---|"]
    profiled = None
    for name in args.models.split(","):
        rows, graphs = latency(name, args.rounds, model_specs(name, specs))
        lines += rows
        if name == "resnet50":
            profiled = (graphs, zoo.get(name).example_inputs())
    if profiled is not None:
        lines += ["", "Where resnet50's eager time goes (per node, thread CPU time, median of "
                  "5 runs through `torch.fx.Interpreter`):", ""]
        lines += eager_profile(*profiled)
    lines += ["", f"Load average {os.getloadavg()[0]:.1f} at the end."]
    publish("prune", "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
