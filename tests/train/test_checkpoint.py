"""Training checkpoints: pickle-free state round trips, atomic writes, graph fingerprints,
and interrupted-then-resumed runs that end bit-identical to uninterrupted ones."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from train_helpers import digits, mlp, trained

import fxopt
from fxopt.errors import CheckpointError
from fxopt.train import checkpoint as ckpt
from fxopt.train.loop import finetune

TRAIN, VAL = digits(0, 100), digits(256, 384)


def _graph(hidden=32):
    return fxopt.capture(mlp(hidden), (TRAIN[0][:2],))


def test_optimizer_and_scheduler_state_round_trip_without_pickle(tmp_path):
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(2, 4)).sum().backward()
        opt.step()
        sched.step()
    fp = ckpt.graph_fingerprint(model)
    path = ckpt.save(tmp_path, ckpt.step_name(3), module=model, fingerprint=fp, optimizer=opt,
                     scheduler=sched, position={"epoch": 0, "batch": 3, "step": 3})
    assert sorted(p.name for p in path.iterdir()) == [
        "model.safetensors", "state.json", "state.safetensors"]
    json.loads((path / "state.json").read_text())  # plain JSON, nothing pickled
    model2 = torch.nn.Linear(4, 3)
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.1)
    sched2 = torch.optim.lr_scheduler.CosineAnnealingLR(opt2, T_max=10)
    body = ckpt.load(path, module=model2, fingerprint=fp, optimizer=opt2, scheduler=sched2)
    assert body["position"]["step"] == 3
    assert torch.equal(model.weight, model2.weight)
    s1, s2 = opt.state_dict(), opt2.state_dict()
    for i in s1["state"]:
        for k, v in s1["state"][i].items():
            assert torch.equal(v, s2["state"][i][k])
    assert s1["param_groups"] == s2["param_groups"]
    assert sched.state_dict() == sched2.state_dict()


def test_rng_states_round_trip(tmp_path):
    torch.manual_seed(1)
    np.random.seed(1)
    random.seed(1)
    model = torch.nn.Linear(2, 2)
    path = ckpt.save(tmp_path, "step-1", module=model, fingerprint="x")
    want = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9)
    np.random.seed(9)
    random.seed(9)
    ckpt.load(path, module=model, fingerprint="x")
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(want[0], got[0]) and np.array_equal(want[1], got[1])
    assert want[2] == got[2]


def test_failed_write_leaves_nothing(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(CheckpointError, match="without pickle"):
        ckpt.save(tmp_path, "step-00000001", module=model, fingerprint="x",
                  position={"odd": object()})
    assert list(tmp_path.iterdir()) == []
    assert ckpt.latest(tmp_path) is None


def test_keep_prunes_old_checkpoints_and_latest_is_newest(tmp_path):
    model = torch.nn.Linear(2, 2)
    for step in (1, 2, 3):
        ckpt.save(tmp_path, ckpt.step_name(step), module=model, fingerprint="x", keep=2)
    assert [p.name for p in ckpt.checkpoints(tmp_path)] == ["step-00000002", "step-00000003"]
    assert ckpt.latest(tmp_path).name == "step-00000003"
    (tmp_path / ".tmp-step-00000004-1").mkdir()  # a crash mid-write is not a checkpoint
    assert ckpt.latest(tmp_path).name == "step-00000003"


def test_checkpoint_of_another_graph_is_refused(tmp_path):
    finetune(_graph(32), TRAIN, epochs=1, checkpoint_dir=tmp_path)
    with pytest.raises(CheckpointError, match="another graph"):
        finetune(_graph(16), TRAIN, epochs=2, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(CheckpointError, match="no training checkpoint"):
        finetune(_graph(32), TRAIN, epochs=2, resume=str(tmp_path))


class Stop(Exception):
    pass


def _stop_at(k):
    def callback(state):
        if state["step"] == k:
            raise Stop(f"interrupted at step {k}")
    return callback


@pytest.mark.parametrize("every,stop", [(3, 8), (None, 9)])
def test_interrupted_and_resumed_run_is_bit_identical(tmp_path, every, stop):
    # 100 items, batch 16: 7 steps an epoch (a short last batch); distillation, cosine
    # schedule and AdamW state must all come back exactly
    teacher = trained(mlp(32), TRAIN, steps=10)
    options = dict(teacher=teacher, epochs=3, lr=3e-3, batch_size=16, scheduler="cosine",
                   val_data=VAL, checkpoint_every=every, seed=3)
    whole = finetune(_graph(), TRAIN, checkpoint_dir=tmp_path / "a", **options)
    with pytest.raises(Stop):
        finetune(_graph(), TRAIN, checkpoint_dir=tmp_path / "b", callback=_stop_at(stop),
                 **options)
    resumed_from = ckpt.latest(tmp_path / "b").name
    assert resumed_from == ckpt.step_name(6 if every == 3 else 7)
    again = finetune(_graph(), TRAIN, checkpoint_dir=tmp_path / "b", resume=True, **options)
    assert again.resumed_from.endswith(resumed_from)
    assert again.steps == whole.steps == 21
    for k, v in whole.module.state_dict().items():
        assert torch.equal(v, again.module.state_dict()[k]), k
    assert again.history == [
        {**row, "seconds": r2["seconds"], "samples_per_s": r2["samples_per_s"]}
        for row, r2 in zip(whole.history, again.history, strict=True)]
    assert again.best_metric == whole.best_metric
