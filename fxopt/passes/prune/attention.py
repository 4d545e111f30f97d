"""``nn.MultiheadAttention`` as its functional form, so that its heads can be pruned.

A symbolic capture calls ``nn.MultiheadAttention`` as one module, and the module cannot
hold fewer heads than ``embed_dim // head_dim``: its q/k/v width must equal the residual
width ``embed_dim``. The prune pass therefore replaces each such call (when the module's
configuration allows) by what the module computes, in ops the op table knows::

    qkv = F.linear(x, attn.in_proj_weight, attn.in_proj_bias)   # (b, s, 3 * embed_dim)
    q, k, v = qkv.chunk(3, -1)                                  # split by sizes once pruned
    q = q.view(b, s, -1, head_dim).transpose(1, 2)              # heads: blocks of head_dim
    o = F.scaled_dot_product_attention(q, k, v)
    out = attn.out_proj(o.transpose(1, 2).flatten(2))          # back to embed_dim

The weights stay where the user's model has them (``attn.in_proj_weight``, ``attn.out_proj``),
so plan keys are the user's state_dict keys; the module itself becomes a plain container.
The rewrite is checked to compute what the module computed on the example inputs.

Example::

    gm, done, kept = decompose_attention(gm, (x,))
    done   # [{"module": "blocks.0.attn", "heads": 4, "head_dim": 16}]
"""

from __future__ import annotations

import inspect
import operator

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxopt.graph_utils import annotate_run, copy_graph_module
from fxopt.verify import EXACT, compare_outputs


def _bound(node: fx.Node, mod: nn.MultiheadAttention) -> dict:
    sig = inspect.signature(mod.forward)
    try:
        b = sig.bind(*node.args, **node.kwargs)
    except TypeError:
        return {}
    b.apply_defaults()
    return dict(b.arguments)


def why_not(node: fx.Node) -> str | None:
    """Why the ``nn.MultiheadAttention`` call ``node`` cannot be replaced by its functional
    form (None when it can)."""
    mod = node.graph.owning_module.get_submodule(node.target)
    args = _bound(node, mod)
    if not args:
        return "its call does not bind to MultiheadAttention.forward"
    if sum(n.op == "call_module" and n.target == node.target for n in node.graph.nodes) > 1:
        return "the module is called more than once"
    if not mod._qkv_same_embed_dim:
        return "separate q/k/v projections (kdim/vdim) are not decomposed"
    if mod.bias_k is not None or mod.add_zero_attn:
        return "add_bias_kv / add_zero_attn are not decomposed"
    if not (args["query"] is args["key"] is args["value"]):
        return "cross-attention with one packed in_proj_weight is not decomposed"
    for name in ("key_padding_mask", "attn_mask"):
        if args.get(name) is not None:
            return f"a {name} is not decomposed"
    if args.get("is_causal"):
        return "is_causal is not decomposed"
    shape = args["query"].meta.get("shape") if isinstance(args["query"], fx.Node) else None
    if not isinstance(shape, tuple) or len(shape) != 3:
        return "only batched (3-d) inputs are decomposed"
    users = list(node.users)
    if not all(u.op == "call_function" and u.target is operator.getitem for u in users):
        return "its output tuple is used other than by index"
    if any(u.args[1] != 0 and u.users for u in users):
        return "its attention weights are used"
    return None


def _replace_one(gm: fx.GraphModule, node: fx.Node) -> dict:
    mod: nn.MultiheadAttention = gm.get_submodule(node.target)
    x = _bound(node, mod)["query"]
    target, path = str(node.target), node.meta.get("fxopt_module_path") or str(node.target)
    heads, head_dim = mod.num_heads, mod.head_dim
    g = gm.graph

    def meta(n: fx.Node, where: str = path) -> fx.Node:
        n.meta["fxopt_module_path"] = where
        return n

    with g.inserting_before(node):
        w = meta(g.get_attr(f"{target}.in_proj_weight"))
        b = meta(g.get_attr(f"{target}.in_proj_bias")) if mod.in_proj_bias is not None else None
        qkv = meta(g.call_function(F.linear, (x, w, b)))
        chunks = meta(g.call_method("chunk", (qkv, 3), {"dim": -1}))
        d0 = meta(g.call_method("size", (x, 0)))
        d1 = meta(g.call_method("size", (x, 1)))
        qkv_heads = []
        for i in range(3):
            piece = meta(g.call_function(operator.getitem, (chunks, i)))
            split = meta(g.call_method("view", (piece, d0, d1, -1, head_dim)))
            order = (0, 2, 1, 3) if mod.batch_first else (1, 2, 0, 3)
            qkv_heads.append(meta(g.call_method("permute", (split, *order))))
        attn = meta(g.call_function(F.scaled_dot_product_attention, tuple(qkv_heads)))
        back = meta(g.call_method("permute", (attn, *((0, 2, 1, 3) if mod.batch_first
                                                      else (2, 0, 1, 3)))))
        merged = meta(g.call_method("flatten", (back, 2)))
        out = meta(g.call_module(f"{target}.out_proj", (merged,)), f"{path}.out_proj")
    for u in list(node.users):
        if u.args[1] == 0:
            u.replace_all_uses_with(out)
        g.erase_node(u)
    g.erase_node(node)
    box = nn.Module()  # the weights where the user's model has them, and nothing else
    box.in_proj_weight = mod.in_proj_weight
    if mod.in_proj_bias is not None:
        box.in_proj_bias = mod.in_proj_bias
    box.out_proj = mod.out_proj
    owner, _, leaf = target.rpartition(".")
    setattr(gm.get_submodule(owner) if owner else gm, leaf, box)
    note = {"module": path, "heads": heads, "head_dim": head_dim}
    if mod.dropout and mod.training:
        note["note"] = (f"attention dropout p={mod.dropout} is not kept (the functional "
                        "form is the eval-mode computation)")
    return note


def decompose_attention(gm: fx.GraphModule, inputs: tuple
                        ) -> tuple[fx.GraphModule, list[dict], dict[str, str]]:
    """Replace every ``nn.MultiheadAttention`` call of ``gm`` that allows it by linear +
    chunk + view + sdpa + linear (module docstring). Returns the graph (``gm`` itself when
    nothing was replaced, else a rewritten copy verified on ``inputs``), what was replaced,
    and, by module path, why the others were kept whole."""
    calls = [n for n in gm.graph.nodes if n.op == "call_module"
             and isinstance(gm.get_submodule(n.target), nn.MultiheadAttention)]
    kept = {}
    for n in calls:
        reason = why_not(n)
        if reason:
            kept[n.meta.get("fxopt_module_path") or str(n.target)] = reason
    todo = [n.name for n in calls if why_not(n) is None]
    if not todo:
        return gm, [], kept
    new = copy_graph_module(gm)
    nodes = {n.name: n for n in new.graph.nodes}
    done = [_replace_one(new, nodes[name]) for name in todo]
    new.graph.lint()
    new.recompile()
    with torch.no_grad():
        want = gm(*inputs)
    got = annotate_run(new, tuple(inputs))
    if not compare_outputs(want, got, EXACT).ok(EXACT):
        why = "its functional form does not compute what the module computes here"
        return gm, [], kept | {d["module"]: why for d in done}
    return new, done, kept
