"""ONNX export coverage per capture mode and exporter, and ONNX Runtime latency of fxopt's
export vs a plain ``torch.onnx.export`` of the original model.

Run:  .venv/bin/python benchmarks/onnx_export.py   (rewrites its two sections of
benchmarks/RESULTS.md: "onnx-export" and "onnx-latency")

*onnx-export*: for every zoo model (the ResNet-50-sized one only with ``--heavy``), each
capture mode (symbolic, export) and each exporter (dynamo, torchscript, named explicitly,
never "auto"), ``fxopt.optimize(model, inputs, "default", mode=mode)`` and then
``fxopt.lower(res.module, "onnx", inputs, exporter=...)`` with fxopt's defaults (opset 18,
dynamic batch). A row records whether the file was written (``lower`` raises
``LoweringError`` when the export fails or ONNX Runtime does not reproduce the
GraphModule on the example inputs and on random inputs with the batch grown by one), the
largest relative error ONNX Runtime showed over those checks (``manifest["verified"]``),
the ONNX node count before -> after fxopt's cleanup, the wall time of the ``lower`` call
and the export + cleanup time fxopt recorded (``manifest["export_seconds"]``). All models
run in one process after an untimed warm-up export (the first export in a process pays
for lazy imports and registry set-up, seconds that would otherwise land on one row).

*onnx-latency*: per model, in a fresh process each, after the same untimed warm-up:
(a) *plain*: ``torch.onnx.export(model, inputs, path)`` with torch's defaults (the
torch.export-based exporter with its own ONNX optimizer, static shapes), only its console
output silenced; (b) *fxopt*: ``fxopt.optimize(model, inputs, "default")`` then
``fxopt.lower(res.module, "onnx", inputs, exporter="auto")`` (dynamic batch). Both files
are opened with one and the same ``onnxruntime.SessionOptions`` (ORT_ENABLE_ALL,
``intra_op_num_threads`` = each ``--threads`` value, ``inter_op_num_threads`` = 1, CPU
provider) and timed with ``fxopt.bench.compare_latency`` on wrappers around
``session.run(None, feeds)`` with pre-built numpy feeds: interleaved rounds (AB, BA, ...),
median per call. Speed-up = plain median / fxopt median (> 1: fxopt's file is faster),
with the per-round min-max spread. Node counts are those of the two files and of the graph
ONNX Runtime actually runs (one extra session per file with ``optimized_model_filepath``).
The error column is the largest absolute difference between the two sessions' outputs.

Flags: ``--models a,b`` (default: all; restricts both sections), ``--threads 1,2``
(ORT intra-op threads, one row per value; default 1), ``--rounds N``, ``--heavy`` (also
resnet50 in the export table), ``--sections export,latency``, ``--quick`` (three small
models and few repeats unless ``--models`` is given: a smoke test, numbers meaningless),
``--no-write`` (print only; leave RESULTS.md alone), ``--in-process`` (no subprocess per
model).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import re
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
from fxopt.bench import compare_latency
from fxopt.errors import CaptureError
from fxopt.lowering.onnx_export import quiet

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
    spread,
)
from results_file import write_section  # noqa: E402

LATENCY_MODELS = ("resnet", "mobilenet", "densenet", "shufflenet", "decoder", "dynamic",
                  "resnet50", "transformer", "gqa", "mlp")
QUICK_MODELS = ("resnet", "dynamic", "mlp")
ALL_MODELS = tuple(dict.fromkeys([*zoo.names(include_heavy=True), *LATENCY_MODELS]))
MODES = ("symbolic", "export")
EXPORTERS = ("dynamo", "torchscript")
ROW_MARK = "onnx-latency-row-json: "
TORCH_THREADS = 1


# --------------------------------------------------------------------------- helpers
_ORT_BOILERPLATE = re.compile(
    r"\[ONNXRuntimeError\] : \d+ : \w+ : Non-zero status code returned while running ")
_HINT = re.compile(r" \(the exporter fixed a dynamic dimension[^)]*\)")


def short_reason(e: BaseException, limit: int = 130) -> str:
    """The first ~100 characters of an error, with fxopt's long hint about traced sizes
    replaced by a footnote mark (†) and ONNX Runtime's boilerplate (status prefix, node
    name, source location, C++ signature) dropped."""
    text = " ".join(str(e).split())
    text = _HINT.sub(" †", text)
    text = _ORT_BOILERPLATE.sub("ORT: ", text)
    text = text.replace("Status Message: ", "")
    # ORT's node name, source location and C++ signature crowd out what went wrong
    text = re.sub(r"Name:'[^']*' ", "", text)
    text = re.sub(r"/onnxruntime_src/\S+:\d+ ", "", text)
    text = re.sub(r"(?:\w+ )?onnxruntime::[\w:~]+(?:\([^)]*\)?)?\s*", "", text)
    root = os.path.dirname(os.path.dirname(os.path.abspath(fxopt.__file__)))
    text = f"{type(e).__name__}: {text.replace(root + os.sep, '').strip()}"
    return text if len(text) <= limit else text[: limit - 1].rstrip() + "…"


def _warm_up(tmp: Path) -> None:
    """One untimed export down every path measured here (lazy imports, op registries)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                          nn.LazyLinear(2)).eval()
    inputs = (torch.randn(2, 3, 8, 8),)
    model(*inputs)
    with quiet():
        torch.onnx.export(model, inputs, str(tmp / "warm-plain.onnx"))
    for mode in MODES:
        gm = fxopt.optimize(model, inputs, "default", mode=mode).module
        for exporter in EXPORTERS:
            fxopt.lower(gm, "onnx", inputs, path=tmp / f"warm-{mode}-{exporter}.onnx",
                        exporter=exporter)


