"""The guided search: enumeration, rejection before timing, float fallbacks from the
sensitivity ranking, pruning bisection, re-measurement and ties, an impossible budget,
a metric budget, resume after an interruption (fxopt/tune/search.py)."""

from __future__ import annotations

import importlib
import json

import pytest
import torch
from fake_clock import fake_interleave as _fake_interleave  # tests/tune/fake_clock.py

import fxopt
from fxopt.errors import BudgetError
from fxopt.pipeline import parse_pipeline
from fxopt.tune import Space
from fxopt.tune.space import Config, initial_configs, linear_mac_share

search_mod = importlib.import_module("fxopt.tune.search")


def test_enumeration_follows_the_model(mlp):
    names = lambda cs: [c.name for c in cs]  # noqa: E731
    linear, skipped = initial_configs(1.0, Space())
    assert "onnx-dynamic" in names(linear) and "eager-dynamic" in names(linear)
    assert {"eager-int8", "eager-int8-pt", "onnx-bf16"} <= {n for n, _ in skipped}
    conv, skipped = initial_configs(0.05, Space())
    assert "onnx-dynamic" not in names(conv)
    assert "5% of the MACs" in dict(skipped)["onnx-dynamic"]
    for c in linear + conv:
        parse_pipeline(c.pipeline())  # every pipeline is valid spec text
    assert len({c.candidate().key() for c in linear}) == len(linear)
    model, inputs = mlp
    assert linear_mac_share(fxopt.capture(model, inputs)) == pytest.approx(1.0)
    resnet, rin = fxopt.zoo.load("resnet")
    assert linear_mac_share(fxopt.capture(resnet, rin)) < 0.05


def test_config_pipeline_text():
    c = Config("onnx", quant="int8", float_layers=("fc", "net.0"), prune=0.25, threads=2)
    assert c.pipeline() == ("prune(ratio=0.25),default,quantize(scheme=int8,target=ort,"
                            "per_channel=true,skip=['fc','net.0'])")
    assert c.name == "prune0.25-onnx-int8+float2@2t"
    assert c.candidate().option("threads") == 2
    assert Config("eager", precision="bf16").pipeline() == "default,half(dtype=bf16)"
    assert Config("onnx").simplicity() < c.simplicity()


def _spy_interleave(monkeypatch):
    timed: list[list[str]] = []
    real = search_mod.interleave

    def spy(builts, inputs, **kw):
        timed.append([b.candidate.name for b in builts])
        return real(builts, inputs, **kw)

    monkeypatch.setattr(search_mod, "interleave", spy)
    return timed


def test_over_budget_is_rejected_before_any_timing(mlp, small_space, monkeypatch, tmp_path):
    timed = _spy_interleave(monkeypatch)
    model, inputs = mlp
    # int8 reaches ~0.9998 on this model, fp32 ~1 - 1e-13
    res = fxopt.tune(model, inputs, "cosine>=0.99999", space=small_space, rounds=1,
                     warmup=1, cache=tmp_path)
    assert res.winner == "onnx-fp32"
    row = res.table.row("onnx-int8")
    assert row["status"] == "over budget" and row["median_ms"] is None
    assert "short by" in row["verdict"]
    assert timed and all("onnx-int8" not in names for names in timed)
    assert res.table.row("onnx-fp32")["verdict"] == "winner"


