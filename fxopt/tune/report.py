"""Turn a finished search into a ``TuneResult``: the winner loaded from its own copy, the
recipe, and one table row per candidate with its verdict.

Example::

    result = build_result(search, final, threads=2, keep=True)
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

from fxopt.bench.candidates import CALIBRATION_BATCHES, CALIBRATION_SEED
from fxopt.tune.recipe import recipe_text
from fxopt.tune.result import TuneResult, TuneTable

_ORDER = {"winner": 0, "accepted": 1, "over budget": 2, "failed": 3}


def _row(t: Any, key: str) -> dict[str, Any]:
    return {"name": t.name, "pipeline": t.candidate.pipeline, "runtime": t.candidate.runtime,
            "status": t.status, "stage": t.stage, "cosine": t.values.get("cosine"),
            "max_rel": t.values.get("max_rel"), "metric": t.values.get("metric"),
            "drop": t.values.get("drop"), "misses": t.check.misses if t.check else {},
            "median_ms": t.median_ms, "screen_ms": t.screen_ms, "speedup": t.speedup,
            "build_s": t.build_s,
            "size_bytes": t.size_bytes, "cached": t.cached, "error": t.error,
            "key": key, "finetune": t.finetune or None, "verdict": t.verdict}


def build_result(search: Any, final: Any, threads: int, *, keep: bool) -> TuneResult:
    """The ``TuneResult`` of ``search`` (its trials) and ``final`` (``Search.run()``).
    ``keep=False``: the cache is temporary, so the winner is copied out of it first."""
    import fxopt

    winner = final.winner
    path = Path(winner.path)
    if not keep:
        dest = Path(tempfile.mkdtemp(prefix="fxopt-tuned-")) / path.name
        (shutil.copy2 if path.is_file() else shutil.copytree)(path, dest)
        data = Path(f"{path}.data")  # torch.onnx.export's external weights, named in the file
        if data.is_file():
            shutil.copy2(data, Path(f"{dest}.data"))
        path = dest
    threads_opt = winner.candidate.option("threads", threads)
    best = (fxopt.load(path, threads=threads_opt) if winner.candidate.runtime == "onnx"
            else fxopt.load(path))
    calibration = ({"source": "given", "count": len(search.calibration)}
                   if search.calibration is not None else
                   {"source": "random", "count": CALIBRATION_BATCHES, "seed": CALIBRATION_SEED})
    measured = {"candidate": winner.name, "budget": search.budget.describe(),
                "cosine": winner.values.get("cosine"), "max_rel": winner.values.get("max_rel"),
                "metric": winner.values.get("metric"), "median_ms": winner.median_ms,
                "speedup_vs_torch": winner.speedup, "threads": threads}
    candidate, finetune = winner.candidate, None
    if winner.config is not None and winner.config.finetune:
        from fxopt.tune.twins import recipe_table, replay_config

        candidate = replay_config(winner).candidate()
        finetune = recipe_table(winner, search.train, search.threads)
    recipe = recipe_text(candidate, calibration=calibration, tune=measured, finetune=finetune)
    trials = sorted(search.trials.values(),
                    key=lambda t: (_ORDER.get("winner" if t is winner else t.status, 4),
                                   t.median_ms if t.median_ms is not None else float("inf")))
    rows = [_row(t, search.key(t.candidate)) for t in trials]
    rows += [{"name": name, "status": "skipped", "verdict": f"not tried: {why}"}
             for name, why in search.skipped]
    settings = {"budget": search.budget.describe(), "threads": threads,
                "rounds": search.rounds, "warmup": search.warmup,
                "reference_ms": final.reference_ms, "remeasure": final.remeasure,
                "notes": final.ranking_notes, "winner": winner.name,
                "runner_up": final.runner_up.name if final.runner_up else None,
                "accuracy_batches": len(search.batches),
                "finetune": None if search.train is None else {
                    "train_time": search.train.seconds, "train_total": search.train.total,
                    **search.train.fingerprint, **dict(search.train.options)},
                "reference_metric": search.ref_metric}
    return TuneResult(best, recipe, TuneTable(rows, settings), winner.name, str(path))


__all__ = ["build_result"]
