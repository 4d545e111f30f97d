"""Fine-tuned twins: with training data and a time limit, ``fxopt.tune`` gives the lossy
candidates that missed the budget (or met it without the held-out margin) a twin whose
graph is fine-tuned back towards the original model, then judged like any other.

Which candidates: static int8 (per channel, per tensor, with float fallbacks), pruned
ones (any scheme), judged over budget, or within it but short of the margin
(``HELD_OUT_HEADROOM``) -- the lossy ones a little training can bring back. The
over-budget ones closest to the budget go first, then the accepted ones closest to the
margin. Dynamic int8 without pruning gets no twin: its int8 weights cannot train, and the
fp32 graph before it already equals the teacher.

How: a ``finetune`` stage in the candidate's pipeline (``fxopt.passes.finetune``) with
the original model as teacher, ``epochs=none,max_time=train_time``: after
``quantize(scheme=int8)`` it is QAT through the fake-quant graph, frozen back to Q/DQ
before lowering; before ``quantize(scheme=dynamic_int8)`` and after ``prune`` it trains
the float graph. Without labels the loss is output cosine at lr 1e-4 (AdamW); measured on
a deep conv net's int8 QAT, it beat KL and MSE clearly (worst-image cosine 0.971 ->
0.982; KL at 3e-5 collapsed to 0.79). With labels: task loss + KL distillation at
``fxopt.finetune``'s defaults. QAT of an unpruned int8 graph starts next to the teacher
and trains at a tenth of that rate (``QAT_LR_FACTOR``; the usual QAT advice is a small
fraction of the training rate): on the zoo ResNet-50, AdamW at 1e-4 first moved every
weight far enough to lose what calibration had won (a 150 s twin ended at cosine 0.957
from 0.98), 1e-5 did not (mean cosine 0.9916 -> 0.9928 in 48 steps).

The cap: twins are built one after another until their build time in this run
(training, quantization, lowering, judging) reaches ``train_total`` (default 4 x
``train_time``); the rest are listed as not tried, with the reason. A twin from the cache
counts with the build time it took then, so a rerun makes the same choices and a resumed
run goes on where the interrupted one stopped.

Example::

    spec = train_spec((X, Y), 30.0, None, (x,))
    run_twins(search)            # search.train = spec
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

from fxopt.errors import FxoptError, SpecError

NO_LABELS = (("lr", 1e-4), ("output_loss", "cosine"))  # the measured default (docstring)
WITH_LABELS = (("lr", 1e-3), ("output_loss", "kl"))  # fxopt.finetune's defaults
SEED, BATCH = 0, 32
TOTAL_FACTOR = 4
QAT_LR_FACTOR = 0.1  # QAT of an unpruned int8 graph: lr x this (module docstring)


@dataclass(frozen=True)
class TrainSpec:
    """The training data for fine-tuned twins and their limits. ``fingerprint``:
    ``fxopt.train.data.fingerprint`` of ``data``; ``options``: the finetune stage's."""

    data: Any
    seconds: float
    total: float
    fingerprint: dict
    options: tuple[tuple[str, Any], ...]