def _nodes(path: Path) -> int:
    return len(onnx.load(str(path), load_external_data=False).graph.node)


def _ops(path: Path) -> dict[str, int]:
    return dict(Counter(n.op_type for n in
                        onnx.load(str(path), load_external_data=False).graph.node))


def _opset(path: Path) -> int | None:
    model = onnx.load(str(path), load_external_data=False)
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)


def _batch_dim(path: Path) -> str:
    """"dynamic" / "static" for the first input's dimension 0 of an ONNX file."""
    graph = onnx.load(str(path), load_external_data=False).graph
    inits = {i.name for i in graph.initializer}
    first = next((i for i in graph.input if i.name not in inits), None)
    if first is None or not first.type.tensor_type.shape.dim:
        return "?"
    return "dynamic" if first.type.tensor_type.shape.dim[0].dim_param else "static"


# --------------------------------------------------------------------------- export table
def export_rows(names: list[str], tmp: Path) -> list[dict]:
    rows = []
    for name in names:
        model, inputs = zoo.load(name)
        model.eval()
        for mode in MODES:
            try:
                gm = fxopt.optimize(model, inputs, "default", mode=mode).module
            except CaptureError as e:
                rows.append({"model": name, "mode": mode, "exporter": "—", "ok": False,
                             "reason": "not captured: " + short_reason(e)})
                continue
            for exporter in EXPORTERS:
                row = {"model": name, "mode": mode, "exporter": exporter}
                start = time.perf_counter()
                try:
                    art = fxopt.lower(gm, "onnx", inputs,
                                      path=tmp / f"{name}-{mode}-{exporter}.onnx",
                                      exporter=exporter)
                except Exception as e:  # LoweringError expected; anything else is reported too
                    row.update(ok=False, reason=short_reason(e),
                               lower_s=time.perf_counter() - start)
                    rows.append(row)
                    continue
                m = art.manifest
                row.update(ok=True, lower_s=time.perf_counter() - start,
                           export_s=m["export_seconds"],
                           max_rel=max(v["max_rel"] for v in m["verified"].values()),
                           checks=len(m["verified"]),
                           nodes=(m["clean"]["nodes_before"], m["clean"]["nodes_after"]))
                rows.append(row)
            print(f"  export {name}/{mode}: " + ", ".join(
                f"{r['exporter']} {'ok' if r['ok'] else 'failed'}"
                for r in rows if r["model"] == name and r["mode"] == mode),
                file=sys.stderr, flush=True)
    return rows


