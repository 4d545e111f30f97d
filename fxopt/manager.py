"""PassManager: runs a pipeline, verifies after every pass, and instruments it.

After each pass: ``graph.lint()``, recompile, shape/dtype metadata refreshed, and the
outputs on the example inputs compared with the reference under the tolerance of the
pass's semantics class. A failure raises ``PassError`` naming the pass, the passes before
it, and the node where the error first appears.
"""

from __future__ import annotations

import copy
import os
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxopt.capture import annotate, capture, normalize_inputs
from fxopt.errors import PassError
from fxopt.ops import op_of
from fxopt.passes.base import REGISTRY, Pass, PassContext, PassResult, Semantics
from fxopt.pipeline import PipelineLike, parse_pipeline
from fxopt.verify import APPROXIMATE, EXACT, Tolerance, compare_outputs, worst_node

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
    max_error: float  # relative to the original outputs
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
                _arrow(*r.macs, human=True), f"{r.max_error:.2e}",
            ))
        widths = [max(len(str(row[i])) for row in rows) for i in range(len(head))]
        lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
        lines.insert(1, "  ".join("-" * w for w in widths))
        return "\n".join(lines)

    __str__ = table


def _arrow(a: int, b: int, human: bool = False) -> str:
    fmt = human_count if human else str
    return fmt(a) if a == b else f"{fmt(a)} -> {fmt(b)}"


def human_count(n: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


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


class PassManager:
    """Run a pipeline of passes with verification after each one.

    Example::

        pm = PassManager("cleanup,remove_dropout", dump_dir="dumps")
        res = pm.run(gm, example_inputs)
        print(res.report)
    """

    def __init__(
        self,
        pipeline: PipelineLike = "default",
        *,
        verify: bool = True,
        tolerance: Tolerance | dict[str, Tolerance] | None = None,
        dump_dir: str | os.PathLike | None = None,
        progress: Callable[[str], None] | None = None,
    ):
        self.passes: list[Pass] = parse_pipeline(pipeline)
        self.verify = verify
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
    ) -> OptimizeResult:
        """Run every pass on ``gm`` (modified in place) and return module + report."""
        inputs = normalize_inputs(example_inputs)
        annotate(gm, inputs)
        if reference is None:
            with torch.no_grad():
                reference = gm(*inputs)
        original, current = reference, reference
        ctx = PassContext(inputs, calibration, options={"progress": self.progress})
        report = Report()
        meta = gm.meta.setdefault("fxopt", {})
        meta.setdefault("pipeline", [])
        if self.dump_dir is not None:
            self.dump_dir.mkdir(parents=True, exist_ok=True)
        for index, p in enumerate(self.passes):
            if self.progress:
                self.progress(f"[{index + 1}/{len(self.passes)}] {p.spec}")
            before_stats = graph_stats(gm)
            before_code = gm.code
            before = _copy_graph_module(gm) if self.verify else None
            start = time.perf_counter()
            result = self._run_one(p, gm, ctx, report)
            seconds = time.perf_counter() - start
            gm = self._check_graph(p, result, inputs, report)
            with torch.no_grad():
                outputs = gm(*inputs)
            if self.verify and p.semantics is not Semantics.CHANGES:
                self._verify(p, before, gm, inputs, current, outputs, report)
            if p.semantics is not Semantics.EXACT:
                current = outputs
            if self.dump_dir is not None:
                stem = f"{index:02d}_{p.name}"
                (self.dump_dir / f"{stem}.before.py").write_text(before_code)
                (self.dump_dir / f"{stem}.after.py").write_text(gm.code)
            after_stats = graph_stats(gm)
            error = compare_outputs(original, outputs).rel
            report.records.append(PassRecord(
                p.name, p.spec, p.semantics.value, bool(result.modified), seconds,
                (before_stats[0], after_stats[0]), (before_stats[1], after_stats[1]),
                (before_stats[2], after_stats[2]), error, result.stats,
            ))
            meta = gm.meta.setdefault("fxopt", meta)
            meta.setdefault("pipeline", []).append(p.spec)
        return OptimizeResult(gm, report, original)

    def _run_one(self, p: Pass, gm: fx.GraphModule, ctx: PassContext, report: Report):
        try:
            result = p(gm, ctx)
        except PassError:
            raise
        except Exception as e:  # noqa: BLE001 - any crash inside a pass is reported as such
            raise PassError(
                f"pass {p.spec} crashed: {type(e).__name__}: {e}{_history(report)}"
            ) from e
        if not isinstance(result, PassResult):
            raise PassError(
                f"pass {p.spec} returned {type(result).__name__}, not PassResult(gm, modified, "
                "stats)"
            )
        return result

    def _check_graph(self, p: Pass, result: PassResult, inputs, report) -> fx.GraphModule:
        gm = result.gm
        try:
            gm.graph.lint()
            gm.recompile()
            annotate(gm, inputs)
        except Exception as e:  # noqa: BLE001
            raise PassError(
                f"pass {p.spec} left a graph that is invalid or fails to run: "
                f"{type(e).__name__}: {e}{_history(report)}"
            ) from e
        return gm

    def _verify(self, p, before, gm, inputs, want, got, report) -> None:
        tol = self.tolerance_for(p)
        cmp = compare_outputs(want, got, tol)
        if cmp.ok():
            return
        culprit = worst_node(before, gm, inputs, tol)
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
        raise PassError(
            f"pass {p.spec} changed the model's outputs: {detail}{where}{_history(report)}. "
            "Drop the pass from the pipeline, or loosen its tolerance if the change is expected."
        )


def _copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    # deep-copying a pytree codegen trips torch's own LeafSpec deprecation warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm)


def _history(report: Report) -> str:
    done = [r.spec for r in report.records]
    return f" (passes before it: {', '.join(done) if done else 'none'})"


def optimize(
    model: nn.Module,
    example_inputs: Sequence[Any],
    pipeline: PipelineLike = "default",
    *,
    mode: str = "auto",
    calibration: Iterable | None = None,
    verify: bool = True,
    tolerance: Tolerance | dict[str, Tolerance] | None = None,
    dump_dir: str | os.PathLike | None = None,
    progress: Callable[[str], None] | None = None,
    **capture_options: Any,
) -> OptimizeResult:
    """Capture ``model`` and run ``pipeline`` over it, verifying every pass.

    Example::

        res = fxopt.optimize(model, (x,), pipeline="default")
        print(res.report)
        res.module(x)
    """
    manager = PassManager(pipeline, verify=verify, tolerance=tolerance, dump_dir=dump_dir,
                          progress=progress)
    inputs = normalize_inputs(example_inputs)
    if isinstance(model, fx.GraphModule) and "fxopt" in model.meta:
        gm = _copy_graph_module(model)
    else:
        gm = capture(model, inputs, mode=mode, **capture_options)
    return manager.run(gm, inputs, calibration=calibration)
