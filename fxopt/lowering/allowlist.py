"""What a loaded artifact may name: call targets, method names and attribute paths.

``call_function`` targets are stored as qualified names ("torch.ops.aten.conv2d.default",
"torch.nn.functional.relu", "_operator.add") and resolved only from an allowlist of
namespaces (plus fxopt's own functions and custom ops), so a tampered ``graph.json`` cannot
make the loader import or call anything else. A user may extend that list for one artifact
with ``trusted`` module prefixes (``lower(..., trusted=["mylib.ops"])``): they are recorded in
its manifest, and only while ``trusting(prefixes)`` is active are functions under them
resolved, by importing only modules that fall under a declared prefix. ``call_method``
names and module/attribute paths are checked here too, since they end up in generated code.

Example:
    >>> resolve_target(target_name(torch.nn.functional.relu)) is torch.nn.functional.relu
    True
"""

from __future__ import annotations

import builtins
import contextvars
import importlib
import math
import operator
import re
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch.fx.node import _get_qualified_name

from fxopt.errors import LoweringError

# Modules whose functions a graph may call by "<namespace>.<name>".
_NAMESPACES: dict[str, Any] = {
    "torch": torch,
    "torch.Tensor": torch.Tensor,
    "torch.nn.functional": torch.nn.functional,
    "torch.functional": torch.functional,
    "torch.linalg": torch.linalg,
    "torch.fft": torch.fft,
    "torch.special": torch.special,
    "torch._C._nn": torch._C._nn,
    "torch._C._linalg": torch._C._linalg,
    "torch._C._fft": torch._C._fft,
    "torch._C._special": torch._C._special,
    "_operator": operator,
    "math": math,
}
_EXACT = {
    "builtins.getattr": builtins.getattr,
    "torch._C._set_grad_enabled": torch._C._set_grad_enabled,
}
# Reachable from allowed namespaces, but they read/write files, compile code or build
# arbitrary callables: never loaded from an artifact.
_DENIED = set(
    "torch.load torch.save torch.from_file torch.compile "
    "_operator.attrgetter _operator.methodcaller _operator.call".split()
)
_PRIVATE_TORCH_OK = {"_assert", "_check", "_check_is_size", "_check_index", "_check_value"}
# Tensor dunders a call_method node may name; introspection dunders stay forbidden.
_DUNDER_METHODS = {
    f"__{n}__"
    for n in (
        "add radd iadd sub rsub isub mul rmul imul truediv rtruediv itruediv floordiv rfloordiv "
        "mod rmod pow rpow matmul rmatmul neg pos abs invert and rand or ror xor rxor lshift "
        "rshift eq ne lt le gt ge getitem setitem len contains bool float int index"
    ).split()
}
_COMPONENT = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_\-]*$")
_OPERATOR_TYPES = (
    torch._ops.OpOverload,
    torch._ops.OpOverloadPacket,
    torch._ops.HigherOrderOperator,
)


# --------------------------------------------------------------------------- targets


def target_name(fn: Any, where: str = "graph") -> str:
    """Qualified name of a call_function target, checked to decode back to ``fn``.

    >>> target_name(torch.ops.aten.add.Tensor)
    'torch.ops.aten.add.Tensor'
    """
    if isinstance(fn, torch._ops.OpOverload):
        name = f"torch.ops.{fn.namespace}.{fn._opname}.{fn._overloadname}"
    elif isinstance(fn, torch._ops.OpOverloadPacket):
        name = f"torch.ops.{fn._qualified_op_name.replace('::', '.')}"
    elif isinstance(fn, torch._ops.HigherOrderOperator):
        name = f"torch.ops.{fn.namespace}.{fn.name()}"
    else:
        try:
            name = _canonical(fn)
        except Exception as e:
            raise LoweringError(f"{where}: cannot name the callable {fn!r} ({e})") from e
    try:
        ok = resolve_target(name, where) is fn
    except LoweringError as e:
        raise LoweringError(
            f"{e}. Loaded artifacts may only call torch, torch.ops, torch.nn.functional, "
            "operator, math, builtins.getattr and fxopt functions: rewrite that call, "
            "capture with mode='export' so it becomes aten ops, or declare its module with "
            "lower(..., trusted=['pkg.module'])."
        ) from None
    if not ok:
        raise LoweringError(f"{where}: {fn!r} is not reachable under its name {name}")
    return name


