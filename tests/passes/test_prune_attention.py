"""Attention heads: ``nn.MultiheadAttention`` in a symbolic capture is replaced by its
functional form (linear + chunk + view + sdpa + out_proj) and prunes whole heads, exactly
as its ATen decomposition does under torch.export; a configuration the rewrite does not
cover is kept whole with the reason; grouped-query attention keeps its ratio."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.ops import fetch_attr
from fxopt.passes.prune.attention import decompose_attention
from fxopt.prune import masked_twin
from fxopt.verify import EXACT, compare_outputs

MODES = ("symbolic", "export")


def _prune(model, inputs, mode, spec="prune(ratio=0.5)"):
    res = fxopt.optimize(model, inputs, spec, mode=mode)
    return res, json.loads(json.dumps(res.report.records[-1].stats, default=str))


def _check_twin(model, res, plan, inputs):
    with torch.no_grad():
        got, want = res.module(*inputs), masked_twin(model, plan)(*inputs)
        original = model(*inputs)
    assert compare_outputs(want, got, EXACT).ok(EXACT)
    assert not compare_outputs(original, got, EXACT).ok(EXACT)


def _head_groups(plan, block):
    key = f"blocks.{block}.attn.in_proj_weight"
    return [g for g in plan if any(m["param"] == key for m in g["members"])]


def test_transformer_prunes_whole_heads_symbolic():
    model, inputs = zoo.load("transformer")
    model.eval()
    res, stats = _prune(model, inputs, "symbolic")
    plan = stats["plan"]
    embed, heads = 64, 4
    hd = embed // heads
    for block in (0, 1):
        (g,) = _head_groups(plan, block)
        m = {x["param"]: x for x in g["members"]}
        rows = m[f"blocks.{block}.attn.in_proj_weight"]
        cols = m[f"blocks.{block}.attn.out_proj.weight"]
        assert (rows["role"], rows["dim"], cols["role"], cols["dim"]) == (
            "producer", 0, "consumer", 1)
        gone = sorted({i // hd for i in cols["indices"]})
        assert len(gone) == heads // 2 and g["removed_units"] == heads // 2
        whole = [h * hd + j for h in gone for j in range(hd)]
        assert cols["indices"] == whole  # whole heads of out_proj's columns
        # the same heads of q, k and v (rows at offsets 0, E, 2E of the packed weight)
        assert rows["indices"] == [o + i for o in (0, embed, 2 * embed) for i in whole]
        assert m[f"blocks.{block}.attn.in_proj_bias"]["indices"] == rows["indices"]
    sdpa = [n for n in res.module.graph.nodes if "scaled_dot_product" in str(n.target)]
    assert len(sdpa) == 2
    for n in sdpa:
        q, out = n.args[0].meta["shape"], n.meta["shape"]
        assert q[1] == out[1] == heads // 2 and q[-1] == hd  # fewer heads, same head_dim
    assert [d["module"] for d in stats["attention"]["decomposed"]] == [
        "blocks.0.attn", "blocks.1.attn"]
    attn = res.module.get_submodule("blocks.0.attn")
    assert not isinstance(attn, nn.MultiheadAttention)  # a container of the weights
    assert attn.in_proj_weight.shape == (3 * embed // 2, embed)
    assert attn.out_proj.in_features == embed // 2 == attn.out_proj.weight.shape[1]
    assert attn.out_proj.out_features == embed  # the residual width stays
    fresh = (torch.randint(0, 100, (3, 12)),)
    _check_twin(model, res, plan, fresh)


def test_transformer_export_keeps_heads_with_a_reason_and_equals_its_twin():
    """torch.export decomposes MultiheadAttention into q/k/v ``select``s of an unflatten
    and a (batch * heads) view: the heads block, with the op that blocks them named; the
    MLP widths still prune and equal the masked twin (tests/passes/test_prune.py)."""
    model, inputs = zoo.load("transformer")
    res, stats = _prune(model.eval(), inputs, "export")
    assert not _head_groups(stats["plan"], 0) and stats["plan"]
    refused = [r for r in stats["refused"]
               if any("in_proj_weight" in k for k in r["members"])]
    assert refused and all(r["reasons"] for r in refused)
    _check_twin(model, res, stats["plan"], (torch.randint(0, 100, inputs[0].shape),))


class _Attn(nn.Module):
    """Linear -> MultiheadAttention (sequence-first or batch-first) -> residual -> head."""

    def __init__(self, batch_first: bool, mask: bool = False):
        super().__init__()
        self.inp, self.out = nn.Linear(6, 24), nn.Linear(24, 5)
        self.attn = nn.MultiheadAttention(24, 3, batch_first=batch_first)
        self.mask = mask

    def forward(self, x):
        h = self.inp(x)
        pad = torch.zeros(h.shape[:2], dtype=torch.bool) if self.mask else None
        if not self.attn.batch_first:
            pad = pad.t() if pad is not None else None
        a = self.attn(h, h, h, need_weights=True, key_padding_mask=pad)[0]
        return self.out(torch.relu(h + a))


@pytest.mark.parametrize("batch_first", [True, False])
def test_sequence_first_and_batch_first_rewrites_equal_the_module(batch_first):
    torch.manual_seed(0)
    model, x = _Attn(batch_first).eval(), torch.randn(2, 7, 6)
    gm = fxopt.capture(model, (x,), mode="symbolic")
    new, done, kept = decompose_attention(gm, (x,))
    assert done == [{"module": "attn", "heads": 3, "head_dim": 8}] and not kept
    assert not any(isinstance(m, nn.MultiheadAttention) for m in new.modules())
    assert any(isinstance(m, nn.MultiheadAttention) for m in gm.modules())  # gm untouched
    fresh = torch.randn(4, 5, 6)
    with torch.no_grad():
        torch.testing.assert_close(new(fresh), model(fresh), rtol=1e-5, atol=1e-6)
    res, stats = _prune(model, (x,), "symbolic", "prune(ratio=0.34)")
    (g,) = [g for g in stats["plan"] if any(m["param"] == "attn.out_proj.weight"
                                            and m["role"] == "consumer" for m in g["members"])]
    assert g["removed_units"] == 1 and g["units"] == 3  # one whole head of three
    _check_twin(model, res, stats["plan"], (fresh,))


def test_a_configuration_the_rewrite_does_not_cover_is_kept_whole_with_the_reason():
    torch.manual_seed(0)
    model, x = _Attn(True, mask=True).eval(), torch.randn(2, 7, 6)
    gm = fxopt.capture(model, (x,), mode="symbolic")
    new, done, kept = decompose_attention(gm, (x,))
    assert new is gm and not done and kept == {"attn": "a key_padding_mask is not decomposed"}
    (g,) = [g for g in fxopt.prune.groups(gm) if any(m.param == "attn.out_proj.weight"
                                                      for m in g.members)] or [None]
    assert g is None  # out_proj stays inside the module: no group of its own
    (g,) = [g for g in fxopt.prune.groups(gm) if any(m.param == "inp.weight"
                                                      for m in g.members)]
    assert any("kept whole: a key_padding_mask is not decomposed" in r for r in g.reasons)
    with pytest.raises(fxopt.PassError, match="nothing in this model can be pruned"):
        _prune(model, (x,), "symbolic")


class _Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Linear(4, 8), nn.Linear(8, 4), nn.Linear(8, 3)

    def forward(self, x):
        return self.c(torch.relu(self.a(x)) + self.a(self.b(torch.relu(self.a(x)))))


def test_a_module_called_on_two_groups_blocks_both_naming_the_weight():
    gm = fxopt.capture(_Twice().eval(), (torch.randn(2, 4),), mode="symbolic")
    shared = [g for g in fxopt.prune.groups(gm)
              if any(m.param == "a.weight" and m.dim == 0 for m in g.members)]
    assert all(not g.prunable for g in shared)
    assert any("a weight shared by several calls" in r for g in shared for r in g.reasons)


def test_raw_capture_groups_say_prune_replaces_the_module():
    model, inputs = zoo.load("transformer")
    gm = fxopt.capture(model.eval(), inputs, mode="symbolic")
    reasons = [r for g in fxopt.prune.groups(gm) for r in g.reasons]
    assert any("prune() replaces it by linear + sdpa + linear" in r for r in reasons)


@pytest.mark.parametrize("mode", MODES)
def test_gqa_heads_keep_the_query_per_kv_ratio_in_both_forms(mode):
    model, inputs = zoo.load("gqa")
    res, stats = _prune(model, inputs, mode)
    sd = model.state_dict()
    (g,) = [g for g in stats["plan"] if any(m["param"] == "blocks.0.attn.k_proj.weight"
                                            for m in g["members"])]
    m = {x["param"]: x for x in g["members"]}
    q, k = m["blocks.0.attn.q_proj.weight"], m["blocks.0.attn.k_proj.weight"]
    assert len(q["indices"]) == 2 * len(k["indices"]) > 0  # two query heads per kv head
    kept_q = sd["blocks.0.attn.q_proj.weight"].shape[0] - len(q["indices"])
    kept_k = sd["blocks.0.attn.k_proj.weight"].shape[0] - len(k["indices"])
    assert kept_q == 2 * kept_k
    _check_twin(model, res, stats["plan"], zoo.get("gqa").make_inputs(3))


class _BiasedHeads(nn.Module):
    """Swin-style attention: a per-head bias gathered from a table by a position index,
    passed to SDPA as the mask."""

    def __init__(self, dim=16, heads=4, n=6):
        super().__init__()
        self.heads, self.n = heads, n
        self.inp, self.out = nn.Linear(5, dim), nn.Linear(dim, 3)
        self.q, self.k, self.v, self.o = (nn.Linear(dim, dim) for _ in range(4))
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads))
        pos = torch.arange(n)
        self.register_buffer("index", (pos[:, None] - pos[None, :] + n - 1).reshape(-1))

    def forward(self, x):
        h = self.inp(x)
        b, s, _ = h.shape
        q, k, v = (p(h).view(b, s, -1, 4).transpose(1, 2) for p in (self.q, self.k, self.v))
        bias = self.table[self.index].view(self.n, self.n, -1).permute(2, 0, 1).unsqueeze(0)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return self.out(h + self.o(a.transpose(1, 2).reshape(b, s, -1)))


@pytest.mark.parametrize("mode", MODES)
def test_a_gathered_per_head_bias_loses_the_pruned_heads(mode):
    torch.manual_seed(0)
    model, x = _BiasedHeads().eval(), torch.randn(2, 6, 5)
    gm = fxopt.capture(model, (x,), mode=mode)
    (g,) = [g for g in fxopt.prune.groups(gm)
            if any((m.param, m.dim) == ("q.weight", 0) for m in g.members)]
    assert g.prunable and g.n_units == 4
    roles = {(m.param, m.dim): m.role for m in g.members}
    assert roles[("table", 1)] == "passthrough" and roles[("o.weight", 1)] == "consumer"
    res, stats = _prune(model, (x,), mode)
    (entry,) = [e for e in stats["plan"] if any(m["param"] == "table" for m in e["members"])]
    (table,) = [m for m in entry["members"] if m["param"] == "table"]
    assert entry["removed_units"] == 2 and len(table["indices"]) == 2
    assert fetch_attr(res.module, table["attr"]).shape == (11, 2)  # the table lost 2 heads
    _check_twin(model, res, stats["plan"], (torch.randn(2, 6, 5),))


def test_pruned_heads_lower_to_eager_and_onnx(tmp_path):
    pytest.importorskip("onnxruntime")
    model, inputs = zoo.load("transformer")
    res = fxopt.optimize(model.eval(), inputs, "prune(ratio=0.5),default", mode="symbolic")
    eager = fxopt.load(fxopt.lower(res.module, "eager", inputs, path=tmp_path / "m").path)
    with torch.no_grad():
        torch.testing.assert_close(eager(*inputs), res.module(*inputs), rtol=1e-5, atol=1e-5)
    art = fxopt.lower(res.module, "onnx", inputs, path=tmp_path / "m.onnx")
    assert all(c["max_rel"] <= 1e-4 for c in art.manifest["verified"].values())
