"""The ``sparsify`` pass: unstructured and 2:4 magnitude sparsity on the zoo in both capture
forms, checked against an independently masked twin; zeros kept through later passes; the
compact eager artifact; every bad argument."""

from __future__ import annotations

import copy
import pickle

import pytest
import safetensors.torch
import torch
import torch.fx as fx
from torch import nn

import fxopt
from fxopt import zoo
from fxopt.errors import LoweringError, PassError, SpecError
from fxopt.lowering.eager_storage import compact_tensor, expand_tensor
from fxopt.ops import count_kinds, op_of
from fxopt.passes.base import Pass, PassContext, PassResult
from fxopt.passes.sparsify import (
    effective_weight,
    mask_2to4,
    sparsity,
    sparsity_table,
    validate_pattern,
    violations_2to4,
)
from fxopt.pipeline import parse_pipeline
from fxopt.verify import EXACT, compare_outputs

MODES = ("auto", "export")


def _stats(res, name: str = "sparsify") -> dict:
    return next(r.stats for r in res.report if r.name == name)


def _weights(gm: fx.GraphModule, names) -> dict[str, torch.Tensor]:
    nodes = {n.name: n for n in gm.graph.nodes}
    return {name: op_of(nodes[name]).params["weight"] for name in names}


def _masked_twin(gm: fx.GraphModule, sparse: fx.GraphModule, names) -> fx.GraphModule:
    """``gm`` with each listed layer's weight zeroed wherever ``sparse`` holds a zero,
    written straight into the tensors (not through the pass's code path)."""
    twin = copy.deepcopy(gm)
    after = _weights(sparse, names)
    with torch.no_grad():
        for name, w in _weights(twin, names).items():
            w.mul_((after[name] != 0).to(w.dtype))
    return twin


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", zoo.names())
@pytest.mark.parametrize("spec", ["sparsify(ratio=0.6)", "sparsify(pattern='2:4')"])
def test_zoo_matches_masked_twin(zoo_case, name, mode, spec):
    model, inputs, gm = zoo_case(name, mode)
    before = copy.deepcopy(gm)
    res = fxopt.optimize(gm, inputs, spec)
    out = res.module
    out.graph.lint()
    assert count_kinds(out) == count_kinds(before)  # zeros only, no new ops
    stats = _stats(res)
    layers = stats["layers"]
    assert layers and stats["sparsity"] >= (0.6 if "0.6" in spec else 0.5) - 1e-3
    twin = _masked_twin(before, out, layers)
    with torch.no_grad():
        assert compare_outputs(twin(*inputs), out(*inputs)).ok(EXACT)
        # and it is a different function from the dense model
        assert not compare_outputs(before(*inputs), out(*inputs)).ok(EXACT)
    for node_name, info in layers.items():
        w = _weights(out, [node_name])[node_name]
        assert info["zeros"] == int((w == 0).sum()) and info["numel"] == w.numel()
        if "2:4" in spec:
            assert violations_2to4(w) == 0
    if "2:4" in spec:
        assert validate_pattern(out, "2:4").keys() == layers.keys()
    # the user's model is untouched
    assert all(int((p == 0).sum()) < p.numel() // 4 for p in model.parameters() if p.dim() > 1)


def test_local_scope_and_threshold(zoo_case):
    _, inputs, gm = zoo_case("resnet", "auto")
    res = fxopt.optimize(copy.deepcopy(gm), inputs, "sparsify(ratio=0.3,scope=local)")
    for info in _stats(res)["layers"].values():
        assert info["zeros"] == int(0.3 * info["numel"])  # every layer exactly, none more
    glob = _stats(fxopt.optimize(copy.deepcopy(gm), inputs, "sparsify(ratio=0.3)"))["layers"]
    assert len({round(v["sparsity"], 2) for v in glob.values()}) > 1  # global: uneven per layer

    t = 0.05
    res = fxopt.optimize(copy.deepcopy(gm), inputs, f"sparsify(threshold={t})")
    stats = _stats(res)
    assert stats["scope"] == "threshold" and stats["ratio"] is None
    dense = _weights(gm, stats["layers"])
    for name, w in _weights(res.module, stats["layers"]).items():
        small = dense[name].abs() <= t
        assert bool((w[small] == 0).all()) and torch.equal(w[~small], dense[name][~small])


def test_unchanged_and_skip():
    model = zoo.load("mlp")[0]
    x = torch.randn(4, 64)
    res = fxopt.optimize(model, (x,), "sparsify(ratio=0)")
    assert res.report[0].modified is False and _stats(res)["zeroed"] == 0
    res = fxopt.optimize(model, (x,), "sparsify(ratio=0.5,skip=['net.0'])")
    stats = _stats(res)
    assert stats["skipped"] == {"net_0": "in skip="} or "in skip=" in stats["skipped"].values()
    assert all(v["layer"] != "net.0" for v in stats["layers"].values())


def test_2to4_masks_and_validator():
    w = torch.tensor([[1.0, -4.0, 3.0, 0.5, 0.0, 0.0, 2.0, -1.0]])
    assert mask_2to4(w).tolist() == [[False, True, True, False, False, False, True, True]]
    conv = torch.randn(8, 8, 3, 3)  # groups of 4 run along input channels (dim 1)
    kept = conv * mask_2to4(conv)
    assert violations_2to4(kept) == 0
    assert int((kept.movedim(1, -1).reshape(-1, 4) != 0).sum(1).max()) == 2
    assert violations_2to4(conv) == conv.numel() // 4
    assert violations_2to4(torch.zeros(4, 6)) == -1

    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    x = torch.randn(1, 3, 8, 8)
    res = fxopt.optimize(model, (x,), "sparsify(pattern='2:4')")
    stats = _stats(res)
    assert "multiple of 4" in next(iter(stats["skipped"].values()))  # 3 input channels
    assert len(stats["layers"]) == 1
    with pytest.raises(PassError, match="not 2:4 sparse.*multiple of 4"):
        validate_pattern(res.module, "2:4", layers=[n.name for n in res.module.graph.nodes
                                                     if n.op == "call_module"][:1])
    dense = fxopt.capture(nn.Linear(8, 2), (torch.randn(1, 8),))
    with pytest.raises(PassError, match="groups of 4 hold < 2 zeros"):
        validate_pattern(dense, "2:4")
    with pytest.raises(SpecError, match="unknown sparsity pattern"):
        validate_pattern(dense, "1:4")


def test_parsed_from_pipeline_strings():
    (p,) = parse_pipeline("sparsify(ratio=0.7,scope=local,pattern=unstructured)")
    assert p.params == {"ratio": 0.7, "scope": "local", "pattern": "unstructured"}
    (q,) = parse_pipeline("sparsify(pattern='2:4')")
    assert q.params == {"pattern": "2:4"} and parse_pipeline(q.spec)[0].params == q.params
    with pytest.raises(SpecError, match="unknown argument"):
        Pass("sparsify", amount=0.5)


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("sparsify(ratio=1.0)", PassError, r"ratio must be in \[0, 1\)"),
        ("sparsify(ratio=-0.1)", PassError, r"ratio must be in \[0, 1\)"),
        ("sparsify(pattern='4:8')", PassError, "unknown pattern"),
        ("sparsify(scope=everywhere)", PassError, "unknown scope"),
        ("sparsify(ratio=0.5,threshold=0.1)", PassError, "not both"),
        ("sparsify(threshold=-1)", PassError, "threshold must be a number >= 0"),
        ("sparsify(pattern='2:4',ratio=0.7)", PassError, "always zeroes 2 of every 4"),
    ],
)
def test_bad_arguments(spec, error, match):
    model = nn.Sequential(nn.Linear(8, 8))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(error, match=match):
        fxopt.optimize(model, (torch.randn(2, 8),), spec)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_nothing_to_sparsify():
    with pytest.raises(PassError, match="nothing to sparsify.*no conv/linear op"):
        fxopt.optimize(nn.Sequential(nn.ReLU()), (torch.randn(2, 8),), "sparsify")
    with pytest.raises(PassError, match="nothing to sparsify.*in skip="):
        fxopt.optimize(nn.Linear(8, 8), (torch.randn(2, 8),), "sparsify(skip=['*'])")
    with pytest.raises(PassError, match="nothing to sparsify.*multiple of 4"):
        fxopt.optimize(nn.Linear(6, 8), (torch.randn(2, 6),), "sparsify(pattern='2:4')")


