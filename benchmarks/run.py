"""Run the benchmark suite: every script in benchmarks/ that defines ``main``, each in a fresh
process, each rewriting its own sections of benchmarks/RESULTS.md.

Run:  .venv/bin/python benchmarks/run.py            (all of them: ``make bench``; long)
      .venv/bin/python benchmarks/run.py --list     (name, sections, first docstring line)
      .venv/bin/python benchmarks/run.py --only latency --only half

Scripts are found, not listed here: a new ``benchmarks/NAME.py`` with a top-level ``main``
joins the suite. Modules without ``main`` (``bench_support``, ``results_file``) are helpers.
A script that fails is reported and the others still run; the exit status is 1 if any failed.

Example::

    $ python benchmarks/run.py --list
    capture            capture, verification_cost  Capture coverage and time ...
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
_WRITERS = ("write_section", "publish")


@dataclass(frozen=True)
class Script:
    """One benchmark script: its name (the file stem), path, sections and summary line."""

    name: str
    path: Path
    sections: tuple[str, ...]
    summary: str


def discover(folder: Path = HERE) -> list[Script]:
    """The benchmark scripts in ``folder``, by name: files with a top-level ``def main``.

    Read with ``ast`` (nothing is imported), so listing is instant and cannot fail on a
    missing optional backend.

    >>> [s.name for s in discover()][:2]  # doctest: +SKIP
    ['capture', 'half']
    """
    found = []
    for path in sorted(folder.glob("*.py")):
        if path.resolve() == Path(__file__).resolve():
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if not any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
            continue
        doc = (ast.get_docstring(tree) or "").strip().splitlines()
        found.append(Script(path.stem, path, _sections(tree), doc[0] if doc else ""))
    return found


def _sections(tree: ast.Module) -> tuple[str, ...]:
    """Names passed to ``write_section`` / ``publish`` in the script: string literals, or
    module-level string constants (``SECTION = "dynamic-batch"``)."""
    constants = {
        target.id: node.value.value
        for node in tree.body if isinstance(node, ast.Assign)
        and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)
        for target in node.targets if isinstance(target, ast.Name)
    }
    names = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and node.args):
            continue
        func = node.func.id if isinstance(node.func, ast.Name) else getattr(node.func, "attr", "")
        first = node.args[0]
        if isinstance(first, ast.Constant) and isinstance(first.value, str):
            name = first.value
        elif isinstance(first, ast.Name):
            name = constants.get(first.id)
        else:
            name = None
        if func in _WRITERS and name is not None and name not in names:
            names.append(name)
    return tuple(names)


def select(scripts: list[Script], only: list[str] | None) -> list[Script]:
    """``scripts`` restricted to the names in ``only`` (comma lists allowed), in suite order;
    an unknown name is a ``SystemExit`` that lists the known ones."""
    if not only:
        return scripts
    wanted = [n.strip() for item in only for n in item.split(",") if n.strip()]
    by_name = {s.name: s for s in scripts}
    unknown = [n for n in wanted if n not in by_name]
    if unknown:
        raise SystemExit(
            f"run.py: unknown benchmark {', '.join(map(repr, unknown))}; "
            f"known: {', '.join(by_name)} (see --list)"
        )
    return [s for s in scripts if s.name in wanted]


def main(argv: list[str] | None = None, folder: Path = HERE) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list the scripts and exit")
    parser.add_argument("--only", action="append", metavar="NAME",
                        help="run only this script (repeatable, or a comma list)")
    args = parser.parse_args(argv)
    scripts = select(discover(folder), args.only)
    if args.list:
        width = max((len(s.name) for s in scripts), default=0)
        for s in scripts:
            sections = ", ".join(s.sections) or "-"
            print(f"{s.name:<{width}}  [{sections}]  {s.summary}")
        return 0
    failed = []
    for i, s in enumerate(scripts, 1):
        print(f"[{i}/{len(scripts)}] {s.name}: {s.summary}", flush=True)
        start = time.perf_counter()
        code = subprocess.call([sys.executable, str(s.path)], cwd=folder.parent)
        took = time.perf_counter() - start
        print(f"[{i}/{len(scripts)}] {s.name}: {'ok' if code == 0 else f'exit {code}'} "
              f"in {took:.0f} s", flush=True)
        if code != 0:
            failed.append(s.name)
    if failed:
        print(f"failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
