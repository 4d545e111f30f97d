"""``fxopt.finetune``: recovery training of an fxopt graph, with a teacher.

One call trains a pruned / sparsified / fake-quantized graph back towards the original
model: task loss and distillation (``fxopt.train.losses``), the passes' structure kept
exact (``fxopt.train.structure.StructureKeeper``), mixed precision (``torch.autocast``,
``torch.amp.GradScaler`` for fp16 on CUDA), data-parallel processes under ``torchrun``
(``fxopt.train.distributed``: DDP, DistributedSampler, rank-safe errors), a progress bar,
TensorBoard scalars, per-epoch validation with early stop at a budget, and resumable
checkpoints (``fxopt.train.checkpoint``). Only rank 0 writes logs and checkpoints.

Example::

    res = fxopt.optimize(model, (x,), "prune(macs=0.5)")
    out = fxopt.finetune(res.module, (X, Y), teacher=model, epochs=3, lr=1e-3,
                         val_data=(Xv, Yv), budget=0.97, amp="bf16")
    out.module, out.history[-1]["metric"], out.best_metric
"""

from __future__ import annotations

import copy
import itertools
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data._utils.collate import default_collate

import fxopt.progress
from fxopt.errors import TrainingError
from fxopt.graph_utils import copy_graph_module
from fxopt.train import checkpoint as ckpt
from fxopt.train import distributed
from fxopt.train.data import as_dataset, check_inputs, input_specs, split_batch
from fxopt.train.losses import (
    DistillLoss,
    check_teacher_outputs,
    feature_pairs,
    make_adapter,
    resolve_node,
    tap,
)
from fxopt.train.metrics import choose_metric, eval_mode, evaluate
from fxopt.train.options import AMP, check_options, freeze, make_optimizer
from fxopt.train.structure import StructureKeeper


@dataclass
class FinetuneResult:
    """What ``finetune`` returns: the trained graph (frozen, exportable; the best epoch's
    weights when there was validation), one history row per epoch, the best metric."""

    module: fx.GraphModule
    history: list[dict] = field(default_factory=list)
    best_metric: float | None = None
    best_epoch: int | None = None
    stopped_early: bool = False
    steps: int = 0
    stop: str = "epochs"  # why training ended: epochs | budget | max_steps | max_time
    metric: str | None = None
    amp: dict = field(default_factory=dict)
    structure: dict = field(default_factory=dict)
    checkpoint: str | None = None  # the best (or last) checkpoint folder, if written
    resumed_from: str | None = None


def _first_batch(ds, n: int) -> Any:
    return default_collate([ds[i] for i in range(min(n, len(ds)))])


def _to(xs: Sequence, device: torch.device) -> tuple:
    return tuple(x.to(device) if isinstance(x, torch.Tensor) else x for x in xs)


def _capture_teacher(teacher: nn.Module, gm: fx.GraphModule, inputs: tuple) -> fx.GraphModule:
    from fxopt.capture import capture

    if isinstance(teacher, fx.GraphModule):
        return copy_graph_module(teacher)
    frontend = gm.meta.get("fxopt", {}).get("capture", {}).get("frontend")
    mode = {"symbolic": "symbolic", "export": "export"}.get(frontend, "auto")
    return capture(teacher, inputs, mode=mode)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


class _Teacher:
    """The frozen teacher: outputs (and named features) without gradients."""

    def __init__(self, module: nn.Module | None, device: torch.device):
        self.module = module
        if module is not None:
            module.to(device).eval()
            for p in module.parameters():
                p.requires_grad_(False)

    def __call__(self, *inputs):
        if self.module is None:
            return None
        with torch.no_grad():
            return self.module(*inputs)


