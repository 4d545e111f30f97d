"""The engine runner's checks (shapes, dtypes, TensorRT release and GPU), the missing
TensorRT / GPU errors, and ``import fxopt`` staying free of TensorRT. Execution runs on the
fake engine over CPU memory; real CUDA execution is in tests/gpu/test_tensorrt_gpu.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn
from trt_fixtures import FAKE_GPU, calls, install  # tests/lowering is on sys.path

import fxopt
from fxopt.errors import ArtifactVersionError, InputSpecError, LoweringError
from fxopt.lowering import tensorrt as backend
from fxopt.lowering import trt_runtime

REAL_CUDA_DEVICE = trt_runtime.cuda_device  # before any test patches it


class TwoInputs(nn.Module):
    def forward(self, x, ids):
        return x.sum(-1) + ids.float()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One engine (two inputs: float x[batch, 4], int64 ids[batch]) built on the fake
    TensorRT 10.7, shared by the tests below (which load it under their own fakes)."""
    mp = pytest.MonkeyPatch()
    try:
        install(mp)
        x, ids = torch.randn(2, 4), torch.tensor([1, 2])
        gm = fxopt.capture(TwoInputs(), (x, ids))
        path = tmp_path_factory.mktemp("trt") / "two.engine"
        fxopt.lower(gm, "tensorrt", (x, ids), path=path, dim_bounds={"batch": (1, 2, 4)},
                    exporter="torchscript")
    finally:
        mp.undo()
    return path, gm


def test_runner_runs_cpu_and_numpy_inputs(monkeypatch, built):
    path, gm = built
    trt = install(monkeypatch)
    art = fxopt.load(path)
    x, ids = torch.randn(3, 4), torch.tensor([4, 5, 6])
    torch.testing.assert_close(art(x, ids), gm(x, ids))
    torch.testing.assert_close(art(x.numpy(), ids.numpy()), gm(x, ids))
    assert ("ids", (3,)) in calls(trt, "set_input_shape")
    assert len(calls(trt, "execute_async_v3")) == 2


@pytest.mark.parametrize("args, match", [
    ((torch.randn(8, 4), torch.arange(8)), r"dim 0 'batch' = 8 is outside the engine's "
                                            r"optimization profile \(1..4\); rebuild with "
                                            r"dim_bounds=\{'batch'"),
    ((torch.randn(2, 4, dtype=torch.float64), torch.arange(2)), "dtype float64, expected "
                                                                 "float32"),
    ((torch.randn(2, 4), torch.arange(2, dtype=torch.int32)), "dtype int32, expected int64"),
    ((torch.randn(2, 5), torch.arange(2)), "size 5 at dim 1, expected 4"),
    ((torch.randn(2, 4),), "takes 2 input"),
    ((torch.randn(2, 4), torch.arange(3)), "dynamic dim .batch. is 2"),  # one name, two sizes
])
def test_runner_refuses_inputs_that_do_not_fit(monkeypatch, built, args, match):
    path, _ = built
    trt = install(monkeypatch)
    art = fxopt.load(path)
    with pytest.raises(InputSpecError, match=match):
        art(*args)
    assert calls(trt, "execute_async_v3") == []


def test_engine_for_another_tensorrt_release_is_refused(monkeypatch, built):
    path, _ = built
    install(monkeypatch, "10.8.0.1")
    with pytest.raises(ArtifactVersionError, match=r"built with TensorRT 10.7.0.23.*this is "
                       r"TensorRT 10.8.0.1.*rebuild it here.*tensorrt==10.7.0"):
        fxopt.load(path)


def test_engine_for_another_gpu_is_refused(monkeypatch, built):
    path, _ = built
    install(monkeypatch, gpu={"name": "Fake A100", "compute_capability": "8.0"})
    with pytest.raises(ArtifactVersionError, match=r"Fake GPU \(sm 9.0\).*Fake A100 \(sm 8.0\)"
                       r".*GPU architecture.*rebuild"):
        fxopt.load(path)


