"""slice_packed_projections: nn.MultiheadAttention's packed q/k/v split read as slices."""

from __future__ import annotations

import copy
from collections import Counter

import onnx
import torch
import torch.nn as nn

import fxopt
from fxopt import zoo
from fxopt.passes.attention import slice_packed
from fxopt.pipeline import PIPELINES
from fxopt.verify import random_like_inputs

SELECT = torch.ops.aten.select.int
SLICE = torch.ops.aten.slice.Tensor
WITHOUT = [p for p in PIPELINES["default"] if p != "slice_packed_projections"]


def _targets(gm) -> Counter:
    return Counter(n.target for n in gm.graph.nodes if n.op == "call_function")


def test_zoo_transformer_selects_become_slices_exactly(tmp_path):
    model, inputs = zoo.load("transformer")
    model.eval()
    gm = fxopt.optimize(model, inputs, WITHOUT, mode="export").module
    ref = copy.deepcopy(gm)
    assert _targets(gm)[SELECT] == 6  # q, k, v of two attention layers
    assert slice_packed(gm) == 6
    gm.graph.lint()
    kinds = _targets(gm)
    assert kinds[SELECT] == 0 and kinds[SLICE] == 6
    assert kinds[torch.ops.aten.unsqueeze.default] == 0
    for seed in (1, 2):
        batch = random_like_inputs(inputs, seed=seed)
        with torch.no_grad():
            assert torch.equal(gm(*batch), ref(*batch))
    assert slice_packed(gm) == 0  # nothing left to do

    # in the default pipeline, and fewer nodes for ONNX Runtime
    res = fxopt.optimize(model, inputs, "default", mode="export")
    assert _targets(res.module)[SLICE] == 6
    counts = {}
    for label, g in (("with", res.module), ("without", ref)):
        path = tmp_path / f"{label}.onnx"
        fxopt.lower(g, "onnx", inputs, path=path)
        counts[label] = Counter(n.op_type for n in onnx.load(str(path)).graph.node)
    assert counts["with"]["Transpose"] < counts["without"]["Transpose"]
    assert sum(counts["with"].values()) < sum(counts["without"].values())


def test_other_layouts_are_left_alone():
    class Packed(nn.Module):
        def forward(self, y):  # the same chain, but split on the other axis of [n, E]
            p = y.unflatten(-1, [3, 8]).unsqueeze(0).transpose(0, -1).squeeze(-1).contiguous()
            return p.select(0, 1) + 1

    y = torch.randn(2, 5, 24)
    gm = fxopt.capture(Packed(), (y,), mode="export")
    code = gm.code
    assert slice_packed(gm) == 0
    assert gm.code == code


def test_pass_reports_nothing_done_on_a_model_without_mha():
    model, inputs = zoo.load("gqa")
    res = fxopt.optimize(model, inputs, "slice_packed_projections", mode="export")
    entry = res.report.to_dict()[-1]
    assert entry["stats"]["sliced"] == 0
