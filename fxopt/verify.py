"""Numeric comparison of outputs and attribution of errors to graph nodes."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx
from torch.utils import _pytree as pytree


@dataclass(frozen=True)
class Tolerance:
    """``|got - want| <= atol + rtol * max|want|`` per output, plus a cosine floor."""

    rtol: float
    atol: float
    min_cosine: float | None = None

    def allows(self, max_abs: float, ref_scale: float, cosine: float) -> bool:
        if not math.isfinite(max_abs):
            return False
        if max_abs > self.atol + self.rtol * ref_scale:
            return False
        # the floor is a second condition, never a way out: cosine is blind to scale, so
        # an output 1.5x too large has cosine 1.0
        return self.min_cosine is None or cosine >= self.min_cosine


# float32 round-off after re-association (folding, reordering) across a deep network stays
# below ~1e-5 of the output scale; 1e-4 leaves headroom without hiding real bugs.
EXACT = Tolerance(rtol=1e-4, atol=1e-5)
APPROXIMATE = Tolerance(rtol=5e-2, atol=1e-3, min_cosine=0.99)
# quantized graphs: int8 rounding accumulates through deep networks (measured on the 50-layer
# ResNets: single elements off by 25-60% of the output's largest magnitude while the output
# cosine stays >= 0.999), and ONNX Runtime's int8 kernels requantize with other rounding
# than fake-quant; the cosine floor is the real check, the element bound only catches a
# wrong scale or a broken layer
QUANTIZED = Tolerance(rtol=1.0, atol=1e-3, min_cosine=0.99)
# half-precision graphs, against float32 or against another runtime's half kernels (whose
# accumulation order legitimately differs): fp16 keeps 10 mantissa bits (measured within
# rtol 1e-2, cosine >= 0.9999 on the zoo and on ResNet-50-sized models); bf16 keeps 7, three
# fewer, so its bound is looser but a broken layer (cosine < 0.99) is still refused
HALF_FP16 = Tolerance(rtol=3e-2, atol=1e-3, min_cosine=0.999)
HALF_BF16 = Tolerance(rtol=1e-1, atol=1e-2, min_cosine=0.995)
HALF = {torch.float16: HALF_FP16, torch.bfloat16: HALF_BF16}


def loosest(tolerances: Sequence[Tolerance]) -> Tolerance:
    """The tolerance every one of ``tolerances`` is at least as strict as.

    Example::

        loosest([EXACT, HALF_FP16])   # == HALF_FP16
    """
    tols = list(tolerances) or [EXACT]
    floors = [t.min_cosine for t in tols if t.min_cosine is not None]
    return Tolerance(max(t.rtol for t in tols), max(t.atol for t in tols),
                     min(floors) if floors else None)


def graph_tolerance(gm: fx.GraphModule) -> Tolerance:
    """The tolerance another runtime's execution of ``gm`` is checked with, from what the
    graph computes in: ``QUANTIZED`` for a graph the ``quantize`` pass changed, ``HALF_FP16``
    / ``HALF_BF16`` where float16 / bfloat16 tensors flow (weights or node values), else
    ``EXACT``; a graph with several gets the loosest of them.

    Example::

        graph_tolerance(fxopt.optimize(m, (x,), "half(dtype=bf16)").module)  # HALF_BF16
    """
    tols = [QUANTIZED] if (gm.meta.get("fxopt") or {}).get("quantized") else []
    dtypes = {t.dtype for t in [*gm.parameters(), *gm.buffers()]}
    for node in gm.graph.nodes:
        dt = node.meta.get("dtype")
        dtypes.update(d for d in (dt if isinstance(dt, (list, tuple)) else [dt])
                      if isinstance(d, torch.dtype))
        if node.op == "get_attr":
            value = _attr(gm, str(node.target))
            if isinstance(value, torch.Tensor):
                dtypes.add(value.dtype)
    tols += [tol for dt, tol in HALF.items() if dt in dtypes]
    return loosest(tols) if tols else EXACT


def _attr(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


@dataclass
class CompareReport:
    """Per-output errors of ``got`` against ``want``."""

    max_abs: float = 0.0
    ref_scale: float = 0.0
    cosine: float = 1.0
    per_output: list[dict] = field(default_factory=list)
    structure_error: str | None = None
    tolerance: Tolerance = EXACT

    @property
    def rel(self) -> float:
        return self.max_abs / self.ref_scale if self.ref_scale > 0 else self.max_abs

    def ok(self, tolerance: Tolerance | None = None) -> bool:
        if self.structure_error:
            return False
        tol = tolerance or self.tolerance
        return all(tol.allows(o["max_abs"], o["ref_scale"], o["cosine"]) for o in self.per_output)


def compare_outputs(want: Any, got: Any, tolerance: Tolerance = EXACT) -> CompareReport:
    """Compare two (nested) outputs leaf by leaf.

    Example::

        report = compare_outputs(model(x), gm(x))
        assert report.ok(), report.max_abs
    """
    report = CompareReport(tolerance=tolerance)
    w_leaves, w_spec = pytree.tree_flatten(want)
    g_leaves, g_spec = pytree.tree_flatten(got)
    if len(w_leaves) != len(g_leaves):
        report.structure_error = f"{len(w_leaves)} outputs expected, got {len(g_leaves)}"
        report.max_abs = math.inf
        return report
    cosines = []
    for i, (w, g) in enumerate(zip(w_leaves, g_leaves)):
        entry = _compare_leaf(w, g)
        entry["index"] = i
        if entry.get("error"):
            report.structure_error = f"output {i}: {entry['error']}"
            report.max_abs = math.inf
            return report
        report.per_output.append(entry)
        report.max_abs = max(report.max_abs, entry["max_abs"])
        report.ref_scale = max(report.ref_scale, entry["ref_scale"])
        cosines.append(entry["cosine"])
    report.cosine = min(cosines) if cosines else 1.0
    return report


def _compare_leaf(w: Any, g: Any) -> dict:
    if not isinstance(w, torch.Tensor):
        same = w == g if not isinstance(g, torch.Tensor) else False
        return {
            "max_abs": 0.0 if same else math.inf,
            "ref_scale": 0.0,
            "cosine": 1.0 if same else 0.0,
        }
    if not isinstance(g, torch.Tensor):
        return {"error": f"expected a tensor, got {type(g).__name__}"}
    if tuple(w.shape) != tuple(g.shape):
        return {"error": f"shape {tuple(g.shape)} instead of {tuple(w.shape)}"}
    if w.numel() == 0:
        return {"max_abs": 0.0, "ref_scale": 0.0, "cosine": 1.0}
    wf, gf = w.detach().double(), g.detach().double()
    finite = torch.isfinite(wf)
    if not torch.equal(finite, torch.isfinite(gf)) or not torch.equal(wf[~finite], gf[~finite]):
        return {"max_abs": math.inf, "ref_scale": 0.0, "cosine": 0.0}
    diff = (wf[finite] - gf[finite]).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(wf[finite].abs().max()) if diff.numel() else 0.0
    return {"max_abs": max_abs, "ref_scale": scale, "cosine": cosine(wf[finite], gf[finite])}


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine similarity of two tensors flattened (1.0 when both are zero)."""
    a, b = a.flatten().double(), b.flatten().double()
    na, nb = a.norm(), b.norm()
    if na == 0 and nb == 0:
        return 1.0
    if na == 0 or nb == 0:
        return 0.0
    return float((a @ b) / (na * nb))


