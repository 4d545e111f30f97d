"""The ONNX backend: export (both exporters), cleanup, checker, ORT verification, artifacts."""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
import torch
import torch.fx as fx
import torch.nn as nn
from onnxscript import rewriter as onnxscript_rewriter

import fxopt
from fxopt import zoo
from fxopt.errors import FxoptWarning, LoweringError
from fxopt.lowering import onnx as onnx_backend
from fxopt.lowering import onnx_export
from fxopt.verify import compare_outputs

ZOO = [(name, mode) for name in zoo.names() for mode in ("symbolic", "export")
       if not (name == "dynamic" and mode == "symbolic")]


_OPTIMIZED: dict[tuple[str, str], tuple[fx.GraphModule, tuple]] = {}


def _optimized(zoo_case, name: str, mode: str) -> tuple[fx.GraphModule, tuple]:
    """The zoo model's capture after ``default``, optimized once per module (tests only read
    it: ``fxopt.lower`` never changes the graph it exports)."""
    if (name, mode) not in _OPTIMIZED:
        model, inputs, gm = zoo_case(name, mode)
        _OPTIMIZED[name, mode] = fxopt.optimize(gm, inputs, "default").module, inputs
    return _OPTIMIZED[name, mode]


@pytest.fixture(scope="module")
def default_export(zoo_case, tmp_path_factory):
    """``default_export(name, mode) -> (gm, inputs, artifact)``: ``_optimized``'s graph
    lowered with ``lower(gm, "onnx", inputs)``'s defaults (dynamo, dynamic batch), once per
    module; several tests read the same export."""
    folder, done = tmp_path_factory.mktemp("zoo_onnx"), {}

    def get(name: str, mode: str):
        if (name, mode) not in done:
            gm, inputs = _optimized(zoo_case, name, mode)
            art = fxopt.lower(gm, "onnx", inputs, path=folder / f"{name}-{mode}.onnx")
            done[name, mode] = gm, inputs, art
        return done[name, mode]

    return get


def _input_dims(path) -> list[list]:
    model = onnx.load(str(path), load_external_data=False)
    return [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in model.graph.input]


def _leftovers(folder) -> list[str]:
    return [p for p in os.listdir(folder) if ".tmp-" in p]


