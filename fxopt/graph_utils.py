"""Graph helpers every part of fxopt shares: shape/dtype metadata, unused-attribute
removal, layer-name matching, fresh attribute names, copies and human-readable counts.

Metadata comes two ways. ``annotate`` runs the graph on real inputs (one interpreter run
that both records every node's shape, dtype and device and yields the outputs, so a
caller that needs the outputs too never runs the graph twice). ``refresh_metadata``
recomputes only the nodes a rewrite touched, with fake tensors built from the metadata of
their inputs, and falls back to ``annotate`` where that is not possible.

Example::

    outputs = annotate_run(gm, (x,))         # metadata on every node + the outputs
    gm.graph.find_nodes(op="call_module")[0].meta["shape"]
    refresh_metadata(gm, (x,))               # after a rewrite: only what changed
"""

from __future__ import annotations

import copy
import fnmatch
import warnings
from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.fx.node import map_aggregate, map_arg
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata, _extract_tensor_metadata

_SIG = "fxopt_sig"  # what a node's metadata was computed from (see _signature)
_VALUE = "fxopt_value"  # small non-tensor results (sizes, ints) that later nodes consume


# --------------------------------------------------------------------------- metadata
def retype_metadata_asserts(gm: fx.GraphModule, dtypes: Any = None) -> int:
    """Keep ``torch.export``'s ``aten._assert_tensor_metadata`` checks true after a pass
    changed what dtype a value has; returns how many were changed.

    Every pass that retypes values calls this one helper (so the checks are kept, never
    dropped by one pass and kept by another): each assertion's ``dtype`` becomes the dtype
    its input now has, read from ``dtypes`` (a ``{node: torch.dtype}`` mapping of the pass's
    decisions) or else from the input's ``meta["dtype"]``. Where that dtype is unknown the
    dtype check is removed rather than left asserting a stale one.

    Example::

        retype_metadata_asserts(gm, {x_node: torch.float16})   # after casting x to fp16
    """
    from fxopt.ops import kind_of  # ops imports this module

    dtypes = dtypes or {}
    changed = 0
    for node in gm.graph.nodes:
        if node.op != "call_function" or kind_of(node) != "assert_metadata" or not node.args:
            continue
        src = node.args[0]
        have = dtypes.get(src) if isinstance(src, fx.Node) else None
        if have is None and isinstance(src, fx.Node):
            have = src.meta.get("dtype")
        have = have if isinstance(have, torch.dtype) else None
        if len(node.args) > 3:  # (a, size, stride, dtype) given positionally
            if node.args[3] is not None and node.args[3] != have:
                node.args = (*node.args[:3], have, *node.args[4:])
                changed += 1
        elif node.kwargs.get("dtype") is not None and node.kwargs["dtype"] != have:
            node.kwargs = {**node.kwargs, "dtype": have}
            changed += 1
    return changed


def annotate(gm: fx.GraphModule, inputs: Sequence[Any]) -> fx.GraphModule:
    """Refresh shape/dtype/device/module-path metadata on every node by running ``inputs``.

    Example::

        fxopt.graph_utils.annotate(gm, example_inputs)
        next(iter(gm.graph.nodes)).meta["shape"]
    """
    annotate_run(gm, inputs)
    return gm


def annotate_run(gm: fx.GraphModule, inputs: Sequence[Any]) -> Any:
    """``annotate`` that also returns the graph's outputs on ``inputs`` (one run for both).

    Example::

        outputs = annotate_run(gm, (x,))   # == gm(x), and every node is annotated
    """
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for node in gm.graph.nodes:
            node.meta.pop("tensor_meta", None)
            node.meta.pop(_VALUE, None)
        outputs = _Annotator(gm).propagate(*inputs)
    for node in gm.graph.nodes:
        _finish_node(gm, node)
    return outputs


