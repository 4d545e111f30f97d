"""``round_to`` counts channels, not units: a group whose unit is an attention head (or a
conv group) several channels wide is rounded in heads of that width, so ``round_to=16``
does not freeze the head count of a model whose heads are 16 channels or more."""

from __future__ import annotations

import pytest

import fxopt
from fxopt import zoo
from fxopt.prune import groups


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_round_to_counts_channels_so_wide_heads_still_prune(mode):
    model, inputs = zoo.load("gqa")  # 4 query heads of 16 channels, 2 kv heads
    gm = fxopt.capture(model, inputs, mode=mode)
    heads = [g for g in groups(gm) if g.prunable and g.n_units == 2]
    assert heads, [(g.n_units, g.reasons[:1]) for g in groups(gm)]
    res = fxopt.optimize(model, inputs, "prune(ratio=0.5,round_to=16)", mode=mode)
    plan = res.report.records[-1].stats["plan"]
    by_units = {g["units"]: g for g in plan}
    assert by_units[2]["removed_units"] == 1  # one kv head (and its two query heads) goes
    for g in plan:  # channel groups keep multiples of 16 channels
        for m in g["members"]:
            if m["role"] == "producer" and m["param"].endswith("weight"):
                size = model.state_dict()[m["param"]].shape[m["dim"]]
                if g["units"] == size:  # one channel per unit
                    assert (size - len(m["indices"])) % 16 == 0 or len(m["indices"]) == 0, m
