"""Channel groups: connected components of a networkx graph of ``(tensor, axis)`` nodes.

Every op's ``flow`` rule (``fxopt/op_flow.py``) links the axes it carries; an axis an op
touches but neither links nor declares is blocked with the op's name, as are graph inputs
and outputs. A connected component holding weight rows (a producer) is a group; inside it,
channels are the classes of ``(axis, index)`` pairs joined by the links' index pairs, so a
head of ``head_dim`` columns, a kv head with its repeated query heads, or a conv group is one
unit.

Example::

    for g in fxopt.prune.groups(gm):
        print(g.id, g.prunable, g.reasons[:1], [(m.param, m.dim, m.role) for m in g.members])
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import torch.fx as fx
from scipy.sparse import coo_matrix
from scipy.sparse.csgraph import connected_components

from fxopt.errors import PassError
from fxopt.graph_utils import attr_key, layer_name, matches, state_key
from fxopt.op_flow import FLOW_RULES, Flow, Param, shape
from fxopt.ops import op_of


@dataclass(frozen=True)
class Member:
    """One weight in a group: ``param`` (state_dict key), the ``dim`` that runs along the
    group's channels, and its ``role`` (producer rows, consumer columns, passthrough)."""

    param: str
    dim: int
    role: str


@dataclass
class Group:
    """A set of coupled channel axes that must be pruned together."""

    id: int
    axes: list[tuple[str, int]]
    members: list[Member]
    reasons: list[str]
    params: list[Param] = field(default_factory=list, repr=False)
    # unit (channel class) of each (axis, index): axis -> int array of unit labels
    units: dict[tuple[str, int], np.ndarray] = field(default_factory=dict, repr=False)
    n_units: int = 0
    # why pruning it is not exact (a LayerNorm / RMSNorm over it); only with hidden=True
    inexact: list[str] = field(default_factory=list)

    @property
    def exact(self) -> bool:
        return not self.inexact

    @property
    def prunable(self) -> bool:
        return not self.reasons and self.n_units > 1

    @property
    def channels(self) -> int:
        return self.n_units

    def as_dict(self) -> dict:
        return {
            "id": self.id, "prunable": self.prunable, "units": self.n_units,
            "reasons": list(self.reasons), "exact": self.exact, "inexact": list(self.inexact),
            "members": [m.__dict__ | {} for m in self.members],
        }


def stored_dim(p: Param) -> int:
    """``p.dim`` in the tensor as stored (the plan's and the state_dict's numbering): flow
    rules speak the kind's layout, and a parameter the graph holds transposed from it
    (``aten.addmm``'s weight, GPT-2's Conv1D) has the other dim."""
    if p.view is not None and p.name in p.view.entry.transposed:
        return 1 - p.dim
    return p.dim


def param_key(p: Param) -> str:
    """The state_dict key of a member's tensor in the user's model (``graph_utils.state_key``:
    the module path capture recorded, which survives ``flatten_modules``, and the
    parameter's name, else the get_attr's key)."""
    if p.view is not None:
        return state_key(p.view, p.name)
    src = p.axis[0]
    return attr_key(src) if src.op == "get_attr" else p.name


@dataclass(frozen=True)
class PlanMember:
    """One entry of a plan group's ``members``: the user's state_dict key, its dim, role,
    the group axis its indices come from, and where the tensor lives in the graph (None
    for a tensor a fold merged into its producer)."""

    param: str
    dim: int
    role: str
    axis: tuple[str, int]
    attr: str | None


def plan_members(group: Group) -> list[PlanMember]:
    """What a plan lists for ``group``, in the user's model's terms: its weights, less a
    bias that ``fold_bn`` created (the user's layer has none), plus, as passthrough
    members with the producer's indices, the per-channel tensors folded into a producer
    (a batch norm's weight, bias and running statistics; a folded layer scale)."""
    out, seen = [], set()
    for p in group.params:
        node = p.view.node if p.view is not None else None
        axis = (p.axis[0].name, p.axis[1])
        if node is not None and p.name in node.meta.get("fxopt_created", ()):
            continue
        key = (param_key(p), stored_dim(p))
        if key not in seen:
            seen.add(key)
            out.append(PlanMember(key[0], key[1], p.role, axis, graph_path(p)))
        if node is None or p.role != "producer" or p.name != "weight":
            continue
        for src in node.meta.get("fxopt_folded", ()):
            if (src["param"], src["dim"]) not in seen:
                seen.add((src["param"], src["dim"]))
                out.append(PlanMember(src["param"], src["dim"], "passthrough", axis, None))
    return out


