"""What ``fxopt.tune`` returns: the loaded winner, its recipe, and a table that says why
every other candidate lost.

Example::

    res = fxopt.tune(model, (x,), budget="cosine>=0.99")
    res.best(x)                 # the chosen artifact, loaded
    print(res.table)            # one row per candidate, with its verdict
    res.save("tuned")           # tuned/model(.onnx), tuned/recipe.toml, tuned/report.*
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class TuneTable:
    """One row per candidate the search built (or left out), winner first.

    ``rows``: dicts with name, pipeline, runtime, status, cosine, max_rel, metric, drop,
    median_ms, speedup (vs the model as given, in PyTorch), build_s, size_bytes, cached,
    verdict. ``settings``: budget, threads, rounds, re-measurement, notes."""

    rows: list[dict[str, Any]]
    settings: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> dict[str, Any]:
        return next(r for r in self.rows if r["name"] == name)

    def __str__(self) -> str:
        head = ("candidate", "status", "cosine", "max_rel", "ms", "speed-up", "verdict")
        lines = [head]
        for r in self.rows:
            lines.append((
                r["name"], r["status"] + (" (cached)" if r.get("cached") else ""),
                _fmt(r.get("cosine"), ".6f"), _fmt(r.get("max_rel"), ".3g"),
                _fmt(r.get("median_ms"), ".3f"), _fmt(r.get("speedup"), ".2f", "x"),
                r.get("verdict", "")))
        widths = [max(len(line[i]) for line in lines) for i in range(len(head) - 1)]
        out = ["  ".join(c.ljust(w) for c, w in zip(line[:-1], widths)) + "  " + line[-1]
               for line in lines]
        s = self.settings
        foot = [f"budget {s.get('budget')}; {s.get('threads')} threads; {s.get('rounds')} "
                f"interleaved rounds; speed-up vs the model as given in PyTorch"]
        rm = s.get("remeasure") or {}
        if rm:
            foot.append(f"re-measured {' vs '.join(rm['candidates'])} in {rm['rounds']} fresh "
                        f"interleaved rounds: runner-up / winner time "
                        f"{rm['runner_time_over_winner']:.3f}, noise ±{rm['noise']:.3f}"
                        f"{' (a tie)' if rm.get('tie') else ''}")
        foot += s.get("notes", [])
        return "\n".join(out + foot)

    table = __str__

    def to_dict(self) -> dict[str, Any]:
        return {"rows": self.rows, "settings": self.settings}


def _fmt(v: Any, spec: str, suffix: str = "") -> str:
    return "" if v is None else f"{v:{spec}}{suffix}"


@dataclass
class TuneResult:
    """``best``: the winner, loaded (callable); ``recipe``: TOML text that rebuilds it
    from the original model (``fxopt.tune.rebuild``); ``table``: ``TuneTable``."""

    best: Any
    recipe: str
    table: TuneTable
    winner: str = ""
    artifact_path: str | None = None

    def save(self, directory: str | os.PathLike) -> Path:
        """Write the artifact (``model.onnx`` or the eager folder ``model/``),
        ``recipe.toml``, ``report.txt`` and ``report.json`` into ``directory``; each file
        goes to a temporary name first and is renamed, so none is left half-written."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        if self.artifact_path is not None:
            src = Path(self.artifact_path)
            dest = out / ("model.onnx" if src.is_file() else "model")
            tmp = out / f".{dest.name}.tmp"
            if src.is_file():  # written through fxopt.lowering: atomic, external data kept
                import fxopt

                fxopt.load(src).save(dest)
            else:
                shutil.rmtree(tmp, ignore_errors=True)
                shutil.copytree(src, tmp)
                shutil.rmtree(dest, ignore_errors=True)
                os.replace(tmp, dest)
        for name, text in (("recipe.toml", self.recipe), ("report.txt", str(self.table) + "\n"),
                           ("report.json", json.dumps(self.table.to_dict(), indent=2,
                                                      default=str))):
            tmp = out / f".{name}.tmp"
            tmp.write_text(text)
            os.replace(tmp, out / name)
        return out


__all__ = ["TuneResult", "TuneTable"]
