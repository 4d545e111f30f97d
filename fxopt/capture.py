"""Front ends: turn an ``nn.Module`` into a ``torch.fx.GraphModule`` with metadata.

Two front ends feed one IR. ``symbolic`` runs ``torch.fx.symbolic_trace`` (module-level
graph, readable, best for surgery); ``export`` runs ``torch.export`` (ATen-level; captures
what symbolic tracing cannot). ``auto`` tries symbolic first and falls back to export,
recording why. The user's model is never modified: capture works on a deep copy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import traceback
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.fx as fx
from torch import nn
from torch.utils import _pytree as pytree

from fxopt.errors import CaptureError
from fxopt.graph_utils import annotate, annotate_run  # noqa: F401 - fxopt.capture.annotate stays
from fxopt.verify import compare_outputs, random_like_inputs, resize_batch

MODES = ("auto", "symbolic", "export")
LeafPolicy = Iterable[type | str] | Callable[[nn.Module, str], bool] | None


@dataclass
class CaptureInfo:
    """How a graph was captured; stored as ``gm.meta["fxopt"]["capture"]``."""

    mode: str
    frontend: str
    reason: str
    dynamic_batch: bool
    symbolic_error: str | None = None


def capture(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    mode: str = "auto",
    *,
    leaf_modules: LeafPolicy = None,
    concrete_args: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    dynamic_dims: Mapping[int, Sequence[int]] | None = None,
    check: bool = True,
) -> fx.GraphModule:
    """Capture ``model`` (in eval mode) into a GraphModule annotated with shapes and dtypes.

    Every node gets ``meta["shape"]``, ``meta["dtype"]`` (lists for multi-output nodes) and
    ``meta["fxopt_module_path"]``; ``gm.meta["fxopt"]["capture"]`` says which front end was
    used and why. With ``check`` the graph is compared with the model on the example inputs,
    on fresh random inputs, and on another batch size where the model allows it.
    ``dynamic_dims`` ({input position: [dims]}, e.g. ``{0: [1]}`` for a sequence length)
    asks torch.export to keep more dimensions than the batch symbolic; symbolic tracing
    keeps every dimension symbolic anyway.

    Example::

        gm = fxopt.capture(model, (torch.randn(1, 3, 224, 224),), mode="auto")
        gm.meta["fxopt"]["capture"]["frontend"]   # "symbolic" or "export"
    """
    gm, _ = capture_with_outputs(
        model, example_inputs, mode, leaf_modules=leaf_modules, concrete_args=concrete_args,
        dynamic_batch=dynamic_batch, dynamic_dims=dynamic_dims, check=check,
    )
    return gm


def capture_with_outputs(
    model: nn.Module,
    example_inputs: Sequence[Any] | torch.Tensor,
    mode: str = "auto",
    *,
    leaf_modules: LeafPolicy = None,
    concrete_args: dict[str, Any] | None = None,
    dynamic_batch: bool = True,
    dynamic_dims: Mapping[int, Sequence[int]] | None = None,
    check: bool = True,
) -> tuple[fx.GraphModule, Any]:
    """``capture``, also returning the graph's outputs on the example inputs (from the run
    that annotated it), so that a caller which needs them does not run the graph again.

    Example::

        gm, outputs = capture_with_outputs(model, (x,))
        fxopt.PassManager("default").run(gm, (x,), reference=outputs)
    """
    if mode not in MODES:
        raise CaptureError(f"unknown capture mode {mode!r}; use one of {', '.join(MODES)}")
    if not isinstance(model, nn.Module):
        raise CaptureError(
            f"capture() needs a torch.nn.Module, got {type(model).__name__}; "
            "wrap plain functions in a Module whose forward calls them"
        )
    inputs = normalize_inputs(example_inputs)
    work = _private_copy(model)
    reference = _run_model(work, inputs)

    def symbolic() -> fx.GraphModule:
        return _symbolic(work, leaf_modules, concrete_args)

    def export() -> fx.GraphModule:
        return _export(work, inputs, dynamic_batch, dynamic_dims)

    def finish(gm: fx.GraphModule, info: CaptureInfo) -> tuple[fx.GraphModule, Any]:
        return _finish(gm, work, inputs, reference, info, check, dynamic_batch)

    if mode != "auto":
        frontend, hint = _FRONTENDS[mode]
        try:
            gm = symbolic() if mode == "symbolic" else export()
        except CaptureError as e:
            raise CaptureError(
                f"{frontend} could not capture {type(model).__name__}: {e}\nTry: {hint}"
            ) from e
        return finish(gm, CaptureInfo(mode, mode, "requested", dynamic_batch=False))

    try:
        gm = symbolic()
        info = CaptureInfo(mode, "symbolic", "symbolic_trace succeeded", dynamic_batch=False)
        return finish(gm, info)
    except CaptureError as sym_err:
        try:
            gm = export()
        except CaptureError as exp_err:
            raise CaptureError(
                f"neither front end could capture {type(model).__name__}.\n"
                f"  symbolic_trace: {sym_err}\n  torch.export: {exp_err}\n"
                "Try: leaf_modules=[...] for the submodule that fails to trace, "
                "concrete_args={...} for Python-level flags, or rewrite data-dependent "
                "control flow with torch.cond / torch.where."
            ) from exp_err
        reason = f"symbolic_trace failed: {_first_line(sym_err)}"
        info = CaptureInfo(mode, "export", reason, False, symbolic_error=str(sym_err))
        return finish(gm, info)


_FRONTENDS = {
    "symbolic": (
        "symbolic_trace",
        "mode='export' (or 'auto'), leaf_modules=[...] for the submodule that fails "
        "to trace, or concrete_args={...} for Python-level flags.",
    ),
    "export": (
        "torch.export",
        "mode='symbolic' (with leaf_modules=[...] or concrete_args={...} where needed), "
        "or rewrite data-dependent control flow with torch.cond / torch.where.",
    ),
}


# --------------------------------------------------------------------------- helpers
def normalize_inputs(example_inputs: Any) -> tuple:
    """Example inputs as a tuple (a lone tensor becomes a 1-tuple)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise CaptureError(
        f"example_inputs must be a tensor or a tuple of tensors, got "
        f"{type(example_inputs).__name__}"
    )


