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
from fxopt.ops import fresh_attr, op_of
from fxopt.quant import static
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.quant.observers import make_observer, observed

__all__ = ["prepare_qat", "freeze_qat", "weight_fake_quants", "CurrentWeightObserver"]


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

    >>> {path: w.target for path, (fq, w) in weight_fake_quants(gm).items()}  # doctest: +SKIP
    {'conv2d_weight_fq': 'stem_0.weight', 'conv2d_1_weight_fq': 'layer1_conv1.weight', ...}
    """
    out = {}
    for node in gm.graph.nodes:
        if node.op != "call_module" or not node.args:
            continue
        fq, src = gm.get_submodule(node.target), node.args[0]
        if isinstance(fq, FakeQuantize) and isinstance(src, fx.Node) and src.op == "get_attr":
            out[str(node.target)] = (fq, src)
    return out


def prepare_qat(gm: fx.GraphModule, *, learnable: bool = False,
                activation_observer: str | None = None) -> fx.GraphModule:
    """Make a PTQ int8 GraphModule trainable with fake quantization (in place).

    Every FakeQuantize goes to ``"qat"`` mode with straight-through gradients. Observed
    scales (``learnable=False``): a weight node re-derives its scale from the current
    weight at every step; an activation node restarts its observer (of the calibration
    kind, or ``activation_observer``) from the calibrated range (min/max kinds) and
    follows the training batches from there. Learnable scales
    (``learnable=True``): every scale becomes an ``nn.Parameter``, started from the
    calibrated one; give them a much smaller learning rate than the weights (their
    gradients are summed over every element they scale). The float weights and biases of
    the quantized conv/linear layers become ``nn.Parameter(requires_grad=True)`` (int32
    biases are turned back into float ones); other parameters are left as they are. The
    module is put in ``train()`` mode and returned.

    Calling it again with the same ``learnable`` changes nothing, so an optimizer built on
    the parameters keeps working; with the other one it raises: ``freeze_qat`` first.

    The histogram observers (percentile, entropy, mse) recompute their clipping range on
    every step, about 0.1 s per node on a CPU; ``activation_observer="moving_average"``
    (torch's QAT default) or ``"minmax"`` is cheap.

    >>> res = fxopt.optimize(model, inputs, "default,quantize(scheme=int8)",
    ...                      calibration=batches)  # doctest: +SKIP
    >>> gm = prepare_qat(res.module)  # doctest: +SKIP
    >>> opt = torch.optim.SGD(gm.parameters(), lr=1e-3, momentum=0.9)  # doctest: +SKIP
    """
    fqs = _fake_quants(gm, "prepare_qat")
    if activation_observer is not None:
        if learnable:
            raise QuantizationError(
                "activation_observer chooses how observed scales follow the data; with "
                "learnable=True the scales are trained instead: pass one or the other")
        make_observer(activation_observer)  # an unknown kind raises, naming the choices
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
    restored = _float_biases(gm)
    weights = weight_fake_quants(gm)
    for path, fq in fqs.items():
        if fq.mode == "qat":
            continue
        if path in weights:
            fq.train_qat(learnable=learnable)
            if not learnable:
                fq.observer = CurrentWeightObserver(
                    fq.observer_kind, bits=fq.bits, signed=fq.signed, symmetric=fq.symmetric,
                    ch_axis=fq.axis)
            continue
        if activation_observer is not None:
            fq.observer_kind = activation_observer
        fq.train_qat(learnable=learnable)
        if not learnable:
            _start_from_calibration(fq)
    for target in _trainable_targets(gm, weights):
        _make_parameter(gm, target).requires_grad_(True)
    info = gm.meta.setdefault("fxopt", {}).setdefault("quantized", {"scheme": "int8"})
    previous = info.get("qat") or {}
    info["qat"] = {"learnable": learnable,
                   "int32_biases": previous.get("int32_biases", 0) + restored}
    return gm.train()


def freeze_qat(gm: fx.GraphModule) -> fx.GraphModule:
    """Fix the scales after QAT and return ``gm`` (in place) as a PTQ-style inference graph.

    Weight nodes with observed scales re-derive them from the trained weight (a fresh
    observer of the calibration kind fed the final weight), so the exported scales always
    match the exported weights. Activation nodes keep the last observed scales (or the
    calibrated ones if no batch went through since ``prepare_qat``). Learned scales
    (``learnable=True``) are kept as trained, for weights too: the weights were trained
    against them. Every FakeQuantize ends in ``"quantize"`` mode, float biases go back to
    int32 where PTQ had them (with the new scales), every parameter to
    ``requires_grad=False`` and the module to ``eval()``. Then ``fxopt.lower(gm, "onnx" |
    "eager", ...)`` works as after PTQ. A graph with nothing in QAT mode is left as is.

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
            elif not fq.learnable and fq.observer is not None and not observed(fq.observer):
                fq.observer = None  # nothing seen since prepare_qat: keep the calibrated scale
            fq.freeze(where=path)
    targets = _trainable_targets(gm, weights)
    for param in gm.parameters():
        param.requires_grad_(False)
    info = (gm.meta.get("fxopt") or {}).get("quantized") or {}
    qat = info.get("qat") or {}
    if qat.get("int32_biases"):  # back to the PTQ format, with the trained scales
        static.quantize_biases(gm)
        qat["int32_biases"] = 0
        read = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
        for target in targets:  # the float biases prepare_qat made, now int32 again
            if "." not in target and target not in read:
                _delete_attr(gm, target)
    if info.get("target") == "ort":
        static.share_pooling_qparams(gm)
    return gm.eval()


# --------------------------------------------------------------------------- helpers


def _start_from_calibration(fq: FakeQuantize) -> None:
    """Seed a restarted min/max activation observer with the calibrated range, so QAT's
    first step quantizes exactly as PTQ did and the range then follows the training data
    from there. A fresh observer would take the first training batch's range alone: on
    ResNet-50 that clipped what 16 calibration images had covered, and a QAT step at lr
    1e-12 already lost accuracy (zoo MLP cosine 0.99985 -> 0.99906). Histogram observers
    (percentile, entropy, mse) recompute their range from each batch and are left as is."""
    obs = fq.observer
    if fq.axis is not None or not isinstance(getattr(obs, "min_val", None), torch.Tensor) \
            or not hasattr(obs, "max_val") or type(obs).__name__.endswith(
                ("PercentileObserver", "EntropyObserver", "MSEObserver")):
        return
    scale = fq.scale.detach().float().reshape(())
    zp = fq.zero_point.detach().float().reshape(())
    obs.min_val = ((fq.qmin - zp) * scale).reshape(obs.min_val.shape or ()).clone()
    obs.max_val = ((fq.qmax - zp) * scale).reshape(obs.max_val.shape or ()).clone()


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


def _float_biases(gm: fx.GraphModule) -> int:
    """Turn int32 biases (``dequantize_int32(q, scale)``, ONNX Runtime's QDQ format, whose
    scale is input scale x weight scale) back into float parameters: QAT trains them and
    moves those scales, so ``freeze_qat`` quantizes them again. Returns how many."""
    graph, done = gm.graph, 0
    for node in list(graph.nodes):
        if node.op != "call_function" or str(node.target) != "fxopt.dequantize_int32.default":
            continue
        sources = [a for a in node.args if isinstance(a, fx.Node)]
        if len(sources) != 2 or any(a.op != "get_attr" for a in sources):
            continue
        q, s = (operator.attrgetter(a.target)(gm) for a in sources)
        value = (q.float() * s.float()).detach()
        name = fresh_attr(gm, str(sources[0].target).removesuffix("_int32").replace(".", "_"))
        gm.register_parameter(name, nn.Parameter(value, requires_grad=False))
        with graph.inserting_before(node):
            bias = graph.get_attr(name)
        bias.meta.update({k: v for k, v in node.meta.items() if k in ("shape", "dtype")})
        node.replace_all_uses_with(bias)
        graph.erase_node(node)
        for src in sources:
            if not src.users:
                graph.erase_node(src)
                if not any(n.op == "get_attr" and n.target == src.target for n in graph.nodes):
                    _delete_attr(gm, str(src.target))
        done += 1
    if done:
        graph.lint()
        gm.recompile()
    return done


def _delete_attr(gm: nn.Module, target: str) -> None:
    *parents, leaf = target.split(".")
    owner = gm.get_submodule(".".join(parents)) if parents else gm
    if hasattr(owner, leaf):
        delattr(owner, leaf)


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
