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
from typing import TYPE_CHECKING, Any

import torch.fx as fx

from fxopt.errors import QuantizationError
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass
from fxopt.verify import QUANTIZED

if TYPE_CHECKING:
    from fxopt.quant.sensitivity import Budget

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
    budget: Budget | None = None,
    metric: Any = None,
    probe_batches: int = 8,
    smooth: float | str | None = None,
    fuse: bool | None = None,
    keep_head: bool | str = "auto",
) -> PassResult:
    """Quantize with ``scheme`` for ``target`` (calibration data from fxopt.optimize).

    ``budget`` is the accuracy to keep (``int8`` and ``dynamic_int8``): a float floor for
    ``metric`` (output cosine vs float by default, or ``metric(reference, outputs)``), or a
    callable ``budget(reference, outputs) -> bool``, on the example inputs and up to
    ``probe_batches`` calibration batches; the layers that hurt most (int8: by sensitivity;
    dynamic_int8: by damage per MAC) stay float until it holds, listed in the stats as
    ``kept_float``. Verification uses ``tolerance=`` like every other pass.

    ``smooth`` (``dynamic_int8`` only): SmoothQuant-style migration of activation range into
    the weights, folded exactly into the norm (or constant multiply) that feeds the linears
    (``fxopt.quant.smooth``): an alpha in [0, 1], or ``"auto"`` to measure per group on the
    example inputs and calibration batches (up to ``max_batches``, default 16) and keep only
    what lowers the error there; stats ``smoothed`` / ``smooth_refused``. ``fuse``
    (``dynamic_int8``): join layers that read one input into one int8 matmul (see
    ``fxopt.quant.dynamic.apply_dynamic_int8``; None: where the layers are small).

    ``keep_head`` (``int8`` and ``dynamic_int8``): the output head (a classifier's ``fc``,
    an ``lm_head``: the layer whose result is the model's output) stays float; ``"auto"``
    when it holds at most 5% of the quantized layers' multiply-accumulates, ``True``
    always, ``False`` never (``fxopt.quant.head``); stats ``kept_head``. With a
    ``budget``, ``"auto"`` leaves the head to the fallback, which measures every layer."""
    if scheme not in SCHEMES:
        raise QuantizationError(f"unknown scheme {scheme!r}; use one of {', '.join(SCHEMES)}")
    if smooth is not None and scheme != "dynamic_int8":
        raise QuantizationError(
            f"smooth= works with scheme=dynamic_int8, not {scheme}; drop smooth= or use "
            "scheme=dynamic_int8")
    if smooth is not None:
        from fxopt.quant.smooth import check_alpha

        check_alpha(smooth)
    if budget is not None and scheme not in ("int8", "dynamic_int8"):
        raise QuantizationError(
            f"budget= works with scheme=int8 and scheme=dynamic_int8, not {scheme}; choose "
            "the layers to leave in float with skip=[...]")
    skip = [skip] if isinstance(skip, str) else list(skip or ())
    check_not_quantized(gm)
    from fxopt.quant.head import check_keep_head

    check_keep_head(keep_head)
    kept_head: list[str] = []
    if scheme in ("int8", "dynamic_int8"):
        # with a budget, "auto" leaves the choice to the fallback: it measures every layer
        wanted = False if budget is not None and keep_head == "auto" else keep_head
        kept_head = _heads_kept(gm, scheme, target, skip, per_channel, wanted)
        skip += kept_head
    shown = ctx.options.get("progress")
    data = ctx.calibration
    if data is not None and iter(data) is data:  # a one-shot iterator: keep the batches
        data = list(data)
    if scheme == "int8":
        from fxopt.quant import static

        reference_gm = copy.deepcopy(gm) if budget is not None else None
        stats = static.prepare(gm, target, observer=observer, weight_observer=weight_observer,
                               per_channel=per_channel, skip=skip)
        stats["calibration_batches"] = static.calibrate(
            gm, data, max_batches=max_batches, progress=shown)
        static.freeze(gm)
        if target == "ort":
            stats["int32_biases"] = static.quantize_biases(gm)
            stats["shared_pool_qparams"] = static.share_pooling_qparams(gm)
        if reference_gm is not None:
            stats.update(_fall_back(gm, reference_gm, ctx, data, budget, metric,
                                    probe_batches))
    elif scheme == "dynamic_int8":
        from fxopt.quant.dynamic import apply_dynamic_int8

        kept: dict = {}
        if smooth is not None:
            from fxopt.quant.smooth import smooth_for_dynamic_int8

            done = smooth_for_dynamic_int8(
                gm, _probe_batches(ctx, data, 16 if max_batches is None else max_batches),
                alpha=smooth, skip=skip, per_channel=per_channel)
            kept.update(smoothed=done["smoothed"], smooth_refused=done["refused"])
        if budget is not None:
            kept.update(_dynamic_fall_back(gm, ctx, data, budget, metric, probe_batches,
                                           skip, per_channel))
        stats = apply_dynamic_int8(gm, skip=skip + kept.get("kept_float", []),
                                   per_channel=per_channel, fuse=fuse)
        stats.update(kept)
    else:
        from fxopt.quant.weight_only import apply_weight_only

        bits = 8 if scheme == "int8_weight" else 4
        stats = apply_weight_only(gm, bits=bits, group_size=group_size if bits == 4 else None,
                                  skip=skip)
    gm.meta.setdefault("fxopt", {})["quantized"] = {"scheme": scheme, "target": target}
    stats = {"scheme": scheme, "target": target, **stats}
    if scheme in ("int8", "dynamic_int8"):
        stats["kept_head"] = kept_head
    return PassResult(gm, modified=True, stats=stats)