def refresh_metadata(gm: fx.GraphModule, inputs: Sequence[Any]) -> int:
    """Recompute metadata of the nodes whose op, target, arguments or input metadata
    changed since the last annotation; returns how many nodes were recomputed.

    Changed nodes run on fake tensors (no arithmetic), so a rewrite of a few nodes costs a
    few nodes, not a forward pass. Where a node cannot run on fake tensors (a
    data-dependent op) the whole graph is annotated on ``inputs`` instead.

    Example::

        fold_bn(gm, ctx)
        refresh_metadata(gm, example_inputs)    # the new convs get shapes; the rest is kept
    """
    try:
        return _refresh(gm)
    except Exception:  # noqa: BLE001 - any op fake tensors cannot run: do it for real
        annotate_run(gm, inputs)
        return sum(1 for _ in gm.graph.nodes)


class _Annotator(ShapeProp):
    """ShapeProp that also records the device of tensor outputs and small scalar values."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        n.meta["device"] = str(result.device) if isinstance(result, torch.Tensor) else None
        if _is_small_value(result):
            n.meta[_VALUE] = result
        return result


def _is_small_value(value: Any) -> bool:
    if isinstance(value, (int, float, bool, torch.Size)):
        return True
    return isinstance(value, (tuple, list)) and len(value) <= 16 and all(
        isinstance(v, (int, float, bool)) for v in value
    )


class _NeedsRealRun(Exception):
    """An input of a changed node has no value fake tensors could stand in for."""


def _refresh(gm: fx.GraphModule) -> int:
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=True)
    interp = fx.Interpreter(gm)
    count = 0
    for node in gm.graph.nodes:
        sig = _signature(gm, node)  # in graph order: the inputs' metadata are final
        if node.meta.get(_SIG) == sig and "type" in node.meta:
            continue
        if node.op == "placeholder":
            raise _NeedsRealRun(node.name)  # inputs only change with the example inputs
        count += 1
        for arg in node.all_input_nodes:
            if arg not in interp.env:
                interp.env[arg] = _stand_in(arg, mode)
        with mode, torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            result = interp.run_node(node)
        interp.env[node] = result
        node.meta.pop("tensor_meta", None)
        node.meta.pop(_VALUE, None)
        if any(isinstance(v, torch.Tensor) for v in _leaves(result)):
            node.meta["tensor_meta"] = map_aggregate(result, _meta_of)
        fake = isinstance(result, FakeTensor)
        node.meta["type"] = torch.Tensor if fake else type(result)  # as the real run says
        node.meta["device"] = str(result.device) if isinstance(result, torch.Tensor) else None
        if _is_small_value(result):
            node.meta[_VALUE] = result
        _finish_node(gm, node, sig)
    return count


def _leaves(value: Any) -> list:
    """The leaves of a nested list/tuple/dict (``torch.utils._pytree.tree_leaves``)."""
    from torch.utils import _pytree as pytree

    return pytree.tree_leaves(value)


def _meta_of(value: Any) -> Any:
    return _extract_tensor_metadata(value) if isinstance(value, torch.Tensor) else value


def _stand_in(node: fx.Node, mode: Any) -> Any:
    """A fake tensor (or the recorded small value) with ``node``'s recorded metadata."""
    if _VALUE in node.meta:
        return node.meta[_VALUE]
    meta = node.meta.get("tensor_meta")
    if meta is None:
        raise _NeedsRealRun(node.name)
    device = node.meta.get("device")

    def fake(m: Any) -> Any:
        # TensorMetadata is a NamedTuple: test for it before the containers
        if isinstance(m, TensorMetadata):
            with mode:
                return torch.empty_strided(
                    m.shape, m.stride, dtype=m.dtype, device=device or "cpu",
                    requires_grad=m.requires_grad,
                )
        if isinstance(m, (list, tuple)):
            return type(m)(fake(v) for v in m)
        if isinstance(m, dict):
            return {k: fake(v) for k, v in m.items()}
        return m

    if isinstance(meta, TensorMetadata) and not isinstance(device, str):
        raise _NeedsRealRun(node.name)
    return fake(meta)


