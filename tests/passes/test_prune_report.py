"""What pruning changed: the per-layer params/MACs table equals ``fxopt.inspect``'s counts
of the graph before and after, the achieved ratios are those of the totals, kept channels
match the plan, and the bar chart is a real PNG written atomically."""

from __future__ import annotations

import json

import pytest
from png_check import assert_png  # tests/png_check.py

import fxopt
from fxopt import PassError, zoo
from fxopt.passes.prune.report import layer_counts


def _per_layer(gm):
    """Params and MACs per layer straight from fxopt.inspect's rows (the test's own sum)."""
    out = {}
    for r in fxopt.inspect(gm).rows:
        if r.op.startswith("call") and (r.params or r.macs):
            key = r.module_path or r.name
            p, m = out.get(key, (0, 0))
            out[key] = (p + r.params, m + r.macs)
    return out


@pytest.mark.parametrize(("name", "mode"), [("resnet", "symbolic"), ("transformer", "symbolic"),
                                            ("resnet", "export")])
def test_table_equals_inspect_before_and_after(name, mode):
    model, inputs = zoo.load(name)
    before = _per_layer(fxopt.capture(model, inputs, mode=mode))
    res = fxopt.optimize(model, inputs, "prune(ratio=0.5)", mode=mode)
    stats = json.loads(json.dumps(res.report.records[-1].stats))  # JSON-serializable
    after = _per_layer(res.module)
    rows = {r["layer"]: r for r in stats["report"]["layers"]}
    assert set(rows) == set(before) | set(after)
    for layer, r in rows.items():
        assert (r["params_before"], r["macs_before"]) == before.get(layer, (0, 0)), layer
        assert (r["params_after"], r["macs_after"]) == after.get(layer, (0, 0)), layer
    assert any(r["params_after"] < r["params_before"] for r in rows.values())
    t = stats["report"]["totals"]
    s0, s1 = fxopt.inspect(fxopt.capture(model, inputs, mode=mode)), fxopt.inspect(res.module)
    assert (t["params_before"], t["macs_before"]) == (s0.params, s0.macs)
    assert (t["params_after"], t["macs_after"]) == (s1.params, s1.macs)
    assert stats["report"]["achieved"]["macs"] == pytest.approx(s1.macs / s0.macs, abs=1e-4)
    # the table prints those numbers, and the achieved ratio
    table = fxopt.prune.prune_table(stats)
    for layer, r in list(rows.items())[:5]:
        assert f"{r['params_before']} -> {r['params_after']}" in table.split(layer, 1)[1]
    assert f"MACs {s1.macs / s0.macs:.1%} of the original" in table


def test_kept_channels_follow_the_plan():
    model, inputs = zoo.load("resnet")
    res = fxopt.optimize(model, inputs, "prune(ratio=0.5)")
    stats = res.report.records[-1].stats
    sd = model.state_dict()
    pruned = {r["layer"]: r for r in stats["report"]["layers"] if r["channels_before"]}
    assert pruned
    for entry in stats["plan"]:
        for m in entry["members"]:
            if m["role"] == "producer" and m["param"].endswith(".weight"):
                layer = m["param"].rpartition(".")[0]
                width = sd[m["param"]].shape[m["dim"]]
                assert (pruned[layer]["channels_before"], pruned[layer]["channels_after"]) == \
                    (width, width - len(m["indices"]))
    gm = res.module
    assert layer_counts(gm)["stem.0"]["params"] == gm.get_submodule("stem.0").weight.numel() \
        + (gm.get_submodule("stem.0").bias.numel() if gm.get_submodule("stem.0").bias is not None
           else 0)


def test_macs_target_is_reported():
    model, inputs = zoo.load("resnet")
    res = fxopt.optimize(model, inputs, "prune(macs=0.5)")
    stats = res.report.records[-1].stats
    achieved = stats["report"]["achieved"]["macs"]
    assert abs(achieved - 0.5) <= 0.03
    assert "target 50.0% of MACs" in fxopt.prune.prune_table(stats)


def test_plot_kept_writes_a_valid_png(tmp_path):
    model, inputs = zoo.load("mobilenet")
    stats = fxopt.optimize(model, inputs, "prune(ratio=0.5)").report.records[-1].stats
    out = fxopt.prune.plot_kept(stats, tmp_path / "kept.png")
    assert out == tmp_path / "kept.png"
    assert_png(out)
    assert [p.name for p in tmp_path.iterdir()] == ["kept.png"]  # no temporary left behind


def test_plot_kept_errors_leave_nothing(tmp_path):
    model, inputs = zoo.load("resnet")
    stats = fxopt.optimize(model, inputs, "prune(ratio=0.5)").report.records[-1].stats
    with pytest.raises(PassError, match="PNG"):
        fxopt.prune.plot_kept(stats, tmp_path / "kept.jpg")
    with pytest.raises(PassError, match="does not exist"):
        fxopt.prune.plot_kept(stats, tmp_path / "missing" / "kept.png")
    with pytest.raises(PassError, match="no pruned layers"):
        fxopt.prune.plot_kept({"plan": []}, tmp_path / "kept.png")
    assert list(tmp_path.iterdir()) == []


def test_report_names_the_groups_that_are_not_exact_and_the_target():
    model, inputs = zoo.load("transformer")
    stats = fxopt.optimize(model.eval(), inputs, "prune(ratio=0.5,hidden=True)",
                           mode="export").report.records[-1].stats
    report = json.loads(json.dumps(stats["report"]))
    inexact = [g for g in stats["plan"] if not g["exact"]]
    assert [e["group"] for e in report["not_exact"]] == [g["group"] for g in inexact] != []
    (entry,) = report["not_exact"]
    assert "embed" in entry["layers"] and "normalizes over axis" in entry["reason"]
    flagged = {r["layer"] for r in report["layers"] if not r["exact"]}
    assert "embed" in flagged and flagged <= set(entry["layers"])
    assert report["target"]["ratio"] == 0.5 and report["target"]["macs"] is None
    removed = stats["units_removed"] / sum(g["units"] for g in stats["plan"])
    assert report["achieved"]["channels_removed"] == pytest.approx(removed, abs=1e-4)
    table = fxopt.prune.prune_table(stats)
    assert f"NOT EXACT (hidden=True): group {entry['group']}" in table
    assert "target ratio 0.500" in table
    exact = fxopt.optimize(model, inputs, "prune(ratio=0.5)",
                           mode="export").report.records[-1].stats
    assert exact["report"]["not_exact"] == [] and "NOT EXACT" not in \
        fxopt.prune.prune_table(exact)
