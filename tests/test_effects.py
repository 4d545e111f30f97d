"""One effects model (``fxopt.ops.effects``) for tabled ops, untabled ATen ops, torch
functions and Python callables; ``dce``, ``cse`` and ``fold_constants`` all decide by it."""

from __future__ import annotations

import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from fxopt import ops
from fxopt.op_props import Effects
from fxopt.passes.base import REGISTRY, PassContext

aten = torch.ops.aten
PURE, RANDOM, INPLACE = Effects.PURE, Effects.RANDOM, Effects.INPLACE
ALIAS, SIDE, UNKNOWN = Effects.ALIAS, Effects.SIDE_EFFECT, Effects.UNKNOWN


def user_fn(x: torch.Tensor) -> torch.Tensor:
    return x * 2


class Root(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 1)
        self.drop = nn.Dropout(0.5)
        self.relu = nn.ReLU(inplace=True)
        self.register_buffer("w", torch.arange(4.0).reshape(2, 2, 1, 1) / 8 + 0.25)


def _node(op: str, target, args=None, kwargs=None) -> fx.Node:
    """One node ``target(x, ...)`` in a graph owned by a ``Root``; args may name "x" / "w"."""
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.get_attr("w")
    values = {"x": x, "w": w}
    args = tuple(values.get(a, a) if isinstance(a, str) else a for a in (args or ("x",)))
    node = graph.create_node(op, target, args, kwargs or {})
    graph.output(node)
    fx.GraphModule(Root(), graph)
    return node


def _placeholder() -> fx.Node:
    return _node("call_function", torch.sin).graph.find_nodes(op="placeholder")[0]


def _get_attr() -> fx.Node:
    return _node("call_function", torch.sin).graph.find_nodes(op="get_attr")[0]


# (case, node builder, expected effects)
EFFECTS = [
    # tabled ops: the op table's word, plus in-place forms and view aliasing
    ("conv-module", lambda: _node("call_module", "conv"), PURE),
    ("conv-aten", lambda: _node("call_function", aten.conv2d.default, ("x", "w")), PURE),
    ("dropout-module", lambda: _node("call_module", "drop"), RANDOM),
    ("dropout-function", lambda: _node("call_function", F.dropout, ("x", 0.1, False)), RANDOM),
    ("relu_-method", lambda: _node("call_method", "relu_"), INPLACE),
    ("relu_-aten", lambda: _node("call_function", aten.relu_.default), INPLACE),
    ("add_-aten", lambda: _node("call_function", aten.add_.Tensor, ("x", "w")), INPLACE),
    ("relu-inplace-module", lambda: _node("call_module", "relu"), INPLACE),
    ("relu-inplace-kwarg", lambda: _node("call_function", F.relu, kwargs={"inplace": True}),
     INPLACE),
    ("assert_metadata", lambda: _node("call_function", aten._assert_tensor_metadata.default,
                                      kwargs={"dtype": torch.float32}), SIDE),
    ("reshape-view", lambda: _node("call_method", "view", ("x", -1)), ALIAS),
    # untabled ATen ops: the tags and schemas of the packet
    ("aten.rand", lambda: _node("call_function", aten.rand.default, ([2, 2],)), RANDOM),
    ("aten.bernoulli", lambda: _node("call_function", aten.bernoulli.default), RANDOM),
    ("aten.sin_", lambda: _node("call_function", aten.sin_.default), INPLACE | ALIAS),
    ("aten.sin", lambda: _node("call_function", aten.sin.default), PURE),
    ("aten.narrow", lambda: _node("call_function", aten.narrow.default, ("x", 0, 0, 1)), ALIAS),
    # max.dim_max writes only out= buffers (not named *out): max is pure in every form
    ("aten.max.dim", lambda: _node("call_function", aten.max.dim, ("x", 0)), PURE),
    # torch functions and tensor methods: the ATen op of the same name
    ("torch.sin", lambda: _node("call_function", torch.sin), PURE),
    ("torch.rand", lambda: _node("call_function", torch.rand, (2, 2)), RANDOM),
    ("torch.max", lambda: _node("call_function", torch.max, ("x", 0)), PURE),
    ("Tensor.sin", lambda: _node("call_method", "sin"), PURE),
    ("Tensor.uniform_", lambda: _node("call_method", "uniform_"), RANDOM | INPLACE),
    # Python callables: operators by the ATen op they call, anything else unknown
    ("operator.add", lambda: _node("call_function", operator.add, ("x", "w")), PURE),
    ("operator.gt", lambda: _node("call_function", operator.gt, ("x", "w")), PURE),
    ("operator.iadd", lambda: _node("call_function", operator.iadd, ("x", "w")), INPLACE),
    ("user-function", lambda: _node("call_function", user_fn), UNKNOWN | ALIAS),
    ("torch.fft.rfft", lambda: _node("call_function", torch.fft.rfft), UNKNOWN | ALIAS),
    # the graph's own nodes
    ("placeholder", _placeholder, SIDE),
    ("get_attr", _get_attr, PURE),
]


