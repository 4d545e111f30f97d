"""``fxopt finetune``: run a lossy pipeline, fine-tune the result back with the original
model as teacher, and write the artifact; on one process or many under ``torchrun``.

    fxopt finetune resnet --pipeline "default,prune(macs=0.5)" --epochs 2
    fxopt finetune my.py:build --train-data my.py:train_set --epochs 1 \
        --pipeline "default,prune(macs=0.5),finetune(epochs=3),quantize(scheme=int8)"
    fxopt finetune my.py:build --pipeline "default,sparsify(ratio=0.8)" \\
        --train-data my.py:train_set --val-data my.py:val_set --budget 0.97 -o out/model
    fxopt finetune my.py:build --pipeline "default,prune(ratio=0.5)" \\
        --train-data my.py:train_set --max-time 600 -o out/model
    torchrun --nproc-per-node 2 -m fxopt finetune my.py:build --train-data my.py:train_set \\
        --batch-size 64 --checkpoint-dir ckpt --log-dir runs/ft -o out/model

``--train-data`` / ``--val-data`` name a factory (``file.py:fn`` or ``pkg.module:fn``)
returning a ``torch.utils.data.Dataset`` whose items are tuples (the graph's inputs, then
an optional label), an ``(X, Y)`` pair of tensors, or a list of such tuples. Without
``--train-data`` the model trains on seeded random inputs shaped like its example inputs,
distilled from the original model (a smoke test, not a recovery). Static int8 pipelines
calibrate on the first training batches. Under torchrun every rank runs the pipeline and
trains on its share of each global batch (``--batch-size`` is global); only rank 0 writes
logs, checkpoints, the history and the artifact. ``finetune(...)`` stages inside
``--pipeline`` train on the same data (prune, fine-tune, quantize, then ``--epochs`` of
QAT); ``--epochs 0`` leaves the training to them.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from fxopt.errors import FxoptError, SpecError

__all__ = ["add_parser", "cmd_finetune", "load_dataset", "training_data"]


def load_dataset(spec: str, n_inputs: int, flag: str) -> Dataset:
    """The Dataset behind ``--train-data SPEC`` (``file.py:fn`` / ``pkg.module:fn``); a
    ``SpecError`` naming the flag when the factory cannot be found, fails, or returns
    something that is not training data.

    >>> ds = load_dataset("tests/digits_data.py:train_set", 1, "--train-data")  # doctest: +SKIP
    """
    from fxopt.cli import import_attr
    from fxopt.train.data import as_dataset

    factory = import_attr(flag, spec)
    try:
        made = factory() if callable(factory) and not isinstance(factory, Dataset) else factory
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise SpecError(f"{flag} {spec}: the factory raised {type(e).__name__}: {e}") from e
    try:
        return as_dataset(made, n_inputs)
    except FxoptError as e:
        raise SpecError(f"{flag} {spec}: {e}") from e
    except TypeError as e:
        raise SpecError(f"{flag} {spec}: the factory returned {type(made).__name__}, not a "
                        "Dataset, an (X, Y) pair of tensors or a list of item tuples") from e


def training_data(args: argparse.Namespace, passes: list, inputs: tuple) -> dict:
    """``fxopt optimize``'s ``--train-data`` / ``--val-data``, for the pipeline's
    ``finetune(...)`` stages, as ``fxopt.optimize`` keywords (checked against the inputs).

    >>> fxopt.optimize(model, inputs, spec, **training_data(args, passes, inputs))  # doctest: +SKIP
    """
    stages = any(p.name == "finetune" for p in passes)
    if stages and not args.train_data:
        raise SpecError(f"--pipeline {args.pipeline!r} has a finetune stage: give --train-data "
                        "SPEC (file.py:fn returning a Dataset of (inputs..., label) items), or "
                        "use fxopt finetune, which can train on random inputs")
    if not stages and (args.train_data or args.val_data):
        raise SpecError("--train-data / --val-data feed finetune(...) stages, and --pipeline "
                        f"{args.pipeline!r} has none; add one, e.g. '...,finetune(epochs=2)'")
    out = {}
    for key, flag, spec in (("train_data", "--train-data", args.train_data),
                            ("val_data", "--val-data", args.val_data)):
        if spec:
            out[key] = load_dataset(spec, len(inputs), flag)
            _check_items(out[key], inputs, flag)
    return out


def _random_data(inputs: tuple, samples: int) -> Dataset:
    """``samples`` seeded random items shaped like one example input row each."""
    from fxopt.train.data import as_dataset
    from fxopt.verify import random_like_inputs

    rows = []
    for i in range(math.ceil(samples / max(int(inputs[0].shape[0]), 1))):
        rows.append(random_like_inputs(inputs, seed=1000 + i))
    tensors = tuple(torch.cat([r[j] for r in rows])[:samples] for j in range(len(inputs)))
    return as_dataset(tensors, len(inputs))


def _calibration(ds: Dataset, n_inputs: int, batch: int, batches: int) -> list[tuple]:
    from torch.utils.data._utils.collate import default_collate

    from fxopt.train.data import split_batch

    out = []
    for b in range(min(batches, math.ceil(len(ds) / batch))):
        items = [ds[i] for i in range(b * batch, min((b + 1) * batch, len(ds)))]
        inputs, _ = split_batch(default_collate(items), n_inputs)
        out.append(tuple(inputs))
    return out


def _check_items(ds: Dataset, example: tuple, flag: str) -> None:
    """The first items of ``ds`` batched must fit the model's example inputs."""
    from torch.utils.data._utils.collate import default_collate

    from fxopt.cli import _check_batch
    from fxopt.train.data import split_batch

    if len(ds) == 0:
        raise SpecError(f"{flag}: the dataset is empty")
    try:
        batch = default_collate([ds[i] for i in range(min(2, len(ds)))])
        inputs, _ = split_batch(batch, len(example))
    except FxoptError as e:
        raise SpecError(f"{flag}: {e}") from e
    except Exception as e:  # noqa: BLE001 - items that do not even collate
        raise SpecError(f"{flag}: its items could not be batched ({type(e).__name__}: {e}); "
                        "each item is a tuple (inputs..., [label]) of tensors") from e
    _check_batch(tuple(inputs), 0, example, flag)