def _signature(gm: fx.GraphModule, node: fx.Node) -> Any:
    """Everything a node's output metadata depend on: op, target (a module by its type,
    configuration and weight shapes), constant arguments and the metadata of its inputs.
    Inputs count by their metadata, not their names, so a node rewired to an equivalent
    producer (a removed dropout, a folded no-op) keeps its metadata without a rerun."""
    args = map_arg((node.args, node.kwargs), _input_key)
    if node.op == "call_module":
        mod = gm.get_submodule(str(node.target))
        state = [(k, tuple(t.shape), t.dtype) for k, t in mod.state_dict(keep_vars=True).items()
                 if isinstance(t, torch.Tensor)]
        return ("call_module", type(mod), mod.extra_repr(), tuple(state), _frozen(args))
    if node.op == "get_attr":
        value = _get_attr(gm, str(node.target))
        if isinstance(value, torch.Tensor):
            return ("get_attr", tuple(value.shape), value.dtype, str(value.device))
        return ("get_attr", type(value))
    return (node.op, node.target, _frozen(args))


def _input_key(node: fx.Node) -> Any:
    if _VALUE in node.meta:
        return ("%value", node.meta[_VALUE])
    return ("%", node.meta.get("tensor_meta"), node.meta.get("device"), node.meta.get("type"))


def _frozen(value: Any) -> Any:
    """A comparable form of node arguments (a constant tensor by identity and shape)."""
    if isinstance(value, torch.Tensor):
        return ("tensor", tuple(value.shape), value.dtype, id(value))
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *(_frozen(v) for v in value))
    if isinstance(value, dict):
        return ("dict", *((k, _frozen(v)) for k, v in value.items()))
    return value


def _get_attr(gm: nn.Module, target: str) -> Any:
    owner, _, leaf = target.rpartition(".")
    return getattr(gm.get_submodule(owner) if owner else gm, leaf)


def _finish_node(gm: fx.GraphModule, node: fx.Node, sig: Any = None) -> None:
    node.meta["shape"], node.meta["dtype"] = _shape_dtype(node.meta.get("tensor_meta"))
    node.meta["fxopt_module_path"] = _module_path(node)
    node.meta[_SIG] = _signature(gm, node) if sig is None else sig


def _shape_dtype(meta: Any) -> tuple[Any, Any]:
    if meta is None:
        return None, None
    if hasattr(meta, "shape") and hasattr(meta, "dtype"):
        return tuple(meta.shape), meta.dtype
    if isinstance(meta, (list, tuple)):
        pairs = [_shape_dtype(m) for m in meta]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    if isinstance(meta, dict):
        pairs = [_shape_dtype(m) for m in meta.values()]
        return [p[0] for p in pairs], [p[1] for p in pairs]
    return None, None


def _module_path(node: fx.Node) -> str:
    if node.meta.get("fxopt_module_path"):
        return node.meta["fxopt_module_path"]
    if node.op == "call_module":
        return str(node.target)
    if node.op == "get_attr":
        return str(node.target).rpartition(".")[0]
    stack = node.meta.get("nn_module_stack")
    for path, _ in reversed(list((stack or {}).values())):
        # torch.export tags nodes it made outside any module with a placeholder entry
        if not str(path).startswith("_empty_nn_module_stack"):
            return str(path)
    return ""


# --------------------------------------------------------------------------- attributes
def drop_unused_attributes(gm: fx.GraphModule) -> int:
    """Delete submodules and tensors that no node refers to; returns how many went.

    Example::

        gm.graph.erase_node(node)           # the last user of self.fc
        drop_unused_attributes(gm)          # 1 (fc and its tensors are gone)
    """
    used_modules = {str(n.target) for n in gm.graph.nodes if n.op == "call_module"}
    used_attrs = {str(n.target) for n in gm.graph.nodes if n.op == "get_attr"}
    before = len(list(gm.named_modules()))
    gm.delete_all_unused_submodules()
    count = before - len(list(gm.named_modules()))
    names = [n for n, _ in gm.named_parameters(remove_duplicate=False)]
    names += [n for n, _ in gm.named_buffers(remove_duplicate=False)]
    for name in names:
        owner, _, leaf = name.rpartition(".")
        if name in used_attrs or _inside(owner, used_modules):
            continue
        module = gm.get_submodule(owner) if owner else gm
        module._parameters.pop(leaf, None)
        module._buffers.pop(leaf, None)
        count += 1
    return count