# --------------------------------------------------------------------------- later passes
@pytest.mark.parametrize("mode", MODES)
def test_pattern_kept_through_default_and_quantize(zoo_case, mode):
    _, inputs, gm = zoo_case("resnet", mode)
    calib = [tuple(torch.randn_like(x) for x in inputs) for _ in range(2)]
    # keep_head=false: every sparsified layer, the classifier too, is quantized
    pipeline = "sparsify(pattern='2:4'),default,quantize(scheme=int8,keep_head=false)"
    res = fxopt.optimize(gm, inputs, pipeline, calibration=calib)
    layers = _stats(res)["layers"]
    kept = validate_pattern(res.module, "2:4")  # through the fake-quantized weights
    # the nodes were replaced (conv -> conv on a fake-quantized weight); the masks followed
    assert len(kept) == len(layers) and min(kept.values()) >= 0.5
    if mode == "auto":
        names = {v["layer"] for v in sparsity(res.module).values()}
        assert names >= {v["layer"] for v in layers.values()}
    fq = [n for n in res.module.graph.nodes if n.name in kept]
    assert all(op_of(n).params["weight"] is None for n in fq)  # really computed by Q/DQ
    assert all(effective_weight(n) is not None for n in fq)


@pytest.mark.parametrize("mode", MODES)
def test_pattern_kept_through_half(zoo_case, mode):
    _, inputs, gm = zoo_case("gqa", mode)
    res = fxopt.optimize(gm, inputs, "default,sparsify(pattern='2:4'),half(dtype=fp16)")
    kept = validate_pattern(res.module, "2:4")
    assert kept.keys() == _stats(res)["layers"].keys()
    weights = _weights(res.module, kept)
    assert {w.dtype for w in weights.values()} == {torch.float16}


