"""StructureKeeper on zoo graphs after sparsify / quantize / prune / with batch norm, in both
capture modes: what the passes made survives training, and the finished graph lowers to
ONNX and is verified in ONNX Runtime."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.errors import TrainingError
from fxopt.ops import fetch_attr, op_of
from fxopt.passes.sparsify import validate_pattern, violations_2to4
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.train.structure import StructureKeeper

MODES = ("symbolic", "export")


@pytest.fixture(scope="module")
def resnet():
    return zoo.load("resnet")


def _calibration(x: tuple) -> list[tuple]:
    gen = torch.Generator().manual_seed(7)
    return [x] + [tuple(torch.randn(t.shape, generator=gen) for t in x) for _ in range(3)]


def _train(keeper: StructureKeeper, model: nn.Module, steps: int = 3, *, lr: float = 0.05,
           opt_cls=torch.optim.SGD, shape=(4, 3, 32, 32), classes=10, after_step=True,
           **opt_kw) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = opt_cls(params, lr=lr, **({"momentum": 0.9} if opt_cls is torch.optim.SGD else {}),
                  **opt_kw)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x = torch.randn(shape, generator=gen)
        y = torch.randint(0, classes, (shape[0],), generator=gen)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        if after_step:
            keeper.after_step(model)


def _every_trainable_gets_a_gradient(model: nn.Module, x: torch.Tensor) -> None:
    """What DistributedDataParallel needs (else it stops at the second step)."""
    model.zero_grad()
    model(x).float().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    model.zero_grad()


def _weights(gm) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in gm.state_dict().items()}


def _lower_onnx(gm, inputs, tmp_path, name="m"):
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / f"{name}.onnx")
    assert art.manifest["verified"]  # ORT output checked against the graph by lower()
    torch.testing.assert_close(torch.as_tensor(art(*inputs)), gm(*inputs), rtol=0.05, atol=0.05)
    return art


# --------------------------------------------------------------------------- sparsity
@pytest.mark.parametrize("mode", MODES)
def test_unstructured_zeros_stay_exact_with_adamw(resnet, mode, tmp_path):
    model, x = resnet
    gm = fxopt.optimize(model, x, "default,sparsify(ratio=0.7)", mode=mode).module
    zeros_before = {n: fetch_attr(gm, t) == 0 for n, t in
                    StructureKeeper.from_graph(gm).masked_nodes.items()}
    keeper = StructureKeeper.from_graph(gm)
    assert keeper.describe()["masks"]["sparsity"] == pytest.approx(0.7, abs=0.01)
    before = _weights(gm)
    trained = keeper.prepare(gm)
    _train(keeper, trained, opt_cls=torch.optim.AdamW, lr=1e-2, weight_decay=0.1)
    out = keeper.finish(trained)
    changed = [k for k, v in _weights(out).items() if k in before and not torch.equal(v, before[k])]
    assert changed  # it trained
    for name, target in keeper.masked_nodes.items():
        w = fetch_attr(out, target)
        assert torch.equal(w == 0, zeros_before[name]), name  # the same zeros, exactly
        assert not w.requires_grad
    out.graph.lint()
    _lower_onnx(out, x, tmp_path)


def test_gradients_are_masked_and_after_step_is_needed(resnet):
    model, x = resnet
    gm = fxopt.optimize(model, x, "default,sparsify(ratio=0.5)").module
    keeper = StructureKeeper.from_graph(gm)
    trained = keeper.prepare(gm)
    target = next(iter(keeper.masks))
    mask = keeper.masks[target]
    F.cross_entropy(trained(torch.randn(2, 3, 32, 32)), torch.tensor([1, 2])).backward()
    grad = fetch_attr(trained, target).grad
    assert grad is not None and torch.all(grad[~mask] == 0) and grad[mask].abs().sum() > 0
    with torch.no_grad():  # an update that ignores gradients (e.g. a custom optimizer)
        fetch_attr(trained, target).add_(0.01)
    with pytest.raises(TrainingError, match="nonzero after training; call keeper.after_step"):
        keeper.finish(copy.deepcopy(trained))
    keeper.after_step(trained)
    assert torch.all(fetch_attr(trained, target)[~mask] == 0)
    keeper.finish(trained)


@pytest.mark.parametrize("mode", MODES)
def test_two_four_stays_two_four_and_lowers(mode, tmp_path):
    model, x = zoo.load("mlp")
    gm = fxopt.optimize(model, x, "default,sparsify(pattern='2:4')", mode=mode).module
    keeper = StructureKeeper.from_graph(gm)
    assert keeper.pattern == "2:4" and keeper.masked_nodes
    trained = keeper.prepare(gm)
    _train(keeper, trained, steps=4, shape=(8, 64), opt_cls=torch.optim.Adam, lr=1e-2)
    out = keeper.finish(trained)
    assert set(validate_pattern(out, "2:4")) == set(keeper.masked_nodes)
    assert all(violations_2to4(fetch_attr(out, t)) == 0 for t in keeper.masks)
    _lower_onnx(out, x, tmp_path)


def test_lost_masks_fall_back_to_the_zeros(resnet):
    model, x = resnet
    gm = fxopt.optimize(model, x, "default,sparsify(ratio=0.6)").module
    for n in gm.graph.nodes:
        n.meta.pop("fxopt_sparsity_mask", None)  # as in a graph that was reloaded
    keeper = StructureKeeper.from_graph(gm)
    assert keeper.mask_source == "zeros" and keeper.masks
    trained = keeper.prepare(gm)
    _train(keeper, trained)
    keeper.finish(trained)
    assert keeper.describe()["masks"]["sparsity"] == pytest.approx(0.6, abs=0.02)


# --------------------------------------------------------------------------- quantization
@pytest.mark.parametrize(("mode", "qat"), [("symbolic", "auto"), ("export", "learnable")])
def test_qat_trains_through_fake_quant_and_freezes(resnet, mode, qat, tmp_path):
    model, x = resnet
    gm = fxopt.optimize(model, x, "default,sparsify(pattern='2:4'),quantize(scheme=int8)",
                        mode=mode, calibration=_calibration(x)).module
    keeper = StructureKeeper.from_graph(gm, qat=qat)
    assert keeper.qat == ("observed" if qat == "auto" else "learnable")
    before = _weights(gm)
    trained = keeper.prepare(gm)
    fqs = [m for m in trained.modules() if isinstance(m, FakeQuantize)]
    assert all(m.mode == "qat" for m in fqs)
    _every_trainable_gets_a_gradient(trained, torch.randn(2, 3, 32, 32))
    _train(keeper, trained, lr=0.01)
    out = keeper.finish(trained)
    assert all(m.mode == "quantize" for m in out.modules() if isinstance(m, FakeQuantize))
    after = _weights(out)
    moved = [k for k in before if k in after and before[k].shape == after[k].shape
             and before[k].is_floating_point() and not torch.equal(before[k], after[k])]
    assert moved  # the float weights behind the fake-quant nodes trained
    validate_pattern(out, "2:4", layers=list(keeper.masked_nodes))  # through the fake-quant
    assert keeper.describe()["qat"]["fake_quants"] == len(fqs)
    assert keeper.describe()["layers_checked"] > 0
    _lower_onnx(out, x, tmp_path)


def test_quantized_graph_errors(resnet):
    model, x = resnet
    gm = fxopt.optimize(model, x, "default,quantize(scheme=int8)",
                        calibration=_calibration(x)).module
    with pytest.raises(TrainingError, match="qat='auto'"):
        StructureKeeper.from_graph(gm, qat=None)
    plain = fxopt.optimize(model, x, "default").module
    with pytest.raises(TrainingError, match="no fake-quant node"):
        StructureKeeper.from_graph(plain, qat="learnable")
    mlp, xm = zoo.load("mlp")
    dyn = fxopt.optimize(mlp, xm, "default,quantize(scheme=dynamic_int8)").module
    with pytest.raises(TrainingError, match="scheme=dynamic_int8"):
        StructureKeeper.from_graph(dyn)
    with pytest.raises(TrainingError, match="GraphModule"):
        StructureKeeper.from_graph(model)
    with pytest.raises(TrainingError, match="qat="):
        StructureKeeper.from_graph(plain, qat="yes")


# --------------------------------------------------------------------------- batch norm
@pytest.mark.parametrize("mode", MODES)
def test_batch_norm_trains_in_train_mode_and_is_frozen_in_eval(resnet, mode, tmp_path):
    model, x = resnet
    gm = fxopt.optimize(model, x, "cleanup", mode=mode).module
    keeper = StructureKeeper.from_graph(gm)
    assert keeper.bn_count > 0 and not keeper.bn_folded
    bn_buffers = [k for k in gm.state_dict() if k.replace("_", ".").endswith("running.mean")]
    assert bn_buffers
    before = _weights(gm)
    trained = keeper.prepare(gm)
    _every_trainable_gets_a_gradient(trained, torch.randn(4, 3, 32, 32))
    trained.load_state_dict(before)  # that forward moved the running statistics
    trained.eval()  # validation mid-training: running statistics are used and kept
    with torch.no_grad():
        trained(torch.randn(4, 3, 32, 32))
    assert all(torch.equal(trained.state_dict()[k], before[k]) for k in bn_buffers)
    trained.train()
    _train(keeper, trained, steps=2)
    moved = [k for k in bn_buffers if not torch.equal(trained.state_dict()[k], before[k])]
    assert moved == bn_buffers  # every BN updated its running statistics
    out = keeper.finish(trained)
    kinds = [op_of(n).kind for n in out.graph.nodes if n.op.startswith("call")]
    assert kinds.count("batch_norm") == keeper.bn_count  # the original nodes are back
    assert not any(name.startswith("fxopt_bn_train") for name, _ in out.named_modules())
    y1, y2 = out(*x), out(*x)
    torch.testing.assert_close(y1, y2)  # inference BN: deterministic, nothing moves
    _lower_onnx(out, x, tmp_path)


def test_frozen_batch_norm_keeps_statistics(resnet):
    model, x = resnet
    gm = fxopt.optimize(model, x, "cleanup", mode="symbolic").module
    keeper = StructureKeeper.from_graph(gm, bn="frozen")
    stats = {k: v.clone() for k, v in gm.state_dict().items() if "running" in k}
    trained = keeper.prepare(gm)
    _train(keeper, trained, steps=2)
    assert all(torch.equal(trained.state_dict()[k], v) for k, v in stats.items())
    bn_weights = [p for n, p in trained.named_parameters() if n.endswith("1.weight")]
    assert bn_weights and all(p.requires_grad for p in bn_weights)
    keeper.finish(trained)
    with pytest.raises(TrainingError, match="bn="):
        StructureKeeper.from_graph(gm, bn="sync")


def test_folded_batch_norm_is_not_resurrected(resnet):
    model, x = resnet
    gm = fxopt.optimize(model, x, "default").module
    keeper = StructureKeeper.from_graph(gm)
    assert keeper.bn_count == 0 and keeper.bn_folded
    trained = keeper.prepare(gm)
    _train(keeper, trained, steps=1)
    trained.add_module("bn_back", nn.BatchNorm2d(10))  # simulate a bug re-adding a BN
    out_node = next(n for n in trained.graph.nodes if n.op == "output")
    with trained.graph.inserting_before(out_node):
        y = out_node.args[0]
        bn = trained.graph.call_module("bn_back", (trained.graph.call_method("unsqueeze", (
            trained.graph.call_method("unsqueeze", (y, -1)), -1)),))
        trained.graph.call_method("flatten", (bn, 1))
    with pytest.raises(TrainingError, match="a folded batch norm came back"):
        keeper.finish(trained)


# --------------------------------------------------------------------------- dropout
def test_dropout_is_off_unless_asked():
    model, x = zoo.load("mlp")
    gm = fxopt.capture(model, x, mode="symbolic")  # cleanup would drop the eval-mode dropout
    assert [n for n in gm.graph.nodes if op_of(n).kind == "dropout"]
    xb = torch.randn(16, 64)
    off = StructureKeeper.from_graph(copy.deepcopy(gm)).prepare(copy.deepcopy(gm))
    assert off.training
    torch.testing.assert_close(off(xb), off(xb))
    on = StructureKeeper.from_graph(gm, dropout=True).prepare(copy.deepcopy(gm))
    assert not torch.allclose(on(xb), on(xb))


# --------------------------------------------------------------------------- pruning
@pytest.mark.parametrize("mode", MODES)
def test_pruned_shapes_stay_pruned(resnet, mode, tmp_path):
    model, x = resnet
    gm = fxopt.optimize(model, x, "default,prune(ratio=0.5)", mode=mode).module
    shapes = {k: v.shape for k, v in gm.state_dict().items()}
    keeper = StructureKeeper.from_graph(gm)
    trained = keeper.prepare(gm)
    _train(keeper, trained)
    out = keeper.finish(trained)
    assert {k: v.shape for k, v in out.state_dict().items()} == shapes
    _lower_onnx(out, x, tmp_path)
    # a layer that changed shape (e.g. a user re-grew it) is refused, by name
    keeper2 = StructureKeeper.from_graph(out)
    trained2 = keeper2.prepare(out)
    node = next(n for n in trained2.graph.nodes if n.op.startswith("call")
                and op_of(n).kind == "conv")
    target = next(iter(keeper2.shapes[node.name]))
    view = op_of(node)
    w = view.params[target]
    view.set_param(target, torch.zeros((w.shape[0] + 1, *w.shape[1:])))
    with pytest.raises(TrainingError, match=rf"\({node.name}\): weight is"):
        keeper2.finish(trained2)


def test_prepare_twice_is_refused(resnet):
    model, x = resnet
    gm = fxopt.optimize(model, x, "default").module
    keeper = StructureKeeper.from_graph(gm)
    keeper.prepare(gm)
    with pytest.raises(TrainingError, match="already prepared"):
        keeper.prepare(gm)
    assert keeper.describe()["trainable_params"] == sum(
        p.numel() for p in gm.parameters() if p.requires_grad)
