"""Accuracy of static int8 quantization (PTQ) and quantization-aware training (QAT) on
real data: scikit-learn's handwritten digits, eager fake-quant and ONNX Runtime int8.

Run:  .venv/bin/python benchmarks/quant_accuracy.py   (rewrites its section of
benchmarks/RESULTS.md; ``--no-write`` only prints)

Data: ``sklearn.datasets.load_digits`` (1797 8x8 grey images, 10 classes; shipped inside
scikit-learn, no download), pixels scaled to [0, 1], split by a seeded permutation into
1200 training and 597 test images. Model: a small CNN (conv-BN-ReLU x3 with two max
pools, then a linear classifier) trained from a seeded initialisation with Adam and a
one-cycle schedule. Every setting is scored on the 597 test images (one image = 0.17
accuracy points):

* float: the trained model, eager, and its plain ONNX export in ONNX Runtime;
* PTQ: ``fxopt.optimize(model, inputs, "default,quantize(scheme=int8,...)",
  calibration=10 training batches of 32)`` for target ``ort`` with the minmax,
  percentile, entropy and mse activation observers, per-tensor weights
  (``per_channel=False``), and target ``tensorrt``; the fake-quant GraphModule is scored
  eagerly and, exported with ``fxopt.lower(gm, "onnx", ...)``, in ONNX Runtime on its
  int8 kernels (the ``tensorrt`` placement is scored eagerly only: no TensorRT here);
* QAT: ``fxopt.quant.qat.prepare_qat`` on the minmax PTQ graph, a short fine-tune (SGD,
  momentum 0.9, cosine decay) on the training set, ``freeze_qat``, scored like PTQ; with
  observed scales and with learnable (LSQ-style) scales.

int8 barely touches this easy task, so a clearly labelled *harder setting* follows: a
narrow CNN (width 4) with 3-bit per-tensor weights, built from the int8 PTQ graph by
re-quantizing each weight fake-quant node to a 3-bit grid (activations stay uint8). It is
scored eagerly only: fxopt's ONNX export writes Q/DQ as int8 QuantizeLinear, which does
not clamp to a 3-bit range, so ``fxopt.lower`` refuses the file (its verification sees
the difference). One test set of 597 images makes single-run differences of a few
tenths of a point noise, so the headline settings are also repeated over several seeds
(data split, initialisation and batch order all change), eager only.

Flags: ``--seed N`` (the detailed tables; default 0), ``--seeds N`` (seeds 0..N-1 in the
summary; default 5, 0 skips it), ``--threads N`` (intra-op threads for torch and ONNX
Runtime; default 1: these models are tiny, and on a busy 2-core machine two threads made
training 15-50x slower through OpenMP oversubscription), ``--epochs N`` (float training,
default 12), ``--qat-epochs N`` (default 3), ``--qat-lr`` (default 3e-3), ``--no-write``.
"""

from __future__ import annotations

import argparse
import copy
import operator
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import onnxruntime as ort
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.bench import threads
from fxopt.errors import FxoptError
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.quant.qat import freeze_qat, prepare_qat, weight_fake_quants

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from results_file import publish  # noqa: E402

BATCH = 32
CALIBRATION_BATCHES = 10
TRAIN_SIZE = 1200
HARD_BITS = 3
PTQ_TARGET = 0.5  # the targets, in accuracy points
QAT_TARGET = 0.2
DEFAULTS = {"seed": 0, "seeds": 5, "threads": 1, "epochs": 12, "qat_epochs": 3,
            "qat_lr": 3e-3, "width": 16, "hard_width": 4}


# --------------------------------------------------------------------------- data, model


@dataclass
class Digits:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor

    def batches(self, seed: int):
        """The training set in shuffled batches of BATCH, order fixed by ``seed``."""
        order = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(seed))
        for i in range(0, len(order) - BATCH + 1, BATCH):
            idx = order[i:i + BATCH]
            yield self.x_train[idx], self.y_train[idx]

    def calibration(self) -> list[torch.Tensor]:
        return [self.x_train[i * BATCH:(i + 1) * BATCH] for i in range(CALIBRATION_BATCHES)]


def load_data(seed: int) -> Digits:
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(len(x)))
    train, test = perm[:TRAIN_SIZE], perm[TRAIN_SIZE:]
    return Digits(x[train], y[train], x[test], y[test])


