"""fxopt.bench.candidates: which candidates a model gets, their keys, what ``build`` makes
of each (outputs match the model), and failures that become values instead of crashes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxopt.bench import Candidate, build, calibration_batches, default_candidates
from fxopt.bench.accuracy import agreement, evaluate
from fxopt.bench.candidates import with_batch
from fxopt.errors import SpecError


def _mlp() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()
    return model, (torch.randn(2, 16),)


def _cnn() -> tuple[nn.Module, tuple]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 2)).eval()
    return model, (torch.randn(2, 3, 8, 8),)


def test_default_candidates_enumerates_every_runtime_and_peer():
    model, inputs = _cnn()
    names = [c.name for c in default_candidates(model, inputs)]
    assert names[0] == "torch"  # the reference for speed-ups comes first
    assert names == ["torch", "fxopt-eager", "ort-plain", "ort-fxopt-fp32", "ort-fxopt-int8",
                     "ort-fxopt-fp16", "ort-quantize_static", "ort-quantize_dynamic",
                     "tensorrt-fp32", "tensorrt-fp16", "tensorrt-int8"]
    with_compile = [c.name for c in default_candidates(model, inputs, compile=True)]
    assert with_compile[:2] == ["torch", "torch.compile"]
    # a model whose weights are mostly Linear also gets fxopt's dynamic int8
    lin = [c.name for c in default_candidates(*_mlp())]
    assert "ort-fxopt-dynamic_int8" in lin and "ort-fxopt-dynamic_int8" not in names
    by_name = {c.name: c for c in default_candidates(model, inputs)}
    assert by_name["ort-plain"].baseline == "plain-export"
    assert by_name["ort-quantize_static"].baseline == "ort-quantize-static"
    assert "quantize(scheme=int8" in by_name["ort-fxopt-int8"].pipeline
    assert by_name["tensorrt-fp16"].runtime == "tensorrt"
    # TensorRT's precision comes from the typed graph (TensorRT 11 has no precision flags)
    assert "half(dtype=fp16)" in by_name["tensorrt-fp16"].pipeline
    assert "target=tensorrt" in by_name["tensorrt-int8"].pipeline
    assert by_name["tensorrt-fp32"].pipeline == "default"


def test_torch_on_cuda_is_a_candidate_only_where_cuda_is_available(monkeypatch):
    model, inputs = _cnn()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "torch-cuda" not in [c.name for c in default_candidates(model, inputs)]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    by_name = {c.name: c for c in default_candidates(model, inputs)}
    assert dict(by_name["torch-cuda"].options) == {"device": "cuda"}


def test_a_torch_candidate_on_a_device_copies_inputs_over_and_outputs_back(tmp_path):
    model, inputs = _cnn()
    # "cpu" stands in for the accelerator: the same copy-over path, runnable here
    built = build(Candidate("torch-dev", "torch", None, None, (("device", "cpu"),)), model,
                  inputs, workdir=tmp_path)
    assert built.ok, built.error
    torch.testing.assert_close(built.fn(*inputs), model(*inputs))


def test_candidate_key_is_stable_and_tells_candidates_apart():
    a = Candidate("x", "onnx", "default")
    assert a.key() == Candidate("x", "onnx", "default").key()
    assert len({a.key(), Candidate("x", "onnx", "default,fold_bn").key(),
                Candidate("x", "onnx", "default", options=(("threads", 1),)).key(),
                Candidate("y", "onnx", "default").key()}) == 4


@pytest.mark.parametrize("kwargs, words", [
    ({"runtime": "jax"}, "unknown runtime"),
    ({"runtime": "onnx", "baseline": "mine"}, "unknown baseline"),
    ({"runtime": "torch", "baseline": "plain-export"}, "ONNX Runtime peer"),
    ({"runtime": "onnx", "pipeline": "default", "baseline": "plain-export"}, "ONNX Runtime peer"),
])
def test_a_malformed_candidate_is_a_spec_error(kwargs, words):
    with pytest.raises(SpecError, match=words):
        Candidate("bad", **kwargs)


@pytest.mark.parametrize("name", ["torch", "fxopt-eager", "ort-plain", "ort-fxopt-fp32",
                                  "ort-quantize_dynamic"])
def test_built_candidates_compute_what_the_model_does(name, tmp_path):
    model, inputs = _mlp()
    cand = next(c for c in default_candidates(model, inputs) if c.name == name)
    built = build(cand, model, inputs, workdir=tmp_path, threads=1)
    assert built.ok, built.error
    assert built.build_s >= 0 and built.size_bytes and built.size_bytes > 0
    with torch.no_grad():
        acc = agreement(model(*inputs), built.fn(*inputs))
    tol = 0.999 if "quantize" in name else 0.99999
    assert acc["cosine"] > tol and acc["max_rel"] < (0.1 if "quantize" in name else 1e-4)
    if cand.runtime in ("onnx", "eager"):
        assert built.path and str(tmp_path) in built.path


def test_static_int8_candidates_use_the_calibration_batches_given(tmp_path):
    model, inputs = _cnn()
    cands = {c.name: c for c in default_candidates(model, inputs)}
    batches = calibration_batches(inputs, count=3)
    assert len(batches) == 3 and batches[0][0].shape == inputs[0].shape
    assert not torch.equal(batches[0][0], batches[1][0])
    for name in ("ort-fxopt-int8", "ort-quantize_static"):
        built = build(cands[name], model, inputs, workdir=tmp_path, calibration=batches,
                      threads=1)
        assert built.ok, built.error
        with torch.no_grad():
            assert agreement(model(*inputs), built.fn(*inputs))["cosine"] > 0.9


def test_a_failing_candidate_is_a_value_with_the_error(tmp_path):
    model, inputs = _mlp()
    built = build(Candidate("broken", "onnx", "no_such_pass"), model, inputs,
                  workdir=tmp_path)
    assert not built.ok and built.fn is None and not built.skipped
    assert built.error.startswith("SpecError:") and "no_such_pass" in built.error

    class Breaks(nn.Module):
        def forward(self, x):
            raise RuntimeError("boom in forward")

    built = build(Candidate("torch", "torch"), Breaks(), inputs, workdir=tmp_path)
    assert built.error == "RuntimeError: boom in forward"


def test_tensorrt_is_skipped_with_the_reason_where_it_is_missing(tmp_path):
    try:
        import tensorrt  # noqa: F401
        pytest.skip("TensorRT is installed here")
    except ImportError:
        pass
    model, inputs = _mlp()
    built = build(Candidate("tensorrt-fp16", "tensorrt", "default"), model, inputs,
                  workdir=tmp_path)
    assert built.skipped and built.fn is None and "TensorRT is not installed" in built.error


def test_with_batch_repeats_rows_and_refuses_zero():
    x, ids = torch.randn(2, 3), torch.tensor([[1, 2], [3, 4]])
    bx, bids = with_batch((x, ids), 5)
    assert bx.shape == (5, 3) and torch.equal(bx[2], x[0]) and torch.equal(bids[3], ids[1])
    assert with_batch((x,), None)[0] is x
    with pytest.raises(SpecError, match="batch"):
        with_batch((x,), 0)


def test_agreement_and_evaluate():
    ref = torch.tensor([1.0, 2.0, 4.0])
    acc = agreement(ref, ref * 1.01)
    assert acc["cosine"] == pytest.approx(1.0) and acc["max_rel"] == pytest.approx(0.01, rel=1e-3)
    assert agreement((ref, ref), (ref, -ref))["cosine"] == pytest.approx(-1.0)
    assert agreement((ref, ref), ref)["max_rel"] == float("inf")

    model, (x,) = _mlp()
    labels = model(x).argmax(-1)

    def top1(out, target):
        return (out.argmax(-1) == target).float().mean().item()

    assert evaluate(model, [(x, labels), ((x,), labels)], top1) == 1.0
    with pytest.raises(SpecError, match="pair"):
        evaluate(model, [x], top1)
    with pytest.raises(SpecError, match="no batches"):
        evaluate(model, [], top1)
    with pytest.raises(SpecError, match="number"):
        evaluate(model, [(x, labels)], lambda out, t: "high")


def test_tensorrt_without_a_gpu_is_skipped_with_that_reason(tmp_path, monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "tensorrt" else real(name, *a))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model, inputs = _mlp()
    built = build(Candidate("tensorrt-fp16", "tensorrt", "default"), model, inputs,
                  workdir=tmp_path)
    assert built.skipped and "no CUDA GPU" in built.error


def test_compared_sessions_do_not_spin():
    from fxopt.bench.onnx_runtime import session_options

    opts = session_options(2)
    assert opts.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert opts.intra_op_num_threads == 2 and opts.inter_op_num_threads == 1
    spin = session_options(1, spinning=True)
    assert spin.get_session_config_entry("session.intra_op.allow_spinning") == "1"
