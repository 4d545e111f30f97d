"""Capture coverage and capture + default-pipeline time per zoo model and mode.

Run:  .venv/bin/python benchmarks/capture.py   (rewrites its section of benchmarks/RESULTS.md)

For each zoo model (the ResNet-50-sized one included) and each capture mode it records
whether capture succeeded, which front end was used, whether another batch size works,
and the wall time of capture and of the default pipeline (median of --repeat runs).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import warnings

import torch

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    warnings.simplefilter("ignore")
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