def _private_copy(model: nn.Module) -> nn.Module:
    try:
        work = copy.deepcopy(model)
    except Exception as e:  # noqa: BLE001 - any failure to copy is reported the same way
        raise CaptureError(
            f"could not copy {type(model).__name__} ({type(e).__name__}: {e}); fxopt works on "
            "a copy so your model is never modified - make its attributes deep-copyable"
        ) from e
    return work.eval()


def _run_model(model: nn.Module, inputs: tuple) -> Any:
    try:
        with torch.no_grad():
            return model(*inputs)
    except Exception as e:  # noqa: BLE001
        shapes = ", ".join(_describe(x) for x in inputs)
        raise CaptureError(
            f"the model fails on the example inputs ({shapes}) at {_user_location(e)}: "
            f"{type(e).__name__}: {_first_line(e)}. Check the input shapes "
            "(--input-shape on the command line) and dtypes."
        ) from e


def _describe(x: Any) -> str:
    if isinstance(x, torch.Tensor):
        return f"{str(x.dtype).replace('torch.', '')}{list(x.shape)}"
    return type(x).__name__


class _LeafTracer(fx.Tracer):
    """Keeps torch.nn's own leaves and, in addition, whatever the policy names."""

    def __init__(self, policy: LeafPolicy):
        super().__init__()
        # a lone class or name is a one-item list (a class is callable, so check it first);
        # an iterable is materialised because is_leaf_module is asked once per submodule
        if isinstance(policy, (type, str)):
            policy = (policy,)
        elif policy is not None and not callable(policy):
            policy = tuple(policy)
        self.policy = policy

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        policy = self.policy
        if policy is None:
            return super().is_leaf_module(m, qualname)
        if callable(policy):
            return bool(policy(m, qualname)) or super().is_leaf_module(m, qualname)
        for item in policy:
            if isinstance(item, str) and (qualname == item or type(m).__name__ == item):
                return True
            if isinstance(item, type) and isinstance(m, item):
                return True
        return super().is_leaf_module(m, qualname)