def test_float_fallback_keeps_the_most_sensitive_layers(mlp, monkeypatch, tmp_path):
    model, inputs = mlp
    space = Space(runtimes=("onnx",), quant=("int8",), precisions=(), prune=0.0,
                  max_float_layers=3, plain=False)
    # all int8 reaches ~0.99985 here, three layers float ~0.99991
    res = fxopt.tune(model, inputs, "cosine>=0.9999", space=space, rounds=1, warmup=1,
                     cache=tmp_path)
    ranking = next(json.loads(f.read_text())["ranking"]
                   for f in (tmp_path / "records").glob("ranking-*.json"))
    assert {"net.0", "net.3"} <= set(ranking)  # the linears, and what feeds them
    assert "net.6" not in ranking  # the output head stays float (keep_head="auto")
    fallbacks = [r for r in res.table.rows if r["name"].startswith("onnx-int8+float")]
    assert fallbacks, res.table
    for r in fallbacks:  # every fallback keeps a prefix of the ranking float
        k = int(r["name"].rpartition("float")[2])
        assert f"skip=[{','.join(repr(n) for n in ranking[:k])}]" in r["pipeline"]
    assert res.table.row("onnx-int8")["status"] == "over budget"
    assert res.table.row("onnx-int8+float3")["status"] == "accepted"
    accepted = sorted((r for r in fallbacks if r["status"] == "accepted"),
                      key=lambda r: r["name"])
    timed = [r for r in accepted if r["median_ms"] is not None]
    assert len(timed) == 1 and timed[0] is accepted[0]  # the fewest float layers is timed
    assert all(r["verdict"].startswith("not timed") for r in accepted[1:])


def test_prune_ratio_is_bisected_against_the_budget(mlp, tmp_path):
    model, inputs = mlp
    space = Space(runtimes=("onnx",), quant=(), precisions=(), prune=0.5, prune_steps=2,
                  plain=False)
    # pruning this random MLP without fine-tuning: cosine ~0.44 at 0.5, ~0.70 at 0.25,
    # ~0.86 at 0.125
    res = fxopt.tune(model, inputs, "cosine>=0.8", space=space, rounds=1, warmup=1,
                     cache=tmp_path)
    pruned = {r["name"]: r for r in res.table.rows if r["name"].startswith("prune")}
    assert set(pruned) == {"prune0.5-onnx-fp32", "prune0.25-onnx-fp32",
                           "prune0.125-onnx-fp32"}
    assert pruned["prune0.5-onnx-fp32"]["status"] == "over budget"
    assert pruned["prune0.25-onnx-fp32"]["status"] == "over budget"
    assert pruned["prune0.125-onnx-fp32"]["status"] == "accepted"
    assert pruned["prune0.125-onnx-fp32"]["median_ms"] is not None  # timed: it survived


def test_winner_is_remeasured_and_a_tie_goes_to_the_simpler(mlp, tmp_path, monkeypatch):
    model, inputs = mlp
    space = Space(runtimes=("onnx",), quant=("int8",), precisions=(), prune=0.0,
                  max_float_layers=0, plain=False)
    calls = _fake_interleave(
        monkeypatch, {"onnx-int8": 1.00, "onnx-fp32": 1.01},
        {"onnx-int8": [1.00, 1.02, 1.00, 1.01, 0.99], "onnx-fp32": [1.01, 1.00, 1.02, 0.99, 1.0]})
    res = fxopt.tune(model, inputs, "cosine>=0.99", space=space, cache=tmp_path)
    assert calls[-1] == ["onnx-int8", "onnx-fp32"]  # the fresh run: winner vs runner-up
    rm = res.table.settings["remeasure"]
    assert rm["tie"] and rm["candidates"] == ["onnx-int8", "onnx-fp32"]
    assert res.winner == "onnx-fp32"  # fewer passes
    assert "tie within the noise" in res.table.row("onnx-int8")["verdict"]


def test_remeasure_can_overturn_the_first_ranking(mlp, tmp_path, monkeypatch):
    model, inputs = mlp
    space = Space(runtimes=("onnx",), quant=("int8",), precisions=(), prune=0.0,
                  max_float_layers=0, plain=False)
    _fake_interleave(monkeypatch, {"onnx-int8": 1.00, "onnx-fp32": 1.01},
                     {"onnx-int8": [2.0, 2.1, 2.0, 2.05, 2.0],
                      "onnx-fp32": [1.0, 1.01, 1.0, 1.02, 1.0]})
    res = fxopt.tune(model, inputs, "cosine>=0.99", space=space, cache=tmp_path)
    assert res.winner == "onnx-fp32"
    assert not res.table.settings["remeasure"]["tie"]
    assert "runner-up, too slow" in res.table.row("onnx-int8")["verdict"]


