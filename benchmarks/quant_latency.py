"""ONNX Runtime CPU latency and accuracy of fxopt's static int8 export vs the fp32 export
and vs ONNX Runtime's own ``quantize_static`` of that fp32 export.

Run:  .venv/bin/python benchmarks/quant_latency.py   (rewrites its section "quant-latency"
of benchmarks/RESULTS.md)

Per model, in a fresh process each, after an untimed warm-up of every route on a tiny CNN
(lazy imports, op registries): calibration data is ``--calib`` batches of the zoo's
random-normal images (each with a per-image, per-channel offset; no data set is used) in
the shape of the model's example inputs, drawn from one seed; the very same batches feed
both quantizers.

(a) *fp32*: ``torch.onnx.export(model, inputs, path)`` with torch's defaults (the
torch.export-based exporter, static shapes), console output silenced.
(b) *ortq*: ``onnxruntime.quantization.shape_inference.quant_pre_process`` on (a) (ORT's
``quantize_static`` logs "Please consider pre-processing before quantization" for a file
without it; where it fails, (a) is quantized as is and the table says so), then
``quantize_static(..., quant_format=QDQ, per_channel=True, activation_type=QUInt8,
weight_type=QInt8)`` with a ``CalibrationDataReader`` over the calibration batches (ORT's
default MinMax calibration).
(c) *fxopt*: ``fxopt.optimize(model, inputs, "default,quantize(scheme=int8,target=ort)",
calibration=batches)`` (default observer minmax; uint8 asymmetric per-tensor activations,
int8 symmetric per-channel weights), then ``fxopt.lower(res.module, "onnx", inputs)``
(opset 18, dynamic batch). The quantize pass and ``lower`` are given a loose tolerance
(the benchmark measures accuracy itself, below); whether the pass's own tolerance
(``fxopt.verify.QUANTIZED``) would have accepted the graph is reported.
(d) *fxopt-<clip>*: as (c) with ``observer=<clip>`` (``--clip-observer``, default
percentile), for accuracy only (not timed).

Timing: the three files (a)-(c) are opened with one and the same
``onnxruntime.SessionOptions`` (ORT_ENABLE_ALL, ``intra_op_num_threads`` = each
``--threads`` value, ``inter_op_num_threads`` = 1, CPU provider) and timed with
``fxopt.bench.compare_latency`` on ``session.run(None, feeds)`` with pre-built numpy feeds
of the example inputs: interleaved rounds (ABC, CBA, ...), median per call. Speed-ups are
time ratios (> 1: fxopt's file faster): fp32/fxopt, ortq/fxopt (and fp32/ortq), over all
samples and round by round (min / median / max).

Kernels: one extra session per file with ``optimized_model_filepath`` saves the graph ONNX
Runtime actually runs; the table counts its int8 kernels (QLinearConv, QGemm, QLinearAdd,
...) and what is left in float (Conv / FusedConv, Gemm, MatMul, Mul, ...) and the
QuantizeLinear / DequantizeLinear nodes that remain as such.

Accuracy: each file's outputs on ``--held-out`` held-out batches (the example inputs plus
fresh random images from another seed; none of them used for calibration) against the fp32
file's: cosine over all outputs pooled, the worst per-batch cosine, max abs error (with
max |fp32| for scale) and top-1 agreement of the last output dimension. The torch
fake-quant GraphModule fxopt produced is compared in the same way.

Flags: ``--models a,b`` (default resnet50,mobilenet,resnet), ``--threads 1,2`` (ORT
intra-op threads, one timing row per value; default 2), ``--rounds N``, ``--calib N``,
``--held-out N``, ``--clip-observer NAME|none``, ``--quick`` (small models, few repeats:
a smoke test, numbers meaningless), ``--no-write`` (print only; leave RESULTS.md alone),
``--in-process`` (no subprocess per model).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.bench import calibration_batches, compare_latency
from fxopt.bench.onnx_runtime import ort_quantize_static
from fxopt.lowering.onnx_export import quiet
from fxopt.verify import QUANTIZED, Tolerance, compare_outputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_support import (  # noqa: E402
    add_run_flags,
    cell,
    load_average,
    machine,
    ort_feeds,
    ort_options,
    ort_session,
    parse_models,
    parse_threads,
    print_row,
    run_isolated,
    short_error,
    spread,
)
from results_file import publish  # noqa: E402

MODELS = ("resnet50", "hf-resnet50", "mobilenet", "resnet")
QUICK_MODELS = ("mobilenet", "resnet")
KNOWN = (*zoo.names(include_heavy=True), "hf-resnet50")
ROW_MARK = "quant-latency-row-json: "
TORCH_THREADS = 1
TIMED = ("fp32", "ortq", "fxopt")
CALIB_SEED, HELD_OUT_SEED = 4242, 9191
# the benchmark measures accuracy itself: the pass and lower() must not refuse the graph
LOOSE = Tolerance(rtol=1e3, atol=1e3, min_cosine=None)

# ONNX Runtime's int8 kernels (contrib and standard ops) and the float ops that matter
INT8_OPS = ("QLinearConv", "ConvInteger", "QGemm", "QLinearMatMul", "MatMulInteger",
            "MatMulIntegerToFloat", "DynamicQuantizeMatMul", "QLinearAdd", "QLinearMul",
            "QLinearConcat", "QLinearAveragePool", "QLinearGlobalAveragePool",
            "QLinearSigmoid", "QLinearLeakyRelu", "QLinearSoftmax", "QLinearReduceMean",
            "NhwcMaxPool")
FLOAT_OPS = ("Conv", "FusedConv", "NhwcFusedConv", "Gemm", "FusedGemm", "MatMul",
             "FusedMatMul", "Add", "Mul", "HardSigmoid", "HardSwish", "ReduceMean",
             "GlobalAveragePool", "MaxPool")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# --------------------------------------------------------------------------- helpers
def _ops(model: onnx.ModelProto) -> dict[str, int]:
    return dict(Counter(n.op_type for n in model.graph.node))


def _ort_ops(path: Path, tmp: Path, threads: int) -> dict[str, int]:
    """Op counts of the graph ONNX Runtime runs (ORT_ENABLE_ALL) for ``path``."""
    out = tmp / f"{path.stem}.ort-optimized.onnx"
    try:
        ort_session(path, ort_options(threads, out))
        return _ops(onnx.load(str(out), load_external_data=False))
    finally:
        for f in (out, Path(f"{out}.data")):
            f.unlink(missing_ok=True)


def _batch_dim(path: Path) -> str:
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    first = next((i for i in graph.input if i.name not in inits), None)
    if first is None or not first.type.tensor_type.shape.dim:
        return "?"
    return "dynamic" if first.type.tensor_type.shape.dim[0].dim_param else "static"


def _images_like(inputs: tuple, count: int, seed: int) -> list[tuple]:
    """``count`` batches shaped like the example inputs (``fxopt.bench.calibration_batches``:
    the zoo's random images for image inputs)."""
    return calibration_batches(inputs, count, seed)


def _ort_quantize(fp32: Path, out: Path, tmp: Path, batches: list[tuple]) -> bool:
    """quant_pre_process + quantize_static; returns whether pre-processing was used."""
    return ort_quantize_static(fp32, out, batches, workdir=tmp)


def _fxopt_quantize(model: nn.Module, inputs: tuple, batches: list[tuple], path: Path,
                    observer: str = "minmax") -> tuple[nn.Module, dict]:
    pipeline = "default,quantize(scheme=int8,target=ort" + (
        f",observer={observer})" if observer != "minmax" else ")")
    start = time.perf_counter()
    res = fxopt.optimize(model, inputs, pipeline, calibration=batches,
                         tolerance={"quantize": LOOSE})
    optimize_s = time.perf_counter() - start
    with torch.no_grad():
        report = compare_outputs(model(*inputs), res.module(*inputs), QUANTIZED)
    start = time.perf_counter()
    art = fxopt.lower(res.module, "onnx", inputs, path=path, tolerance=LOOSE)
    info = {"optimize_s": optimize_s, "lower_s": time.perf_counter() - start,
            "exporter": art.manifest.get("exporter", "?"),
            "pass_tolerance_ok": report.ok(), "pass_cosine": report.cosine,
            "lower_max_rel": max(v["max_rel"] for v in art.manifest["verified"].values())}
    return res.module, info


def _flat(outputs) -> list[np.ndarray]:
    if isinstance(outputs, torch.Tensor):
        return [outputs.detach().numpy()]
    if isinstance(outputs, (list, tuple)):
        return [a for o in outputs for a in _flat(o)]
    return [np.asarray(outputs)]


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    return float(a @ b / (na * nb)) if na > 0 and nb > 0 else float("nan")


def _accuracy(ref: list[list[np.ndarray]], got: list[list[np.ndarray]]) -> dict:
    """Pooled cosine, worst per-batch cosine, max abs error, top-1 agreement (last dim of
    the first output) of ``got`` against ``ref``, one list of outputs per held-out batch."""
    flat_r = [np.concatenate([o.astype(np.float64).ravel() for o in r]) for r in ref]
    flat_g = [np.concatenate([o.astype(np.float64).ravel() for o in g]) for g in got]
    agree = total = 0
    for r, g in zip(ref, got):
        if r[0].ndim >= 1 and r[0].shape[-1] > 1:
            top_r, top_g = r[0].argmax(-1).ravel(), g[0].argmax(-1).ravel()
            agree += int((top_r == top_g).sum())
            total += top_r.size
    return {"cosine": _cos(np.concatenate(flat_r), np.concatenate(flat_g)),
            "min_cosine": min(_cos(r, g) for r, g in zip(flat_r, flat_g)),
            "max_abs": max(float(np.max(np.abs(r - g))) for r, g in zip(flat_r, flat_g)),
            "ref_max": max(float(np.max(np.abs(r))) for r in flat_r),
            "top1": [agree, total]}


def _warm_up(tmp: Path) -> None:
    """One untimed pass down every route measured here (lazy imports, op registries)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.Linear(4 * 6 * 6, 2)).eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(2)]
    with quiet():
        torch.onnx.export(model, inputs, str(tmp / "warm-fp32.onnx"))
    _ort_quantize(tmp / "warm-fp32.onnx", tmp / "warm-ortq.onnx", tmp, batches)
    _fxopt_quantize(model, inputs, batches, tmp / "warm-fxopt.onnx")


def _build_model(name: str):
    """A zoo model, or a real architecture nobody here wrote (``hf-resnet50``: Hugging Face
    ResNet-50 from its default config, BN statistics data-driven, as in latency.py)."""
    if name.startswith("hf-"):
        from latency import MODELS as REAL  # noqa: PLC0415 - benchmarks/latency.py

        model, inputs = REAL[name]()
        return _PooledOutput(model).eval(), inputs
    return zoo.load(name)


class _PooledOutput(torch.nn.Module):
    """A Hugging Face backbone returning its pooled features as one tensor (the timing and
    the error columns compare plain tensors)."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x).pooler_output.flatten(1)


# --------------------------------------------------------------------------- one model
def model_rows(name: str, timing: dict, thread_counts: list[int], n_calib: int,
               n_held: int, clip: str | None) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="fxopt-quant-bench-") as d:
        tmp = Path(d)
        _warm_up(tmp)
        model, inputs = _build_model(name)
        model.eval()
        calib = _images_like(inputs, n_calib, CALIB_SEED)
        held = [tuple(inputs)] + _images_like(inputs, n_held - 1, HELD_OUT_SEED)
        paths = {k: tmp / f"{name}-{k}.onnx" for k in TIMED}
        base: dict = {"model": name, "batch": int(inputs[0].shape[0]),
                      "shape": list(inputs[0].shape), "calib": n_calib, "held": n_held,
                      "build_s": {}, "errors": {}}

        start = time.perf_counter()
        with quiet():
            torch.onnx.export(model, inputs, str(paths["fp32"]))
        base["build_s"]["fp32"] = time.perf_counter() - start

        start = time.perf_counter()
        try:
            base["pre_process"] = _ort_quantize(paths["fp32"], paths["ortq"], tmp, calib)
        except Exception as e:
            base["errors"]["ortq"] = short_error(e)
        base["build_s"]["ortq"] = time.perf_counter() - start

        gms: dict[str, nn.Module] = {}
        variants = [("fxopt", "minmax")] + ([(f"fxopt-{clip}", clip)] if clip else [])
        for key, observer in variants:
            path = paths.get(key, tmp / f"{name}-{key}.onnx")
            paths[key] = path
            start = time.perf_counter()
            try:
                gms[key], base[f"{key}_info"] = _fxopt_quantize(model, inputs, calib, path,
                                                                observer)
            except Exception as e:
                base["errors"][key] = short_error(e)
            base["build_s"][key] = time.perf_counter() - start
        ok = [k for k in paths if k not in base["errors"]]
        print(f"  {name}: built {', '.join(ok)} "
              f"({', '.join(f'{k} {v:.1f} s' for k, v in base['build_s'].items())})",
              file=sys.stderr, flush=True)

        # kernels ONNX Runtime runs, and the files' own op counts
        base["file_ops"] = {k: _ops(onnx.load(str(paths[k]), load_external_data=False))
                            for k in ok}
        base["ort_ops"] = {k: _ort_ops(paths[k], tmp, thread_counts[0]) for k in ok}
        base["batch_dim"] = {k: _batch_dim(paths[k]) for k in ok}

        # accuracy against the fp32 file on held-out inputs
        outs = {}
        for k in ok:
            s = ort_session(paths[k], ort_options(thread_counts[0]))
            outs[k] = [[np.asarray(o) for o in s.run(None, ort_feeds(s, h))] for h in held]
        base["accuracy"] = {k: _accuracy(outs["fp32"], outs[k]) for k in ok if k != "fp32"}
        with torch.no_grad():
            for k, gm in gms.items():
                got = [_flat(gm(*h)) for h in held]
                base["accuracy"][f"{k} (torch)"] = _accuracy(outs["fp32"], got)

        rows = []
        for n in thread_counts:
            row = dict(base, threads=n)
            rows.append(row)
            if any(k in base["errors"] for k in TIMED):
                continue
            opts = ort_options(n)  # one SessionOptions object for all three sessions
            sessions = {k: ort_session(paths[k], opts) for k in TIMED}
            feeds = {k: ort_feeds(s, inputs) for k, s in sessions.items()}
            cmp = compare_latency(
                {k: (lambda s=sessions[k], f=feeds[k]: s.run(None, f)) for k in TIMED},
                (), **timing)
            per_round = {k: [st.median for st in cmp.per_round[k]] for k in TIMED}
            row["ms"] = {k: cmp.stats[k].median_ms for k in TIMED}
            row["speedup"] = {
                "fp32/fxopt": cmp.stats["fp32"].median / cmp.stats["fxopt"].median,
                "ortq/fxopt": cmp.stats["ortq"].median / cmp.stats["fxopt"].median,
                "fp32/ortq": cmp.stats["fp32"].median / cmp.stats["ortq"].median}
            row["rounds"] = {
                "fp32/fxopt": sorted(a / b for a, b in zip(per_round["fp32"],
                                                           per_round["fxopt"])),
                "ortq/fxopt": sorted(a / b for a, b in zip(per_round["ortq"],
                                                           per_round["fxopt"])),
                "fp32/ortq": sorted(a / b for a, b in zip(per_round["fp32"],
                                                          per_round["ortq"]))}
            print(f"  {name} ({n} threads): fp32 {row['ms']['fp32']:.2f} ms, ortq "
                  f"{row['ms']['ortq']:.2f} ms, fxopt {row['ms']['fxopt']:.2f} ms",
                  file=sys.stderr, flush=True)
        return rows