def graph_path(p: Param) -> str:
    """Where a member's tensor lives in the graph module itself (its attribute path)."""
    if p.view is not None and p.view.module is not None:
        return f"{p.view.node.target}.{p.name}"
    if p.view is not None:
        src = p.view.param_node(p.name)
        return str(src.target) if src is not None else p.name
    return p.name


def _flow_of(node: fx.Node) -> tuple[Flow | None, str, set]:
    view = op_of(node)
    params = set()
    if view.entry is not None:
        params = {view.param_node(p) for p in view.entry.params} - {None}
    if view.entry is None or view.entry.flow is None:
        name = view.kind if view.entry else getattr(node.target, "__name__", str(node.target))
        return None, f"{name} op {node.name} declares no channel flow", params
    return FLOW_RULES[view.entry.flow](view), view.kind, params


def _touched(node: fx.Node, params: set) -> list[tuple[fx.Node, int]]:
    out: list[fx.Node] = []
    fx.node.map_arg((node.args, node.kwargs), out.append)
    axes = [(t, k) for t in dict.fromkeys(out) if t not in params
            for k in range(len(shape(t) or ()))]
    return axes + [(node, k) for k in range(len(shape(node) or ()))]


def build_graph(gm: fx.GraphModule) -> nx.Graph:
    """The ``(node name, axis)`` graph: edges carry index ``pairs`` (None: identity), nodes
    ``size``, ``reasons`` (why the axis must stay whole), ``inexact`` (why pruning it is
    only approximate) and ``params``."""
    g = nx.Graph()

    def add(ax) -> str:
        key = (ax[0].name, ax[1])
        if key not in g:
            g.add_node(key, size=shape(ax[0])[ax[1]], reasons=[], inexact=[], params=[])
        return key

    for node in gm.graph.nodes:
        if node.op == "placeholder":
            for k in range(len(shape(node) or ())):
                g.nodes[add((node, k))]["reasons"].append(f"{node.name} is a graph input")
            continue
        if node.op == "output":
            flat: list[fx.Node] = []
            fx.node.map_arg(node.args, flat.append)
            for t in flat:
                for k in range(len(shape(t) or ())):
                    g.nodes[add((t, k))]["reasons"].append(
                        f"{t.name} reaches the graph output")
            continue
        if node.op == "get_attr":
            for k in range(len(shape(node) or ())):
                g.nodes[add((node, k))]["params"].append(
                    Param(None, str(node.target), k, "passthrough", (node, k)))
            continue
        if not node.op.startswith("call"):
            continue
        flow, kind, params = _flow_of(node)
        touched = _touched(node, params)
        if flow is None:
            for ax in touched:
                g.nodes[add(ax)]["reasons"].append(kind)
            continue
        accounted = set(flow.handled)
        for link in flow.links:
            a, b = add(link.a), add(link.b)
            accounted |= {link.a, link.b}
            if g.has_edge(a, b):  # two links between the same axes (x + x): keep both
                data = g.edges[a, b]
                new = _pairs(link.pairs, g.nodes[a]["size"])
                new = new if data["src"] == a else new[:, ::-1]
                old = _pairs(data["pairs"], g.nodes[data["src"]]["size"])
                data["pairs"] = np.concatenate([old, new])
            else:
                g.add_edge(a, b, pairs=link.pairs, src=a)
        for p in flow.params:
            g.nodes[add(p.axis)]["params"].append(p)
            accounted.add(p.axis)
        for ax, reason in flow.blocks.items():
            g.nodes[add(ax)]["reasons"].append(reason)
            accounted.add(ax)
        for ax, reason in flow.inexact.items():
            g.nodes[add(ax)]["inexact"].append(reason)
            accounted.add(ax)
        for ax in touched:
            if ax not in accounted:
                g.nodes[add(ax)]["reasons"].append(
                    f"{kind} op {node.name} does not carry axis {ax[1]} of {ax[0].name}")
    return g


def _pairs(pairs, size: int) -> np.ndarray:
    if pairs is None:
        idx = np.arange(size)
        return np.stack([idx, idx], 1)
    return np.asarray(pairs)


