"""Quantization-aware training: gradients through the fake-quant nodes, training that
learns, freezing back to the PTQ inference format (scales that match the trained
weights), ONNX Runtime and eager artifacts of the result, and every user mistake."""

from __future__ import annotations

import copy
import functools
import operator

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.bench import threads
from fxopt.errors import QuantizationError
from fxopt.ops import op_of
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.quant.observers import make_observer
from fxopt.quant.qat import CurrentWeightObserver, freeze_qat, prepare_qat, weight_fake_quants
from fxopt.quant.static import fake_quant_modules
from fxopt.verify import cosine


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # tiny models: a second intra-op thread only adds OpenMP contention on a busy machine
    with threads(1):
        yield


def _tiny() -> nn.Module:
    """conv-BN-ReLU, max pool, conv-ReLU, linear on 1x8x8 inputs: every op kind the ORT
    placement treats specially (fused ReLU, shared max-pool scales, int32 biases)."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(),
                         nn.Flatten(), nn.Linear(8 * 4 * 4, 3))


def _task(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    """An easy synthetic task: one of three fixed 8x8 patterns under noise; the class
    says which."""
    gen = torch.Generator().manual_seed(3)
    patterns = torch.randn(3, 1, 8, 8, generator=gen)
    y = torch.arange(n) % 3
    return patterns[y] + 0.5 * torch.randn(n, 1, 8, 8, generator=gen), y


@functools.cache
def _ptq(name: str, mode: str = "symbolic", target: str = "ort") -> fx.GraphModule:
    """The PTQ int8 GraphModule of ``name`` ("tiny" or a zoo model), built once."""
    if name == "tiny":
        torch.manual_seed(0)
        model = _tiny()
        x, _ = _task()
        model.train()(x)  # data-driven BN statistics (see DESIGN.md pitfalls)
        model.eval()
        inputs, batches = (x[:8],), [x[i:i + 32] for i in range(0, 96, 32)]
    else:
        model, inputs = zoo.load(name)
        gen = torch.Generator().manual_seed(1)
        batches = [torch.randn(inputs[0].shape, generator=gen) for _ in range(3)]
    pipeline = f"default,quantize(scheme=int8,target={target},keep_head=false)"
    res = fxopt.optimize(model, inputs, pipeline, mode=mode, calibration=[inputs[0], *batches])
    return res.module


def _fresh(name: str, mode: str = "symbolic", target: str = "ort") -> fx.GraphModule:
    return copy.deepcopy(_ptq(name, mode, target))


def _inputs(gm: fx.GraphModule, batch: int = 8) -> torch.Tensor:
    shape = next(n for n in gm.graph.nodes if n.op == "placeholder").meta["shape"]
    return torch.randn(batch, *shape[1:])


def _step(gm: fx.GraphModule, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(gm(x), y)
    loss.backward()
    return loss


def _trainable(gm: fx.GraphModule) -> dict[str, nn.Parameter]:
    return {n: p for n, p in gm.named_parameters() if p.requires_grad}


def _pool_outputs(gm: fx.GraphModule) -> dict[str, str]:
    """Fake-quant nodes on a max pool's output -> the one on its input (ORT wants both
    sides of a uint8 MaxPool to share a scale, and freeze_qat re-applies that)."""
    out = {}
    for n in gm.graph.nodes:
        src = n.args[0] if n.op == "call_module" and n.args else None
        if isinstance(src, fx.Node) and src.op != "placeholder" and op_of(src).kind in (
                "max_pool", "adaptive_max_pool"):
            if isinstance(gm.get_submodule(n.target), FakeQuantize):
                out[str(n.target)] = str(src.args[0].target)
    return out


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_gradients_reach_every_quantized_weight_and_bias(mode):
    gm = prepare_qat(_fresh("resnet", mode))
    assert gm.training
    weights = weight_fake_quants(gm)
    assert len(weights) == 10  # 9 convs and the classifier
    assert {fq.mode for fq in fake_quant_modules(gm).values()} == {"qat"}
    for _, w_node in weights.values():
        assert operator.attrgetter(w_node.target)(gm).requires_grad
    x = _inputs(gm)
    _step(gm, x, torch.randint(0, 10, (len(x),)))
    read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    used = {name: p for name, p in _trainable(gm).items() if name in read}
    assert len(used) == 20  # 10 weights + 10 biases (float again where PTQ made them int32)
    for name, p in used.items():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    for fq, w_node in weights.values():  # each weight is quantized with its current scale
        w = operator.attrgetter(w_node.target)(gm)
        obs = make_observer(fq.observer_kind, ch_axis=fq.axis)
        obs(w.detach())
        torch.testing.assert_close(fq.scale, obs.calculate_qparams()[0].reshape(fq.scale.shape))


def test_learnable_scales_are_parameters_with_gradients():
    gm = prepare_qat(_fresh("resnet"), learnable=True)
    fqs = fake_quant_modules(gm)
    assert all(isinstance(fq.scale, nn.Parameter) and fq.learnable for fq in fqs.values())
    trainable = set(_trainable(gm).values())
    assert all(fq.scale in trainable for fq in fqs.values())  # gm.parameters() has them
    x = _inputs(gm)
    _step(gm, x, torch.randint(0, 10, (len(x),)))
    weights = weight_fake_quants(gm)
    for path, fq in fqs.items():
        if path in weights:
            assert fq.scale.grad is not None and fq.scale.grad.abs().sum() > 0, path
    with_grad = [p for p, fq in fqs.items() if p not in weights
                 and fq.scale.grad is not None and fq.scale.grad.abs() > 0]
    assert len(with_grad) >= len(fqs) - len(weights) - 2, with_grad


def test_a_few_steps_of_qat_reduce_the_loss():
    gm = prepare_qat(_fresh("tiny"))
    x, y = _task()
    opt = torch.optim.SGD(gm.parameters(), lr=0.05, momentum=0.9)
    with torch.no_grad():
        before = F.cross_entropy(gm(x), y).item()
    for _ in range(4):
        for i in range(0, len(x), 32):
            opt.zero_grad()
            _step(gm, x[i:i + 32], y[i:i + 32])
            opt.step()
    freeze_qat(gm)
    with torch.no_grad():
        after = F.cross_entropy(gm(x), y).item()
    assert after < 0.7 * before, (before, after)


# --------------------------------------------------------------------------- freezing


def _train(gm: fx.GraphModule, steps: int = 6, lr: float = 0.05) -> fx.GraphModule:
    x, y = _task()
    opt = torch.optim.SGD(gm.parameters(), lr=lr)
    for i in range(steps):
        opt.zero_grad()
        _step(gm, x[(i % 3) * 32:(i % 3 + 1) * 32], y[(i % 3) * 32:(i % 3 + 1) * 32])
        opt.step()
    return gm


@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_freeze_qat_scales_match_the_trained_weights(mode):
    ptq = _fresh("tiny", mode)
    gm = _train(prepare_qat(copy.deepcopy(ptq)))
    activations = {p: fq.scale.clone() for p, fq in fake_quant_modules(gm).items()
                   if p not in weight_fake_quants(gm)}
    assert freeze_qat(gm) is gm
    gm.graph.lint()
    assert not gm.training
    assert not any(p.requires_grad for p in gm.parameters())
    fqs = fake_quant_modules(gm)
    assert {fq.mode for fq in fqs.values()} == {"quantize"}
    assert all(fq.observer is None and not fq.learnable for fq in fqs.values())
    changed = 0
    for path, (fq, w_node) in weight_fake_quants(gm).items():
        w = operator.attrgetter(w_node.target)(gm)
        obs = make_observer(fq.observer_kind, bits=fq.bits, signed=fq.signed,
                            symmetric=fq.symmetric, ch_axis=fq.axis)
        obs(w)
        scale, zp = obs.calculate_qparams()
        torch.testing.assert_close(fq.scale, scale.reshape(fq.scale.shape), rtol=0, atol=0)
        assert torch.equal(fq.zero_point, zp.reshape(fq.zero_point.shape).int())
        old = dict(weight_fake_quants(ptq))[path][0]
        changed += not torch.equal(fq.scale, old.scale)
    assert changed  # training moved the weights, and the scales followed
    shared = _pool_outputs(gm)
    for path, scale in activations.items():  # the last observed scale, except after a max
        if path not in shared:               # pool: that one takes the pool input's
            assert torch.equal(fqs[path].scale, scale), path
    for path, source in shared.items():
        assert torch.equal(fqs[path].scale, fqs[source].scale)


def test_int32_biases_come_back_with_the_new_scales():
    ptq = _fresh("tiny")
    dq = "fxopt.dequantize_int32.default"
    count = sum(1 for n in ptq.graph.nodes if str(n.target) == dq)
    gm = prepare_qat(copy.deepcopy(ptq))
    assert not any(str(n.target) == dq for n in gm.graph.nodes)  # float, trainable
    freeze_qat(_train(gm))
    nodes = [n for n in gm.graph.nodes if str(n.target) == dq]
    assert len(nodes) == count
    for node in nodes:  # scale = input scale x weight scale, with the trained scales
        conv = next(iter(node.users))
        x_fq, w_fq = (gm.get_submodule(a.target) for a in conv.args[:2])
        scale = operator.attrgetter(node.args[1].target)(gm)
        torch.testing.assert_close(scale, (x_fq.scale * w_fq.scale).expand_as(scale))


def test_prepare_then_freeze_without_training_changes_nothing():
    ptq = _fresh("tiny")
    x = _inputs(ptq)
    gm = freeze_qat(prepare_qat(copy.deepcopy(ptq)))
    with torch.no_grad():
        assert torch.equal(gm(x), ptq(x))


def test_learnable_scales_are_kept_at_freeze():
    gm = prepare_qat(_fresh("tiny"), learnable=True)
    fqs = fake_quant_modules(gm)
    opt = torch.optim.SGD([fq.scale for fq in fqs.values()], lr=1e-4)
    x, y = _task()
    opt.zero_grad()
    _step(gm, x, y)
    opt.step()
    learned = {p: fq.scale.detach().abs().clone() for p, fq in fqs.items()}
    freeze_qat(gm)
    for path, fq in fake_quant_modules(gm).items():
        assert not isinstance(fq.scale, nn.Parameter) and fq.mode == "quantize"
        if path not in _pool_outputs(gm):
            assert torch.equal(fq.scale, learned[path]), path


# --------------------------------------------------------------------------- artifacts


@pytest.mark.parametrize("target", ["ort", "tensorrt"])
def test_onnx_export_of_the_qat_graph_verifies_in_onnx_runtime(tmp_path, target):
    gm = freeze_qat(_train(prepare_qat(_fresh("tiny", target=target))))
    x = _inputs(gm)
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "qat.onnx")  # verifies, or raises
    with torch.no_grad():
        want = gm(x)
    assert cosine(art(x), want) > 0.99


def test_eager_artifact_round_trip(tmp_path):
    gm = freeze_qat(_train(prepare_qat(_fresh("tiny"))))
    x = _inputs(gm)
    fxopt.lower(gm, "eager", (x,), path=tmp_path / "qat")
    loaded = fxopt.load(tmp_path / "qat")
    with torch.no_grad():
        assert torch.equal(loaded(x), gm(x))


def test_resnet_qat_exports_to_onnx(tmp_path):
    gm = prepare_qat(_fresh("resnet"))
    x = _inputs(gm, 4)
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        _step(gm, x, torch.arange(4))
        opt.step()
    freeze_qat(gm)
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "resnet.onnx")
    with torch.no_grad():
        assert cosine(art(x), gm(x)) > 0.99


# --------------------------------------------------------------------------- options, errors


def test_prepare_twice_is_a_no_op_and_the_optimizer_keeps_working():
    gm = prepare_qat(_fresh("tiny"), learnable=True)
    params = list(gm.parameters())
    assert prepare_qat(gm, learnable=True) is gm
    assert [id(p) for p in gm.parameters()] == [id(p) for p in params]


def test_prepare_with_the_other_learnable_setting_says_freeze_first():
    gm = prepare_qat(_fresh("tiny"))
    with pytest.raises(QuantizationError, match=r"freeze_qat\(gm\) before"):
        prepare_qat(gm, learnable=True)
    freeze_qat(gm)
    prepare_qat(gm, learnable=True)  # fine once frozen


def test_activation_observer_option():
    gm = prepare_qat(_fresh("tiny"), activation_observer="moving_average")
    weights = weight_fake_quants(gm)
    for path, fq in fake_quant_modules(gm).items():
        if path in weights:
            assert isinstance(fq.observer, CurrentWeightObserver)
            assert fq.observer_kind == "minmax"
        else:
            assert fq.observer_kind == "moving_average"
    freeze_qat(_train(gm))
    with pytest.raises(QuantizationError, match="unknown observer"):
        prepare_qat(_fresh("tiny"), activation_observer="median")
    with pytest.raises(QuantizationError, match="one or the other"):
        prepare_qat(_fresh("tiny"), learnable=True, activation_observer="minmax")


def test_a_float_graph_is_refused_with_how_to_quantize_it(zoo_case):
    _, _, gm = zoo_case("resnet", "symbolic")
    with pytest.raises(QuantizationError, match=r"quantize it first.*quantize\(scheme=int8\)"):
        prepare_qat(gm)
    with pytest.raises(QuantizationError, match="no fake-quant"):
        freeze_qat(gm)


def test_a_dynamic_int8_graph_is_refused_naming_its_scheme(zoo_model):
    model, inputs = zoo_model("mlp")
    gm = fxopt.optimize(model, inputs, "default,quantize(scheme=dynamic_int8)").module
    with pytest.raises(QuantizationError, match="scheme=dynamic_int8"):
        prepare_qat(gm)


def test_a_plain_module_is_refused():
    with pytest.raises(QuantizationError, match="GraphModule"):
        prepare_qat(_tiny())


def test_an_uncalibrated_graph_is_refused(zoo_case):
    from fxopt.quant import static

    _, _, gm = zoo_case("resnet", "symbolic")
    static.prepare(gm, "ort")
    assert any(fq.mode == "observe" for fq in fake_quant_modules(gm).values())
    with pytest.raises(QuantizationError, match="still observing"):
        prepare_qat(gm)


def test_current_weight_observer_forgets_earlier_weights():
    obs = CurrentWeightObserver("minmax", bits=8, signed=True, symmetric=True, ch_axis=0)
    obs(torch.full((2, 3), 10.0))
    obs(torch.ones(2, 3))
    scale, _ = obs.calculate_qparams()
    torch.testing.assert_close(scale, torch.full((2,), 1 / 127.5))


@pytest.mark.parametrize("kind", ["minmax", "moving_average"])
def test_qat_starts_from_the_calibrated_activation_ranges(kind):
    """A training step's forward on a batch the calibration covered quantizes as PTQ did
    (a fresh observer would take that one batch's narrower range and clip elsewhere)."""
    ptq = _fresh("resnet")
    gm = prepare_qat(copy.deepcopy(ptq), activation_observer=kind)
    x = _inputs(ptq, 4) * 0.5  # well inside the calibrated ranges
    with torch.no_grad():
        want = ptq(x)
        got = gm(x)  # train mode: observes, then fake-quantizes with the updated scales
    if kind == "minmax":  # inside the calibrated range: not one scale moved
        assert torch.equal(want, got)
    else:  # a moving average takes 1% of the batch's narrower range per step
        assert cosine(want, got) > 0.9999
    fresh = prepare_qat(copy.deepcopy(ptq), activation_observer=kind)
    for fq in fake_quant_modules(fresh).values():
        if fq.axis is None and fq.observer is not None:
            fq.observer = fq._new_observer()  # what QAT did before: forget the calibration
    full = _inputs(ptq, 4)  # then an ordinary batch, evaluated with the scales reached
    with torch.no_grad():
        fresh(x)
        assert cosine(ptq(full), fresh.eval()(full)) < cosine(ptq(full), gm.eval()(full))