def model_isolated(name: str, args: argparse.Namespace) -> list[dict]:
    """``model_rows(name)`` in a fresh Python process (this script with ``--row-json``),
    so that one model's allocator state, thread pools and caches do not colour the next."""
    flags = ["--threads", args.threads, "--clip-observer", args.clip_observer]
    for flag, value in (("--rounds", args.rounds), ("--calib", args.calib),
                        ("--held-out", args.held_out)):
        if value:
            flags += [flag, str(value)]
    flags += ["--quick"] if args.quick else []
    return run_isolated(__file__, name, ROW_MARK, flags, relay="  ")


# --------------------------------------------------------------------------- report
def _kernels(ops: dict[str, int]) -> str:
    parts = [f"{k} {ops[k]}" for k in INT8_OPS if ops.get(k)]
    return ", ".join(parts) or "none"


def _float_ops(ops: dict[str, int]) -> str:
    parts = [f"{k} {ops[k]}" for k in FLOAT_OPS if ops.get(k)]
    return ", ".join(parts) or "none"


def _op_diff(a: dict[str, int], b: dict[str, int]) -> str:
    keys = sorted(set(a) | set(b))
    return ", ".join(f"{k} {b.get(k, 0) - a.get(k, 0):+d}" for k in keys
                     if a.get(k, 0) != b.get(k, 0)) or "none"


