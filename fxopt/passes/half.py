"""The ``half`` pass: an explicitly typed fp16 / bf16 graph with fp32 islands.

Every float op is assigned a precision:

* **half** — ops the table marks ``Prop.HALF_COMPUTE`` (conv, conv_transpose, linear,
  matmul, attention, scaled_dot_product, embedding) always run in the target dtype; their
  float weights are converted in place.
* **fp32 islands** (``policy="default"``) — ops the table marks ``Prop.FP32_SENSITIVE``
  (softmax, log_softmax, every norm, the sum/mean/std/var/prod/cumsum reductions, exp, log
  and pow), anything named in ``keep_fp32`` and, with calibration data, any op whose values
  exceed ``65504 / 4`` (fp16 only). ``Prop.FP32_ONLY`` ops stay fp32 under any policy.
* **follow** — every other op (activations, add, shape plumbing, ...) runs in fp32 when
  one of its inputs comes from an fp32 op (so adjacent fp32 ops form one island with no
  casts between them), else in half.

``x.to(dtype)`` casts are inserted only where a producer's dtype differs from what its
consumer needs; one cast per (value, dtype) is shared by all consumers. With
``keep_io_types`` float inputs stay float32 (cast at entry) and outputs are cast back to
float32; without it the graph takes and returns the target dtype. Integer and bool values
are never cast. Opaque modules with float weights stay fp32 (fxopt does not guess what
their forward does with a dtype).

The pass is verified with the tolerance of its dtype, the same one ``lower(..., "onnx")``
derives from a half graph (``fxopt.verify.graph_tolerance``): fp16 ``HALF_TOLERANCE``
(``rtol=3e-2, atol=1e-3, min_cosine=0.999``; the zoo measures within rtol 1e-2), bf16
``BF16_TOLERANCE`` (``rtol=1e-1, atol=1e-2, min_cosine=0.995``: three fewer mantissa bits).
The export's ``aten._assert_tensor_metadata`` checks are retyped to the dtypes the pass
chose (``fxopt.graph_utils.retype_metadata_asserts``).

Example::

    res = fxopt.optimize(model, (x,), "default,half(dtype=fp16)")
    res.module(x)                        # float32 in, float32 out, fp16 inside
    fxopt.optimize(model, (x,), "half(dtype=bf16,keep_fp32=[gelu,'head.*'])")
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxopt.errors import SpecError
from fxopt.graph_utils import retype_metadata_asserts
from fxopt.op_props import Prop
from fxopt.ops import fetch_attr, has_prop, lookup, model_bytes, op_of
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass
from fxopt.quant.select import matches
from fxopt.verify import HALF, Tolerance

HALF_TOLERANCE = HALF[torch.float16]
BF16_TOLERANCE = HALF[torch.bfloat16]
DTYPES = {
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
POLICIES = ("default", "none")
FP16_MAX = 65504.0
OVERFLOW_MARGIN = 4.0
_HALF, _FP32 = "half", "fp32"


def _tolerance(params: dict) -> Tolerance:
    """The verification tolerance of ``half(dtype=...)``: its dtype's."""
    return HALF.get(DTYPES.get(params.get("dtype", "fp16")), HALF_TOLERANCE)


