"""What an artifact accepts: one spec per input (name, dtype, dims), checked before a run.

A spec is plain JSON data, stored in the eager manifest (``"input_spec"``) and read from
an ONNX model's graph inputs. A dim is an int (static), a name (dynamic: ``"batch"``,
``"s0"``; equal names must match within one call) or None (anything). ``check_inputs``
raises ``InputSpecError`` naming the input, the expected spec and what was given, so a
wrong call never reaches PyTorch or ONNX Runtime.

Example:
    >>> spec = [{"name": "x", "dtype": "float32", "shape": ["batch", 3, 224, 224]}]
    >>> format_spec(spec[0])
    'x: float32[batch, 3, 224, 224]'
    >>> check_inputs(spec, (torch.zeros(2, 3, 224, 224),), "model")
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.fx as fx

from fxopt.errors import InputSpecError, LoweringError

# ONNX Runtime's type strings (session.get_inputs()[i].type) -> dtype names
_ORT_DTYPES = {
    "tensor(float)": "float32", "tensor(double)": "float64", "tensor(float16)": "float16",
    "tensor(bfloat16)": "bfloat16", "tensor(int64)": "int64", "tensor(int32)": "int32",
    "tensor(int16)": "int16", "tensor(int8)": "int8", "tensor(uint8)": "uint8",
    "tensor(bool)": "bool", "tensor(complex64)": "complex64", "tensor(complex128)": "complex128",
}


def format_spec(spec: dict | None) -> str:
    """``x: float32[batch, 3, 224, 224]`` (``?`` for a dim that takes any size).

    >>> format_spec({"name": "ids", "dtype": "int64", "shape": ["batch", 16]})
    'ids: int64[batch, 16]'
    """
    if spec is None:
        return "(unchecked)"
    dims = ", ".join("?" if d is None else str(d) for d in spec["shape"])
    return f"{spec['name']}: {spec.get('dtype') or '?'}[{dims}]"


def format_specs(specs: Sequence[dict | None]) -> str:
    """All specs of an artifact, comma separated: ``(x: float32[batch, 3], m: bool[batch])``."""
    return "(" + ", ".join(format_spec(s) for s in specs) + ")"


def spec_for_eager(gm: fx.GraphModule, inputs: tuple) -> list[dict | None] | None:
    """The input spec of an eager artifact lowered from ``gm`` with example ``inputs``.

    Names are ``gm``'s placeholders and dtypes those of the example inputs. Dims come from
    the placeholders' ``torch.export`` values where present (ints stay static, symbols are
    dynamic); a symbolic-trace graph carries no such record, so dim 0 is the dynamic
    ``"batch"`` (unless ``fxopt.capture`` found that another batch size breaks the graph;
    inputs whose dim 0 differs from the first input's keep it static) and the other dims
    are the example's. None when the inputs are not one
    flat tensor (or value) per placeholder: such calls are left to the graph itself.

    >>> gm = torch.fx.symbolic_trace(torch.nn.Conv2d(3, 4, 1))
    >>> spec_for_eager(gm, (torch.zeros(1, 3, 8, 8),))
    [{'name': 'input', 'dtype': 'float32', 'shape': ['batch', 3, 8, 8]}]
    """
    placeholders = gm.graph.find_nodes(op="placeholder")
    if len(placeholders) != len(inputs):
        return None
    capture = (gm.meta.get("fxopt") or {}).get("capture") or {}
    sizes = [x.shape[0] for x in inputs if isinstance(x, torch.Tensor) and x.dim() > 0]
    # capture tried another batch size; a graph fxopt did not capture is batch-agnostic
    batch = sizes[0] if sizes and capture.get("dynamic_batch", True) else None
    specs: list[dict | None] = []
    for node, x in zip(placeholders, inputs, strict=True):
        if not isinstance(x, torch.Tensor):
            specs.append(None)  # a Python value: the graph (or its export guard) decides
            continue
        val = node.meta.get("val")
        if isinstance(val, torch.Tensor) and val.dim() == x.dim():
            dims = [_dim(d) for d in val.shape]
        else:
            dims = ["batch" if i == 0 and s == batch else int(s) for i, s in enumerate(x.shape)]
        specs.append({"name": str(node.target), "dtype": _dtype_name(x.dtype), "shape": dims})
    return specs


def spec_for_onnx(session_inputs: Sequence[Any]) -> list[dict | None]:
    """The input spec of an ONNX model, from ``session.get_inputs()`` (its graph inputs).

    >>> spec_for_onnx(session.get_inputs())  # doctest: +SKIP
    [{'name': 'x', 'dtype': 'float32', 'shape': ['batch', 3, 224, 224]}]
    """
    specs: list[dict | None] = []
    for i in session_inputs:
        if not str(i.type).startswith("tensor("):
            specs.append(None)  # a sequence or map input: ONNX Runtime checks it
            continue
        shape = [d if isinstance(d, (int, str)) and d != "" else None for d in (i.shape or [])]
        specs.append({"name": i.name, "dtype": _ORT_DTYPES.get(i.type), "shape": shape})
    return specs


def read_spec(doc: Any, where: str) -> list[dict | None] | None:
    """``doc`` (a manifest's ``"input_spec"``) if it is a well-formed spec, else
    LoweringError: a damaged spec must fail at load, not on the first call.

    >>> read_spec([{"name": "x", "dtype": "float32", "shape": ["batch", 3]}], "m")
    [{'name': 'x', 'dtype': 'float32', 'shape': ['batch', 3]}]
    """
    if doc is None:
        return None  # written before fxopt recorded specs: calls go unchecked

    def ok(e: Any) -> bool:
        return e is None or (
            isinstance(e, dict) and isinstance(e.get("name"), str)
            and isinstance(e.get("dtype"), (str, type(None)))
            and isinstance(e.get("shape"), list)
            and all(d is None or isinstance(d, (int, str)) for d in e["shape"]))

    if not isinstance(doc, list) or not all(ok(e) for e in doc):
        raise LoweringError(f"{where}: the manifest's input_spec is malformed: {doc!r:.200}")
    return doc


def check_inputs(specs: Sequence[dict | None] | None, inputs: Sequence[Any], what: str) -> None:
    """Raise InputSpecError unless ``inputs`` fit ``specs`` (count, kind, dtype, rank, dims).

    Torch tensors and numpy arrays are both accepted; ``what`` names the artifact.

    >>> spec = [{"name": "x", "dtype": "float32", "shape": ["batch", 3]}]
    >>> check_inputs(spec, (torch.zeros(5, 3),), "model.onnx")
    """
    if specs is None:
        return
    expected = f"{what} expects {format_specs(specs)}"
    if len(inputs) != len(specs):
        raise InputSpecError(
            f"{what} takes {len(specs)} input(s) {format_specs(specs)}, got {len(inputs)}: "
            f"{_describe_all(inputs)}")
    seen: dict[str, tuple[int, str]] = {}
    for spec, x in zip(specs, inputs, strict=True):
        if spec is None:
            continue
        name, want = spec["name"], spec["shape"]
        fix = f"{expected}; got {name} = {_describe(x)}"
        if not isinstance(x, (torch.Tensor, np.ndarray)):
            raise InputSpecError(f"input {name!r} must be a tensor: {fix}")
        dtype = _dtype_name(x.dtype)
        if spec.get("dtype") and dtype != spec["dtype"]:
            raise InputSpecError(
                f"input {name!r} has dtype {dtype}, expected {spec['dtype']} ({fix}); "
                f"cast it, e.g. x.to(torch.{spec['dtype']})")
        if x.ndim != len(want):
            raise InputSpecError(
                f"input {name!r} has rank {x.ndim}, expected {len(want)}: {fix}")
        for d, (size, w) in enumerate(zip(x.shape, want, strict=True)):
            if isinstance(w, int) and size != w:
                raise InputSpecError(
                    f"input {name!r} has size {size} at dim {d}, expected {w} (static): {fix}; "
                    "lower again with this dimension dynamic to accept other sizes")
            if isinstance(w, str):
                if w in seen and seen[w][0] != size:
                    raise InputSpecError(
                        f"input {name!r} has size {size} at dim {d}, but dynamic dim {w!r} is "
                        f"{seen[w][0]} in {seen[w][1]}: {fix}")
                seen.setdefault(w, (size, name))


def _dim(d: Any) -> int | str | None:
    if isinstance(d, int):
        return d
    expr = getattr(getattr(d, "node", None), "expr", None)
    if getattr(expr, "is_Integer", False):
        return int(expr)
    return str(expr) if getattr(expr, "is_Symbol", False) else None


def _dtype_name(dtype: Any) -> str:
    if isinstance(dtype, torch.dtype):
        return str(dtype).removeprefix("torch.")
    return np.dtype(dtype).name


def _describe(x: Any) -> str:
    if isinstance(x, (torch.Tensor, np.ndarray)):
        return f"{_dtype_name(x.dtype)}[{', '.join(str(s) for s in x.shape)}]"
    return f"a {type(x).__name__}"


def _describe_all(inputs: Sequence[Any]) -> str:
    return "(" + ", ".join(_describe(x) for x in inputs) + ")"
