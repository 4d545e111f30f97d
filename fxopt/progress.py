"""Progress for long work (calibration, sensitivity and fallback sweeps, ONNX export and
verification), through one library: tqdm, on stderr.

The library prints nothing unless asked. ``show_progress(True)`` (what the ``fxopt``
command does) turns bars on where stderr is a terminal, and they stay quiet when it is
not (a log file, CI); ``show_progress("always")`` shows them anywhere. A function with a
``progress=`` argument takes the same values for one call, and ``None`` (its default)
follows the process-wide setting.

Example::

    import fxopt.progress
    fxopt.progress.show_progress(True)
    for batch in fxopt.progress.bar(batches, "calibrating", unit="batch"):
        ...
    with fxopt.progress.stage("exporting to ONNX"):
        ...
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any, Literal, TypeVar

from tqdm import tqdm

from fxopt.errors import SpecError

Mode = bool | Literal["always"] | None  # None: the process-wide setting
T = TypeVar("T")

_MODE: bool | str = False


def show_progress(mode: bool | Literal["always"] = True) -> bool | str:
    """Set the process-wide progress mode: ``False`` (quiet, the default), ``True`` (bars
    when stderr is a terminal) or ``"always"``; returns the previous mode.

    >>> previous = show_progress(True)
    >>> show_progress(previous)
    True
    """
    global _MODE
    if mode not in (False, True, "always"):
        raise SpecError(f"progress takes False, True or 'always', not {mode!r}")
    previous, _MODE = _MODE, mode
    return previous


def _disable(mode: Mode) -> bool | None:
    """tqdm's ``disable``: True (quiet), None (quiet unless stderr is a terminal), False."""
    mode = _MODE if mode is None else mode
    if mode not in (False, True, "always"):
        # a callable (fxopt.optimize(progress=print)) asks for progress too
        mode = True if callable(mode) else bool(mode)
    return {False: True, True: None, "always": False}[mode]


def bar(iterable: Iterable[T] | None = None, desc: str = "", *, total: int | None = None,
        unit: str = "it", progress: Mode = None) -> Any:
    """A tqdm bar over ``iterable`` (or a manual one with ``total``), on stderr, shown per
    ``progress`` / the process-wide mode and gone when done.

    >>> [x for x in bar(range(3), "counting")]
    [0, 1, 2]
    """
    return tqdm(iterable, desc=desc, total=total, unit=unit, leave=False, file=sys.stderr,
                disable=_disable(progress), dynamic_ncols=True)


@contextlib.contextmanager
def stage(desc: str, *, progress: Mode = None) -> Iterator[None]:
    """A named stage of long work, shown as a one-step bar while it runs.

    >>> with stage("exporting to ONNX"):
    ...     pass
    """
    with bar(desc=desc, total=1, unit="stage", progress=progress) as b:
        yield
        b.update(1)


__all__ = ["bar", "show_progress", "stage"]
