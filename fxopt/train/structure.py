"""Keep the structure the passes made while a graph is fine-tuned.

``StructureKeeper`` reads an fxopt graph before training and holds on to what training
must not undo, then hands back an exportable graph::

    keeper = StructureKeeper.from_graph(gm)        # masks, fake-quant, batch norms, shapes
    model = keeper.prepare(gm)                     # trainable (in place: gm itself)
    opt = torch.optim.AdamW(p for p in model.parameters() if p.requires_grad)
    for x, y in batches:
        opt.zero_grad(); loss_fn(model(x), y).backward(); opt.step()
        keeper.after_step(model)                   # masked weights back to exactly 0
    gm = keeper.finish(model)                      # frozen, checked, ready for fxopt.lower
    keeper.describe()                              # JSON for the history / report

What it keeps, and how:

* **Sparsity masks** (``sparsify``, unstructured or 2:4): the keep-masks the pass left on its
  nodes (``node.meta["fxopt_sparsity_mask"]``; when a graph lost them, its zeros) are
  applied to the stored weight, even behind a fake-quant node. A gradient hook zeroes the
  masked gradient (so momentum and Adam moments stay zero there, and DDP all-reduces zeros)
  and ``after_step`` re-zeroes the weight (weight decay, or an optimizer that moves zeros).
  ``finish`` checks every masked weight is exactly zero and that 2:4 layers still hold 2:4.
* **Fake quantization** (``quantize(scheme=int8)``): ``qat="auto"`` trains through the
  fake-quant nodes with ``fxopt.quant.qat.prepare_qat`` (observed scales; ``"learnable"``
  for LSQ scales) and ``finish`` freezes them back with ``freeze_qat``: the PTQ inference
  format (int32 biases, QDQ), which lowers to ONNX as before. Observed activation scales
  follow the training batches with a moving average (``activation_observer``; the
  calibration's histogram observers cost ~0.1 s per node per step). Graphs quantized with
  int8 weights stored as integers (dynamic, weight-only) cannot be trained: a
  ``TrainingError`` says to fine-tune before quantizing.
* **Batch norm**: a folded BN is gone from the graph and nothing brings it back (``finish``
  checks no BN appeared). A graph that still holds BN trains it as torch does: batch
  statistics and running-statistic updates in ``train()``, running statistics in
  ``eval()``. For ``torch.export`` graphs, whose ``aten.batch_norm`` carries
  ``training=False`` as a constant, the node calls a small module during training that
  follows ``train()``/``eval()``; ``finish`` restores the original node. ``bn="frozen"``
  keeps running statistics fixed (small batches) and trains only the affine parameters.
* **Dropout is off** while training (``dropout=False``, the default): recovery is short
  and distilled, dropout breaks the equality of 1- and N-process runs (each rank draws
  its own masks) and makes the student chase a noisy copy of the teacher. Export graphs
  hold dropout with ``train=False`` baked in, so this is also what they do.
* **Pruned shapes**: every op's parameter shapes are recorded and checked again in
  ``finish`` (``PassError``-style ``TrainingError`` naming the layer if one changed).

Which tensors train: every floating-point ``nn.Parameter`` the graph reads (an orphan a
pass left behind does not: DDP would wait for its gradient forever), and the weights
and biases of known ops that passes stored as buffers (they become parameters);
batch-norm running statistics, fake-quant scales (unless learnable), integer tensors and
other constants do not.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx
from torch import nn

from fxopt.errors import PassError, TrainingError
from fxopt.graph_utils import layer_name
from fxopt.op_props import Prop
from fxopt.ops import fetch_attr, has_prop, op_of
from fxopt.passes.sparsify import MASK_META, META_KEY, effective_weight, validate_pattern
from fxopt.quant.fake_quant import FakeQuantize
from fxopt.train.distributed import unwrap

__all__ = ["StructureKeeper"]

QAT_CHOICES = ("auto", "observed", "learnable", None)
BN_CHOICES = ("train", "frozen")
_TRAINED = ("weight", "bias", "in_proj_weight", "in_proj_bias")  # op params that train


class _BatchNormStep(nn.Module):
    """Stands in for an ``aten.batch_norm(..., training=False, ...)`` node while training,
    so the node follows the module's ``train()`` / ``eval()``."""

    def __init__(self, momentum: float, eps: float) -> None:
        super().__init__()
        self.momentum, self.eps = momentum, eps

    def forward(self, x, weight, bias, running_mean, running_var):
        return torch.batch_norm(x, weight, bias, running_mean, running_var, self.training,
                                self.momentum, self.eps, torch.backends.cudnn.enabled)