def _symbolic(model: nn.Module, leaf: LeafPolicy, concrete_args: dict | None) -> fx.GraphModule:
    tracer = _LeafTracer(leaf)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as e:  # noqa: BLE001 - tracing errors come in many types
        raise CaptureError(
            f"{type(e).__name__} at {_user_location(e)}: {_first_line(e)}"
        ) from e
    name = type(model).__name__
    return fx.GraphModule(tracer.root, graph, name)


def _export(model: nn.Module, inputs: tuple, dynamic_batch: bool,
            dynamic_dims: Mapping[int, Sequence[int]] | None = None) -> fx.GraphModule:
    errors = []
    wanted = dynamic_batch or bool(dynamic_dims)
    for strict in (False, True):
        for dynamic in ((True, False) if wanted else (False,)):
            shapes = _dynamic_shapes(inputs, dynamic_batch, dynamic_dims) if dynamic else None
            try:
                with warnings.catch_warnings(), _quiet_export_logs():
                    warnings.simplefilter("ignore")
                    ep = torch.export.export(model, inputs, dynamic_shapes=shapes, strict=strict)
                return _graph_module_from_export(ep, type(model).__name__)
            except Exception as e:  # noqa: BLE001
                errors.append(e)
                if not dynamic:
                    break
    first = errors[0]
    raise CaptureError(f"{type(first).__name__} at {_user_location(first)}: {_first_line(first)}")


@contextlib.contextmanager
def _quiet_export_logs():
    """torch.export logs a warning when a size-1 batch is specialised; the capture info
    already records whether the batch is dynamic, so keep the user's console clean."""
    logger = logging.getLogger("torch._export")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _dynamic_shapes(inputs: tuple, batch: bool,
                    extra: Mapping[int, Sequence[int]] | None) -> tuple:
    shapes = []
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor) or x.dim() == 0:
            shapes.append(None)
            continue
        dims = ([0] if batch else []) + [d % x.dim() for d in (extra or {}).get(i, ())]
        shapes.append({d: torch.export.Dim.AUTO for d in dims} or None)
    return tuple(shapes)


