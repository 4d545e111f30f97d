"""``slice_packed_projections``: read q / k / v straight out of a packed projection.

``nn.MultiheadAttention`` projects q, k and v with one ``in_proj`` matmul, then (as
``torch.export`` records it) splits the result with a layout dance::

    y = linear(x, in_proj_weight)                     # [..., 3E]
    p = y.unflatten(-1, [3, E]).unsqueeze(0).transpose(0, -2).squeeze(-2).contiguous()
    q, k, v = p.select(0, 0), p.select(0, 1), p.select(0, 2)

which ONNX Runtime runs as Reshape, Unsqueeze, Transpose (a copy), Squeeze, Split and three
more Squeezes per attention layer. ``p.select(0, i)`` is ``y[..., i*E:(i+1)*E]``, so the pass
writes each ``select`` as that slice (made contiguous, as the select was): three Slices.
Exact; where the chain differs in any dim it is left alone.

Example::

    fxopt.optimize(model, inputs, "default")   # runs it after ``simplify``
"""

from __future__ import annotations

import torch
import torch.fx as fx

from fxopt.ops import op_of
from fxopt.passes.base import PassContext, PassResult, Semantics, register_pass

_SELECT = torch.ops.aten.select.int


def _shape(node: object) -> tuple | None:
    s = node.meta.get("shape") if isinstance(node, fx.Node) else None
    return tuple(s) if isinstance(s, (tuple, list, torch.Size)) else None


def _dim(d: object, rank: int) -> int | None:
    return d % rank if isinstance(d, int) and rank > 0 else None


def _source(packed: fx.Node) -> tuple[fx.Node, int, int] | None:
    """``(y, n, E)`` when ``packed`` is ``y.unflatten(-1, [n, E]).unsqueeze(0)
    .transpose(0, -2).squeeze(-2)`` (optionally ``.contiguous()``), else None."""
    node = packed
    if op_of(node).kind == "contiguous":
        node = op_of(node).input
    chain = []
    for kind in ("squeeze", "transpose", "unsqueeze", "unflatten"):
        if not isinstance(node, fx.Node) or op_of(node).kind != kind or node.op == "call_module":
            return None
        chain.append(node)
        node = op_of(node).input
    squeeze, transpose, unsqueeze, unflatten = (op_of(n) for n in chain)
    y, y_shape = node, _shape(node)
    sizes = unflatten.arg("sizes")
    if y_shape is None or not isinstance(sizes, (list, tuple)) or len(sizes) != 2:
        return None
    rank = len(y_shape)  # y: [..., n*E]; after unflatten rank+1, after unsqueeze rank+2
    n, e = sizes
    if not (isinstance(n, int) and isinstance(e, int) and n * e == y_shape[-1]):
        return None
    dims_ok = (
        _dim(unflatten.arg("dim"), rank) == rank - 1
        and _dim(unsqueeze.arg("dim"), rank + 1) == 0
        and sorted(_dim(transpose.arg(a), rank + 2) for a in ("dim0", "dim1")) == [0, rank]
        and _dim(squeeze.arg("dim"), rank + 2) == rank
    )
    return (y, n, e) if dims_ok else None


def slice_packed(gm: fx.GraphModule) -> int:
    """Rewrite every ``select`` of a packed projection as a slice; returns how many."""
    done = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target is not _SELECT or not node.users:
            continue
        packed, dim, index = (list(node.args) + [None, None])[:3]
        if not isinstance(packed, fx.Node) or dim != 0 or not isinstance(index, int):
            continue
        found = _source(packed)
        if found is None:
            continue
        y, n, e = found
        if not -n <= index < n:
            continue
        start = (index % n) * e
        with gm.graph.inserting_before(node):
            part = gm.graph.call_function(torch.ops.aten.slice.Tensor,
                                          (y, -1, start, start + e))
            dense = gm.graph.call_function(torch.ops.aten.clone.default, (part,),
                                           {"memory_format": torch.contiguous_format})
        for new in (part, dense):
            new.meta["fxopt_module_path"] = node.meta.get("fxopt_module_path", "")
        dense.meta.update({k: v for k, v in node.meta.items() if k != "val"})
        node.replace_all_uses_with(dense)
        gm.graph.erase_node(node)
        done += 1
    if done:
        gm.graph.eliminate_dead_code()
        gm.graph.lint()
        gm.recompile()
    return done


@register_pass("slice_packed_projections", Semantics.EXACT)
def slice_packed_projections(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """See the module docstring. Stats: ``sliced`` (selects rewritten)."""
    done = slice_packed(gm)
    return PassResult(gm, modified=done > 0, stats={"sliced": done})