def _progress(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def cmd_finetune(args: argparse.Namespace) -> int:
    import fxopt
    from fxopt.cli import load_spec
    from fxopt.pipeline import parse_pipeline
    from fxopt.train import distributed
    from fxopt.train.loop import finetune

    passes = parse_pipeline(args.pipeline)  # a bad spec fails before any work
    stages = any(p.name == "finetune" for p in passes)
    if args.target not in ("eager", "onnx"):
        raise SpecError(f"--target {args.target!r}: use eager or onnx")
    for flag, value in (("--batch-size", args.batch_size), ("--random-samples",
                                                            args.random_samples)):
        if value < 1:
            raise SpecError(f"{flag} must be a positive integer, got {value}")
    if args.epochs is not None and (args.epochs < 0 or (args.epochs == 0 and not stages)):
        raise SpecError(f"--epochs {args.epochs}: give the epochs to train after --pipeline "
                        "(>= 1), or 0 when --pipeline's own finetune(...) stages do the "
                        "training")
    if args.max_steps is not None and args.max_steps < 1:
        raise SpecError(f"--max-steps is a number of optimizer steps >= 1, not {args.max_steps}")
    if args.max_time is not None and not 0 < args.max_time < float("inf"):
        raise SpecError(f"--max-time is a number of seconds > 0, not {args.max_time:g}")
    limited = args.max_steps is not None or args.max_time is not None
    epochs = args.epochs if args.epochs is not None else (None if limited else 1)
    if args.output is None and args.history_json is None:
        raise SpecError("give -o/--output (the artifact) or --history-json, or nothing is kept")
    ctx = distributed.setup(args.backend)
    say = _progress if ctx.is_main else (lambda msg: None)
    try:
        with distributed.guarded(ctx, "fxopt finetune"):
            model, inputs, name = load_spec(args.spec, args.input_shape)
            n_inputs = len(inputs)
            if args.train_data:
                train = load_dataset(args.train_data, n_inputs, "--train-data")
            else:
                if args.no_teacher:
                    raise SpecError("without --train-data the random inputs have no labels, "
                                    "so the original model must teach: drop --no-teacher")
                train = _random_data(inputs, args.random_samples)
                say(f"no --train-data: {len(train)} random inputs like the example, "
                    "distilled from the original model (a smoke test)")
            val = load_dataset(args.val_data, n_inputs, "--val-data") if args.val_data else None
            for flag, ds in (("--train-data", train), ("--val-data", val)):
                if ds is not None:  # before the pipeline runs: a mistake costs nothing
                    _check_items(ds, inputs, flag)
            say(f"world: {ctx.world_size} process(es), {ctx.backend or 'no process group'}, "
                f"{ctx.device}")
            calibration = _calibration(train, n_inputs, args.batch_size,
                                       args.calibration_batches)
            res = fxopt.optimize(model, inputs, args.pipeline, mode=args.mode, progress=say,
                                 calibration=calibration, train_data=train, val_data=val)
            if ctx.is_main:
                print(res.report)
            staged = [{"pass": r.spec, **r.stats}
                      for r in res.report if r.name == "finetune"]
            if epochs == 0:  # the pipeline's finetune stages did the training
                if ctx.is_main:
                    _finish(args, name, ctx, res.module, inputs, None, staged, say)
                return 0
            out = finetune(
                res.module, train, teacher=None if args.no_teacher else model,
                epochs=epochs, max_steps=args.max_steps, max_time=args.max_time,
                lr=args.lr, batch_size=args.batch_size,
                optimizer=args.optimizer, weight_decay=args.weight_decay,
                scheduler=args.scheduler, amp=args.amp, val_data=val, metric=args.metric,
                budget=args.budget, log_dir=args.log_dir, checkpoint_dir=args.checkpoint_dir,
                checkpoint_every=args.checkpoint_every, resume=args.resume, seed=args.seed,
                T=args.temperature, alpha=args.alpha, progress=None)
            if ctx.is_main:
                _report(out)
                _finish(args, name, ctx, out.module, inputs, out, staged, say)
            return 0
    finally:
        distributed.teardown(ctx)


def _finish(args: argparse.Namespace, name: str, ctx: Any, module: Any, inputs: tuple,
            out: Any, staged: list, say: Any) -> None:
    """Rank 0: the history JSON and the artifact."""
    import fxopt

    if args.history_json:
        info = {"model": name, "pipeline": args.pipeline, "world": ctx.describe(),
                "stages": staged}
        if out is not None:
            info.update({"history": out.history, "best_metric": out.best_metric,
                         "best_epoch": out.best_epoch, "stopped_early": out.stopped_early,
                         "steps": out.steps, "metric": out.metric, "amp": out.amp,
                         "structure": out.structure, "checkpoint": out.checkpoint})
        _write_json(Path(args.history_json), info)
    if args.output:
        say(f"lowering to {args.target}")
        art = fxopt.lower(module, args.target, inputs, path=args.output)
        print(f"wrote {args.target} artifact to {art.path} (verified against the trained "
              "graph)")


def _report(out: Any) -> None:
    keys = [k for k in ("epoch", "loss", "metric", "lr", "steps", "samples_per_s")
            if any(k in row for row in out.history)]
    rows = [keys] + [[_fmt(row.get(k)) for k in keys] for row in out.history]
    widths = [max(len(r[i]) for r in rows) for i in range(len(keys))]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    best = "" if out.best_metric is None else (
        f"; best {out.metric} {out.best_metric:.4f} at epoch {out.best_epoch + 1}")
    limit = f" (stopped: {out.stop})" if out.stop in ("max_steps", "max_time") else ""
    print(f"fine-tuned {out.steps} steps{best}"
          f"{' (stopped early: budget met)' if out.stopped_early else limit}")


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _write_json(path: Path, data: dict) -> None:
    if not path.parent.is_dir():
        raise SpecError(f"--history-json {path}: the folder {path.parent} does not exist")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, default=str))
    os.replace(tmp, path)  # never a half-written file


