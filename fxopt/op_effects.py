"""The effects model: what running a node does besides computing its result.

``fxopt.ops`` re-exports these (``fxopt.ops.effects``, ``is_pure``, ``is_inplace``);
``dce``, ``cse`` and ``fold_constants`` decide through them.

Example::

    from fxopt.ops import effects
    dead = [n for n in gm.graph.nodes if not n.users and effects(n).removable_if_unused]
"""

from __future__ import annotations

import torch.fx as fx

from fxopt.op_props import Effects, Prop, inferred_effects, writes_input
from fxopt.ops import lookup

__all__ = ["effects", "is_inplace", "is_pure"]


def effects(node: fx.Node) -> Effects:
    """What running ``node`` does besides computing its result: the op table's word for a
    tabled op, ATen's for other torch ops (``fxopt.op_props.inferred_effects``), and
    ``UNKNOWN`` for what neither describes. Graph inputs and outputs are ``SIDE_EFFECT``.

    Example::

        dead = [n for n in gm.graph.nodes if not n.users and effects(n).removable_if_unused]
    """
    if node.op in ("placeholder", "output"):
        return Effects.SIDE_EFFECT
    if node.op == "get_attr":
        return Effects.PURE
    entry, _ = lookup(node)
    if entry is None:
        return inferred_effects(node)
    found = entry.effects
    if Prop.MAY_ALIAS in entry.props:
        found |= Effects.ALIAS
    return found | (Effects.INPLACE if writes_input(node) else Effects.PURE)


def is_pure(node: fx.Node) -> bool:
    """``effects(node).pure``: False for random, in-place, checking and unknown ops."""
    return effects(node).pure


def is_inplace(node: fx.Node) -> bool:
    """True if ``node`` writes into one of its inputs (``x.add_(1)``, ``F.relu(x, inplace=True)``,
    ``nn.ReLU(inplace=True)``, ``aten.add_``): its result may be unused yet still matter.

    Example::

        [n.name for n in gm.graph.nodes if fxopt.ops.is_inplace(n)]   # ['add_']
    """
    return Effects.INPLACE in effects(node)