def test_mask_reapplied_after_a_pass_that_rewrites_weights(temp_pass):
    def nudge(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
        for node in gm.graph.nodes:
            w = op_of(node).params.get("weight") if node.op == "call_module" else None
            if isinstance(w, torch.Tensor) and w.dim() == 2:
                op_of(node).set_param("weight", w + 1e-4)  # nonzero everywhere
        return PassResult(gm, modified=True)

    temp_pass("nudge_weights", nudge, fxopt.Semantics.APPROXIMATE)
    model = zoo.load("mlp")[0]
    x = torch.randn(4, 64)
    res = fxopt.optimize(model, (x,), "sparsify(pattern='2:4'),nudge_weights")
    assert _stats(res, "nudge_weights")["sparsity_reapplied"] == 3
    assert set(validate_pattern(res.module, "2:4").values()) == {0.5}
    # without a sparsify before it, the pass is left alone
    res = fxopt.optimize(model, (x,), "nudge_weights")
    assert "sparsity_reapplied" not in _stats(res, "nudge_weights")
    assert all(v["zeros"] == 0 for v in sparsity(res.module).values())


# --------------------------------------------------------------------------- eager artifact
def _size(folder) -> int:
    return (folder / "weights.safetensors").stat().st_size


@pytest.mark.parametrize("mode", MODES)
def test_eager_artifact_compact_and_exact(tmp_path, zoo_case, mode, monkeypatch):
    _, inputs, gm = zoo_case("resnet", mode)
    dense = fxopt.optimize(copy.deepcopy(gm), inputs, "default").module
    sparse = fxopt.optimize(gm, inputs, "default,sparsify(ratio=0.8,scope=local)").module
    a = fxopt.lower(dense, "eager", inputs, path=tmp_path / "dense")
    b = fxopt.lower(sparse, "eager", inputs, path=tmp_path / "sparse")
    assert a.manifest["format_version"] == 1 and b.manifest["format_version"] == 2
    assert _size(tmp_path / "sparse") < 0.45 * _size(tmp_path / "dense")
    compact = [k for k, v in b.manifest["tensors"].items() if "sparse" in v]
    assert len(compact) >= 5

    def no_unpickling(*args, **kwargs):
        raise AssertionError("the eager loader unpickled something")

    monkeypatch.setattr(pickle, "loads", no_unpickling)
    monkeypatch.setattr(pickle, "load", no_unpickling)
    monkeypatch.setattr(torch, "load", no_unpickling)
    loaded = fxopt.load(tmp_path / "sparse")
    want, got = sparse.state_dict(), loaded.module.state_dict()
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) and want[k].dtype == got[k].dtype for k in want)
    with torch.no_grad():
        assert torch.equal(loaded(*inputs), sparse(*inputs))


