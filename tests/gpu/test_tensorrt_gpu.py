"""Real TensorRT engines on a real GPU: build, run and compare the zoo ResNet, the zoo
transformer and a quantized ResNet in fp32, fp16 and int8 (skipped without CUDA and
TensorRT; ``scripts/gpu_check.sh`` runs this file in a few minutes).

Every build goes through ``fxopt.lower(..., "tensorrt")``, which itself runs the engine on
the example inputs and at each profile's min and max and refuses a mismatch; the tests
then check the artifact again on fresh inputs, on CUDA and CPU tensors, after a reload.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch

import fxopt
from fxopt import zoo
from fxopt.errors import InputSpecError, LoweringError
from fxopt.verify import compare_outputs

HAVE_TRT = importlib.util.find_spec("tensorrt") is not None
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not HAVE_TRT, reason="needs TensorRT (pip install 'fxopt[tensorrt]')"),
]
BOUNDS = {"batch": (1, 4, 16)}


def _trt_major() -> int:
    import tensorrt

    return int(tensorrt.__version__.split(".")[0])


def _warm_bn(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """Data-driven BN statistics (a fresh random CNN's outputs are near-constant noise)."""
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.randn(8, *x.shape[1:]))
    return model.eval()


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    model, (x,) = zoo.load("resnet")
    return _warm_bn(model, x), x


@pytest.fixture(scope="module")
def transformer():
    torch.manual_seed(0)
    model, (ids,) = zoo.load("transformer")
    return model.eval(), ids


def _check(art, gm, inputs, tolerance):
    want = gm(*inputs)
    got = art(*inputs)
    report = compare_outputs(want, got, tolerance)
    assert report.ok(), (report.max_abs, report.cosine)
    cuda_in = tuple(t.cuda() for t in inputs)
    got_cuda = art(*cuda_in)
    leaves = got_cuda if isinstance(got_cuda, (list, tuple)) else [got_cuda]
    assert all(t.is_cuda for t in leaves)
    assert compare_outputs(want, [t.cpu() for t in leaves] if len(leaves) > 1 else
                           leaves[0].cpu(), tolerance).ok()


def _tol(art):
    return fxopt.Tolerance(**art.manifest["tolerance"])


def test_resnet_fp32_builds_runs_and_reloads(tmp_path, resnet):
    model, x = resnet
    gm = fxopt.capture(model, (x,))
    cache = tmp_path / "trt.cache"
    art = fxopt.lower(gm, "tensorrt", (x,), path=tmp_path / "r.engine", dim_bounds=BOUNDS,
                      workspace="2GiB", timing_cache=cache, optimization_level=2)
    assert cache.stat().st_size > 0 and art.manifest["precision"]["precision"] == "fp32"
    x7 = torch.randn(7, *x.shape[1:])
    _check(art, gm, (x7,), _tol(art))
    loaded = fxopt.load(tmp_path / "r.engine")
    _check(loaded, gm, (x7,), _tol(art))
    with pytest.raises(InputSpecError, match="outside the engine's optimization profile"):
        loaded(torch.randn(17, *x.shape[1:]))
    again = fxopt.lower(gm, "tensorrt", (x,), path=tmp_path / "r2.engine", dim_bounds=BOUNDS,
                        timing_cache=cache, optimization_level=2)
    assert again.manifest["build"]["timing_cache_reused"] is True


def test_resnet_fp16_from_the_half_pass_is_strongly_typed(tmp_path, resnet):
    model, x = resnet
    half = fxopt.optimize(model, (x,), "default,half(dtype=fp16)").module
    art = fxopt.lower(half, "tensorrt", (x,), path=tmp_path / "h.engine", dim_bounds=BOUNDS,
                      optimization_level=2)
    assert art.manifest["precision"]["strongly_typed"] is True
    assert art.manifest["precision"]["precision"] == "fp16"
    _check(art, half, (torch.randn(5, *x.shape[1:]),), _tol(art))


def test_resnet_fp16_request_on_fp32_graph(tmp_path, resnet):
    model, x = resnet
    gm = fxopt.capture(model, (x,))
    path = tmp_path / "f.engine"
    if _trt_major() >= 11:
        with pytest.raises(LoweringError, match="TensorRT 11 removed BuilderFlag.FP16"):
            fxopt.lower(gm, "tensorrt", (x,), path=path, precision="fp16")
        assert not path.exists()
        return
    art = fxopt.lower(gm, "tensorrt", (x,), path=path, dim_bounds=BOUNDS, precision="fp16",
                      optimization_level=2)
    assert art.manifest["precision"]["builder_flags"] == ["FP16"]
    _check(art, gm, (torch.randn(3, *x.shape[1:]),), _tol(art))


def test_quantized_resnet_int8(tmp_path, resnet):
    model, x = resnet
    batches = [(torch.randn(8, *x.shape[1:]),) for _ in range(8)]
    q = fxopt.optimize(model, (x,), "default,quantize(scheme=int8,target=tensorrt)",
                       calibration=batches).module
    art = fxopt.lower(q, "tensorrt", (x,), path=tmp_path / "q.engine", dim_bounds=BOUNDS,
                      optimization_level=2)
    assert art.manifest["precision"]["precision"].startswith("int8")
    assert art.manifest["precision"]["strongly_typed"] is True
    _check(art, q, (torch.randn(6, *x.shape[1:]),), _tol(art))


@pytest.mark.parametrize("pipeline", ["default", "default,half(dtype=fp16)"])
def test_transformer(tmp_path, transformer, pipeline):
    model, ids = transformer
    gm = fxopt.optimize(model, (ids,), pipeline).module
    art = fxopt.lower(gm, "tensorrt", (ids,), path=tmp_path / "t.engine",
                      dim_bounds={"batch": (1, 2, 8)}, optimization_level=2)
    fresh = torch.randint(0, int(ids.max()) + 1, (3, ids.shape[1]))
    _check(art, gm, (fresh,), _tol(art))
