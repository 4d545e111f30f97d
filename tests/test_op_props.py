"""Op properties live in the op table: categories are an enum, properties are named sets on
each entry (with per-category defaults), and registering or removing an op is one call."""

from __future__ import annotations

import json

import pytest
import torch
import torch.fx as fx
from torch import nn

from fxopt import ops
from fxopt.errors import SpecError
from fxopt.op_props import CATEGORY_PROPS, Category, Prop
from fxopt.ops import OpDef, has_prop, kind_of, kinds_with, op_of, registered, unregister_op

# What the passes used to keep as their own lists, now read from the table. Pinned here so
# that a change to the table that changes what a pass does is a visible change to this test.
USED_TO_LIVE_IN_THE_PASSES = {
    # passes/rules.py COMMUTATIVE; passes/fusion.py's ("mul", "add") operand swap
    Prop.COMMUTATIVE: {"add", "mul"},
    # passes/half.py HALF_KINDS (aten.addmm, GPT-2's Conv1D in an export, is a linear)
    Prop.HALF_COMPUTE: {"conv", "conv_transpose", "linear", "matmul", "attention",
                        "scaled_dot_product", "embedding"},
    # passes/half.py FP32_KINDS
    Prop.FP32_SENSITIVE: {"softmax", "log_softmax", "layer_norm", "group_norm", "batch_norm",
                          "rms_norm", "sum", "mean", "cumsum", "exp", "log", "pow", "std",
                          "var", "prod", "vector_norm"},
    # passes/half.py CPU_FP32_KINDS (an empty hook)
    Prop.FP32_ONLY: set(),
    # quant/static.py _WEIGHTED
    Prop.WEIGHT_QUANT: {"conv", "linear"},
    # passes/fusion.py FOLD_INTO
    Prop.FOLD_INTO: {"conv", "conv_transpose", "linear"},
}
# categories: passes/half.py _PLUMBING and passes/constants.py _MAY_ALIAS
PLUMBING_CATEGORIES = {"shape", "layout", "index", "split", "concat", "shape_query", "cast",
                       "broadcast", "identity", "dropout", "check"}
MAY_ALIAS_CATEGORIES = {"shape", "layout", "index", "split", "broadcast", "cast", "identity"}


@pytest.mark.parametrize("prop", list(USED_TO_LIVE_IN_THE_PASSES), ids=str)
def test_the_table_holds_what_the_passes_used_to_list(prop) -> None:
    assert kinds_with(prop) == USED_TO_LIVE_IN_THE_PASSES[prop]


@pytest.mark.parametrize(("prop", "categories"), [(Prop.PLUMBING, PLUMBING_CATEGORIES),
                                                   (Prop.MAY_ALIAS, MAY_ALIAS_CATEGORIES)])
def test_plumbing_and_aliasing_come_from_the_category(prop, categories) -> None:
    assert {c for c, props in CATEGORY_PROPS.items() if prop in props} == categories
    for entry in ops.OP_TABLE:
        assert (prop in entry.props) == (entry.category in categories), entry.kind


def test_categories_are_an_enum_that_still_reads_as_text() -> None:
    entry = next(e for e in ops.OP_TABLE if e.kind == "layer_norm")
    assert entry.category is Category.NORM
    assert entry.category == "norm" and f"{entry.category}" == "norm"
    assert json.dumps({"category": entry.category}) == '{"category": "norm"}'
    assert all(isinstance(e.category, Category) for e in ops.OP_TABLE)
    node = fx.symbolic_trace(nn.Sequential(nn.LayerNorm(4))).graph.find_nodes(
        op="call_module")[0]
    assert op_of(node).category is Category.NORM


def test_a_typo_in_a_category_or_property_fails_at_registration() -> None:
    before = len(ops.OP_TABLE)
    with pytest.raises(SpecError, match=r"category 'nrom'.*did you mean 'norm'"):
        OpDef("my_norm", "nrom", functions=(torch.tanh,))
    with pytest.raises(SpecError, match=r"property 'comutative'.*did you mean 'commutative'"):
        OpDef("my_add", "elementwise", props=("comutative",))
    assert len(ops.OP_TABLE) == before


def test_an_entry_gets_its_category_defaults_plus_its_own() -> None:
    entry = OpDef("my_view", "layout", props=(Prop.COMMUTATIVE,))
    assert entry.props == {Prop.PLUMBING, Prop.MAY_ALIAS, Prop.COMMUTATIVE}
    assert OpDef("my_act", "activation").props == frozenset()
    assert OpDef("my_norm", Category.NORM, props=("fold_into",)).props == {
        Prop.FP32_SENSITIVE, Prop.FOLD_INTO}


def _swap(x, y):
    return y - x


torch.fx.wrap("_swap")


def test_has_prop_reads_nodes_and_views_and_registration_is_one_entry() -> None:
    class M(nn.Module):
        def forward(self, x):
            return _swap(x, x + 1) * 2

    gm = fx.symbolic_trace(M())
    by_target = {n.target: n for n in gm.graph.nodes}
    swap, mul = by_target[_swap], next(n for n in gm.graph.nodes if kind_of(n) == "mul")
    assert has_prop(mul, Prop.COMMUTATIVE) and has_prop(op_of(mul), Prop.COMMUTATIVE)
    assert not has_prop(swap, Prop.COMMUTATIVE) and not has_prop(by_target["x"], Prop.PLUMBING)
    with registered(OpDef("swap", "elementwise", functions=(_swap,), signature=("input", "other"),
                          props=(Prop.COMMUTATIVE,))):
        assert kind_of(swap) == "swap" and has_prop(swap, Prop.COMMUTATIVE)
        assert "swap" in kinds_with(Prop.COMMUTATIVE)
    assert kind_of(swap) == ops.OPAQUE and "swap" not in kinds_with(Prop.COMMUTATIVE)


def test_unregister_gives_a_target_back_to_the_entry_it_overrode() -> None:
    node = fx.symbolic_trace(nn.Sequential(nn.ReLU())).graph.find_nodes(op="call_module")[0]
    size = len(ops.OP_TABLE)
    entry = ops.register_op(OpDef("my_relu", "activation", modules=(nn.ReLU,)))
    assert kind_of(node) == "my_relu"
    unregister_op(entry)
    assert kind_of(node) == "relu" and len(ops.OP_TABLE) == size
    assert kind_of(fx.symbolic_trace(nn.Sequential(nn.Conv2d(1, 1, 1))).graph.find_nodes(
        op="call_module")[0]) == "conv"
    with pytest.raises(KeyError, match="not registered"):
        unregister_op(entry)


def test_registered_cleans_up_when_the_block_raises() -> None:
    size = len(ops.OP_TABLE)
    with pytest.raises(RuntimeError), registered(OpDef("my_norm", "norm")):
        assert len(ops.OP_TABLE) == size + 1
        raise RuntimeError("boom")
    assert len(ops.OP_TABLE) == size
