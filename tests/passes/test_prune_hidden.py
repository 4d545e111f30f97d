"""prune(hidden=True): the residual / embedding width, which sits under LayerNorm / RMSNorm
statistics, is refused by default and pruned only when asked, marked ``"exact": false``;
the model still runs with consistent shapes and lowers to ONNX."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import fxopt
from fxopt import PassError, zoo
from fxopt.ops import fetch_attr
from fxopt.zoo.transformers import GQABlock


class EmbeddedGQA(nn.Module):
    """Token ids -> embedding -> the zoo's GQA blocks (written-out RMSNorm) -> LayerNorm ->
    a linear head: the hidden width is no graph input, so only the norms hold it."""

    def __init__(self, vocab: int = 50, dim: int = 32) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.Sequential(GQABlock(dim, 4, 2), GQABlock(dim, 4, 2))
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.blocks(self.embed(ids))))


def _embedded_gqa():
    torch.manual_seed(0)
    return EmbeddedGQA().eval(), (torch.randint(0, 50, (2, 8)),)


def _prune(model, inputs, mode, hidden):
    res = fxopt.optimize(model, inputs, f"prune(ratio=0.5,hidden={hidden})", mode=mode)
    return res, json.loads(json.dumps(res.report.records[-1].stats, default=str))


def _hidden_group(plan, key):
    return [g for g in plan if any(m["param"] == key for m in g["members"])]


CASES = [("transformer", "export", "embed.weight"), ("transformer", "symbolic", "embed.weight"),
         ("embedded_gqa", "symbolic", "embed.weight"), ("embedded_gqa", "export", "embed.weight")]


def _load(name):
    if name == "embedded_gqa":
        return _embedded_gqa()
    model, inputs = zoo.load(name)
    return model.eval(), inputs


@pytest.mark.parametrize(("name", "mode", "embed"), CASES)
def test_hidden_false_keeps_the_width_and_says_why(name, mode, embed):
    model, inputs = _load(name)
    gm = fxopt.capture(model, inputs, mode=mode)
    gm = fxopt.prune.decompose_attention(gm, inputs)[0]  # what the pass groups on
    (refused,) = [g for g in fxopt.prune.groups(gm) if any(m.param == embed for m in g.members)]
    assert not refused.prunable and refused.exact
    assert any("normalizes over axis" in r or "mixes channels" in r for r in refused.reasons)
    assert any("hidden=True" in r for r in refused.reasons)
    (asked,) = [g for g in fxopt.prune.groups(gm, hidden=True)
                if any(m.param == embed for m in g.members)]
    assert asked.prunable and not asked.exact and asked.as_dict()["exact"] is False
    res, stats = _prune(model, inputs, mode, False)
    assert not _hidden_group(stats["plan"], embed) and stats["plan"]
    assert "not_exact" not in stats and all(g["exact"] is True for g in stats["plan"])
    widths = {m["param"]: m for g in stats["plan"] for m in g["members"]}
    assert embed not in widths  # the embedding keeps every column


@pytest.mark.parametrize(("name", "mode", "embed"), CASES)
def test_hidden_true_shrinks_the_residual_width_not_exact(name, mode, embed, tmp_path):
    pytest.importorskip("onnxruntime")
    model, inputs = _load(name)
    sd = model.state_dict()
    res, stats = _prune(model, inputs, mode, True)
    (group,) = _hidden_group(stats["plan"], embed)
    assert group["exact"] is False and group["removed_units"] == sd[embed].shape[1] // 2
    assert stats["not_exact"]["groups"] == [group["group"]]
    assert "verified only to run" in stats["not_exact"]["note"]
    assert all(g["exact"] is True for g in stats["plan"] if g is not group)
    members = {m["param"]: m for m in group["members"]}
    norms = [k for k in sd if "norm" in k and sd[k].dim() == 1]
    linears = [k for k, v in sd.items() if v.dim() == 2 and k != embed
               and sd[embed].shape[1] in v.shape]
    assert norms and linears
    assert set(norms) <= set(members)  # every LayerNorm / RMSNorm weight and bias
    assert set(linears) <= set(members)  # every linear reading or writing the residual
    roles = {m["role"] for m in group["members"]}
    assert roles == {"producer", "consumer", "passthrough"}
    for m in group["members"]:  # each member physically shrank by its removed indices
        got = fetch_attr(res.module, m["attr"]).shape[m["dim"]]
        assert got == sd[m["param"]].shape[m["dim"]] - len(m["indices"]) > 0
    fresh = (torch.randint(0, 50, inputs[0].shape),)
    with torch.no_grad():
        out, want = res.module(*fresh), model(*fresh)
    assert out.shape == want.shape and torch.isfinite(out).all()
    assert not torch.allclose(out, want)  # not exact: the statistics changed
    art = fxopt.lower(res.module, "onnx", inputs, path=tmp_path / "m.onnx")
    assert all(c["max_rel"] <= 1e-4 for c in art.manifest["verified"].values())


def test_gqa_hidden_width_is_the_graph_input():
    """The zoo GQA reads the hidden width from its input, so hidden=True cannot prune it."""
    model, inputs = zoo.load("gqa")
    _, stats = _prune(model, inputs, "export", True)
    assert "not_exact" not in stats and all(g["exact"] for g in stats["plan"])
    refused = [r for r in stats["refused"] if any("norm" in k for k in r["members"])]
    assert refused and any("graph input" in why for r in refused for why in r["reasons"])


def test_hidden_must_be_a_bool():
    model, inputs = _embedded_gqa()
    with pytest.raises(PassError, match="hidden must be True or False"):
        fxopt.optimize(model, inputs, "prune(hidden=2)")
