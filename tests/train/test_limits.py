"""fxopt.finetune(max_steps=, max_time=): stopping mid-epoch, the stop reason in the
history, a time-limited run replayed step for step by max_steps, resume, typed errors."""

from __future__ import annotations

import pytest
import torch
from train_helpers import digits, mlp

import fxopt
from fxopt.errors import TrainingError
from fxopt.train.loop import finetune

TRAIN = digits(0, 256)  # 8 batches of 32 per epoch


def _graph():
    return fxopt.capture(mlp(), (TRAIN[0][:2],))


def test_max_steps_stops_mid_epoch_and_says_why():
    out = finetune(_graph(), TRAIN, epochs=3, max_steps=11, lr=1e-3)
    assert out.steps == 11 and out.stop == "max_steps"
    assert [r["steps"] for r in out.history] == [8, 3]  # the partial epoch has its row
    assert out.history[-1]["stop"] == "max_steps" and "stop" not in out.history[0]
    assert out.module.meta["fxopt"]["finetune"]["stop"] == "max_steps"
    full = finetune(_graph(), TRAIN, epochs=2, lr=1e-3)
    assert full.stop == "epochs" and full.history[-1]["stop"] == "epochs"


def test_epochs_none_trains_until_the_limit():
    out = finetune(_graph(), TRAIN, epochs=None, max_steps=20, lr=1e-3)
    assert out.steps == 20 and len(out.history) == 3


def test_a_time_limited_run_replays_exactly_by_its_steps():
    seen = []
    out = finetune(_graph(), TRAIN, epochs=None, max_time=0.3, lr=1e-3, seed=3,
                   callback=lambda s: seen.append(s["step"]))
    assert out.stop == "max_time" and out.steps == len(seen) >= 1
    again = finetune(_graph(), TRAIN, epochs=None, max_steps=out.steps, lr=1e-3, seed=3)
    assert again.stop == "max_steps"
    x = TRAIN[0][:16]
    with torch.no_grad():
        assert torch.equal(out.module(x), again.module(x))


def test_a_run_stopped_mid_epoch_resumes_inside_it(tmp_path):
    first = finetune(_graph(), TRAIN, epochs=2, max_steps=5, lr=1e-3, checkpoint_dir=tmp_path)
    assert first.steps == 5
    resumed = finetune(_graph(), TRAIN, epochs=2, lr=1e-3, checkpoint_dir=tmp_path, resume=True)
    straight = finetune(_graph(), TRAIN, epochs=2, lr=1e-3)
    assert resumed.steps == 16 and [r["steps"] for r in resumed.history] == [8, 8]
    x = TRAIN[0][:16]
    with torch.no_grad():
        assert torch.allclose(resumed.module(x), straight.module(x), atol=1e-6)


def test_the_pipeline_stage_takes_the_limits():
    res = fxopt.optimize(mlp(), (TRAIN[0][:2],), "prune(ratio=0.5),finetune(epochs=none,"
                         "max_steps=4)", train_data=TRAIN)
    stats = res.report.records[-1].stats
    assert stats["steps"] == 4 and stats["stop"] == "max_steps"


@pytest.mark.parametrize("kwargs, match", [
    ({"max_steps": 0}, "max_steps is a number"),
    ({"max_steps": 2.5}, "max_steps is a number"),
    ({"max_time": -1}, "max_time is a number"),
    ({"epochs": None}, "epochs=None trains until"),
    ({"epochs": None, "max_time": 5, "scheduler": "cosine"}, "scheduler='cosine'"),
    ({"epochs": 0, "max_steps": 3}, "epochs must be a positive integer"),
])
def test_bad_limits_are_typed_errors(kwargs, match):
    with pytest.raises(TrainingError, match=match):
        finetune(_graph(), TRAIN, **kwargs)