def _inside(owner: str, used_modules: set[str]) -> bool:
    """``owner`` is a called module or nested in one (``a.b`` inside ``a``)."""
    if not owner:
        return False
    parts = owner.split(".")
    return any(".".join(parts[:k]) in used_modules for k in range(1, len(parts) + 1))


def fresh_attr(root: nn.Module, base: str, *suffixes: str) -> str:
    """``base``, or ``base_1``, ``base_2``… : the first name ``root`` has no attribute of
    (with each of ``suffixes`` appended, when given).

    >>> fresh_attr(nn.Linear(2, 2), "weight")
    'weight_1'
    """
    suffixes = suffixes or ("",)
    name, i = base, 0
    while any(hasattr(root, f"{name}{s}") for s in suffixes):
        i += 1
        name = f"{base}_{i}"
    return name


def copy_graph_module(gm: fx.GraphModule, share_tensors: bool = False) -> fx.GraphModule:
    """A deep copy of ``gm`` (graph, submodules, tensors and metadata); with
    ``share_tensors`` the parameter and buffer tensors are the same objects in both (a
    copy that costs the structure only, for when nothing writes into them in place).

    Example::

        start = copy_graph_module(gm)   # survives any rewrite of gm
    """
    memo: dict[int, Any] = {}
    if share_tensors:
        for t in [*gm.parameters(), *gm.buffers()]:
            memo[id(t)] = t
    # deep-copying a pytree codegen trips torch's own LeafSpec deprecation warning
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return copy.deepcopy(gm, memo)


# --------------------------------------------------------------------------- names
def layer_name(node: fx.Node) -> str:
    """The name a user knows a layer by: its module path, else the node name.

    >>> layer_name(node)  # doctest: +SKIP
    'layer1.0.conv1'
    """
    path = node.meta.get("fxopt_module_path")
    if path:
        return str(path)
    return str(node.target) if node.op == "call_module" else node.name


def matches(node: fx.Node, patterns: Iterable[str]) -> bool:
    """True if ``node``'s layer name or node name equals or glob-matches a pattern.

    >>> matches(node, ["layer1.*"])  # doctest: +SKIP
    True
    """
    names = {layer_name(node), node.name}
    if node.op == "call_module":
        names.add(str(node.target))
    return any(n == p or fnmatch.fnmatchcase(n, p) for p in patterns for n in names)


def human_count(n: float) -> str:
    """A count with a unit: 1234567 -> '1.23M'.

    >>> human_count(1234567), human_count(999)
    ('1.23M', '999')
    """
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.2f}{unit}"
    return str(int(n))


def attr_key(src: fx.Node, name: str | None = None) -> str:
    """The state_dict key, in the user's model, of the tensor a ``get_attr`` node reads: its
    target, or (after ``flatten_modules`` moved ``a.b.w`` to ``a_b_w`` or a module ``a.b``
    to ``a_b``) the recorded module path and the tensor's own name.

    Example::

        attr_key(node)   # "layer1.0.conv1.weight" for get_attr layer1_0_conv1_weight
    """
    target, path = str(src.target), src.meta.get("fxopt_module_path") or ""
    if not path or target.startswith(path + "."):
        return target
    flat = path.replace(".", "_")
    prefix = next((p for p in (flat + "_", flat + ".") if target.startswith(p)), None)
    leaf = target[len(prefix):] if prefix else name or target.rsplit(".", 1)[-1]
    return f"{path}.{leaf}"


def state_key(view: Any, name: str) -> str:
    """The state_dict key, in the user's model, of parameter ``name`` of the op ``view``
    (an ``fxopt.ops.OpView``): the module path capture recorded and the parameter's name,
    else the key of the get_attr feeding it.

    Example::

        state_key(op_of(bn_node), "running_mean")   # "layer1.0.bn1.running_mean"
    """
    if view.module is not None:
        path = view.node.meta.get("fxopt_module_path") or str(view.node.target)
        return f"{path}.{name}"
    src = view.param_node(name)
    if src is None:
        return f"{view.node.name}.{name}"
    return attr_key(src, name)