def export_section(rows: list[dict], args: argparse.Namespace, command: str,
                   seconds: float, load: tuple[float, float]) -> str:
    ok = sum(r["ok"] for r in rows)
    lines = [
        "## ONNX export: capture mode x exporter",
        "",
        f"`{command}`{' (smoke test)' if args.quick else ''} — torch {torch.__version__}, "
        f"onnx {onnx.__version__}, onnxruntime {ort.__version__}, "
        f"onnxscript {_version('onnxscript')}, {machine()}, torch on {torch.get_num_threads()} "
        f"thread(s), Python {platform.python_version()}; 1-min load average {load[0]:.2f} "
        f"before, {load[1]:.2f} after; {seconds:.0f} s for this table.",
        "",
        "Each zoo model's example inputs (batch in the latency table below), "
        "`fxopt.optimize(model, inputs, \"default\", mode=...)`, then `fxopt.lower(gm, "
        "\"onnx\", inputs, exporter=...)` with opset 18 and a dynamic batch dimension, all in "
        "one process after an untimed warm-up export. *ok*: the file was written, i.e. ONNX "
        "Runtime (CPU) reproduced the GraphModule on the example inputs and on random inputs "
        "with the batch grown by one; *max rel err*: the largest max-abs-error / "
        "max-|output| over those checks; *nodes*: ONNX nodes before -> after fxopt's cleanup "
        "(constant folding, dead code, CSE); *lower s*: wall time of the whole `lower` call "
        "(export, cleanup, checker, two ONNX Runtime checks, writes); *export s*: export + "
        "cleanup as recorded in the file's manifest. Failure reasons are the first ~100 "
        "characters of the error; † stands for fxopt's hint \"the exporter fixed a dynamic "
        "dimension to its traced size, as the TorchScript exporter does with ATen graphs "
        "from torch.export; use exporter='dynamo' or export with dynamic=False\". "
        f"{ok} of {len(rows)} rows ok.",
        "",
        "| model | capture | exporter | result | max rel err | nodes | lower s | export s |",
        "|---|---|---|---|---:|---|---:|---:|",
    ]
    for r in rows:
        if r["ok"]:
            lines.append(
                f"| {r['model']} | {r['mode']} | {r['exporter']} | ok "
                f"| {r['max_rel']:.1e} | {r['nodes'][0]} -> {r['nodes'][1]} "
                f"| {r['lower_s']:.2f} | {r['export_s']:.2f} |")
        else:
            lower_s = f"{r['lower_s']:.2f}" if "lower_s" in r else ""
            lines.append(f"| {r['model']} | {r['mode']} | {r['exporter']} "
                         f"| failed: {cell(r['reason'])} | | | {lower_s} | |")
    failed = [r for r in rows if not r["ok"]]
    if failed:
        by_kind: dict[str, list[str]] = {}
        for r in failed:
            by_kind.setdefault(f"{r['mode']}/{r['exporter']}", []).append(r["model"])
        lines += ["", "Failures by capture/exporter: " + "; ".join(
            f"{k}: {', '.join(v)}" for k, v in by_kind.items()) + "."]
    return "\n".join(lines) + "\n"


def _version(dist: str) -> str:
    import importlib.metadata

    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- latency
def _ort_nodes(path: Path, tmp: Path, threads: int) -> int | None:
    """Node count of the graph ONNX Runtime runs (ORT_ENABLE_ALL) for ``path``."""
    out = tmp / f"{path.stem}.ort-optimized.onnx"
    try:
        ort_session(path, ort_options(threads, out))
        return _nodes(out)
    except Exception:
        return None
    finally:
        for f in (out, Path(f"{out}.data")):
            f.unlink(missing_ok=True)


