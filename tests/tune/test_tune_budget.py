"""Budget parsing and evaluation (fxopt/tune/budget.py)."""

from __future__ import annotations

import math

import pytest

from fxopt.errors import SpecError
from fxopt.tune import Bound, parse_budget


def top1(outputs, target):
    return float((outputs.argmax(-1) == target).float().mean())


@pytest.mark.parametrize("text, measure, op, threshold", [
    ("cosine>=0.99", "cosine", ">=", 0.99),
    (" cosine >= 0.999 ", "cosine", ">=", 0.999),
    ("max_rel<=0.05", "max_rel", "<=", 0.05),
    ("max_rel<1e-2", "max_rel", "<=", 0.01),
])
def test_parse_one_bound(text, measure, op, threshold):
    b = parse_budget(text)
    assert b.bounds == (Bound(measure, op, threshold),)
    assert not b.needs_metric


def test_parse_several_bounds_and_describe():
    b = parse_budget("cosine>=0.99,max_rel<=0.1")
    assert [x.measure for x in b.bounds] == ["cosine", "max_rel"]
    assert b.describe() == "cosine>=0.99,max_rel<=0.1"
    assert parse_budget(b) is b


def test_check_reports_how_much_each_bound_missed():
    b = parse_budget("cosine>=0.99,max_rel<=0.05")
    ok = b.check({"cosine": 0.995, "max_rel": 0.01})
    assert ok.ok and ok.misses == {}
    bad = b.check({"cosine": 0.98, "max_rel": 0.2})
    assert not bad.ok
    assert bad.misses["cosine"] == pytest.approx(0.01)
    assert bad.misses["max_rel"] == pytest.approx(0.15)
    assert "short by" in bad.describe()
    # a measure that was never taken (or is NaN) is an infinite miss, never a pass
    assert b.check({"cosine": math.nan, "max_rel": 0.0}).misses["cosine"] == math.inf
    assert not b.check({}).ok


def test_metric_budget_needs_metric_drop_and_data():
    b = parse_budget(metric=top1, max_drop=0.5, val_data=[1])
    assert b.needs_metric and b.max_drop == 0.5
    assert b.check({"drop": 0.4}).ok and not b.check({"drop": 0.6}).ok
    assert b.check({"drop": 0.6}).misses["drop"] == pytest.approx(0.1)
    assert "top1 drop<=0.5" in b.describe()
    both = parse_budget("cosine>=0.9", metric=top1, max_drop=1.0, val_data=[1])
    assert [x.measure for x in both.bounds] == ["cosine", "drop"]


@pytest.mark.parametrize("kwargs, match", [
    ({"text": "cosine<=0.99"}, "cosine>=VALUE"),
    ({"text": "max_rel>=0.05"}, "max_rel<=VALUE"),
    ({"text": "accuracy>=0.9"}, "unknown measure 'accuracy'"),
    ({"text": "cosine>=high"}, "not a number"),
    ({"text": "cosine>=1.5"}, "must lie in"),
    ({"text": "max_rel<=-1"}, "must lie in"),
    ({"text": "cosine 0.99"}, "cannot read"),
    ({"text": ""}, "empty"),
    ({"text": "cosine>=0.9,cosine>=0.99"}, "twice"),
    ({}, "no budget given"),
    ({"metric": top1, "val_data": [1]}, "--max-drop"),
    ({"max_drop": 0.5}, "--metric"),
    ({"metric": top1, "max_drop": 0.5}, "val_data"),
    ({"metric": top1, "max_drop": -1, "val_data": [1]}, "max_drop must be"),
    ({"metric": "top1", "max_drop": 0.5, "val_data": [1]}, "callable"),
])
def test_bad_budgets_raise_spec_error(kwargs, match):
    text = kwargs.pop("text", None)
    with pytest.raises(SpecError, match=match):
        parse_budget(text, **kwargs)


def test_headroom_tightens_every_bound():
    b = parse_budget("cosine>=0.99,max_rel<=0.1").headroom(0.5)
    assert b.bounds[0].threshold == pytest.approx(0.995)
    assert b.bounds[1].threshold == pytest.approx(0.05)
