"""Which layers the sensitivity analysis keeps in float, per zoo model.

Run:  .venv/bin/python benchmarks/quant_sensitivity.py   (rewrites its section of RESULTS.md)

For every zoo model: ``fxopt.optimize(model, inputs, "default,quantize(scheme=int8,
target=ort,budget=T)", calibration=...)`` with T halfway between the fully quantized
model's output cosine and 1 (halve the error), so every model has something to give back.
Calibration: the example inputs plus 7 seeded random batches like them; the budget is
checked on the example inputs and 8 calibration batches. The table lists the cosine
before and after the fallback, the layers returned to float (worst first, as ranked by
quantizing one layer at a time), and the three most sensitive layers with the error
(1 - cosine) each adds alone. Flags: ``--models a,b``, ``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

import fxopt
from fxopt import zoo
from fxopt.verify import cosine, random_like_inputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import publish  # noqa: E402


def _row(name: str) -> str:
    model, inputs = zoo.load(name)
    calibration = [inputs] + [random_like_inputs(inputs, seed=i + 1) for i in range(7)]
    plain = fxopt.optimize(model, inputs, "default,quantize(scheme=int8,target=ort)",
                           calibration=calibration)
    with torch.no_grad():
        before = cosine(model(*inputs), plain.module(*inputs))
    budget = 1 - (1 - before) / 2
    start = time.perf_counter()
    res = fxopt.optimize(
        model, inputs, f"default,quantize(scheme=int8,target=ort,budget={budget:.8f})",
        calibration=calibration)
    seconds = time.perf_counter() - start
    stats = next(r for r in res.report.to_dict() if r["name"] == "quantize")["stats"]
    kept = ", ".join(f"`{k}`" for k in stats["kept_float"]) or "none"
    top = ", ".join(f"`{n}` {e:.1e}" for n, e in stats["sensitivity"][:3])
    return (f"| {name} | {stats['metric_before']:.6f} | {budget:.6f} | "
            f"{stats['metric_after']:.6f} | {len(stats['kept_float'])} | {kept} | {top} | "
            f"{seconds:.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [_row(name) for name in args.models.split(",")]
    body = "\n".join([
        "## Sensitivity analysis: layers kept in float for an accuracy budget",
        "",
        f"`python benchmarks/quant_sensitivity.py` — torch {torch.__version__}, 1 thread. "
        "*cosine*: outputs vs the float model over the probe batches; *budget*: halfway "
        "between the fully quantized cosine and 1; *kept float*: layers the fallback "
        "returned to float, worst first; *most sensitive*: error (1 - cosine) each layer "
        "adds when it alone is quantized. Names are module paths (`path:node` where one "
        "module path holds several ops).",
        "",
        "| model | cosine all int8 | budget | cosine after | kept | kept float | "
        "most sensitive | s |",
        "|---|---:|---:|---:|---:|---|---|---:|",
        *rows,
    ])
    publish("quant-sensitivity", body, write=not args.no_write)


if __name__ == "__main__":
    main()