def test_impossible_budget_names_the_closest_and_the_gap(mlp, tmp_path):
    model, inputs = mlp
    space = Space(runtimes=("onnx",), quant=("int8",), precisions=(), prune=0.0,
                  max_float_layers=1, plain=False)
    with pytest.raises(BudgetError) as info:
        fxopt.tune(model, inputs, "max_rel<=0", space=space, rounds=1, cache=tmp_path)
    e = info.value
    assert e.best == "onnx-fp32" and e.misses["max_rel"] > 0
    assert "onnx-fp32" in str(e) and "misses by" in str(e)


def test_metric_budget_on_validation_data(mlp, small_space, tmp_path):
    model, inputs = mlp
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(8, 64, generator=gen) for _ in range(3)]
    with torch.no_grad():
        val = [(x, model(x).argmax(-1)) for x in xs]

    def top1(outputs, target):
        return float((outputs.argmax(-1) == target).float().mean())

    res = fxopt.tune(model, inputs, metric=top1, max_drop=0.5, val_data=val,
                     space=small_space, rounds=1, cache=tmp_path)
    for name in ("onnx-fp32", "onnx-int8"):
        row = res.table.row(name)
        assert row["metric"] is not None and row["drop"] <= 0.5
    assert res.table.settings["reference_metric"] == 1.0


def test_resume_after_an_interruption_does_not_rebuild(mlp, small_space, tmp_path,
                                                       monkeypatch):
    model, inputs = mlp
    real, built = search_mod.build, []

    def interrupted(cand, *a, **kw):
        if len(built) == 1:
            raise KeyboardInterrupt
        built.append(cand.name)
        return real(cand, *a, **kw)

    monkeypatch.setattr(search_mod, "build", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fxopt.tune(model, inputs, "cosine>=0.99", space=small_space, rounds=1, cache=tmp_path)
    assert built == ["onnx-fp32"]
    assert len(list((tmp_path / "records").glob("*.json"))) == 1

    rebuilt = []

    def counting(cand, *a, **kw):
        rebuilt.append(cand.name)
        return real(cand, *a, **kw)

    monkeypatch.setattr(search_mod, "build", counting)
    res = fxopt.tune(model, inputs, "cosine>=0.99", space=small_space, rounds=1,
                     cache=tmp_path)
    assert rebuilt == ["onnx-int8"]  # onnx-fp32 came from the cache
    assert res.table.row("onnx-fp32")["cached"] and not res.table.row("onnx-int8")["cached"]
    assert res.table.row("onnx-fp32")["median_ms"] is not None  # reloaded and timed


def test_a_prune_ratio_inside_the_budget_by_less_than_the_margin_is_not_taken(mlp, tmp_path):
    model, inputs = mlp
    space = Space(runtimes=("onnx",), quant=(), precisions=(), prune=0.5, prune_steps=2,
                  plain=False)
    first = fxopt.tune(model, inputs, "cosine>=0.8", space=space, rounds=1, warmup=1,
                       cache=tmp_path)
    c = first.table.row("prune0.125-onnx-fp32")["cosine"]
    assert 0.8 + 0.2 * 0.2 <= c < 0.99  # the margin held at 0.8: that run pruned
    # a budget just under c: within it, but not with 20% of its room to spare
    budget = round(c - 0.01, 4)
    res = fxopt.tune(model, inputs, f"cosine>={budget}", space=space, rounds=1, warmup=1,
                     cache=tmp_path)
    row = res.table.row("prune0.125-onnx-fp32")
    assert row["status"] == "accepted" and row["median_ms"] is None
    assert "margin for unseen inputs" in row["verdict"]
    assert not res.winner.startswith("prune")