def latency_rows(name: str, timing: dict, thread_counts: list[int]) -> list[dict]:
    with tempfile.TemporaryDirectory(prefix="fxopt-onnx-bench-") as d:
        tmp = Path(d)
        _warm_up(tmp)
        model, inputs = zoo.load(name)
        model.eval()
        plain_path, fx_path = tmp / f"{name}-plain.onnx", tmp / f"{name}-fxopt.onnx"
        base = {"model": name, "batch": int(inputs[0].shape[0])}

        start = time.perf_counter()
        try:
            with quiet():
                torch.onnx.export(model, inputs, str(plain_path))
            base["plain_s"] = time.perf_counter() - start
        except Exception as e:
            base["plain_s"] = time.perf_counter() - start
            base["plain_error"] = short_reason(e)

        start = time.perf_counter()
        try:
            res = fxopt.optimize(model, inputs, "default")
            base["optimize_s"] = time.perf_counter() - start
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                art = fxopt.lower(res.module, "onnx", inputs, path=fx_path, exporter="auto")
            base["lower_s"] = time.perf_counter() - start - base["optimize_s"]
            base["fx_exporter"] = art.manifest.get("exporter", "?")
            base["fallback"] = [str(w.message)[:200] for w in caught
                                if "exporter because" in str(w.message)]
        except Exception as e:
            base["fx_s"] = time.perf_counter() - start
            base["fx_error"] = short_reason(e)

        for k, path in (("plain", plain_path), ("fx", fx_path)):
            if f"{k}_error" not in base:
                base[f"{k}_nodes"] = _nodes(path)
                base[f"{k}_ops"] = _ops(path)
                base[f"{k}_batch"] = _batch_dim(path)
                base[f"{k}_opset"] = _opset(path)
                base[f"{k}_ort_nodes"] = _ort_nodes(path, tmp, thread_counts[0])

        rows = []
        for n in thread_counts:
            row = dict(base, threads=n)
            rows.append(row)
            if "plain_error" in base or "fx_error" in base:
                continue
            opts = ort_options(n)  # one SessionOptions object for both sessions
            plain, fx = ort_session(plain_path, opts), ort_session(fx_path, opts)
            pf, ff = ort_feeds(plain, inputs), ort_feeds(fx, inputs)
            outs_p, outs_f = plain.run(None, pf), fx.run(None, ff)
            if len(outs_p) != len(outs_f) or any(
                    a.shape != b.shape for a, b in zip(outs_p, outs_f)):
                row["max_abs"] = float("nan")
                row["note"] = "outputs differ in number or shape"
            else:
                row["max_abs"] = max(
                    float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                    if np.size(a) else 0.0 for a, b in zip(outs_p, outs_f))
            cmp = compare_latency(
                {"plain": lambda s=plain, f=pf: s.run(None, f),
                 "fxopt": lambda s=fx, f=ff: s.run(None, f)}, (), **timing)
            row.update(plain_ms=cmp.stats["plain"].median_ms,
                       fx_ms=cmp.stats["fxopt"].median_ms,
                       speedup=cmp.speedups["fxopt"],
                       rounds=sorted(cmp.round_speedups["fxopt"]))
            print(f"  latency {name} ({n} threads): {row['speedup']:.3f}x",
                  file=sys.stderr, flush=True)
        return rows


def latency_isolated(name: str, args: argparse.Namespace) -> list[dict]:
    """``latency_rows(name)`` in a fresh Python process (this script with ``--row-json``),
    so that one model's allocator state, thread pools and caches do not colour the next."""
    flags = ["--sections", "latency", "--threads", args.threads]
    flags += ["--rounds", str(args.rounds)] if args.rounds else []
    flags += ["--quick"] if args.quick else []
    return run_isolated(__file__, name, ROW_MARK, flags, relay="  latency ")


def _fmt_nodes(row: dict, key: str) -> str:
    p, f = row.get(f"plain_{key}"), row.get(f"fx_{key}")
    return " / ".join("?" if v is None else str(v) for v in (p, f))


def _op_diff(plain: dict[str, int], fx: dict[str, int]) -> str:
    keys = sorted(set(plain) | set(fx))
    return ", ".join(f"{k} {fx.get(k, 0) - plain.get(k, 0):+d}" for k in keys
                     if fx.get(k, 0) != plain.get(k, 0))


INFO_MODELS = ("transformer", "gqa", "mlp")  # in the latency table for information


def _geomean(values: list[float]) -> float:
    return math.exp(statistics.fmean(math.log(v) for v in values))


