"""Capture coverage and capture + default-pipeline time per zoo model and mode, and what
verification costs.

Run:  .venv/bin/python benchmarks/capture.py   (rewrites its sections of benchmarks/RESULTS.md)
      .venv/bin/python benchmarks/capture.py --cost-only   (only the verification-cost section)

For each zoo model (the ResNet-50-sized one included) and each capture mode it records
whether capture succeeded, which front end was used, whether another batch size works,
and the wall time of capture and of the default pipeline (median of --repeat runs).

The verification-cost section measures, as ratios against ``torch.fx.symbolic_trace`` +
one ``ShapeProp`` run of the same model in the same process, ``fxopt.optimize(model, x,
"default")`` and the default pipeline alone (``PassManager.run`` on a captured graph) with
``verify="each"``, ``"end"`` and ``False``, on the ResNet-50-sized zoo model and on
4,000- and 8,000-node chain models (time per node: linear means a constant).
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
import warnings

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

import fxopt
from fxopt import zoo
from fxopt.errors import CaptureError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import write_section  # noqa: E402


def measure(name: str, mode: str, repeat: int) -> dict:
    entry = zoo.get(name)
    model, inputs = entry.build(), entry.example_inputs()
    capture_s, pipeline_s, gm = [], [], None
    for _ in range(repeat):
        start = time.perf_counter()
        try:
            gm = fxopt.capture(model, inputs, mode=mode)
        except CaptureError as e:
            return {"model": name, "mode": mode, "ok": False, "note": str(e).splitlines()[0][:60]}
        capture_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        res = fxopt.PassManager("default").run(gm, inputs)
        pipeline_s.append(time.perf_counter() - start)
    info = res.module.meta["fxopt"]["capture"]
    return {
        "model": name, "mode": mode, "ok": True, "frontend": info["frontend"],
        "dynamic_batch": info["dynamic_batch"],
        "nodes": f"{res.report[0].nodes[0]} -> {res.report[-1].nodes[1]}",
        "capture_ms": statistics.median(capture_s) * 1e3,
        "pipeline_ms": statistics.median(pipeline_s) * 1e3,
    }


# --------------------------------------------------------------------------- verification cost
class _Block(nn.Module):
    """Four nodes of a chain: linear, relu, dropout (removed by cleanup), x * 1 (a no-op)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return self.drop(torch.relu(self.fc(x))) * 1.0


