"""Channel flow rules: how an index on one tensor axis maps to axes of other tensors.

Each ``OpDef`` names one rule in ``flow`` (``fxopt/op_table.py``); ``FLOW_RULES`` holds
them. A rule reads the op through its ``OpView`` and returns a ``Flow``:

* ``links``: ``Link((a, axis_a), (b, axis_b), pairs)`` says index ``i`` of ``a`` on
  ``axis_a`` is the same channel as index ``j`` of ``b`` on ``axis_b`` for every ``(i, j)``
  in ``pairs`` (``None``: the identity, for axes of equal size);
* ``params``: ``Param(view, name, dim, role, (tensor, axis))``: a weight whose ``dim`` runs
  along that tensor axis (``producer`` rows, ``consumer`` columns, ``passthrough``);
* ``blocks``: ``(tensor, axis) -> reason``: axes that must keep every channel.
* ``inexact``: ``(tensor, axis) -> reason``: axes that shape-wise can lose channels but not
  exactly (the statistics of a LayerNorm / RMSNorm mean over them): blocked unless the
  user asks for it (``prune(hidden=True)``), and then reported as not exact.

An axis of an op's input or output that its rule neither links nor blocks is blocked by
``fxopt.passes.prune`` with the op's name: an op without a rule never passes channels on.

Example::

    flow = FLOW_RULES["elementwise"](op_of(add_node))
    [(l.a[1], l.b[1]) for l in flow.links]   # [(1, 1), ...]: same index on every axis
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.fx as fx

Axis = tuple[fx.Node, int]


@dataclass
class Link:
    a: Axis
    b: Axis
    pairs: np.ndarray | None = None  # (k, 2) index pairs; None = identity


@dataclass
class Param:
    view: Any  # OpView owning the parameter (None for a get_attr operand)
    name: str  # canonical parameter name, or the get_attr target
    dim: int
    role: str  # "producer" | "consumer" | "passthrough"
    axis: Axis
    pairs: np.ndarray | None = None  # (tensor index, param index); None = identity


@dataclass
class Flow:
    links: list[Link] = field(default_factory=list)
    params: list[Param] = field(default_factory=list)
    blocks: dict[Axis, str] = field(default_factory=dict)
    handled: set[Axis] = field(default_factory=set)  # axes neither linked nor blocked, on purpose
    inexact: dict[Axis, str] = field(default_factory=dict)  # prunable only approximately

    def link(self, a: Axis, b: Axis, pairs: np.ndarray | None = None) -> None:
        self.links.append(Link(a, b, pairs))

    def block(self, ax: Axis, reason: str) -> None:
        self.blocks.setdefault(ax, reason)

    def approximate(self, ax: Axis, reason: str) -> None:
        self.inexact.setdefault(ax, reason)


def shape(node: Any) -> tuple[int, ...] | None:
    """The captured shape of a tensor-valued node (None for other values)."""
    if not isinstance(node, fx.Node):
        return None
    s = node.meta.get("shape")
    if isinstance(s, (tuple, torch.Size)) and all(isinstance(d, int) for d in s):
        return tuple(s)
    return None


def _tensor_args(view) -> list[fx.Node]:
    out: list[fx.Node] = []
    fx.node.map_arg((view.node.args, view.node.kwargs), out.append)
    return [n for n in out if shape(n) is not None]


def _pos(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# ---------------------------------------------------------------- rules


def same_index(view) -> Flow:
    """Element-wise ops and activations: every axis keeps its index (broadcast axes of size
    1 carry nothing; right-aligned like torch broadcasting)."""
    flow = Flow()
    out = view.node
    so = shape(out)
    if so is None:
        return flow
    for arg in _tensor_args(view):
        sa = shape(arg)
        for k in range(1, len(sa) + 1):
            if sa[-k] == so[-k]:
                flow.link((arg, len(sa) - k), (out, len(so) - k))
            elif sa[-k] == 1:
                flow.handled.add((arg, len(sa) - k))
    return flow


def _boundary(view, in_axis: int, out_axis: int, consumer_dim: int, producer_dim: int) -> Flow:
    flow = Flow()
    x, out = view.input, view.node
    sx, so = shape(x), shape(out)
    if sx is None or so is None:
        return flow
    params = view.params
    groups = view.attrs.get("groups", 1) if view.kind in ("conv", "conv_transpose") else 1
    cin, cout = sx[_pos(in_axis, len(sx))], so[_pos(out_axis, len(so))]
    ia, oa = (x, _pos(in_axis, len(sx))), (out, _pos(out_axis, len(so)))
    for k in range(len(sx)):  # batch (and sequence) axes pass through linear
        if view.kind == "linear" and k != ia[1] and k < len(so) and sx[k] == so[k]:
            flow.link((x, k), (out, k))
    if groups == 1:
        if params.get("weight") is not None:
            flow.params.append(Param(view, "weight", consumer_dim, "consumer", ia))
            flow.params.append(Param(view, "weight", producer_dim, "producer", oa))
        else:
            flow.block(ia, f"{view.kind} {view.node.name}: weight computed in the graph")
            flow.block(oa, f"{view.kind} {view.node.name}: weight computed in the graph")
    else:
        # grouped (depthwise when a group holds one input channel): channels of one group go
        # together, so an in-group and the out-group it feeds are one unit
        gi, go = cin // groups, cout // groups
        pairs = np.array([(i, (i // gi) * go + j) for i in range(cin) for j in range(go)])
        flow.link(ia, oa, pairs)
        w_dim = 0 if view.kind == "conv" else 0
        if view.kind == "conv":
            flow.params.append(Param(view, "weight", w_dim, "passthrough", oa))
        else:  # conv_transpose weight is (Cin, Cout/g, k): dim 0 runs along the input
            flow.params.append(Param(view, "weight", 0, "passthrough", ia))
    if params.get("bias") is not None:
        flow.params.append(Param(view, "bias", 0, "producer" if groups == 1 else "passthrough",
                                 oa))
    return flow


def conv(view) -> Flow:
    """Conv: input channels are weight columns (consumer), output channels weight rows
    (producer); grouped and depthwise convs pass whole groups through."""
    return _boundary(view, 1, 1, 1, 0)


def conv_transpose(view) -> Flow:
    """ConvTranspose: the weight is (Cin, Cout/groups, k...)."""
    return _boundary(view, 1, 1, 0, 1)


def linear(view) -> Flow:
    """Linear: in features are weight columns, out features weight rows."""
    return _boundary(view, -1, -1, 1, 0)


def embedding(view) -> Flow:
    flow = Flow()
    out = view.node
    so = shape(out)
    if so is not None and view.params.get("weight") is not None:
        flow.params.append(Param(view, "weight", 1, "producer", (out, len(so) - 1)))
    return flow


def batch_norm(view) -> Flow:
    """Batch norm: per-channel statistics and affine parameters pass the channel through."""
    flow = same_index(view)
    out = view.node
    for name, p in view.params.items():
        if p is not None:
            flow.params.append(Param(view, name, 0, "passthrough", (out, 1)))
    return flow


def normalized_last(view) -> Flow:
    """LayerNorm / RMSNorm: statistics over the normalized axes; other axes pass through.

    A single normalized axis (the hidden width) carries its channels, with the affine
    ``weight`` / ``bias`` as passthrough members, but only approximately: removing a
    channel changes the mean and variance (``Flow.inexact``). Several normalized axes
    block."""
    flow = same_index(view)
    so = shape(view.node)
    if so is None:
        return flow
    ns = view.attrs.get("normalized_shape", (so[-1],))
    ns = (ns,) if isinstance(ns, int) else tuple(ns)
    tensors = [view.node, *[x for x in _tensor_args(view) if len(shape(x)) == len(so)]]
    for k in range(len(so) - len(ns), len(so)):
        reason = (f"{view.kind} {view.node.name} normalizes over axis {k}: "
                  "pruning it changes the statistics (not exact; prune(hidden=True) allows it)")
        for a in tensors:
            if len(ns) == 1:
                flow.approximate((a, k), reason)
            else:
                flow.block((a, k), reason)
    if len(ns) == 1:
        for name, p in view.params.items():
            if p is not None and p.dim() == 1:
                flow.params.append(Param(view, name, 0, "passthrough", (view.node, len(so) - 1)))
    return flow


_STATISTICS = ("mean", "var", "std")  # reductions a norm reads: shape-safe to prune under


def over_dim(view) -> Flow:
    """Softmax-like and reductions: the ``dim`` axes are mixed; others pass through."""
    flow = Flow()
    x, out = view.input, view.node
    sx, so = shape(x), shape(out)
    if sx is None or so is None:
        return flow
    dims = view.attrs.get("dim")
    if dims is None:
        dims = tuple(range(len(sx))) if view.category.value == "reduction" else (-1,)
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    dims = {_pos(d, len(sx)) for d in dims}
    keep = len(so) == len(sx)
    j = 0
    statistic = view.kind in _STATISTICS and len(dims) == 1
    for k in range(len(sx)):
        if k in dims:
            why = f"{view.kind} {view.node.name} mixes channels: it reduces over axis {k}"
            if statistic:  # an RMSNorm written out: x.pow(2).mean(-1, keepdim=True)
                flow.approximate((x, k), why + " (a statistic: prune(hidden=True) allows it, "
                                 "not exact)")
            else:
                flow.block((x, k), why)
            if keep:
                flow.handled.add((out, j))
                j += 1
            continue
        flow.link((x, k), (out, j))
        j += 1
    return flow


def concat(view) -> Flow:
    """cat: the ``dim`` index of input ``t`` is shifted by the sizes of the inputs before it."""
    flow = Flow()
    out, so = view.node, shape(view.node)
    tensors = [t for t in (view.arg("tensors") or ()) if shape(t) is not None]
    if so is None or view.kind != "cat":
        return flow
    dim = _pos(view.arg("dim", 0), len(so))
    offset = 0
    for t in tensors:
        st = shape(t)
        for k in range(len(so)):
            if k == dim:
                idx = np.arange(st[k])
                flow.link((t, k), (out, k), np.stack([idx, idx + offset], 1))
            else:
                flow.link((t, k), (out, k))
        offset += st[dim]
    return flow


def piece_sizes(view) -> list[int] | None:
    """The sizes of a split / chunk's pieces along its ``dim`` (None when unknown)."""
    sx = shape(view.input)
    if sx is None:
        return None
    dim = _pos(view.arg("dim", 0), len(sx))
    n = sx[dim]
    if view.kind == "chunk":
        chunks = view.arg("chunks")
        if not isinstance(chunks, int) or chunks < 1:
            return None
        size = -(-n // chunks)
        return [min(size, n - k) for k in range(0, n, size)]
    sizes = view.arg("split_size")
    if isinstance(sizes, (list, tuple)) and all(isinstance(v, int) for v in sizes):
        return list(sizes)
    if isinstance(sizes, int) and sizes > 0 and "tensor_split" not in str(view.node.target):
        return [min(sizes, n - k) for k in range(0, n, sizes)]
    return None


def split(view) -> Flow:
    """split / chunk: getitem ``i`` is a slice of the input's ``dim`` at the pieces' offsets.
    Pieces may end up unequal after pruning: the shrink turns a chunk into a split by sizes."""
    flow = Flow()
    x, sx = view.input, shape(view.input)
    if sx is None:
        return flow
    dim = _pos(view.arg("dim", 0), len(sx))
    sizes = piece_sizes(view)
    users = [u for u in view.node.users
             if u.target is operator.getitem and isinstance(u.args[1], int)]
    if sizes is None or len(users) != len(view.node.users) or \
            {u.args[1] for u in users} != set(range(len(sizes))):
        flow.block((x, dim), f"{view.kind} {view.node.name}: piece sizes unknown or a piece "
                             "is not read by index")
        sizes = None
    offsets = np.cumsum([0, *sizes]) if sizes else None
    for user in users:
        su, i = shape(user), user.args[1]
        if su is None:
            continue
        for k in range(len(sx)):
            if k == dim:
                if offsets is not None:
                    idx = np.arange(su[k])
                    flow.link((user, k), (x, k), np.stack([idx, idx + offsets[i]], 1))
            else:
                flow.link((x, k), (user, k))
    return flow


def axis_move(view) -> Flow:
    """permute / transpose: axis ``k`` of the input is axis ``perm^-1[k]`` of the output."""
    flow = Flow()
    x, out = view.input, view.node
    sx, so = shape(x), shape(out)
    if sx is None or so is None:
        return flow
    n = len(sx)
    if view.kind == "permute":
        dims = view.arg("dims")
        perm = [_pos(d, n) for d in dims]
    else:
        d0, d1 = view.arg("dim0", 0 if n == 2 else None), view.arg("dim1", 1)
        if view.node.target in ("t", "mT") or d0 is None:
            d0, d1 = n - 2, n - 1
        perm = list(range(n))
        perm[_pos(d0, n)], perm[_pos(d1, n)] = perm[_pos(d1, n)], perm[_pos(d0, n)]
    for j, k in enumerate(perm):
        flow.link((x, k), (out, j))
    return flow


def reshape(view) -> Flow:
    """view / reshape / flatten / (un)squeeze, from the captured shapes: an axis kept as is
    keeps its index; an axis split into several maps onto the leading one in blocks (heads
    of ``head_dim``); several merged into one map the leading one onto blocks of columns
    (``flatten`` -> ``linear``). The trailing axes of a split or merge are blocked."""
    flow = Flow()
    x, out = view.input, view.node
    sx, so = shape(x), shape(out)
    if sx is None or so is None:
        return flow
    xi = [k for k in range(len(sx)) if sx[k] != 1]
    oi = [k for k in range(len(so)) if so[k] != 1]
    for k in range(len(sx)):
        if sx[k] == 1:
            flow.handled.add((x, k))
    for k in range(len(so)):
        if so[k] == 1:
            flow.handled.add((out, k))
    i = j = 0
    why = f"{view.kind} {view.node.name} mixes this axis with another"
    while i < len(xi) and j < len(oi):
        a, b = [xi[i]], [oi[j]]
        pa, pb = sx[xi[i]], so[oi[j]]
        while pa != pb:
            if pa < pb:
                i += 1
                if i >= len(xi):
                    break
                a.append(xi[i])
                pa *= sx[xi[i]]
            else:
                j += 1
                if j >= len(oi):
                    break
                b.append(oi[j])
                pb *= so[oi[j]]
        i += 1
        j += 1
        if len(a) == 1 and len(b) == 1:
            flow.link((x, a[0]), (out, b[0]))
        elif len(a) == 1 or len(b) == 1:
            whole, parts = ((x, a[0]), [(out, k) for k in b]) if len(a) == 1 else (
                (out, b[0]), [(x, k) for k in a])
            t = _merged_lead(out, b) if len(a) == 1 else 0
            node = parts[t][0]
            sizes = [shape(node)[k] for _, k in parts]
            idx = np.arange(shape(whole[0])[whole[1]])
            part = (idx // math.prod(sizes[t + 1:])) % sizes[t]
            flow.link(whole, parts[t], np.stack([idx, part], 1))
            for p in parts[:t] + parts[t + 1:]:
                flow.block(p, why)
        else:
            for k in a:
                flow.block((x, k), why)
            for k in b:
                flow.block((out, k), why)
    return flow


def _merged_lead(node: fx.Node, axes: list[int]) -> int:
    """Which of the axes a split made (``axes`` of ``node``) to carry the channel: the one
    that a later reshape merging them back leads with, through layout ops (a channel
    shuffle: ``view(b, g, c/g, ...)`` -> ``transpose(1, 2)`` -> ``view(b, c, ...)`` carries
    the ``c/g`` axis); else the first (heads of ``head_dim``)."""
    from fxopt.ops import op_of

    pos = list(axes)  # where each part axis is now
    for _ in range(8):
        users = [u for u in node.users if shape(u) is not None]  # not x.size(0)
        if len(users) != 1:
            return 0
        user = users[0]
        view = op_of(user)
        if view.kind in ("contiguous", "clone"):
            node = user
            continue
        if view.kind in ("transpose", "permute"):
            moved = {link.a[1]: link.b[1] for link in axis_move(view).links}
            pos = [moved.get(p, p) for p in pos]
            node = user
            continue
        if view.kind == "reshape" and sorted(pos) == list(range(min(pos), min(pos) + len(pos))):
            return pos.index(min(pos))
        return 0
    return 0


def repeat(view) -> Flow:
    """expand (broadcast axes carry nothing) and repeat_interleave (index ``i`` becomes
    ``i * r .. i * r + r - 1``, as grouped-query attention repeats kv heads)."""
    flow = Flow()
    x, out = view.input, view.node
    sx, so = shape(x), shape(out)
    if sx is None or so is None or len(sx) != len(so):
        return flow
    interleave = "repeat_interleave" in str(view.node.target)
    for k in range(len(sx)):
        if sx[k] == so[k]:
            flow.link((x, k), (out, k))
        elif interleave and so[k] % sx[k] == 0:
            r = so[k] // sx[k]
            idx = np.arange(so[k])
            flow.link((x, k), (out, k), np.stack([idx // r, idx], 1))
        else:  # the size of a broadcast or tiled axis is a constant of the call
            flow.block((out, k), f"{view.node.name} sets the size of axis {k}")
    return flow


def index(view) -> Flow:
    """getitem / aten.select / aten.slice: full slices keep the index, ints drop the axis,
    ``None`` adds one; a partial slice of an axis blocks it."""
    flow = Flow()
    x, out = view.input, view.node
    sx, so = shape(x), shape(out)
    if so is not None and sx is None and isinstance(x, fx.Node):
        from fxopt.ops import lookup

        entry = lookup(x)[0] if x.op.startswith("call") else None
        for k in range(len(so)):
            if entry is not None and entry.flow == "split":  # the split links its pieces
                flow.handled.add((out, k))
            else:
                flow.block((out, k), f"{x.name} returns a tuple whose channel flow is not "
                                     "declared")
    if sx is None or so is None:
        return flow
    target = view.node.target
    rows = view.node.args[1] if len(view.node.args) > 1 else None
    if target is not operator.getitem and isinstance(rows, (list, tuple)) and len(rows) == 1:
        rows = rows[0]  # aten.index.Tensor(x, [idx])
    if shape(rows) is not None and len(so) == len(shape(rows)) + len(sx) - 1:
        # x[idx] with one index tensor gathers along axis 0: the result is idx.shape +
        # x.shape[1:], so x's other axes pass through (a relative position bias table's
        # head axis)
        r = len(shape(rows))
        flow.block((x, 0), f"{view.node.name} gathers along axis 0")
        for k in range(1, len(sx)):
            flow.link((x, k), (out, r + k - 1))
        for k in range(r):
            flow.block((out, k), f"{view.node.name}: axis {k} holds gathered rows")
        return flow
    if target is operator.getitem:
        idx = view.node.args[1]
        idx = idx if isinstance(idx, tuple) else (idx,)
    elif not isinstance(view.node.args[1] if len(view.node.args) > 1 else 0, int):
        # any other aten.index.Tensor: a gather whose result axes are not x's axes
        for k in range(len(sx)):
            flow.block((x, k), f"{view.node.name} gathers by a tensor index")
        for k in range(len(so)):
            flow.block((out, k), f"{view.node.name} gathers by a tensor index")
        return flow
    else:
        name = str(target)
        dim = _pos(view.node.args[1] if len(view.node.args) > 1 else 0, len(sx))
        if "select" in name:
            idx = (slice(None),) * dim + (0,)
        else:
            args = list(view.node.args[2:]) + [None, None, 1][len(view.node.args[2:]):]
            start, end, step = args[0] or 0, args[1], args[2]
            full = start == 0 and (end is None or end >= sx[dim]) and step == 1
            idx = (slice(None),) * dim + ((slice(None) if full else slice(start, end, step)),)
    if any(i is Ellipsis for i in idx):
        e = idx.index(Ellipsis)
        fill = len(sx) - sum(1 for i in idx if i is not None and i is not Ellipsis)
        idx = idx[:e] + (slice(None),) * fill + idx[e + 1:]
    k = j = 0
    for i in idx:
        if i is None:
            j += 1
            continue
        if k >= len(sx):
            break
        if isinstance(i, int):
            flow.block((x, k), f"{view.node.name} picks one index of axis {k}")
            k += 1
        elif isinstance(i, slice):
            stop = i.stop
            if i == slice(None) or (i.start in (None, 0) and i.step in (None, 1)
                                    and (stop is None or isinstance(stop, int)
                                         and stop >= sx[k])):
                flow.link((x, k), (out, j))
            else:
                flow.block((x, k), f"{view.node.name} slices part of axis {k}")
            k += 1
            j += 1
        else:
            return flow  # tensor indexing: nothing declared, so the axes block
    while k < len(sx) and j < len(so):
        flow.link((x, k), (out, j))
        k += 1
        j += 1
    return flow


def channel_first(view) -> Flow:
    """Pooling and resizing: batch and channel axes keep their index."""
    flow = Flow()
    x, out = view.input, view.node
    sx, so = shape(x), shape(out)
    if sx is None or so is None:
        return flow
    for k in range(min(2, len(sx))):
        if sx[k] == so[k]:
            flow.link((x, k), (out, k))
    return flow


def pad(view) -> Flow:
    """F.pad / constant_pad_nd: ``pad`` lists (before, after) amounts from the last axis
    backwards; an axis padded by nothing keeps its index, a padded one is left to block.

    Example: ``F.pad(x, (0, 1, 0, 1))`` on NCHW pads H and W; N and C pass through."""
    flow = Flow()
    x, out = view.input, view.node
    sx, so, amounts = shape(x), shape(out), view.arg("pad")
    if sx is None or so is None or not isinstance(amounts, (list, tuple)) or len(sx) != len(so):
        return flow
    padded = {len(sx) - 1 - i // 2 for i, a in enumerate(amounts) if a != 0}
    for k in range(len(sx)):
        if k not in padded and sx[k] == so[k]:
            flow.link((x, k), (out, k))
    return flow


def neutral(view) -> Flow:
    """Shape queries and checks read no channel values."""
    flow = Flow()
    for t in _tensor_args(view):
        for k in range(len(shape(t))):
            flow.handled.add((t, k))
    return flow


from fxopt.op_flow_attention import matmul, mha_module, sdpa  # noqa: E402  (uses Flow above)

FLOW_RULES: dict[str, Callable[[Any], Flow]] = {
    "same_index": same_index,
    "conv": conv,
    "conv_transpose": conv_transpose,
    "linear": linear,
    "embedding": embedding,
    "batch_norm": batch_norm,
    "normalized_last": normalized_last,
    "over_dim": over_dim,
    "concat": concat,
    "split": split,
    "axis_move": axis_move,
    "reshape": reshape,
    "repeat": repeat,
    "index": index,
    "sdpa": sdpa,
    "matmul": matmul,
    "channel_first": channel_first,
    "pad": pad,
    "neutral": neutral,
    "mha_module": mha_module,
}