def _force_eval(module: nn.Module, args: Any) -> None:  # a forward pre-hook
    module.training = False


def _stored(gm: fx.GraphModule, node: fx.Node, name: str) -> tuple[str, bool] | None:
    """The attribute path of the tensor behind parameter ``name`` of ``node`` (through
    fake-quant nodes), and whether the op reads it transposed; None when computed."""
    view = op_of(node)
    if view.module is not None:
        return (f"{node.target}.{name}", False) if isinstance(
            getattr(view.module, name, None), torch.Tensor) else None
    src = view.param_node(name)
    while (src is not None and src.op == "call_module"
           and isinstance(gm.get_submodule(str(src.target)), FakeQuantize) and src.args
           and isinstance(src.args[0], fx.Node)):
        src = src.args[0]
    if src is None or src.op != "get_attr":
        return None
    return str(src.target), name in (view.entry.transposed if view.entry else ())


def _param_shapes(gm: fx.GraphModule, node: fx.Node) -> dict[str, tuple[int, ...]]:
    """Shapes of the stored tensors behind ``node``'s parameters (through fake-quant)."""
    view = op_of(node)
    out = {}
    for name in (view.entry.params if view.known else ()):
        where = _stored(gm, node, name)
        value = fetch_attr(gm, where[0]) if where else None
        if isinstance(value, torch.Tensor):
            out[name] = tuple(value.shape)
    return out


def _used_parameters(gm: fx.GraphModule) -> set[int]:
    """Identities of the parameters the graph reads (a pass may leave an orphan behind,
    e.g. a linear module's float bias after ``quantize`` made an int32 one)."""
    used: set[int] = set()
    for node in gm.graph.nodes:
        if node.op == "get_attr":
            value = fetch_attr(gm, str(node.target))
            if isinstance(value, nn.Parameter):
                used.add(id(value))
        elif node.op == "call_module":
            used.update(id(p) for p in gm.get_submodule(str(node.target)).parameters())
    return used


def _owner(gm: nn.Module, target: str) -> tuple[nn.Module, str]:
    *parents, leaf = target.split(".")
    return (gm.get_submodule(".".join(parents)) if parents else gm), leaf


def _as_parameter(gm: nn.Module, target: str) -> nn.Parameter:
    owner, leaf = _owner(gm, target)
    value = getattr(owner, leaf)
    if isinstance(value, nn.Parameter):
        return value
    param = nn.Parameter(value.detach().clone(), requires_grad=False)
    owner._buffers.pop(leaf, None)
    if hasattr(owner, leaf):
        delattr(owner, leaf)
    owner.register_parameter(leaf, param)
    return param


