"""The built-in model zoo: every model builds, runs, is deterministic and captures as declared."""

from __future__ import annotations

import pytest
import torch
import torch.fx
from torch import nn

from fxopt import zoo
from fxopt.errors import SpecError

NAMES = zoo.names()


def _run(model: nn.Module, inputs: tuple) -> torch.Tensor:
    with torch.no_grad():
        out = model(*inputs)
    assert isinstance(out, torch.Tensor)
    return out


def test_names_cover_the_families_and_keep_heavy_models_out_by_default() -> None:
    assert NAMES == [
        "resnet",
        "mobilenet",
        "densenet",
        "shufflenet",
        "decoder",
        "transformer",
        "gqa",
        "mlp",
        "dynamic",
        "efficientnet",
        "convnext",
        "swin",
    ]
    assert "resnet50" not in NAMES
    assert zoo.names(include_heavy=True) == [*NAMES, "resnet50"]
    assert all(not zoo.get(name).heavy for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_forward_is_finite_healthy_and_input_dependent(name: str) -> None:
    spec = zoo.get(name)
    model = spec.build()
    assert spec.name == name
    assert not model.training
    assert not any(m.training for m in model.modules())
    out = _run(model, spec.example_inputs())
    assert out.shape[0] == spec.batch
    assert torch.isfinite(out).all()
    # A BN net with default statistics collapses to ~1e-10 outputs; checks on it mean nothing.
    assert 1e-2 < out.std().item() < 1e3
    # Outputs must depend on the input, not be a bias shared by the whole batch.
    across_batch = (out - out.mean(dim=0)).std()
    assert across_batch > 0.1 * out.std()


@pytest.mark.parametrize("name", NAMES)
def test_build_and_inputs_are_deterministic(name: str) -> None:
    spec = zoo.get(name)
    first, second = spec.build(), spec.build()
    assert first is not second
    state1, state2 = first.state_dict(), second.state_dict()
    assert state1.keys() == state2.keys()
    for key in state1:
        assert torch.equal(state1[key], state2[key]), key
    for a, b in zip(spec.example_inputs(), spec.make_inputs(spec.batch), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", NAMES)
def test_build_and_inputs_leave_the_global_rng_alone(name: str) -> None:
    spec = zoo.get(name)
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    spec.build()
    spec.example_inputs()
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize("name", [n for n in NAMES if zoo.get(n).dynamic_batch])
def test_dynamic_batch_models_run_at_another_batch_size(name: str) -> None:
    spec = zoo.get(name)
    inputs = spec.make_inputs(3)
    assert all(t.shape[0] == 3 for t in inputs)
    out = _run(spec.build(), inputs)
    assert out.shape[0] == 3
    assert torch.isfinite(out).all()


@pytest.mark.parametrize(
    "name", ["resnet", "mobilenet", "densenet", "shufflenet", "decoder", "dynamic"]
)
def test_batchnorm_is_calibrated_and_affine_is_non_trivial(name: str) -> None:
    model = zoo.get(name).build()
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms
    for bn in norms:
        assert bn.momentum == 0.1
        assert not torch.allclose(bn.running_var, torch.ones_like(bn.running_var))
        assert not torch.allclose(bn.running_mean, torch.zeros_like(bn.running_mean))
        assert not torch.allclose(bn.weight, torch.ones_like(bn.weight))
        assert not torch.allclose(bn.bias, torch.zeros_like(bn.bias))


@pytest.mark.parametrize("name", [n for n in NAMES if zoo.get(n).symbolic])
def test_symbolic_trace_matches_eager(name: str) -> None:
    model, inputs = zoo.load(name)
    gm = torch.fx.symbolic_trace(model)
    gm.graph.lint()
    torch.testing.assert_close(_run(gm, inputs), _run(model, inputs), rtol=1e-5, atol=1e-6)


def test_dynamic_needs_torch_export() -> None:
    spec = zoo.get("dynamic")
    assert not spec.symbolic
    model, inputs = zoo.load("dynamic")
    with pytest.raises(torch.fx.proxy.TraceError):
        torch.fx.symbolic_trace(model)
    exported = torch.export.export(model, inputs, strict=False)
    expected = _run(model, inputs)
    torch.testing.assert_close(_run(exported.module(), inputs), expected, rtol=1e-5, atol=1e-6)


def test_load_returns_a_model_and_its_example_inputs() -> None:
    model, inputs = zoo.load("mlp")
    assert isinstance(model, nn.Module)
    assert isinstance(inputs, tuple)
    assert inputs[0].shape == (4, 64)
    assert torch.equal(inputs[0], zoo.get("mlp").example_inputs()[0])


@pytest.mark.parametrize(
    ("name", "shapes", "dtype"),
    [
        ("resnet", [(2, 3, 32, 32)], torch.float32),
        ("transformer", [(2, 16)], torch.int64),
        ("gqa", [(2, 16, 64)], torch.float32),
        ("mlp", [(4, 64)], torch.float32),
    ],
)
def test_example_input_shapes(name: str, shapes: list, dtype: torch.dtype) -> None:
    inputs = zoo.get(name).example_inputs()
    assert [tuple(t.shape) for t in inputs] == shapes
    assert all(t.dtype == dtype for t in inputs)


def test_decoder_output_is_image_shaped() -> None:
    model, (x,) = zoo.load("decoder")
    assert _run(model, (x,)).shape == x.shape


def test_unknown_name_raises_spec_error_listing_known_names() -> None:
    with pytest.raises(SpecError) as info:
        zoo.get("nope")
    message = str(info.value)
    assert "'nope'" in message
    for name in zoo.names(include_heavy=True):
        assert name in message


def test_resnet50_is_heavy_and_resnet50_sized() -> None:
    spec = zoo.get("resnet50")
    assert spec.heavy
    assert spec.batch == 1
    assert tuple(spec.example_inputs()[0].shape) == (1, 3, 224, 224)
    # Build only: a forward pass belongs in benchmarks, not in every test run.
    params = sum(p.numel() for p in spec.build().parameters())
    assert 23_000_000 < params < 28_000_000