class Seq(nn.Module):
    """(batch, seq, 16) -> (batch, seq, 8): any sequence length."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 8)
        self.ln = nn.LayerNorm(8)

    def forward(self, x):
        return self.ln(torch.relu(self.fc(x))).softmax(-1)


class TwoHeads(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 2)

    def forward(self, x):
        return {"logits": self.a(x), "extra": (self.b(x), x.sum(-1))}


# --------------------------------------------------------------------------- zoo


@pytest.mark.parametrize("name,mode", ZOO)
def test_zoo_export_passes_checker_and_matches_in_ort(default_export, fresh_inputs, name,
                                                       mode):
    gm, inputs, art = default_export(name, mode)
    onnx.checker.check_model(str(art.path), full_check=True)
    proto = onnx.load(str(art.path))
    opset = onnx_backend.DEFAULT_OPSET
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    assert art.manifest["opset"] == opset and art.manifest["exporter"] == "dynamo"
    assert all(dims[0] == "batch" for dims in _input_dims(art.path))
    assert not any(n.op_type == "Identity" for n in proto.graph.node)
    assert len(art.manifest["verified"]) == 2  # the example inputs and a grown batch
    for check in art.manifest["verified"].values():
        assert check["max_rel"] <= 1e-4
    x = fresh_inputs(inputs, batch=inputs[0].shape[0] + 2)
    with torch.no_grad():
        assert compare_outputs(gm(*x), art(*x)).ok()


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "densenet", "transformer", "mlp"])
def test_torchscript_exporter_on_symbolic_graphs(zoo_case, fresh_inputs, tmp_path, name):
    gm, inputs = _optimized(zoo_case, name, "symbolic")
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", exporter="torchscript")
    assert art.manifest["exporter"] == "torchscript"
    onnx.checker.check_model(str(art.path))
    x = fresh_inputs(inputs, batch=5)
    with torch.no_grad():
        assert compare_outputs(gm(*x), art(*x)).ok()


def test_torchscript_that_bakes_the_batch_size_is_refused(zoo_case, tmp_path):
    gm, inputs = _optimized(zoo_case, "transformer", "export")
    with pytest.raises(LoweringError, match="exporter='dynamo'"):
        fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", exporter="torchscript")
    assert os.listdir(tmp_path) == []


def test_auto_falls_back_to_torchscript_and_says_so(zoo_case, tmp_path, monkeypatch):
    gm, inputs = _optimized(zoo_case, "resnet", "symbolic")

    def broken(*args, **kwargs):
        raise RuntimeError("simulated torch.export failure")

    monkeypatch.setattr(onnx_backend.onnx_export, "_export_dynamo", broken)
    with pytest.warns(FxoptWarning, match="torchscript exporter because.*simulated"):
        art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx")
    assert art.manifest["exporter"] == "torchscript"
    assert "simulated" in art.manifest["fallback_from"][0]
    with pytest.raises(LoweringError, match="dynamo exporter failed.*simulated"):
        fxopt.lower(gm, "onnx", inputs, path=tmp_path / "n.onnx", exporter="dynamo")
    assert not (tmp_path / "n.onnx").exists()


# --------------------------------------------------------------------------- options


@pytest.mark.parametrize("opset,exporter", [(17, "torchscript"), (18, "dynamo"), (20, "dynamo")])
def test_opset_is_chosen_checked_and_recorded(tmp_path, opset, exporter):
    gm = fx.symbolic_trace(Seq())
    x = torch.randn(2, 5, 16)
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "m.onnx", opset=opset, exporter=exporter)
    proto = onnx.load(str(art.path))
    assert {o.domain: o.version for o in proto.opset_import}[""] == opset
    assert fxopt.load(art.path).manifest["opset"] == opset


def test_named_dynamic_dimension(tmp_path):
    gm = fx.symbolic_trace(Seq())
    x = torch.randn(2, 5, 16)
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "m.onnx", dynamic_dims={"x": {1: "seq"}})
    assert _input_dims(art.path) == [["batch", "seq", 16]]
    assert "seq=6" in " ".join(art.manifest["verified"])
    y = torch.randn(3, 11, 16)
    assert compare_outputs(gm(y), art(y)).ok()


def test_naming_a_fixed_dimension_is_an_error(zoo_case, tmp_path):
    gm, inputs = _optimized(zoo_case, "transformer", "export")  # positions are fixed at 16
    with pytest.raises(LoweringError, match="fails with batch=3, seq=17"):
        fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", exporter="dynamo",
                    dynamic_dims={0: {1: "seq"}})
    assert os.listdir(tmp_path) == []


def test_static_export(tmp_path):
    gm = fx.symbolic_trace(Seq())
    art = fxopt.lower(gm, "onnx", (torch.randn(2, 5, 16),), path=tmp_path / "m.onnx",
                      dynamic=False)
    assert _input_dims(art.path) == [[2, 5, 16]]
    assert list(art.manifest["verified"]) == ["the example inputs"]


def test_batch_of_one_still_exports_a_dynamic_batch(zoo_model, tmp_path):
    model, (x,) = zoo_model("resnet")
    gm = fxopt.capture(model, (x[:1],), mode="export")
    art = fxopt.lower(gm, "onnx", (x[:1],), path=tmp_path / "m.onnx")
    assert _input_dims(art.path)[0][0] == "batch"
    y = torch.randn(4, *x.shape[1:])
    with torch.no_grad():
        assert compare_outputs(gm(y), art(y)).ok()


# shape arithmetic a dynamic batch may add to a graph whose other dimensions are fixed
SHAPE_OPS = {"Shape", "Slice", "Concat", "Gather", "Trilu", "Equal", "Where", "ConstantOfShape",
             "Expand", "Range", "Unsqueeze", "Squeeze", "Cast"}


def _op_counts(path) -> dict[str, int]:
    graph = onnx.load(str(path), load_external_data=False).graph
    return dict(Counter(n.op_type for n in graph.node))


@pytest.mark.parametrize("name", ["transformer", "gqa"])
def test_dynamic_batch_adds_no_shape_arithmetic(default_export, fresh_inputs, tmp_path, name):
    gm, inputs, dynamic = default_export(name, "export")
    fixed = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "f.onnx", dynamic=False)
    assert _input_dims(dynamic.path)[0][0] == "batch"
    counts, reference = _op_counts(dynamic.path), _op_counts(fixed.path)
    extra = {op: n - reference.get(op, 0) for op, n in counts.items()
             if op in SHAPE_OPS and n > reference.get(op, 0)}
    assert extra == {}, f"the dynamic batch computes shapes at run time: {extra}"
    assert counts == reference  # the same graph, only the batch dimension symbolic
    assert dynamic.manifest["clean"]["dynamic_reshapes"] == 0
    # the causal mask (gqa) is a constant, not rebuilt from Shape -> Trilu per call
    assert "Trilu" not in counts
    one, four = fresh_inputs(inputs, batch=1), fresh_inputs(inputs, batch=4)
    with torch.no_grad():
        for x in (one, four):
            assert compare_outputs(gm(*x), dynamic(*x)).ok()
        rows = tuple(torch.cat([a, b]) for a, b in zip(one, four))  # one's row first
        assert np.allclose(dynamic(*rows).numpy()[:1], dynamic(*one).numpy(), atol=1e-5)


def test_dynamic_sequence_keeps_its_shape_arithmetic_and_stays_exact(zoo_case, fresh_inputs,
                                                                     tmp_path):
    # batch and sequence both dynamic: two symbolic dims per reshape, nothing may be fixed
    gm, inputs = _optimized(zoo_case, "gqa", "export")
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", exporter="dynamo",
                      dynamic_dims={0: {1: "seq"}})
    assert "Trilu" in _op_counts(art.path)  # the mask follows the sequence length
    assert art.manifest["clean"]["dynamic_reshapes"] > 0
    x = torch.randn(3, inputs[0].shape[1] + 5, inputs[0].shape[2])
    with torch.no_grad():
        assert compare_outputs(gm(x), art(x)).ok()


class WideHeads(nn.Module):
    """(batch, 8, 1024) -> a head split (reshape with the batch dynamic) -> (batch, 8, 1024)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(1024, 1024)

    def forward(self, x):
        h = self.fc(x).reshape(x.shape[0], -1, 4, 256).transpose(1, 2)
        return h.softmax(-1).transpose(1, 2).reshape(x.shape[0], -1, 1024)