def random_like_inputs(inputs: Sequence[Any], seed: int = 0) -> tuple:
    """Fresh inputs of the same shapes/dtypes; integer inputs stay within the seen range."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for x in inputs:
        if not isinstance(x, torch.Tensor):
            out.append(x)
        elif x.is_floating_point():
            out.append(torch.randn(x.shape, generator=gen, dtype=x.dtype))
        elif x.dtype == torch.bool:
            out.append(torch.randint(0, 2, x.shape, generator=gen).bool())
        else:
            lo, hi = (int(x.min()), int(x.max())) if x.numel() else (0, 1)
            out.append(torch.randint(lo, hi + 1, x.shape, generator=gen, dtype=x.dtype))
    return tuple(out)


def resize_batch(inputs: Sequence[Any], delta: int = 1) -> tuple | None:
    """Inputs with dimension 0 grown by ``delta`` (None if there is no tensor to grow)."""
    out, grew = [], False
    for x in inputs:
        if isinstance(x, torch.Tensor) and x.dim() > 0:
            reps = [1] * x.dim()
            reps[0] = 2
            out.append(torch.cat([x, x.repeat(*reps)])[: x.shape[0] + delta])
            grew = True
        else:
            out.append(x)
    return tuple(out) if grew else None


# --------------------------------------------------------------------------- attribution
def node_values(gm: fx.GraphModule, inputs: Sequence[Any]) -> dict[str, Any]:
    """Every node's output by name, from one run of ``gm`` on ``inputs``.

    Example::

        node_values(gm, (x,))["fc1"].shape
    """
    return _values_and_outputs(gm, inputs)[0]


def _values_and_outputs(gm: fx.GraphModule, inputs: Sequence[Any]) -> tuple[dict, Any]:
    values: dict[str, Any] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if n.op != "output":
                values[n.name] = result
            return result

    with torch.no_grad():
        outputs = _Recorder(gm).run(*inputs)
    return values, outputs


def worst_node(
    before: fx.GraphModule, after: fx.GraphModule, inputs: Sequence[Any], tolerance: Tolerance
) -> tuple[str, float] | None:
    """The node of ``after`` whose value drifts first (in graph order) from ``before``.

    Nodes are matched by name. A drifting node fed by a node the pass created (a name
    ``before`` lacks) is blamed on that new node; a drift visible only in the outputs is
    blamed on the node now producing that output. Where nothing exceeds ``tolerance`` the
    largest relative error is returned. Returns None when nothing could be matched.
    """
    try:
        # one run per graph gives both the node values and the outputs
        (want, want_out), (got, got_out) = (
            _values_and_outputs(before, inputs), _values_and_outputs(after, inputs))
    except Exception:  # noqa: BLE001 - attribution is best effort on a broken graph
        return None
    worst: tuple[str, float] | None = None
    for node in after.graph.nodes:
        if node.name not in want or node.name not in got or node.op == "get_attr":
            continue
        report = compare_outputs(want[node.name], got[node.name], tolerance)
        if report.structure_error:
            continue
        if not report.ok():
            new = [a for a in node.all_input_nodes if a.name not in want and a.op != "get_attr"]
            return (new[0].name if new else node.name), report.rel
        if worst is None or report.rel > worst[1]:
            worst = (node.name, report.rel)
    out_nodes = pytree.tree_leaves(after.graph.output_node().args[0])
    w_leaves, g_leaves = pytree.tree_leaves(want_out), pytree.tree_leaves(got_out)
    if len(w_leaves) == len(g_leaves) == len(out_nodes):
        for node, w, g in zip(out_nodes, w_leaves, g_leaves, strict=True):
            report = compare_outputs(w, g, tolerance)
            if isinstance(node, fx.Node) and not report.structure_error and not report.ok():
                return node.name, report.rel
    return worst
