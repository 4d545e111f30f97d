"""round_to="auto" (the default) and the MAC search closing the gap that rounding leaves."""

import math

import numpy as np
import pytest

import fxopt
from fxopt import zoo
from fxopt.errors import PassError
from fxopt.passes.prune.groups import groups
from fxopt.passes.prune.plan import Refine, close_gap, search_ratio
from fxopt.passes.prune.shrink import AUTO_MIN_CHANNELS, AUTO_ROUND, multiple_of, select


def _prune(name, spec, mode="symbolic"):
    model, inputs = zoo.load(name)
    res = fxopt.optimize(model, inputs, pipeline=spec, mode=mode)
    return res, res.report.records[-1].stats


def _groups(name):
    model, inputs = zoo.load(name)
    return [g for g in groups(fxopt.capture(model, inputs)) if g.prunable]


def test_auto_rounds_channel_groups_of_two_steps_and_leaves_narrower_ones():
    gs = _groups("mobilenet")  # channel groups 8 ... 128 wide, and a 2-unit grouped conv
    single = [g for g in gs if max(len(x) for x in g.units.values()) == g.n_units]
    widths = [g.n_units for g in single]
    assert min(widths) < 2 * AUTO_ROUND and max(widths) >= AUTO_MIN_CHANNELS
    assert [multiple_of(g, "auto") for g in single] == [
        AUTO_ROUND if w >= max(AUTO_MIN_CHANNELS, 2 * AUTO_ROUND) else 1 for w in widths]
    assert {multiple_of(g, 1) for g in gs} == {multiple_of(g, None) for g in gs} == {1}
    assert {multiple_of(g, 16) for g in gs} == {16}


