"""The ``finetune`` pipeline stage: recovery training after a lossy pass.

``fxopt.optimize(model, inputs, "prune(macs=0.5),finetune(epochs=2)", train_data=...,
val_data=...)`` trains the pruned graph with ``fxopt.finetune``; the teacher is the
original model unless ``teacher=`` is given, and the feature-distillation widths come
from the plan of the last ``prune`` before the stage. The stage changes the function on
purpose (``Semantics.CHANGES``): the manager checks only that the graph still runs;
the training history is in the stage's report stats.

Example::

    res = fxopt.optimize(model, (x,), "prune(ratio=0.5),finetune(epochs=2,lr=0.001)",
                         train_data=(X, Y), val_data=(Xv, Yv))
    res.report.records[-1].stats["history"]
"""

from __future__ import annotations

from typing import Any

from fxopt.errors import TrainingError
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass


def _last_plan(ctx: PassContext) -> list | None:
    report = ctx.options.get("report")
    for record in reversed(list(report or [])):
        if record.name == "prune" and record.modified:
            return record.stats.get("plan")
    return None


@register_pass("finetune", Semantics.CHANGES)
def finetune(gm, ctx: PassContext, *, epochs: int | None = 1, max_steps: int | None = None,
             max_time: float | None = None, lr: float = 1e-3, batch_size: int = 32,
             optimizer: str = "adamw", weight_decay: float = 0.0, scheduler: str | None = None,
             amp: str | None = None, metric: str | None = None, budget: float | None = None,
             T: float = 4.0, alpha: float = 0.5, output_loss: str = "kl",
             features: list[str] | None = None, feature_weight: float = 1.0,
             distill: bool = True, seed: int = 0,
             log_dir: str | None = None, checkpoint_dir: str | None = None,
             checkpoint_every: int | None = None, resume: bool = False) -> PassResult:
    """Fine-tune the graph on ``optimize(..., train_data=...)`` (validation on
    ``val_data=``), distilling from the original model (``distill=false``: labels only;
    ``output_loss=cosine`` for embedding outputs);
    the arguments are ``fxopt.finetune``'s (``epochs=none,max_steps=200``: by steps).

    Example::

        fxopt.optimize(model, (x,), "sparsify(ratio=0.8),finetune(epochs=3,amp=bf16)",
                       train_data=(X, Y))
    """
    from fxopt.train.loop import finetune as train

    if ctx.train_data is None:
        raise TrainingError("finetune: the pipeline has a finetune stage but no training "
                            "data; pass fxopt.optimize(..., train_data=(X, Y)) (or a Dataset "
                            "of (inputs..., label) items)")
    teacher = ctx.teacher if distill else None
    if isinstance(features, str):
        features = [features]
    try:
        out = train(gm, ctx.train_data, teacher=teacher, epochs=epochs, max_steps=max_steps,
                    max_time=max_time, lr=lr,
                    batch_size=batch_size, optimizer=optimizer, weight_decay=weight_decay,
                    scheduler=scheduler, amp=amp, val_data=ctx.val_data, metric=metric,
                    budget=budget, log_dir=log_dir, checkpoint_dir=checkpoint_dir,
                    checkpoint_every=checkpoint_every, resume=resume, seed=seed,
                    progress=ctx.options.get("progress"), T=T, alpha=alpha,
                    output_loss=output_loss, features=features, feature_weight=feature_weight,
                    plan=_last_plan(ctx) if features else None)
    except TrainingError as e:
        raise type(e)(f"finetune: {e}") from e
    stats: dict[str, Any] = {
        "history": out.history, "best_metric": out.best_metric, "best_epoch": out.best_epoch,
        "metric": out.metric, "steps": out.steps, "stopped_early": out.stopped_early,
        "stop": out.stop,
        "amp": out.amp, "structure": out.structure, "teacher": teacher is not None,
        "checkpoint": out.checkpoint,
    }
    return PassResult(out.module, True, stats)