def _reading(rows: list[dict], timing: dict) -> str:
    """A paragraph computed from the measured rows (nothing in it is typed in by hand)."""
    parts = []
    for r in rows:
        if "ms" not in r:
            continue
        s, rs = r["speedup"], r["rounds"]
        vs_ortq = rs["ortq/fxopt"]
        faster = sum(x > 1 for x in vs_ortq)
        if faster >= 0.8 * len(vs_ortq):
            verdict = "faster than ORT's quantize_static"
        elif faster <= 0.2 * len(vs_ortq):
            verdict = "slower than ORT's quantize_static"
        else:
            verdict = "neither faster nor slower than ORT's quantize_static (within the noise)"
        pays = "int8 pays" if s["fp32/fxopt"] > 1.05 else (
            "int8 does not pay (fxopt's int8 file is no faster than fp32)")
        parts.append(
            f"{r['model']} (batch {r['batch']}, {r['threads']} thread"
            f"{'s' if r['threads'] > 1 else ''}): fxopt's int8 file is "
            f"{s['fp32/fxopt']:.2f}x fp32 and {s['ortq/fxopt']:.3f}x ORT's quantize_static "
            f"(per-round median {statistics.median(vs_ortq):.3f}, fxopt faster in "
            f"{faster}/{len(vs_ortq)} rounds): {verdict}; {pays}.")
    first = [r for r in rows if r["threads"] == rows[0]["threads"]]
    diffs = []
    for r in first:
        if "fxopt" in r["ort_ops"] and "ortq" in r["ort_ops"]:
            diffs.append(f"{r['model']}: {_op_diff(r['ort_ops']['ortq'], r['ort_ops']['fxopt'])}")
    clip = [(r["model"], k, _op_diff(r["ort_ops"]["fxopt"], r["ort_ops"][k])) for r in first
            for k in r["ort_ops"] if k.startswith("fxopt-") and "fxopt" in r["ort_ops"]]
    text = " ".join(parts)
    if diffs:
        text += (" Op counts of ONNX Runtime's optimized graphs that differ, fxopt minus "
                 "ortq: " + "; ".join(diffs) + ".")
    if clip:
        text += (" The clipping observer changes what ONNX Runtime runs (its file minus fxopt's "
                 "minmax file): " + "; ".join(f"{m} {k}: {d}" for m, k, d in clip) + ".")
    failed = [f"{r['model']} {k}: {v}" for r in first for k, v in r["errors"].items()]
    if failed:
        text += " Failed: " + "; ".join(failed) + "."
    if timing["rounds"] < 5:
        text += " (Smoke-test run: too few rounds for any of this to mean anything.)"
    return text


