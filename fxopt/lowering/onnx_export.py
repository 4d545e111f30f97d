"""GraphModule -> ONNX IR: the two torch exporters, dynamic dimensions, and graph cleanup.

``export(gm, inputs, exporter="dynamo", ...)`` returns an ``onnx_ir.Model``; ``clean``
folds constants and removes dead nodes with onnxscript's optimizer, then sorts the graph
topologically. Both exporters run quietly: their progress prints, logs and warnings are
about torch internals, not about the user's model.

Example::

    model = export(gm, (x,), "dynamo", opset=18, dynamic_dims={0: {0: "batch"}})
    stats = clean(model)
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import onnx_ir as ir
import torch
import torch.fx as fx
from onnx_ir.passes import common as ir_passes
from onnxscript import optimizer as onnxscript_optimizer
from onnxscript import rewriter as onnxscript_rewriter

from fxopt.errors import LoweringError

EXPORTERS = ("dynamo", "torchscript")
# torch op -> onnxscript function, for fxopt's own custom ops (e.g. dynamic int8 linear);
# passed to the dynamo exporter as its custom_translation_table
TRANSLATIONS: dict[Any, Any] = {}
# {input position: {dimension: symbolic name}}
DynamicDims = Mapping[int, Mapping[int, str]]
_NOISY_LOGGERS = ("torch.onnx", "torch.export", "torch._dynamo", "torch._export",
                  "torch.fx.experimental.symbolic_shapes", "onnxscript", "onnx_ir")


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """Silence the exporters' stdout progress, loggers and warnings for the duration."""
    saved = {}
    for name in _NOISY_LOGGERS:
        lg = logging.getLogger(name)
        saved[name] = lg.level
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def register_translation(op: Any, onnx_fn: Any) -> None:
    """Teach the dynamo exporter an fxopt custom op: ``op`` (a ``torch.ops`` overload) is
    written as the onnxscript function ``onnx_fn``.

    >>> register_translation(torch.ops.fxopt.my_op.default, my_onnx_fn)  # doctest: +SKIP
    """
    TRANSLATIONS[op] = onnx_fn


def export(
    gm: fx.GraphModule,
    inputs: tuple,
    exporter: str,
    *,
    opset: int,
    input_names: list[str],
    output_names: list[str],
    dynamic_dims: DynamicDims,
) -> ir.Model:
    """Export ``gm`` with ``exporter`` ("dynamo" or "torchscript") to an ONNX IR model.

    Raises LoweringError (with the exporter's own message) when the exporter fails.

    >>> export(gm, (x,), "torchscript", opset=18, input_names=["x"],
    ...        output_names=["output"], dynamic_dims={0: {0: "batch"}})  # doctest: +SKIP
    """
    if exporter not in EXPORTERS:
        raise LoweringError(f"unknown exporter {exporter!r}; use one of {', '.join(EXPORTERS)}")
    fn = _export_dynamo if exporter == "dynamo" else _export_torchscript
    try:
        with quiet():
            return fn(gm, inputs, opset, input_names, output_names, dynamic_dims)
    except LoweringError:
        raise
    except Exception as e:
        raise LoweringError(f"the {exporter} exporter failed: {_first_line(e)}") from e


def _export_dynamo(gm, inputs, opset, input_names, output_names, dynamic_dims) -> ir.Model:
    dynamic_shapes = tuple(
        {dim: name for dim, name in dynamic_dims.get(i, {}).items()} or None
        for i in range(len(inputs))
    )
    program = torch.onnx.export(
        gm, inputs, dynamo=True, opset_version=opset, input_names=input_names,
        output_names=output_names, verbose=False, optimize=False,
        custom_translation_table=dict(TRANSLATIONS) or None,
        dynamic_shapes=dynamic_shapes if any(dynamic_dims.values()) else None,
    )
    return program.model