def _reading(rows: list[dict], timing: dict) -> str:
    """A paragraph computed from the measured rows (nothing in it is typed in by hand)."""
    timed = [r for r in rows if "speedup" in r]
    parts = []
    for n in sorted({r["threads"] for r in timed}):
        rs = [r for r in timed if r["threads"] == n]
        cnn = [r["speedup"] for r in rs if r["model"] not in INFO_MODELS]

        def med(r: dict) -> str:
            return f"{r['model']} {statistics.median(r['rounds']):.3f}"

        def share(r: dict) -> float:
            return sum(x > 1 for x in r["rounds"]) / len(r["rounds"])

        faster = [med(r) for r in rs if share(r) >= 0.8]
        slower = [med(r) for r in rs if share(r) <= 0.2]
        mixed = [med(r) for r in rs if 0.2 < share(r) < 0.8]
        geo = _geomean([r["speedup"] for r in rs])
        parts.append(
            f"With {n} intra-op thread{'s' if n > 1 else ''} the geometric-mean speed-up over "
            f"all {len(rs)} timed model{'s' if len(rs) > 1 else ''} is {geo:.3f} (fxopt's file "
            f"{'faster' if geo > 1 else 'slower'} by {abs(geo - 1) * 100:.1f}%)"
            + (f", over the {len(cnn)} CNN{'s' if len(cnn) > 1 else ''} alone "
               f"{_geomean(cnn):.3f}" if cnn else "")
            + ". Per-round median speed-ups: fxopt's file faster in at least 80% of rounds on "
            f"{', '.join(faster) or 'no model'}; slower in at least 80% of rounds on "
            f"{', '.join(slower) or 'no model'}; neither (within the noise of this machine) "
            f"on {', '.join(mixed) or 'no model'}. A difference of about 1% can be "
            "consistent across rounds here and still depend on the CPU and the ONNX Runtime "
            "build.")
    first = [r for r in timed if r["threads"] == timed[0]["threads"]] if timed else []
    same_file = [r["model"] for r in first if r["plain_nodes"] == r["fx_nodes"]]
    same_ort = [r["model"] for r in first if r["plain_ort_nodes"] == r["fx_ort_nodes"]]
    diffs = [f"{r['model']} ({_op_diff(r['plain_ops'], r['fx_ops'])})" for r in first
             if r["plain_ops"] != r["fx_ops"]]
    bn = [f"{r['model']} ({r['plain_ops'].get('BatchNormalization', 0)} in plain, "
          f"{r['fx_ops'].get('BatchNormalization', 0)} in fxopt's)" for r in first
          if r["plain_ops"].get("BatchNormalization") or r["fx_ops"].get("BatchNormalization")]
    shape = sorted({f"opset {r['plain_opset']}, {r['plain_batch']} batch (plain) vs opset "
                    f"{r['fx_opset']}, {r['fx_batch']} batch (fxopt)" for r in first})
    failed = [f"{r['model']} ({'plain' if 'plain_error' in r else 'fxopt'}: "
              f"{r.get('plain_error') or r.get('fx_error')})"
              for r in rows if "speedup" not in r and r["threads"] == rows[0]["threads"]]
    fallback = [r["model"] for r in rows if r.get("fallback")
                and r["threads"] == rows[0]["threads"]]
    text = " ".join(parts)
    if first:
        text += (
            f" The two files have the same ONNX node count on {len(same_file)} of "
            f"{len(first)} timed models, and ONNX Runtime's optimized graphs the same node "
            f"count on {len(same_ort)}. Op counts that differ (fxopt minus plain): "
            f"{'; '.join(diffs) or 'none'}. BatchNormalization nodes left: "
            f"{', '.join(bn) or 'none'}. The files differ in {'; '.join(shape)}: a dynamic "
            "batch costs Shape/Slice/Concat arithmetic wherever a reshape depends on it, and "
            "the opset decides which ONNX ops (e.g. Gelu, from opset 20) and which ONNX "
            "Runtime kernel versions are available.")
    if fallback:
        text += f" fxopt fell back to the TorchScript exporter on {', '.join(fallback)}."
    if failed:
        text += f" Not timed: {'; '.join(failed)}."
    if timing["rounds"] < 5:
        text += " (Smoke-test run: too few rounds for any of this to mean anything.)"
    return text


