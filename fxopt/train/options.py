"""``fxopt.finetune``'s options: checked before any work, and the optimizer and frozen
parameters they name (the training loop itself is fxopt/train/loop.py)."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from fxopt.errors import TrainingError
from fxopt.train.losses import OUTPUT_LOSSES

AMP = {None: None, "bf16": torch.bfloat16, "fp16": torch.float16}
OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


def check_options(epochs, lr, batch_size, optimizer, scheduler, amp, checkpoint_every,
                   budget, output_loss="kl", max_steps=None, max_time=None) -> None:
    if max_steps is not None and (isinstance(max_steps, bool) or not isinstance(
            max_steps, int) or max_steps < 1):
        raise TrainingError(f"max_steps is a number of optimizer steps >= 1, not {max_steps!r}")
    if max_time is not None and (isinstance(max_time, bool) or not isinstance(
            max_time, (int, float)) or not max_time > 0 or math.isinf(max_time)):
        raise TrainingError(f"max_time is a number of seconds > 0, not {max_time!r}")
    if epochs is None:
        if max_steps is None and max_time is None:
            raise TrainingError("epochs=None trains until max_steps or max_time: give one of "
                                "them, or a number of epochs")
        if scheduler == "cosine" and max_steps is None:
            raise TrainingError("scheduler='cosine' needs to know the run's length: give "
                                "epochs or max_steps (max_time alone leaves it open)")
    elif isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise TrainingError(f"epochs must be a positive integer (or None with max_steps / "
                            f"max_time), not {epochs!r}")
    if not isinstance(lr, (int, float)) or not lr > 0:
        raise TrainingError(f"lr must be a positive number, not {lr!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise TrainingError(f"batch_size must be a positive integer, not {batch_size!r}")
    if not callable(optimizer) and optimizer not in OPTIMIZERS:
        raise TrainingError(f"optimizer={optimizer!r}: use {', '.join(OPTIMIZERS)} or a "
                            "callable params -> torch.optim.Optimizer")
    if scheduler not in (None, "cosine") and not callable(scheduler):
        raise TrainingError(f"scheduler={scheduler!r}: use None, 'cosine' or a callable "
                            "optimizer -> LR scheduler (stepped once per step)")
    if amp not in AMP:
        raise TrainingError(f"amp={amp!r}: use None, 'bf16' or 'fp16'")
    if checkpoint_every is not None and (isinstance(checkpoint_every, bool) or not isinstance(
            checkpoint_every, int) or checkpoint_every < 1):
        raise TrainingError(f"checkpoint_every is a number of steps >= 1, not "
                            f"{checkpoint_every!r}")
    if budget is not None and not isinstance(budget, (int, float)):
        raise TrainingError(f"budget is the metric value to stop at, not {budget!r}")
    if output_loss not in OUTPUT_LOSSES:
        raise TrainingError(f"output_loss={output_loss!r}: use 'kl' (logits), 'cosine' or "
                            "'mse' (embeddings and other non-logit outputs)")


def freeze(module: nn.Module, patterns: Sequence[str] | None) -> None:
    """Keep the parameters whose names match ``patterns`` (fnmatch) out of training."""
    if patterns is None:
        return
    if isinstance(patterns, str):
        patterns = [patterns]
    names = [n for n, _ in module.named_parameters()]
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TrainingError(f"freeze= takes parameter names or fnmatch patterns, not "
                                f"{pattern!r}")
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise TrainingError(f"freeze={pattern!r} matches no parameter of the graph; "
                                f"its parameters: {', '.join(names[:12])}"
                                f"{' ...' if len(names) > 12 else ''}")
    for name, p in module.named_parameters():
        if any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
            p.requires_grad_(False)


def make_optimizer(optimizer, params, lr: float, weight_decay: float):
    if callable(optimizer) and not isinstance(optimizer, str):
        return optimizer(params)
    kwargs: dict[str, Any] = {"lr": lr, "weight_decay": weight_decay}
    if optimizer == "sgd":
        kwargs["momentum"] = 0.9
    return OPTIMIZERS[optimizer](params, **kwargs)


__all__ = ["AMP", "OPTIMIZERS", "check_options", "freeze", "make_optimizer"]