@register_pass("half", Semantics.APPROXIMATE, tolerance=_tolerance)
def half(
    gm: fx.GraphModule,
    ctx: PassContext,
    *,
    dtype: str = "fp16",
    keep_io_types: bool = True,
    keep_fp32: Any = (),
    policy: str | None = "default",
) -> PassResult:
    """Run the graph in fp16 or bf16 with fp32 islands and explicit ``.to`` casts.

    ``keep_fp32`` names op kinds, node names or module paths (globs allowed) to keep in
    fp32; ``policy="none"`` drops the built-in fp32 islands. With calibration data, ops
    whose values would overflow fp16 stay fp32 (``stats["overflow_fp32"]``).

    Example::

        fxopt.optimize(model, (x,), "half(dtype=fp16,keep_fp32=[gelu])", calibration=data)
    """
    if dtype not in DTYPES:
        raise SpecError(f"half: unknown dtype {dtype!r}; use fp16 or bf16")
    policy = "none" if policy is None else policy  # the spec parser reads `none` as None
    if policy not in POLICIES:
        raise SpecError(f"half: unknown policy {policy!r}; use one of {', '.join(POLICIES)}")
    target = DTYPES[dtype]
    done = gm.meta.get("fxopt", {}).get("half")
    if done:  # a second run would find nothing new in fp32 but the islands it chose
        if done["dtype"] != dtype:
            raise SpecError(
                f"half: the graph already runs in {done['dtype']}; apply "
                f"half(dtype={dtype}) to the float graph instead"
            )
        return PassResult(gm, modified=False, stats={"dtype": dtype, "already": True})
    keep = [keep_fp32] if isinstance(keep_fp32, str) else [str(k) for k in keep_fp32 or ()]
    bytes_before = model_bytes(gm)
    if any("dtype" not in n.meta for n in gm.graph.nodes if n.op != "output"):
        from fxopt.capture import annotate

        annotate(gm, tuple(ctx.example_inputs))  # decisions read meta["dtype"]

    maxima = _calibrate(gm, ctx) if ctx.calibration is not None else {}
    limit = FP16_MAX / OVERFLOW_MARGIN if target == torch.float16 else float("inf")
    overflow = _overflowing(gm, maxima, limit)

    precision = _assign(gm, keep, policy, set(overflow))
    _convert_modules(gm, precision, target)
    out_dtype = _producer_dtypes(gm, precision, target, keep_io_types)
    _convert_attrs(gm, precision, out_dtype, target)
    casts = _insert_casts(gm, precision, out_dtype, target, keep_io_types)
    removed = _remove_redundant_casts(gm, out_dtype)
    retype_metadata_asserts(gm, out_dtype)

    gm.graph.lint()
    gm.recompile()
    _refresh_meta(gm, ctx, target, keep_io_types)

    compute = [n for n in gm.graph.nodes if n in precision and _is_compute(n)]
    stats = {
        "dtype": dtype,
        "half_nodes": sum(precision[n] == _HALF for n in compute),
        "fp32_nodes": [n.name for n in compute if precision[n] == _FP32],
        "casts": casts,
        "removed_casts": removed,
        "bytes_before": bytes_before,
        "bytes_after": model_bytes(gm),
    }
    if ctx.calibration is not None:
        stats["overflow_fp32"] = [(name, float(f"{m:.4g}")) for name, m in overflow.items()]
    modified = bool(casts or removed or stats["half_nodes"] or bytes_before != stats["bytes_after"])
    if modified:
        gm.meta.setdefault("fxopt", {})["half"] = {"dtype": dtype, "keep_io_types": keep_io_types}
    return PassResult(gm, modified=modified, stats=stats)


# --------------------------------------------------------------------------- decisions
def _is_float(node: Any) -> bool:
    dt = node.meta.get("dtype") if isinstance(node, fx.Node) else None
    if isinstance(dt, (list, tuple)):
        return any(isinstance(d, torch.dtype) and d.is_floating_point for d in dt)
    return isinstance(dt, torch.dtype) and dt.is_floating_point


def _single(node: fx.Node) -> bool:
    """Whether ``node`` is one tensor (a cast applies), not a tuple of them."""
    return isinstance(node.meta.get("dtype"), torch.dtype)


def _float_inputs(node: fx.Node) -> list[fx.Node]:
    return [a for a in node.all_input_nodes if _is_float(a)]


def _is_cast(node: fx.Node) -> bool:
    return (
        node.op in ("call_method", "call_function")
        and lookup(node)[0] is not None
        and lookup(node)[0].kind == "to"
    )


def _is_compute(node: fx.Node) -> bool:
    return not has_prop(node, Prop.PLUMBING)


def _has_float_state(mod: nn.Module) -> bool:
    return any(t.is_floating_point() for t in [*mod.parameters(), *mod.buffers()])


def _assign(gm: fx.GraphModule, keep: list[str], policy: str, forced: set[str]) -> dict:
    """Precision ("half" / "fp32") of every float-producing call node, cast ops excluded.

    A module called by nodes of both precisions (or nested in one that is) cannot hold
    both weight dtypes: its half callers are moved to fp32 and the assignment repeats."""
    pinned: set[fx.Node] = set()
    while True:
        precision = _assign_once(gm, keep, policy, forced, pinned)
        conflicts = _module_conflicts(gm, precision)
        if not conflicts - pinned:
            return precision
        pinned |= conflicts


