"""Shared by the tests/lowering/test_tensorrt_*.py files: the fake ``tensorrt`` module
installed in sys.modules, and a CPU "GPU" for the runner (the fake engine reads and writes
CPU memory at the addresses it is given; the real CUDA path runs only in tests/gpu)."""

from __future__ import annotations

import sys

import fake_tensorrt
import pytest
import torch

from fxopt.lowering import tensorrt as backend
from fxopt.lowering import trt_runtime

FAKE_GPU = {"name": "Fake GPU", "compute_capability": "9.0"}


def install(monkeypatch: pytest.MonkeyPatch, version: str = "10.7.0.23", gpu: dict = FAKE_GPU):
    """Put a fresh fake tensorrt ``version`` in sys.modules and a CPU device under the
    runner; returns the fake module (its ``calls`` record what the backend did)."""
    trt = fake_tensorrt.make(version)
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    cpu = lambda device=None: torch.device("cpu")  # noqa: E731
    for mod in (backend, trt_runtime):
        monkeypatch.setattr(mod, "cuda_device", cpu)
        monkeypatch.setattr(mod, "gpu_info", lambda device: dict(gpu))
    monkeypatch.setattr(trt_runtime, "_stream_handle", lambda device: 0)
    monkeypatch.setattr(trt_runtime, "_synchronize", lambda device: None)
    return trt


def calls(trt, what: str) -> list[tuple]:
    return [c[1:] for c in trt.calls if c[0] == what]
