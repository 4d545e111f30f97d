"""Recovery-training losses against hand computation; feature taps and adapters."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.errors import TrainingError
from fxopt.train.losses import (
    DistillLoss,
    FeatureAdapter,
    check_teacher_outputs,
    cosine_distill,
    feature_pairs,
    kept_channels,
    kl_distill,
    make_adapter,
    output_distill,
    resolve_node,
    tap,
    task_loss,
)


def _softmax(row, T=1.0):
    e = [math.exp(v / T) for v in row]
    return [x / sum(e) for x in e]


def _kl_by_hand(student, teacher, T):
    total = 0.0
    for s, t in zip(student, teacher, strict=True):
        p, q = _softmax(t, T), _softmax(s, T)
        total += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))
    return total / len(student) * T * T


def test_kl_distill_matches_hand_computation():
    s = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]]
    t = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.5]]
    for T in (1.0, 2.0, 4.0):
        got = kl_distill(torch.tensor(s), torch.tensor(t), T).item()
        assert got == pytest.approx(_kl_by_hand(s, t, T), rel=1e-5)
    assert kl_distill(torch.tensor(s), torch.tensor(s), 3.0).item() == pytest.approx(0, abs=1e-6)


def test_kl_distill_averages_over_sequence_rows():
    s, t = torch.randn(2, 3, 5), torch.randn(2, 3, 5)
    want = _kl_by_hand(s.reshape(6, 5).tolist(), t.reshape(6, 5).tolist(), 2.0)
    assert kl_distill(s, t, 2.0).item() == pytest.approx(want, rel=1e-5)


def test_task_loss_cross_entropy_and_user_fn():
    logits = [[2.0, 0.0, -1.0], [0.5, 0.5, 3.0]]
    labels = [0, 2]
    want = -sum(math.log(_softmax(r)[y]) for r, y in zip(logits, labels, strict=True)) / 2
    got = task_loss(torch.tensor(logits), torch.tensor(labels)).item()
    assert got == pytest.approx(want, rel=1e-6)
    mse = task_loss(torch.ones(2, 3), torch.zeros(2, 3), loss_fn=F.mse_loss)
    assert mse.item() == pytest.approx(1.0)
    with pytest.raises(TrainingError, match="integer labels"):
        task_loss(torch.ones(2, 3), torch.zeros(2, 3))


def test_distill_loss_mixes_with_alpha():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    loss = DistillLoss(T=3.0, alpha=0.25)
    total, parts = loss(s, t, y)
    task = F.cross_entropy(s, y).item()
    distill = _kl_by_hand(s.tolist(), t.tolist(), 3.0)
    assert parts["task"] == pytest.approx(task, rel=1e-5)
    assert parts["distill"] == pytest.approx(distill, rel=1e-5)
    assert total.item() == pytest.approx(0.25 * distill + 0.75 * task, rel=1e-5)
    # no labels: distillation alone; no teacher: the task loss alone
    assert loss(s, t, None)[0].item() == pytest.approx(distill, rel=1e-5)
    assert loss(s, None, y)[0].item() == pytest.approx(task, rel=1e-5)
    with pytest.raises(TrainingError, match="nothing to learn"):
        loss(s, None, None)
    with pytest.raises(TrainingError, match="alpha"):
        DistillLoss(alpha=1.5)
    with pytest.raises(TrainingError, match="temperature"):
        DistillLoss(T=0)


def test_gradient_of_distillation_flows_to_student_only():
    s = torch.randn(3, 4, requires_grad=True)
    t = torch.randn(3, 4, requires_grad=True)
    DistillLoss(alpha=1.0)(s, t, None)[0].backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert t.grad is None


def test_check_teacher_outputs():
    check_teacher_outputs(torch.zeros(2, 3), torch.ones(2, 3))
    with pytest.raises(TrainingError, match="shape"):
        check_teacher_outputs(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(TrainingError, match="2 tensor output"):
        check_teacher_outputs(torch.zeros(2, 3), (torch.zeros(2, 3), torch.zeros(2, 3)))


def _cnn():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)).eval()


def test_tap_returns_named_features_and_shares_parameters():
    model, x = _cnn(), torch.randn(2, 1, 8, 8)
    gm = fxopt.capture(model, (x,))
    tapped = tap(gm, ["1", "3"])
    out, (f1, f3) = tapped(x)
    torch.testing.assert_close(out, model(x))
    torch.testing.assert_close(f1, model[:2](x))
    torch.testing.assert_close(f3, model[:4](x))
    assert all(a is b for a, b in zip(tapped.parameters(), gm.parameters(), strict=True))
    with pytest.raises(TrainingError, match="names no node"):
        resolve_node(gm, "layer9")


def test_feature_distillation_slices_teacher_by_prune_plan():
    model, x = _cnn(), torch.randn(2, 1, 8, 8)
    res = fxopt.optimize(model, (x,), "prune(ratio=0.5)")
    plan = res.report.records[-1].stats["plan"]
    student, teacher = tap(res.module, ["1"]), tap(fxopt.capture(model, (x,)), ["1"])
    s_out, (s_feat,) = student(x)
    t_out, (t_feat,) = teacher(x)
    assert s_feat.shape[1] == 4 and t_feat.shape[1] == 8
    node = resolve_node(res.module, "1")
    kept = kept_channels(plan, node, (4, 8))
    removed = plan[0]["members"][0]["indices"]
    assert kept == [i for i in range(8) if i not in removed]
    adapter = make_adapter("1", node, s_feat, t_feat, plan)
    assert adapter.mode == "slice" and adapter.dim == 1
    # a pruned network computes exactly the kept channels of the first layer's features
    a, b = adapter(s_feat, t_feat)
    torch.testing.assert_close(a, b)
    loss = DistillLoss(adapters=[adapter])
    total, parts = loss(s_out, t_out, None, [s_feat], [t_feat])
    assert parts["feature"] == pytest.approx(0.0, abs=1e-10)
    # the second layer's output: the plan's second group
    node3 = resolve_node(res.module, "3")
    assert kept_channels(plan, node3, (4, 8)) == [
        i for i in range(8) if i not in plan[1]["members"][0]["indices"]]


def test_feature_projection_without_plan_is_learned():
    torch.manual_seed(0)
    s, t = torch.randn(4, 3, 5, 5), torch.randn(4, 6, 5, 5)
    adapter = make_adapter("f", None, s, t, None)
    assert adapter.mode == "project" and adapter.dim == 1
    loss = DistillLoss(adapters=[adapter])
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    first = None
    for _ in range(50):
        total, parts = loss(torch.zeros(4, 2), torch.zeros(4, 2), None, [s], [t])
        first = parts["feature"] if first is None else first
        opt.zero_grad()
        total.backward()
        opt.step()
    assert parts["feature"] < first * 0.9
    assert isinstance(adapter, FeatureAdapter)
    with pytest.raises(TrainingError, match="more than one dim"):
        make_adapter("f", None, torch.zeros(2, 3, 4), torch.zeros(2, 4, 5))


def test_feature_pairs():
    assert feature_pairs(None) == []
    assert feature_pairs("a") == [("a", "a")]
    assert feature_pairs({"s": "t"}) == [("s", "t")]


def test_cosine_and_mse_output_losses_by_hand():
    s = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    t = torch.tensor([[0.0, 2.0], [2.0, 2.0]])
    assert cosine_distill(s, t).item() == pytest.approx((1.0 + 0.0) / 2)  # 90 deg, 0 deg
    assert output_distill(s, t, "mse").item() == pytest.approx((1 + 4 + 1 + 1) / 4)
    assert output_distill(s, t, "kl", T=2.0).item() == pytest.approx(
        _kl_by_hand(s.tolist(), t.tolist(), 2.0), rel=1e-5)
    # (N, S, C) token embeddings: one row per token
    s3, t3 = torch.randn(2, 3, 4), torch.randn(2, 3, 4)
    want = (1 - F.cosine_similarity(s3, t3, dim=-1)).mean().item()
    assert cosine_distill(s3, t3).item() == pytest.approx(want, rel=1e-5)


def test_distill_loss_with_cosine_output_loss():
    s, t, y = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]]), torch.tensor([1])
    loss = DistillLoss(alpha=0.5, output_loss="cosine")
    total, parts = loss(s, t, y)
    assert parts["distill"] == pytest.approx(1.0)
    assert total.item() == pytest.approx(0.5 * 1.0 + 0.5 * F.cross_entropy(s, y).item())
    x = torch.randn(3, 4, requires_grad=True)
    DistillLoss(output_loss="cosine")(x, torch.randn(3, 4), None)[0].backward()
    assert x.grad.abs().sum() > 0
    with pytest.raises(TrainingError, match="output_loss='l2'"):
        DistillLoss(output_loss="l2")