def resolve_target(name: str, where: str = "graph") -> Any:
    """The callable a qualified name denotes, from allowlisted namespaces only.

    >>> resolve_target("torch.nn.functional.relu") is torch.nn.functional.relu
    True
    """
    if not isinstance(name, str):
        raise LoweringError(f"{where}: call target must be a string, got {name!r}")
    if name.startswith("operator."):
        name = "_" + name
    if name in _DENIED:
        raise LoweringError(f"{where}: {name} is never called from a loaded artifact")
    if name in _EXACT:
        return _EXACT[name]
    parts = name.split(".")
    if any(not p.isidentifier() for p in parts):
        raise LoweringError(f"{where}: target {name!r} is not a plain dotted name")
    if name.startswith("torch.ops."):
        # operator names such as aten.__and__.Tensor are registry keys, not introspection
        return _resolve_op(parts, where)
    if any(p.startswith("__") for p in parts):
        raise LoweringError(f"{where}: target {name!r} is not a plain dotted name")
    if name.startswith("fxopt."):
        return _resolve_fxopt(name, parts, where)
    namespace, attr = ".".join(parts[:-1]), parts[-1]
    if namespace not in _NAMESPACES and _is_trusted(namespace):
        return _resolve_trusted(name, parts, where)
    if namespace not in _NAMESPACES:
        raise LoweringError(f"{where}: target {name} is outside the allowed namespaces")
    if namespace == "torch" and attr.startswith("_") and attr not in _PRIVATE_TORCH_OK:
        if not attr.startswith("_sym_") and getattr(
            torch._C._VariableFunctions, attr, 0
        ) is not getattr(torch, attr, 1):
            raise LoweringError(f"{where}: private function {name} is not allowed")
    fn = getattr(_NAMESPACES[namespace], attr, None)
    if fn is None or not callable(fn) or isinstance(fn, (type, types.ModuleType)):
        raise LoweringError(f"{where}: {name} is not a function in this torch version")
    if _canonical(fn) != name:
        raise LoweringError(f"{where}: {name} is an alias of {_canonical(fn)}")
    return fn


def _canonical(fn: Any) -> str:
    name = _get_qualified_name(fn)
    if "." not in name:
        return f"builtins.{name}"
    return "_" + name if name.startswith("operator.") else name


# fxopt's own custom ops (torch.ops.fxopt.<name>) and the module that registers each: a
# fixed allowlist, so a tampered graph.json cannot trigger any other import
_FXOPT_OPS = {
    "dynamic_int8_linear": "fxopt.quant.dynamic",
    "quantize_dequantize": "fxopt.quant.qdq",
    "dequantize_int32": "fxopt.quant.qdq",
}


def _resolve_op(parts: list[str], where: str) -> Any:
    if any(p.startswith("__") for i, p in enumerate(parts) if i != 3):
        raise LoweringError(f"{where}: target {'.'.join(parts)!r} is not a plain operator name")
    if len(parts) > 3 and parts[2] == "fxopt" and parts[3] in _FXOPT_OPS:
        importlib.import_module(_FXOPT_OPS[parts[3]])
    obj: Any = torch.ops
    try:
        for p in parts[2:]:
            obj = getattr(obj, p)
    except (AttributeError, RuntimeError):
        raise LoweringError(
            f"{where}: operator {'.'.join(parts)} is not registered in this process; import the "
            "library that defines it (or upgrade torch) before loading"
        ) from None
    if not isinstance(obj, _OPERATOR_TYPES):
        raise LoweringError(f"{where}: {'.'.join(parts)} is not an operator")
    return obj


def _resolve_fxopt(name: str, parts: list[str], where: str) -> Any:
    for cut in range(len(parts) - 1, 0, -1):
        try:
            obj: Any = importlib.import_module(".".join(parts[:cut]))
        except ImportError:
            continue
        try:
            for p in parts[cut:]:
                obj = getattr(obj, p)
        except AttributeError:
            break
        if callable(obj):
            return obj
    raise LoweringError(f"{where}: {name} does not exist in this fxopt version")


# --------------------------------------------------------------------------- trusted modules