def test_auto_counts_heads_by_their_columns_not_their_number():
    gs = _groups("gqa")  # kv-head groups: 2 units of 32 columns; MLP groups: 256 channels
    heads = [g for g in gs if g.n_units == 2]
    assert heads and all(multiple_of(g, "auto") == 1 for g in heads)
    assert all(multiple_of(g, "auto") == AUTO_ROUND for g in gs if g.n_units >= 64)
    _, stats = _prune("transformer", "prune(ratio=0.5)")  # heads: half of them kept
    heads = [g for g in stats["plan"] if g["units"] < AUTO_MIN_CHANNELS]
    assert heads and all(g["removed_units"] == g["units"] // 2 for g in heads)


def test_auto_does_not_round_when_a_step_would_be_a_large_part_of_the_group():
    gs = _groups("mobilenet")  # a grouped conv: 2 units of 36 / 48 channels
    pair = [g for g in gs if g.n_units == 2]
    assert pair and multiple_of(pair[0], "auto") == 1


def test_default_prune_keeps_multiples_of_8_where_auto_rounds():
    model, inputs = zoo.load("mobilenet")
    res = fxopt.optimize(model, inputs, pipeline="prune(ratio=0.45)")
    stats = res.report.records[-1].stats
    rounded = 0
    for g in stats["plan"]:
        kept = g["units"] - g["removed_units"]
        if g["units"] >= 2 * AUTO_ROUND and g["units"] != 2:  # not the grouped conv's pair
            assert kept % AUTO_ROUND == 0
            rounded += 1
        else:
            assert kept == g["units"] - math.floor(0.45 * g["units"])
    assert rounded


def test_round_to_1_means_no_rounding():
    _, stats = _prune("resnet", "prune(ratio=0.45,round_to=1)")
    assert stats["plan"]
    for g in stats["plan"]:
        assert g["removed_units"] == math.floor(0.45 * g["units"])
    assert any((g["units"] - g["removed_units"]) % 8 for g in stats["plan"]
               if g["units"] >= AUTO_MIN_CHANNELS)


@pytest.mark.parametrize("bad", ["prune(round_to=autoo)", "prune(round_to=True)",
                                 "prune(round_to=2.5)"])
def test_bad_round_to_is_a_pass_error(bad):
    with pytest.raises(PassError, match="round_to"):
        _prune("mlp", bad)


def _coarse(weight=(1.0,) * 12, width=64, step=32):
    """A toy MAC model: each group's MACs are its kept units times its weight, kept counts
    rounded to ``step`` units, so a uniform ratio only reaches a few MAC values."""
    n_groups = len(weight)
    gen = np.random.default_rng(0)
    scores = [gen.random(width) for _ in range(n_groups)]

    def pick(r):
        out = []
        for s in scores:
            keep = min(width, math.ceil((width - math.floor(r * width)) / step) * step)
            out.append(np.sort(np.argsort(s, kind="stable")[:width - keep]))
        return out

    def measure(removed):
        return int(sum(w * (width - len(r)) for w, r in zip(weight, removed, strict=True)))

    total = measure([np.zeros(0, dtype=np.int64)] * n_groups)
    return pick, measure, total, scores


def test_search_closes_the_gap_a_uniform_ratio_cannot():
    pick, measure, total, scores = _coarse()
    reachable = {measure(pick(r)) / total for r in np.linspace(0, 0.95, 400)}
    assert reachable == {1.0, 0.5}  # every group jumps from 64 to 32 units at once
    for target in (0.6, 0.7, 0.85):
        ratio, kept, removed = search_ratio(pick, measure, total, target, scores)
        assert abs(kept - target) <= 0.03 and kept == measure(removed) / total
        assert {len(r) for r in removed} <= {0, 32}  # kept counts are still multiples


def test_close_gap_takes_the_least_important_extra_units_first():
    pick, measure, total, scores = _coarse(weight=(1.0, 2.0, 3.0, 4.0))
    lo, hi = pick(0.0), pick(0.5)
    lo, hi = (0.0, measure(lo) / total, lo), (0.5, measure(hi) / total, hi)
    scores = [s.copy() for s in scores]
    scores[2][hi[2][2]] = 0.0  # group 2's extra units matter least
    above, (_, kept, removed) = close_gap(lo, hi, measure, total, 0.9, scores)
    assert [len(r) for r in removed] == [0, 0, 32, 0]
    assert kept == pytest.approx(1 - 3 * 32 / (64 * 10))


def test_refine_steps_one_group_at_a_time_and_skips_steps_that_overshoot():
    weight, width, multiple = [20.0, 1.0, 1.0, 1.0, 1.0], 64, [32, 8, 8, 8, 8]
    gen = np.random.default_rng(1)
    scores = [gen.random(width) + (0 if i == 0 else 1) for i in range(5)]  # group 0 least
    orders = [np.argsort(s, kind="stable") for s in scores]

    def take(counts):
        return [np.sort(o[:c]) for o, c in zip(orders, counts, strict=True)]

    def next_count(i, c):
        keep = (width - c - 1) // multiple[i] * multiple[i]
        return width - keep if keep >= 1 else None

    def measure(removed):
        return int(sum(w * (width - len(r)) for w, r in zip(weight, removed, strict=True)))

    total = measure(take([0] * 5))
    start = (0.0, 1.0, take([0] * 5))
    _, kept, removed = Refine(next_count, take, orders).step_down(start, measure, total, 0.9,
                                                                 scores)
    assert abs(kept - 0.9) <= 0.015 and kept == measure(removed) / total
    assert len(removed[0]) == 0  # its one step (-42% of the MACs) was tried and dropped
    assert all(len(r) % 8 == 0 for r in removed[1:]) and sum(map(len, removed[1:])) > 0


def test_unreachable_target_still_says_so():
    pick, measure, total, scores = _coarse()
    with pytest.raises(PassError, match="no ratio keeps"):
        search_ratio(pick, measure, total, 0.2, scores)


@pytest.mark.parametrize("spec", ["prune(macs=0.6,scope=global,round_to=8)",
                                  "prune(macs=0.6,round_to=8)", "prune(macs=0.55)"])
def test_rounded_mac_targets_are_reached_on_the_zoo_resnet(spec):
    res, stats = _prune("resnet", spec)
    before, after = res.report.records[-1].macs
    target = stats["macs_target"]
    assert abs(after / before - target) <= 0.03
    multiple = 8 if "round_to=8" in spec else None
    for g in stats["plan"]:
        kept = g["units"] - g["removed_units"]
        if multiple or g["units"] >= AUTO_MIN_CHANNELS:
            assert kept % 8 == 0


def test_select_with_counts_takes_them_as_given():
    gs = _groups("mlp")
    scores = [np.arange(g.n_units, dtype=float) for g in gs]
    removed = select(gs, scores, ratio=0.0, counts=[5, 3])
    assert [r.tolist() for r in removed] == [[0, 1, 2, 3, 4], [0, 1, 2]]
