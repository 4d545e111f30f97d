"""The guided search behind ``fxopt.tune``.

1. Capture the model once and enumerate the first configs (``space.initial_configs``).
2. Build each (``fxopt.bench.build``, cached on disk by ``Candidate.key()``) and judge its
   accuracy on the accuracy batches **before any timing**; over budget is out.
3. Static int8 over budget: rank the layers by ``fxopt.quant.sensitivity`` on the
   fake-quant graph and bisect how many of the most sensitive stay float. Dynamic int8
   over budget: the quantize pass's own ``budget=`` fallback (damage per MAC).
4. Time what passed (one interleaved screening run), take the fastest config and bisect
   the pruning ratio on top of it against the budget.
5. Time every survivor in one interleaved run, then re-measure the winner against the
   runner-up in a fresh interleaved run; a difference within that run's round-to-round
   noise goes to the simpler artifact (fewer passes).

Example::

    search = Search(model, (x,), parse_budget("cosine>=0.99"), cache=Cache("cache"))
    trials, final = search.run()
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from fxopt.bench.accuracy import agreement, evaluate, split_batch
from fxopt.bench.candidates import LOOSE, Built, Candidate, build, calibration_batches
from fxopt.bench.compare import interleave
from fxopt.errors import FxoptError
from fxopt.progress import Mode, bar
from fxopt.tune.budget import Budget, BudgetCheck
from fxopt.tune.cache import Cache
from fxopt.tune.space import Config, Space, initial_configs, linear_mac_share

ACCURACY_SEED = 9000
HELD_OUT_HEADROOM = 0.2  # pruning and the dynamic fallback keep this share of the budget's room
SCREEN_CUT = 2.0  # screened this many times slower than the fastest: left out of the final run


@dataclass
class Trial:
    """One candidate's story: how it was built, judged, timed and why it won or lost."""

    config: Config | None
    candidate: Candidate
    status: str = "pending"  # accepted | over budget | failed | skipped
    values: dict[str, float] = field(default_factory=dict)
    check: BudgetCheck | None = None
    error: str | None = None
    build_s: float | None = None
    size_bytes: int | None = None
    path: str | None = None
    cached: bool = False
    fn: Callable[..., Any] | None = field(default=None, repr=False)
    median_ms: float | None = None
    screen_ms: float | None = None
    speedup: float | None = None
    verdict: str = ""  # winner, or why it lost
    stage: str = ""
    finetune: dict[str, Any] = field(default_factory=dict)  # a twin's steps, stop, seconds

    @property
    def name(self) -> str:
        return self.candidate.name

    def record(self) -> dict[str, Any]:
        return {"name": self.name, "status": self.status, "values": self.values,
                "misses": self.check.misses if self.check else {}, "error": self.error,
                "build_s": self.build_s, "size_bytes": self.size_bytes, "path": self.path,
                "finetune": self.finetune}


@dataclass
class Final:
    """The outcome: the winning trial, the runner-up and the re-measurement."""

    winner: Trial
    runner_up: Trial | None
    remeasure: dict[str, Any]
    reference_ms: float | None
    ranking_notes: list[str]


