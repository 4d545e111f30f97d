"""PassManager: runs a pipeline, verifies after every pass, and instruments it.

After each pass: ``graph.lint()``, recompile, shape/dtype metadata refreshed, and the
outputs on the example inputs compared with the reference under the tolerance of the
pass's semantics class. A failure raises ``PassError`` naming the pass, the passes before
it, and the node where the error first appears.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxopt.capture import capture, capture_with_outputs, normalize_inputs
from fxopt.errors import PassError, SpecError, TrainingError
from fxopt.graph_utils import annotate_run, copy_graph_module, human_count, refresh_metadata
from fxopt.ops import op_of
from fxopt.passes.base import REGISTRY, Pass, PassContext, PassResult, Semantics
from fxopt.passes.sparsify import keep_sparsity
from fxopt.pipeline import PipelineLike, parse_pipeline
from fxopt.verify import (
    APPROXIMATE,
    EXACT,
    Tolerance,
    compare_outputs,
    loosest,
    worst_node,
)

TOLERANCES = {Semantics.EXACT: EXACT, Semantics.APPROXIMATE: APPROXIMATE}


@dataclass
class PassRecord:
    """One row of the report."""

    name: str
    spec: str
    semantics: str
    modified: bool
    seconds: float
    nodes: tuple[int, int]
    params: tuple[int, int]
    macs: tuple[int, int]
    max_error: float  # relative to the original outputs; NaN where not measured ("end")
    stats: dict[str, Any] = field(default_factory=dict)


@dataclass
class Report:
    """Per-pass instrumentation; ``str(report)`` is a table."""

    records: list[PassRecord] = field(default_factory=list)

    def __iter__(self):
        return iter(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        return self.records[i]

    def to_dict(self) -> list[dict]:
        return [asdict(r) for r in self.records]

    def table(self) -> str:
        head = ("pass", "sem", "changed", "time ms", "nodes", "params", "MACs", "max err")
        rows = [head]
        for r in self.records:
            rows.append((
                r.spec, r.semantics[:5], "yes" if r.modified else "no",
                f"{r.seconds * 1e3:.1f}", _arrow(*r.nodes), _arrow(*r.params, human=True),
                _arrow(*r.macs, human=True),
                "-" if math.isnan(r.max_error) else f"{r.max_error:.2e}",
            ))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    __str__ = table


def _arrow(a: int, b: int, human: bool = False) -> str:
    fmt = human_count if human else str
    return fmt(a) if a == b else f"{fmt(a)} -> {fmt(b)}"


@dataclass
class OptimizeResult:
    """``module``: the optimized GraphModule; ``report``: the per-pass table."""

    module: fx.GraphModule
    report: Report
    reference: Any = None

    @property
    def capture(self) -> dict:
        return self.module.meta.get("fxopt", {}).get("capture", {})


def graph_stats(gm: fx.GraphModule) -> tuple[int, int, int]:
    """(nodes, weight elements incl. buffers, MACs) of an annotated graph."""
    nodes = sum(1 for n in gm.graph.nodes if n.op not in ("placeholder", "output"))
    seen, params = set(), 0
    for t in list(gm.parameters()) + list(gm.buffers()):
        if t.dim() > 0 and id(t) not in seen:  # skips scalar counters (num_batches_tracked)
            seen.add(id(t))
            params += t.numel()
    macs = sum(op_of(n).macs() for n in gm.graph.nodes if n.op.startswith("call"))
    return nodes, params, macs


VERIFY_MODES = ("each", "end", "off")


def verify_mode(verify: bool | str) -> str:
    """``"each"`` / ``"end"`` / ``"off"`` from a ``verify=`` argument (``True`` is "each").

    >>> verify_mode(True), verify_mode("end"), verify_mode(False)
    ('each', 'end', 'off')
    """
    if verify is True or verify is False:
        return "each" if verify else "off"
    if isinstance(verify, str) and verify in VERIFY_MODES:
        return verify
    raise SpecError(
        f"verify={verify!r} is not a verification mode; use 'each' (after every pass), "
        "'end' (once, naming the guilty pass by bisection on failure), True or False"
    )


class PassManager:
    """Run a pipeline of passes with verification after each one (or once at the end).

    ``verify="each"`` (or True) checks the outputs after every pass that changed the graph;
    ``verify="end"`` checks once after the last pass and, when that fails, re-runs pipeline
    prefixes from a saved copy of the starting graph to name the guilty pass, raising the
    same PassError; ``verify=False`` skips the numeric check. Graph lint, recompilation and
    fresh shape/dtype metadata happen after every pass in all modes.

    Example::

        pm = PassManager("cleanup,remove_dropout", dump_dir="dumps")
        res = pm.run(gm, example_inputs)
        print(res.report)
    """

    def __init__(
        self,
        pipeline: PipelineLike = "default",
        *,
        verify: bool | str = True,
        tolerance: Tolerance | dict[str, Tolerance] | None = None,
        dump_dir: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.passes: list[Pass] = parse_pipeline(pipeline)
        self.verify = verify
        self.mode = verify_mode(verify)
        self.tolerance = tolerance
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.progress = progress

    def tolerance_for(self, p: Pass) -> Tolerance | None:
        if p.tolerance is not None:
            return p.tolerance
        if isinstance(self.tolerance, Tolerance):
            return self.tolerance
        if isinstance(self.tolerance, dict):
            if p.name in self.tolerance:
                return self.tolerance[p.name]
            if p.semantics.value in self.tolerance:
                return self.tolerance[p.semantics.value]
        info = REGISTRY.get(p.name)
        if info is not None and callable(info.tolerance):  # depends on the arguments
            return info.tolerance(p.params)
        if info is not None and info.tolerance is not None:
            return info.tolerance
        return TOLERANCES.get(p.semantics)

    def run(
        self,
        gm: fx.GraphModule,
        example_inputs: Sequence[Any],
        *,
        reference: Any = None,
        calibration: Iterable | None = None,
        train_data: Any = None,
        val_data: Any = None,
        teacher: nn.Module | None = None,
    ) -> OptimizeResult:
        """Run every pass on ``gm`` (modified in place) and return module + report.
        ``train_data`` / ``val_data`` / ``teacher`` feed a ``finetune`` stage.

        Example::

            res = PassManager("cleanup", verify="end").run(gm, (x,))
        """
        inputs = normalize_inputs(example_inputs)
        training = {"train_data": train_data, "val_data": val_data, "teacher": teacher}
        return self._run(gm, inputs, reference, calibration, annotate_run(gm, inputs),
                         training=training)

    def _run(self, gm, inputs, reference, calibration, outputs, rebuild=None,
             training: dict | None = None) -> OptimizeResult:
        """``outputs``: the graph's outputs from the run that just annotated it;
        ``rebuild``: makes the starting graph again (optimize re-captures the model);
        ``training``: train_data / val_data / teacher for a finetune stage."""
        original = outputs if reference is None else reference
        run = _Run(self, inputs, calibration, training)
        # the one copy verification needs: where "end" bisects from and where "each"
        # rebuilds a failing pass's input graph for attribution
        run.start = _Start(gm, rebuild) if self.mode != "off" else None
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
        meta = gm.meta.setdefault("fxopt", {})
        meta.setdefault("pipeline", [])
        current = original  # what the next pass is checked against
        measured = True  # whether ``outputs`` are the outputs of the graph as it is now
        stats = graph_stats(gm)
        segment = 0  # first pass whose outputs are not yet checked ("end")
        for index, p in enumerate(self.passes):
            if self.progress:
                self.progress(f"[{index + 1}/{len(self.passes)}] {p.spec}")
            before_code = gm.code if self.dump_dir is not None else ""
            if self.mode == "end" and p.semantics is Semantics.CHANGES:
                # the passes before a semantics-changing one are checked before it runs:
                # afterwards there is nothing left to compare them with
                if not measured:
                    outputs, measured = run.check_graph(None, gm, True), True
                run.verify_segment(segment, index - 1, gm, current, outputs)
            start = time.perf_counter()
            result = run.one(p, gm)
            seconds = time.perf_counter() - start
            gm = result.gm
            changed = bool(result.modified)
            # an unchanged graph keeps its metadata, outputs and verification
            need_outputs = changed and (
                self.mode == "each" or p.semantics is Semantics.CHANGES
            )
            if changed:
                outputs = run.check_graph(p, gm, need_outputs)
                measured = need_outputs
            if changed and need_outputs and self.mode == "each" and (
                p.semantics is not Semantics.CHANGES
            ):
                run.verify_each(index, gm, current, outputs)
            if p.semantics is Semantics.CHANGES and changed:
                current, segment = outputs, index + 1
            elif changed and p.semantics is not Semantics.EXACT and measured:
                current = outputs
            if self.dump_dir is not None:
                stem = f"{index:02d}_{p.name}"
                (self.dump_dir / f"{stem}.before.py").write_text(before_code)
                (self.dump_dir / f"{stem}.after.py").write_text(gm.code)
            after = graph_stats(gm) if changed else stats
            error = compare_outputs(original, outputs).rel if measured else math.nan
            if not changed and run.report.records:
                error = run.report.records[-1].max_error
            run.report.records.append(PassRecord(
                p.name, p.spec, p.semantics.value, changed, seconds,
                (stats[0], after[0]), (stats[1], after[1]), (stats[2], after[2]),
                error, result.stats,
            ))
            stats = after
            meta = gm.meta.setdefault("fxopt", meta)
            meta.setdefault("pipeline", []).append(p.spec)
        if not measured:
            # one real run: exact metadata, the final outputs and (for "end") the check
            outputs = run.check_graph(None, gm, True)
            last = run.report.records[-1]
            last.max_error = compare_outputs(original, outputs).rel
        if self.mode == "end" and segment < len(self.passes):
            run.verify_segment(segment, len(self.passes) - 1, gm, current, outputs)
        return OptimizeResult(gm, run.report, original)


class _Start:
    """The graph a run started from, for replaying pipeline prefixes.

    With ``rebuild`` (optimize re-captures the model) nothing is copied up front: the
    start is made again only when a replay is needed. Otherwise the copy shares the
    parameter and buffer tensors (only the structure is copied), since passes replace
    tensors rather than write into them; a pass that does write in place
    (``module.to(dtype)``, ``copy_``) is caught by each tensor's fingerprint and replay is
    refused with an error that says so."""

    def __init__(self, gm: fx.GraphModule, rebuild: Callable[[], fx.GraphModule] | None):
        self.rebuild = rebuild
        self.gm = copy_graph_module(gm, share_tensors=True) if rebuild is None else None
        tensors = [*self.gm.parameters(), *self.gm.buffers()] if self.gm is not None else []
        self.prints = [(t, _fingerprint(t)) for t in tensors]

    def copy(self) -> fx.GraphModule:
        """A private (fully deep) copy of the starting graph."""
        if self.rebuild is not None:
            return self.rebuild()
        if not all(_fingerprint(t) == f for t, f in self.prints):
            raise PassError(
                "cannot replay the pipeline: a pass wrote into the graph's weights in "
                "place, so the starting graph is gone; run with verify='each' to have "
                "every pass checked as it runs, or use fxopt.optimize, which re-captures"
            )
        return copy_graph_module(self.gm)


def _fingerprint(t: torch.Tensor) -> tuple:
    return (t.dtype, t.device, tuple(t.shape), t.data_ptr(), t._version)


class _Run:
    """The state of one ``PassManager.run``: context, report, the starting copy."""

    def __init__(self, manager: PassManager, inputs: tuple, calibration: Iterable | None,
                 training: dict | None = None):
        self.manager = manager
        self.inputs = inputs
        self.calibration = calibration
        self.training = training or {}
        self.report = Report()
        self.ctx = self.context()
        self.start: _Start | None = None

    def context(self) -> PassContext:
        # the report so far: a finetune stage reads the plan of the prune before it
        return PassContext(self.inputs, self.calibration,
                           options={"progress": self.manager.progress, "report": self.report},
                           **self.training)

    def one(self, p: Pass, gm: fx.GraphModule, ctx: PassContext | None = None,
            done: Sequence[str] | None = None) -> PassResult:
        try:
            result = p(gm, ctx or self.ctx)
        except (PassError, TrainingError):  # training errors say what to fix in the data
            raise
        except Exception as e:  # noqa: BLE001 - any crash inside a pass is reported as such
            raise PassError(
                f"pass {p.spec} crashed: {type(e).__name__}: {e}{self.history(done)}"
            ) from e
        if not isinstance(result, PassResult):
            raise PassError(
                f"pass {p.spec} returned {type(result).__name__}, not PassResult(gm, modified, "
                "stats)"
            )
        if p.name != "sparsify":
            # a pass that rewrote a sparsified weight gets its zeros back (before the check)
            kept = keep_sparsity(result.gm)
            if kept["reapplied"]:
                result.modified = True
                result.stats = {**result.stats, "sparsity_reapplied": kept["reapplied"]}
        return result

    def history(self, done: Sequence[str] | None = None) -> str:
        done = [r.spec for r in self.report.records] if done is None else list(done)
        return f" (passes before it: {', '.join(done) if done else 'none'})"

    def check_graph(self, p: Pass | None, gm: fx.GraphModule, real: bool) -> Any:
        """Lint, recompile and refresh metadata; with ``real``, by one run that also
        returns the outputs (else incrementally, on fake tensors, returning None)."""
        try:
            gm.graph.lint()
            gm.recompile()
            if real:
                return annotate_run(gm, self.inputs)
            refresh_metadata(gm, self.inputs)
            return None
        except Exception as e:  # noqa: BLE001
            who = f"pass {p.spec}" if p is not None else "the pipeline"
            raise PassError(
                f"{who} left a graph that is invalid or fails to run: "
                f"{type(e).__name__}: {e}{self.history()}"
            ) from e

    def replay(self, stop: int) -> fx.GraphModule:
        """The graph as it was before pass ``stop``: passes ``[0, stop)`` re-run on a copy of
        the starting graph."""
        gm = self.start.copy()
        ctx = self.context()
        for i, p in enumerate(self.manager.passes[:stop]):
            done = [q.spec for q in self.manager.passes[:i]]
            result = self.one(p, gm, ctx, done)
            gm = result.gm
            if result.modified:
                gm.graph.lint()
                gm.recompile()
                refresh_metadata(gm, self.inputs)
        return gm

    def verify_each(self, index: int, gm: fx.GraphModule, want: Any, got: Any) -> None:
        p = self.manager.passes[index]
        tol = self.manager.tolerance_for(p)
        cmp = compare_outputs(want, got, tol)
        if not cmp.ok():
            self.fail(index, gm, cmp, tol)

    def verify_segment(self, first: int, last: int, gm: fx.GraphModule, want: Any,
                       got: Any) -> None:
        """The "end" check of passes ``first..last`` against ``want``; on failure, bisect."""
        passes = self.manager.passes
        if last < first:
            return
        if got is None:
            got = self._outputs(gm)
        tol = self._loosest(first, last)
        end = compare_outputs(want, got, tol)
        if end.ok():
            return
        try:
            lo, hi = first, last  # the prefix through ``hi`` fails
            while lo < hi:
                mid = (lo + hi) // 2
                if compare_outputs(want, self._outputs(self.replay(mid + 1)), tol).ok():
                    lo = mid + 1
                else:
                    hi = mid
            before, after = self.replay(lo), self.replay(lo + 1)
        except PassError as e:
            specs = ", ".join(p.spec for p in passes[first:last + 1])
            raise PassError(
                f"the end-of-pipeline check failed (max abs error {end.max_abs:.3g}, "
                f"relative {end.rel:.3g}) after {specs}, and bisection could not name the "
                f"pass: {e}"
            ) from e
        got = self._outputs(after)
        own = self.manager.tolerance_for(passes[lo]) or EXACT
        cmp = compare_outputs(self._outputs(before), got, own)  # the "each" check
        if cmp.ok():  # fine on its own: the drift of the passes up to it adds up
            cmp, own = compare_outputs(want, got, tol), tol
        self.fail(lo, after, cmp, own, bisected=True, before=before)

    def _outputs(self, gm: fx.GraphModule) -> Any:
        with torch.no_grad():
            return gm(*self.inputs)

    def _loosest(self, first: int, last: int) -> Tolerance:
        tols = [self.manager.tolerance_for(p) for p in self.manager.passes[first:last + 1]]
        return loosest([t for t in tols if t is not None])

    def fail(self, index: int, gm: fx.GraphModule, cmp, tol: Tolerance,
             bisected: bool = False, before: fx.GraphModule | None = None) -> None:
        p = self.manager.passes[index]
        culprit = None
        try:
            before = self.replay(index) if before is None else before
            culprit = worst_node(before, gm, self.inputs, tol)
        except Exception:  # noqa: BLE001 - attribution is best effort
            culprit = None
        where = ""
        if culprit:
            node = next((n for n in gm.graph.nodes if n.name == culprit[0]), None)
            kind = op_of(node).kind if node is not None and node.op.startswith("call") else ""
            path = node.meta.get("fxopt_module_path", "") if node is not None else ""
            where = (
                f"; the error first appears at node {culprit[0]!r}"
                f"{f' ({kind}' if kind else ''}{f', module {path}' if path else ''}"
                f"{')' if kind else ''} with relative error {culprit[1]:.3g}"
            )
        detail = cmp.structure_error or (
            f"max abs error {cmp.max_abs:.3g} (relative {cmp.rel:.3g}, cosine {cmp.cosine:.6f}) "
            f"exceeds the {p.semantics.value} tolerance rtol={tol.rtol:g}, atol={tol.atol:g}"
        )
        found = " (found by bisection after the end-of-pipeline check failed)" if bisected else ""
        done = [q.spec for q in self.manager.passes[:index]]
        raise PassError(
            f"pass {p.spec} changed the model's outputs{found}: {detail}{where}"
            f"{self.history(done)}. "
            "Drop the pass from the pipeline, or loosen its tolerance if the change is expected."
        )


def optimize(
    model: nn.Module,
    example_inputs: Sequence[Any],
    pipeline: PipelineLike = "default",
    *,
    mode: str = "auto",
    calibration: Iterable | None = None,
    verify: bool | str = True,
    tolerance: Tolerance | dict[str, Tolerance] | None = None,
    dump_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    train_data: Any = None,
    val_data: Any = None,
    teacher: nn.Module | None = None,
    **capture_options: Any,
) -> OptimizeResult:
    """Capture ``model`` and run ``pipeline`` over it, verifying every pass.

    ``verify="each"`` (or True, the default) checks after every pass that changed the
    graph; ``verify="end"`` checks once at the end and bisects to name the guilty pass on
    failure (cheaper when trying many candidates); ``verify=False`` does not check.
    ``train_data`` / ``val_data`` feed a ``finetune`` stage (``fxopt.finetune``'s data
    convention); its teacher is ``model`` itself unless ``teacher=`` says otherwise.

    Example::

        res = fxopt.optimize(model, (x,), pipeline="default")
        res = fxopt.optimize(model, (x,), "default", verify="end")
        res = fxopt.optimize(model, (x,), "prune(macs=0.5),finetune(epochs=2)",
                             train_data=(X, Y), val_data=(Xv, Yv))
        print(res.report)
        res.module(x)
    """
    manager = PassManager(pipeline, verify=verify, tolerance=tolerance, dump_dir=dump_dir,
                          progress=progress)
    inputs = normalize_inputs(example_inputs)
    training = {"train_data": train_data, "val_data": val_data,
                "teacher": model if teacher is None else teacher}
    if isinstance(model, fx.GraphModule) and "fxopt" in model.meta:
        return manager.run(copy_graph_module(model), inputs, calibration=calibration,
                           **training)
    # capture's annotating run already gave the graph's outputs: the manager starts from them
    gm, outputs = capture_with_outputs(model, inputs, mode=mode, **capture_options)

    def rebuild() -> fx.GraphModule:
        return capture(model, inputs, mode=mode, **{**capture_options, "check": False})

    return manager._run(gm, inputs, None, calibration, outputs, rebuild, training)
