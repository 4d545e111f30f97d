"""The ``quantize`` pass: one entry point for every quantization scheme.

``scheme``: ``int8`` (static Q/DQ with calibration), ``dynamic_int8`` (int8 weights,
activation scales at run time), ``int8_weight`` / ``int4_weight`` (packed weights,
dequantized in forward). ``target`` (``ort`` | ``tensorrt``) decides Q/DQ placement for
``int8``. Run after ``fold_bn`` so batch norms are folded before weights are quantized.

Example::

    fxopt.optimize(model, inputs, "default,quantize(scheme=int8,target=ort)",
                   calibration=batches)
"""

from __future__ import annotations

import copy
import itertools
from typing import Any

import torch.fx as fx

from fxopt.errors import QuantizationError
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass
from fxopt.verify import QUANTIZED

SCHEMES = ("int8", "dynamic_int8", "int8_weight", "int4_weight")


@register_pass("quantize", Semantics.APPROXIMATE, tolerance=QUANTIZED)
def quantize(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    scheme: str = "int8",
    target: str = "ort",
    observer: str = "minmax",
    weight_observer: str = "minmax",
    per_channel: bool = True,
    skip: Any = (),
    group_size: int = 128,
    max_batches: int | None = None,
    tolerance: float | None = None,
    metric: Any = None,
    probe_batches: int = 8,
) -> PassResult:
    """Quantize with ``scheme`` for ``target`` (calibration data from fxopt.optimize).

    With ``tolerance`` (int8), the layers the sensitivity analysis ranks worst go back to
    float until ``metric`` (output cosine vs float, or ``metric(reference, outputs)``)
    reaches it on the example inputs and up to ``probe_batches`` calibration batches."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    check_not_quantized(gm)
    if scheme == "int8":
        from fxopt.quant import static

        data = ctx.calibration
        if data is not None and iter(data) is data:  # a one-shot iterator: keep the batches
            data = list(data)
        reference_gm = copy.deepcopy(gm) if tolerance is not None else None
        stats = static.prepare(gm, target, observer=observer, weight_observer=weight_observer,
                               per_channel=per_channel, skip=skip)
        stats["calibration_batches"] = static.calibrate(
            gm, data, max_batches=max_batches, progress=ctx.options.get("progress") or False)
        static.freeze(gm)
        if target == "ort":
            stats["int32_biases"] = static.quantize_biases(gm)
            stats["shared_pool_qparams"] = static.share_pooling_qparams(gm)
        if reference_gm is not None:
            stats.update(_fall_back(gm, reference_gm, ctx, data, tolerance, metric,
                                    probe_batches))
    elif scheme == "dynamic_int8":
        from fxopt.quant.dynamic import apply_dynamic_int8

        stats = apply_dynamic_int8(gm, skip=skip, per_channel=per_channel)
    else:
        from fxopt.quant.weight_only import apply_weight_only

        bits = 8 if scheme == "int8_weight" else 4
        stats = apply_weight_only(gm, bits=bits, group_size=group_size if bits == 4 else None,
                                  skip=skip)
    gm.meta.setdefault("fxopt", {})["quantized"] = {"scheme": scheme, "target": target}
    stats = {"scheme": scheme, "target": target, **stats}
    return PassResult(gm, modified=True, stats=stats)


def _fall_back(gm, reference_gm, ctx, data, tolerance, metric, probe_batches) -> dict:
    from fxopt.quant import sensitivity as sens

    n_inputs = len(ctx.example_inputs)
    batches = [tuple(ctx.example_inputs)]
    for batch in itertools.islice(data, probe_batches):
        batch = batch if isinstance(batch, (tuple, list)) else (batch,)
        batches.append(tuple(batch)[:n_inputs])
    reference = sens.run_batches(reference_gm, batches)
    result = sens.fallback(gm, batches, reference, tolerance=float(tolerance),
                           metric=metric or sens.output_cosine)
    return {"kept_float": result["kept_float"],
            "metric_before": result["metric_before"], "metric_after": result["metric_after"],
            "sensitivity": [(name, float(f"{err:.3g}")) for name, err in result["ranking"][:10]]}


def check_not_quantized(gm: fx.GraphModule) -> None:
    """Raise QuantizationError if ``gm`` already holds fake-quant, dynamic-int8 or packed
    weight-only nodes: quantizing twice compounds the error and cannot be undone."""
    from fxopt.quant.fake_quant import FakeQuantize

    found = [p for p, m in gm.named_modules()
             if isinstance(m, FakeQuantize) or type(m).__name__.startswith("WeightOnly")]
    found += [n.name for n in gm.graph.nodes if n.op == "call_function" and (
        str(n.target).startswith(("fxopt.", "aten.fake_quantize_per_"))
        or getattr(n.target, "__name__", "").startswith("fake_quantize_per_"))]
    if found:
        raise QuantizationError(
            f"the graph is already quantized ({', '.join(found[:3])}"
            f"{', …' if len(found) > 3 else ''}); quantize the float model instead, or run "
            "one quantize pass per pipeline")
