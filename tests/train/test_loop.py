"""fxopt.finetune: training with labels, with a teacher (logits and pruned features),
validation, early stop at a budget, the best epoch returned, TensorBoard, progress, errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from train_helpers import accuracy, cnn, digits, mlp, trained

import fxopt
from fxopt.errors import TrainingError
from fxopt.train.loop import FinetuneResult, finetune

TRAIN, VAL = digits(0, 256), digits(256, 512)


def _graph(model, x=None):
    return fxopt.capture(model, (TRAIN[0][:2] if x is None else x,))


def test_labels_only_training_improves_accuracy_and_leaves_input_alone():
    gm = _graph(mlp())
    before = {k: v.clone() for k, v in gm.state_dict().items()}
    start = accuracy(gm, VAL)
    out = finetune(gm, TRAIN, epochs=3, lr=5e-3, batch_size=32, val_data=VAL)
    assert isinstance(out, FinetuneResult) and isinstance(out.module, torch.fx.GraphModule)
    assert out.metric == "accuracy" and len(out.history) == 3
    assert out.history[-1]["loss"] < out.history[0]["loss"]
    assert out.best_metric > start + 0.3
    assert accuracy(out.module, VAL) == pytest.approx(out.best_metric)
    assert out.steps == 3 * 8
    assert all(torch.equal(before[k], v) for k, v in gm.state_dict().items())
    out.module.graph.lint()
    row = out.history[0]
    assert {"task", "loss", "lr", "samples_per_s", "amp_dtype", "metric"} <= set(row)
    assert "distill" not in row


def test_distillation_recovers_a_pruned_mlp():
    teacher = trained(mlp(64), TRAIN)
    pruned = fxopt.optimize(teacher, (TRAIN[0][:2],), "prune(ratio=0.75)").module
    drop = accuracy(pruned, VAL)
    out = finetune(pruned, TRAIN, teacher=teacher, epochs=4, lr=5e-3, alpha=0.7, T=2.0,
                   val_data=VAL)
    assert {"task", "distill"} <= set(out.history[0])
    assert out.best_metric > drop
    assert out.best_metric >= accuracy(teacher, VAL) - 0.1
    assert out.module.state_dict()["0.weight"].shape == (16, 64)  # still pruned


def test_distillation_without_labels_uses_output_cosine():
    teacher = trained(mlp(64), TRAIN)
    pruned = fxopt.optimize(teacher, (TRAIN[0][:2],), "prune(ratio=0.5)").module
    x_only, val_x = (TRAIN[0],), (VAL[0],)
    out = finetune(pruned, x_only, teacher=teacher, epochs=3, lr=3e-3, val_data=val_x)
    assert out.metric == "cosine"
    assert set(out.history[0]) >= {"distill"} and "task" not in out.history[0]
    assert out.history[-1]["distill"] < out.history[0]["distill"]
    assert 0.9 < out.best_metric <= 1.0


def test_feature_distillation_on_pruned_cnn_uses_the_plan():
    x, y = digits(0, 128, image=True)
    teacher = trained(cnn(), (x, y), steps=20)
    res = fxopt.optimize(teacher, (x[:2],), "prune(ratio=0.5)")
    plan = res.report.records[-1].stats["plan"]
    steps: list[dict] = []
    out = finetune(res.module, (x, y), teacher=teacher, features=["1", "3"], plan=plan,
                   epochs=1, lr=1e-3, callback=steps.append)
    assert "feature" in out.history[0] and len(steps) == 4
    # before the first update the pruned first layer computes exactly the kept channels of
    # the teacher's: with the plan the teacher feature is sliced to them, and layer "1"
    # alone has no feature loss
    first: list[dict] = []
    finetune(res.module, (x, y), teacher=teacher, features=["1"], plan=plan, epochs=1,
             lr=1e-3, callback=first.append)
    assert first[0]["feature"] == pytest.approx(0.0, abs=1e-10)
    assert steps[0]["feature"] > 0  # layer "3" of the pruned graph differs from the teacher's
    # without a plan: a learned projection (random at first)
    projected: list[dict] = []
    finetune(res.module, (x, y), teacher=teacher, features=["1"], epochs=1,
             callback=projected.append)
    assert projected[0]["feature"] > 1e-4
    with pytest.raises(TrainingError, match="names no node"):
        finetune(res.module, (x, y), teacher=teacher, features=["nope"])


def test_budget_stops_early_and_best_epoch_is_returned(tmp_path):
    gm = _graph(mlp())
    out = finetune(gm, TRAIN, epochs=5, lr=5e-3, val_data=VAL, budget=0.0)
    assert out.stopped_early and len(out.history) == 1
    # a metric that gets worse every epoch: the first epoch's weights come back
    calls = []

    def worse(output, target):
        calls.append(1)
        return -float(len(calls))

    one = finetune(gm, TRAIN, epochs=1, lr=5e-3)
    three = finetune(gm, TRAIN, epochs=3, lr=5e-3, val_data=VAL, metric=worse,
                     checkpoint_dir=tmp_path)
    assert three.best_epoch == 0 and three.metric == "worse"
    for k, v in one.module.state_dict().items():
        assert torch.equal(v, three.module.state_dict()[k])
    assert (tmp_path / "best" / "model.safetensors").is_file()


def test_tensorboard_scalars_written(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    finetune(_graph(mlp()), TRAIN, epochs=2, lr=1e-3, val_data=VAL, log_dir=tmp_path,
             scheduler="cosine")
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "val/metric", "epoch/loss"} <= tags
    assert len(acc.Scalars("train/loss")) == 16
    lrs = [e.value for e in acc.Scalars("train/lr")]
    assert lrs[-1] < lrs[0]  # cosine schedule


def test_progress_bar_shows_loss_and_throughput(capsys):
    finetune(_graph(mlp()), TRAIN, epochs=1, progress="always")
    err = capsys.readouterr().err
    assert "epoch 1/1" in err and "loss=" in err and "samples_s=" in err


def test_data_errors_are_typed():
    gm = _graph(mlp())
    with pytest.raises(TrainingError, match="shape"):
        finetune(gm, (torch.rand(20, 65), torch.zeros(20, dtype=torch.long)))
    with pytest.raises(TrainingError, match="first .sample. dim"):
        finetune(gm, (torch.rand(20, 64), torch.zeros(19, dtype=torch.long)))
    with pytest.raises(TrainingError, match="3 element"):
        finetune(gm, [(torch.rand(64), torch.rand(64), torch.tensor(1))])
    with pytest.raises(TrainingError, match="nothing to learn"):
        finetune(gm, (torch.rand(20, 64),))
    with pytest.raises(TrainingError, match="budget"):
        finetune(gm, TRAIN, budget=0.9)
    with pytest.raises(TrainingError, match="epochs"):
        finetune(gm, TRAIN, epochs=0)
    with pytest.raises(TrainingError, match="optimizer"):
        finetune(gm, TRAIN, optimizer="lion")
    with pytest.raises(TrainingError, match="teacher"):
        finetune(gm, TRAIN, features=["0"])


def test_teacher_whose_outputs_do_not_match_is_refused():
    gm = _graph(mlp())
    other = nn.Sequential(nn.Linear(64, 5))
    with pytest.raises(TrainingError, match=r"shape \(2, 10\).*\(2, 5\)"):
        finetune(gm, TRAIN, teacher=other)


def test_embedding_output_distilled_with_cosine_loss(tmp_path):
    torch.manual_seed(0)
    encoder = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    pruned = fxopt.optimize(encoder, (TRAIN[0][:2],), "prune(ratio=0.5)").module
    x_only, val_x = (TRAIN[0],), (VAL[0],)
    out = finetune(pruned, x_only, teacher=encoder, epochs=3, lr=3e-3, output_loss="cosine",
                   val_data=val_x, metric="cosine")
    # the loss is 1 - cos on the training rows: it falls, and the held-out cosine rises
    assert out.history[-1]["distill"] < out.history[0]["distill"]
    with torch.no_grad():
        before = F.cosine_similarity(pruned(VAL[0]), encoder(VAL[0])).mean().item()
    assert out.best_metric > before
    assert out.module.state_dict()["0.weight"].shape == (32, 64)  # still pruned
    with pytest.raises(TrainingError, match="output_loss='kl2'"):
        finetune(pruned, x_only, teacher=encoder, output_loss="kl2",
                 checkpoint_dir=tmp_path / "ck")
    assert not (tmp_path / "ck").exists()


def test_freeze_keeps_matching_parameters_fixed_and_trains_the_rest():
    gm = _graph(mlp())
    names = [n for n, _ in gm.named_parameters()]
    first = next(n for n in names if n.endswith("weight"))
    out = finetune(gm, TRAIN, epochs=1, lr=5e-3, batch_size=32, freeze=[first])
    got, start = out.module.state_dict(), gm.state_dict()
    assert torch.equal(got[first], start[first])  # exactly its value: no step, no decay
    others = [n for n in names if n != first]
    assert others and all(not torch.equal(got[n], start[n]) for n in others)
    pattern = first.rsplit(".", 1)[0] + ".*"  # fnmatch: the layer's weight and bias
    out = finetune(gm, TRAIN, epochs=1, lr=5e-3, batch_size=32, freeze=pattern,
                   weight_decay=0.1)
    got = out.module.state_dict()
    assert all(torch.equal(got[n], start[n]) for n in names if n.startswith(pattern[:-1]))


def test_freeze_pattern_matching_nothing_is_a_typed_error():
    gm = _graph(mlp())
    with pytest.raises(TrainingError, match="matches no parameter"):
        finetune(gm, TRAIN, epochs=1, freeze=["*word_embeddings.weight"])
    with pytest.raises(TrainingError, match="fnmatch"):
        finetune(gm, TRAIN, epochs=1, freeze=[3])
