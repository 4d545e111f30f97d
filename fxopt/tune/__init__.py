"""``fxopt.tune``: the fastest artifact within an accuracy budget, chosen by measuring.

The search (fxopt/tune/search.py) builds candidates over pruning ratio, quantization
scheme (static int8 per channel / per tensor, dynamic int8), the layers that stay float,
fp16 / bf16, backend (fxopt's eager artifact, ONNX Runtime) and threads; rejects those
over budget before timing any; times the rest side by side; re-measures the winner
against the runner-up; and returns the winner loaded, with a TOML recipe that rebuilds it
from the original model and a table saying why every other candidate lost. With
``train_data=`` and ``train_time=``, the lossy candidates that missed the budget (or met
it without the held-out margin) also get a fine-tuned twin (fxopt/tune/twins.py).

Example::

    import fxopt
    res = fxopt.tune(model, (x,), budget="cosine>=0.99", cache="tune-cache")
    res.best(x)                                   # the chosen artifact
    print(res.table)
    res.save("tuned")                             # artifact, recipe.toml, report
    art = fxopt.tune.rebuild("tuned/recipe.toml", model, (x,), path="rebuilt")
    res = fxopt.tune(model, (x,), "cosine>=0.99", train_data=(X,), train_time=30)
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from fxopt.tune.budget import Bound, Budget, BudgetCheck, parse_budget
from fxopt.tune.result import TuneResult, TuneTable
from fxopt.tune.space import Config, Space


def tune(model: Any, inputs: Sequence[Any], budget: str | Budget | None = None, *,
         val_data: Iterable | None = None, metric: Callable[[Any, Any], float] | None = None,
         max_drop: float | None = None, calibration: Sequence | None = None,
         space: Space | None = None, cache: str | os.PathLike | None = None,
         rounds: int = 5, warmup: int = 3, threads: int | None = None,
         progress: Any = None, say: Callable[[str], None] | None = None,
         train_data: Any = None, train_time: float | None = None,
         train_total: float | None = None) -> TuneResult:
    """Search for the fastest artifact of ``model`` that stays within ``budget``.

    ``budget``: ``"cosine>=0.99"``, ``"max_rel<=0.05"`` (on the example inputs and
    held-out random batches like them, or on ``val_data``'s inputs), and/or ``metric`` +
    ``max_drop`` on ``val_data`` (batches of ``(inputs, target)``, ``metric(outputs,
    target) -> float``, higher is better). ``calibration``: batches for static int8
    (default: random batches like the inputs, recorded in the recipe). ``space``: what to
    try (``fxopt.tune.Space``). ``cache``: a folder keeping built candidates, so a rerun
    after an interruption does not rebuild them (default: a temporary folder).
    ``threads``: torch and ONNX Runtime threads (default: torch's current count).

    ``train_data`` (``fxopt.finetune``'s data: an ``(X, Y)`` / ``(X,)`` pair of tensors,
    a Dataset or a list of item tuples; labels optional) with ``train_time`` (seconds
    per candidate): the lossy candidates (static int8 with its float fallbacks, pruned
    ones) judged over budget, or within it but short of the held-out margin, get a
    fine-tuned twin (``+ft``, stage ``finetune``): the candidate's graph trained with the
    original model as teacher for ``train_time`` seconds (static int8: QAT, frozen back
    to Q/DQ), then lowered and judged like any other. Closest to the budget first;
    ``train_total`` caps the twins' build time in all (default 4 x ``train_time``). The
    recipe of a twin that wins replays its steps exactly (``[finetune]``; rebuild needs
    the same ``train_data``). One of ``train_data`` / ``train_time`` alone is a
    ``SpecError``.

    Returns ``TuneResult(best, recipe, table)``. Raises ``BudgetError`` when no candidate
    meets the budget (naming the closest and by how much it missed), ``SpecError`` for a
    budget it cannot read.

    Example::

        res = fxopt.tune(model, (x,), budget="cosine>=0.99")
        res.best(x), res.winner
        res = fxopt.tune(model, (x,), metric=top1, max_drop=0.5, val_data=batches)
        res = fxopt.tune(model, (x,), "cosine>=0.99", train_data=(X,), train_time=30)
    """
    from fxopt.bench.timing import threads as torch_threads
    from fxopt.errors import SpecError
    from fxopt.tune.cache import Cache
    from fxopt.tune.search import Search, load_fn  # noqa: F401 - load_fn: rebuild uses it
    from fxopt.tune.twins import train_spec

    parsed = parse_budget(budget, metric=metric, max_drop=max_drop, val_data=val_data)
    if rounds < 1 or warmup < 0:
        raise SpecError(f"rounds must be >= 1 and warmup >= 0, got {rounds} and {warmup}")
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    train = train_spec(train_data, train_time, train_total, inputs)
    store = Cache(cache)
    try:
        with torch_threads(threads) as n:
            search = Search(model, inputs, parsed, cache=store, space=space,
                            val_data=val_data, calibration=calibration, rounds=rounds,
                            warmup=warmup, progress=progress, say=say, train=train)
            final = search.run()
            from fxopt.tune.report import build_result

            return build_result(search, final, n, keep=cache is not None)
    finally:
        store.close()


def rebuild(recipe: str | os.PathLike, model: Any, inputs: Any, *,
            path: str | os.PathLike, calibration: Any = None, train_data: Any = None) -> Any:
    """Rebuild a tuned artifact from its recipe and the original model (see
    ``fxopt.tune.recipe.rebuild``); a fine-tuned winner's recipe needs its
    ``train_data`` again.

    Example::

        art = fxopt.tune.rebuild("tuned/recipe.toml", model, (x,), path="rebuilt")
    """
    from fxopt.tune.recipe import rebuild as _rebuild

    return _rebuild(recipe, model, inputs, path=path, calibration=calibration,
                    train_data=train_data)


tune.rebuild = rebuild  # fxopt.tune is this function once fxopt is imported
tune.Space = Space
tune.parse_budget = parse_budget

__all__ = ["Bound", "Budget", "BudgetCheck", "Config", "Space", "TuneResult", "TuneTable",
           "parse_budget", "rebuild", "tune"]