def test_shape_inference_never_serializes_the_weights(tmp_path, monkeypatch):
    sizes: list[int] = []
    infer = onnx.shape_inference.infer_shapes

    def small_only(proto, *args, **kwargs):  # every whole-model inference call passes here
        sizes.append(proto.ByteSize())
        assert proto.ByteSize() < 2**20, "the weights were serialized for shape inference"
        return infer(proto, *args, **kwargs)

    monkeypatch.setattr(onnx.shape_inference, "infer_shapes", small_only)
    gm = fx.symbolic_trace(WideHeads())  # 4 MiB of weights
    x = torch.randn(2, 8, 1024)
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "m.onnx")
    assert sizes, "shape inference with data propagation did not run"
    assert art.manifest["clean"]["dynamic_reshapes"] == 0
    y = torch.randn(5, 8, 1024)
    with torch.no_grad():
        assert compare_outputs(gm(y), art(y)).ok()


def test_external_data_above_the_threshold(zoo_case, tmp_path):
    gm, inputs = _optimized(zoo_case, "resnet", "symbolic")
    small = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "small.onnx")
    assert sorted(os.listdir(tmp_path)) == ["small.onnx"]
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "big.onnx", external_data_threshold=1024)
    assert (tmp_path / "big.onnx.data").stat().st_size > 10_000
    assert (tmp_path / "big.onnx").stat().st_size < small.path.stat().st_size / 5
    onnx.checker.check_model(str(art.path))
    copy = fxopt.load(art.path).save(tmp_path / "copy" / "renamed.onnx")
    assert sorted(os.listdir(tmp_path / "copy")) == ["renamed.onnx", "renamed.onnx.data"]
    with torch.no_grad():
        assert compare_outputs(gm(*inputs), copy(*inputs)).ok()