def test_compact_tensor_bit_exact_and_corrupt_file(tmp_path):
    w = torch.randn(64, 64)
    w[w.abs() < 1.0] = 0.0
    w[0, :8] = -0.0
    w[1, 0] = float("nan")
    for t in (w, w.half(), w.bfloat16()):
        parts = compact_tensor(t)
        back = expand_tensor(parts, t.shape)
        assert back.dtype == t.dtype
        assert torch.equal(back.view(torch.uint8), t.contiguous().view(torch.uint8))
    assert compact_tensor(torch.randn(64, 64)) is None  # dense: stays dense
    assert compact_tensor(torch.zeros(10)) is None  # too small to bother

    model = nn.Sequential(nn.Linear(64, 64))
    x = torch.randn(2, 64)
    res = fxopt.optimize(model, (x,), "sparsify(ratio=0.9)")
    fxopt.lower(res.module, "eager", (x,), path=tmp_path / "m")
    f = tmp_path / "m" / "weights.safetensors"
    saved = safetensors.torch.load_file(str(f))
    key = next(k for k in saved if k.endswith(".bitmask"))
    saved[key] = saved[key][:-1].clone()
    safetensors.torch.save_file(saved, str(f), {"format": "pt"})
    with pytest.raises(LoweringError, match="bitmask of .* does not fit"):
        fxopt.load(tmp_path / "m")


@pytest.mark.parametrize("verify", [True, "end"])
def test_sparsify_before_fold_bn_keeps_zeros(zoo_case, verify):
    # fold_bn scales each output channel: zeros stay zero, and no mask needs re-applying
    _, inputs, gm = zoo_case("resnet", "auto")
    res = fxopt.optimize(gm, inputs, "sparsify(ratio=0.5,scope=local),default", verify=verify)
    assert not any(r.stats.get("sparsity_reapplied") for r in res.report)
    before = {v["layer"]: v["zeros"] for v in _stats(res)["layers"].values()}
    after = {v["layer"]: v["zeros"] for v in sparsity(res.module).values()}
    assert before and all(after[k] >= z for k, z in before.items())
    assert "batch_norm" not in count_kinds(res.module)


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(16, 16), nn.Linear(16, 16)
        self.b.weight = self.a.weight  # one parameter, two layers

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("mode", MODES)
def test_shared_weight_masked_once(mode):
    x = torch.randn(2, 16)
    res = fxopt.optimize(Tied(), (x,), "sparsify(ratio=0.5,scope=local)", mode=mode)
    layers = _stats(res)["layers"]
    assert len(layers) == 2
    a, b = _weights(res.module, layers).values()
    assert torch.equal(a, b) and int((a == 0).sum()) == 128  # one mask, half of 256


def test_sparsity_table_lists_every_layer_and_skip():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 1))
    res = fxopt.optimize(model, (torch.randn(1, 3, 8, 8),), "sparsify(pattern='2:4')")
    lines = sparsity_table(_stats(res)).splitlines()
    assert lines[0].split() == ["layer", "weights", "zeros", "sparsity"]
    assert lines[1].split() == ["2", "32", "16", "50.0%"]
    assert "(skipped)" in lines[2] and "multiple of 4" in lines[2]
    assert lines[-1].split() == ["total", "50.0%"]


def test_onnx_export_keeps_the_zeros(tmp_path):
    import onnx
    from onnx import numpy_helper

    model = zoo.load("mlp")[0]
    x = torch.randn(4, 64)
    res = fxopt.optimize(model, (x,), "sparsify(pattern='2:4')")
    art = fxopt.lower(res.module, "onnx", (x,), path=tmp_path / "m.onnx")  # checked in ORT
    weights = [numpy_helper.to_array(t) for t in onnx.load(str(art.path)).graph.initializer]
    zeros = sum(int((w == 0).sum()) for w in weights if w.ndim == 2)
    assert zeros == sum(v["zeros"] for v in _stats(res)["layers"].values())
