"""fxopt.prune.groups: one test per coupling kind, in both capture forms, on the zoo and on
small hand-built modules: the members (state_dict key, dim, role) of the group, its number
of channel units, and for refused groups the reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.prune import groups

MODES = ("symbolic", "export")


def _groups(model, inputs, mode, **kw):
    return groups(fxopt.capture(model.eval(), inputs, mode=mode), **kw)


def _with(gs, param, dim=None, role=None):
    """The one group holding member ``param`` (with ``dim`` / ``role`` if given)."""
    hits = [g for g in gs if any(m.param == param and (dim is None or m.dim == dim)
                                 and (role is None or m.role == role) for m in g.members)]
    assert len(hits) == 1, (param, [g.members for g in hits])
    return hits[0]


def _roles(group):
    return {(m.param, m.dim): m.role for m in group.members}


@pytest.mark.parametrize("mode", MODES)
def test_residual_add_couples_both_producers_and_every_consumer(mode):
    gs = _groups(*zoo.load("resnet"), mode)
    g = _with(gs, "layer1.conv2.weight", 0)
    roles = _roles(g)
    assert roles[("stem.0.weight", 0)] == "producer"  # the identity branch of the add
    assert roles[("layer1.conv2.weight", 0)] == "producer"
    assert roles[("layer1.conv1.weight", 1)] == "consumer"
    assert roles[("layer2.conv1.weight", 1)] == "consumer"
    assert roles[("layer1.bn2.running_var", 0)] == "passthrough"
    assert g.prunable and g.n_units == 16


@pytest.mark.parametrize("mode", MODES)
def test_cat_offsets_join_every_producer_of_the_concatenation(mode):
    model, inputs = zoo.load("densenet")
    gs = _groups(model, inputs, mode)
    block = model.block1 if hasattr(model, "block1") else None
    g = _with(gs, "fc.weight", 1, "consumer")
    producers = [m for m in g.members if m.role == "producer" and m.param.endswith("weight")]
    assert len(producers) >= 2  # the block input and the dense layers feeding the last cat
    assert g.prunable
    fc_in = model.fc.in_features
    assert g.n_units == fc_in
    del block


@pytest.mark.parametrize("mode", MODES)
def test_depthwise_conv_passes_channels_through(mode):
    model, inputs = zoo.load("mobilenet")
    gs = _groups(model, inputs, mode)
    dw = [n for n, m in model.named_modules()
          if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels]
    assert dw
    g = _with(gs, f"{dw[0]}.weight", 0)
    assert _roles(g)[(f"{dw[0]}.weight", 0)] == "passthrough"
    assert any(r == "producer" for r in _roles(g).values())
    assert any(r == "consumer" for r in _roles(g).values())
    assert g.prunable


class _Grouped(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.g = nn.Conv2d(8, 12, 3, padding=1, groups=4)
        self.b = nn.Conv2d(12, 5, 1)

    def forward(self, x):
        return self.b(torch.relu(self.g(torch.relu(self.a(x)))))


@pytest.mark.parametrize("mode", MODES)
def test_grouped_conv_prunes_whole_groups(mode):
    gs = _groups(_Grouped(), (torch.randn(1, 3, 6, 6),), mode)
    g = _with(gs, "a.weight", 0)
    assert g.n_units == 4  # one unit per conv group: 2 input and 3 output channels each
    assert _roles(g)[("g.weight", 0)] == "passthrough"
    assert _roles(g)[("b.weight", 1)] == "consumer"


@pytest.mark.parametrize("mode", MODES)
def test_channel_shuffle_pairs_channel_k_of_every_shuffle_group(mode):
    model, inputs = zoo.load("shufflenet")
    gs = _groups(model, inputs, mode)
    # the cat feeding the first shuffle joins branch1 and branch2's last convs
    g = _with(gs, "stage2.0.branch1.1.0.weight", 0)
    assert g.prunable, g.reasons
    roles = _roles(g)
    assert roles[("stage2.0.branch2.2.0.weight", 0)] == "producer"
    half = model.stage2[0].branch2[2][0].out_channels
    b1 = next(ax for ax in g.units if ax[0] == _conv_output(g, "stage2.0.branch1.1.0"))
    b2 = next(ax for ax in g.units if ax[0] == _conv_output(g, "stage2.0.branch2.2.0"))
    # view(b, 2, c/2) -> transpose -> view: channel k of both halves is one unit
    assert g.units[b1].tolist() == g.units[b2].tolist() and len(g.units[b1]) == half
    assert all(g.prunable for g in gs if not any("graph output" in r for r in g.reasons))


def _conv_output(g, path):
    p = next(p for p in g.params if p.view is not None and p.name == "weight"
             and (p.view.node.meta.get("fxopt_module_path") == path))
    return p.view.node.name


class _FlatLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 2 * 2, 5)

    def forward(self, x):
        return self.fc(torch.flatten(F.max_pool2d(self.conv(x), 2), 1))


@pytest.mark.parametrize("mode", MODES)
def test_flatten_to_linear_maps_a_channel_to_a_block_of_columns(mode):
    gs = _groups(_FlatLinear(), (torch.randn(2, 3, 4, 4),), mode)
    g = _with(gs, "conv.weight", 0)
    assert _roles(g)[("fc.weight", 1)] == "consumer"
    assert g.n_units == 4
    fc_axis = next(ax for ax in g.units if len(g.units[ax]) == 16)
    assert g.units[fc_axis].tolist() == [u for u in g.units[fc_axis][::4] for _ in range(4)]


@pytest.mark.parametrize("mode", MODES)
def test_conv_transpose_produces_on_weight_dim_1(mode):
    model, inputs = zoo.load("decoder")
    gs = _groups(model, inputs, mode)
    ct = [n for n, m in model.named_modules() if isinstance(m, nn.ConvTranspose2d)]
    assert ct
    g = _with(gs, f"{ct[0]}.weight", 1, "producer")
    assert g.prunable
    # its input channels are consumed on dim 0
    assert any(m.param == f"{ct[0]}.weight" and m.dim == 0 and m.role == "consumer"
               for h in gs for m in h.members)


@pytest.mark.parametrize("mode", MODES)
def test_attention_heads_with_grouped_query_ratio(mode):
    gs = _groups(*zoo.load("gqa"), mode)
    g = _with(gs, "blocks.0.attn.q_proj.weight", 0)
    roles = _roles(g)
    for proj in ("q_proj", "k_proj", "v_proj"):
        assert roles[(f"blocks.0.attn.{proj}.weight", 0)] == "producer"
    assert roles[("blocks.0.attn.out_proj.weight", 1)] == "consumer"
    assert g.n_units == 2  # one unit per kv head, carrying its two query heads
    q_axis = [ax for ax, labels in g.units.items() if len(labels) == 64]
    assert q_axis and all(len(set(g.units[ax][:32])) == 1 for ax in q_axis)
    # the residual width sits under RMSNorm statistics: refused, and said so
    res = _with(gs, "blocks.0.attn.out_proj.weight", 0)
    assert not res.prunable and any("mixes channels" in r for r in res.reasons)


@pytest.mark.parametrize("mode", MODES)
def test_layer_norm_and_output_reasons(mode):
    gs = _groups(*zoo.load("transformer"), mode)
    head = _with(gs, "head.weight", 0)
    assert any("graph output" in r for r in head.reasons)
    mlp = _with(gs, "blocks.0.mlp.0.weight", 0)
    assert mlp.prunable and _roles(mlp)[("blocks.0.mlp.3.weight", 1)] == "consumer"
    assert any("normalizes over axis" in r for g in gs for r in g.reasons)


def _roll(x):
    return torch.roll(x, 1, 1)


class _Opaque(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 6, 1)
        self.b = nn.Conv2d(6, 2, 1)

    def forward(self, x):
        return self.b(torch.roll(self.a(x), 1, 1))


@pytest.mark.parametrize("mode", MODES)
def test_an_op_without_a_flow_rule_blocks_and_names_itself(mode):
    gs = _groups(_Opaque(), (torch.randn(1, 3, 4, 4),), mode)
    g = _with(gs, "a.weight", 0)
    assert not g.prunable
    assert any("roll" in r and "declares no channel flow" in r for r in g.reasons)


def test_skip_marks_the_groups_it_touches():
    gs = _groups(*zoo.load("mlp"), "symbolic", skip=["net.3"])
    assert not _with(gs, "net.0.weight", 0).prunable
    assert "skip" in _with(gs, "net.0.weight", 0).reasons[-1]
    assert not _with(gs, "net.3.weight", 0).prunable


class _MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 3)
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        h = self.a(x)
        return self.b(self.attn(h, h, h, need_weights=False)[0] + h)


def test_an_undeclared_tuple_op_blocks_its_pieces_but_its_aten_parts_prune():
    model, x = _MHA().eval(), torch.randn(2, 5, 8)
    gs = _groups(model, (x,), "symbolic")
    g = _with(gs, "a.weight", 0)
    assert not g.prunable
    assert any("attn returns a tuple" in r for r in g.reasons)
    gs = _groups(model, (x,), "export")  # decomposed: in_proj columns and out_proj rows
    g = _with(gs, "a.weight", 0)
    assert g.prunable and _roles(g)[("attn.in_proj_weight", 1)] == "consumer"
    assert _roles(g)[("attn.out_proj.weight", 0)] == "producer"
