"""The prune pass: every zoo model at ratio=0.5 in both capture forms equals its masked
twin, rebuilt here from the plan alone on the user's original model (state_dict keys,
dims, roles, indices); options honoured; bad input gives typed errors and leaves the
model untouched."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxopt
from fxopt import PassError, SpecError, zoo
from fxopt.prune import masked_twin
from fxopt.verify import EXACT, compare_outputs

MODES = ("symbolic", "export")
ZOO_CASES = [(n, m) for n in zoo.names() for m in MODES if m == "export" or zoo.get(n).symbolic]


def _prune(model, inputs, mode="symbolic", spec="prune(ratio=0.5)"):
    res = fxopt.optimize(model, inputs, spec, mode=mode)
    return res, res.report.records[-1].stats


@pytest.mark.parametrize(("name", "mode"), ZOO_CASES)
def test_every_zoo_model_equals_its_masked_twin(name, mode):
    model, inputs = zoo.load(name)
    before = copy.deepcopy(model.state_dict())
    res, stats = _prune(model, inputs, mode)
    plan = json.loads(json.dumps(stats["plan"]))  # JSON, and used only as JSON from here on
    assert plan and res.report.records[-1].modified
    res.module.graph.lint()
    assert res.report.records[-1].params[1] < res.report.records[-1].params[0]
    keys = set(model.state_dict())
    assert all(m["param"] in keys for g in plan for m in g["members"])
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    fresh = zoo.get(name).make_inputs(3 if zoo.get(name).dynamic_batch else zoo.get(name).batch)
    with torch.no_grad():
        got = res.module(*fresh)
        want = masked_twin(model, plan)(*fresh)
        original = model(*fresh)
    assert compare_outputs(want, got, EXACT).ok(EXACT)
    assert not compare_outputs(original, got, EXACT).ok(EXACT)  # pruning did change it
    for g in plan:  # every pruned group removes producer rows and never all of them
        assert g["removed_units"] > 0 and g["exact"] is True
        assert any(m["role"] == "producer" and m["indices"] for m in g["members"])
        for m in g["members"]:
            size = model.state_dict()[m["param"]].shape[m["dim"]]
            assert len(m["indices"]) < size and max(m["indices"], default=0) < size


def test_round_to_and_max_layer_ratio():
    model, inputs = zoo.load("resnet")
    _, stats = _prune(model, inputs, spec="prune(ratio=0.6,round_to=8)")
    for g in stats["plan"]:
        assert (g["units"] - g["removed_units"]) % 8 == 0
    _, stats = _prune(model, inputs, spec="prune(ratio=0.9,max_layer_ratio=0.25)")
    for g in stats["plan"]:
        assert g["removed_units"] <= 0.25 * g["units"]


def test_skip_leaves_those_layers_whole():
    model, inputs = zoo.load("resnet")
    _, stats = _prune(model, inputs, spec="prune(ratio=0.5,skip=['layer1.*'])")
    params = {m["param"] for g in stats["plan"] for m in g["members"]}
    assert params and not any(p.startswith("layer1.") for p in params)
    assert any("skip" in r for g in stats["refused"] for r in g["reasons"])
    with pytest.raises(PassError, match="names no layer"):
        _prune(model, inputs, spec="prune(ratio=0.5,skip=['layer9.*'])")


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "random"])
@pytest.mark.parametrize("scope", ["local", "global"])
def test_importances_and_scopes_verify(importance, scope, zoo_case):
    # the session's export capture (a private copy), not a torch.export per combination
    _, inputs, gm = zoo_case("mobilenet", "export")
    _, stats = _prune(gm, inputs, spec=f"prune(ratio=0.4,importance={importance},scope={scope})")
    assert stats["plan"] and stats["twin_error"] < 1e-4


def test_gqa_heads_keep_the_query_per_kv_ratio():
    model, inputs = zoo.load("gqa")
    res, stats = _prune(model, inputs, spec="prune(ratio=0.5)")
    attn = res.module.get_submodule("blocks.0.attn")
    assert attn.q_proj.out_features == 2 * attn.k_proj.out_features == 32
    assert attn.out_proj.in_features == 32


def test_ratio_zero_changes_nothing():
    model, inputs = zoo.load("mlp")
    res, stats = _prune(model, inputs, spec="prune(ratio=0)")
    assert res.report.records[-1].modified is False and stats["plan"] == []


@pytest.mark.parametrize("spec", ["prune(ratio=1.0)", "prune(ratio=-0.1)",
                                  "prune(importance=taylorr)", "prune(scope=everywhere)",
                                  "prune(round_to=0)"])
def test_bad_options_are_pass_errors(spec):
    model, inputs = zoo.load("mlp")
    with pytest.raises((PassError, SpecError)):
        _prune(model, inputs, spec=spec)


def test_nothing_prunable_says_why_per_group():
    model = nn.Sequential(nn.Linear(4, 3))
    with pytest.raises(PassError, match="reaches the graph output"):
        _prune(model, (torch.randn(2, 4),))


@pytest.mark.parametrize("mode", MODES)
def test_plan_replay_gives_the_same_graph(mode, tmp_path):
    model, inputs = zoo.load("densenet")
    res, stats = _prune(model, inputs, mode, spec="prune(ratio=0.4,importance=l2)")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(stats["plan"]))
    again, stats2 = _prune(model, inputs, mode, spec=f"prune(plan={str(path)!r})")
    assert stats2["plan"] == stats["plan"]
    assert again.module.code == res.module.code
    a, b = res.module.state_dict(), again.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_plan_for_another_model_is_refused(tmp_path):
    model, inputs = zoo.load("resnet")
    _, stats = _prune(model, inputs)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(stats["plan"]))
    other, other_inputs = zoo.load("mobilenet")
    with pytest.raises(PassError, match="another model"):
        _prune(other, other_inputs, spec=f"prune(plan={str(path)!r})")
    with pytest.raises(PassError, match="does not exist"):
        _prune(model, inputs, spec=f"prune(plan={str(tmp_path / 'missing.json')!r})")
    assert not list(tmp_path.glob("*.onnx"))


@pytest.mark.parametrize(("name", "mode"), [("resnet", "symbolic"), ("mobilenet", "export"),
                                            ("gqa", "symbolic")])
def test_mac_target_is_reached_and_reported(name, mode):
    model, inputs = zoo.load(name)
    res, stats = _prune(model, inputs, mode, spec="prune(macs=0.6,scope=global)")
    before, after = res.report.records[-1].macs
    assert abs(after / before - 0.6) <= 0.03
    assert abs(stats["macs_kept"] - after / before) < 1e-6


def test_an_unreachable_mac_target_is_a_pass_error():
    model, inputs = zoo.load("transformer")  # heads and MLP widths prune, the width stays
    with pytest.raises(PassError, match="no ratio keeps"):
        _prune(model, inputs, spec="prune(macs=0.1)")


@pytest.mark.parametrize(("name", "mode"), [("resnet", "symbolic"), ("gqa", "export")])
def test_pruned_then_default_lowers_to_onnx_and_eager(name, mode, tmp_path):
    pytest.importorskip("onnxruntime")
    model, inputs = zoo.load(name)
    res = fxopt.optimize(model, inputs, "prune(ratio=0.5),default", mode=mode)
    art = fxopt.lower(res.module, "onnx", inputs, path=tmp_path / "m.onnx")
    assert all(c["max_rel"] <= 1e-4 for c in art.manifest["verified"].values())
    eager = fxopt.lower(res.module, "eager", inputs, path=tmp_path / "eager")
    loaded = fxopt.load(tmp_path / "eager")
    with torch.no_grad():
        assert compare_outputs(res.module(*inputs), loaded(*inputs)).ok()
        assert compare_outputs(res.module(*inputs), eager(*inputs)).ok()
    stored = sum(t.numel() for t in loaded.module.state_dict().values())  # the smaller weights
    assert stored < 0.8 * sum(t.numel() for t in model.state_dict().values())


class _InPlaceResidual(nn.Module):
    """``y += shortcut(x)`` as Hugging Face ResNet/RegNet write it: torch.export keeps the
    in-place ``aten.add_``, which must couple the two branches like ``add``."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(8, 16, 1)
        self.head = nn.Conv2d(16, 4, 1)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        y = self.a(h)
        y += self.b(h)
        return self.head(torch.relu(y))


