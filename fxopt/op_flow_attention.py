"""Channel flow rules of the attention ops (``fxopt/op_flow.py`` holds the rest and the
``FLOW_RULES`` table): SDPA heads and masks, matmul, and ``nn.MultiheadAttention`` as one
module.

Example::

    flow = sdpa(op_of(sdpa_node))
    [(l.a[1], l.b[1]) for l in flow.links]   # the head axis (-3) of q, k, v and out, ...
"""

from __future__ import annotations

from fxopt.op_flow import Flow, _tensor_args, shape


def sdpa(view) -> Flow:
    """scaled_dot_product_attention: the head axis (-3) of q, k, v and the output is one
    index; the sequence axes pass q -> out and k <-> v; ``head_dim`` sets the scale and is
    blocked. An ``attn_mask`` broadcasts against (..., heads, L, S): its axes of full size
    carry those indices (a per-head bias, as Swin's relative position bias, loses the
    pruned heads with them)."""
    flow = Flow()
    q, k, v = view.arg("query"), view.arg("key"), view.arg("value")
    out = view.node
    sq, sk, sv, so = shape(q), shape(k), shape(v), shape(out)
    if None in (sq, sk, sv, so) or len(sq) < 3:
        return flow
    n = len(sq)
    for t in (k, v, out):
        flow.link((q, n - 3), (t, n - 3))
        for b in range(n - 3):
            flow.link((q, b), (t, b))
    flow.link((q, n - 2), (out, n - 2))
    flow.link((k, n - 2), (v, n - 2))
    mask = view.arg("attn_mask")
    sm = shape(mask)
    if sm is not None and len(sm) <= n:  # broadcast against (..., heads, L, S)
        ref = [*((q, b) for b in range(n - 2)), (q, n - 2), (k, n - 2)]
        full = [*sq[:n - 2], sq[n - 2], sk[n - 2]]
        for j in range(1, len(sm) + 1):
            if sm[-j] == full[-j]:
                flow.link((mask, len(sm) - j), ref[-j])
            elif sm[-j] == 1:
                flow.handled.add((mask, len(sm) - j))
    why = f"{view.node.name}: head_dim sets the attention scale"
    flow.block((q, n - 1), why)
    flow.block((k, n - 1), why)
    flow.link((v, n - 1), (out, n - 1))
    return flow


def matmul(view) -> Flow:
    """matmul: batch axes keep their index; the contracted axis of both operands is one
    index (pruned on both sides together); rows pass to rows and columns to columns."""
    flow = Flow()
    a, b = view.node.args[0], view.node.args[1]
    sa, sb, so = shape(a), shape(b), shape(view.node)
    if None in (sa, sb, so) or len(sa) < 2 or len(sb) < 2:
        return flow
    flow.link((a, len(sa) - 1), (b, len(sb) - 2))
    flow.link((a, len(sa) - 2), (view.node, len(so) - 2))
    flow.link((b, len(sb) - 1), (view.node, len(so) - 1))
    for t, st in ((a, sa), (b, sb)):
        for kk in range(1, len(st) - 1):
            if kk + 2 <= len(so) and st[-kk - 2] == so[-kk - 2]:
                flow.link((t, len(st) - kk - 2), (view.node, len(so) - kk - 2))
    return flow


def mha_module(view) -> Flow:
    """``nn.MultiheadAttention`` called as one module: its heads are not declared here,
    because the module cannot hold fewer heads than ``embed_dim // head_dim``; the prune
    pass first replaces it by its functional form (``fxopt.passes.prune.attention``),
    whose ops carry the heads. Every axis blocks, saying which of the two applies."""
    from fxopt.passes.prune.attention import why_not

    flow = Flow()
    why = why_not(view.node)
    reason = (f"nn.MultiheadAttention {view.node.name}: "
              + (f"kept whole: {why}" if why else "prune() replaces it by linear + sdpa + "
                 "linear to prune its heads (fxopt.passes.prune.attention)"))
    for t in _tensor_args(view):
        for k in range(len(shape(t))):
            flow.block((t, k), reason)
    return flow
