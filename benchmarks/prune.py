"""Structured pruning: pass time on two graph sizes, and latency of the pruned model against
the unpruned fxopt graph (eager) and the unpruned ONNX export (ONNX Runtime), side by side.

Run:  .venv/bin/python benchmarks/prune.py   (rewrites its section of benchmarks/RESULTS.md)
      .venv/bin/python benchmarks/prune.py --models resnet --no-write

The pass time is ``stats["seconds"]`` (grouping, ranking, shrinking; the masked-twin check
is not counted) at ``ratio=0.5``, median of --repeat runs; time per node shows whether it
grows linearly. Latency: ``--prune`` (default
``prune(macs=0.5,scope=global,round_to=16)``) and the unpruned graph, one
``compare_latency`` run each for eager and ONNX Runtime (median of rounds, one thread).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile

import torch

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


def latency(name: str, rounds: int, spec: str) -> list[str]:
    import onnxruntime as ort

    model, inputs = zoo.load(name)
    base = fxopt.optimize(model, inputs, "default", mode="symbolic").module
    res = fxopt.optimize(model, inputs, f"{spec},default", mode="symbolic")
    macs = res.report.records[0].macs
    rows = [f"{name} [{spec}]: MACs kept {macs[1] / macs[0]:.3f} "
            f"(params {res.report.records[0].params[1] / res.report.records[0].params[0]:.3f})"]
    eager = compare_latency({"unpruned": base, "pruned": res.module}, inputs, rounds=rounds)
    rows.append(f"  eager speed-up {eager.speedups['pruned']:.2f}x "
                f"({eager.stats['unpruned'].median_ms:.2f} -> "
                f"{eager.stats['pruned'].median_ms:.2f} ms)")
    with tempfile.TemporaryDirectory() as d:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        sessions = {}
        for label, gm in (("unpruned", base), ("pruned", res.module)):
            path = os.path.join(d, f"{label}.onnx")
            fxopt.lower(gm, "onnx", inputs, path=path)
            sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
            feed_name = sess.get_inputs()[0].name
            sessions[label] = (lambda s, n: lambda x: s.run(None, {n: x.numpy()}))(sess, feed_name)
        onnx = compare_latency(sessions, inputs, rounds=rounds)
    rows.append(f"  ONNX Runtime speed-up {onnx.speedups['pruned']:.2f}x "
                f"({onnx.stats['unpruned'].median_ms:.2f} -> "
                f"{onnx.stats['pruned'].median_ms:.2f} ms)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="resnet50,mobilenet,transformer")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--prune", default="prune(macs=0.5,scope=global,round_to=16)")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lines = ["## prune", "",
             f"`python benchmarks/prune.py --models {args.models} --prune '{args.prune}'` "
             f"on {platform.machine()}, "
             f"torch {torch.__version__}, 1 thread, zoo batch sizes.", "",
             "Pass time (ratio=0.5, symbolic capture; grouping + ranking + shrinking):", ""]
    for name in DEPTHS:
        nodes, params, s = pass_time(name, args.repeat)
        lines.append(f"- {name}: {nodes} nodes, {params / 1e6:.1f}M params, {s:.3f} s "
                     f"({1e3 * s / nodes:.2f} ms/node)")
    lines += ["", f"Latency, `{args.prune}` vs the unpruned fxopt graph:", "", "```"]
    for name in args.models.split(","):
        # mobilenet's 16-channel groups cannot keep multiples of 16 and lose half the MACs
        spec = args.prune.replace(",round_to=16", "") if name == "mobilenet" else args.prune
        lines += latency(name, args.rounds, spec)
    lines.append("```")
    publish("prune", "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