def _export_torchscript(gm, inputs, opset, input_names, output_names, dynamic_dims) -> ir.Model:
    axes: dict[str, dict[int, str]] = {
        input_names[i]: dict(dims) for i, dims in dynamic_dims.items() if dims
    }
    batch = _batch_name(dynamic_dims)
    if batch is not None:  # outputs that lead with the batch dimension keep it dynamic
        for name, out in zip(output_names, _flat_outputs(gm, inputs)):
            if isinstance(out, torch.Tensor) and out.dim() and out.shape[0] == inputs[0].shape[0]:
                axes[name] = {0: batch}
    with tempfile.TemporaryDirectory(prefix="fxopt-ts-") as tmp:
        f = Path(tmp) / "model.onnx"
        torch.onnx.export(
            gm, inputs, str(f), dynamo=False, opset_version=opset, input_names=input_names,
            output_names=output_names, dynamic_axes=axes or None, do_constant_folding=True,
        )
        return ir.external_data.load_to_model(ir.load(f))  # read it all before tmp goes


def _batch_name(dynamic_dims: DynamicDims) -> str | None:
    names = {dims.get(0) for dims in dynamic_dims.values() if dims.get(0)}
    return names.pop() if len(names) == 1 else None


def _flat_outputs(gm: fx.GraphModule, inputs: tuple) -> list[Any]:
    with torch.no_grad():
        return torch.utils._pytree.tree_leaves(gm(*inputs))


def clean(model: ir.Model) -> dict[str, int]:
    """Fold constants, drop dead nodes and identities, deduplicate initializers and sort
    the graph topologically, in place. Returns node counts before and after, and how many
    Reshape targets are still computed at run time.

    With a dynamic batch the exporter computes each reshape target and the causal mask's
    shape at run time (Shape -> Slice -> Concat). onnx_ir's shape inference with data
    propagation (it leaves large weights out of the proto it infers on, so any model size
    works) gives those nodes static output shapes; onnxscript's rules then materialize the
    reshape targets (-1 in the one dynamic place) and fold the mask into a constant.

    >>> clean(model)  # doctest: +SKIP
    {'nodes_before': 255, 'nodes_after': 91, 'dynamic_reshapes': 0}
    """
    before = _count_nodes(model)
    with quiet():
        nodes = -1
        for _ in range(4):  # shapes inferred after one fold expose the next fold
            onnxscript_optimizer.optimize_ir(model, should_fold=_keep_packed_weights)
            ir_passes.ShapeInferencePass(data_prop=True, strict_mode=False)(model)
            onnxscript_rewriter.rewrite(model)  # its default rules: MaterializeReshapeShape…
            onnxscript_rewriter.rewrite(model, RULES)
            reattach_orphaned_constants(model)
            ir_passes.IdentityEliminationPass()(model)
            if nodes == (nodes := _count_nodes(model)):
                break
        for p in (
            ir_passes.IdentityEliminationPass(),
            ir_passes.CommonSubexpressionEliminationPass(),
            ir_passes.DeduplicateInitializersPass(),
            ir_passes.LiftConstantsToInitializersPass(lift_all_constants=False),
            ir_passes.RemoveUnusedNodesPass(),
            ir_passes.RemoveUnusedFunctionsPass(),
            ir_passes.RemoveUnusedOpsetsPass(),
            ir_passes.TopologicalSortPass(),
        ):
            p(model)
    return {"nodes_before": before, "nodes_after": _count_nodes(model),
            "dynamic_reshapes": dynamic_reshapes(model)}


