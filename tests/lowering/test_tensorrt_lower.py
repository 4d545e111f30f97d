"""The TensorRT backend's lower/load flow on CPU, against the fake ``tensorrt`` module.

What these tests check is what fxopt decides and does: the builder / config / network
calls, the files it writes (or does not), the manifest, verification failures, the timing
cache. No TensorRT engine is built here; tests/gpu/test_tensorrt_gpu.py builds real ones.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from trt_fixtures import calls, install  # tests/lowering is on sys.path

import fxopt
from fxopt.errors import LoweringError
from fxopt.lowering import tensorrt as backend
from fxopt.lowering.trt_config import TrtConfigError, TrtPrecisionError

BOUNDS = {"batch": (1, 4, 8)}


@pytest.fixture(scope="module")
def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()
    x = torch.randn(2, 8)
    return fxopt.capture(model, (x,)), x


def _lower(gm, x, path, inputs=None, **kw):
    kw.setdefault("exporter", "torchscript")
    return fxopt.lower(gm, "tensorrt", inputs or (x,), path=path, **kw)


def test_lower_builds_verifies_writes_and_loads(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    trt = install(monkeypatch)
    art = _lower(gm, x, tmp_path / "m.engine", dim_bounds=BOUNDS, workspace="1GiB",
                 optimization_level=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.engine", "m.engine.json"]
    assert calls(trt, "create_network") == [(0,)]  # fp32 graph, TensorRT 10: weakly typed
    assert calls(trt, "set_memory_pool_limit") == [("WORKSPACE", 2**30)]
    assert calls(trt, "clear_flag") == [("TF32",)] and calls(trt, "set_flag") == []
    assert calls(trt, "set_shape") == [("input", [1, 8], [4, 8], [8, 8])]
    (build,) = calls(trt, "build")
    assert build == (0, [], 2, 1)  # flags, builder flags left set, level, profiles
    assert calls(trt, "progress_monitor") == [("_Monitor",)]  # tqdm bars per build phase
    # verified on the example inputs and at the profile's min and max
    assert [s for _, s in calls(trt, "set_input_shape")] == [(2, 8), (1, 8), (8, 8)]
    m = json.loads((tmp_path / "m.engine.json").read_text())
    assert m["format"] == "fxopt-tensorrt" and m["tensorrt"] == "10.7.0.23"
    assert m["gpu"] == {"name": "Fake GPU", "compute_capability": "9.0"}
    assert m["inputs"] == [{"name": "input", "dtype": "float32", "shape": ["batch", 8]}]
    assert m["outputs"][0]["dtype"] == "float32" and m["outputs"][0]["shape"] == [-1, 4]
    assert m["profiles"] == [{"input": {"min": [1, 8], "opt": [4, 8], "max": [8, 8]}}]
    assert m["precision"]["precision"] == "fp32" and not m["precision"]["strongly_typed"]
    assert set(m["verified"]) == {"the example inputs", "random inputs at profile 0 min",
                                  "random inputs at profile 0 max"}
    assert m["warnings"] == ["fake: weights cast from INT64 to INT32"]  # INFO is not kept
    assert m["build"]["workspace_bytes"] == 2**30 and m["build"]["optimization_level"] == 2
    assert m["onnx"]["exporter"] == "torchscript" and "prepare" in m
    x5 = torch.randn(5, 8)
    torch.testing.assert_close(art(x5), gm(x5), rtol=1e-5, atol=1e-5)
    loaded = fxopt.load(tmp_path / "m.engine")
    assert isinstance(loaded, backend.TrtArtifact) and loaded.manifest == art.manifest
    torch.testing.assert_close(loaded(x5), gm(x5), rtol=1e-5, atol=1e-5)


def test_static_graph_has_no_profile(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    trt = install(monkeypatch)
    art = _lower(gm, x, tmp_path / "m.engine")
    assert calls(trt, "set_shape") == [] and art.manifest["profiles"] == []
    assert art.input_spec == [{"name": "input", "dtype": "float32", "shape": [2, 8]}]
    with pytest.raises(fxopt.InputSpecError, match="dim 0"):
        art(torch.randn(3, 8))


def test_several_profiles_and_profile_switching(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    trt = install(monkeypatch)
    art = _lower(gm, x, tmp_path / "m.engine", dynamic=True,
                 dim_bounds=[{"batch": (1, 2, 4)}, {"batch": (8, 16, 32)}])
    assert [s[3] for s in calls(trt, "set_shape")] == [[4, 8], [32, 8]]
    assert set(art.manifest["verified"]) >= {"random inputs at profile 1 max"}
    trt.calls.clear()
    art(torch.randn(3, 8))  # lower's last check ran at profile 1's max
    art(torch.randn(16, 8))
    art(torch.randn(20, 8))
    assert calls(trt, "set_optimization_profile_async") == [(0,), (1,)]


@pytest.mark.parametrize("version, bits", [("10.7.0.23", 1 << 1), ("11.0.0.9", 1 << 0)])
def test_half_graph_is_strongly_typed(monkeypatch, tmp_path, mlp, version, bits):
    gm, x = mlp
    half = fxopt.optimize(gm, (x,), "default,half(dtype=fp16)").module
    trt = install(monkeypatch, version)
    art = _lower(half, x, tmp_path / "h.engine", dim_bounds=BOUNDS)
    assert calls(trt, "create_network") == [(bits,)] and calls(trt, "set_flag") == []
    assert art.manifest["precision"]["precision"] == "fp16"
    assert art.manifest["precision"]["strongly_typed"] is True


def test_v10_fp16_request_sets_the_classic_flag(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    trt = install(monkeypatch, "10.3.0")
    art = _lower(gm, x, tmp_path / "m.engine", precision="fp16")
    assert calls(trt, "create_network") == [(0,)] and calls(trt, "set_flag") == [("FP16",)]
    assert art.manifest["precision"]["tolerance"]["rtol"] == 3e-2


def test_v11_refuses_fp16_on_an_fp32_graph_and_writes_nothing(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    trt = install(monkeypatch, "11.1.0")
    with pytest.raises(TrtPrecisionError, match="TensorRT 11 removed BuilderFlag.FP16"):
        _lower(gm, x, tmp_path / "m.engine", precision="fp16")
    assert list(tmp_path.iterdir()) == [] and calls(trt, "build") == []


def test_quantized_graph_builds_strongly_typed_int8(monkeypatch, tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4)).eval()
    x = torch.randn(2, 3, 8, 8)
    batches = [(torch.randn(2, 3, 8, 8),) for _ in range(4)]
    q = fxopt.optimize(model, (x,), "default,quantize(scheme=int8,target=tensorrt)",
                       calibration=batches).module
    trt = install(monkeypatch, "11.0.0")
    art = _lower(q, x, tmp_path / "q.engine", exporter="auto", dim_bounds=BOUNDS)
    assert calls(trt, "create_network") == [(1 << 0,)] and calls(trt, "set_flag") == []
    assert art.manifest["precision"]["precision"] == "int8"
    assert art.manifest["tolerance"]["min_cosine"] == 0.99


def test_mismatching_engine_raises_and_leaves_no_file(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    trt = install(monkeypatch)
    trt.output_offset = 1.0
    with pytest.raises(LoweringError, match="does not reproduce the GraphModule on the example "
                       "inputs: output 0 differs.*nothing was written"):
        _lower(gm, x, tmp_path / "m.engine", timing_cache=tmp_path / "trt.cache")
    assert list(tmp_path.iterdir()) == []  # neither the engine nor the timing cache


def test_parser_errors_are_reported_by_node(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    trt = install(monkeypatch)
    trt.parse_errors = [("node_Gemm_1", "Gemm", "unsupported transB")]
    with pytest.raises(LoweringError, match=r"parser rejected.*node node_Gemm_1 \(Gemm\): "
                       "unsupported transB"):
        _lower(gm, x, tmp_path / "m.engine")
    assert list(tmp_path.iterdir()) == []


def test_failed_build_reports_the_log(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    trt = install(monkeypatch)
    trt.build_fails = True
    with pytest.raises(LoweringError, match="could not build.*out of workspace memory.*workspace"):
        _lower(gm, x, tmp_path / "m.engine", workspace="1MiB")
    assert list(tmp_path.iterdir()) == []


def test_check_trt_blockers_stop_the_build(monkeypatch, tmp_path, mlp):
    from fxopt import trt_check

    gm, x = mlp
    trt = install(monkeypatch)
    real = trt_check.check_trt

    def with_blocker(*a, **kw):
        report = real(*a, **kw)
        report.findings.append(trt_check.Finding("blocker", "unsupported-op", "node_X", "Foo",
                                                 "ONNX op Foo is not supported", "replace it"))
        return report

    monkeypatch.setattr(trt_check, "check_trt", with_blocker)
    with pytest.raises(LoweringError, match="check-trt.*node_X \\(Foo\\).*fix: replace it"):
        _lower(gm, x, tmp_path / "m.engine")
    assert calls(trt, "build") == [] and list(tmp_path.iterdir()) == []


def test_timing_cache_is_created_reused_and_replaced(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    cache = tmp_path / "trt.cache"
    trt = install(monkeypatch)
    art = _lower(gm, x, tmp_path / "a.engine", timing_cache=cache)
    assert calls(trt, "create_timing_cache") == [(b"",)]
    assert cache.read_bytes() == b"FAKECACHE 10.7.0.23 built"
    assert art.manifest["build"]["timing_cache_reused"] is False
    trt = install(monkeypatch)
    art = _lower(gm, x, tmp_path / "b.engine", timing_cache=cache)
    assert calls(trt, "set_timing_cache") == [(b"FAKECACHE 10.7.0.23 built", False, True)]
    assert art.manifest["build"]["timing_cache_reused"] is True
    cache.write_bytes(b"FAKECACHE 10.0.0 from elsewhere")
    trt = install(monkeypatch)
    art = _lower(gm, x, tmp_path / "c.engine", timing_cache=cache)
    assert [c[2] for c in calls(trt, "set_timing_cache")] == [False, True]
    assert any("does not match" in w for w in art.manifest["warnings"])
    assert cache.read_bytes() == b"FAKECACHE 10.7.0.23 built"


@pytest.mark.parametrize("kw, error, match", [
    ({"dynamic": True}, TrtConfigError, r"'batch', which has no bounds.*dim_bounds=\{'batch'"),
    ({"workspace": "lots"}, TrtConfigError, "workspace"),
    ({"optimization_level": 9}, TrtConfigError, "optimization_level"),
    ({"precision": "fp64"}, LoweringError, "precision='fp64'"),
    ({"dim_bounds": {"batch": (4, 2, 8)}}, LoweringError, "min <= opt <= max"),
    ({"dim_bounds": {"batch": (4, 4, 8)}}, LoweringError, r"example inputs \(batch=2\) lie "
                                                          "outside every optimization profile"),
])
def test_option_mistakes_are_typed_and_write_nothing(monkeypatch, tmp_path, mlp, kw, error,
                                                     match):
    gm, x = mlp
    install(monkeypatch)
    with pytest.raises(error, match=match):
        _lower(gm, x, tmp_path / "m.engine", **kw)
    assert list(tmp_path.iterdir()) == []


def test_paths_that_are_not_ours_are_refused(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    install(monkeypatch)
    with pytest.raises(LoweringError, match="ends in .engine"):
        _lower(gm, x, tmp_path / "m.onnx")
    (tmp_path / "user.engine").write_bytes(b"someone else's engine")
    with pytest.raises(LoweringError, match="not an fxopt TensorRT engine"):
        _lower(gm, x, tmp_path / "user.engine")
    assert (tmp_path / "user.engine").read_bytes() == b"someone else's engine"
    with pytest.raises(LoweringError, match="writes a file"):
        fxopt.lower(gm, "tensorrt", (x,))


def test_rebuild_replaces_our_own_engine_and_save_copies(monkeypatch, tmp_path, mlp):
    gm, x = mlp
    install(monkeypatch)
    _lower(gm, x, tmp_path / "m.engine")
    art = _lower(gm, x, tmp_path / "m.engine")  # ours: replaced
    copy = art.save(tmp_path / "backup" / "m.plan")
    assert (tmp_path / "backup" / "m.plan.json").is_file()
    torch.testing.assert_close(copy(x), gm(x), rtol=1e-5, atol=1e-5)


def test_cli_optimize_to_tensorrt(monkeypatch, tmp_path, capsys):
    from fxopt.cli import main

    trt = install(monkeypatch)
    out = tmp_path / "mlp.engine"
    code = main(["optimize", "mlp", "--target", "tensorrt", "-o", str(out), "--bound",
                 "batch=1,4,8", "--workspace", "256MiB", "--exporter", "torchscript"])
    assert code == 0, capsys.readouterr().err
    assert calls(trt, "set_memory_pool_limit") == [("WORKSPACE", 256 * 2**20)]
    assert fxopt.load(out).manifest["profiles"][0]
    code = main(["optimize", "mlp", "-o", str(tmp_path / "m"), "--workspace", "1GiB"])
    assert code == 2 and "--workspace only apply to --target tensorrt" in capsys.readouterr().err


@pytest.mark.parametrize("blocked, builds", [("model.onnx", True), ("prepared.onnx", False)])
def test_int64_blockers_get_a_second_check_after_preparation(monkeypatch, tmp_path, mlp,
                                                            blocked, builds):
    from fxopt import trt_check

    gm, x = mlp
    trt = install(monkeypatch)
    real, checked = trt_check.check_trt, []

    def int64_blocker(model, *a, **kw):
        report = real(model, *a, **kw)
        checked.append(str(model).rsplit("/", 1)[-1])
        if str(model).endswith(blocked):
            report.findings.append(trt_check.Finding(
                "blocker", "int64-compute", "node_Add_3", "Add", "Add computes on INT64", "cast"))
        return report

    monkeypatch.setattr(trt_check, "check_trt", int64_blocker)
    if builds:  # the preparation rewrites int64 arithmetic; its result is checked again
        _lower(gm, x, tmp_path / "m.engine")
    else:
        with pytest.raises(LoweringError, match=r"node_Add_3 \(Add\): Add computes on INT64"):
            _lower(gm, x, tmp_path / "m.engine")
    assert checked[0] == "model.onnx" and checked[-1] == "prepared.onnx"
    assert bool(calls(trt, "build")) is builds


class _Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)

    def forward(self, ids, scale):
        return self.emb(ids).sum(1) * scale


def test_named_dynamic_dims_become_profile_dims(monkeypatch, tmp_path):
    ids, scale = torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.ones(2, 1)
    gm = fxopt.capture(_Seq().eval(), (ids, scale))
    trt = install(monkeypatch)
    art = _lower(gm, ids, tmp_path / "s.engine", dynamic_dims={"ids": {1: "seq"}},
                 dim_bounds={"batch": (1, 2, 4), "seq": (1, 3, 8)}, inputs=(ids, scale))
    assert calls(trt, "set_shape") == [("ids", [1, 1], [2, 3], [4, 8]),
                                       ("scale", [1, 1], [2, 1], [4, 1])]
    assert art.input_spec[0]["shape"] == ["batch", "seq"]
    out = art(torch.tensor([[1, 2, 3, 4, 5, 6, 7]]), torch.full((1, 1), 2.0))
    torch.testing.assert_close(out, gm(torch.tensor([[1, 2, 3, 4, 5, 6, 7]]),
                                       torch.full((1, 1), 2.0)))


def test_build_progress_is_shown_per_phase(monkeypatch, tmp_path, mlp, capsys):
    gm, x = mlp
    install(monkeypatch)
    _lower(gm, x, tmp_path / "m.engine", progress="always")
    err = capsys.readouterr().err
    assert "TensorRT Building engine" in err and "building the TensorRT 10 engine (fp32)" in err