def finetune(gm: nn.Module, data: Any, *, teacher: nn.Module | None = None,
             epochs: int | None = 1, max_steps: int | None = None,
             max_time: float | None = None,
             lr: float = 1e-3, batch_size: int = 32, optimizer: str | Callable = "adamw",
             weight_decay: float = 0.0, scheduler: str | Callable | None = None,
             amp: str | None = None, val_data: Any = None,
             metric: str | Callable | None = None, budget: float | None = None,
             log_dir: str | None = None, checkpoint_dir: str | None = None,
             checkpoint_every: int | None = None, resume: bool | str = False,
             seed: int = 0, progress: Any = None, loss_fn: Callable | None = None,
             T: float = 4.0, alpha: float = 0.5, output_loss: str = "kl",
             features: Sequence[str] | Mapping[str, str] | None = None,
             feature_weight: float = 1.0, plan: Sequence[Mapping] | None = None,
             callback: Callable[[dict], None] | None = None, keep_checkpoints: int = 2,
             loader_options: dict | None = None,
             freeze: Sequence[str] | None = None) -> FinetuneResult:
    """Fine-tune graph ``gm`` on ``data`` and return a :class:`FinetuneResult`.

    ``data`` / ``val_data``: a Dataset of item tuples (graph inputs, then an optional
    label), an ``(X, Y)`` pair of tensors or a list of tuples (``fxopt.train.data``).
    Loss: cross-entropy with labels (or ``loss_fn(output, label)``); with a ``teacher``
    also KL distillation at temperature ``T`` mixed by ``alpha`` (``output_loss="cosine"``
    or ``"mse"`` for outputs that are embeddings, not logits), and MSE on the named
    ``features`` (a list of node / module names, or {student: teacher}) weighted by
    ``feature_weight``, pruned widths matched through the prune ``plan`` (else a learned
    projection). ``batch_size`` is the global batch (split over torchrun processes).
    ``amp``: ``"bf16"`` (CPU or CUDA autocast) or ``"fp16"`` (CUDA only, gradient
    scaling). Each epoch, ``metric`` (accuracy with labels, else output cosine against the
    teacher, or ``fn(output, target) -> float``; higher is better) is measured on
    ``val_data``; training stops once it reaches ``budget``, and the best epoch's weights
    are returned. ``checkpoint_dir``: a checkpoint every ``checkpoint_every`` steps (else
    each epoch) plus ``best/``; ``resume=True`` continues from the newest one (or from a
    given checkpoint folder). ``log_dir``: TensorBoard scalars. ``callback(state)`` runs
    after every step (raising stops training; the checkpoints written stay). ``freeze``:
    parameter names or ``fnmatch`` patterns (``"*word_embeddings.weight"``) kept at their
    values (no gradient, no optimizer state; a pattern that matches nothing is an error).
    ``max_steps`` / ``max_time``: stop after that many optimizer steps / seconds (wall time
    since training started, validation included; checked after each step, so the step
    under way finishes), even mid-epoch; ``epochs=None`` trains until one of them. The
    partial epoch gets its history row (and validation) as a whole one does, the weights
    returned are the best (with validation) or the last as usual, and the last row's
    ``stop`` (and ``FinetuneResult.stop``) says why training ended: ``epochs``,
    ``budget``, ``max_steps`` or ``max_time``. A run stopped by time is not replayable
    step for step; record ``steps`` and replay with ``max_steps`` (same seed, same data:
    the same weights).

    Example::

        out = fxopt.finetune(pruned, (X, Y), teacher=model, epochs=2, lr=1e-3,
                             val_data=(Xv, Yv), checkpoint_dir="ckpt", amp="bf16")
        print(out.history[-1])
        out = fxopt.finetune(pruned, (X, Y), teacher=model, epochs=None, max_time=30)
        out.steps, out.stop                      # e.g. (412, 'max_time')
    """
    check_options(epochs, lr, batch_size, optimizer, scheduler, amp, checkpoint_every, budget,
                   output_loss, max_steps, max_time)
    if not isinstance(gm, nn.Module):
        raise TrainingError(f"finetune trains an fxopt graph (torch.fx.GraphModule), not "
                            f"{type(gm).__name__}")
    if features and teacher is None:
        raise TrainingError("features= distills intermediate tensors from a teacher: give "
                            "teacher=... (the original model)")
    ctx = distributed.setup()
    try:
        with distributed.guarded(ctx, "fine-tuning"):
            return _Run(locals()).run()
    finally:
        distributed.teardown(ctx)