def digits_cnn(width: int) -> nn.Sequential:
    """conv-BN-ReLU (8x8) x2, max pool, conv-BN-ReLU (4x4), max pool, linear (2x2 -> 10)."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(*block(1, width), *block(width, 2 * width), nn.MaxPool2d(2),
                         *block(2 * width, 4 * width), nn.MaxPool2d(2), nn.Flatten(),
                         nn.Linear(16 * width, 10))


def train_float(width: int, data: Digits, epochs: int, seed: int) -> tuple[nn.Module, float]:
    torch.manual_seed(seed)
    model = digits_cnn(width)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    steps = epochs * (len(data.x_train) // BATCH)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=steps)
    start = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        for x, y in data.batches(seed * 1000 + epoch):
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval(), time.perf_counter() - start


# --------------------------------------------------------------------------- PTQ and QAT


def ptq(model: nn.Module, data: Digits, options: str) -> tuple[fx.GraphModule, float]:
    start = time.perf_counter()
    res = fxopt.optimize(model, (data.x_train[:BATCH],),
                         f"default,quantize(scheme=int8,{options})",
                         calibration=data.calibration())
    return res.module, time.perf_counter() - start


def low_bit_weights(gm: fx.GraphModule, bits: int, per_channel: bool) -> fx.GraphModule:
    """Re-quantize every weight fake-quant node of an int8 PTQ graph to ``bits`` bits
    (symmetric minmax), in place: the harder setting (weights on a 2**bits-level grid)."""
    for path, (_, w_node) in weight_fake_quants(gm).items():
        weight = operator.attrgetter(w_node.target)(gm).detach()
        fq = FakeQuantize(bits=bits, signed=True, symmetric=True,
                          axis=0 if per_channel else None,
                          channels=weight.shape[0] if per_channel else 1, mode="observe")
        fq(weight)
        fq.freeze(where=path)
        gm.add_submodule(path, fq)
    return gm


def qat(ptq_gm: fx.GraphModule, data: Digits, *, learnable: bool, epochs: int, lr: float,
        seed: int) -> tuple[fx.GraphModule, float]:
    """prepare_qat on a copy of ``ptq_gm``, fine-tune, freeze_qat; returns it and seconds."""
    start = time.perf_counter()
    gm = prepare_qat(copy.deepcopy(ptq_gm), learnable=learnable)
    named = [(n, p) for n, p in gm.named_parameters() if p.requires_grad]
    # learned scales get their own, much smaller step: their gradients are summed over
    # every element they scale, and a scale is ~1e-2 (LSQ scales the gradient instead)
    groups = [{"params": [p for n, p in named if not n.endswith(".scale")]},
              {"params": [p for n, p in named if n.endswith(".scale")], "lr": lr * 1e-2}]
    opt = torch.optim.SGD([g for g in groups if g["params"]], lr=lr, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(
        opt, epochs * (len(data.x_train) // BATCH))
    for epoch in range(epochs):
        for x, y in data.batches(seed * 1000 + 500 + epoch):
            opt.zero_grad()
            F.cross_entropy(gm(x), y).backward()
            opt.step()
            sched.step()
    freeze_qat(gm)
    return gm, time.perf_counter() - start


# --------------------------------------------------------------------------- scoring


@dataclass
class Row:
    setting: str
    eager: float | None = None
    ort: float | None = None
    agree: float | None = None  # top-1 agreement with the float model's eager predictions
    seconds: float | None = None
    timed: str = ""


def predictions(fn, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return fn(x).argmax(1)


def accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return (pred == y).float().mean().item() * 100


class Scorer:
    """Scores modules of one float model eagerly and, optionally, through ONNX Runtime."""

    def __init__(self, data: Digits, workdir: str | None, n_threads: int) -> None:
        self.data, self.workdir, self.n_threads = data, workdir, n_threads
        self.example = (data.x_train[:BATCH],)
        self.reference: torch.Tensor | None = None  # the float model's predictions
        self.exports = 0

    def row(self, setting: str, fn, seconds: float | None, timed: str, *,
            onnx: bool = True) -> Row:
        pred = predictions(fn, self.data.x_test)
        if self.reference is None:
            self.reference = pred
        row = Row(setting, accuracy(pred, self.data.y_test), None,
                  accuracy(pred, self.reference), seconds, timed)
        if onnx and self.workdir is not None:
            gm = fn if isinstance(fn, fx.GraphModule) else fxopt.capture(fn, self.example)
            self.exports += 1
            path = os.path.join(self.workdir, f"m{self.exports}.onnx")
            art = fxopt.lower(gm, "onnx", self.example, path=path, threads=self.n_threads)
            row.ort = accuracy(art(self.data.x_test).argmax(1), self.data.y_test)
        if self.workdir is not None:
            print(f"  {setting}: eager {row.eager:.2f}"
                  + (f", ORT {row.ort:.2f}" if row.ort is not None else ""), file=sys.stderr)
        return row


def try_ptq(scorer: Scorer, label: str, model: nn.Module, options: str, *,
            onnx: bool = True) -> tuple[Row, fx.GraphModule | None]:
    try:
        gm, seconds = ptq(model, scorer.data, options)
    except FxoptError as e:  # e.g. a calibrator whose clipping fails fxopt's verification
        reason = str(e).split(";")[0]
        print(f"  {label}: refused: {reason}", file=sys.stderr)
        return Row(label, timed=f"refused by fxopt.optimize: {reason}"), None
    return scorer.row(label, gm, seconds, "fxopt.optimize + calibration", onnx=onnx), gm


# --------------------------------------------------------------------------- measurements


def measure_main(args: argparse.Namespace, data: Digits, seed: int, workdir: str | None,
                 n_threads: int, *, full: bool) -> list[Row]:
    """The int8 settings for one seed; ``full``: every observer and target, else the
    headline rows only (float, PTQ minmax, both QATs)."""
    scorer = Scorer(data, workdir, n_threads)
    kw = dict(epochs=args.qat_epochs, lr=args.qat_lr, seed=seed)
    model, seconds = train_float(args.width, data, args.epochs, seed)
    rows = [scorer.row(f"float (width {args.width})", model, seconds,
                       f"training, {args.epochs} epochs")]
    row, base = try_ptq(scorer, "PTQ int8 ort, minmax", model, "target=ort")
    rows.append(row)
    if full:
        for observer in ("percentile", "entropy", "mse"):
            rows.append(try_ptq(scorer, f"PTQ int8 ort, {observer}", model,
                                f"target=ort,observer={observer}")[0])
        rows.append(try_ptq(scorer, "PTQ int8 ort, minmax, per-tensor weights", model,
                            "target=ort,per_channel=False")[0])
        rows.append(try_ptq(scorer, "PTQ int8 tensorrt, minmax", model, "target=tensorrt",
                            onnx=False)[0])
    for learnable in (False, True):
        gm, seconds = qat(base, data, learnable=learnable, **kw)
        kind = "learnable" if learnable else "observed"
        rows.append(scorer.row(f"QAT int8 ort, minmax, {kind} scales", gm, seconds,
                               f"prepare_qat + {args.qat_epochs} epochs + freeze_qat"))
    return rows


def measure_hard(args: argparse.Namespace, data: Digits, seed: int, workdir: str | None,
                 n_threads: int) -> list[Row]:
    """The harder setting: narrow CNN, 3-bit per-tensor weights (eager only)."""
    scorer = Scorer(data, workdir, n_threads)
    kw = dict(epochs=args.qat_epochs, lr=args.qat_lr, seed=seed)
    label = f"W{HARD_BITS} (per-tensor) A8"
    model, seconds = train_float(args.hard_width, data, args.epochs, seed)
    rows = [scorer.row(f"float (width {args.hard_width})", model, seconds,
                       f"training, {args.epochs} epochs")]
    row, int8 = try_ptq(scorer, "PTQ int8 ort, minmax", model, "target=ort")
    rows.append(row)
    low = low_bit_weights(copy.deepcopy(int8), HARD_BITS, per_channel=False)
    rows.append(scorer.row(f"PTQ {label}, minmax", low, row.seconds,
                           "the int8 PTQ pass it starts from", onnx=False))
    for learnable in (False, True):
        gm, seconds = qat(low, data, learnable=learnable, **kw)
        kind = "learnable" if learnable else "observed"
        rows.append(scorer.row(f"QAT {label}, {kind} scales", gm, seconds,
                               f"prepare_qat + {args.qat_epochs} epochs + freeze_qat",
                               onnx=False))
    return rows


def summary(args: argparse.Namespace, n_threads: int) -> dict[str, list[float]]:
    """Eager accuracy change vs float of the headline settings over seeds 0..seeds-1."""
    deltas: dict[str, list[float]] = {}
    for seed in range(args.seeds):
        data = load_data(seed)
        for table, rows in (("main", measure_main(args, data, seed, None, n_threads,
                                                  full=False)),
                            ("harder", measure_hard(args, data, seed, None, n_threads))):
            for r in rows[1:]:
                deltas.setdefault(f"{table}: {r.setting}", []).append(r.eager - rows[0].eager)
        print(f"  summary: seed {seed} done", file=sys.stderr)
    return deltas


# --------------------------------------------------------------------------- report


def _pts(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def _delta(value: float | None, ref: float) -> str:
    return "—" if value is None else f"{value - ref:+.2f}"


def table(rows: list[Row]) -> list[str]:
    ref = rows[0].eager
    lines = ["| setting | accuracy eager % | accuracy ORT % | Δ vs float eager / ORT (points) "
             "| agrees with float % | time s | timed |",
             "|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if r.eager is None:
            lines.append(f"| {r.setting} | — | — | — | — | — | {r.timed} |")
            continue
        lines.append(f"| {r.setting} | {r.eager:.2f} | {_pts(r.ort)} "
                     f"| {_delta(r.eager, ref)} / {_delta(r.ort, ref)} | {r.agree:.1f} "
                     f"| {_pts(r.seconds)} | {r.timed} |")
    return lines


def summary_table(deltas: dict[str, list[float]]) -> list[str]:
    lines = ["| setting | mean Δ vs float (points) | min … max | per seed |",
             "|---|---:|---|---|"]
    for name, ds in deltas.items():
        lines.append(f"| {name} | {statistics.mean(ds):+.2f} | {min(ds):+.2f} … "
                     f"{max(ds):+.2f} | {' '.join(f'{d:+.2f}' for d in ds)} |")
    return lines


def _loss(r: Row, ref: float) -> float:
    """Points lost against float, the worse of eager and ORT."""
    return ref - min(v for v in (r.eager, r.ort) if v is not None)


def verdicts(rows: list[Row], ptq_setting: str, label: str) -> list[str]:
    ref = rows[0].eager
    lines = []
    for r in rows:
        if r.eager is None:
            continue
        if r.setting.startswith("PTQ") and (r.setting == ptq_setting or label == "main"):
            target, what = PTQ_TARGET, "loses"
        elif r.setting.startswith("QAT"):
            target, what = QAT_TARGET, "is below float by"
        else:
            continue
        gap = _loss(r, ref)
        lines.append(f"- {label}, {r.setting}: {what} {gap:.2f} points (target ≤ {target}): "
                     f"{'met' if gap <= target + 1e-9 else '**not met**'}.")
    return lines


def summary_verdicts(deltas: dict[str, list[float]]) -> list[str]:
    lines = []
    for name, ds in deltas.items():
        target = QAT_TARGET if "QAT" in name else PTQ_TARGET
        loss = round(-statistics.mean(ds), 2) + 0.0  # no "-0.00"
        lines.append(f"- {name}: mean loss {loss:.2f} points (target ≤ {target}): "
                     f"{'met' if loss <= target + 1e-9 else '**not met**'}.")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"],
                        help="seed of the detailed tables")
    parser.add_argument("--seeds", type=int, default=DEFAULTS["seeds"],
                        help="seeds 0..N-1 in the multi-seed summary (0: skip it)")
    parser.add_argument("--threads", type=int, default=DEFAULTS["threads"],
                        help="intra-op threads for torch and ONNX Runtime")
    parser.add_argument("--epochs", type=int, default=DEFAULTS["epochs"],
                        help="float training epochs")
    parser.add_argument("--qat-epochs", type=int, default=DEFAULTS["qat_epochs"])
    parser.add_argument("--qat-lr", type=float, default=DEFAULTS["qat_lr"])
    parser.add_argument("--width", type=int, default=DEFAULTS["width"],
                        help="channels of the first conv")
    parser.add_argument("--hard-width", type=int, default=DEFAULTS["hard_width"],
                        help="channels of the first conv in the harder setting")
    parser.add_argument("--no-write", action="store_true",
                        help="print the section without writing benchmarks/RESULTS.md")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    start = time.perf_counter()
    with threads(args.threads) as n_threads, tempfile.TemporaryDirectory() as workdir:
        data = load_data(args.seed)
        main_rows = measure_main(args, data, args.seed, workdir, n_threads, full=True)
        hard_rows = measure_hard(args, data, args.seed, workdir, n_threads)
        deltas = summary(args, n_threads) if args.seeds > 0 else {}
    total = time.perf_counter() - start
    load_after = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")

    command = "python benchmarks/quant_accuracy.py" + "".join(
        f" --{k.replace('_', '-')} {getattr(args, k)}" for k, d in DEFAULTS.items()
        if getattr(args, k) != d)
    low = f"W{HARD_BITS} (per-tensor) A8"
    lines = [
        "## Quantization accuracy: PTQ and QAT on handwritten digits",
        "",
        f"`{command}` — torch {torch.__version__}, ONNX Runtime {ort.__version__}, seed "
        f"{args.seed} (summary: seeds 0–{args.seeds - 1}), {n_threads} intra-op thread(s) "
        f"for torch and ONNX Runtime, {platform.machine()}, {os.cpu_count()} CPUs, Python "
        f"{platform.python_version()}; whole run {total:.0f} s; 1-min load average "
        f"{load_before:.2f} before, {load_after:.2f} after.",
        "",
        f"Data: scikit-learn `load_digits` (8x8 grey, 10 classes), seeded split {TRAIN_SIZE} "
        f"train / {len(data.x_test)} test; every accuracy is on the test images (one image = "
        f"{100 / len(data.x_test):.2f} points, so single-run differences of a few tenths are "
        "one or two images). Model: conv-BN-ReLU x3, two max pools, linear, trained "
        f"{args.epochs} epochs (Adam, one-cycle to 1e-2, batch {BATCH}). PTQ: "
        "`fxopt.optimize(model, inputs, \"default,quantize(scheme=int8,target=...,"
        f"observer=...)\", calibration=...)` with {CALIBRATION_BATCHES} training batches of "
        f"{BATCH}; activations uint8 (ort) / int8 (tensorrt) per tensor, weights int8 per "
        "channel unless stated. QAT: `fxopt.quant.qat.prepare_qat` on the minmax PTQ graph, "
        f"{args.qat_epochs} epochs of SGD (lr {args.qat_lr:g} with cosine decay, momentum "
        "0.9; learned scales at 1/100 of that lr), `freeze_qat`. *ORT*: the GraphModule "
        "exported with `fxopt.lower(gm, \"onnx\", ...)` (QuantizeLinear/DequantizeLinear, run "
        "by ONNX Runtime's CPU provider on int8 kernels); the float row's ORT column is the "
        "plain float export. *Agrees with float*: test images where the setting predicts the "
        "same class as the float model of its table (eager). *time*: what the last column "
        "names (ONNX export and scoring excluded).",
        "",
        f"### Main setting: width {args.width}, int8 (seed {args.seed})",
        "",
        *table(main_rows),
        "",
        f"### Harder setting (labelled): width {args.hard_width}, {HARD_BITS}-bit per-tensor "
        f"weights (seed {args.seed})",
        "",
        "int8 leaves nothing measurable for QAT to recover on this task, so this setting "
        f"shrinks the model and puts the weights on a {HARD_BITS}-bit grid: after the int8 "
        f"PTQ pass, each weight fake-quant node is re-quantized to {HARD_BITS} bits, "
        f"symmetric minmax, one scale per tensor ({low}; activations stay uint8 as "
        "calibrated). Scored eagerly only: fxopt's Q/DQ export writes every fake-quant node "
        "as int8 QuantizeLinear, which saturates at the int8 range, not at the node's "
        "narrower range, so the largest weight (which rounds one step past the top of the "
        "range) comes out one step off in ONNX Runtime and `fxopt.lower`'s verification "
        "refuses the file.",
        "",
        *table(hard_rows),
        "",
    ]
    if deltas:
        lines += [
            f"### Over {args.seeds} seeds (eager)",
            "",
            "The headline settings again for seeds 0–" + str(args.seeds - 1) + " (each seed "
            "changes the split, the initialisation and the batch order; same recipe): "
            "accuracy change against that seed's float model.",
            "",
            *summary_table(deltas),
            "",
        ]
    lines += [
        f"Against the issue's targets (PTQ loses ≤ {PTQ_TARGET} points; QAT within "
        f"{QAT_TARGET} points of float; losses are the worse of eager and ORT):",
        "",
        *verdicts(main_rows, "", "main"),
        *verdicts(hard_rows, f"PTQ {low}, minmax", "harder"),
        "- (the harder setting is built so that PTQ loses: its PTQ line shows how much there "
        "is to recover, not a target fxopt could meet at that precision.)",
        *summary_verdicts(deltas),
    ]
    text = "\n".join(lines) + "\n"
    publish("quant-accuracy", text, write=not args.no_write)


if __name__ == "__main__":
    main()