class StructureKeeper:
    """What training must keep in one graph; see the module docstring.

    >>> keeper = StructureKeeper.from_graph(res.module)  # doctest: +SKIP
    >>> keeper.describe()["masks"]["pattern"]  # doctest: +SKIP
    '2:4'
    """

    def __init__(self) -> None:
        self.masks: dict[str, torch.Tensor] = {}  # stored tensor path -> keep mask (stored layout)
        self.masked_nodes: dict[str, str] = {}  # node name -> stored tensor path
        self.pattern: str | None = None
        self.mask_source = "none"
        self.qat: str | None = None  # "observed" | "learnable" | None
        self.fake_quants = 0
        self.activation_observer: str | None = "moving_average"
        self.bn_mode = "train"
        self.bn_count = 0
        self.bn_folded = False
        self.dropout = False
        self.shapes: dict[str, dict[str, tuple[int, ...]]] = {}
        self.trainable = 0
        self._hooks: list[Any] = []
        self._bn_nodes: dict[str, tuple] = {}  # node name -> (target, args, kwargs)
        self._prepared = False

    # ------------------------------------------------------------------ reading
    @classmethod
    def from_graph(cls, gm: fx.GraphModule, *, qat: str | None = "auto", bn: str = "train",
                   dropout: bool = False,
                   activation_observer: str | None = "moving_average") -> StructureKeeper:
        """Read what ``gm`` holds: sparsity masks, fake-quant nodes, batch norms (present
        or folded) and every op's parameter shapes. ``qat``: ``"auto"`` (train a
        fake-quant graph with observed scales, or as it was prepared), ``"observed"``,
        ``"learnable"``, or ``None`` (the graph must have no fake-quant node).

        >>> keeper = StructureKeeper.from_graph(gm, qat="learnable")  # doctest: +SKIP
        """
        if not isinstance(gm, fx.GraphModule):
            raise TrainingError(f"StructureKeeper takes a torch.fx.GraphModule (an fxopt graph, "
                                f"e.g. fxopt.optimize(...).module), got {type(gm).__name__}")
        if qat not in QAT_CHOICES:
            raise TrainingError(f"qat={qat!r}: use one of {QAT_CHOICES}")
        if bn not in BN_CHOICES:
            raise TrainingError(f"bn={bn!r}: use 'train' (batch statistics) or 'frozen'")
        self = cls()
        self.bn_mode, self.dropout, self.activation_observer = bn, dropout, activation_observer
        info = gm.meta.get("fxopt") or {}
        self._read_masks(gm, info)
        self._read_quant(gm, info, qat)
        passes = [str(p) for p in (info.get("pipeline") or [])]
        self.bn_folded = any("fold_bn" in p for p in passes)
        for node in gm.graph.nodes:
            if not node.op.startswith("call"):
                continue
            view = op_of(node)
            if view.kind == "batch_norm":
                self.bn_count += 1
            shapes = _param_shapes(gm, node)
            if shapes:
                self.shapes[node.name] = shapes
        return self

    def _read_masks(self, gm: fx.GraphModule, info: dict) -> None:
        self.pattern = (info.get(META_KEY) or {}).get("pattern")
        nodes = [n for n in gm.graph.nodes if MASK_META in n.meta]
        self.mask_source = "sparsify" if nodes else "none"
        if not nodes and self.pattern:  # the masks were lost (a reloaded graph): keep its zeros
            nodes = [n for n in gm.graph.nodes if n.op.startswith("call")
                     and has_prop(n, Prop.SPARSIFY)]
            self.mask_source = "zeros"
        for node in nodes:
            w = effective_weight(node)
            keep = node.meta.get(MASK_META)
            if keep is None:
                if not isinstance(w, torch.Tensor) or not bool((w == 0).any()):
                    continue
                keep = w != 0
            where = _stored(gm, node, "weight")
            if where is None:
                raise TrainingError(
                    f"layer {layer_name(node)} ({node.name}) is sparsified but its weight is "
                    "computed in the graph, so its zeros cannot be kept while training; "
                    "fine-tune before the pass that rewrote it (e.g. half), then apply it")
            target, transposed = where
            stored = fetch_attr(gm, target)
            mask = keep.t() if transposed else keep
            if tuple(mask.shape) != tuple(stored.shape):
                raise TrainingError(
                    f"the sparsity mask of {node.name} is {tuple(keep.shape)} but its weight "
                    f"{target} is {tuple(stored.shape)}; re-run sparsify after the pass that "
                    "reshaped it")
            mask = mask.to(torch.bool).cpu()
            if target in self.masks:
                mask = mask & self.masks[target]  # a weight two layers share
            self.masks[target] = mask
            self.masked_nodes[node.name] = target

    def _read_quant(self, gm: fx.GraphModule, info: dict, qat: str | None) -> None:
        fqs = [m for m in gm.modules() if isinstance(m, FakeQuantize)]
        self.fake_quants = len(fqs)
        scheme = (info.get("quantized") or {}).get("scheme")
        if not fqs:
            if scheme is not None:
                raise TrainingError(
                    f"the graph was quantized with scheme={scheme}, which stores integer "
                    "weights that cannot be trained; fine-tune the float graph first, then "
                    f"quantize (e.g. pipeline '...,finetune(...),quantize(scheme={scheme})'), or "
                    "use scheme=int8 with fake quantization")
            if qat in ("observed", "learnable"):
                raise TrainingError(
                    f"qat={qat!r} but the graph has no fake-quant node; quantize it first "
                    "('default,quantize(scheme=int8)' with calibration data) or use qat='auto'")
            return
        if qat is None:
            raise TrainingError(
                f"the graph holds {len(fqs)} fake-quant nodes and frozen fake quantization has "
                "no gradient; train through them with qat='auto' (observed scales) or "
                "qat='learnable'")
        training = [m for m in fqs if m.mode == "qat"]
        if qat == "auto":
            self.qat = ("learnable" if any(m.learnable for m in training) else "observed")
        else:
            self.qat = qat

    # ------------------------------------------------------------------ training
    def prepare(self, gm: fx.GraphModule) -> nn.Module:
        """Make ``gm`` trainable in place and return it: fake-quant in QAT mode, the
        weights and biases as parameters with ``requires_grad=True``, masks applied and
        their gradients masked, ``train()`` with batch norm and dropout as decided.

        >>> model = keeper.prepare(gm)  # doctest: +SKIP
        """
        if not isinstance(gm, fx.GraphModule):
            raise TrainingError(f"prepare takes the GraphModule given to from_graph, got "
                                f"{type(gm).__name__}")
        if self._prepared:
            raise TrainingError("this StructureKeeper already prepared a graph; make a new "
                                "one with StructureKeeper.from_graph for another run")
        if self.qat is not None:
            from fxopt.quant.qat import prepare_qat

            learnable = self.qat == "learnable"
            prepared = [m for m in gm.modules() if isinstance(m, FakeQuantize) and m.mode == "qat"]
            observer = None if learnable or prepared else self.activation_observer
            prepare_qat(gm, learnable=learnable, activation_observer=observer)
        targets: dict[str, None] = {}
        for node in gm.graph.nodes:
            if node.op.startswith("call") and op_of(node).known:
                for name in _TRAINED:
                    where = _stored(gm, node, name) if name in op_of(node).params else None
                    if where is not None:
                        targets[where[0]] = None
        fq_params = {id(p) for m in gm.modules() if isinstance(m, FakeQuantize)
                     for p in m.parameters()}
        for target in targets:
            value = fetch_attr(gm, target)
            if isinstance(value, torch.Tensor) and value.is_floating_point():
                _as_parameter(gm, target)
        self._swap_batch_norms(gm)
        used = _used_parameters(gm)  # DDP needs a gradient for every trainable parameter
        count = 0
        for p in gm.parameters():
            train = p.is_floating_point() and id(p) in used and (
                id(p) not in fq_params or self.qat == "learnable")
            p.requires_grad_(train)
            count += p.numel() if train else 0
        self.trainable = count
        with torch.no_grad():
            for target, mask in self.masks.items():
                param = _as_parameter(gm, target)
                param.masked_fill_(~mask.to(param.device), 0)
                if param.requires_grad:
                    self._hooks.append(param.register_hook(_mask_grad(mask)))
        gm.train()
        for m in gm.modules():
            is_bn = isinstance(m, nn.modules.batchnorm._BatchNorm)
            is_drop = isinstance(m, nn.modules.dropout._DropoutNd)
            if (is_bn and self.bn_mode == "frozen") or (is_drop and not self.dropout):
                self._hooks.append(m.register_forward_pre_hook(_force_eval))
        gm.recompile()
        self._prepared = True
        return gm

    def _swap_batch_norms(self, gm: fx.GraphModule) -> None:
        """aten/function batch norms with a constant ``training=False`` -> a module call."""
        if self.bn_mode != "train":
            return
        for node in list(gm.graph.nodes):
            if node.op != "call_function":
                continue
            view = op_of(node)
            if view.kind != "batch_norm" or view.arg("training") is not False:
                continue
            names = ("input", "weight", "bias", "running_mean", "running_var")
            args = [view.arg(n) for n in names]
            if not all(isinstance(a, fx.Node) for a in (args[0], args[3], args[4])):
                continue  # no running statistics to update
            name = f"fxopt_bn_train_{len(self._bn_nodes)}"
            gm.add_submodule(name, _BatchNormStep(float(view.arg("momentum") or 0.1),
                                                  float(view.arg("eps"))))
            self._bn_nodes[node.name] = (name, node.target, node.args, node.kwargs)
            node.op, node.target, node.args, node.kwargs = "call_module", name, tuple(args), {}

    def after_step(self, module: nn.Module) -> None:
        """Zero the masked weights again; call after every ``optimizer.step()``.

        >>> opt.step(); keeper.after_step(model)  # doctest: +SKIP
        """
        gm = unwrap(module)
        with torch.no_grad():
            for target, mask in self.masks.items():
                param = fetch_attr(gm, target)
                param.masked_fill_(~mask.to(param.device), 0)

    def finish(self, module: nn.Module) -> fx.GraphModule:
        """The trained graph in its exportable form, checked: hooks removed, batch-norm
        nodes restored, fake-quant frozen (``freeze_qat``), every parameter frozen,
        ``eval()``; raises ``TrainingError`` if a masked weight is not exactly zero, a 2:4
        layer broke its pattern, a parameter changed shape or a batch norm appeared.

        >>> gm = keeper.finish(model)  # doctest: +SKIP
        >>> art = fxopt.lower(gm, "onnx", inputs, path="m.onnx")  # doctest: +SKIP
        """
        gm = unwrap(module)
        if not isinstance(gm, fx.GraphModule):
            raise TrainingError(f"finish takes the module prepare returned, got "
                                f"{type(gm).__name__}")
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, (sub, target, args, kwargs) in self._bn_nodes.items():
            node = nodes[name]
            node.op, node.target, node.args, node.kwargs = "call_function", target, args, kwargs
            gm.delete_submodule(sub)
        self._bn_nodes = {}  # no silent re-zeroing here: _check reports a leaked mask
        if self.qat is not None:
            from fxopt.quant.qat import freeze_qat

            freeze_qat(gm)
        for p in gm.parameters():
            p.requires_grad_(False)
        gm.eval()
        gm.graph.lint()
        gm.recompile()
        self._check(gm)
        gm.meta.setdefault("fxopt", {})["structure"] = self.describe()
        return gm

    # ------------------------------------------------------------------ checks
    def _check(self, gm: fx.GraphModule) -> None:
        nodes = {n.name: n for n in gm.graph.nodes}
        for name, target in self.masked_nodes.items():
            node = nodes.get(name)
            w = effective_weight(node) if node is not None else None
            if not isinstance(w, torch.Tensor):
                raise TrainingError(f"after training, layer {name} has no constant weight to "
                                    "check its sparsity mask against; this is a bug in fxopt")
            keep = self.masks[target]
            keep = keep.t() if _stored(gm, node, "weight")[1] else keep
            leaked = int((w.detach().cpu()[~keep] != 0).sum())
            if leaked:
                raise TrainingError(
                    f"layer {layer_name(node)} ({name}): {leaked} weights the sparsity mask "
                    "zeroed are nonzero after training; call keeper.after_step(model) after "
                    "every optimizer.step()")
        if self.pattern == "2:4" and self.masked_nodes:
            try:
                validate_pattern(gm, "2:4", layers=list(self.masked_nodes))
            except PassError as e:
                raise TrainingError(f"after training: {e}") from e
        bns = 0
        for node in gm.graph.nodes:
            if not node.op.startswith("call"):
                continue
            view = op_of(node)
            bns += view.kind == "batch_norm"
            want = self.shapes.get(node.name)
            for p, shape in (_param_shapes(gm, node).items() if want else ()):
                if p in want and shape != want[p]:
                    raise TrainingError(
                        f"layer {layer_name(node)} ({node.name}): {p} is {shape} after "
                        f"training but was {want[p]}; training must not change pruned "
                        "shapes (was the graph modified between prepare and finish?)")
        if bns > self.bn_count:
            raise TrainingError(f"the trained graph holds {bns} batch norms but the input "
                                f"held {self.bn_count}: a folded batch norm came back")

    def describe(self) -> dict[str, Any]:
        """What the keeper keeps, as JSON-able data (for the history and the report).

        >>> keeper.describe()["qat"]  # doctest: +SKIP
        {'mode': 'observed', 'fake_quants': 23, 'activation_observer': 'moving_average'}
        """
        zeros = {t: int((~m).sum()) for t, m in self.masks.items()}
        total = sum(m.numel() for m in self.masks.values())
        return {
            "masks": {"pattern": self.pattern, "source": self.mask_source,
                      "layers": dict(self.masked_nodes), "zeros": sum(zeros.values()),
                      "sparsity": round(sum(zeros.values()) / total, 4) if total else 0.0},
            "qat": {"mode": self.qat, "fake_quants": self.fake_quants,
                    "activation_observer": None if self.qat in (None, "learnable")
                    else self.activation_observer},
            "batch_norm": {"count": self.bn_count, "mode": self.bn_mode,
                           "folded": self.bn_folded},
            "dropout": self.dropout,
            "layers_checked": len(self.shapes),
            "trainable_params": self.trainable,
        }


def _mask_grad(mask: torch.Tensor):
    def hook(grad: torch.Tensor) -> torch.Tensor:
        return grad.masked_fill(~mask.to(grad.device), 0)

    return hook