def test_session_options_and_providers(zoo_case, tmp_path):
    gm, inputs = _optimized(zoo_case, "mlp", "symbolic")
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", threads=2,
                      graph_optimization_level="basic", providers=["CPUExecutionProvider"])
    opts = art.session.get_session_options()
    assert opts.intra_op_num_threads == 2
    assert opts.graph_optimization_level == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert art.session.get_providers() == ["CPUExecutionProvider"]
    again = fxopt.load(art.path, threads=1, graph_optimization_level="disable")
    assert again.session.get_session_options().intra_op_num_threads == 1


# --------------------------------------------------------------------------- verification


def test_injected_mismatch_raises_and_leaves_no_file(zoo_case, tmp_path, monkeypatch):
    gm, inputs = _optimized(zoo_case, "resnet", "symbolic")
    clean = onnx_backend.onnx_export.clean

    def corrupt(model):  # scale the first conv weight by 1%
        stats = clean(model)
        for value in model.graph.initializers.values():
            if value.const_value is not None and value.const_value.numpy().ndim == 4:
                value.const_value = onnx_backend.ir.Tensor(value.const_value.numpy() * 1.01,
                                                           name=value.name)
                break
        return stats

    monkeypatch.setattr(onnx_backend.onnx_export, "clean", corrupt)
    out = tmp_path / "new" / "m.onnx"
    with pytest.raises(LoweringError, match="output 'output' differs by") as err:
        fxopt.lower(gm, "onnx", inputs, path=out)
    assert "not written" in str(err.value)
    assert not (tmp_path / "new").exists()
    assert os.listdir(tmp_path) == []