def _units(g: nx.Graph, comp: list) -> tuple[dict, int]:
    offsets, total = {}, 0
    for ax in comp:
        offsets[ax] = total
        total += g.nodes[ax]["size"]
    rows, cols = [], []
    for a, b, data in g.subgraph(comp).edges(data=True):
        if data["src"] != a:
            a, b = b, a
        pairs = _pairs(data["pairs"], g.nodes[a]["size"])
        rows.append(pairs[:, 0] + offsets[a])
        cols.append(pairs[:, 1] + offsets[b])
    if rows:
        r, c = np.concatenate(rows), np.concatenate(cols)
    else:
        r = c = np.zeros(0, dtype=np.int64)
    matrix = coo_matrix((np.ones(len(r)), (r, c)), shape=(total, total))
    n, labels = connected_components(matrix, directed=False)
    return {ax: labels[offsets[ax]: offsets[ax] + g.nodes[ax]["size"]] for ax in comp}, n


def _skipped(params: list[Param], skip) -> str | None:
    """The skip reason of a group: a pattern (``fxopt.graph_utils.matches``, as quantize's
    ``skip``) that names one of the layers owning its weights."""
    for p in params:
        node = p.view.node if p.view is not None else p.axis[0]
        for pattern in skip or ():
            if matches(node, [pattern]):
                return f"skipped: {layer_name(node)} matches skip pattern {pattern!r}"
    return None


def _check_skip(gm: fx.GraphModule, skip) -> None:
    for pattern in skip or ():
        if not any(matches(n, [pattern]) for n in gm.graph.nodes):
            raise PassError(f"prune: skip pattern {pattern!r} names no layer of this graph; "
                            "use module paths (layer1.0.conv1), node names or globs "
                            "(layer1.*)")


def groups(gm: fx.GraphModule, *, skip=None, hidden: bool = False) -> list[Group]:
    """The coupled channel groups of ``gm`` (a group holds at least one producer).

    ``skip`` (module paths, node names or globs) marks the groups they touch unprunable.
    A group under LayerNorm / RMSNorm statistics (the residual / embedding width) is
    refused unless ``hidden=True``; then it is prunable with ``exact`` False.

    Example::

        gs = fxopt.prune.groups(fxopt.capture(model, (x,)))
        [g.reasons for g in gs if not g.prunable]
    """
    _check_skip(gm, skip)
    g = build_graph(gm)
    found: list[Group] = []
    for comp in nx.connected_components(g):
        comp = sorted(comp)
        params = [p for ax in comp for p in g.nodes[ax]["params"]]
        if not any(p.role == "producer" for p in params):
            continue
        params = _real_params(params)
        members = list(dict.fromkeys(Member(param_key(p), stored_dim(p), p.role) for p in params))
        reasons = list(dict.fromkeys(r for ax in comp for r in g.nodes[ax]["reasons"]))
        inexact = list(dict.fromkeys(r for ax in comp for r in g.nodes[ax]["inexact"]))
        if inexact and not hidden:
            reasons += inexact
        why = _skipped(params, skip)
        if why:
            reasons.append(why)
        units, n = _units(g, comp)
        found.append(Group(len(found), comp, members, reasons, params, units, n,
                           inexact if hidden else []))
    _block_shared(found)
    return found


def _block_shared(found: list[Group]) -> None:
    """A weight dim in two groups (a module called twice on different tensors) would be
    cut twice, once per group: block every such group, naming the weight."""
    owners: dict[tuple[str, int], list[Group]] = {}
    for g in found:
        for m in {(m.param, m.dim) for m in g.members}:
            owners.setdefault(m, []).append(g)
    for (param, dim), gs in owners.items():
        if len(gs) > 1:
            for g in gs:
                g.reasons.append(f"{param} (dim {dim}) also belongs to group "
                                 f"{[o.id for o in gs if o is not g][0]}: a weight shared "
                                 "by several calls")


def _real_params(params: list[Param]) -> list[Param]:
    """get_attr members that an op already lists as its parameter are that op's member."""
    owned = set()
    for p in params:
        if p.view is not None and p.view.module is None:
            src = p.view.param_node(p.name)
            if src is not None:
                owned.add(str(src.target))
    return [p for p in params if p.view is not None or p.name not in owned]