def test_in_place_add_couples_a_residual_in_both_capture_forms():
    torch.manual_seed(0)
    model, x = _InPlaceResidual().eval(), torch.randn(2, 3, 8, 8)
    for mode in MODES:
        res, stats = _prune(model, (x,), mode)
        coupled = [g for g in stats["plan"]
                   if {"a.weight", "b.weight"}
                   <= {m["param"] for m in g["members"] if m["role"] == "producer"}]
        assert len(coupled) == 1 and coupled[0]["removed_units"] == 8, (mode, stats["refused"])
        with torch.no_grad():
            got, want = res.module(x), masked_twin(model, stats["plan"])(x)
        assert compare_outputs(want, got, EXACT).ok(EXACT)


class _Padded(nn.Module):
    """TF-style "same" padding (``F.pad`` of H and W before a conv, as HF MobileNetV2 and
    EfficientNet do) passes channels through; padding the channel axis blocks them."""

    def __init__(self, pad_channels: bool = False):
        super().__init__()
        self.pad_channels = pad_channels
        self.a = nn.Conv2d(3, 16, 3)
        self.b = nn.Conv2d(17 if pad_channels else 16, 4, 3)

    def forward(self, x):
        h = torch.relu(self.a(x))
        h = torch.nn.functional.pad(h, (0, 0, 0, 0, 0, 1) if self.pad_channels else (1, 1, 0, 2))
        return self.b(h)


