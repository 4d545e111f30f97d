"""``fxopt.tune``'s choice per model, measured side by side with ONNX Runtime's peers.

Run:  .venv/bin/python benchmarks/tune.py   (rewrites its section "tune" of
benchmarks/RESULTS.md)

Per model, in a fresh process each:

1. ``fxopt.tune(model, inputs, budget="cosine>=0.99", threads=T)`` with the default search
   space (eager / ONNX Runtime x fp32 / fp16 / bf16 x static int8 per channel / per tensor /
   dynamic int8, float fallbacks from the sensitivity ranking, pruning bisected up to 0.5;
   MiniLM: ONNX Runtime and eager x dynamic / static int8 x bf16, no pruning, judged on
   real sentences instead of random token ids), calibration on the default random
   batches. Its wall time, the number of candidates it built and the winner's pipeline
   are reported.
2. A fresh side-by-side run: the winner rebuilt from its recipe's candidate
   (``fxopt.bench.build``, the same pipeline, runtime and calibration) next to every cell
   of ``fxopt bench``'s default table (PyTorch eager, fxopt eager, ONNX Runtime on the
   plain ``torch.onnx.export``, on fxopt's fp32 / int8 / dynamic int8 / fp16 exports, and
   ONNX Runtime's own ``quantize_static`` / ``quantize_dynamic`` of the plain export), all
   with ``T`` intra-op threads, timed with ``fxopt.bench.compare.interleave`` (``--rounds``
   interleaved rounds in alternating order, median per call).
3. Agreement on held-out inputs none of the above saw (random batches drawn like the
   calibration batches, ``fxopt.bench.candidates.calibration_batches``, from another seed;
   MiniLM: real sentences): cosine of each file's output with the PyTorch model's,
   mean / worst over the batches.

Flags: ``--models a,b`` (default resnet50,mobilenet,transformer,gqa,minilm), ``--threads T``
(default 2), ``--rounds N`` (default 10), ``--quick`` (small models, few rounds: a smoke
test, numbers meaningless), ``--no-write``, ``--in-process``. ``--train-images N
--train-time S``: the tuner also fine-tunes twins of its lossy candidates for S seconds
each (``fxopt.tune(..., train_data=, train_time=)``) on N training samples drawn like the
calibration batches from their own seed (the zoo has no real images; MiniLM: random token
ids like its inputs), labels none: output-cosine distillation from the original model.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
import bench_support as bs  # noqa: E402
from results_file import publish  # noqa: E402

import fxopt  # noqa: E402
from fxopt import zoo  # noqa: E402
from fxopt.bench.candidates import build, calibration_batches, default_candidates  # noqa: E402
from fxopt.bench.compare import interleave  # noqa: E402
from fxopt.tune import Space  # noqa: E402
from fxopt.tune.recipe import read_recipe  # noqa: E402
from fxopt.verify import cosine  # noqa: E402

MODELS = ("resnet50", "mobilenet", "transformer", "gqa", "minilm")
MARK = "TUNE_ROW "
BUDGET = "cosine>=0.99"
TRAIN_SEED = 777  # the training samples' draw (calibration: 4242, judged: 9000, held out: 501)


class _LastHidden(torch.nn.Module):
    """MiniLM's encoder, returning ``last_hidden_state`` (one tensor, as ONNX files do)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def load(name: str):
    """(model, inputs, held-out batches, space, what the agreement is on, the batches the
    tuner judges agreement on besides the example: None for its own random ones)."""
    if name != "minilm":
        model, inputs = zoo.load(name)
        held = calibration_batches(inputs, 4, seed=501)
        return (model.eval(), inputs, held, None,
                "random inputs drawn like the calibration batches, another seed", None)
    import quant_dynamic  # benchmarks/quant_dynamic.py: the tokenized sentences

    case = quant_dynamic.load_case("minilm")
    space = Space(quant=("dynamic", "int8"), precisions=("bf16",), prune=0.0)
    return (_LastHidden(case.model).eval(), case.inputs, case.eval_batches[1:], space,
            "real English sentences (padded to 64 tokens)",
            [(b, None) for b in case.select_batches])