def _corrupting(clean, how: str):
    """``onnx_export.clean`` followed by a real bug in one fp16 layer of the export: the
    middle conv's kernel negated, or the classifier's weight 6% too large."""

    def corrupt(model):
        stats = clean(model)
        values = [v for v in model.graph.initializers.values() if v.const_value is not None
                  and v.const_value.dtype == onnx_backend.ir.DataType.FLOAT16]
        ndim = 4 if how == "flip" else 2
        layers = [v for v in values if v.const_value.numpy().ndim == ndim]
        value = layers[len(layers) // 2] if how == "flip" else layers[-1]
        factor = -1.0 if how == "flip" else 1.06
        value.const_value = onnx_backend.ir.Tensor(
            (value.const_value.numpy() * factor).astype(np.float16), name=value.name)
        return stats

    return corrupt


@pytest.fixture(scope="module")
def fp16_resnet(zoo_case, tmp_path_factory):
    """(half graph, inputs, its clean ONNX export): the zoo resnet after
    ``default,half(dtype=fp16)``, exported once for the corruption tests below."""
    model, inputs, gm = zoo_case("resnet", "symbolic")
    half = fxopt.optimize(gm, inputs, "default,half(dtype=fp16)").module
    art = fxopt.lower(half, "onnx", inputs, path=tmp_path_factory.mktemp("fp16") / "ok.onnx")
    return half, inputs, art


@pytest.mark.parametrize("how", ["flip", "scale"])
def test_a_wrong_fp16_export_is_refused(fp16_resnet, monkeypatch, tmp_path, how):
    """fp16 graphs are verified with the half tolerance (fxopt.verify.graph_tolerance), not
    the fp32 one; that tolerance still refuses one broken layer and writes nothing."""
    from fxopt.verify import HALF_FP16

    half, inputs, art = fp16_resnet
    assert art.manifest["tolerance"] == {"rtol": HALF_FP16.rtol, "atol": HALF_FP16.atol,
                                         "min_cosine": HALF_FP16.min_cosine}
    monkeypatch.setattr(onnx_backend.onnx_export, "clean",
                        _corrupting(onnx_backend.onnx_export.clean, how))
    out = tmp_path / "new" / "m.onnx"
    with pytest.raises(LoweringError, match="output 'output' differs by") as err:
        fxopt.lower(half, "onnx", inputs, path=out, exporter="dynamo")
    assert "allowed 0.001 + 0.03*scale" in str(err.value) and "not written" in str(err.value)
    assert not (tmp_path / "new").exists()


def test_replacing_an_existing_model_and_refusing_other_files(zoo_case, tmp_path):
    gm, inputs = _optimized(zoo_case, "mlp", "symbolic")
    path = tmp_path / "m.onnx"
    fxopt.lower(gm, "onnx", inputs, path=path, opset=18)
    fxopt.lower(gm, "onnx", inputs, path=path, opset=20)
    assert fxopt.load(path).manifest["opset"] == 20
    notes = tmp_path / "notes.onnx"
    notes.write_text("my notes")
    with pytest.raises(LoweringError, match="not an ONNX model file; refusing"):
        fxopt.lower(gm, "onnx", inputs, path=notes)
    assert notes.read_text() == "my notes"
    (tmp_path / "d.onnx").mkdir()
    with pytest.raises(LoweringError, match="refusing"):
        fxopt.lower(gm, "onnx", inputs, path=tmp_path / "d.onnx")
    assert sorted(os.listdir(tmp_path)) == ["d.onnx", "m.onnx", "notes.onnx"]


@pytest.mark.parametrize("options,match", [
    ({"exporter": "tflite"}, "unknown exporter"),
    ({"opset": 3}, "opset 3 is not available"),
    ({"threads": 0}, "threads must be a positive integer"),
    ({"providers": ["NoSuchExecutionProvider"]}, "not available here"),
    ({"graph_optimization_level": "max"}, "graph_optimization_level"),
    ({"dynamic_dims": {"y": {1: "seq"}}}, "inputs are x"),
    ({"dynamic_dims": {0: {7: "seq"}}}, "not a dimension"),
    ({"dim_bounds": {"batch": (4, 2, 8)}}, "min <= opt <= max"),
    ({"dim_bounds": {"seq": (1, 2, 8)}}, "not a dynamic dimension"),
])
def test_user_mistakes_are_typed_and_write_nothing(tmp_path, options, match):
    gm = fx.symbolic_trace(Seq())
    with pytest.raises(LoweringError, match=match):
        fxopt.lower(gm, "onnx", (torch.randn(2, 5, 16),), path=tmp_path / "m.onnx", **options)
    assert os.listdir(tmp_path) == []


def test_wrong_arguments(tmp_path):
    gm = fx.symbolic_trace(Seq())
    with pytest.raises(LoweringError, match="pass path="):
        fxopt.lower(gm, "onnx", (torch.randn(2, 5, 16),))
    with pytest.raises(LoweringError, match="capture the model first"):
        fxopt.lower(Seq(), "onnx", (torch.randn(2, 5, 16),), path=tmp_path / "m.onnx")
    flag = fx.symbolic_trace(lambda x, scale: x * scale)
    with pytest.raises(LoweringError, match="must be tensors"):
        fxopt.lower(flag, "onnx", (torch.randn(2), 2.0), path=tmp_path / "m.onnx")
    assert os.listdir(tmp_path) == []


# --------------------------------------------------------------------------- artifacts


def test_artifact_takes_numpy_and_torch_and_keeps_output_structure(tmp_path):
    gm = fx.symbolic_trace(TwoHeads())
    x = torch.randn(3, 4)
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "m.onnx")
    assert art.output_names == ["logits", "extra_0", "extra_1"]
    for inp in (x, x.numpy()):
        out = fxopt.load(tmp_path / "m.onnx")(inp)
        assert set(out) == {"logits", "extra"} and isinstance(out["extra"], tuple)
        assert compare_outputs(gm(x), out).ok()
    with pytest.raises(LoweringError, match="takes 1 input"):
        art(x, x)