def reattach_orphaned_constants(model: ir.Model) -> int:
    """Register again, under a fresh name, each constant that a node of the main graph
    reads but that is neither an initializer, a graph input nor a node's output. Returns
    how many there were.

    onnxscript's rewriter (0.7) adds a rule's new initializer under its chosen name even
    when that name is taken, which silently unregisters the old initializer while nodes
    still read it: the saved graph then reads an undefined value ("Nodes in a graph must be
    topologically sorted"). ``ReshapeReshape`` names its fused shape ``<output>/shape``, so
    a chain of three reshapes fused over two rounds of ``clean`` (a pruned Swin window
    partition with a dynamic batch) collides with itself.

    >>> reattach_orphaned_constants(model)  # doctest: +SKIP
    1
    """
    graph = model.graph
    inputs = set(graph.inputs)
    orphans = list(dict.fromkeys(
        v for node in graph for v in node.inputs
        if v is not None and v.producer() is None and v.const_value is not None
        and not v.is_initializer() and v not in inputs))
    if not orphans:
        return 0
    taken = set(graph.initializers) | {v.name for v in inputs}
    taken |= {v.name for node in graph for v in node.outputs}
    for value in orphans:
        base, k = value.name or "constant", 1
        while f"{base}_{k}" in taken:
            k += 1
        value.name = f"{base}_{k}"
        taken.add(value.name)
        graph.register_initializer(value)
    return len(orphans)


def dynamic_reshapes(model: ir.Model) -> int:
    """How many Reshape nodes of ``model`` take a target shape computed at run time.

    >>> dynamic_reshapes(model)  # doctest: +SKIP
    0
    """
    return sum(1 for n in model.graph.all_nodes()
               if n.op_type == "Reshape" and n.domain in ("", "ai.onnx")
               and len(n.inputs) > 1 and n.inputs[1] is not None
               and n.inputs[1].const_value is None)


class SliceOfShape(onnxscript_rewriter.RewriteRuleClassBase):
    """``Slice(Shape(x), [a], [b])`` -> ``Shape(x, start=a, end=b)``, so that the constant
    folder sees which dimensions are taken and folds them when they are static.

    The exporter writes the causal mask's size as ``Shape(q)[-2:]``: with only the batch
    dynamic those dimensions are fixed, but the folder cannot see through a Slice.
    """

    def pattern(self, op, x, starts, ends):
        return op.Slice(op.Shape(x), starts, ends)

    def check(self, context, x, starts, ends) -> onnxscript_rewriter.MatchResult:
        result = onnxscript_rewriter.MatchResult()
        s, e = (_int_array(v) for v in (starts, ends))
        if s is None or e is None or s.size != 1 or e.size != 1:
            return result.fail("Slice bounds are not constant scalars.")
        shape = next(n for n in context.nodes if n.op_type == "Shape")
        if shape.attributes.get_int("start", 0) != 0 or "end" in shape.attributes:
            return result.fail("Shape already takes a part of the dimensions.")
        self._start, self._end = int(s.reshape(-1)[0]), int(e.reshape(-1)[0])
        return result

    def rewrite(self, op, x, starts, ends):
        end = self._end if self._end < 2**62 else None  # INT64_MAX means "to the end"
        return op.Shape(x, start=self._start, **({} if end is None else {"end": end}))


class ReshapeToOwnShape(onnxscript_rewriter.RewriteRuleClassBase):
    """``Reshape(x, [a, -1, c])`` -> ``x`` when ``x`` already has rank 3 and dims ``a``
    and ``c``: the element count fixes the -1 to ``x``'s own dimension.

    onnxscript's folder removes a Reshape only when both shapes are equal as written; a
    dynamic batch leaves ``x``'s dimension symbolic (named differently from any other),
    so the reshapes that attention writes around its head split survived.
    """

    def pattern(self, op, x, shape):
        return op.Reshape(x, shape)

    def check(self, context, x, shape) -> onnxscript_rewriter.MatchResult:
        result = onnxscript_rewriter.MatchResult()
        target = _int_array(shape)
        if target is None or x.shape is None or target.ndim != 1:
            return result.fail("Target or input shape unknown.")
        if len(target) != len(x.shape) or np.count_nonzero(target == -1) != 1:
            return result.fail("Not a same-rank reshape with one -1.")
        for want, have in zip(target.tolist(), x.shape):
            if want != -1 and not (want > 0 and isinstance(have, int) and have == want):
                return result.fail(f"Dimension {have} is not {want}.")
        return result

    def rewrite(self, op, x, shape):
        return op.Identity(x)