def chain_model(nodes: int) -> tuple[nn.Module, tuple]:
    """A chain of ``nodes`` graph nodes (a quarter of them linear layers)."""
    torch.manual_seed(0)
    return nn.Sequential(*[_Block() for _ in range(nodes // 4)]).eval(), (torch.randn(2, 8),)


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _baseline(model: nn.Module, inputs: tuple) -> None:
    gm = fx.symbolic_trace(model)
    with torch.no_grad():
        ShapeProp(gm).propagate(*inputs)


VERIFY = ("each", "end", False)


def measure_cost(model: nn.Module, inputs: tuple, repeat: int) -> dict:
    """Median seconds of the baseline, of optimize and of the pipeline alone per mode.
    The runs are interleaved so that load on a shared machine hits all of them alike."""
    gm = fxopt.capture(model, inputs, mode="symbolic")
    times: dict[str, list[float]] = {"base": []}
    _baseline(model, inputs)  # warm-up (imports, allocator)
    fxopt.optimize(model, inputs, "default", mode="symbolic")
    for _ in range(repeat):
        times["base"].append(_timed(lambda: _baseline(model, inputs)))
        for v in VERIFY:
            times.setdefault(f"optimize {v}", []).append(_timed(
                lambda v=v: fxopt.optimize(model, inputs, "default", mode="symbolic", verify=v)))
            work = copy.deepcopy(gm)
            times.setdefault(f"pipeline {v}", []).append(_timed(
                lambda v=v, work=work: fxopt.PassManager("default", verify=v).run(work, inputs)))
    return {k: statistics.median(t) for k, t in times.items()}


def cost_section(repeat: int) -> str:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: steadier ratios on a shared machine
    try:
        return _cost_section(repeat)
    finally:
        torch.set_num_threads(threads)


def _cost_section(repeat: int) -> str:
    entry = zoo.get("resnet50")
    model, inputs = entry.build(), entry.example_inputs()
    r50 = measure_cost(model, inputs, repeat)
    nodes = sum(1 for _ in fxopt.capture(model, inputs, mode="symbolic").graph.nodes)
    lines = [
        "## Verification cost: optimize vs symbolic_trace + ShapeProp",
        "",
        f"`python benchmarks/capture.py --cost-only` — torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"median of {repeat} interleaved runs. The baseline is `torch.fx.symbolic_trace` + one "
        "`ShapeProp` run of the same model in the same process; *optimize* is "
        "`fxopt.optimize(model, x, \"default\", verify=...)` (capture with its checks + "
        "pipeline), *pipeline* is `PassManager(\"default\", verify=...).run` on a captured "
        "graph. Budget: pipeline within 6x with verify=\"each\", 3x with \"end\".",
        "",
        f"ResNet-50-sized zoo model ({nodes} nodes, batch {inputs[0].shape[0]}): baseline "
        f"{r50['base'] * 1e3:.0f} ms",
        "",
        "| verify | optimize ms | optimize / baseline | pipeline ms | pipeline / baseline |",
        "|---|---:|---:|---:|---:|",
    ]
    for v in VERIFY:
        o, p = r50[f"optimize {v}"], r50[f"pipeline {v}"]
        lines.append(f"| {v!r} | {o * 1e3:.0f} | {o / r50['base']:.1f}x | {p * 1e3:.0f} "
                     f"| {p / r50['base']:.1f}x |")
    lines += [
        "",
        "Chain models (linear, relu, dropout, x*1 repeated; linear in graph size means the "
        "time per node stays put):",
        "",
        "| nodes | baseline us/node | optimize each us/node | optimize end us/node "
        "| pipeline each us/node | pipeline end us/node | optimize each / baseline |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for n in (4000, 8000):
        r = measure_cost(*chain_model(n), repeat=max(1, repeat // 3))
        per = {k: v / n * 1e6 for k, v in r.items()}
        lines.append(
            f"| {n} | {per['base']:.0f} | {per['optimize each']:.0f} | {per['optimize end']:.0f} "
            f"| {per['pipeline each']:.0f} | {per['pipeline end']:.0f} "
            f"| {r['optimize each'] / r['base']:.1f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cost-only", action="store_true",
                        help="only the verification-cost section")
    args = parser.parse_args()
    warnings.simplefilter("ignore")
    cost = cost_section(max(args.repeat, 3))
    write_section("verification_cost", cost)
    print(cost)
    if args.cost_only:
        return
    rows = [measure(n, m, args.repeat) for n in zoo.names(include_heavy=True)
            for m in ("symbolic", "export", "auto")]
    lines = [
        "## Capture coverage and time",
        "",
        f"`python benchmarks/capture.py` — torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"median of {args.repeat} runs. Times are wall clock on a shared machine: compare "
        "within the table, not across runs.",
        "",
        "| model | mode | captured | front end | dynamic batch | nodes (default pipeline) "
        "| capture ms | default pipeline ms |",
        "|---|---|---|---|---|---|---:|---:|",
    ]
    for r in rows:
        if r["ok"]:
            lines.append(
                f"| {r['model']} | {r['mode']} | yes | {r['frontend']} | {r['dynamic_batch']} "
                f"| {r['nodes']} | {r['capture_ms']:.0f} | {r['pipeline_ms']:.0f} |"
            )
        else:
            lines.append(f"| {r['model']} | {r['mode']} | no: {r['note']} | | | | | |")
    text = "\n".join(lines) + "\n"
    write_section("capture", text)
    print(text)


if __name__ == "__main__":
    main()
