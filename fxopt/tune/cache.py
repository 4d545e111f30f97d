"""The tuner's disk cache: one JSON record per built candidate (keyed by
``Candidate.key()``) beside its artifact, so an interrupted search resumes without
rebuilding what it already built and judged.

A record is written once the candidate is built *and* its accuracy is judged, to a
temporary name and renamed: an interruption leaves either a whole record or none.

Example::

    cache = Cache("tune-cache")
    rec = cache.get(candidate)            # None, or the dict saved by cache.put
    cache.put(candidate, {"status": "accepted", ...})
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from fxopt.errors import SpecError

FORMAT = 1


class Cache:
    """Records under ``root/records``, artifacts under ``root/builds/<key>``; ``root=None``
    keeps everything in a temporary folder removed by ``close()``."""

    def __init__(self, root: str | os.PathLike | None):
        self._tmp = None
        if root is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="fxopt-tune-")
            root = self._tmp.name
        self.root = Path(root)
        if self.root.exists() and not self.root.is_dir():
            raise SpecError(f"tune cache {self.root} exists and is not a folder")
        (self.root / "records").mkdir(parents=True, exist_ok=True)
        (self.root / "builds").mkdir(parents=True, exist_ok=True)

    def workdir(self, key: str) -> Path:
        return self.root / "builds" / key

    def _file(self, key: str) -> Path:
        return self.root / "records" / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        f = self._file(key)
        if not f.is_file():
            return None
        try:
            rec = json.loads(f.read_text())
        except ValueError:
            return None  # unreadable (written by something else): build it again
        return rec if rec.get("format") == FORMAT else None

    def put(self, key: str, record: dict[str, Any]) -> None:
        f = self._file(key)
        tmp = f.with_suffix(".json.tmp")
        tmp.write_text(json.dumps({"format": FORMAT, **record}, indent=1, default=str))
        os.replace(tmp, f)

    def close(self) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


__all__ = ["Cache"]