def test_spatial_pad_passes_channels_and_channel_pad_blocks_them():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 10, 10)
    for mode in MODES:
        model = _Padded().eval()
        res, stats = _prune(model, (x,), mode)
        (group,) = stats["plan"]
        assert {(m["param"], m["dim"], m["role"]) for m in group["members"] if m["indices"]} \
            >= {("a.weight", 0, "producer"), ("b.weight", 1, "consumer")}, mode
        with torch.no_grad():
            got, want = res.module(x), masked_twin(model, stats["plan"])(x)
        assert compare_outputs(want, got, EXACT).ok(EXACT)
        with pytest.raises(PassError, match="pad"):
            _prune(_Padded(pad_channels=True).eval(), (x,), mode)


class _ExpandGQA(nn.Module):
    """Grouped-query attention repeating kv heads as Hugging Face's ``repeat_kv`` does:
    ``kv[:, :, None].expand(b, kv_heads, n_rep, s, d).reshape(b, heads, s, d)``; the expand's
    kv head count is a shape constant the shrink must rewrite."""

    def __init__(self, dim=32, heads=4, kv_heads=2):
        super().__init__()
        self.h, self.kv, self.d = heads, kv_heads, dim // heads
        self.q = nn.Linear(dim, heads * self.d)
        self.k = nn.Linear(dim, kv_heads * self.d)
        self.v = nn.Linear(dim, kv_heads * self.d)
        self.o = nn.Linear(heads * self.d, dim)

    def _repeat(self, t, b, s):
        t = t.view(b, s, self.kv, self.d).transpose(1, 2)
        rep = self.h // self.kv
        return t[:, :, None].expand(b, self.kv, rep, s, self.d).reshape(b, self.h, s, self.d)

    def forward(self, x):
        b, s, _ = x.shape
        q = self.q(x).view(b, s, self.h, self.d).transpose(1, 2)
        k, v = self._repeat(self.k(x), b, s), self._repeat(self.v(x), b, s)
        y = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.o(y.transpose(1, 2).reshape(b, s, self.h * self.d))


def test_expand_repeated_kv_heads_shrink_with_their_query_groups():
    torch.manual_seed(0)
    model, x = _ExpandGQA().eval(), torch.randn(2, 5, 32)
    for mode in MODES:
        res, stats = _prune(model, (x,), mode)
        (group,) = stats["plan"]
        removed = {m["param"]: len(m["indices"]) for m in group["members"]}
        assert removed["q.weight"] == 16 and removed["k.weight"] == removed["v.weight"] == 8, mode
        with torch.no_grad():
            got, want = res.module(x), masked_twin(model, stats["plan"])(x)
        assert compare_outputs(want, got, EXACT).ok(EXACT)


class _Conv1DStyle(nn.Module):
    """GPT-2's ``Conv1D``: ``torch.addmm(bias, x, weight)`` with the weight stored (in, out),
    the transpose of nn.Linear's layout."""

    def __init__(self):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(8, 24)), nn.Parameter(torch.randn(24))
        self.w2, self.b2 = nn.Parameter(torch.randn(24, 8)), nn.Parameter(torch.randn(8))

    def forward(self, x):
        h = torch.relu(torch.addmm(self.b1, x, self.w1))
        return torch.addmm(self.b2, h, self.w2)


def test_a_transposed_weight_is_planned_in_its_stored_layout():
    torch.manual_seed(0)
    model, x = _Conv1DStyle().eval(), torch.randn(4, 8)
    for mode in MODES:
        res, stats = _prune(model, (x,), mode)
        (group,) = stats["plan"]
        dims = {(m["param"], m["role"]): m["dim"] for m in group["members"]}
        assert dims[("w1", "producer")] == 1 and dims[("w2", "consumer")] == 0, (mode, dims)
        with torch.no_grad():
            got, want = res.module(x), masked_twin(model, stats["plan"])(x)
        assert compare_outputs(want, got, EXACT).ok(EXACT)