def train_data(inputs: tuple, count: int) -> tuple[torch.Tensor, ...]:
    """``count`` samples drawn like the calibration batches (``TRAIN_SEED``), as one
    tensor per input: ``fxopt.finetune``'s ``(X,)`` form, no labels."""
    rows = -(-count // max(int(inputs[0].shape[0]), 1))
    batches = calibration_batches(inputs, rows, seed=TRAIN_SEED)
    return tuple(torch.cat([b[i] for b in batches])[:count] for i in range(len(inputs)))


def _first(out):
    return out if isinstance(out, torch.Tensor) else next(iter(out.values()) if isinstance(
        out, dict) else iter(out))


def held_out(fn, model, batches) -> tuple[float, float]:
    with torch.inference_mode():
        cs = [cosine(_first(model(*b)), _first(fn(*b))) for b in batches]
    return statistics.fmean(cs), min(cs)


def measure_model(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, inputs, held, space, held_what, judge = load(name)
    if args.quick:
        space = Space(runtimes=("onnx",), quant=("int8", "dynamic"), precisions=(), prune=0.0)
    train = train_data(inputs, args.train_images) if args.train_images else None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tune-bench-") as tmp:
        cache = Path(args.cache) / name if args.cache else Path(tmp) / "cache"
        res = fxopt.tune(model, inputs, BUDGET, space=space, cache=cache,
                         val_data=judge, train_data=train, train_time=args.train_time,
                         rounds=args.rounds // 2 or 1, threads=args.threads,
                         say=lambda m: print(f"  [{name}] {m}", file=sys.stderr, flush=True))
        tune_s = time.perf_counter() - started
        cand = read_recipe(res.recipe)["candidate"]
        tuned = type(cand)("tuned", cand.runtime, cand.pipeline, None, cand.options)
        cells = [c for c in default_candidates(model, inputs) if c.runtime != "tensorrt"]
        builts = []
        for c in [*cells, tuned]:
            print(f"  [{name}] building {c.name}", file=sys.stderr, flush=True)
            builts.append(build(c, model, inputs, workdir=Path(tmp) / "bench",
                                threads=args.threads,
                                train_data=train if c is tuned else None))
        ok = [b for b in builts if b.ok]
        cmp = interleave(ok, inputs, rounds=args.rounds, warmup=5, threads=args.threads)
        rows = {}
        for b in builts:
            row = {"error": b.error, "pipeline": b.candidate.pipeline}
            if b.ok:
                s = cmp.stats[b.candidate.name]
                per_round = [r.median for r in cmp.per_round[b.candidate.name]]
                mean, worst = held_out(b.fn, model, held)
                row |= {"ms": s.median_ms, "rounds_ms": [x * 1e3 for x in per_round],
                        "cos_mean": mean, "cos_worst": worst, "size": b.size_bytes}
            rows[b.candidate.name] = row
    return {"model": name, "input": " ".join("x".join(map(str, x.shape)) for x in inputs
                                             if isinstance(x, torch.Tensor)),
            "threads": args.threads, "rounds": args.rounds, "winner": res.winner,
            "pipeline": res.table.row(res.winner)["pipeline"],
            "runtime": cand.runtime, "tune_s": tune_s,
            "built": sum(1 for r in res.table.rows if r["status"] != "skipped"),
            "cached": sum(1 for r in res.table.rows if r.get("cached")),
            "tune_cos": res.table.row(res.winner)["cosine"], "rows": rows,
            "finetune": ({"samples": args.train_images, "seconds": args.train_time,
                          "twins": [r["name"] for r in res.table.rows
                                    if r["name"].endswith("+ft") or "+ft@" in r["name"]]}
                         if train is not None else None),
            "held_what": held_what, "table": str(res.table),
            "wall_s": time.perf_counter() - started}


def _ratio(rows: dict, a: str, b: str) -> tuple[float, float, float] | None:
    """median(a) / median(b) and its per-round min / max (> 1: b is faster)."""
    if "ms" not in rows.get(a, {}) or "ms" not in rows.get(b, {}):
        return None
    per = [x / y for x, y in zip(rows[a]["rounds_ms"], rows[b]["rounds_ms"])]
    return rows[a]["ms"] / rows[b]["ms"], min(per), max(per)


def _fmt(r) -> str:
    return "—" if r is None else f"{r[0]:.2f} ({r[1]:.2f}–{r[2]:.2f})"


def _partial(name: str, cache: Path) -> str:
    """What an unfinished model's search had judged so far (its cache records)."""
    recs = []
    for f in sorted((cache / "records").glob("*.json")):
        r = json.loads(f.read_text())
        if r.get("status") == "ranking":
            continue
        v = r.get("values") or {}
        recs.append(f"{r['name']} {r['status']}"
                    + (f" (cosine {v['cosine']:.5f})" if "cosine" in v else ""))
    return (f"*{name}*: the search did not finish before this section was written; what "
            f"it had judged (accuracy only, nothing timed yet): {'; '.join(recs) or 'nothing'}.")


def report(results: list[dict], args: argparse.Namespace, seconds: float,
           load_before: float, unfinished: list[str] = ()) -> str:
    import onnxruntime

    lines = [
        "## `fxopt tune`: the tuner's choice vs ONNX Runtime's peers", "",
        (f"`python benchmarks/tune.py --models M --cache DIR --threads {args.threads} --rounds "
         f"{args.rounds}{_train_flags(args)}` (one or more models per run, each in a fresh "
        "process), "
         "then `python benchmarks/tune.py --from-cache --cache DIR`" if args.from_cache else
         f"`python benchmarks/tune.py{' --quick' if args.quick else ''} --threads "
         f"{args.threads} --rounds {args.rounds}{_train_flags(args)}`")
        + f" — torch {torch.__version__}, onnxruntime "
        f"{onnxruntime.__version__}, {bs.machine()}; 1-min load average {load_before:.2f} "
        f"before, {bs.load_average():.2f} after; {seconds:.0f} s in all (each model in a "
        "fresh process).", "",
        f"Budget `{BUDGET}`. *tuned*: `fxopt.tune`'s winner (judged on the example inputs and "
        "two more batches drawn like the calibration batches), rebuilt from its recipe and "
        "timed side by side with every cell of `fxopt bench`'s default table, "
        f"{args.rounds} interleaved rounds, "
        f"{args.threads} intra-op threads (ONNX Runtime sessions that sleep rather than spin when "
        "idle, `fxopt.bench.onnx_runtime.session_options`), median per call. Ratios are time "
        "ratios *peer / "
        "tuned* (> 1: the tuned artifact is faster), with the per-round min–max. *plain*: ONNX "
        "Runtime on the plain `torch.onnx.export`; *ort-static* / *ort-dynamic*: ONNX "
        "Runtime's `quantize_static` (QDQ, per-channel, MinMax, the same calibration batches) "
        "/ `quantize_dynamic` of it; *best cell*: the fastest other cell of the table within "
        "the budget on the held-out inputs. *tune s*: the search's wall time in this run; "
        "*built*: candidates built and judged, *(N cached)*: of them, N taken from an earlier "
        "run's cache (the search resumes: their accuracy is not judged again, and tune s "
        "leaves their build time out). *cos*: held-out cosine with the PyTorch model, "
        "mean / worst over the held-out batches (4 random batches; MiniLM: one batch of 8 "
        "real sentences none of the tuner saw, so mean = worst)."
        + _twins_note(results, args), "",
        "| model | input | tuned (winner) | tune s | built | tuned ms | plain ms | plain/tuned "
        "| ort-static/tuned | ort-dynamic/tuned | best cell | best cell/tuned | tuned cos "
        "| ort-static cos | ort-dynamic cos |",
        "|---|---|---|---:|---:|---:|---:|---|---|---|---|---|---|---|---|"]
    verdicts = []
    for r in results:
        rows = r["rows"]
        within = {n: v for n, v in rows.items() if n not in ("tuned", "torch") and "ms" in v
                  and v["cos_worst"] >= 0.99}
        best = min(within, key=lambda n: within[n]["ms"]) if within else None

        def cos(n, rows=rows):
            v = rows.get(n, {})
            return f"{v['cos_mean']:.5f} / {v['cos_worst']:.5f}" if "ms" in v else "—"

        plain = _ratio(rows, "ort-plain", "tuned")
        static = _ratio(rows, "ort-quantize_static", "tuned")
        dyn = _ratio(rows, "ort-quantize_dynamic", "tuned")
        bestr = _ratio(rows, best, "tuned") if best else None
        lines.append(
            f"| {r['model']} | {r['input']} | {r['winner']} | {r['tune_s']:.0f} | {r['built']}"
            + (f" ({r['cached']} cached)" if r.get('cached') else "") + " "
            f"| {rows['tuned'].get('ms', float('nan')):.3f} | "
            f"{rows.get('ort-plain', {}).get('ms', float('nan')):.3f} | {_fmt(plain)} | "
            f"{_fmt(static)} | {_fmt(dyn)} | {best or '—'} | {_fmt(bestr)} | {cos('tuned')} | "
            f"{cos('ort-quantize_static')} | {cos('ort-quantize_dynamic')} |")
        verdicts.append(_verdict(r, plain, static, dyn, best, bestr))
    lines += ["", "**Against the targets** (measured in the run above; a ratio whose per-round "
              "range straddles 1 is a tie within this machine's noise):", ""]
    lines += [f"- {v}" for v in verdicts]
    lines += [f"- {u}" for u in unfinished]
    lines += ["", "Winners' pipelines:", ""]
    lines += [f"- {r['model']}: `{r['runtime']}` " + (f"`{r['pipeline']}`" if r["pipeline"]
              else "the plain `torch.onnx.export` (no fxopt pass)") for r in results]
    lines += ["", "<details><summary>The tuner's own tables (why every other candidate "
              "lost)</summary>", ""]
    for r in results:
        lines += [f"{r['model']}:", "", "```", r["table"], "```", ""]
    lines += ["</details>"]
    return "\n".join(lines)


def _twins_note(results: list[dict], args: argparse.Namespace) -> str:
    """What the fine-tuned twins were trained on: for the whole run, or (rows from the
    cache, measured with different flags) per model."""
    runs = [(r["model"], r["finetune"]) for r in results if r.get("finetune")]
    if not runs:
        return ""
    where = ("" if len(runs) == len(results) and not args.from_cache else
             " (" + ", ".join(f"{m}: `--train-images {f['samples']} --train-time "
                              f"{f['seconds']:g}`" for m, f in runs) + "; the other models "
             "without fine-tuning)")
    samples, secs = runs[0][1]["samples"], runs[0][1]["seconds"]
    return (f" Fine-tuned twins (`+ft`){where}: {samples} training samples drawn like the "
            f"calibration batches (seed {TRAIN_SEED}), {secs:g} s of distillation each "
            "(output cosine, lr 1e-4), at most 4 x that in all.")


def _train_flags(args: argparse.Namespace) -> str:
    if args.from_cache:
        return ""  # per model: _twins_note
    return (f" --train-images {args.train_images} --train-time {args.train_time:g}"
            if args.train_images else "")


def _noise(r) -> str:
    return " (its per-round range straddles 1: within noise)" if r and r[1] <= 1 <= r[2] else ""


def _verdict(r, plain, static, dyn, best, bestr) -> str:
    rows, m = r["rows"], r["model"]
    tuned_cos = rows["tuned"].get("cos_mean", float("nan"))
    if m == "resnet50":
        ok = plain and plain[0] >= 2.5 and static and static[0] >= 1.0
        return (f"*{m}* (>= 2.5x plain fp32, at least as fast as ORT's int8): "
                f"{'holds' if ok else 'does not hold'} — plain/tuned {_fmt(plain)}, "
                f"ort-static/tuned {_fmt(static)}.")
    if m == "mobilenet":
        ok = bestr is not None and bestr[0] >= 1.0
        tie = bestr is not None and bestr[1] <= 1.0 <= bestr[2]
        return (f"*{m}* (never slower than the best cell): "
                f"{'holds' if ok else ('a tie within noise' if tie else 'does not hold')} — "
                f"best cell {best}, best/tuned {_fmt(bestr)}{_noise(bestr)}.")
    dyn_cos = rows.get("ort-quantize_dynamic", {}).get("cos_mean", float("nan"))
    ok = dyn is not None and dyn[0] > 1.0 and tuned_cos > dyn_cos
    text = (f"*{m}* (faster than ORT's quantize_dynamic at better agreement): "
            f"{'holds' if ok else 'does not hold'} — ort-dynamic/tuned {_fmt(dyn)}{_noise(dyn)}, "
            f"held-out cosine {tuned_cos:.5f} vs {dyn_cos:.5f}.")
    cell = rows.get("ort-fxopt-dynamic_int8", {})
    if "ms" in cell and r["pipeline"] != cell.get("pipeline"):
        # the tuner may take pruning (or no int8) over fxopt's plain dynamic int8: say how
        # that file alone compares with ORT's, from the same run
        d = _ratio(rows, "ort-quantize_dynamic", "ort-fxopt-dynamic_int8")
        same = abs(cell["cos_mean"] - dyn_cos) < 1e-7
        text += (f" fxopt's own dynamic int8 file (ort-fxopt-dynamic_int8: every linear, no "
                 f"pruning) vs ORT's: ort-dynamic/it {_fmt(d)}{_noise(d)}, held-out cosine "
                 f"{cell['cos_mean']:.5f} vs {dyn_cos:.5f}"
                 + (" (the same int8 arithmetic: per-channel weights, per-tensor "
                    "activations)." if same else "."))
    elif "ms" in cell and abs(cell["cos_mean"] - dyn_cos) < 1e-7:
        text += (" The agreement is ORT's to 1e-7: the same int8 arithmetic (per-channel "
                 "weights, per-tensor activations).")
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", help="keep each model's tune cache and result row here: "
                        "a rerun resumes the search, and --from-cache reports stored rows")
    parser.add_argument("--from-cache", action="store_true",
                        help="measure nothing: write the section from the rows in --cache")
    parser.add_argument("--train-images", type=int, default=0, metavar="N",
                        help="training samples for fine-tuned twins (with --train-time)")
    parser.add_argument("--train-time", type=float, metavar="S",
                        help="seconds of fine-tuning per twin (with --train-images)")
    bs.add_run_flags(parser)
    args = parser.parse_args()
    if bool(args.train_images) != (args.train_time is not None) or args.train_images < 0:
        parser.error("--train-images N (> 0) and --train-time S go together")
    default = ("mobilenet", "transformer") if args.quick else MODELS
    names = bs.parse_models(parser, args.models, default, MODELS)
    if args.quick:
        args.rounds = min(args.rounds, 2)
    if args.row_json:
        bs.print_row(MARK, [measure_model(n, args) for n in names])
        return
    load_before, started = bs.load_average(), time.perf_counter()
    flags = ["--threads", str(args.threads), "--rounds", str(args.rounds)]
    flags += ["--quick"] if args.quick else []
    flags += ["--cache", args.cache] if args.cache else []
    flags += (["--train-images", str(args.train_images), "--train-time", str(args.train_time)]
              if args.train_images else [])
    results, unfinished = [], []
    for n in names:
        stored = Path(args.cache or ".") / f"{n}.row.json"
        if args.from_cache:
            if stored.is_file():
                results.append(json.loads(stored.read_text()))
            else:
                unfinished.append(_partial(n, Path(args.cache) / n))
            continue
        print(f"tuning {n}", file=sys.stderr, flush=True)
        results += ([measure_model(n, args)] if args.in_process or len(names) == 1 else
                    bs.run_isolated(__file__, n, MARK, flags, relay="  ["))
        if args.cache:
            stored.write_text(json.dumps(results[-1]))
    if args.from_cache and results:  # the stored rows say how they were measured
        args.threads, args.rounds = results[0]["threads"], results[0].get("rounds", args.rounds)
    seconds = (sum(r["wall_s"] for r in results) if args.from_cache
               else time.perf_counter() - started)
    publish("tune", report(results, args, seconds, load_before, unfinished),
            write=not args.no_write and not args.quick)


if __name__ == "__main__":
    main()