@pytest.mark.parametrize(("build", "expected"), [c[1:] for c in EFFECTS],
                         ids=[c[0] for c in EFFECTS])
def test_effects_of_tabled_untabled_and_python_ops(build, expected) -> None:
    node = build()
    found = ops.effects(node)
    assert found == expected
    pure = not expected & (RANDOM | INPLACE | SIDE | UNKNOWN)
    assert found.pure == found.removable_if_unused == found.foldable == found.cse_safe == pure
    assert ops.is_pure(node) == pure
    assert ops.is_inplace(node) == bool(expected & INPLACE)


# ------------------------------------------------------------------ the passes agree
def _run(name: str, gm: fx.GraphModule):
    return REGISTRY[name].fn(gm, PassContext((torch.randn(2, 2, 1, 1),)))


def _graph(make, use: str) -> tuple[fx.GraphModule, list[fx.Node]]:
    """``make(graph, value) -> node`` applied as ``use`` needs it:

    * ``dead``: on the constant ``w``, result unused (dce decides);
    * ``twice``: twice on the input ``x``, both results used (cse decides);
    * ``const``: once on the constant ``w``, result used (fold_constants decides).
    """
    graph = fx.Graph()
    x, w = graph.placeholder("x"), graph.get_attr("w")
    if use == "dead":
        made = [make(graph, w)]
        out = graph.call_function(operator.add, (x, 1))
    elif use == "twice":
        made = [make(graph, x), make(graph, x)]
        out = graph.call_function(operator.add, tuple(made))
    else:
        made = [make(graph, w)]
        out = graph.call_function(operator.add, (x, made[0]))
    graph.output(out)
    return fx.GraphModule(Root(), graph), made


AGREE = [
    ("aten.sin", lambda g, v: g.call_function(aten.sin.default, (v,)), True),
    ("torch.cos", lambda g, v: g.call_function(torch.cos, (v,)), True),
    ("Tensor.exp", lambda g, v: g.call_method("exp", (v,)), True),
    ("aten.rand_like", lambda g, v: g.call_function(aten.rand_like.default, (v,)), False),
    ("aten.bernoulli", lambda g, v: g.call_function(aten.bernoulli.default, (v,)), False),
    ("torch.rand_like", lambda g, v: g.call_function(torch.rand_like, (v,)), False),
    ("user-function", lambda g, v: g.call_function(user_fn, (v,)), False),
]


@pytest.mark.parametrize(("make", "pure"), [c[1:] for c in AGREE], ids=[c[0] for c in AGREE])
def test_dce_cse_and_fold_constants_agree_on_untabled_ops(make, pure) -> None:
    gm, (dead,) = _graph(make, "dead")
    assert ops.effects(dead).pure is pure
    res = _run("dce", gm)
    assert (dead not in gm.graph.nodes) is pure and res.modified is pure
    gm.graph.lint()

    gm, made = _graph(make, "twice")
    res = _run("cse", gm)
    assert res.stats["merged"] == (1 if pure else 0)
    assert sum(n in gm.graph.nodes for n in made) == (1 if pure else 2)
    gm.graph.lint()

    gm, (const,) = _graph(make, "const")
    x = torch.randn(2, 2, 1, 1)
    want = gm(x)
    res = _run("fold_constants", gm)
    assert res.stats["folded"] == (1 if pure else 0)
    assert (const not in gm.graph.nodes) is pure
    gm.graph.lint()
    if pure:  # folded to the value it computes
        gm.recompile()
        torch.testing.assert_close(gm(x), want)