class BatchedLinearToGemm(onnxscript_rewriter.RewriteRuleClassBase):
    """``Add(MatMul(x, w), b)`` with ``x`` of shape ``[batch, s, k]`` (at most one dynamic
    dimension) -> ``Reshape(Gemm(Reshape(x, [-1, k]), w, b), [-1, s, n])``.

    ONNX Runtime makes this rewrite itself, but only when every dimension is static: a
    dynamic batch otherwise keeps a separate MatMul and bias Add in every linear layer,
    a few percent of a small transformer's latency. The reshapes are exact (-1 in the one
    dynamic place); float32 only, where ONNX Runtime's CPU Gemm is the reference.
    """

    def pattern(self, op, x, w, b):
        return op.Add(op.MatMul(x, w), b)

    def check(self, context, x, w, b) -> onnxscript_rewriter.MatchResult:
        result = onnxscript_rewriter.MatchResult()
        if any(v.dtype != ir.DataType.FLOAT for v in (x, w, b)):
            return result.fail("Gemm is used for float32 only.")
        if any(v.producer() is not None and v.producer().op_type == "DequantizeLinear"
               for v in (x, w)):  # a reshape would split ONNX Runtime's Q/DQ MatMul unit
            return result.fail("A quantized MatMul stays as the Q/DQ pass wrote it.")
        if x.shape is None or w.shape is None or b.shape is None:
            return result.fail("Shapes unknown.")
        xs, ws = list(x.shape), list(w.shape)
        if len(xs) < 3 or len(ws) != 2 or not all(isinstance(d, int) for d in ws):
            return result.fail("Not a batched input times a 2-D weight.")
        lead = xs[:-1]
        if xs[-1] != ws[0] or sum(not isinstance(d, int) for d in lead) > 1:
            return result.fail("Inner dimension unknown, or more than one dynamic dim.")
        if list(b.shape) not in ([ws[1]], [1, ws[1]]):
            return result.fail("Bias is not one value per output column.")
        self._in = [-1, ws[0]]
        self._out = [d if isinstance(d, int) else -1 for d in lead] + [ws[1]]
        return result

    def rewrite(self, op, x, w, b):
        flat = op.Reshape(x, op.Constant(value=ir.tensor(self._in, dtype=ir.DataType.INT64)))
        y = op.Gemm(flat, w, b)
        return op.Reshape(y, op.Constant(value=ir.tensor(self._out, dtype=ir.DataType.INT64)))