def _heads_kept(gm, scheme, target, skip, per_channel, keep_head) -> list[str]:
    """Node names of the output heads ``keep_head`` leaves float (``fxopt.quant.head``)."""
    from fxopt.quant.head import heads_to_keep

    if keep_head is False:
        return []
    if scheme == "dynamic_int8":
        from fxopt.quant.dynamic import candidate_layers

        layers = list(candidate_layers(gm, skip=skip, per_channel=per_channel))
    else:
        from fxopt.quant.static import compute_layers

        layers = compute_layers(gm, target, skip)
    return heads_to_keep(gm, layers, keep_head)


def _probe_batches(ctx: PassContext, data, probe_batches: int) -> list[tuple]:
    """The example inputs and up to ``probe_batches`` calibration batches (inputs only)."""
    n_inputs = len(ctx.example_inputs)
    batches = [tuple(ctx.example_inputs)]
    for batch in itertools.islice(data or (), probe_batches):
        batch = batch if isinstance(batch, (tuple, list)) else (batch,)
        batches.append(tuple(batch)[:n_inputs])
    return batches


def _fall_back(gm, reference_gm, ctx, data, budget, metric, probe_batches) -> dict:
    from fxopt.quant import sensitivity as sens

    batches = _probe_batches(ctx, data, probe_batches)
    reference = sens.run_batches(reference_gm, batches)
    result = sens.fallback(gm, batches, reference, budget=budget,
                           metric=metric or sens.output_cosine,
                           progress=ctx.options.get("progress"))
    return {"kept_float": result["kept_float"],
            "metric_before": result["metric_before"], "metric_after": result["metric_after"],
            "sensitivity": [(name, float(f"{err:.3g}")) for name, err in result["ranking"][:10]]}


def _dynamic_fall_back(gm, ctx, data, budget, metric, probe_batches, skip,
                       per_channel) -> dict:
    from fxopt.quant import sensitivity as sens

    result = sens.dynamic_fallback(gm, _probe_batches(ctx, data, probe_batches),
                                   budget=budget, metric=metric or sens.output_cosine,
                                   skip=skip, per_channel=per_channel,
                                   progress=ctx.options.get("progress"))
    return {"kept_float": result["kept_float"],
            "metric_before": result["metric_before"], "metric_after": result["metric_after"],
            "requantized": result.get("requantized", []),
            "float_mac_share": float(f"{result['float_mac_share']:.4g}"),
            "sensitivity": [(name, float(f"{damage:.3g}"), macs)
                            for name, damage, macs in result["ranking"][:10]]}


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