def test_load_folder_and_foreign_onnx_files(tmp_path):
    model = Seq().eval()
    x = torch.randn(2, 5, 16)
    (tmp_path / "plain").mkdir()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), str(tmp_path / "plain" / "model.onnx"), dynamo=False)
    art = fxopt.load(tmp_path / "plain")
    assert art.kind == "onnx" and art.manifest == {}
    assert torch.allclose(art(x), model(x), atol=1e-5)
    (tmp_path / "junk.onnx").write_bytes(b"\x00not a model")
    with pytest.raises(LoweringError, match="not a readable ONNX model"):
        fxopt.load(tmp_path / "junk.onnx")


def test_save_to_a_folder_writes_model_onnx(tmp_path):
    gm = fx.symbolic_trace(Seq())
    x = torch.randn(2, 5, 16)
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "out")
    assert art.path == tmp_path / "out" / "model.onnx"
    saved = art.save(tmp_path / "copy.onnx")
    assert saved.path == tmp_path / "copy.onnx"
    assert np.allclose(saved(x).numpy(), art(x).numpy())
    assert art.save(art.path) is art


# --------------------------------------------------------------------------- TensorRT readiness


@pytest.mark.parametrize("name", ["resnet", "mobilenet", "shufflenet", "transformer", "gqa"])
def test_fxopt_exports_are_tensorrt_ready(default_export, tmp_path, name):
    gm, inputs, unbounded = default_export(name, "export")
    art = fxopt.lower(gm, "onnx", inputs, path=tmp_path / "m.onnx", dim_bounds={"batch": (1, 2, 8)})
    assert art.manifest["dim_bounds"] == {"batch": [1, 2, 8]}
    for version in (10, 11):
        assert fxopt.check_trt(art.path, trt_version=version).findings == []
    report = fxopt.check_trt(unbounded.path)
    assert report.ok and [f.code for f in report.findings] == ["unbounded-dynamic-dim"]


def test_a_bf16_graph_without_cpu_kernels_names_the_kernel(zoo_case, tmp_path):
    """ONNX Runtime's CPU provider has no bfloat16 Conv (ORT 1.2x-1.3x): a typed error that
    names it and says what to do, and no file; once it has one, the export verifies."""
    model, inputs, gm = zoo_case("resnet", "symbolic")
    half = fxopt.optimize(gm, inputs, "default,half(dtype=bf16)").module
    out = tmp_path / "new" / "m.onnx"
    try:
        art = fxopt.lower(half, "onnx", inputs, path=out, exporter="dynamo")
    except LoweringError as e:
        assert re.search(r"no bfloat16 kernel for Conv on CPUExecutionProvider: export with "
                         r"half\(dtype=fp16\)", str(e)), str(e)
        assert not (tmp_path / "new").exists()
    else:
        assert art.manifest["tolerance"]["rtol"] == 0.1