def _assign_once(gm, keep, policy, forced, pinned) -> dict:
    precision: dict[fx.Node, str] = {}
    anchored: set[fx.Node] = set()  # decided by an op, not by a constant or an input
    for node in gm.graph.nodes:
        if not node.op.startswith("call") or not _is_float(node) or _is_cast(node):
            continue
        view = op_of(node)
        inputs = [a for a in _float_inputs(node) if a in anchored]
        tuples = [a for a in _float_inputs(node) if not _single(a)]
        if tuples:  # getitem of a multi-output op: whatever that op produced
            if tuples[0] in precision:
                precision[node] = precision[tuples[0]]
                anchored.add(node)
            continue
        if (
            node in pinned
            or node.name in forced
            or has_prop(view, Prop.FP32_ONLY)
            or _kept(node, view.kind, keep)
            or (policy == "default" and has_prop(view, Prop.FP32_SENSITIVE))
        ):
            precision[node] = _FP32
        elif has_prop(view, Prop.HALF_COMPUTE):
            precision[node] = _HALF
        elif node.op == "call_module" and not view.known and _has_float_state(view.module):
            precision[node] = _FP32
        elif not _float_inputs(node):  # creates a float tensor: keeps its dtype
            continue
        else:
            fp32_in = any(precision.get(a) == _FP32 for a in inputs)
            precision[node] = _FP32 if fp32_in else _HALF
        anchored.add(node)
    return precision


def _kept(node: fx.Node, kind: str, keep: list[str]) -> bool:
    return bool(keep) and (kind in keep or matches(node, keep))


def _module_conflicts(gm: fx.GraphModule, precision: dict) -> set[fx.Node]:
    calls = [
        (n, str(n.target))
        for n in precision
        if n.op == "call_module" and _has_float_state(gm.get_submodule(n.target))
    ]
    fp32 = [p for n, p in calls if precision[n] == _FP32]

    def related(a: str, b: str) -> bool:
        return a == b or a.startswith(b + ".") or b.startswith(a + ".")

    return {n for n, p in calls if precision[n] == _HALF and any(related(p, q) for q in fp32)}


# --------------------------------------------------------------------------- calibration
def _calibrate(gm: fx.GraphModule, ctx: PassContext) -> dict[str, float]:
    """Max |value| of every float node (inputs included) over the calibration batches."""
    maxima: dict[str, float] = {}

    class _Recorder(fx.Interpreter):
        def run_node(self, n):
            result = super().run_node(n)
            if isinstance(result, torch.Tensor) and result.is_floating_point() and result.numel():
                m = float(result.detach().abs().max())
                maxima[n.name] = max(maxima.get(n.name, 0.0), m)
            return result

    n_inputs = len(ctx.example_inputs)
    with torch.no_grad():
        for batch in ctx.calibration:
            batch = batch if isinstance(batch, (tuple, list)) else (batch,)
            _Recorder(gm).run(*tuple(batch)[:n_inputs])
    return maxima


def _overflowing(gm: fx.GraphModule, maxima: dict[str, float], limit: float) -> dict:
    """Nodes that must stay fp32: their output, or a float input, exceeds ``limit``."""
    out: dict[str, float] = {}
    for node in gm.graph.nodes:
        if not node.op.startswith("call") or _is_cast(node):
            continue
        seen = [maxima.get(node.name, 0.0)] + [
            maxima.get(a.name, 0.0) for a in node.all_input_nodes
        ]
        if max(seen) > limit:
            out[node.name] = max(seen)
    return out


# --------------------------------------------------------------------------- rewriting
def _convert_modules(gm: fx.GraphModule, precision: dict, target: torch.dtype) -> None:
    for node, p in precision.items():
        if p == _HALF and node.op == "call_module":
            gm.get_submodule(node.target).to(target)  # floats only; int buffers stay


def _producer_dtypes(gm, precision, target, keep_io_types) -> dict[fx.Node, torch.dtype]:
    """The float dtype each node will produce (non-float nodes are absent)."""
    out: dict[fx.Node, torch.dtype] = {}
    for node in gm.graph.nodes:
        if not _is_float(node):
            continue
        if node.op == "placeholder":
            out[node] = torch.float32 if keep_io_types else target
        elif node.op == "get_attr":
            value = fetch_attr(gm, node.target)
            if isinstance(value, torch.Tensor):
                out[node] = value.dtype
        elif node in precision:
            out[node] = target if precision[node] == _HALF else torch.float32
        elif _is_cast(node):
            dt = _cast_dtype(node)
            src = node.args[0] if node.args else None
            out[node] = dt if dt is not None else out.get(src, torch.float32)
        else:
            out[node] = (
                node.meta["dtype"] if isinstance(node.meta["dtype"], torch.dtype) else torch.float32
            )
    return out