def add_parser(sub: Any, model_args: Any) -> None:
    """Register ``fxopt finetune`` on the CLI's subparsers (``model_args`` adds SPEC,
    ``--input-shape`` and ``--mode``)."""
    p = sub.add_parser("finetune", help="run a lossy pipeline, then fine-tune with the "
                       "original model as teacher (torchrun for several processes)")
    model_args(p)
    p.add_argument("--pipeline", default="default",
                   help="passes before training, e.g. 'default,prune(macs=0.5)' (default: "
                        "default)")
    p.add_argument("--train-data", metavar="SPEC",
                   help="file.py:fn or pkg.module:fn returning a Dataset of (inputs..., "
                        "[label]) items or an (X, Y) pair (default: random inputs, distilled)")
    p.add_argument("--val-data", metavar="SPEC", help="validation data, same form; a metric "
                   "is measured each epoch and the best epoch kept")
    p.add_argument("--epochs", type=int, default=None,
                   help="passes over the data after --pipeline (default 1, or until "
                        "--max-steps / --max-time when given; 0 when --pipeline's "
                        "finetune(...) stages train)")
    p.add_argument("--max-steps", type=int, default=None, metavar="N",
                   help="stop after N optimizer steps (mid-epoch too)")
    p.add_argument("--max-time", type=float, default=None, metavar="S",
                   help="stop after S seconds of training (checked after each step)")
    p.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 0.001)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="GLOBAL batch, split over torchrun processes (default 32)")
    p.add_argument("--optimizer", default="adamw", choices=("adamw", "adam", "sgd"),
                   help="default adamw; sgd uses momentum 0.9")
    p.add_argument("--weight-decay", type=float, default=0.0, help="default 0.0")
    p.add_argument("--scheduler", choices=("cosine",), default=None,
                   help="learning-rate schedule over all steps (default: constant)")
    p.add_argument("--amp", choices=("bf16", "fp16"), default=None,
                   help="mixed precision (bf16 on CPU or CUDA, fp16 on CUDA)")
    p.add_argument("--metric", choices=("accuracy", "cosine"), default=None,
                   help="validation metric (default: accuracy with labels, else cosine to "
                        "the teacher)")
    p.add_argument("--budget", type=float, default=None,
                   help="stop once the validation metric reaches this value")
    p.add_argument("--temperature", type=float, default=4.0,
                   help="distillation temperature T (default 4.0)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="distillation weight, 1 = teacher only, 0 = labels only (default 0.5)")
    p.add_argument("--no-teacher", action="store_true",
                   help="train on the labels alone (no distillation)")
    p.add_argument("--seed", type=int, default=0, help="data order and init (default 0)")
    p.add_argument("--random-samples", type=int, default=128, metavar="N",
                   help="without --train-data: how many random inputs (default 128)")
    p.add_argument("--calibration-batches", type=int, default=8, metavar="N",
                   help="static int8: calibrate on the first N training batches (default 8)")
    p.add_argument("--log-dir", help="TensorBoard scalars here (rank 0)")
    p.add_argument("--checkpoint-dir", help="checkpoints here (rank 0): each epoch, or "
                   "--checkpoint-every steps, and best/")
    p.add_argument("--checkpoint-every", type=int, default=None, metavar="STEPS")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --checkpoint-dir")
    p.add_argument("--backend", choices=("gloo", "nccl"), default=None,
                   help="process-group backend under torchrun (default: nccl on CUDA, else "
                        "gloo)")
    p.add_argument("--target", default="eager",
                   help="artifact kind: eager or onnx (default eager)")
    p.add_argument("-o", "--output", help="artifact path (rank 0 writes it)")
    p.add_argument("--history-json", metavar="FILE",
                   help="write the per-epoch history and the structure report as JSON")
    p.set_defaults(fn=cmd_finetune)
