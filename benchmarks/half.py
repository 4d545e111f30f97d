"""Mixed precision: accuracy, artifact sizes and CPU latency of the ``half`` pass.

Run:  .venv/bin/python benchmarks/half.py   (rewrites its section of benchmarks/RESULTS.md)

For every zoo model: ``fxopt.optimize(model, inputs, "default,half(dtype=D)")`` for fp16
and bf16; max relative error (max |err| / max |ref|) and cosine of the outputs against the
fp32 model on the example inputs, the fp32 islands the pass chose, and the size of the
eager artifact and of the ONNX file (fp16) against the fp32 ones. Latency: eager CPU,
fp32 default-pipeline graph vs the bf16 graph, interleaved rounds
(``fxopt.bench.compare_latency``), on the models where it can pay. The GPU rows need the
lent GPU machine; this script says so when there is none instead of inventing figures.
Flags: ``--models a,b``, ``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import torch

import fxopt
from fxopt import zoo
from fxopt.bench import compare_latency
from fxopt.verify import Tolerance, compare_outputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import publish  # noqa: E402

LATENCY_MODELS = ("resnet50", "transformer", "resnet", "mobilenet")
LOOSE = Tolerance(rtol=5e-2, atol=1e-3, min_cosine=0.99)


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() \
        else path.stat().st_size


def _accuracy_row(name: str, tmp: Path) -> list[str]:
    model, inputs = zoo.load(name)
    with torch.no_grad():
        want = model(*inputs)
    base = fxopt.optimize(model, inputs, "default").module
    fxopt.lower(base, "eager", inputs, path=tmp / f"{name}-fp32")
    fxopt.lower(base, "onnx", inputs, path=tmp / f"{name}-fp32.onnx")
    rows = []
    for dtype in ("fp16", "bf16"):
        res = fxopt.optimize(model, inputs, f"default,half(dtype={dtype})")
        stats = next(r for r in res.report.to_dict() if r["name"] == "half")["stats"]
        with torch.no_grad():
            cmp = compare_outputs(want, res.module(*inputs))
        fxopt.lower(res.module, "eager", inputs, path=tmp / f"{name}-{dtype}")
        eager = _size(tmp / f"{name}-{dtype}") / _size(tmp / f"{name}-fp32")
        onnx_ratio = "—"
        if dtype == "fp16":
            art = fxopt.lower(res.module, "onnx", inputs, path=tmp / f"{name}-fp16.onnx",
                              tolerance=LOOSE)
            onnx_ratio = f"{_size(art.path) / _size(tmp / f'{name}-fp32.onnx'):.2f}"
        islands = stats["fp32_nodes"]
        shown = ", ".join(islands[:4]) + (f" (+{len(islands) - 4})" if len(islands) > 4 else "")
        rows.append(f"| {name} | {dtype} | {cmp.rel:.2e} | {cmp.cosine:.6f} | "
                    f"{len(islands)}: {shown or 'none'} | {stats['casts']} | "
                    f"{eager:.2f} | {onnx_ratio} |")
    return rows


def _latency_row(name: str) -> str:
    model, inputs = zoo.load(name)
    fp32 = fxopt.optimize(model, inputs, "default").module
    # measured, not gated: the pass's own tolerance may refuse bf16 on deep models, and
    # the error columns say so
    bf16 = fxopt.optimize(model, inputs, "default,half(dtype=bf16)",
                          tolerance={"half": Tolerance(rtol=1.0, atol=1.0)}).module
    with torch.no_grad():
        err = compare_outputs(model(*inputs), bf16(*inputs))
    cmp = compare_latency({"fp32": fp32, "bf16": bf16}, inputs, rounds=5)
    rounds = sorted(cmp.round_speedups["bf16"])
    return (f"| {name} | {tuple(inputs[0].shape)} | {cmp.stats['fp32'].median_ms:.3f} | "
            f"{cmp.stats['bf16'].median_ms:.3f} | {cmp.speedups['bf16']:.2f} | "
            f"{rounds[0]:.2f} / {rounds[len(rounds) // 2]:.2f} / {rounds[-1]:.2f} | "
            f"{err.rel:.2e} / {err.cosine:.5f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=",".join(zoo.names()))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    names = args.models.split(",")
    with tempfile.TemporaryDirectory(prefix="fxopt-half-") as d:
        accuracy = [r for n in names for r in _accuracy_row(n, Path(d))]
    latency = [_latency_row(n) for n in LATENCY_MODELS if n in names or n == "resnet50"]
    flags = open("/proc/cpuinfo").read() if os.path.exists("/proc/cpuinfo") else ""
    bf16_cpu = "avx512_bf16" in flags or "amx_bf16" in flags
    gpu = (f"GPU: {torch.cuda.get_device_name(0)}" if torch.cuda.is_available() else
           "GPU: none was lent to the task that produced this table, so there are no GPU "
           "fp16 figures here (run this script on the lent machine to add them)")
    body = "\n".join([
        "## Mixed precision (`half` pass)",
        "",
        f"`python benchmarks/half.py` — torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads; CPU bf16 instructions: "
        f"{'yes (avx512_bf16/amx)' if bf16_cpu else 'no'}. {gpu}.",
        "",
        "*max rel*: max |err| / max |ref| of the outputs vs the fp32 model; *fp32 islands*: "
        "compute nodes the default policy kept in float32; *eager* / *ONNX*: artifact size "
        "vs the fp32 artifact of the same graph.",
        "",
        "| model | dtype | max rel | cosine | fp32 islands | casts | eager size | ONNX size |",
        "|---|---|---:|---:|---|---:|---:|---:|",
        *accuracy,
        "",
        "Eager CPU latency, fp32 default pipeline vs bf16 (median per call, 5 interleaved "
        "rounds; speed-up > 1: bf16 faster; per round min / median / max):",
        "",
        "| model | input | fp32 ms | bf16 ms | speed-up | per round | bf16 max rel / cosine |",
        "|---|---|---:|---:|---:|---|---|",
        *latency,
    ])
    publish("half", body, write=not args.no_write)


if __name__ == "__main__":
    main()