def _graph_module_from_export(ep: torch.export.ExportedProgram, name: str) -> fx.GraphModule:
    """A plain, trainable GraphModule from an ExportedProgram (no guard submodule)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        unlifted = ep.module()
        in_spec, out_spec = unlifted._in_spec, unlifted._out_spec
        graph = fx.Graph()
        outputs = graph.graph_copy(unlifted.graph, {})
        graph.output(outputs)
        for node in list(graph.nodes):
            if node.op == "call_module" and str(node.target).startswith("_guards"):
                graph.erase_node(node)
        args_spec, kwargs_spec = in_spec.children()
        if args_spec.num_children and not kwargs_spec.num_children and _is_flat(out_spec):
            out = graph.output_node()
            out.args = (outputs[0] if out_spec.is_leaf() else tuple(outputs),)
        else:  # keep the pytree calling convention (e.g. dict outputs of HF models)
            graph._codegen = unlifted.graph._codegen
    gm = fx.GraphModule(unlifted, graph, name)
    for attr in list(vars(gm)):
        if attr.startswith("_guards"):
            delattr(gm, attr)
    if hasattr(gm, "_guards_fn"):
        del gm._modules["_guards_fn"]
    gm.recompile()
    return gm


def _is_flat(spec: pytree.TreeSpec) -> bool:
    if spec.is_leaf():
        return True
    return spec.type is tuple and all(c.is_leaf() for c in spec.children())


def _finish(
    gm: fx.GraphModule,
    model: nn.Module,
    inputs: tuple,
    reference: Any,
    info: CaptureInfo,
    check: bool,
    dynamic_batch: bool,
) -> tuple[fx.GraphModule, Any]:
    gm.eval()
    # one run annotates every node and gives the outputs the checks compare
    outputs = _run_graph(gm, inputs, info, annotate_run)
    if check:
        _check_same(gm, model, reference, outputs, info)
        info.dynamic_batch = _check_fresh_inputs(gm, model, inputs, info, dynamic_batch)
    gm.meta["fxopt"] = {
        "model": type(model).__name__,
        "capture": asdict(info),
        "pipeline": [],
        "inputs": [_spec(x, info.dynamic_batch) for x in inputs],
    }
    return gm, outputs


def _spec(x: Any, dynamic: bool) -> dict:
    if isinstance(x, torch.Tensor):
        shape = list(x.shape)
        if dynamic and shape:
            shape[0] = None
        return {"shape": shape, "dtype": str(x.dtype).replace("torch.", "")}
    return {"value": repr(x)}


def _check_same(gm, model, reference, outputs, info) -> None:
    report = compare_outputs(reference, outputs)
    if not report.ok():
        raise CaptureError(
            f"the {info.frontend} graph does not reproduce the model on the example inputs "
            f"(max error {report.max_abs:.3g}); this usually means a Python side effect or hook "
            "the front end cannot see - try the other capture mode"
        )


def _check_fresh_inputs(gm, model, inputs, info, dynamic_batch: bool) -> bool:
    """Graph and model agree on fresh random inputs (no value-dependent branch was frozen
    at trace time); returns whether they also agree on another batch size.

    Fresh inputs of another batch size prove both at once, so that is tried first (one
    model run and one graph run); only when it fails are fresh inputs of the example
    batch size tried, to tell a batch-specific model from a frozen branch."""
    if dynamic_batch:
        other = resize_batch(random_like_inputs(inputs, seed=4321), delta=1)
        if other is not None and _agree_on(gm, model, other):
            return True
    fresh = random_like_inputs(inputs, seed=1234)
    with torch.no_grad():
        want = model(*fresh)
    report = compare_outputs(want, _run_graph(gm, fresh, info))
    if not report.ok():
        raise CaptureError(
            f"the {info.frontend} graph matches the example inputs but not fresh random inputs "
            f"(max error {report.max_abs:.3g}): a value-dependent branch was frozen at trace "
            "time. Use mode='export' or torch.cond for the branch."
        )
    return False


def _agree_on(gm, model, inputs) -> bool:
    try:
        with torch.no_grad():
            want = model(*inputs)
    except Exception:  # noqa: BLE001 - the model itself is batch-specific
        return False
    try:
        with torch.no_grad():
            got = gm(*inputs)
    except Exception:  # noqa: BLE001
        return False
    return compare_outputs(want, got).ok()


def _run_graph(gm, inputs, info, run=None) -> Any:
    try:
        with torch.no_grad():
            return run(gm, inputs) if run is not None else gm(*inputs)
    except Exception as e:  # noqa: BLE001
        raise CaptureError(
            f"the {info.frontend} graph fails to run at {_user_location(e)}: "
            f"{type(e).__name__}: {_first_line(e)}; try the other capture mode"
        ) from e


# --------------------------------------------------------------------------- error locations
_SKIP = (
    os.path.dirname(torch.__file__),
    os.path.dirname(os.path.abspath(__file__)),
    "<frozen",
    "<string>",
    "<eval_with_key>",
)


# the zoo package is model code, not library code: its frames are the user's location
_ZOO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "zoo", "")


def _user_location(e: BaseException) -> str:
    """file:line (and source) of the deepest frame outside torch and fxopt."""
    frames = []
    err: BaseException | None = e
    while err is not None:
        frames.extend(traceback.extract_tb(err.__traceback__))
        err = err.__cause__ or err.__context__
        if err is e:
            break
    user = [f for f in frames if not f.filename.startswith(_SKIP) or f.filename.startswith(_ZOO)]
    if not user:
        return "an unknown location"
    f = user[-1]
    line = f" (`{f.line.strip()}`)" if f.line else ""
    return f"{f.filename}:{f.lineno}{line}"


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text.splitlines()[0][:300]