class LinearThenTwoViews(nn.Module):
    """A linear layer read through two views, the second sharing its target with another
    view: Swin's window partition after a projection, in miniature."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(16, 16)

    def forward(self, x):  # (batch, 64, 16)
        b = x.shape[0]
        a = self.fc(x).view(b, 8, 8, 16).view(b, 2, 4, 2, 4, 16)
        return a + (x * 2).view(b, 2, 4, 2, 4, 16)


def test_reshape_chains_fused_twice_keep_their_shared_shape(tmp_path, monkeypatch):
    # onnxscript fuses view(view(linear)) in clean's first round, under the name
    # "<out>/shape", shared with the other view; Gemm then puts a Reshape before it and the
    # second round's fusion takes the same name, unregistering the shared one: without
    # reattach_orphaned_constants onnx.checker refuses ("must be topologically sorted")
    gm = fx.symbolic_trace(LinearThenTwoViews())
    x = torch.randn(2, 64, 16)
    reattached: list[int] = []
    reattach = onnx_export.reattach_orphaned_constants
    monkeypatch.setattr(onnx_export, "reattach_orphaned_constants",
                        lambda m: reattached.append(reattach(m)) or reattached[-1])
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "m.onnx", exporter="dynamo")
    assert sum(reattached) >= 1, "the collision this test reproduces no longer happens"
    assert _input_dims(art.path)[0][0] == "batch"
    assert len(art.manifest["verified"]) == 2  # example inputs and a grown batch
    y = torch.randn(5, 64, 16)
    with torch.no_grad():
        assert compare_outputs(gm(y), art(y)).ok()


def test_reattach_orphaned_constants_names_them_afresh():
    x = ir.Value(name="x", shape=ir.Shape([2, 6]), type=ir.TensorType(ir.DataType.FLOAT))
    taken = ir.Value(name="s", const_value=ir.tensor(np.array([3, 4], dtype=np.int64)))
    orphan = ir.Value(name="s", const_value=ir.tensor(np.array([4, 3], dtype=np.int64)))
    a = ir.node("Reshape", [x, taken])
    b = ir.node("Reshape", [x, orphan])
    for node, shape in ((a, [3, 4]), (b, [4, 3])):
        node.outputs[0].type, node.outputs[0].shape = x.type, ir.Shape(shape)
    graph = ir.Graph([x], [a.outputs[0], b.outputs[0]], nodes=[a, b], initializers=[taken],
                     opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=10)
    assert onnx_export.reattach_orphaned_constants(model) == 1
    assert orphan.is_initializer() and orphan.name not in ("s", "x")
    assert graph.initializers["s"] is taken
    assert onnx_export.reattach_orphaned_constants(model) == 0
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = session.run(None, {"x": np.arange(12, dtype=np.float32).reshape(2, 6)})
    assert [o.shape for o in outs] == [(3, 4), (4, 3)]  # each Reshape reads its own target


class RMSNormAndReciprocal(nn.Module):
    """An RMSNorm (``x * rsqrt(...)``) and a plain ``x * (1 / y)`` that is no rsqrt."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = zoo.transformers.RMSNorm(16)
        self.fc = nn.Linear(16, 16)

    def forward(self, x):
        h = self.fc(self.norm(x))
        return h * torch.reciprocal(h.abs() + 1.0)


def _ort_optimized_ops(path, tmp_path) -> Counter:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.optimized_model_filepath = str(tmp_path / "ort-optimized.onnx")
    ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    return Counter(n.op_type for n in onnx.load(opts.optimized_model_filepath).graph.node)


@pytest.mark.parametrize("scheme", [None, "dynamic_int8"])
def test_rmsnorm_exports_in_the_form_ort_fuses(tmp_path, scheme):
    torch.manual_seed(0)
    model = RMSNormAndReciprocal().eval()
    x = torch.randn(2, 8, 16)
    pipeline = "default" + (f",quantize(scheme={scheme})" if scheme else "")
    gm = fxopt.optimize(model, (x,), pipeline, mode="export").module
    art = fxopt.lower(gm, "onnx", (x,), path=tmp_path / "m.onnx")
    written = _op_counts(art.path)
    # rsqrt's Reciprocal became a Div; the other reciprocal is left as written
    assert written.get("Reciprocal") == 1 and written.get("Div") == 1
    fused = _ort_optimized_ops(art.path, tmp_path)
    assert fused.get("SimplifiedLayerNormalization") == 1, fused
    assert "Sqrt" not in fused and "ReduceMean" not in fused
    y = torch.randn(3, 8, 16)
    with torch.no_grad():
        report = compare_outputs(gm(y), art(y))
    assert report.ok(), report


def test_rsqrt_as_div_leaves_a_shared_reciprocal():
    # the Reciprocal is read twice: rewriting one Mul would keep it and add a Div
    x = ir.Value(name="x", shape=ir.Shape([2, 4]), type=ir.TensorType(ir.DataType.FLOAT))
    v = ir.Value(name="v", shape=ir.Shape([2, 1]), type=ir.TensorType(ir.DataType.FLOAT))
    sqrt = ir.node("Sqrt", [v])
    rec = ir.node("Reciprocal", [sqrt.outputs[0]])
    mul = ir.node("Mul", [x, rec.outputs[0]])
    graph = ir.Graph([x, v], [mul.outputs[0], rec.outputs[0]], nodes=[sqrt, rec, mul],
                     opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=10)
    onnxscript_rewriter.rewrite(model, onnx_export.RULES)
    assert [n.op_type for n in model.graph] == ["Sqrt", "Reciprocal", "Mul"]
