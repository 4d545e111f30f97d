"""Pruning composes with the rest of fxopt: ``prune -> default -> quantize(scheme=int8)``
(static, calibrated) and ``prune -> half(dtype=fp16)`` lower to ONNX and verify in ONNX
Runtime, with the pruned (smaller) weights in the file; the eager artifact of a pruned model
stores the smaller weights and reloads in a fresh process.

Each composed pipeline is checked against the same model pruned alone (same plan, so the
same function up to quantization / half round-off), not only against itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fxopt
from fxopt import zoo
from fxopt.verify import HALF_FP16, QUANTIZED, compare_outputs

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

PRUNE = "prune(ratio=0.5)"
MODELS = ("resnet", "mobilenet", "transformer", "gqa")
# symbolic capture runs by default; the torch.export form of each model is slow-marked
CASES = [pytest.param(n, m, marks=[pytest.mark.slow] if m == "export" else [])
         for n in MODELS for m in ("symbolic", "export")]


def _cosines(a, b) -> list[float]:
    a = a if isinstance(a, (tuple, list)) else (a,)
    b = b if isinstance(b, (tuple, list)) else (b,)
    return [float(torch.nn.functional.cosine_similarity(
        torch.as_tensor(x).float().flatten(), torch.as_tensor(y).float().flatten(), dim=0))
        for x, y in zip(a, b, strict=True)]


def _pruned_alone(model, inputs, mode):
    """The float reference: the model pruned and cleaned, nothing else; and its plan."""
    res = fxopt.optimize(model, inputs, f"{PRUNE},default", mode=mode)
    return res.module, res.report.records[0].stats["plan"]


def _onnx_weights(path: Path) -> tuple[int, set[int]]:
    """Elements in the file's initializers of rank >= 2 (conv / linear / embedding weights),
    and the ONNX element types of the float ones."""
    graph = onnx.load(str(path)).graph
    numel, types = 0, set()
    for init in graph.initializer:
        if len(init.dims) >= 2:
            n = 1
            for d in init.dims:
                n *= d
            numel += n
            types.add(init.data_type)
    return numel, types


def _weight_numel(model) -> int:
    return sum(t.numel() for t in model.state_dict().values() if t.dim() >= 2)


def _check_plan(res, plan) -> None:
    assert res.report.records[0].stats["plan"] == plan  # the composed run pruned the same


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_prune_default_static_int8_in_onnx_runtime(name, mode, tmp_path):
    model, inputs = zoo.load(name)
    spec = zoo.get(name)
    calibration = [spec.make_inputs(spec.batch) for _ in range(4)]
    reference, plan = _pruned_alone(model, inputs, mode)
    res = fxopt.optimize(model, inputs, f"{PRUNE},default,quantize(scheme=int8)", mode=mode,
                         calibration=calibration)
    _check_plan(res, plan)
    assert res.report.records[-1].modified  # quantize did something after the shrink
    path = tmp_path / "m.onnx"
    art = fxopt.lower(res.module, "onnx", inputs, path=path)
    assert art.manifest["verified"], art.manifest
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops, ops
    numel, _ = _onnx_weights(path)
    assert numel < 0.8 * _weight_numel(model), (numel, _weight_numel(model))
    loaded = fxopt.load(path)
    fresh = spec.make_inputs(3 if spec.dynamic_batch else spec.batch)
    for x in (inputs, fresh):
        with torch.no_grad():
            want = reference(*x)
        got = loaded(*x)
        assert compare_outputs(want, got, QUANTIZED).ok(QUANTIZED), (
            f"pruned int8 in ONNX Runtime vs pruned float: cosines {_cosines(want, got)}")


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_prune_then_fp16_in_onnx_runtime(name, mode, tmp_path):
    model, inputs = zoo.load(name)
    reference, plan = _pruned_alone(model, inputs, mode)
    res = fxopt.optimize(model, inputs, f"{PRUNE},half(dtype=fp16)", mode=mode)
    _check_plan(res, plan)
    path = tmp_path / "m.onnx"
    art = fxopt.lower(res.module, "onnx", inputs, path=path)
    assert art.manifest["verified"], art.manifest
    numel, types = _onnx_weights(path)
    assert numel < 0.8 * _weight_numel(model)
    assert onnx.TensorProto.FLOAT16 in types, types  # the weights went to half
    loaded = fxopt.load(path)
    with torch.no_grad():
        want = reference(*inputs)
    got = loaded(*inputs)
    assert compare_outputs(want, got, HALF_FP16).ok(HALF_FP16), _cosines(want, got)


_RELOAD = """
import json, sys, torch, fxopt
art = fxopt.load(sys.argv[1])
inputs = torch.load(sys.argv[2])
with torch.no_grad():
    out = art(*inputs)
torch.save(out, sys.argv[3])
print(json.dumps({k: list(v.shape) for k, v in art.module.state_dict().items()}))
"""


@pytest.mark.parametrize("name", ["resnet", "transformer"])
def test_eager_artifact_stores_the_smaller_weights_and_reloads_in_a_fresh_process(
        name, tmp_path):
    from safetensors import safe_open

    model, inputs = zoo.load(name)
    plain = fxopt.optimize(model, inputs, "default", mode="symbolic").module
    pruned, plan = _pruned_alone(model, inputs, "symbolic")
    fxopt.lower(plain, "eager", inputs, path=tmp_path / "plain")
    fxopt.lower(pruned, "eager", inputs, path=tmp_path / "pruned")
    sizes = {k: (tmp_path / k / "weights.safetensors").stat().st_size for k in ("plain", "pruned")}
    assert sizes["pruned"] < 0.8 * sizes["plain"], sizes
    with safe_open(str(tmp_path / "pruned" / "weights.safetensors"), "pt") as f:
        stored = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118
    # every pruned tensor is stored at its pruned shape: the stored shapes are the module's
    shapes = {tuple(t.shape) for t in pruned.state_dict().values()}
    assert set(stored.values()) <= shapes
    assert sum(torch.Size(s).numel() for s in stored.values()) < 0.8 * sum(
        t.numel() for t in plain.state_dict().values())
    # a fresh interpreter (nothing of this process) loads the folder and computes the same
    torch.save(inputs, tmp_path / "inputs.pt")
    run = subprocess.run(
        [sys.executable, "-c", _RELOAD, str(tmp_path / "pruned"), str(tmp_path / "inputs.pt"),
         str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300, check=False)
    assert run.returncode == 0, run.stderr[-2000:]
    reloaded = json.loads(run.stdout.strip().splitlines()[-1])
    assert {k: tuple(v) for k, v in reloaded.items()} == {
        k: tuple(t.shape) for k, t in pruned.state_dict().items()}
    with torch.no_grad():
        want = pruned(*inputs)
    assert compare_outputs(want, torch.load(tmp_path / "out.pt")).ok()
    # the pruned widths are the plan's: some producer weight lost exactly its indices
    member = next(m for g in plan for m in g["members"] if m["role"] == "producer")
    before = model.state_dict()[member["param"]].shape[member["dim"]]
    assert any(s[member["dim"]] == before - len(member["indices"]) for s in stored.values()
               if len(s) > member["dim"])
