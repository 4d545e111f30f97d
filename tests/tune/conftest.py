"""Fixtures for the tuner's tests: the zoo MLP (small and fast to build in every runtime)
and a search space narrowed to ONNX Runtime fp32 / static int8."""

from __future__ import annotations

import pytest

from fxopt import zoo
from fxopt.tune import Space


@pytest.fixture(scope="module")
def mlp():
    return zoo.load("mlp")


@pytest.fixture
def small_space():
    return Space(runtimes=("onnx",), quant=("int8",), precisions=(), prune=0.0,
                 max_float_layers=0, plain=False)
