"""Helpers the benchmark scripts share: machine facts, ONNX Runtime sessions with one set
of options, table-cell text, command-line parsing, and one fresh process per model."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from fxopt.bench import candidates as _candidates
from fxopt.bench import onnx_runtime as _ort
from fxopt.bench import report as _report

# the ONNX Runtime session options, feeds, machine line and error text live in fxopt.bench
# (``fxopt bench`` needs them too); these names are what the scripts here import
machine = _report.machine
ort_options = _ort.session_options
ort_session = _ort.session
ort_feeds = _ort.ort_feeds


def short_error(e: BaseException, limit: int = 160) -> str:
    """``Type: message`` on one line, cut to ``limit`` characters."""
    return _candidates.error_text(e, limit)


def load_average() -> float:
    """The 1-minute load average (NaN where the OS has none)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def cell(text: str) -> str:
    """``text`` made safe for one markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def spread(values: Sequence[float]) -> str:
    """Per-round ratios, sorted, as ``min / median / max``, e.g. ``"0.98 / 1.21 / 1.40"``."""
    return f"{values[0]:.2f} / {statistics.median(values):.2f} / {values[-1]:.2f}"


# --------------------------------------------------------------------------- command line
def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """The flags every per-model benchmark takes: ``--no-write``, ``--in-process`` and the
    hidden ``--row-json`` a fresh per-model process is started with."""
    parser.add_argument("--no-write", action="store_true",
                        help="print the results without writing benchmarks/RESULTS.md")
    parser.add_argument("--in-process", action="store_true",
                        help="measure every model in this process (default: one fresh "
                             "process per model when there are several)")
    parser.add_argument("--row-json", action="store_true", help=argparse.SUPPRESS)


def parse_models(parser: argparse.ArgumentParser, text: str | None, default: Sequence[str],
                 known: Sequence[str]) -> list[str]:
    """The comma-separated ``--models`` (``default`` when empty), each one of ``known``."""
    names = [n.strip() for n in text.split(",") if n.strip()] if text else list(default)
    unknown = [n for n in names if n not in known]
    if unknown:
        parser.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    return names


def parse_threads(parser: argparse.ArgumentParser, text: str) -> list[int]:
    """The comma-separated positive thread counts of ``--threads``."""
    try:
        counts = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        parser.error(f"--threads takes comma-separated integers, got {text!r}")
    if not counts or min(counts) < 1:
        parser.error("--threads needs positive integers")
    return counts


# --------------------------------------------------------------------------- isolation
def print_row(mark: str, rows: Any) -> None:
    """Hand ``rows`` to the parent process: one stdout line, ``mark`` then JSON."""
    print(mark + json.dumps(rows), flush=True)


def run_isolated(script: str, name: str, mark: str, flags: Sequence[str],
                 relay: str | None = None) -> Any:
    """Run ``script --models name --row-json *flags`` in a fresh Python process and return
    what it printed with ``print_row(mark, ...)``.

    One process per model keeps one model's allocator state, thread pools and caches from
    colouring the next model's numbers. The child finds the same fxopt as this process;
    its stderr lines starting with ``relay`` are passed on (progress), and a failed child
    stops the benchmark with its stderr.
    """
    import fxopt

    cmd = [sys.executable, os.path.abspath(script), "--models", name, "--row-json", *flags]
    root = os.path.dirname(os.path.dirname(os.path.abspath(fxopt.__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    rows = [line[len(mark):] for line in proc.stdout.splitlines() if line.startswith(mark)]
    if relay is not None:
        sys.stderr.write("".join(line + "\n" for line in proc.stderr.splitlines()
                                 if line.startswith(relay)))
    if proc.returncode != 0 or not rows:
        raise SystemExit(f"benchmark of {name} failed (exit {proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    return json.loads(rows[-1])
