"""Losses for recovery training: the task loss, logit distillation and feature distillation.

* task loss: cross-entropy of the (first) output against the batch's labels, or a user
  ``loss_fn(output, label)``;
* logit distillation: ``KL(softmax(t / T) || softmax(s / T)) * T**2`` over the last dim
  (Hinton et al.; the ``T**2`` keeps its gradients on the task loss's scale), mixed as
  ``alpha * distill + (1 - alpha) * task`` when there are labels; for outputs that are
  not logits (an encoder's token or sentence embeddings) ``output_loss="cosine"``
  (``1 - cos`` per row of the last dim) or ``"mse"`` replaces the KL term;
* feature distillation: mean squared error between named intermediate tensors of the
  student and the teacher. Where pruning narrowed a student feature, the teacher feature
  is sliced to the channels the pruning plan kept; without a plan that says which, a
  learned linear projection maps the student feature to the teacher's width (FitNets).

Example::

    loss = DistillLoss(T=4.0, alpha=0.7)
    total, parts = loss(student_out, teacher_out, labels)
    parts   # {"task": ..., "distill": ..., "loss": ...}
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.utils._pytree import tree_leaves

from fxopt.errors import TrainingError


def output_leaves(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a (nested) model output, in order."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def task_loss(output: Any, label: torch.Tensor, loss_fn: Callable | None = None) -> torch.Tensor:
    """``loss_fn(output, label)``, or cross-entropy of the first output tensor (logits over
    the last dim) against integer ``label``s.

    >>> task_loss(torch.tensor([[2.0, 0.0]]), torch.tensor([0])).item()  # doctest: +ELLIPSIS
    0.126...
    """
    if loss_fn is not None:
        return loss_fn(output, label)
    leaves = output_leaves(output)
    if not leaves:
        raise TrainingError("the task loss needs a floating-point output (logits); pass "
                         "loss_fn=... for this model")
    logits = leaves[0]
    if label.is_floating_point():
        raise TrainingError(f"labels are {label.dtype}: cross-entropy needs class indices "
                         "(integer labels); pass loss_fn=... for other targets")
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), label.reshape(-1))


def kl_distill(student: torch.Tensor, teacher: torch.Tensor, T: float = 4.0) -> torch.Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T)) * T**2``, averaged over every
    row of the last dim (a ``(N, S, C)`` output has ``N * S`` rows).

    >>> kl_distill(torch.zeros(2, 3), torch.zeros(2, 3)).item()
    0.0
    """
    c = student.shape[-1]
    s = F.log_softmax(student.reshape(-1, c).float() / T, dim=-1)
    t = F.log_softmax(teacher.reshape(-1, c).float() / T, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * (T * T)


def cosine_distill(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """``1 - cos(student, teacher)`` over the last dim, averaged over every row: the
    distillation loss for embedding outputs, whose direction is what a user compares.

    >>> cosine_distill(torch.ones(2, 3), 2 * torch.ones(2, 3)).item()
    0.0
    """
    c = student.shape[-1]
    s, t = student.reshape(-1, c).float(), teacher.reshape(-1, c).float()
    return (1 - F.cosine_similarity(s, t, dim=-1, eps=1e-12)).mean()


OUTPUT_LOSSES = ("kl", "cosine", "mse")


def output_distill(student: torch.Tensor, teacher: torch.Tensor, kind: str = "kl",
                   T: float = 4.0) -> torch.Tensor:
    """The distillation term of one output pair: ``kl`` (logits, at temperature ``T``),
    ``cosine`` or ``mse`` (embeddings and other non-logit outputs).

    >>> output_distill(torch.zeros(1, 2), torch.ones(1, 2), "mse").item()
    1.0
    """
    if kind == "kl":
        return kl_distill(student, teacher, T)
    if kind == "cosine":
        return cosine_distill(student, teacher)
    return F.mse_loss(student.float(), teacher.float())


def check_teacher_outputs(student_out: Any, teacher_out: Any) -> None:
    """``TrainingError`` unless the teacher's outputs have the student's structure and shapes."""
    s, t = output_leaves(student_out), output_leaves(teacher_out)
    if len(s) != len(t):
        raise TrainingError(f"the teacher returns {len(t)} tensor output(s), the student "
                         f"{len(s)}: distillation pairs them in order; give the teacher the "
                         "student's original model (or a wrapper with the same outputs)")
    for i, (a, b) in enumerate(zip(s, t, strict=True)):
        if a.shape != b.shape:
            raise TrainingError(f"output {i}: the student returns shape {tuple(a.shape)}, the "
                             f"teacher {tuple(b.shape)}; logit distillation needs the same "
                             "shapes (the same task head)")


# --------------------------------------------------------------------------- features
def resolve_node(gm: fx.GraphModule, name: str) -> fx.Node:
    """The node a feature name means: a node name, else the last node of that module path
    (``"layer1"``, ``"features.3"``), else the call_module node of that target."""
    nodes = list(gm.graph.nodes)
    for n in nodes:
        if n.name == name and n.op not in ("placeholder", "output"):
            return n
    owned = [n for n in nodes if n.op.startswith("call") and (
        n.meta.get("fxopt_module_path") == name
        or str(n.meta.get("fxopt_module_path", "")).startswith(name + ".")
        or (n.op == "call_module" and n.target == name))]
    if owned:
        return owned[-1]
    known = sorted({str(n.meta.get("fxopt_module_path") or n.name) for n in nodes
                    if n.op.startswith("call")})
    raise TrainingError(f"feature {name!r} names no node or module of the graph; known: "
                     f"{', '.join(known[:20])}{' ...' if len(known) > 20 else ''}")


def tap(gm: fx.GraphModule, names: Sequence[str]) -> fx.GraphModule:
    """A GraphModule sharing ``gm``'s submodules and tensors whose forward returns
    ``(outputs, (feature, ...))``, the features being the values of the named nodes.

    Example::

        tapped = tap(gm, ["layer1", "layer2"])
        out, (f1, f2) = tapped(x)
    """
    nodes = [resolve_node(gm, n) for n in names]
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    out = graph.graph_copy(gm.graph, env)
    graph.output((out, tuple(env[n] for n in nodes)))
    return fx.GraphModule(gm, graph)


class FeatureAdapter(nn.Module):
    """Makes one student feature comparable with its teacher feature: ``same`` (widths
    equal), ``slice`` (the teacher keeps the channels the pruning plan kept on ``dim``) or
    ``project`` (a learned linear map from the student's width to the teacher's)."""

    def __init__(self, mode: str, dim: int = 1, kept: Sequence[int] | None = None,
                 widths: tuple[int, int] | None = None):
        super().__init__()
        self.mode, self.dim = mode, dim
        if mode == "slice":
            self.register_buffer("kept", torch.as_tensor(list(kept), dtype=torch.long))
        if mode == "project":
            self.proj = nn.Linear(widths[0], widths[1], bias=False)

    def forward(self, student: torch.Tensor, teacher: torch.Tensor):
        if self.mode == "slice":
            teacher = teacher.index_select(self.dim, self.kept.to(teacher.device))
        elif self.mode == "project":
            moved = student.movedim(self.dim, -1)
            student = self.proj(moved.to(self.proj.weight.dtype)).movedim(-1, self.dim)
        return student, teacher

    def extra_repr(self) -> str:
        return f"mode={self.mode}, dim={self.dim}"


def _channel_dim(name: str, s: torch.Tensor, t: torch.Tensor) -> int | None:
    if s.dim() != t.dim():
        raise TrainingError(f"feature {name!r}: the student's has shape {tuple(s.shape)}, the "
                         f"teacher's {tuple(t.shape)}; name nodes of the same rank")
    differ = [d for d in range(s.dim()) if s.shape[d] != t.shape[d]]
    if len(differ) > 1:
        raise TrainingError(f"feature {name!r}: shapes {tuple(s.shape)} (student) and "
                         f"{tuple(t.shape)} (teacher) differ in more than one dim; only a "
                         "channel width may differ (pruning)")
    return differ[0] if differ else None


def _plan_producers(plan: Sequence[Mapping]) -> dict[str, Mapping]:
    out = {}
    for entry in plan:
        for m in entry.get("members", []):
            if m.get("role") == "producer":
                for key in {m.get("param"), m.get("attr")} - {None}:
                    out.setdefault(str(key), (entry, m))
    return out


def _weights_of(node: fx.Node) -> list[str]:
    keys = []
    if node.op == "call_module":
        keys += [f"{node.target}.weight", f"{node.target}.bias"]
    path = node.meta.get("fxopt_module_path")
    if path:
        keys += [f"{path}.weight", f"{path}.bias"]
    keys += [str(a.target) for a in node.all_input_nodes if a.op == "get_attr"]
    return keys


def kept_channels(plan: Sequence[Mapping], node: fx.Node, widths: tuple[int, int]
                  ) -> list[int] | None:
    """The teacher channels a pruned student feature kept, from the pruning ``plan``
    (``stats["plan"]`` of the prune pass): the group whose producer is the nearest layer
    above ``node`` with the right widths; ``None`` where the plan does not say."""
    c_student, c_teacher = widths
    producers = _plan_producers(plan)

    def fits(entry) -> bool:
        return (entry.get("units") == c_teacher
                and entry.get("units", 0) - entry.get("removed_units", -1) == c_student)

    seen, frontier = set(), [node]
    while frontier:  # breadth-first up the graph, stopping at the first producer layer
        nxt = []
        for n in frontier:
            if n in seen:
                continue
            seen.add(n)
            hits = [producers[k] for k in _weights_of(n) if k in producers]
            if hits:
                entry, member = hits[0]
                if fits(entry):
                    removed = set(member["indices"])
                    return [i for i in range(c_teacher) if i not in removed]
                continue  # a narrower layer of another group: not this feature's
            nxt.extend(n.all_input_nodes)
        frontier = nxt
    fitting = [(e, m) for e, m in {id(e): (e, m) for e, m in producers.values()}.values()
               if fits(e)]
    if len(fitting) == 1:
        removed = set(fitting[0][1]["indices"])
        return [i for i in range(c_teacher) if i not in removed]
    return None


def make_adapter(name: str, node: fx.Node, student: torch.Tensor, teacher: torch.Tensor,
                 plan: Sequence[Mapping] | None = None) -> FeatureAdapter:
    """The adapter for feature ``name`` from one pair of sample values: ``same`` when the
    shapes agree, ``slice`` when ``plan`` says which channels were kept, else ``project``."""
    dim = _channel_dim(name, student, teacher)
    if dim is None:
        return FeatureAdapter("same")
    widths = (int(student.shape[dim]), int(teacher.shape[dim]))
    kept = kept_channels(plan, node, widths) if plan else None
    if kept is not None:
        return FeatureAdapter("slice", dim, kept=kept)
    return FeatureAdapter("project", dim, widths=widths)


def feature_pairs(features: Sequence[str] | Mapping[str, str] | None) -> list[tuple[str, str]]:
    """``(student name, teacher name)`` pairs: a list names the same node in both."""
    if features is None:
        return []
    if isinstance(features, str):
        features = [features]
    if isinstance(features, Mapping):
        return [(str(k), str(v)) for k, v in features.items()]
    return [(str(f), str(f)) for f in features]


class DistillLoss(nn.Module):
    """Task loss, logit distillation and feature distillation in one module (it holds the
    feature adapters, whose projections train with the student).

    ``forward(student_out, teacher_out, label, student_feats=(), teacher_feats=())``
    returns ``(loss, parts)``, ``parts`` holding the detached terms for the history.

    >>> loss = DistillLoss(T=2.0, alpha=0.5)
    >>> total, parts = loss(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([0]))
    >>> round(parts["task"], 4), parts["distill"]
    (1.0986, 0.0)
    """

    def __init__(self, *, T: float = 4.0, alpha: float = 0.5, loss_fn: Callable | None = None,
                 feature_weight: float = 1.0, adapters: Sequence[FeatureAdapter] = (),
                 output_loss: str = "kl"):
        super().__init__()
        if output_loss not in OUTPUT_LOSSES:
            raise TrainingError(f"output_loss={output_loss!r}: use 'kl' (logits), 'cosine' or "
                                "'mse' (embeddings and other non-logit outputs)")
        self.output_loss = output_loss
        if not isinstance(T, (int, float)) or T <= 0:
            raise TrainingError(f"T (the distillation temperature) must be > 0, not {T!r}")
        if not isinstance(alpha, (int, float)) or not 0 <= alpha <= 1:
            raise TrainingError(f"alpha (the distillation weight) must be in [0, 1], not {alpha!r}")
        self.T, self.alpha, self.loss_fn = float(T), float(alpha), loss_fn
        self.feature_weight = float(feature_weight)
        self.adapters = nn.ModuleList(adapters)

    def forward(self, student_out: Any, teacher_out: Any = None, label: Any = None,
                student_feats: Sequence[torch.Tensor] = (),
                teacher_feats: Sequence[torch.Tensor] = ()):
        parts: dict[str, torch.Tensor] = {}
        if label is not None:
            parts["task"] = task_loss(student_out, label, self.loss_fn)
        if teacher_out is not None:
            pairs = list(zip(output_leaves(student_out), output_leaves(teacher_out),
                             strict=True))
            parts["distill"] = sum(output_distill(s, t.detach(), self.output_loss, self.T)
                                   for s, t in pairs) \
                / max(len(pairs), 1)
        if not parts:
            raise TrainingError("nothing to learn from: the batches carry no labels and there "
                             "is no teacher; give (inputs, label) items or teacher=...")
        if "task" in parts and "distill" in parts:
            total = self.alpha * parts["distill"] + (1 - self.alpha) * parts["task"]
        else:
            total = parts.get("task", parts.get("distill"))
        if student_feats:
            terms = []
            for adapter, s, t in zip(self.adapters, student_feats, teacher_feats, strict=True):
                s, t = adapter(s, t.detach())
                terms.append(F.mse_loss(s.float(), t.float()))
            parts["feature"] = sum(terms) / len(terms)
            total = total + self.feature_weight * parts["feature"]
        parts["loss"] = total
        return total, {k: float(v.detach()) for k, v in parts.items()}


__all__ = [
    "OUTPUT_LOSSES",
    "DistillLoss",
    "FeatureAdapter",
    "check_teacher_outputs",
    "cosine_distill",
    "feature_pairs",
    "kept_channels",
    "kl_distill",
    "make_adapter",
    "output_distill",
    "output_leaves",
    "resolve_node",
    "tap",
    "task_loss",
]