class SplitAxisBeforeTranspose(onnxscript_rewriter.RewriteRuleClassBase):
    """``Reshape(Transpose(x, perm), t)`` where ``t`` only splits one axis in two ->
    ``Transpose(Reshape(x, t'), perm')``: the split moves before the transpose.

    Attention's ``(seq, batch*heads, d) -> transpose -> (batch, heads, seq, d)`` then reads
    as a reshape and a 4-D transpose, which ONNX Runtime folds into its batched MatMul
    (it does so itself only when every shape is static). Exact: with every other
    dimension static, the element count fixes the split axis.
    """

    def pattern(self, op, x, shape):
        return op.Reshape(op.Transpose(x, _outputs=["y"]), shape)

    def check(self, context, x, shape, y) -> onnxscript_rewriter.MatchResult:
        result = onnxscript_rewriter.MatchResult()
        t = _int_array(shape)
        perm = y.producer().attributes.get_ints("perm", None)
        if t is None or perm is None or None in (x.shape, y.shape) or len(y.uses()) != 1:
            return result.fail("Target, perm or shape unknown, or the transpose is shared.")
        ys, t = list(y.shape), [int(d) for d in t]
        if len(t) != len(ys) + 1 or any(d == 0 or d < -1 for d in t):
            return result.fail("Not a split of one axis.")
        for a in range(len(ys)):
            rest_y, rest_t = ys[:a] + ys[a + 1:], t[:a] + t[a + 2:]
            if rest_y != rest_t or not all(isinstance(d, int) and d > 0 for d in rest_t):
                continue
            p, q = t[a], t[a + 1]
            if (isinstance(ys[a], int) and -1 not in (p, q) and p * q != ys[a]) or (
                    not isinstance(ys[a], int) and (p == -1) == (q == -1)):
                continue
            j = perm[a]
            xs = [d if isinstance(d, int) else -1 for d in x.shape]
            self._split = xs[:j] + [p, q] + xs[j + 1:]
            if self._split.count(-1) > 1:
                continue
            self._perm = []
            for i, src in enumerate(perm):
                self._perm += [j, j + 1] if i == a else [src + (src > j)]
            return result
        return result.fail("No single axis is split.")

    def rewrite(self, op, x, shape, y):
        split = op.Constant(value=ir.tensor(self._split, dtype=ir.DataType.INT64))
        return op.Transpose(op.Reshape(x, split), perm=self._perm)


class RsqrtAsDiv(onnxscript_rewriter.RewriteRuleClassBase):
    """``Mul(x, Reciprocal(Sqrt(v)))`` -> ``Div(x, Sqrt(v))``: ``x * rsqrt(v)`` as written
    by RMSNorm, in the form ONNX Runtime's ``SimplifiedLayerNormFusion`` recognizes.

    The exporter writes ``torch.rsqrt`` as Sqrt -> Reciprocal, and ONNX Runtime fuses
    Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul into one ``SimplifiedLayerNormalization``
    kernel only with the Div: written out, an RMSNorm runs 7 kernels instead of 1 (35 of
    the 92 kernels of the zoo's GQA model). ``x / s`` and ``x * (1 / s)`` differ by at
    most one rounding. Float types only; the Reciprocal must have no other reader.
    """

    def pattern(self, op, x, v):
        return op.Mul(x, op.Reciprocal(op.Sqrt(v)))

    def check(self, context, x, v) -> onnxscript_rewriter.MatchResult:
        result = onnxscript_rewriter.MatchResult()
        if x.dtype not in _FLOATS or v.dtype not in _FLOATS:
            return result.fail("Not a float Mul.")
        return result

    def rewrite(self, op, x, v):
        return op.Div(x, op.Sqrt(v))


_FLOATS = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE, ir.DataType.BFLOAT16)


# fxopt's own rules, applied after onnxscript's defaults
RULES = onnxscript_rewriter.RewriteRuleSet(
    [SliceOfShape.rule(), ReshapeToOwnShape.rule(), BatchedLinearToGemm.rule(),
     SplitAxisBeforeTranspose.rule(), *RsqrtAsDiv.rule().commute()])


def _keep_packed_weights(node: ir.Node) -> bool | None:
    """Never fold the dequantization of an int8/uint8 weight: folding would write it back
    to the file in float (or int4 unpacked), undoing weight-only compression."""
    for v in node.inputs:
        c = v.const_value if v is not None else None
        if c is not None and c.dtype in (ir.DataType.INT8, ir.DataType.UINT8) and len(c.shape) >= 2:
            return False
    return None


def _int_array(value: ir.Value | None) -> np.ndarray | None:
    tensor = ir.convenience.get_const_tensor(value) if value is not None else None
    return None if tensor is None else tensor.numpy()


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in model.graph.all_nodes())


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    # the exporters put a long guide after the cause; keep the cause
    for marker in ("## Exception summary", "Exception summary"):
        if marker in text:
            text = text.split(marker, 1)[1].strip()
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    summary = " ".join(lines[:3]) if lines else type(e).__name__
    return f"{type(e).__name__}: {summary[:600]}"
