"""Pipelines as data: spec strings, lists of passes, TOML recipes, named pipelines.

``"cleanup,prune(ratio=0.5),quantize(scheme=int8)"`` parses to the same thing as
``[Pass("cleanup"), Pass("prune", ratio=0.5), Pass("quantize", scheme="int8")]`` or a
recipe file::

    # recipe.toml
    pipeline = "cleanup"
    [[passes]]
    name = "prune"
    ratio = 0.5
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any

from fxopt.errors import SpecError
from fxopt.passes.base import Pass, known_passes

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

# Named pipelines. Each stage has a comment saying why it is there.
PIPELINES: dict[str, list[str]] = {
    "default": [
        "cleanup",  # drop dropout, identities, x*1 / x+0, redundant casts, dead code
        "fold_constants",  # compute weight-only subgraphs once (re-parametrisations, masks)
        "fold_bn",  # conv/linear + batch norm (and per-channel affine) -> one op
        "cse",  # merge identical pure nodes
        "simplify",  # rules: layout pairs, reshape chains, cat/split, linear chains, activations
        "slice_packed_projections",  # MHA's packed q/k/v split: three slices, not a transpose
        "cleanup",  # remove what the folds and rules left dead
        "flatten_modules",  # one attribute lookup per module/weight in the generated code
    ],
}

PipelineLike = str | os.PathLike | Pass | Iterable[Any] | None


def parse_pipeline(spec: PipelineLike) -> list[Pass]:
    """Turn a spec string, recipe path, Pass or list of those into a list of ``Pass``.

    Example::

        parse_pipeline("cleanup,prune(ratio=0.5)")
        parse_pipeline("recipes/mobile.toml")
    """
    if spec is None:
        return parse_pipeline("default")
    if isinstance(spec, Pass):
        return [spec]
    if isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.endswith(".toml")):
        return load_recipe(spec)
    if isinstance(spec, str):
        return _parse_string(spec)
    passes: list[Pass] = []
    for item in spec:
        passes.extend(parse_pipeline(item))
    return passes


def load_recipe(path: str | os.PathLike) -> list[Pass]:
    """Read a TOML recipe: ``pipeline = "..."`` and/or ``[[passes]]`` tables, in that order."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError as e:
        raise SpecError(f"recipe file {os.fspath(path)!r} does not exist") from e
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"recipe {os.fspath(path)!r} is not valid TOML: {e}") from e
    passes: list[Pass] = []
    if "pipeline" in data:
        passes.extend(parse_pipeline(data["pipeline"]))
    for i, table in enumerate(data.get("passes", [])):
        table = dict(table)
        name = table.pop("name", None)
        if not name:
            raise SpecError(f"recipe {os.fspath(path)!r}: [[passes]] entry {i + 1} has no name")
        passes.append(Pass(name, **table))
    # [lower], [calibration], [finetune] and [tune] describe how ``fxopt tune`` built the
    # artifact (fxopt/tune/recipe.py reads them); the passes are all this function returns
    unknown = set(data) - {"pipeline", "passes", "verify", "lower", "calibration", "finetune",
                           "tune"}
    if unknown:
        raise SpecError(
            f"recipe {os.fspath(path)!r}: unknown key(s) {', '.join(sorted(unknown))}; "
            "use 'pipeline', '[[passes]]', '[verify]' (and a tune recipe's '[lower]', "
            "'[calibration]', '[finetune]', '[tune]')"
        )
    if not passes:
        raise SpecError(f"recipe {os.fspath(path)!r} names no passes")
    return passes


_TOKEN = re.compile(
    r"""\s*(?:(?P<name>[A-Za-z_][\w.\-]*)|(?P<number>[-+]?(?:\d+\.?\d*(?:e[-+]?\d+)?|\.\d+))
    |(?P<string>'[^']*'|"[^"]*")|(?P<punct>[(),=\[\]]))""",
    re.VERBOSE,
)


class _Tokens:
    def __init__(self, text: str):
        self.text, self.items, pos = text, [], 0
        while pos < len(text):
            if text[pos:].strip() == "":
                break
            m = _TOKEN.match(text, pos)
            if not m or m.end() == pos:
                skipped = len(text[pos:]) - len(text[pos:].lstrip())
                self.fail(pos + skipped, "unexpected character")
            kind = m.lastgroup
            start = m.start(kind)
            self.items.append((kind, m.group(kind), start))
            pos = m.end()
        self.i = 0

    def peek(self) -> tuple[str, str, int] | None:
        return self.items[self.i] if self.i < len(self.items) else None

    def take(self) -> tuple[str, str, int]:
        tok = self.peek()
        if tok is None:
            self.fail(len(self.text), "unexpected end of spec")
        self.i += 1
        return tok

    def expect(self, value: str) -> None:
        kind, text, pos = self.take()
        if text != value:
            self.fail(pos, f"expected {value!r}, found {text!r}")

    def fail(self, pos: int, what: str):
        raise SpecError(
            f"pipeline spec position {pos}: {what}\n  {self.text}\n  {' ' * pos}^\n"
            f"known passes: {', '.join(known_passes())}; named pipelines: "
            f"{', '.join(PIPELINES)}"
        )


def _parse_string(text: str) -> list[Pass]:
    toks = _Tokens(text)
    if not toks.items:
        toks.fail(0, "empty pipeline")
    passes: list[Pass] = []
    while True:
        kind, name, pos = toks.take()
        if kind != "name":
            toks.fail(pos, f"expected a pass name, found {name!r}")
        params: dict[str, Any] = {}
        nxt = toks.peek()
        if nxt and nxt[1] == "(":
            toks.take()
            params = _parse_args(toks)
        if name in PIPELINES and not params:
            passes.extend(_parse_string(",".join(PIPELINES[name])))
        elif name not in known_passes():
            toks.fail(pos, f"unknown pass {name!r}")
        else:
            try:
                passes.append(Pass(name, **params))
            except SpecError as e:
                toks.fail(pos, str(e))
        nxt = toks.peek()
        if nxt is None:
            return passes
        if nxt[1] != ",":
            toks.fail(nxt[2], f"expected ',' between passes, found {nxt[1]!r}")
        toks.take()


def _parse_args(toks: _Tokens) -> dict[str, Any]:
    params: dict[str, Any] = {}
    if toks.peek() and toks.peek()[1] == ")":
        toks.take()
        return params
    while True:
        kind, key, pos = toks.take()
        if kind != "name":
            toks.fail(pos, f"expected an argument name, found {key!r}")
        if key in params:
            toks.fail(pos, f"argument {key!r} given twice")
        toks.expect("=")
        params[key] = _parse_value(toks)
        kind, text, pos = toks.take()
        if text == ")":
            return params
        if text != ",":
            toks.fail(pos, f"expected ',' or ')', found {text!r}")


def _parse_value(toks: _Tokens) -> Any:
    kind, text, pos = toks.take()
    if text == "[":
        items = []
        if toks.peek() and toks.peek()[1] == "]":
            toks.take()
            return items
        while True:
            items.append(_parse_value(toks))
            _, sep, spos = toks.take()
            if sep == "]":
                return items
            if sep != ",":
                toks.fail(spos, f"expected ',' or ']', found {sep!r}")
    if kind == "number":
        return float(text) if any(c in text.lower() for c in ".e") else int(text)
    if kind == "string":
        return text[1:-1]
    if kind == "name":
        return {"true": True, "false": False, "none": None}.get(text.lower(), text)
    toks.fail(pos, f"expected a value, found {text!r}")