_TRUSTED: contextvars.ContextVar[tuple[str, ...]] = contextvars.ContextVar(
    "fxopt_trusted", default=()
)
# modules whose functions reach the file system, processes, imports or arbitrary code: no
# artifact may declare them (torch is covered by the allowlist above, with its denials)
_NEVER_TRUSTED = set(
    "builtins os posix nt sys subprocess importlib pickle marshal shutil socket ctypes runpy "
    "code codeop io pathlib tempfile types inspect gc operator _operator functools torch "
    "multiprocessing threading signal pty platform urllib http ftplib smtplib".split()
)


def check_trusted(prefixes: Any, where: str = "trusted") -> tuple[str, ...]:
    """``prefixes`` as a tuple of dotted module names, refusing anything that is not one or
    that would open the file system, processes or imports to an artifact.

    >>> check_trusted(["mylib.ops"])
    ('mylib.ops',)
    >>> check_trusted(["os"])
    Traceback (most recent call last):
      ...
    fxopt.errors.LoweringError: trusted: module 'os' can never be trusted by an artifact
    """
    if isinstance(prefixes, str) or not isinstance(prefixes, Sequence):
        raise LoweringError(
            f"{where}: expected a list of module names such as ['mylib.ops'], got {prefixes!r}"
        )
    out = []
    for p in prefixes:
        parts = p.split(".") if isinstance(p, str) else [""]
        if any(not x.isidentifier() or x.startswith("__") for x in parts):
            raise LoweringError(f"{where}: {p!r} is not a dotted module name like 'mylib.ops'")
        if parts[0] in _NEVER_TRUSTED or p == "fxopt":
            raise LoweringError(f"{where}: module {p!r} can never be trusted by an artifact")
        out.append(p)
    return tuple(dict.fromkeys(out))


@contextmanager
def trusting(prefixes: Sequence[str]) -> Iterator[tuple[str, ...]]:
    """Resolve functions under the module ``prefixes`` too, for the duration of the block.

    >>> with trusting(["mylib.ops"]):
    ...     pass
    """
    token = _TRUSTED.set(check_trusted(prefixes))
    try:
        yield _TRUSTED.get()
    finally:
        _TRUSTED.reset(token)


def _is_trusted(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in _TRUSTED.get())


def _resolve_trusted(name: str, parts: list[str], where: str) -> Any:
    """Import the longest module of ``name`` under a declared prefix, then walk attributes;
    a module outside every declared prefix is never imported."""
    for cut in range(len(parts) - 1, 0, -1):
        module = ".".join(parts[:cut])
        if not _is_trusted(module):
            break
        try:
            obj: Any = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name == module:
                continue
            raise LoweringError(
                f"{where}: trusted module {module} cannot be imported here ({e}); install it "
                "or put it on sys.path before loading"
            ) from e
        try:
            for p in parts[cut:]:
                obj = getattr(obj, p)
        except AttributeError:
            break
        if not callable(obj) or isinstance(obj, (type, types.ModuleType)):
            raise LoweringError(f"{where}: trusted {name} is not a function")
        if _canonical(obj) != name:
            raise LoweringError(f"{where}: trusted {name} is an alias of {_canonical(obj)}")
        return obj
    raise LoweringError(
        f"{where}: {name} does not exist under the trusted modules {list(_TRUSTED.get())}"
    )


# --------------------------------------------------------------------------- names


def check_attr_path(path: str, where: str) -> list[str]:
    """Split a dotted module/attribute path, refusing names unsafe for generated code."""
    parts = path.split(".") if isinstance(path, str) else [""]
    for p in parts:
        if not _COMPONENT.match(p) or p.startswith("__"):
            raise LoweringError(f"{where}: {path!r} is not a plain attribute path")
    return parts


def check_method_name(target: Any, where: str) -> None:
    """Refuse a ``call_method`` name that is not a plain identifier or an arithmetic dunder.

    >>> check_method_name("__class__", "node")
    Traceback (most recent call last):
      ...
    fxopt.errors.LoweringError: node: method name '__class__' is not allowed
    """
    if (
        not isinstance(target, str)
        or not target.isidentifier()
        or (target.startswith("__") and target not in _DUNDER_METHODS)
    ):
        raise LoweringError(f"{where}: method name {target!r} is not allowed")
