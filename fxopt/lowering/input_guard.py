"""The input checks of a ``torch.export`` module, kept as data so loading never execs code.

``ExportedProgram.module()`` adds a ``_guards_fn`` submodule (generated code) that checks
input shapes and specialized scalars; the eager artifact stores an ``InputGuard`` in its
place, built from the placeholders' metadata by ``input_guard_for``.

Example:
    >>> InputGuard([{"name": "x", "shape": ["s0", 3]}])(torch.zeros(5, 3))
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.fx as fx

from fxopt.errors import InputSpecError


class InputGuard(torch.nn.Module):
    """The input checks of a ``torch.export`` module (its ``_guards_fn``), kept as data
    instead of generated code so that loading never has to exec anything.

    ``inputs`` holds one entry per flat input: None (unchecked), {"name", "value"} for a
    specialized scalar, or {"name", "shape"} where a dim is an int (static), a symbol name
    (dynamic; equal symbols must match) or None; ``ranges`` maps symbols to [lo, hi].

    >>> InputGuard([{"name": "x", "shape": ["s0", 3]}])(torch.zeros(5, 3))
    """

    def __init__(self, inputs: list, ranges: dict | None = None) -> None:
        super().__init__()
        self.inputs = inputs
        self.ranges = ranges or {}

    def forward(self, *args: Any) -> None:
        if len(args) != len(self.inputs):
            raise InputSpecError(f"expected {len(self.inputs)} inputs, got {len(args)}")
        seen: dict[str, tuple[int, str]] = {}
        for i, (arg, spec) in enumerate(zip(args, self.inputs, strict=True)):
            name = (spec or {}).get("name", f"input {i}")
            if spec is None or ("value" in spec and arg == spec["value"]):
                continue
            if "value" in spec:
                raise InputSpecError(f"{name} must be {spec['value']!r} (specialized at export)")
            want = spec["shape"]
            if not isinstance(arg, torch.Tensor) or arg.dim() != len(want):
                got = tuple(arg.shape) if isinstance(arg, torch.Tensor) else type(arg).__name__
                raise InputSpecError(f"{name}: expected a {len(want)}-d tensor, got {got}")
            for d, (size, w) in enumerate(zip(arg.shape, want, strict=True)):
                where = f"{name}.shape[{d}]"
                if isinstance(w, int) and size != w:
                    raise InputSpecError(
                        f"{where} is {size} but this artifact was exported for {w}; export "
                        "with dynamic_shapes to accept other sizes"
                    )
                if isinstance(w, str):
                    if w in seen and seen[w][0] != size:
                        raise InputSpecError(f"{where} is {size} but must equal {seen[w][1]}")
                    seen.setdefault(w, (size, where))
                    lo, hi = self.ranges.get(w, (None, None))
                    if (lo is not None and lo > 2 and size < lo) or (hi is not None and size > hi):
                        raise InputSpecError(f"{where} is {size}, outside the range [{lo}, {hi}]")

    def extra_repr(self) -> str:
        return f"inputs={self.inputs}, ranges={self.ranges}"


def is_export_guard(mod: torch.nn.Module) -> bool:
    """True for the ``_guards_fn`` module that ``ExportedProgram.module()`` adds."""
    return type(mod).__name__ == "GuardsFn" and type(mod).__module__ == "torch.export._unlift"


def input_guard_for(gm: fx.GraphModule) -> InputGuard:
    """An InputGuard checking what torch.export's guards check on ``gm``'s placeholders
    (static sizes, equal symbolic sizes, declared ranges, specialized scalars)."""
    inputs: list = []
    for n in gm.graph.find_nodes(op="placeholder"):
        val = n.meta.get("val")
        if isinstance(val, torch.Tensor):
            dims = [d if isinstance(d, int) else _symbol(d) for d in val.shape]
            inputs.append({"name": n.name, "shape": dims})
        elif isinstance(val, (int, float)) and not isinstance(val, bool) and math.isfinite(val):
            inputs.append({"name": n.name, "value": val})
        else:
            inputs.append(None)
    used = {d for spec in inputs if spec and "shape" in spec for d in spec["shape"]}
    ranges = {
        str(sym): [_as_int(vr.lower), _as_int(vr.upper)]
        for sym, vr in (getattr(gm, "range_constraints", None) or {}).items()
        if str(sym) in used
    }
    return InputGuard(inputs, ranges)


def _symbol(d: Any) -> str | None:
    expr = getattr(getattr(d, "node", None), "expr", None)
    return str(expr) if getattr(expr, "is_Symbol", False) else None


def _as_int(v: Any) -> int | None:
    try:
        return int(v)
    except (TypeError, ValueError, OverflowError):
        return None
