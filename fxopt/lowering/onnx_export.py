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
import onnx
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
    the graph topologically, in place. Returns node counts before and after.

    >>> clean(model)  # doctest: +SKIP
    {'nodes_before': 255, 'nodes_after': 91}
    """
    before = _count_nodes(model)
    with quiet():
        onnxscript_optimizer.optimize_ir(model, should_fold=_keep_packed_weights)
        reshapes = constant_reshape_shapes(model)
        onnxscript_rewriter.rewrite(model)  # its default, exact rules (reshape/cast chains…)
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
            "constant_reshapes": reshapes}


def constant_reshape_shapes(model: ir.Model) -> int:
    """Give every Reshape whose output has exactly one dynamic dimension a constant shape,
    with -1 in that place; returns how many were changed.

    A dynamic batch otherwise makes the exporter compute each reshape's target at run time
    (Shape -> Gather/Slice -> Concat), which costs ONNX Runtime ~10-20% on a small
    transformer and hides the shape from TensorRT. The -1 is exact: the other dimensions
    are fixed, so the element count determines the dynamic one.

    >>> constant_reshape_shapes(model)  # doctest: +SKIP
    12
    """
    reshapes = [n for n in model.graph if n.op_type == "Reshape" and n.domain in ("", "ai.onnx")
                and n.inputs[1] is not None and n.inputs[1].const_value is None]
    if not reshapes:
        return 0
    inferred = _inferred_shapes(model)
    changed = 0
    for node in reshapes:
        out = node.outputs[0]
        dims = list(out.shape.dims) if out.shape is not None else []
        if not dims or any(isinstance(d, ir.SymbolicDim) and d.value is None for d in dims):
            dims = inferred.get(out.name, [])
        if not dims:
            continue
        fixed = [d for d in dims if isinstance(d, int)]
        if len(dims) - len(fixed) != 1 or 0 in fixed or any(d < 0 for d in fixed):
            continue
        shape = np.array([d if isinstance(d, int) else -1 for d in dims], dtype=np.int64)
        value = ir.Value(name=f"{node.name or out.name}_shape",
                         const_value=ir.tensor(shape), shape=ir.Shape([len(dims)]),
                         type=ir.TensorType(ir.DataType.INT64))
        model.graph.register_initializer(value)
        node.replace_input_with(1, value)
        changed += 1
    return changed


def _keep_packed_weights(node: ir.Node) -> bool | None:
    """Never fold the dequantization of an int8/uint8 weight: folding would write it back
    to the file in float (or int4 unpacked), undoing weight-only compression."""
    for v in node.inputs:
        c = v.const_value if v is not None else None
        if c is not None and c.dtype in (ir.DataType.INT8, ir.DataType.UINT8) and len(c.shape) >= 2:
            return False
    return None


def _inferred_shapes(model: ir.Model) -> dict[str, list]:
    """Output shapes from ONNX shape inference with data propagation, which follows the
    Shape -> Slice -> Concat arithmetic that builds a dynamic reshape target."""
    weights = sum(v.const_value.nbytes for v in model.graph.initializers.values()
                  if v.const_value is not None)
    if weights > 2**30:  # serializing a huge model just for shapes is not worth it
        return {}
    try:
        proto = onnx.shape_inference.infer_shapes(ir.to_proto(model), data_prop=True)
    except Exception:  # inference is a hint here; without it nothing changes
        return {}
    return {
        v.name: [d.dim_value if d.HasField("dim_value") else ir.SymbolicDim(d.dim_param or None)
                 for d in v.type.tensor_type.shape.dim]
        for v in proto.graph.value_info if v.type.tensor_type.HasField("shape")
    }


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