class Search:
    """One tuning run; see the module docstring. ``calibration``: static int8 batches
    (default: ``fxopt.bench.candidates.calibration_batches``); ``val_data``: ``(inputs,
    target)`` batches for a metric budget, whose inputs also feed the agreement checks;
    ``train``: a ``fxopt.tune.twins.TrainSpec`` (fine-tuned twins) or None."""

    def __init__(self, model: nn.Module, inputs: Sequence[Any], budget: Budget, *,
                 cache: Cache, space: Space | None = None, val_data: Any = None,
                 calibration: Sequence | None = None, rounds: int = 5, warmup: int = 3,
                 accuracy_batches: int = 3, progress: Mode = None,
                 say: Callable[[str], None] | None = None, train: Any = None):
        self.model, self.inputs = model.eval(), tuple(inputs)
        self.budget, self.cache, self.space = budget, cache, space or Space()
        self.val = [split_batch(b) for b in val_data] if val_data is not None else None
        self.calibration = list(calibration) if calibration is not None else None
        self.rounds, self.warmup, self.progress = rounds, warmup, progress
        self.train = train
        self.say = say or (lambda msg: None)
        self.trials: dict[str, Trial] = {}
        self.skipped: list[tuple[str, str]] = []
        self.threads = torch.get_num_threads()
        self.batches = [self.inputs]
        if self.val:
            self.batches += [b[0] for b in self.val[:4]]
        else:
            # held out, drawn like the default calibration batches (another seed)
            self.batches += calibration_batches(self.inputs, accuracy_batches - 1,
                                                seed=ACCURACY_SEED)
        with torch.inference_mode():
            self.reference = [self.model(*b) for b in self.batches]
            self.ref_metric = (evaluate(self.model, self.val, budget.metric)
                               if budget.needs_metric else None)
        self._bar = None

    # ------------------------------------------------------------------ one candidate
    def try_config(self, config: Config, stage: str) -> Trial:
        cand = config.candidate()
        if cand.name in self.trials:
            return self.trials[cand.name]
        trial = Trial(config, cand, stage=stage)
        self.trials[cand.name] = trial
        rec = self.cache.get(self.key(cand))
        if rec is not None:
            self._restore(trial, rec)
        else:
            self._build_and_judge(trial)
            self.cache.put(self.key(cand), trial.record())
        if self._bar is not None:
            self._bar.total = max(self._bar.total or 0, len(self.trials))
            self._bar.update(1)
            self._bar.set_postfix_str(f"{cand.name}: {trial.status}")
        self.say(f"{cand.name}: {trial.status}"
                 + (f" ({trial.check.describe()})" if trial.status == "over budget" else "")
                 + (f" ({trial.error})" if trial.error else "")
                 + (" [cached]" if trial.cached else ""))
        return trial

    def key(self, cand: Candidate) -> str:
        """The cache key: the candidate's, and for a fine-tuned twin also the training
        data's fingerprint (its time limit is in the pipeline text)."""
        if self.train is None or "finetune(" not in (cand.pipeline or ""):
            return cand.key()
        import hashlib

        text = f"{cand.key()}|{self.train.fingerprint['sha256']}"
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def _build_and_judge(self, trial: Trial) -> None:
        twin = trial.config is not None and bool(trial.config.finetune)
        built = build(trial.candidate, self.model, self.inputs,
                      workdir=self.cache.workdir(self.key(trial.candidate)),
                      calibration=self.calibration, threads=self.threads,
                      train_data=self.train.data if twin else None)
        trial.build_s, trial.size_bytes, trial.path = built.build_s, built.size_bytes, built.path
        trial.finetune = built.info.get("finetune", {})
        if not built.ok:
            trial.status, trial.error = "failed", built.error
            return
        self._judge(trial, built.fn)

    def _judge(self, trial: Trial, fn: Callable[..., Any]) -> None:
        try:
            with torch.inference_mode():
                outs = [fn(*b) for b in self.batches]
            agree = [agreement(r, o) for r, o in zip(self.reference, outs, strict=True)]
            values = {"cosine": min(a["cosine"] for a in agree),
                      "max_rel": max(a["max_rel"] for a in agree)}
            if any(math.isnan(a["cosine"]) for a in agree):
                values["cosine"] = -math.inf
            if self.budget.needs_metric:
                values["metric"] = evaluate(fn, self.val, self.budget.metric)
                values["drop"] = self.ref_metric - values["metric"]
        except FxoptError:
            raise  # the user's metric or data is wrong: every candidate would fail alike
        except Exception as e:  # noqa: BLE001 - a candidate that cannot run is a row
            from fxopt.bench.candidates import error_text

            trial.status, trial.error = "failed", f"running it failed: {error_text(e)}"
            return
        trial.values = values
        trial.check = self.budget.check(values)
        trial.status = "accepted" if trial.check.ok else "over budget"
        trial.fn = fn if trial.check.ok else None

    def _restore(self, trial: Trial, rec: dict[str, Any]) -> None:
        trial.cached = True
        trial.status, trial.error = rec["status"], rec.get("error")
        trial.values = rec.get("values", {})
        trial.build_s, trial.size_bytes, trial.path = (rec.get("build_s"),
                                                       rec.get("size_bytes"), rec.get("path"))
        trial.finetune = rec.get("finetune") or {}
        if trial.values:
            trial.check = self.budget.check(trial.values)
            # the budget may differ from the run that wrote the record: judge again
            if trial.status in ("accepted", "over budget"):
                trial.status = "accepted" if trial.check.ok else "over budget"
        if trial.status == "accepted":
            try:
                trial.fn = load_fn(trial.candidate, trial.path, self.threads)
            except Exception as e:  # noqa: BLE001 - a damaged cache entry: build it again
                self.say(f"{trial.name}: cached artifact unusable ({e}); rebuilding")
                trial.cached = False
                self._build_and_judge(trial)
                self.cache.put(self.key(trial.candidate), trial.record())

    # ------------------------------------------------------------------ the search
    def run(self) -> Final:
        import fxopt

        gm = fxopt.capture(self.model, self.inputs)
        configs, self.skipped = initial_configs(linear_mac_share(gm), self.space)
        with bar(desc="tuning", total=len(configs), unit="candidate",
                 progress=self.progress) as self._bar:
            for config in configs:
                self.try_config(config, "initial")
            for config in configs:
                trial = self.trials[config.name]
                if trial.status != "over budget":
                    continue
                if config.quant.startswith("int8"):
                    self._float_fallback(config)
                elif config.quant == "dynamic":
                    self._dynamic_fallback(config)
            accepted = self._accepted()
            if len(accepted) > 2 or (accepted and self.space.prune > 0):
                fastest = self._screen(accepted)
                if self.space.prune > 0:
                    self._prune(fastest.config)
            if self.train is not None:
                from fxopt.tune.twins import run_twins

                run_twins(self)
            accepted = self._accepted()
        self._bar = None
        if not accepted:
            raise self._impossible()
        return self._decide(accepted)

    def _accepted(self) -> list[Trial]:
        return [t for t in self.trials.values() if t.status == "accepted" and not t.verdict]

    def _float_fallback(self, config: Config) -> None:
        """Bisect the number of most-sensitive layers kept float (static int8)."""
        ranking = self._ranking(config)
        top = ranking[: self.space.max_float_layers]
        if not top:
            return
        hi = len(top)
        if self.try_config(config.with_(float_layers=tuple(top)), "float fallback"
                           ).status != "accepted":
            return
        lo = 0
        while hi - lo > 1:
            mid = (lo + hi) // 2
            ok = self.try_config(config.with_(float_layers=tuple(top[:mid])),
                                 "float fallback").status == "accepted"
            lo, hi = (lo, mid) if ok else (mid, hi)
        best = config.with_(float_layers=tuple(top[:hi])).name
        for t in self.trials.values():
            if (t.stage == "float fallback" and t.status == "accepted" and t.name != best
                    and t.config.quant == config.quant and t.config.prune == config.prune):
                t.verdict = (f"not timed: keeps {len(t.config.float_layers)} layers float; "
                             f"{best} keeps fewer and is within budget")

    def _ranking(self, config: Config) -> list[str]:
        """Layers by the error each adds alone (``fxopt.quant.sensitivity``), as names
        ``skip=`` matches; cached beside the records. Per-tensor int8 reuses the
        per-channel ranking (the same layers; the sweep is the costly part)."""
        import fxopt
        from fxopt.quant import sensitivity as sens

        config = config.with_(threads=None, quant="int8")
        key = "ranking-" + config.candidate().key()
        rec = self.cache.get(key)
        if rec is not None:
            return rec["ranking"]
        self.say(f"ranking layers by int8 sensitivity ({config.name})")
        batches = list(self.calibration or calibration_batches(self.inputs))
        res = fxopt.optimize(self.model, self.inputs, config.pipeline(),
                             calibration=batches, tolerance={"approximate": LOOSE})
        ranking = sens.sensitivity(res.module, self.batches,
                                   sens.run_batches(self.model, self.batches),
                                   progress=self.progress)
        # "module.path:node" names a node inside a shared module: skip= matches node names
        names = [name.rpartition(":")[2] if ":" in name else name for name, _ in ranking]
        self.cache.put(key, {"ranking": names, "status": "ranking"})
        return names

    def _dynamic_fallback(self, config: Config) -> None:
        cosine = next((b for b in self.budget.bounds if b.measure == "cosine"), None)
        if cosine is None:
            return  # the pass's fallback speaks cosine only
        target = cosine.threshold + (1 - cosine.threshold) * HELD_OUT_HEADROOM  # held-out data
        self.try_config(config.with_(extra=(("budget", round(target, 6)),)), "float fallback")

    def _screen(self, accepted: list[Trial]) -> Trial:
        """The fastest accepted trial in a short interleaved run (pruning builds on it)."""
        self.say(f"screening {len(accepted)} accepted candidates")
        cmp = interleave([_as_built(t) for t in accepted], self.inputs,
                         rounds=max(2, self.rounds // 2), warmup=min(self.warmup, 2),
                         threads=self.threads)
        for t in accepted:
            t.screen_ms = cmp.stats[t.name].median_ms
        fastest = min(accepted, key=lambda t: t.screen_ms)
        for t in accepted:  # far behind already: not worth the final run's time
            if t.screen_ms > SCREEN_CUT * fastest.screen_ms:
                t.verdict = (f"too slow in screening: {t.screen_ms:.3f} ms, "
                             f"{t.screen_ms / fastest.screen_ms:.2f}x {fastest.name}'s time")
                t.median_ms = None
        return fastest

    def _prune(self, base: Config) -> None:
        """Bisect the largest pruning ratio on top of ``base`` that stays within budget."""
        if base.baseline is not None:  # the plain export runs no pass: prune fxopt's fp32
            base = base.with_(baseline=None)
        lo, hi = 0.0, self.space.prune
        first = self.try_config(base.with_(prune=hi), "prune")
        if first.status == "failed" and "nothing in this model can be pruned" in (first.error
                                                                                 or ""):
            return
        if self._prune_ok(first):
            lo = hi
        else:
            for _ in range(self.space.prune_steps):
                mid = round((lo + hi) / 2, 4)
                ok = self._prune_ok(self.try_config(base.with_(prune=mid), "prune"))
                lo, hi = (mid, hi) if ok else (lo, mid)
        for t in self.trials.values():
            if (t.stage == "prune" and t.status == "accepted" and t.config.prune != lo
                    and not t.verdict):
                t.verdict = (f"not timed: prunes {t.config.prune:g}; "
                             f"ratio {lo:g} also met the budget and removes more")

    def _prune_ok(self, trial: Trial) -> bool:
        """Within the budget with ``HELD_OUT_HEADROOM`` of its room to spare; a pruned trial
        within the budget but not the margin is left untimed, with the reason.

        The bisection stops at the ratio whose accuracy batches land just inside the
        budget, and unseen inputs then land on either side of it (the zoo transformer
        pruned 0.25: cosine 0.9916 judged, 0.9899 on held-out batches). The dynamic int8
        fallback keeps the same margin."""
        if trial.status != "accepted":
            return False
        margin = self.budget.headroom(HELD_OUT_HEADROOM)
        if margin.check(trial.values).ok:
            return True
        trial.verdict = (f"not timed: within the budget, but pruning must meet {margin.describe()} "
                         "(a margin for unseen inputs)")
        return False

    # ------------------------------------------------------------------ the choice
    def _decide(self, accepted: list[Trial]) -> Final:
        from fxopt.bench.candidates import build as build_reference

        self.say(f"timing {len(accepted)} candidates in {self.rounds} interleaved rounds")
        ref = build_reference(Candidate("torch", "torch"), self.model, self.inputs,
                              workdir=self.cache.root / "builds", threads=self.threads)
        accepted = accepted + self._thread_variants(accepted)
        builts = ([ref] if ref.ok else []) + [_as_built(t) for t in accepted]
        cmp = interleave(builts, self.inputs, rounds=self.rounds, warmup=self.warmup,
                         threads=self.threads)
        ref_ms = cmp.stats["torch"].median_ms if ref.ok else None
        for t in accepted:
            t.median_ms = cmp.stats[t.name].median_ms
            t.speedup = ref_ms / t.median_ms if ref_ms else None
        ordered = sorted(accepted, key=lambda t: t.median_ms)
        winner, runner = ordered[0], (ordered[1] if len(ordered) > 1 else None)
        notes: list[str] = []
        remeasure: dict[str, Any] = {}
        if runner is not None:
            rounds = max(self.rounds, 5)
            again = interleave([_as_built(winner), _as_built(runner)], self.inputs,
                               rounds=rounds, warmup=self.warmup, threads=self.threads)
            per_round = again.round_speedups[runner.name]  # winner time / runner time
            ratio = again.speedups[runner.name]
            noise = (max(per_round) - min(per_round)) / 2
            tie = min(per_round) <= 1.0 <= max(per_round) or abs(1 - ratio) <= noise
            remeasure = {
                "candidates": [winner.name, runner.name], "rounds": rounds,
                "ms": {winner.name: again.stats[winner.name].median_ms,
                       runner.name: again.stats[runner.name].median_ms},
                "runner_time_over_winner": 1 / ratio if ratio else math.inf,
                "per_round_runner_over_winner": [1 / r for r in per_round],
                "noise": noise, "tie": tie}
            if again.stats[runner.name].median < again.stats[winner.name].median and not tie:
                winner, runner = runner, winner
                notes.append(f"re-measured: {winner.name} is faster than {runner.name} "
                             "(the first run had them the other way round)")
            elif tie and runner.config.simplicity() < winner.config.simplicity():
                notes.append(f"tie within the noise ({statistics.median(per_round):.3f} "
                             f"per-round median ratio, noise ±{noise:.3f}): the simpler "
                             f"{runner.name} wins over {winner.name}")
                winner, runner = runner, winner
            remeasure["winner"] = winner.name
        self._verdicts(winner, runner, remeasure)
        return Final(winner, runner, remeasure, ref_ms, notes)

    def _thread_variants(self, accepted: list[Trial]) -> list[Trial]:
        """The accepted ONNX Runtime artifacts again at the space's other thread counts
        (the same file: accuracy does not depend on the session's threads)."""
        out = []
        for t in accepted:
            for n in self.space.threads:
                if n is None or t.config.runtime != "onnx" or n == t.config.threads:
                    continue
                config = t.config.with_(threads=n)
                twin = Trial(config, config.candidate(), status="accepted", values=t.values,
                             check=t.check, build_s=t.build_s, size_bytes=t.size_bytes,
                             path=t.path, cached=True, stage="threads", finetune=t.finetune,
                             fn=load_fn(config.candidate(), t.path, n))
                self.trials[twin.name] = twin
                out.append(twin)
        return out

    def _verdicts(self, winner: Trial, runner: Trial | None, remeasure: dict) -> None:
        winner.verdict = "winner"
        for t in self.trials.values():
            if t is not winner and not t.verdict:
                self._verdict(t, winner, runner, remeasure)
            if t.config is not None and t.config.finetune:
                from fxopt.tune.twins import summary

                t.verdict = f"{t.verdict}; {summary(t, self)}"

    def _verdict(self, t: Trial, winner: Trial, runner: Trial | None, remeasure: dict) -> None:
        """Why ``t`` lost (its verdict when nothing before set one)."""
        if t.status == "failed":
            t.verdict = f"failed to build: {t.error}"
        elif t.status == "over budget":
            t.verdict = t.check.describe() if t.check else "over budget"
        elif t.median_ms is not None:
            slower = t.median_ms / winner.median_ms if winner.median_ms else math.nan
            t.verdict = f"too slow: {t.median_ms:.3f} ms, {slower:.2f}x the winner's time"
            if t is runner and remeasure.get("tie"):
                t.verdict = (f"runner-up: a tie within the noise (±{remeasure['noise']:.3f}),"
                             f" and {winner.name} is the simpler artifact")
            elif t is runner:
                r = remeasure.get("runner_time_over_winner")
                t.verdict = (f"runner-up, too slow: {r:.3f}x the winner's time when "
                             "re-measured side by side")

    def _impossible(self) -> FxoptError:
        from fxopt.errors import BudgetError

        judged = [t for t in self.trials.values() if t.check is not None]
        failed = [t for t in self.trials.values() if t.status == "failed"]
        if not judged:
            why = "; ".join(f"{t.name}: {t.error}" for t in failed[:4])
            return BudgetError(f"no candidate could be built: {why}", best=None, misses={})
        best = min(judged, key=lambda t: self.budget.shortfall(t.values))
        misses = best.check.misses
        gaps = ", ".join(f"{m} {best.values.get(m, math.nan):.6g} misses by {v:.3g}"
                         for m, v in misses.items())
        return BudgetError(
            f"no candidate meets the budget {self.budget.describe()}: the closest, "
            f"{best.name}, reaches {gaps} ({len(judged)} candidates judged, {len(failed)} "
            "failed to build); loosen the budget, pass real --calibration-data, or widen "
            "the search (more float layers, no pruning"
            + ("" if self.train is not None else ", or fine-tuned candidates: train_data= "
               "and train_time=, --train-data and --train-time") + ")",
            best=best.name, misses=misses,
            values=best.values)


def _as_built(trial: Trial) -> Built:
    return Built(trial.candidate, trial.fn, trial.build_s or 0.0, trial.size_bytes, trial.path)


def load_fn(candidate: Candidate, path: str | None, threads: int) -> Callable[..., Any]:
    """A callable over a built artifact, as ``fxopt.bench.build`` returns it (eager: the
    loaded module; ONNX: an ``OrtRunner`` with the candidate's threads)."""
    import fxopt

    if path is None:
        raise FileNotFoundError("the record names no artifact")
    if candidate.runtime == "eager":
        return fxopt.load(path).module
    if candidate.runtime == "onnx":
        from fxopt.bench.onnx_runtime import OrtRunner

        return OrtRunner(path, candidate.option("threads", threads))
    raise ValueError(f"cannot reload a {candidate.runtime} candidate")


__all__ = ["Final", "Search", "Trial", "load_fn"]
