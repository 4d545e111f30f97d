"""Quantization-aware training (QAT) on a PTQ graph: fine-tune through the fake-quant nodes.

``prepare_qat(gm)`` takes the GraphModule of ``quantize(scheme=int8)`` and puts every
FakeQuantize in ``"qat"`` mode: forward quantizes exactly as the deployed int8 model will,
backward passes straight-through gradients (torch's ``fake_quantize_*`` ops) to the float
weights and biases of the quantized conv/linear layers, which become trainable
parameters. Scales are either observed (``learnable=False``: weights re-derive theirs from
the current weight at every step, activations keep following the data) or learned
(``learnable=True``: LSQ-style ``nn.Parameter`` scales, started from the calibrated ones).
``freeze_qat(gm)`` fixes the scales and returns the same inference graph format as PTQ,
ready for ``fxopt.lower(gm, "onnx" | "eager", ...)``.

Example::

    res = fxopt.optimize(model, inputs, "default,quantize(scheme=int8,target=ort)",
                         calibration=batches)
    gm = prepare_qat(res.module)
    opt = torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9)
    for x, y in loader:
        opt.zero_grad()
        F.cross_entropy(gm(x), y).backward()
        opt.step()
    freeze_qat(gm)
    fxopt.lower(gm, "onnx", inputs, path="out/model.onnx")

Observed activation scales are updated by every forward in ``"qat"`` mode, evaluation
batches included: evaluate after ``freeze_qat`` (or on a ``copy.deepcopy``) so test data
does not move the scales.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx
from torch import nn

from fxopt.errors import QuantizationError
from fxopt.ops import op_of
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.quant.observers import make_observer

__all__ = ["prepare_qat", "freeze_qat", "weight_fake_quants"]


class CurrentWeightObserver(nn.Module):
    """A weight observer that forgets: each call starts a fresh observer of ``kind``, so
    the scale during QAT is always the one the current weight gets at freeze time (a
    running min/max would keep the widest range any past step had)."""

    def __init__(self, kind: str, *, bits: int, signed: bool, symmetric: bool,
                 ch_axis: int | None) -> None:
        super().__init__()
        self.kind = kind
        self.options = dict(bits=bits, signed=signed, symmetric=symmetric, ch_axis=ch_axis)
        self.inner = make_observer(kind, **self.options)
        self.min_val = self.inner.min_val  # what observers.observed() reads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inner = make_observer(self.kind, **self.options).to(x.device)
        self.inner(x)
        self.min_val = self.inner.min_val
        return x

    def calculate_qparams(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.calculate_qparams()


def weight_fake_quants(gm: fx.GraphModule) -> dict[str, tuple[FakeQuantize, fx.Node]]:
    """The FakeQuantize nodes that quantize a stored weight, by module path, with the
    ``get_attr`` node that reads the weight.

    >>> {path: node.target for path, (fq, node) in weight_fake_quants(gm).items()}
    ... # doctest: +SKIP
    {'conv2d_weight_fq': 'stem_0.weight', ...}
    """
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        fq, src = gm.get_submodule(node.target), node.args[0]
        if isinstance(fq, FakeQuantize) and isinstance(src, fx.Node) and src.op == "get_attr":
            out[str(node.target)] = (fq, src)
    return out


def prepare_qat(gm: fx.GraphModule, *, learnable: bool = False) -> fx.GraphModule:
    """Make a PTQ int8 GraphModule trainable with fake quantization (in place).

    Every FakeQuantize goes to ``"qat"`` mode: observed scales, or with
    ``learnable=True`` scales that are ``nn.Parameter``s (started from the calibrated
    ones) trained with the weights. The float weights and biases that feed quantized
    conv/linear layers become ``nn.Parameter(requires_grad=True)``; other parameters are
    left as they are. The module is put in ``train()`` mode and returned. Calling it again
    with the same ``learnable`` changes nothing (an optimizer built on the parameters
    keeps working); with the other one, it raises: ``freeze_qat`` first.

    >>> res = fxopt.optimize(model, inputs, "default,quantize(scheme=int8)",
    ...                      calibration=batches)  # doctest: +SKIP
    >>> gm = prepare_qat(res.module)  # doctest: +SKIP
    >>> opt = torch.optim.SGD(gm.parameters(), lr=1e-3)  # doctest: +SKIP
    """
    fqs = _fake_quants(gm, "prepare_qat")
    for path, fq in fqs.items():
        if fq.mode == "observe":
            raise QuantizationError(
                f"fake-quant node {path} is still observing (never calibrated): finish "
                "static quantization first, e.g. fxopt.optimize(model, inputs, "
                "'default,quantize(scheme=int8)', calibration=batches), then prepare_qat")
        if fq.mode == "qat" and fq.learnable != learnable:
            raise QuantizationError(
                f"the graph is already prepared for QAT with learnable={fq.learnable} "
                f"({path}); call freeze_qat(gm) before prepare_qat(gm, learnable={learnable})")
    weights = weight_fake_quants(gm)
    for path, fq in fqs.items():
        if fq.mode == "qat":
            continue
        fq.train_qat(learnable=learnable)
        if not learnable and path in weights:
            fq.observer = CurrentWeightObserver(
                fq.observer_kind, bits=fq.bits, signed=fq.signed, symmetric=fq.symmetric,
                ch_axis=fq.axis)
    for target in _trainable_targets(gm, weights):
        _make_parameter(gm, target).requires_grad_(True)
    info = gm.meta.setdefault("fxopt", {}).get("quantized")
    if isinstance(info, dict):
        info["qat"] = {"learnable": learnable}
    return gm.train()


def freeze_qat(gm: fx.GraphModule) -> fx.GraphModule:
    """Fix the scales after QAT and return ``gm`` (in place) as a PTQ-style inference graph.

    Weight FakeQuantize nodes with observed scales re-derive them from the trained weight
    (a fresh observer of the calibration kind, fed the final weight), so the exported
    scales always match the exported weights; activation nodes keep the last observed
    scales; learned scales (``learnable=True``) are kept as trained, for weights too (the
    weights were trained against them). All FakeQuantize end in ``"quantize"`` mode, the
    trainable weights go back to ``requires_grad=False`` and the module to ``eval()``.

    >>> freeze_qat(gm)  # doctest: +SKIP
    >>> art = fxopt.lower(gm, "onnx", inputs, path="out/qat.onnx")  # doctest: +SKIP
    """
    fqs = _fake_quants(gm, "freeze_qat")
    weights = weight_fake_quants(gm)
    with torch.no_grad():
        for path, fq in fqs.items():
            if fq.mode != "qat":
                continue
            if path in weights and not fq.learnable:
                fq.observe()  # restart: the scale comes from the final weight alone
                fq(operator.attrgetter(weights[path][1].target)(gm).detach())
            fq.freeze(where=path)
    for target in _trainable_targets(gm, weights):
        operator.attrgetter(target)(gm).requires_grad_(False)
    return gm.eval()


# --------------------------------------------------------------------------- helpers


def _fake_quants(gm: fx.GraphModule, caller: str) -> dict[str, FakeQuantize]:
    if not isinstance(gm, fx.GraphModule):
        raise QuantizationError(
            f"{caller} takes the torch.fx.GraphModule of a quantized model, got "
            f"{type(gm).__name__}; quantize it first: fxopt.optimize(model, inputs, "
            "'default,quantize(scheme=int8)', calibration=batches).module")
    fqs = {p: m for p, m in gm.named_modules() if isinstance(m, FakeQuantize)}
    if not fqs:
        scheme = ((gm.meta.get("fxopt") or {}).get("quantized") or {}).get("scheme")
        how = f" (it was quantized with scheme={scheme}, which has none)" if scheme else ""
        raise QuantizationError(
            f"{caller}: the graph has no fake-quant (Q/DQ) nodes{how}; QAT trains through "
            "static int8 fake quantization, so quantize it first: fxopt.optimize(model, "
            "inputs, 'default,quantize(scheme=int8)', calibration=batches).module")
    return fqs


def _trainable_targets(gm: fx.GraphModule,
                       weights: dict[str, tuple[FakeQuantize, fx.Node]]) -> list[str]:
    """Attribute paths of the weights behind weight fake-quant nodes and the biases of
    the layers those nodes feed."""
    targets: dict[str, None] = {}
    for path, (_, w_node) in weights.items():
        targets[str(w_node.target)] = None
        fq_node = next(n for n in w_node.users if n.op == "call_module" and n.target == path)
        for user in fq_node.users:
            if user.op == "output":
                continue
            view = op_of(user)
            if view.kind not in ("conv", "linear", "matmul"):
                continue
            b = view.param_node("bias")
            if isinstance(b, fx.Node) and b.op == "get_attr":
                targets[str(b.target)] = None
    return [t for t in targets
            if isinstance(operator.attrgetter(t)(gm), torch.Tensor)
            and operator.attrgetter(t)(gm).is_floating_point()]


def _make_parameter(gm: fx.GraphModule, target: str) -> nn.Parameter:
    """The tensor at ``target`` as an ``nn.Parameter`` of its owning module (a buffer is
    turned into one in place, so ``gm.parameters()`` yields it)."""
    *parents, leaf = target.split(".")
    owner = gm.get_submodule(".".join(parents)) if parents else gm
    value = getattr(owner, leaf)
    if isinstance(value, nn.Parameter):
        return value
    param = nn.Parameter(value.detach().clone(), requires_grad=False)
    if leaf in owner._buffers:
        del owner._buffers[leaf]
    elif hasattr(owner, leaf):
        delattr(owner, leaf)
    owner.register_parameter(leaf, param)
    return param