class _Run:
    """One ``finetune`` call: set up once, then epochs of steps."""

    def __init__(self, args: dict):
        self.a = args
        self.ctx = args["ctx"]
        self.device = self.ctx.device
        gm = args["gm"]
        if not isinstance(gm, fx.GraphModule):
            raise TrainingError(f"finetune trains a torch.fx.GraphModule (fxopt.capture or "
                                f"fxopt.optimize(...).module), not {type(gm).__name__}; "
                                "capture the model first")
        self.home = next(iter(gm.parameters()), torch.zeros(0)).device
        self.n_inputs = sum(1 for n in gm.graph.nodes if n.op == "placeholder")
        _seed_all(args["seed"])
        self.ds = as_dataset(args["data"], self.n_inputs)
        sample = _first_batch(self.ds, 2)
        inputs, label = split_batch(sample, self.n_inputs)
        check_inputs(inputs, input_specs(gm, inputs))
        self.has_labels = label is not None
        self.sample = _to(inputs, self.device)

        student = copy_graph_module(gm)  # never train the caller's graph
        student.train()
        self.keeper = StructureKeeper.from_graph(student)
        self.module = self.keeper.prepare(student).to(self.device)
        freeze(self.module, args["freeze"])
        self.fingerprint = ckpt.graph_fingerprint(self.module)

        teacher = args["teacher"]
        pairs = feature_pairs(args["features"])
        self.teacher_plain = None  # the teacher as it is, for validation
        if teacher is not None:
            teacher = copy.deepcopy(teacher) if not isinstance(teacher, fx.GraphModule) \
                else copy_graph_module(teacher)
            if pairs:
                teacher = _capture_teacher(teacher, gm, tuple(x.cpu() for x in inputs))
            self.teacher_plain = _Teacher(teacher, self.device).module  # frozen, on device
            if pairs:
                teacher = tap(teacher, [t for _, t in pairs])
        self.teacher = _Teacher(teacher, self.device)
        self.history: list[dict] = []
        self.train_module = tap(self.module, [s for s, _ in pairs]) if pairs else self.module
        adapters = self._adapters(pairs)
        self.loss = DistillLoss(T=args["T"], alpha=args["alpha"], loss_fn=args["loss_fn"],
                                feature_weight=args["feature_weight"],
                                adapters=adapters, output_loss=args["output_loss"]).to(self.device)
        self.model = distributed.wrap(self.train_module, self.ctx)

        self.loader, self.sampler = distributed.loader(
            self.ds, batch_size=args["batch_size"], shuffle=True, seed=args["seed"],
            ctx=self.ctx, **(args["loader_options"] or {}))
        self.steps_per_epoch = len(self.loader)
        if not self.steps_per_epoch:
            raise TrainingError("the training data gives no batch")
        params = [p for p in self.module.parameters() if p.requires_grad]
        params += [p for p in self.loss.parameters() if p.requires_grad]
        if not params:
            raise TrainingError("the graph has no trainable parameter")
        self.opt = make_optimizer(args["optimizer"], params, args["lr"], args["weight_decay"])
        total = (args["epochs"] * self.steps_per_epoch if args["epochs"] is not None
                 else args["max_steps"])
        if args["max_steps"] is not None:
            total = min(total, args["max_steps"])
        sched = args["scheduler"]
        self.sched = (torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, T_max=total)
                      if sched == "cosine" else sched(self.opt) if callable(sched) else None)
        self._amp_setup(args["amp"])
        self.val = None
        self.metric = None
        if args["val_data"] is not None:
            vds = as_dataset(args["val_data"], self.n_inputs)
            _, vlabel = split_batch(_first_batch(vds, 1), self.n_inputs)
            self.metric = choose_metric(args["metric"], vlabel is not None, teacher is not None)
            self.val = DataLoader(vds, batch_size=args["batch_size"], shuffle=False)
        elif args["budget"] is not None:
            raise TrainingError("budget= is a metric value to stop at: give val_data=...")
        self.writer = None
        if args["log_dir"] is not None and self.ctx.is_main:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(args["log_dir"]))

    # ------------------------------------------------------------------ set-up helpers
    def _adapters(self, pairs):
        if not pairs:
            return []
        with torch.no_grad(), eval_mode(self.module):  # no BN statistics updated
            out, s_feats = self.train_module(*self.sample)
            t_out, t_feats = self.teacher(*self.sample)
        check_teacher_outputs(out, t_out)
        plan = self.a["plan"]
        return [make_adapter(s, resolve_node(self.module, s), sf, tf, plan)
                for (s, _), sf, tf in zip(pairs, s_feats, t_feats, strict=True)]

    def _amp_setup(self, amp: str | None) -> None:
        self.amp_dtype = AMP[amp]
        if amp == "fp16" and self.device.type != "cuda":
            raise TrainingError("amp='fp16' needs a CUDA device (fp16 autocast with gradient "
                                "scaling); on CPU use amp='bf16' or None")
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp == "fp16")
        self.skipped = 0

    def _autocast(self):
        if self.amp_dtype is None:
            return torch.autocast(self.device.type, enabled=False)
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    # ------------------------------------------------------------------ run
    def run(self) -> FinetuneResult:
        a = self.a
        teacher_out_checked = self.teacher.module is None or bool(a["features"])
        if not teacher_out_checked:
            with torch.no_grad(), eval_mode(self.module):
                check_teacher_outputs(self.module(*self.sample), self.teacher(*self.sample))
        state = {"epoch": 0, "batch": 0, "step": 0, "best_metric": None, "best_epoch": None,
                 "sums": {}, "seen": 0, "seconds": 0.0, "skipped": 0, "elapsed": 0.0}
        history = self.history
        resumed_from, rng = self._resume(state, history)
        self.clock = (time.perf_counter(), state.get("elapsed", 0.0))
        best_weights = None
        stopped = False
        stop = "epochs"
        epochs = (range(state["epoch"], a["epochs"]) if a["epochs"] is not None
                  else itertools.count(state["epoch"]))
        try:
            for epoch in epochs:
                limit = self._limit(state)
                if limit is not None:  # a resumed run that had already reached it
                    stop = limit
                    break
                self.sampler.set_epoch(epoch)
                skip = state["batch"] if epoch == state["epoch"] else 0
                if rng is not None and not skip:  # resumed at an epoch boundary
                    ckpt.set_rng_state(rng)
                    rng = None
                it = iter(self.loader)
                for _ in range(skip):
                    next(it)
                if rng is not None:  # after the iterator drew its seed, as the first run did
                    ckpt.set_rng_state(rng)
                    rng = None
                if not skip:
                    state.update(sums={}, seen=0, seconds=0.0, batch=0)
                limit = self._epoch(epoch, it, skip, state)
                row = self._epoch_row(epoch, state)
                partial = limit is not None and state["batch"] < self.steps_per_epoch
                if self.val is not None:
                    row["metric"] = evaluate(self.module, self.val, n_inputs=self.n_inputs,
                                             metric=self.metric, device=self.device,
                                             teacher=self.teacher_plain)
                    if state["best_metric"] is None or row["metric"] > state["best_metric"]:
                        state["best_metric"], state["best_epoch"] = row["metric"], epoch
                        best_weights = {k: v.detach().clone()
                                        for k, v in self.module.state_dict().items()}
                        self._save("best", state, [*history, row], keep=None)
                    self._scalar("val/metric", row["metric"], epoch + 1)
                self._scalar("epoch/loss", row["loss"], epoch + 1)
                if partial:  # stopped mid-epoch: a resume continues inside this epoch
                    if a["checkpoint_every"] is None:
                        self._save(ckpt.step_name(state["step"]), state, history)
                    history.append({**row, "stop": limit})
                    stop = limit
                    break
                history.append(row)
                state.update(epoch=epoch + 1, batch=0, sums={}, seen=0, seconds=0.0)
                if a["checkpoint_every"] is None:
                    self._save(ckpt.step_name(state["step"]), state, history)
                budget = a["budget"]
                if budget is not None and row.get("metric", -math.inf) >= budget:
                    stopped = a["epochs"] is None or epoch + 1 < a["epochs"]
                    stop = "budget"
                    break
                if limit is not None:
                    stop = limit
                    break
            if history:
                history[-1]["stop"] = stop
        finally:
            if self.writer is not None:
                self.writer.close()
        if best_weights is None and state["best_epoch"] is not None and a["checkpoint_dir"]:
            best = Path(a["checkpoint_dir"]) / "best"  # a resumed run: the best from disk
            if (best / "model.safetensors").is_file():
                from safetensors.torch import load_file

                best_weights = load_file(str(best / "model.safetensors"))
        if best_weights is not None:
            with torch.no_grad():
                for k, v in self.module.state_dict().items():
                    v.copy_(best_weights[k])
        structure = self.keeper.describe()
        final = self.keeper.finish(self.module).to(self.home)
        meta = final.meta.setdefault("fxopt", {})
        meta["finetune"] = {"epochs": len(history), "steps": state["step"], "stop": stop,
                            "best_metric": state["best_metric"], "metric": self._metric_name()}
        where = None
        if a["checkpoint_dir"] is not None:
            best = Path(a["checkpoint_dir"]) / "best"
            last = ckpt.latest(a["checkpoint_dir"])
            where = str(best if best.is_dir() else last) if (best.is_dir() or last) else None
        return FinetuneResult(
            final, history, state["best_metric"], state["best_epoch"], stopped, state["step"],
            stop, self._metric_name(), self._amp_report(state), structure, where,
            resumed_from)

    def _limit(self, state: dict) -> str | None:
        """``"max_steps"`` / ``"max_time"`` once the run has reached that limit (the time
        decision taken on every rank alike: one rank stopping alone would hang the rest)."""
        a = self.a
        start, before = self.clock
        state["elapsed"] = before + time.perf_counter() - start
        if a["max_steps"] is not None and state["step"] >= a["max_steps"]:
            return "max_steps"
        if a["max_time"] is not None:
            over = float(state["elapsed"] >= a["max_time"])
            if self.ctx.world_size > 1:
                over = distributed.reduce_mean(over, self.ctx)
            if over > 0:
                return "max_time"
        return None

    def _metric_name(self) -> str | None:
        m = self.metric
        return None if m is None else m if isinstance(m, str) else getattr(
            m, "__name__", "custom")

    def _amp_report(self, state) -> dict:
        return {"dtype": str(self.amp_dtype).removeprefix("torch.") if self.amp_dtype
                else "float32",
                "loss_scale": float(self.scaler.get_scale()) if self.scaler.is_enabled()
                else None, "skipped_steps": state["skipped"]}

    def _epoch(self, epoch: int, it, skip: int, state: dict) -> str | None:
        """Run the epoch's steps; the limit that stopped it early (``_limit``), if any."""
        a = self.a
        bar = fxopt.progress.bar(total=self.steps_per_epoch, desc=f"epoch {epoch + 1}/"
                                 f"{a['epochs']}", unit="batch",
                                 progress=a["progress"] if self.ctx.is_main else False)
        bar.update(skip)
        world = self.ctx.world_size
        with bar:
            for b, batch in enumerate(it, start=skip):
                start = time.perf_counter()
                parts, n = self._step(batch, state)
                state["seconds"] += time.perf_counter() - start
                state["step"] += 1
                state["batch"] = b + 1
                state["seen"] += n * world
                for k, v in parts.items():
                    state["sums"][k] = state["sums"].get(k, 0.0) + v
                rate = state["seen"] / max(state["seconds"], 1e-9)
                bar.set_postfix(loss=f"{parts['loss']:.4f}", samples_s=f"{rate:.0f}")
                bar.update(1)
                self._scalar("train/loss", parts["loss"], state["step"])
                self._scalar("train/lr", self.opt.param_groups[0]["lr"], state["step"])
                if self.scaler.is_enabled():
                    self._scalar("train/loss_scale", self.scaler.get_scale(), state["step"])
                every = a["checkpoint_every"]
                if every is not None and state["step"] % every == 0:
                    self._save(ckpt.step_name(state["step"]), state, self.history)
                if a["callback"] is not None:
                    a["callback"]({"epoch": epoch, "batch": b, "step": state["step"],
                                   **parts})
                limit = self._limit(state)
                if limit is not None:
                    return limit
        return None

    def _step(self, batch, state: dict) -> tuple[dict, int]:
        inputs, label = split_batch(batch, self.n_inputs)
        if (label is not None) != self.has_labels:
            raise TrainingError("some training items carry a label and some do not; make "
                                "every item (inputs..., label) or none")
        inputs = _to(inputs, self.device)
        label = label.to(self.device) if isinstance(label, torch.Tensor) else label
        features = bool(self.a["features"])
        with self._autocast():
            out = self.model(*inputs)
            t_out = self.teacher(*inputs)
            s_feats = t_feats = ()
            if features:
                (out, s_feats), (t_out, t_feats) = out, t_out
            loss, parts = self.loss(out, t_out, label, s_feats, t_feats)
        if not torch.isfinite(loss) and not self.scaler.is_enabled():
            raise TrainingError(f"the loss became {float(loss)} at step {state['step'] + 1}; "
                                "lower lr, or use amp=None")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        before = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.opt)
        self.scaler.update()
        if before is not None and self.scaler.get_scale() < before:
            state["skipped"] += 1  # inf/nan gradients: the scaler skipped this step
        self.keeper.after_step(self.module)
        if self.sched is not None:
            self.sched.step()
        n = next((x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim()), 1)
        if self.ctx.world_size > 1:
            parts = {k: distributed.reduce_mean(v, self.ctx) for k, v in parts.items()}
        return parts, n

    def _epoch_row(self, epoch: int, state: dict) -> dict:
        steps = max(state["batch"], 1)
        row = {"epoch": epoch + 1, **{k: v / steps for k, v in state["sums"].items()},
               "lr": self.opt.param_groups[0]["lr"], "steps": state["batch"],
               "seconds": state["seconds"],
               "samples_per_s": state["seen"] / max(state["seconds"], 1e-9)}
        row.update({f"amp_{k}": v for k, v in self._amp_report(state).items()})
        return row

    def _scalar(self, tag: str, value: float, step: int) -> None:
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)

    # ------------------------------------------------------------------ checkpoints
    def _save(self, name: str, state: dict, history: list, keep: int | None = -1) -> None:
        a = self.a
        if a["checkpoint_dir"] is None or not self.ctx.is_main:
            return
        position = dict(state)
        ckpt.save(a["checkpoint_dir"], name, module=self.module, fingerprint=self.fingerprint,
                  optimizer=self.opt, scheduler=self.sched, scaler=self.scaler,
                  loss_module=self.loss, position=position, history=history,
                  keep=a["keep_checkpoints"] if keep == -1 else keep)

    def _resume(self, state: dict, history: list) -> tuple[str | None, dict | None]:
        a = self.a
        resume = a["resume"]
        if not resume:
            return None, None
        if isinstance(resume, (str, Path)):
            path = Path(resume)
        else:
            if a["checkpoint_dir"] is None:
                raise TrainingError("resume=True continues from checkpoint_dir: give "
                                    "checkpoint_dir=... (or resume='path/to/step-...')")
            found = ckpt.latest(a["checkpoint_dir"])
            if found is None:
                return None, None  # nothing written yet: a fresh start
            path = found
        body = ckpt.load(path, module=self.module, fingerprint=self.fingerprint,
                         optimizer=self.opt, scheduler=self.sched, scaler=self.scaler,
                         loss_module=self.loss, restore_rng=False)
        state.update(body["position"])
        history.extend(body["history"])
        return str(path), body["states"]["rng"]


__all__ = ["FinetuneResult", "finetune"]