def _cast_dtype(node: fx.Node) -> torch.dtype | None:
    for a in [*node.args[1:], *node.kwargs.values()]:
        if isinstance(a, torch.dtype):
            return a
    return (
        {
            "float": torch.float32,
            "half": torch.float16,
            "bfloat16": torch.bfloat16,
            "double": torch.float64,
        }.get(str(node.target))
        if node.op == "call_method"
        else None
    )


def _convert_attrs(gm, precision, out_dtype, target) -> None:
    """Convert get_attr tensors read only by half ops (and not owned by a called module)."""
    modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    by_target: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node in out_dtype and out_dtype[node] == torch.float32:
            by_target.setdefault(str(node.target), []).append(node)
    for path, nodes in by_target.items():
        if any(path.startswith(m + ".") for m in modules):
            continue
        needs = {precision.get(u) for n in nodes for u in n.users if _is_float(u)}
        if needs != {_HALF}:
            continue
        value = fetch_attr(gm, path)
        *parents, leaf = path.split(".")
        owner = fetch_attr(gm, ".".join(parents)) if parents else gm
        new = value.detach().to(target)
        if isinstance(value, nn.Parameter):
            new = nn.Parameter(new, requires_grad=False)
        setattr(owner, leaf, new)
        for n in nodes:
            out_dtype[n] = target


def _insert_casts(gm, precision, out_dtype, target, keep_io_types) -> int:
    graph = gm.graph
    made: dict[tuple[fx.Node, torch.dtype], fx.Node] = {}
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]

    def cast(value: fx.Node, dt: torch.dtype) -> fx.Node:
        if (value, dt) not in made:
            anchor = placeholders[-1] if value.op == "placeholder" else value
            with graph.inserting_after(anchor):
                c = graph.call_method("to", (value, dt))
            c.meta.update(value.meta)
            c.meta["dtype"] = dt
            made[(value, dt)] = c
            out_dtype[c] = dt
        return made[(value, dt)]

    for node in list(graph.nodes):
        if node.op == "output":
            if keep_io_types:
                node.args = fx.node.map_arg(
                    node.args,
                    lambda a: (
                        cast(a, torch.float32)
                        if _single(a) and out_dtype.get(a, torch.float32) != torch.float32
                        else a
                    ),
                )
            continue
        if node not in precision:
            continue
        need = target if precision[node] == _HALF else torch.float32

        def retype(a: fx.Node, need=need) -> fx.Node:
            have = out_dtype.get(a)
            return cast(a, need) if have is not None and have != need and _single(a) else a

        node.args = fx.node.map_arg(node.args, retype)
        node.kwargs = fx.node.map_arg(node.kwargs, retype)
    return len(made)


def _remove_redundant_casts(gm: fx.GraphModule, out_dtype: dict) -> int:
    """Drop casts to the dtype a value already has, and a->b->a round trips."""
    removed = 0
    for node in list(gm.graph.nodes):
        if (
            node.op != "call_method"
            or node.target != "to"
            or len(node.args) != 2
            or node.kwargs
            or not isinstance(node.args[1], torch.dtype)
        ):
            continue
        src, dt = node.args
        if not isinstance(src, fx.Node):
            continue
        if out_dtype.get(src) == dt:
            replacement = src
        elif (
            _is_cast(src)
            and src.op == "call_method"
            and isinstance(src.args[0], fx.Node)
            and out_dtype.get(src.args[0]) == dt
        ):
            replacement = src.args[0]
        else:
            continue
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
        removed += 1
        if _is_cast(src) and not src.users:
            gm.graph.erase_node(src)
            removed += 1
    return removed


def _refresh_meta(gm: fx.GraphModule, ctx: PassContext, target, keep_io_types) -> None:
    from fxopt.capture import annotate

    inputs = tuple(ctx.example_inputs)
    if not keep_io_types:
        inputs = tuple(
            x.to(target) if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs
        )
    try:
        annotate(gm, inputs)
    except Exception as e:  # noqa: BLE001 - metadata is a convenience, say why it is stale
        gm.meta.setdefault("fxopt", {}).setdefault("notes", []).append(
            f"half: could not refresh shape/dtype metadata ({type(e).__name__}: {e})"
        )