def section(rows: list[dict], args: argparse.Namespace, command: str, timing: dict,
            seconds: float, load: tuple[float, float], isolated: bool) -> str:
    per_round = (f"{timing['rounds']} interleaved rounds (ABC, CBA, ...), each at least "
                 f"{timing['repeat']} calls and {timing['min_time_s']:g} s per file per round, "
                 f"after {timing['warmup']} warm-up calls")
    first = [r for r in rows if r["threads"] == rows[0]["threads"]]
    pre = ", ".join(f"{r['model']} {'yes' if r.get('pre_process') else 'no (it failed)'}"
                    for r in first if "pre_process" in r)
    clip = args.clip_observer if args.clip_observer != "none" else None
    lines = [
        "## Static int8 in ONNX Runtime: fp32 vs ORT quantize_static vs fxopt",
        "",
        f"`{command}`{' (smoke test: numbers meaningless)' if args.quick else ''} — "
        f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPU provider), "
        f"{machine()}, Python {platform.python_version()}; 1-min load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after; {seconds:.0f} s for this section "
        f"({'each model in a fresh process' if isolated else 'all models in one process'}; "
        f"torch, which only exports and calibrates here, on {TORCH_THREADS} thread).",
        "",
        "*fp32*: `torch.onnx.export(model, inputs, path)` with torch's defaults (static "
        "shapes); *ortq*: ONNX Runtime's `quant_pre_process` on that file (used: "
        f"{pre or 'n/a'}), then `quantize_static` (QDQ, per-channel, activations QUInt8, "
        "weights QInt8, MinMax calibration); *fxopt*: `fxopt.optimize(model, inputs, "
        "\"default,quantize(scheme=int8,target=ort)\", calibration=batches)` (observer minmax; "
        "uint8 asymmetric per-tensor activations, int8 symmetric per-channel weights), then "
        "`fxopt.lower(..., \"onnx\")` (opset 18, dynamic batch). Both quantizers calibrate "
        "on the same batches: random-normal images with a per-image, per-channel offset in "
        "the shape of the example inputs (no data set; *calib* below). The three files are "
        "opened with the same `SessionOptions` (ORT_ENABLE_ALL, intra-op threads as in "
        "*threads*, inter-op 1, CPU provider) and timed with `fxopt.bench.compare_latency` "
        f"on `session.run(None, feeds)` of the example inputs: {per_round}; median per call. "
        "Speed-ups are time ratios over all samples (> 1: the second-named file is faster); "
        "*per round*: ortq/fxopt round by round, min / median / max, and in how many rounds "
        "fxopt's file was faster.",
        "",
        "| model | input | threads | fp32 ms | ortq ms | fxopt ms | fp32/fxopt "
        "| ortq/fxopt | ortq/fxopt per round | fxopt faster | fp32/ortq "
        "| fp32/fxopt per round |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        shape = "x".join(str(d) for d in r["shape"])
        if "ms" not in r:
            why = cell("; ".join(f"{k}: {v}" for k, v in r["errors"].items()) or "?")
            lines.append(f"| {r['model']} | {shape} | {r['threads']} | not timed: {why} "
                         "| | | | | | | | |")
            continue
        ms, s, rs = r["ms"], r["speedup"], r["rounds"]
        lines.append(
            f"| {r['model']} | {shape} | {r['threads']} | {ms['fp32']:.3f} "
            f"| {ms['ortq']:.3f} | {ms['fxopt']:.3f} | {s['fp32/fxopt']:.2f} "
            f"| {s['ortq/fxopt']:.3f} | {spread(rs['ortq/fxopt'])} "
            f"| {sum(x > 1 for x in rs['ortq/fxopt'])}/{len(rs['ortq/fxopt'])} "
            f"| {s['fp32/ortq']:.2f} | {spread(rs['fp32/fxopt'])} |")

    lines += [
        "",
        "**Kernels ONNX Runtime runs** (the ORT_ENABLE_ALL graph saved via "
        "`optimized_model_filepath`, one extra session per file). *int8 kernels*: "
        "QLinearConv, QGemm, QLinearMatMul, MatMulIntegerToFloat, QLinearAdd, QLinearMul, "
        "NhwcMaxPool (uint8 max pool), ... ; *float ops left*: compute ops that still run in "
        "fp32 (Conv / FusedConv, Gemm, MatMul, Mul, ...); *Q / DQ left*: QuantizeLinear / "
        "DequantizeLinear nodes that ONNX Runtime did not fold into an int8 kernel; *file "
        "Q / DQ*: the same counts in the file itself; *batch dim*: the file's batch "
        "dimension.",
        "",
        "| model | file | int8 kernels | float ops left | Q / DQ left | ORT nodes "
        "| file Q / DQ | batch dim | build s |",
        "|---|---|---|---|---|---:|---|---|---:|",
    ]
    for r in first:
        for k in [*TIMED, *([f"fxopt-{clip}"] if clip else [])]:
            if k not in r["ort_ops"]:
                if k in r["errors"]:
                    lines.append(f"| {r['model']} | {k} | failed: {cell(r['errors'][k])} "
                                 "| | | | | | |")
                continue
            o, f = r["ort_ops"][k], r["file_ops"][k]
            lines.append(
                f"| {r['model']} | {k} | {_kernels(o)} | {_float_ops(o)} "
                f"| {o.get('QuantizeLinear', 0)} / {o.get('DequantizeLinear', 0)} "
                f"| {sum(o.values())} | {f.get('QuantizeLinear', 0)} / "
                f"{f.get('DequantizeLinear', 0)} | {r['batch_dim'][k]} "
                f"| {r['build_s'][k]:.1f} |")

    lines += [
        "",
        "**Accuracy proxies** against the fp32 file's outputs (ONNX Runtime, same threads) "
        "on held-out inputs: the example inputs plus fresh random images from another seed, "
        "none used for calibration (*held-out* batches). *cosine*: over all outputs pooled; "
        "*worst*: the lowest per-batch cosine; *max abs err* with *max abs fp32* for scale; "
        "*top-1*: argmax agreement over the last dimension. Rows marked (torch): fxopt's "
        "fake-quant GraphModule run in torch, i.e. what fxopt simulated. *pass tol*: whether "
        "the quantize pass's own tolerance (`fxopt.verify.QUANTIZED`: max abs <= "
        f"{QUANTIZED.atol:g} + {QUANTIZED.rtol:g} max |ref|, cosine >= {QUANTIZED.min_cosine}, "
        "vs the float model on the example inputs) holds (this "
        "benchmark runs the pass with a loose tolerance so that it never refuses); "
        "*ORT vs torch*: the largest relative error `fxopt.lower` saw between ONNX Runtime "
        "on the file and the fake-quant GraphModule.",
        "",
        "| model | calib | held-out | file | cosine | worst | max abs err | max abs fp32 "
        "| top-1 | pass tol | ORT vs torch |",
        "|---|---:|---:|---|---:|---:|---:|---:|---:|---|---:|",
    ]
    for r in first:
        for k, a in r["accuracy"].items():
            info = r.get(f"{k}_info")
            tol = (f"{'ok' if info['pass_tolerance_ok'] else 'fails'} (cos "
                   f"{info['pass_cosine']:.4f})") if info else ""
            gap = f"{info['lower_max_rel']:.3f}" if info else ""
            agree, total = a["top1"]
            lines.append(
                f"| {r['model']} | {r['calib']} | {r['held']} | {k} | {a['cosine']:.5f} "
                f"| {a['min_cosine']:.5f} | {a['max_abs']:.3g} | {a['ref_max']:.3g} "
                f"| {agree}/{total} | {tol} | {gap} |")
    lines += ["", "**Reading the tables.** " + _reading(rows, timing)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None,
                        help="comma-separated zoo models (default: " + ",".join(MODELS)
                             + "; with --quick: " + ",".join(QUICK_MODELS) + ")")
    parser.add_argument("--threads", default="2",
                        help="ONNX Runtime intra-op threads, comma-separated (default 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 10; 2 with --quick)")
    parser.add_argument("--calib", type=int, default=None,
                        help="calibration batches (default 16; 4 with --quick)")
    parser.add_argument("--held-out", type=int, default=None,
                        help="held-out batches for accuracy, the example inputs included "
                             "(default 8; 3 with --quick)")
    parser.add_argument("--clip-observer", default="percentile",
                        help="a second fxopt observer, for accuracy only, or 'none' "
                             "(default percentile)")
    parser.add_argument("--quick", action="store_true",
                        help="small models, few repeats: a smoke test")
    add_run_flags(parser)
    args = parser.parse_args(argv)

    names = parse_models(parser, args.models, QUICK_MODELS if args.quick else MODELS, KNOWN)
    thread_counts = parse_threads(parser, args.threads)
    n_calib = args.calib or (4 if args.quick else 16)
    n_held = args.held_out or (3 if args.quick else 8)
    if n_calib < 1 or n_held < 1:
        parser.error("--calib and --held-out need at least 1")
    clip = None if args.clip_observer == "none" else args.clip_observer
    if args.quick:
        timing = {"rounds": args.rounds or 2, "warmup": 2, "repeat": 3, "min_time_s": 0.0}
    else:
        timing = {"rounds": args.rounds or 10, "warmup": 10, "repeat": 10, "min_time_s": 0.3}
    warnings.simplefilter("ignore")
    ort.set_default_logger_severity(3)
    # torch only exports and calibrates here (ONNX Runtime has its own threads): one thread
    # keeps its OpenMP workers from spin-waiting against another process on a small machine
    torch.set_num_threads(TORCH_THREADS)

    if args.row_json:
        for name in names:
            rows = model_rows(name, timing, thread_counts, n_calib, n_held, clip)
            print_row(ROW_MARK, rows)
        return

    command = "python benchmarks/quant_latency.py" + "".join(
        f" {flag}" for flag, on in (
            (f"--models {args.models}", args.models),
            (f"--threads {args.threads}", args.threads != "2"),
            (f"--rounds {args.rounds}", args.rounds), (f"--calib {args.calib}", args.calib),
            (f"--held-out {args.held_out}", args.held_out),
            (f"--clip-observer {args.clip_observer}", args.clip_observer != "percentile"),
            ("--quick", args.quick), ("--in-process", args.in_process)) if on)
    isolate = len(names) > 1 and not args.in_process
    load_before, start = load_average(), time.perf_counter()
    rows = []
    for name in names:
        rows += (model_isolated(name, args) if isolate
                 else model_rows(name, timing, thread_counts, n_calib, n_held, clip))
    rows.sort(key=lambda r: (r["threads"], names.index(r["model"])))
    text = section(rows, args, command, timing, time.perf_counter() - start,
                   (load_before, load_average()), isolate)
    publish("quant-latency", text, write=not args.no_write)


if __name__ == "__main__":
    main()
