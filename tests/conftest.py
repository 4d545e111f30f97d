"""Shared fixtures: seeded RNG per test, zoo models and their captures cached per session."""

from __future__ import annotations

import copy
import functools
import os

import pytest
import torch
import torch.fx as fx
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.passes.base import REGISTRY

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two workers on two cores: one intra-op thread each, or they oversubscribe the CPU
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@functools.cache
def _zoo_model(name: str) -> tuple[nn.Module, tuple]:
    return zoo.load(name)


@functools.cache
def _zoo_capture(name: str, mode: str) -> fx.GraphModule:
    model, inputs = _zoo_model(name)
    return fxopt.capture(model, inputs, mode=mode)


def _zoo_case(name: str, mode: str) -> tuple[nn.Module, tuple, fx.GraphModule]:
    model, inputs = _zoo_model(name)
    return model, inputs, copy.deepcopy(_zoo_capture(name, mode))


def _fresh_inputs(inputs: tuple, batch: int | None = None) -> tuple:
    out = []
    for x in inputs:
        shape = list(x.shape)
        if batch is not None:
            shape[0] = batch
        if x.is_floating_point():
            out.append(torch.randn(shape, dtype=x.dtype))
        else:
            out.append(torch.randint(int(x.min()), int(x.max()) + 1, shape, dtype=x.dtype))
    return tuple(out)


@pytest.fixture(scope="session")
def zoo_model():
    """``zoo_model(name) -> (model, example_inputs)``, built once per session.

    Tests must not modify the model; build a fresh one with ``zoo.load`` to do that.
    """
    return _zoo_model


@pytest.fixture(scope="session")
def zoo_case():
    """``zoo_case(name, mode) -> (model, example_inputs, gm)``; ``gm`` is a private copy of
    the model's capture in ``mode`` (captured once per session), free to mutate."""
    return _zoo_case


@pytest.fixture(scope="session")
def fresh_inputs():
    """``fresh_inputs(inputs, batch=None)``: new random inputs like ``inputs`` (token ids stay
    in range), optionally at another batch size; drawn from the per-test seeded RNG."""
    return _fresh_inputs


@pytest.fixture
def temp_pass():
    """Register test-only passes; they are removed from the registry afterwards.

    Usage: ``temp_pass("name", fn, Semantics.EXACT)`` returns the name.
    """
    added: list[str] = []

    def register(name: str, fn, semantics=fxopt.Semantics.EXACT) -> str:
        assert name not in REGISTRY, f"test pass {name} would shadow a real pass"
        fxopt.register_pass(name, semantics)(fn)
        added.append(name)
        return name

    yield register
    for name in added:
        REGISTRY.pop(name, None)