def latency_section(rows: list[dict], args: argparse.Namespace, command: str,
                    timing: dict, seconds: float, load: tuple[float, float],
                    isolated: bool) -> str:
    per_round = (f"{timing['rounds']} interleaved rounds (AB, BA, ...), each at least "
                 f"{timing['repeat']} calls and {timing['min_time_s']:g} s per file per "
                 f"round, after {timing['warmup']} warm-up calls")
    lines = [
        "## ONNX Runtime CPU latency: plain torch.onnx.export vs fxopt",
        "",
        f"`{command}`{' (smoke test: numbers meaningless)' if args.quick else ''} — "
        f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPU provider), "
        f"{machine()}, Python {platform.python_version()}; 1-min load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after; {seconds:.0f} s for this table "
        f"({'each model in a fresh process' if isolated else 'all models in one process'}"
        f"; torch itself, which only exports and verifies here, on {TORCH_THREADS} "
        f"thread{'s' if TORCH_THREADS > 1 else ''}).",
        "",
        "*plain*: `torch.onnx.export(model, inputs, path)` with torch's defaults (the "
        "torch.export-based exporter and its ONNX optimizer; no dynamic shapes, so the batch "
        "is fixed), console output silenced; *fxopt*: `fxopt.optimize(model, inputs, "
        f"\"default\")` (pipeline: {', '.join(fxopt.PIPELINES['default'])}) then "
        "`fxopt.lower(..., \"onnx\", exporter=\"auto\")` (opset 18, dynamic batch). "
        "*export s*: wall time of each route, fxopt's as optimize + lower; both include "
        "checks of their own (fxopt's capture check, per-pass verification and two ONNX "
        "Runtime runs of the file; the plain route verifies nothing). Both files are opened "
        "with the same `SessionOptions` (ORT_ENABLE_ALL, intra-op threads as in the "
        "*threads* column, inter-op 1, CPU provider) and timed with "
        f"`fxopt.bench.compare_latency` on `session.run(None, feeds)`: {per_round}; median "
        "per call. *Speed-up* = plain median / fxopt median (> 1: fxopt's file is faster); "
        "*per round*: the same ratio round by round, min / median / max, and in how many "
        "rounds fxopt's file was faster. *nodes*: ONNX nodes in the two files, plain / "
        "fxopt; *ORT nodes*: nodes in the graph ONNX Runtime runs after its own "
        "ORT_ENABLE_ALL optimizations (saved once per file via "
        "`optimized_model_filepath`); *batch dim*: whether the file's batch dimension is "
        "static or dynamic, plain / fxopt; *opset*: the files' ONNX opsets, plain / fxopt "
        "(torch.onnx.export picks its own default; fxopt.lower defaults to 18); *max abs "
        "diff*: between the two sessions' outputs on the example inputs.",
        "",
        "| model | batch | threads | plain export s | fxopt s (optimize + lower) "
        "| plain ms | fxopt ms | speed-up | per round min / med / max | fxopt faster "
        "| nodes | ORT nodes | batch dim | opset | max abs diff |",
        "|---|---:|---:|---:|---|---:|---:|---:|---|---:|---|---|---|---|---:|",
    ]
    for r in rows:
        plain_s = f"{r['plain_s']:.2f}" + (" (failed)" if "plain_error" in r else "")
        if "fx_error" in r:
            fx_s = f"{r['fx_s']:.2f} (failed)"
        else:
            fx_s = f"{r['optimize_s'] + r['lower_s']:.2f} ({r['optimize_s']:.2f} + " \
                   f"{r['lower_s']:.2f})" + ("" if r["fx_exporter"] == "dynamo"
                                              else f", {r['fx_exporter']}")
        if "speedup" not in r:
            why = cell(r.get("plain_error") or r.get("fx_error") or "?")
            lines.append(f"| {r['model']} | {r['batch']} | {r['threads']} | {plain_s} "
                         f"| {fx_s} | not timed: {why} | | | | | {_fmt_nodes(r, 'nodes')} "
                         f"| {_fmt_nodes(r, 'ort_nodes')} | {_fmt_nodes(r, 'batch')} "
                         f"| {_fmt_nodes(r, 'opset')} | |")
            continue
        rs = r["rounds"]
        lines.append(
            f"| {r['model']} | {r['batch']} | {r['threads']} | {plain_s} | {fx_s} "
            f"| {r['plain_ms']:.3f} | {r['fx_ms']:.3f} | {r['speedup']:.3f} "
            f"| {spread(rs)} "
            f"| {sum(x > 1 for x in rs)}/{len(rs)} | {_fmt_nodes(r, 'nodes')} "
            f"| {_fmt_nodes(r, 'ort_nodes')} | {_fmt_nodes(r, 'batch')} "
            f"| {_fmt_nodes(r, 'opset')} | {r['max_abs']:.2e} |")
    lines += ["", "**Reading the table.** " + _reading(rows, timing)]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of: {', '.join(ALL_MODELS)} "
                             "(default: all; with --quick: " + ",".join(QUICK_MODELS) + ")")
    parser.add_argument("--threads", default="1",
                        help="ONNX Runtime intra-op threads, comma-separated (default 1)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved plain/fxopt rounds (default 10; 2 with --quick)")
    parser.add_argument("--heavy", action="store_true",
                        help="include resnet50 in the export table too")
    parser.add_argument("--sections", default="export,latency",
                        help="which sections to run: export, latency or both (default)")
    parser.add_argument("--quick", action="store_true",
                        help="three small models, few repeats: a smoke test")
    add_run_flags(parser)
    args = parser.parse_args(argv)

    names = parse_models(parser, args.models, QUICK_MODELS if args.quick else ALL_MODELS,
                         ALL_MODELS)
    sections = {s.strip() for s in args.sections.split(",") if s.strip()}
    if not sections or sections - {"export", "latency"}:
        parser.error("--sections takes export, latency or export,latency")
    thread_counts = parse_threads(parser, args.threads)
    if args.quick:
        timing = {"rounds": args.rounds or 2, "warmup": 2, "repeat": 3, "min_time_s": 0.0}
    else:
        timing = {"rounds": args.rounds or 10, "warmup": 10, "repeat": 20, "min_time_s": 0.25}
    warnings.simplefilter("ignore")
    ort.set_default_logger_severity(3)
    # torch only exports and verifies here (ONNX Runtime has its own threads): one thread
    # keeps its OpenMP workers from spin-waiting against another process on a small
    # machine, which was seen to stretch a 0.1 s optimize() to several seconds at random.
    torch.set_num_threads(TORCH_THREADS)

    if args.row_json:
        for name in names:
            print_row(ROW_MARK, latency_rows(name, timing, thread_counts))
        return

    command = "python benchmarks/onnx_export.py" + "".join(
        f" {flag}" for flag, on in (
            (f"--models {args.models}", args.models), (f"--threads {args.threads}",
                                                       args.threads != "1"),
            (f"--rounds {args.rounds}", args.rounds), ("--heavy", args.heavy),
            (f"--sections {args.sections}", sections != {"export", "latency"}),
            ("--quick", args.quick), ("--in-process", args.in_process)) if on)
    texts = []
    if "export" in sections:
        export_names = [n for n in names if n in zoo.names(include_heavy=args.heavy)]
        if export_names:
            load_before, start = load_average(), time.perf_counter()
            with tempfile.TemporaryDirectory(prefix="fxopt-onnx-export-") as d:
                _warm_up(Path(d))
                rows = export_rows(export_names, Path(d))
            text = export_section(rows, args, command, time.perf_counter() - start,
                                  (load_before, load_average()))
            if not args.no_write:
                write_section("onnx-export", text)
            texts.append(text)
    if "latency" in sections:
        latency_names = [n for n in names if n in LATENCY_MODELS]
        if latency_names:
            isolate = len(latency_names) > 1 and not args.in_process
            load_before, start = load_average(), time.perf_counter()
            rows = []
            for name in latency_names:
                rows += (latency_isolated(name, args) if isolate
                         else latency_rows(name, timing, thread_counts))
            rows.sort(key=lambda r: (r["threads"], latency_names.index(r["model"])))
            text = latency_section(rows, args, command, timing, time.perf_counter() - start,
                                   (load_before, load_average()), isolate)
            if not args.no_write:
                write_section("onnx-latency", text)
            texts.append(text)
    print("\n".join(texts))


if __name__ == "__main__":
    main()
