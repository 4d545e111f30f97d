"""Channel-flow rules (fxopt/op_flow.py) as op-table data: every entry names a known rule or
none, and each rule maps indices as declared (checked on captured nodes of both forms)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import fxopt
from fxopt.op_flow import FLOW_RULES
from fxopt.ops import OP_TABLE, OpDef, op_of, registered

MODES = ("symbolic", "export")


def test_every_table_entry_names_a_known_rule_or_blocks():
    assert all(e.flow is None or e.flow in FLOW_RULES for e in OP_TABLE)
    kinds = {e.kind: e.flow for e in OP_TABLE}
    assert kinds["relu"] == kinds["add"] == "same_index"
    assert kinds["cat"] == "concat" and kinds["conv"] == "conv"
    assert kinds["group_norm"] is None  # not declared: block
    assert kinds["attention"] == "mha_module"  # blocks, saying prune decomposes it
    assert kinds["vector_norm"] == "over_dim"


def my_act(x):
    return x.clamp(min=0) * 2


torch.fx.wrap("my_act")


def test_a_new_op_declares_its_flow_in_its_entry():
    gm = fxopt.capture(_Seq(my_act), (torch.randn(1, 3, 4, 4),), mode="symbolic")
    assert any("declares no channel flow" in r for g in fxopt.prune.groups(gm) for r in g.reasons)
    with registered(OpDef("my_act", "activation", functions=(my_act,), flow="same_index")):
        gs = fxopt.prune.groups(fxopt.capture(_Seq(my_act), (torch.randn(1, 3, 4, 4),),
                                              mode="symbolic"))
        assert any(g.prunable for g in gs)


class _Seq(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 2, 1)

    def forward(self, x):
        return self.b(my_act(self.a(x)))


class _Plumbing(nn.Module):
    def forward(self, x, y):
        c = torch.cat([x, y], 1)  # (2, 5, 3)
        t = c.transpose(1, 2)  # (2, 3, 5)
        return t.reshape(2, 3, 5, 1).flatten(1)  # (2, 15)


def _node(gm, kind):
    return next(n for n in gm.graph.nodes if n.op.startswith("call") and op_of(n).kind == kind)


@pytest.mark.parametrize("mode", MODES)
def test_cat_offsets_transpose_moves_and_flatten_blocks(mode):
    gm = fxopt.capture(_Plumbing(), (torch.randn(2, 2, 3), torch.randn(2, 3, 3)), mode=mode)
    cat = _node(gm, "cat")
    flow = FLOW_RULES["concat"](op_of(cat))
    on_dim = [link for link in flow.links if link.a[1] == 1]
    assert [link.pairs[:, 1].tolist() for link in on_dim] == [[0, 1], [2, 3, 4]]
    tr = _node(gm, "transpose")
    moved = {(link.a[1], link.b[1]) for link in FLOW_RULES["axis_move"](op_of(tr)).links}
    assert moved == {(0, 0), (1, 2), (2, 1)}
    last = [n for n in gm.graph.nodes if n.op.startswith("call")][-1]
    flow = FLOW_RULES["reshape"](op_of(last))
    merged = [link for link in flow.links if link.pairs is not None]
    assert len(merged) == 1 and merged[0].a[1] == 1  # the output's merged axis 1 ...
    assert np.array_equal(merged[0].pairs[:, 1], np.arange(15) // 5)  # ... in blocks of 5
    assert any("mixes this axis" in r for r in flow.blocks.values())
