"""prune(importance=taylor) and prune(steps=N): Taylor ranks dead and zero channels first,
needs calibration batches, never touches the user's model; an iterative schedule reaches
the one-shot ratio, equals its masked twin and replays from its plan."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import fxopt
from fxopt import PassError, zoo
from fxopt.prune import masked_twin
from fxopt.verify import EXACT, compare_outputs


def _prune(model, inputs, spec, mode="symbolic", calibration=None):
    res = fxopt.optimize(model, inputs, spec, mode=mode, calibration=calibration)
    return res, res.report.records[-1].stats


def _mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[0].weight[3] = 0  # zero weight: no output, no gradient
        model[0].bias[3] = 0
        model[0].weight[5] *= 50  # the largest row by L1 ...
        model[0].bias[5] = -1e4  # ... but dead after the ReLU: zero gradient
    return model


def _producer_indices(stats, param="0.weight"):
    return next(m["indices"] for g in stats["plan"] for m in g["members"]
                if m["param"] == param)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_taylor_ranks_zero_and_dead_channels_lowest(mode):
    model = _mlp()
    before = copy.deepcopy(model.state_dict())
    batches = [(torch.randn(4, 8),) for _ in range(3)]
    x = (torch.randn(2, 8),)
    _, stats = _prune(model, x, "prune(ratio=0.125,importance=taylor,round_to=1)", mode, batches)
    assert sorted(_producer_indices(stats)) == [3, 5]
    _, l1 = _prune(model, x, "prune(ratio=0.125,importance=l1,round_to=1)", mode)
    assert 5 not in _producer_indices(l1)  # l1 keeps the big dead row; taylor does not
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())


def test_taylor_without_calibration_is_a_pass_error():
    model = _mlp()
    with pytest.raises(PassError, match="calibration"):
        _prune(model, (torch.randn(2, 8),), "prune(ratio=0.5,importance=taylor)")
    with pytest.raises(PassError, match="empty calibration"):
        _prune(model, (torch.randn(2, 8),), "prune(ratio=0.5,importance=taylor)",
               calibration=[])


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_taylor_on_a_residual_cnn_equals_its_masked_twin(mode):
    model, inputs = zoo.load("resnet")
    batches = [zoo.get("resnet").make_inputs(2) for _ in range(2)]
    res, stats = _prune(model, inputs, "prune(ratio=0.4,importance=taylor,scope=global)", mode,
                        calibration=batches)
    assert stats["plan"] and stats["twin_error"] < 1e-4
    with torch.no_grad():
        want = masked_twin(model, json.loads(json.dumps(stats["plan"])))(*inputs)
        assert compare_outputs(want, res.module(*inputs), EXACT).ok(EXACT)


@pytest.mark.parametrize(("name", "importance"), [("resnet", "l1"), ("mlp", "taylor")])
def test_steps_reach_the_same_ratio_and_equal_the_masked_twin(name, importance):
    model, inputs = zoo.load(name)
    batches = [zoo.get(name).make_inputs(2) for _ in range(2)]
    spec = f"prune(ratio=0.5,importance={importance}"
    _, once = _prune(model, inputs, spec + ")", calibration=batches)
    res, stats = _prune(model, inputs, spec + ",steps=3)", calibration=batches)
    assert stats["steps"] == 3 and len(stats["units_removed_per_step"]) == 3
    assert all(n > 0 for n in stats["units_removed_per_step"])
    assert stats["units_removed"] == once["units_removed"]
    assert [g["removed_units"] for g in stats["plan"]] == \
        [g["removed_units"] for g in once["plan"]]
    res.module.graph.lint()
    fresh = zoo.get(name).make_inputs(3)
    with torch.no_grad():
        want = masked_twin(model, json.loads(json.dumps(stats["plan"])))(*fresh)
        assert compare_outputs(want, res.module(*fresh), EXACT).ok(EXACT)


def test_taylor_steps_rerank_between_steps():
    # a channel whose only reader is pruned in step 1 has no gradient left in step 2
    model, inputs = zoo.load("mlp")
    batches = [zoo.get("mlp").make_inputs(4) for _ in range(2)]
    _, stats = _prune(model, inputs, "prune(ratio=0.6,importance=taylor,steps=2)",
                      calibration=batches)
    assert stats["units_removed_per_step"][0] < stats["units_removed"]


def test_a_steps_plan_replays_to_the_same_graph(tmp_path):
    model, inputs = zoo.load("densenet")
    res, stats = _prune(model, inputs, "prune(ratio=0.4,steps=3,scope=global)")
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(stats["plan"]))
    again, stats2 = _prune(model, inputs, f"prune(plan={str(path)!r})")
    assert stats2["plan"] == stats["plan"]
    assert again.module.code == res.module.code
    a, b = res.module.state_dict(), again.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("name", "spec"), [("resnet", "prune(macs=0.6,scope=global,steps=3)"),
                                            ("mlp", "prune(macs=0.5,steps=2)")])
def test_steps_with_a_mac_target_search_the_ratio_once_then_step_to_it(name, spec):
    model, inputs = zoo.load(name)
    _, once = _prune(model, inputs, spec.replace(",steps=3)", ")").replace(",steps=2)", ")"))
    res, stats = _prune(model, inputs, spec)
    before, after = res.report.records[-1].macs
    assert stats["ratio"] == once["ratio"]  # the same one-shot search
    assert stats["steps"] == len(stats["units_removed_per_step"]) > 1
    assert abs(stats["macs_kept"] - after / before) < 1e-6  # measured on the pruned graph
    assert stats["macs_target"] == once["macs_target"]
    if "global" not in spec:  # local scope: the same counts per group, so the same MACs
        assert abs(stats["macs_kept"] - stats["macs_target"]) <= 0.03
        assert stats["macs_kept"] == pytest.approx(once["macs_kept"])
    assert ("macs_note" in stats) == (abs(stats["macs_kept"] - stats["macs_target"]) > 0.03)
    assert "target" in fxopt.prune.prune_table(res.report.records[-1].stats)
    fresh = zoo.get(name).make_inputs(3)
    with torch.no_grad():
        want = masked_twin(model, json.loads(json.dumps(stats["plan"])))(*fresh)
        assert compare_outputs(want, res.module(*fresh), EXACT).ok(EXACT)


@pytest.mark.parametrize("spec", ["prune(steps=0)", "prune(steps=1.5)"])
def test_bad_steps_are_pass_errors(spec):
    model, inputs = zoo.load("mlp")
    with pytest.raises(PassError, match="steps"):
        _prune(model, inputs, spec)


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_taylor_scores_every_prunable_group_of_a_cnn(mode):
    from fxopt.passes.prune.taylor import taylor_scores

    model, inputs = zoo.load("mobilenet")
    gm = fxopt.capture(model, inputs, mode=mode)
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    gs = [g for g in fxopt.prune.groups(gm) if g.prunable]
    scores = taylor_scores(gs, gm, [zoo.get("mobilenet").make_inputs(2)])
    assert len(scores) == len(gs) and all(s.shape == (g.n_units,) for s, g in zip(scores, gs))
    # real gradients in every group (a few squeeze-excite units are dead ReLUs: 0)
    assert all((s > 0).sum() > len(s) // 3 for s in scores)
    assert sum((s > 0).sum() for s in scores) > 0.9 * sum(len(s) for s in scores)
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())


def test_batches_and_steps_show_progress(capfd):
    import fxopt.progress

    model, inputs = zoo.load("mlp")
    batches = [zoo.get("mlp").make_inputs(2) for _ in range(2)]
    previous = fxopt.progress.show_progress("always")
    try:
        _prune(model, inputs, "prune(ratio=0.5,importance=taylor,steps=2)",
               calibration=batches)
    finally:
        fxopt.progress.show_progress(previous)
    err = capfd.readouterr().err
    assert "prune steps" in err and "taylor importance" in err
