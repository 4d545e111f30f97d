"""ONNX Runtime execution providers for ``lower(gm, "onnx", providers=[...])``: which ones
verification runs on, the typed error naming missing ones, the documented fallback, a
session that silently drops one, and what the manifest records (decision logic on CPU)."""

from __future__ import annotations

import os

import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
from torch import nn

import fxopt
from fxopt.errors import FxoptWarning, LoweringError
from fxopt.lowering import onnx_session
from fxopt.lowering.onnx_session import (
    CPU,
    resolve_providers,
    session_config,
    verification_configs,
)

TRT, CUDA = "TensorrtExecutionProvider", "CUDAExecutionProvider"
GPU_STACK = [TRT, CUDA, CPU]


class _MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def _gm() -> tuple[fx.GraphModule, tuple]:
    torch.manual_seed(0)
    return fx.symbolic_trace(_MLP().eval()), (torch.randn(2, 8),)


# --------------------------------------------------------------------------- decisions


def test_available_providers_are_used_in_order():
    assert resolve_providers(GPU_STACK, GPU_STACK) == (GPU_STACK, [])
    with_options = [(CUDA, {"device_id": 0}), CPU]
    assert resolve_providers(with_options, [CUDA, CPU]) == (with_options, [])


def test_missing_providers_are_named_with_how_to_get_them():
    with pytest.raises(LoweringError) as e:
        resolve_providers(GPU_STACK, ["AzureExecutionProvider", CPU])
    msg = str(e.value)
    assert f"{TRT}, {CUDA} not available here" in msg
    assert "onnxruntime-gpu" in msg and "provider_fallback=True" in msg


def test_fallback_drops_missing_providers_with_a_warning():
    with pytest.warns(FxoptWarning, match=f"lacks {TRT}, {CUDA}; using {CPU}"):
        assert resolve_providers(GPU_STACK, [CPU], fallback=True) == ([CPU], [TRT, CUDA])
    with pytest.raises(LoweringError, match="not available here"):
        resolve_providers([TRT], [CPU], fallback=True)  # nothing would be left


@pytest.mark.parametrize("bad", ["CPUExecutionProvider", [1, 2]])
def test_providers_must_be_a_list_of_names(bad):
    with pytest.raises(LoweringError, match="list of ONNX Runtime provider names"):
        resolve_providers(bad, [CPU])


def test_verification_runs_on_cpu_and_on_the_requested_providers():
    cpu_only = verification_configs(session_config(None, "all", [CPU]), True)
    assert [c["providers"] for c in cpu_only] == [[CPU]]
    config = {"threads": 2, "graph_optimization_level": "all", "providers": [CUDA, CPU],
              "missing": []}
    assert [c["providers"] for c in verification_configs(config, True)] == [[CPU], [CUDA, CPU]]
    # providers not given: the artifact's default providers are not a verification request
    assert [c["providers"] for c in verification_configs(config, False)] == [[CPU]]


# --------------------------------------------------------------------------- lower


def test_lower_with_the_gpu_stack_verifies_there_or_names_what_is_missing(tmp_path):
    gm, inputs = _gm()
    available = ort.get_available_providers()
    missing = [p for p in GPU_STACK if p not in available]
    if missing:
        with pytest.raises(LoweringError, match=", ".join(missing) + " not available here"):
            fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", providers=GPU_STACK)
        assert os.listdir(tmp_path) == []
    else:  # a machine with onnxruntime-gpu and TensorRT
        art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", providers=GPU_STACK)
        assert art.manifest["providers"][0] == TRT
        assert list(art.manifest["verified_providers"]) == [",".join(GPU_STACK)]


def test_provider_fallback_verifies_on_what_is_there_and_records_it(tmp_path, monkeypatch):
    monkeypatch.setattr(onnx_session.ort, "get_available_providers", lambda: [CPU])
    gm, inputs = _gm()
    with pytest.warns(FxoptWarning, match=f"lacks {TRT}, {CUDA}"):
        art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", providers=GPU_STACK,
                          provider_fallback=True)
    assert art.manifest["providers"] == [CPU]
    assert art.manifest["providers_missing"] == [TRT, CUDA]
    assert art.manifest["verified_providers"] == {}
    assert art.session.get_providers() == [CPU]
    loaded = fxopt.load(art.path)
    assert loaded.manifest["providers"] == [CPU]
    with pytest.warns(FxoptWarning):
        again = fxopt.load(art.path, providers=GPU_STACK, provider_fallback=True)
    assert again.session.get_providers() == [CPU]
    with pytest.raises(LoweringError, match="not available here"):
        fxopt.load(art.path, providers=GPU_STACK)


def test_a_provider_the_session_silently_drops_is_an_error(tmp_path, monkeypatch):
    """ONNX Runtime falls back without an error when a provider cannot start (TensorRT
    libraries missing, say); here it does not exist in this build, but is claimed to."""
    if CUDA in ort.get_available_providers():
        pytest.skip("CUDA really is available here")
    monkeypatch.setattr(onnx_session.ort, "get_available_providers", lambda: [CUDA, CPU])
    gm, inputs = _gm()
    with pytest.raises(LoweringError, match=f"did not use {CUDA} for m.onnx .it fell back to "
                                            f"{CPU}."):
        fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", providers=[CUDA, CPU])
    assert os.listdir(tmp_path) == []


def test_cpu_only_providers_record_the_cpu_verification(tmp_path):
    gm, inputs = _gm()
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", providers=[CPU])
    assert art.manifest["providers"] == [CPU] and art.manifest["providers_missing"] == []
    assert art.manifest["verified_providers"] == {} and len(art.manifest["verified"]) == 2
