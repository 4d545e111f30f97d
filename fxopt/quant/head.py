"""The output head: the layer that computes the model's output, kept float when cheap.

A head is a linear or conv layer whose result reaches a graph output through nothing but
shape, layout, cast, index, dropout, activation or softmax ops: a classifier's ``fc``, a
language model's ``lm_head``. Its rounding error lands on the output unattenuated, while
it usually holds a sliver of the work; keeping it float is what most quantization tools
do by default (``transformers``' bitsandbytes integration leaves ``lm_head`` alone). It
was measured here: the zoo gqa model's dynamic int8 in ONNX Runtime, head float, agrees
with float at cosine 0.999987 instead of 0.999943 at the same latency; ResNet-50's static
int8 worst-image cosine 0.973 -> 0.980 with ``fc`` float.

``keep_head="auto"`` (the ``quantize`` pass default) keeps heads float when together they
hold at most ``HEAD_MAX_MAC_SHARE`` of the multiply-accumulates of the layers the scheme
quantizes (GPT-2's 50 K-word ``lm_head`` is a third of its linear work: quantized); ``True``
keeps them whatever they cost, ``False`` quantizes them like any other layer.

Example::

    heads = output_heads(gm)                     # [fc node]
    keep = heads_to_keep(gm, layers, "auto")     # ["fc"], names skip= matches
"""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch.fx as fx
from torch.utils import _pytree as pytree

from fxopt.errors import QuantizationError
from fxopt.op_props import Category
from fxopt.ops import op_of

HEAD_MAX_MAC_SHARE = 0.05
KEEP_HEAD = ("auto", True, False)
_PASSTHROUGH = {Category.SHAPE, Category.LAYOUT, Category.CAST, Category.INDEX,
                Category.DROPOUT, Category.IDENTITY, Category.ACTIVATION, Category.SOFTMAX}
_HEADS = {Category.LINEAR, Category.CONV}


def output_heads(gm: fx.GraphModule) -> list[fx.Node]:
    """Linear / conv nodes whose result reaches a graph output through pass-through ops
    only (see the module docstring), in graph order."""
    out = next(n for n in reversed(gm.graph.nodes) if n.op == "output")
    found: set[fx.Node] = set()
    for leaf in pytree.tree_leaves(out.args):
        node = leaf
        while isinstance(node, fx.Node) and node.op in ("call_function", "call_module",
                                                        "call_method"):
            category = op_of(node).category
            if category in _HEADS:
                found.add(node)
                break
            inputs = [a for a in node.all_input_nodes if a.op != "get_attr"]
            passes = category in _PASSTHROUGH or node.target is operator.getitem
            if not passes or not inputs:
                break
            node = inputs[0]
    return [n for n in gm.graph.nodes if n in found]


def check_keep_head(keep_head: object) -> None:
    if keep_head not in KEEP_HEAD or (keep_head in (0, 1) and not isinstance(keep_head, bool)):
        raise QuantizationError(f"keep_head={keep_head!r}: use 'auto' (float when the head "
                                "holds little of the work), true or false")


def heads_to_keep(gm: fx.GraphModule, layers: Sequence[fx.Node],
                  keep_head: str | bool = "auto") -> list[str]:
    """Node names of the heads among ``layers`` (what the scheme would quantize) to leave
    float under ``keep_head``; never every layer (then nothing would be quantized)."""
    check_keep_head(keep_head)
    if keep_head is False:
        return []
    chosen = set(layers)
    heads = [h for h in output_heads(gm) if h in chosen]
    if not heads or len(heads) == len(chosen):
        return []
    if keep_head == "auto":
        total = sum(op_of(n).macs() for n in chosen)
        share = sum(op_of(h).macs() for h in heads) / total if total else 1.0
        if share > HEAD_MAX_MAC_SHARE:
            return []
    return [h.name for h in heads]


__all__ = ["HEAD_MAX_MAC_SHARE", "check_keep_head", "heads_to_keep", "output_heads"]