def test_engine_without_manifest_still_loads_and_fails_typed_when_damaged(monkeypatch, built,
                                                                         tmp_path):
    path, gm = built
    install(monkeypatch)
    bare = tmp_path / "bare.plan"
    bare.write_bytes(path.read_bytes())
    art = fxopt.load(bare)  # an engine from elsewhere: the engine's own I/O description
    assert art.input_spec[0] == {"name": "x", "dtype": "float32", "shape": [None, 4]}
    x, ids = torch.randn(2, 4), torch.tensor([1, 2])
    torch.testing.assert_close(art(x, ids), gm(x, ids))
    (tmp_path / "junk.engine").write_bytes(b"not an engine")
    with pytest.raises(LoweringError, match="cannot deserialize junk.engine.*not an engine.*"
                       "rebuild"):
        fxopt.load(tmp_path / "junk.engine")


def test_newer_manifest_format_is_refused(monkeypatch, built, tmp_path):
    path, _ = built
    install(monkeypatch)
    copy = tmp_path / "m.engine"
    copy.write_bytes(path.read_bytes())
    m = json.loads(backend.manifest_path(path).read_text())
    m["format_version"] = 99
    backend.manifest_path(copy).write_text(json.dumps(m))
    with pytest.raises(ArtifactVersionError, match="newer than this fxopt reads"):
        fxopt.load(copy)


def test_detect_never_imports_tensorrt(built, tmp_path):
    path, _ = built
    assert backend.detect(path) and not backend.detect(tmp_path / "none.engine")
    (tmp_path / "m.onnx").write_bytes(b"")
    assert not backend.detect(tmp_path / "m.onnx")


def test_without_tensorrt_lower_and_load_say_what_to_install(monkeypatch, built, tmp_path):
    path, gm = built
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # import tensorrt -> ImportError
    with pytest.raises(LoweringError, match=r"pip install 'fxopt\[tensorrt\]'.*NVIDIA GPU"):
        fxopt.lower(gm, "tensorrt", (torch.randn(2, 4), torch.tensor([1, 2])),
                    path=tmp_path / "m.engine")
    with pytest.raises(LoweringError, match=r"fxopt\[tensorrt\]"):
        fxopt.load(path)
    assert list(tmp_path.iterdir()) == []


def test_without_a_gpu_the_error_says_so(monkeypatch, tmp_path):
    trt = install(monkeypatch)
    monkeypatch.setattr(backend, "cuda_device", REAL_CUDA_DEVICE)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    gm = fxopt.capture(nn.Linear(4, 2), (torch.randn(2, 4),))
    with pytest.raises(LoweringError, match=r"NVIDIA GPU.*torch.cuda.is_available\(\) is False"):
        fxopt.lower(gm, "tensorrt", (torch.randn(2, 4),), path=tmp_path / "m.engine")
    assert list(tmp_path.iterdir()) == [] and trt.calls == []


def test_unsupported_tensorrt_version_is_refused(monkeypatch, tmp_path):
    install(monkeypatch, "8.6.1")
    gm = fxopt.capture(nn.Linear(4, 2), (torch.randn(2, 4),))
    with pytest.raises(LoweringError, match="TensorRT 8.6.1 is not supported"):
        fxopt.lower(gm, "tensorrt", (torch.randn(2, 4),), path=tmp_path / "m.engine")


def test_import_fxopt_never_imports_tensorrt():
    code = ("import sys, fxopt, fxopt.lowering.tensorrt, fxopt.lowering.trt_runtime, "
            "fxopt.lowering.trt_config\n"
            "assert 'tensorrt' in fxopt.lowering.targets()\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'tensorrt'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_check_compatible_accepts_the_same_release_and_architecture():
    m = {"tensorrt": "10.7.0.23", "gpu": dict(FAKE_GPU)}
    trt_runtime.check_compatible(m, "m.engine", "10.7.0.99", {"name": "Other", **{
        "compute_capability": "9.0"}})  # build number and GPU name may differ
    trt_runtime.check_compatible({}, "m.engine", "11.0.0", FAKE_GPU)  # no manifest: TRT decides


def test_dtype_table_covers_engine_types():
    assert trt_runtime.TORCH_DTYPES["HALF"] is torch.float16
    assert {np.dtype(str(d).removeprefix("torch.")).kind for d in
            trt_runtime.TORCH_DTYPES.values() if d is not torch.bfloat16} >= {"f", "i", "b", "u"}
