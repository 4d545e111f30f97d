"""The ``finetune`` pipeline stage fed by fxopt.optimize(..., train_data=, val_data=)."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from train_helpers import accuracy, cnn, digits, mlp, trained

import fxopt
from fxopt.errors import CheckpointError, TrainingError
from fxopt.passes.base import PassContext
from fxopt.passes.finetune import _last_plan

TRAIN, VAL = digits(0, 256), digits(256, 512)
X = (TRAIN[0][:2],)


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    return trained(mlp(64), TRAIN)


def test_prune_then_finetune_recovers_with_the_original_as_teacher(teacher):
    pruned = fxopt.optimize(teacher, X, "prune(ratio=0.75)").module
    res = fxopt.optimize(teacher, X, "prune(ratio=0.75),finetune(epochs=3,lr=0.005)",
                         train_data=TRAIN, val_data=VAL)
    rec = res.report.records[-1]
    assert rec.name == "finetune" and rec.modified and rec.semantics == "changes-function"
    stats = rec.stats
    assert stats["teacher"] and stats["metric"] == "accuracy" and len(stats["history"]) == 3
    assert "distill" in stats["history"][0]
    assert stats["best_metric"] > accuracy(pruned, VAL)
    assert accuracy(res.module, VAL) == pytest.approx(stats["best_metric"])
    assert res.module.state_dict()["0.weight"].shape == (16, 64)
    assert res.module.meta["fxopt"]["pipeline"][-1] == "finetune(epochs=3,lr=0.005)"
    print(res.report)  # the table still formats


def test_sparsify_then_finetune_keeps_the_zeros(teacher):
    res = fxopt.optimize(teacher, X, "sparsify(ratio=0.8),finetune(epochs=2,lr=0.005)",
                         train_data=TRAIN)
    w = res.module.state_dict()["0.weight"]
    before = fxopt.optimize(teacher, X, "sparsify(ratio=0.8)").module.state_dict()["0.weight"]
    assert torch.equal(w == 0, before == 0)
    assert not torch.equal(w, before)  # the kept weights trained


def test_distill_false_trains_on_labels_only(teacher):
    res = fxopt.optimize(teacher, X, "prune(ratio=0.5),finetune(distill=false)",
                         train_data=TRAIN)
    assert not res.report.records[-1].stats["teacher"]
    assert "distill" not in res.report.records[-1].stats["history"][0]


def test_features_take_the_plan_of_the_prune_before():
    x, y = digits(0, 64, image=True)
    model = trained(cnn(), (x, y), steps=10)
    res = fxopt.optimize(model, (x[:2],), "prune(ratio=0.5),finetune(features=[1],batch_size=64)",
                         train_data=(x, y), val_data=(x, y))
    # one step, its loss measured before the update: the first layer's kept channels equal
    # the teacher's exactly, which only a plan-sliced (not a projected) teacher feature gives
    assert res.report.records[-1].stats["history"][0]["feature"] == pytest.approx(0, abs=1e-10)
    ctx = PassContext(X, options={"report": res.report})
    assert _last_plan(ctx) == res.report.records[0].stats["plan"]


def test_stage_errors_are_typed(teacher, tmp_path):
    with pytest.raises(TrainingError, match="train_data"):
        fxopt.optimize(teacher, X, "prune(ratio=0.5),finetune")
    with pytest.raises(TrainingError, match="finetune: batch input 0 has shape"):
        fxopt.optimize(teacher, X, "finetune", train_data=(torch.rand(8, 65),
                                                           torch.zeros(8, dtype=torch.long)))
    with pytest.raises(TrainingError, match="teacher"):
        fxopt.optimize(teacher, X, "finetune", train_data=TRAIN,
                       teacher=nn.Sequential(nn.Linear(64, 3)))
    spec = f"finetune(checkpoint_dir='{tmp_path}')"
    fxopt.optimize(teacher, X, spec, train_data=TRAIN)
    resume = f"prune(ratio=0.5),finetune(checkpoint_dir='{tmp_path}',resume=true)"
    with pytest.raises(CheckpointError, match="another graph"):
        fxopt.optimize(teacher, X, resume, train_data=TRAIN)
    with pytest.raises(fxopt.SpecError, match="unknown argument"):
        fxopt.parse_pipeline("finetune(epoch=2)")