def _seconds(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 \
            or not math.isfinite(value):
        raise SpecError(f"{name} is a number of seconds > 0, not {value!r}")
    return float(value)


def train_spec(train_data: Any, train_time: Any, train_total: Any,
               inputs: tuple) -> TrainSpec | None:
    """``None`` without training data and time; else the checked ``TrainSpec`` (a
    ``SpecError`` for one without the other, a bad time, or data that does not fit the
    example inputs)."""
    from fxopt.train.data import as_dataset, check_inputs, fingerprint, input_specs, split_batch

    if train_data is None and train_time is None:
        if train_total is not None:
            raise SpecError("train_total caps the fine-tuning of candidates: give train_data= "
                            "and train_time= too")
        return None
    if train_data is None or train_time is None:
        missing = ("train_time= (seconds of fine-tuning per candidate, --train-time S)"
                   if train_time is None else
                   "train_data= (the batches to fine-tune on, --train-data pkg.mod:fn)")
        raise SpecError(f"candidates fine-tune only with both training data and a time "
                        f"limit: add {missing}")
    seconds = _seconds(train_time, "train_time")
    total = _seconds(train_total, "train_total") if train_total is not None \
        else TOTAL_FACTOR * seconds
    try:
        ds = as_dataset(train_data, len(inputs))
        from torch.utils.data._utils.collate import default_collate

        first = default_collate([ds[i] for i in range(min(2, len(ds)))])
        batch_inputs, _ = split_batch(first, len(inputs))
        check_inputs(batch_inputs, input_specs(None, inputs))
    except FxoptError as e:
        raise SpecError(f"train_data: {e}") from e
    if len(ds) == 0:
        raise SpecError("train_data is empty")
    fp = fingerprint(ds, len(inputs))
    options = (("epochs", None), ("max_time", seconds),
               *(WITH_LABELS if fp["labels"] else NO_LABELS),
               ("seed", SEED), ("batch_size", min(BATCH, len(ds))))
    return TrainSpec(ds, seconds, total, fp, options)


def _lossy(config: Any) -> bool:
    return (config is not None and config.baseline is None and not config.finetune
            and config.precision == "fp32"
            and (config.quant.startswith("int8") or config.prune > 0
                 or config.quant == "dynamic"))


def eligible(search: Any) -> list[Any]:
    """The trials that get a twin, in the order they get it (module docstring)."""
    from fxopt.tune.search import HELD_OUT_HEADROOM

    margin = search.budget.headroom(HELD_OUT_HEADROOM)
    over, close = [], []
    for t in search.trials.values():
        if not _lossy(t.config) or t.status not in ("over budget", "accepted"):
            continue
        if t.status == "over budget":
            over.append(t)
        elif not margin.check(t.values).ok and (not t.verdict or t.stage == "prune"):
            close.append(t)  # (a float fallback left untimed for a leaner one: not worth it)
    over.sort(key=lambda t: search.budget.shortfall(t.values))
    close.sort(key=lambda t: margin.shortfall(t.values))
    return over + close


def _options(config: Any, options: tuple) -> tuple:
    """The twin's finetune options: QAT of an unpruned int8 graph at a tenth of the lr."""
    if not config.quant.startswith("int8") or config.prune > 0:
        return options
    return tuple((k, float(f"{v * QAT_LR_FACTOR:.3g}") if k == "lr" else v)
                 for k, v in options)


def run_twins(search: Any) -> None:
    """Build and judge the twins of ``eligible(search)`` within ``search.train``'s cap."""
    spec: TrainSpec = search.train
    spent = 0.0
    for base in eligible(search):
        config = base.config.with_(finetune=_options(base.config, spec.options))
        if base.config.quant == "dynamic" and base.config.prune == 0:
            search.skipped.append((config.name, "dynamic int8 keeps its weights as int8, "
                                   "which cannot train, and the float graph before it "
                                   "already equals the teacher: nothing to fine-tune"))
            continue
        if config.name not in search.trials and spent >= spec.total:
            search.skipped.append((config.name, f"the fine-tuning time cap "
                                   f"({spec.total:g} s for all twins, train_total) was spent"))
            continue
        start = time.perf_counter()
        twin = search.try_config(config, "finetune")
        spent += (twin.build_s or 0.0) if twin.cached else time.perf_counter() - start
        if twin.status == "accepted" and config.prune > 0:
            search._prune_ok(twin)  # a pruned artifact keeps the held-out margin


def replay_config(trial: Any) -> Any:
    """The twin's config with ``max_time`` replaced by the steps it ran (``max_steps``):
    the same seed and data then give the same weights (the recipe's pipeline)."""
    opts = dict(trial.config.finetune)
    opts.pop("max_time", None)
    opts["max_steps"] = int(trial.finetune["steps"])
    return trial.config.with_(finetune=tuple(opts.items()))


def recipe_table(trial: Any, spec: TrainSpec, threads: int) -> dict[str, Any]:
    """The recipe's ``[finetune]`` table for a twin that won. ``threads``: the intra-op
    threads it trained with, if its record does not say (a matmul's summation order,
    hence the last bits of every step, depends on them: the rebuild trains with the same
    count)."""
    opts = dict(trial.config.finetune)
    return {"steps": int(trial.finetune["steps"]), "lr": opts.get("lr"),
            "seed": opts.get("seed"), "output_loss": opts.get("output_loss"),
            "batch_size": opts.get("batch_size"),
            "threads": trial.finetune.get("threads", threads),
            "time_limit": opts.get("max_time"),
            "seconds": trial.finetune.get("seconds"), "stop": trial.finetune.get("stop"),
            "samples": spec.fingerprint["samples"], "labels": spec.fingerprint["labels"],
            "data_sha256": spec.fingerprint["sha256"]}


def summary(trial: Any, search: Any) -> str:
    """What a twin reached: ``fine-tuned 41 steps in 2.0 s (max_time) from
    prune0.5-onnx-fp32: cosine 0.44 -> 0.93``."""
    ft = trial.finetune or {}
    base = search.trials.get(trial.config.with_(finetune=(), threads=None).name)
    measure = next((b.measure for b in search.budget.bounds), "cosine")
    before = base.values.get(measure) if base is not None else None
    after = trial.values.get(measure)
    reached = (f": {measure} {before:.6g} -> {after:.6g}" if before is not None
               and after is not None else "")
    seconds = ft.get("seconds")
    return (f"fine-tuned {ft.get('steps', '?')} steps"
            + (f" in {seconds:.1f} s" if seconds is not None else "")
            + f" ({ft.get('stop', '?')}) from {base.name if base else '?'}{reached}")


__all__ = ["TrainSpec", "eligible", "recipe_table", "replay_config", "run_twins", "summary",
           "train_spec"]
