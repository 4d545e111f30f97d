"""The result of ``fxopt.bench.compare``: one ``Row`` per candidate, the noise seen, the
settings; as a terminal table, JSON, and a PNG of latency against accuracy with the
Pareto front marked.

Example::

    res = fxopt.bench.compare(model, (x,))
    print(res.table())
    res.to_json("bench.json")
    res.plot("bench.png")
    res.pareto()          # names on the front: nothing else is both faster and closer
"""

from __future__ import annotations

import json
import math
import os
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fxopt.errors import SpecError

__all__ = ["SCHEMA_VERSION", "BenchResult", "Row", "machine"]

SCHEMA_VERSION = 1
COSINE_TIE = 1e-6


def machine() -> str:
    """CPU model name and count, e.g. ``"AMD EPYC 7B13, 2 CPUs"``.

    Example::

        machine()
    """
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       cpu)
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} CPUs"


@dataclass
class Row:
    """One candidate's figures. ``status``: ok | failed | skipped (``error`` says why);
    times in ms per call (median, p10, p90 over ``n`` calls of all rounds); ``speedup``:
    PyTorch eager median / this median (with the per-round ``speedup_min`` / ``_max``);
    ``cosine`` / ``max_rel``: agreement with the model; ``metric`` / ``metric_drop``: the
    user's metric and reference minus it; sizes in bytes; ``build_s`` in seconds.

    Example::

        row = res.row("ort-plain"); row.median_ms, row.speedup
    """

    name: str
    runtime: str
    pipeline: str | None
    baseline: str | None
    status: str
    build_s: float | None = None
    size_bytes: int | None = None
    peak_mem_bytes: int | None = None
    error: str | None = None
    key: str | None = None
    median_ms: float | None = None
    p10_ms: float | None = None
    p90_ms: float | None = None
    n: int | None = None
    speedup: float | None = None
    speedup_min: float | None = None
    speedup_max: float | None = None
    cosine: float | None = None
    max_rel: float | None = None
    metric: float | None = None
    metric_drop: float | None = None

    @property
    def timed(self) -> bool:
        return self.status == "ok" and self.median_ms is not None


def _num(v: Any) -> Any:
    """JSON has no NaN / inf: they become None (the row's error or status says why)."""
    return None if isinstance(v, float) and not math.isfinite(v) else v


def _mb(n: int | None) -> str:
    return "" if n is None else f"{n / 2**20:.1f}"


@dataclass
class BenchResult:
    """Rows, noise and settings of one side-by-side run (see ``compare``).

    Example::

        res.row("torch").median_ms, res.noise["worst_round_spread"], res.settings["threads"]
    """

    rows: list[Row]
    noise: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)

    def row(self, name: str) -> Row:
        """The row called ``name`` (``KeyError`` naming the rows otherwise)."""
        for r in self.rows:
            if r.name == name:
                return r
        raise KeyError(f"no row {name!r}; rows: {', '.join(r.name for r in self.rows)}")

    def accuracy_key(self) -> str:
        """``"metric"`` when a user metric was measured, else ``"cosine"``."""
        return "metric" if any(r.metric is not None for r in self.rows) else "cosine"

    def pareto(self) -> list[str]:
        """Timed candidates no other timed one beats on both latency and accuracy (the
        metric if measured, else cosine; higher is better), fastest first.

        Example::

            res.pareto()   # ['ort-fxopt-int8', 'ort-fxopt-fp32']
        """
        key = self.accuracy_key()
        pts = [(r.median_ms, getattr(r, key), r.name) for r in self.rows
               if r.timed and getattr(r, key) is not None and math.isfinite(getattr(r, key))]
        # cosines closer than COSINE_TIE (float32 rounding: 1.0 vs 0.99999994) are a tie
        eps = COSINE_TIE if key == "cosine" else 0.0
        front = [p for p in pts if not any(
            q[0] <= p[0] and q[1] >= p[1] - eps and (q[0] < p[0] or q[1] > p[1] + eps)
            for q in pts)]
        return [p[2] for p in sorted(front)]

    # ------------------------------------------------------------------ text
    def table(self) -> str:
        """The terminal table: one line per candidate, failures with their error.

        Example::

            print(res.table())
        """
        s = self.settings
        front = set(self.pareto())
        has_metric = self.accuracy_key() == "metric"
        head = ["candidate", "median ms", "p10-p90 ms", "speed-up [round min-max]", "cosine",
                "max rel", *(["metric", "drop"] if has_metric else []), "size MB", "peak MB",
                "build s", "pareto"]
        lines = [head]
        for r in self.rows:
            if not r.timed:
                lines.append([r.name, f"{r.status}: {r.error or '?'}"])
                continue
            sp = ("" if r.speedup is None else
                  f"{r.speedup:.2f}x [{r.speedup_min:.2f}-{r.speedup_max:.2f}]")
            lines.append([
                r.name, f"{r.median_ms:.3f}", f"{r.p10_ms:.3f}-{r.p90_ms:.3f}", sp,
                "" if r.cosine is None else f"{r.cosine:.5f}",
                "" if r.max_rel is None else f"{r.max_rel:.2e}",
                *([f"{r.metric:.4f}" if r.metric is not None else "",
                   f"{r.metric_drop:+.4f}" if r.metric_drop is not None else ""]
                  if has_metric else []),
                _mb(r.size_bytes), _mb(r.peak_mem_bytes),
                "" if r.build_s is None else f"{r.build_s:.1f}", "*" if r.name in front else ""])
        full = [ln for ln in lines if len(ln) == len(head)]
        widths = [max(len(ln[i]) for ln in full) for i in range(len(head))]
        text = [f"{s.get('model', '?')}: inputs {', '.join(s.get('inputs', []))}; "
                f"{s.get('threads')} threads, {s.get('rounds')} interleaved rounds after "
                f"{s.get('warmup')} warm-up calls; {s.get('machine', '')}"]
        for ln in lines:
            if len(ln) == len(head):
                text.append("  ".join(c.ljust(w) for c, w in zip(ln, widths)).rstrip())
            else:
                text.append(f"{ln[0].ljust(widths[0])}  {ln[1]}")
        n = self.noise
        if n.get("worst_round_spread") is not None:
            text.append(f"noise: per-round medians of one candidate differ by up to "
                        f"{100 * n['worst_round_spread']:.0f}%; load average "
                        f"{_fmt(n.get('load_before'))} before, {_fmt(n.get('load_after'))} after")
        return "\n".join(text)

    __str__ = table

    # ------------------------------------------------------------------ json
    def to_dict(self) -> dict:
        """Everything as plain JSON-able data (``schema``: ``SCHEMA_VERSION``).

        Example::

            res.to_dict()["rows"][0]["median_ms"]
        """
        return {"schema": SCHEMA_VERSION, "settings": self.settings,
                "noise": self.noise, "pareto": self.pareto(),
                "rows": [{k: _num(v) for k, v in asdict(r).items()} for r in self.rows]}

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write ``to_dict()`` as JSON to ``path`` (atomically); returns the path.

        Example::

            res.to_json("bench-out/bench.json")
        """
        return _write(Path(path), json.dumps(self.to_dict(), indent=2, default=str) + "\n")

    # ------------------------------------------------------------------ plot
    def plot(self, path: str | os.PathLike, title: str | None = None) -> Path:
        """A PNG of latency (x, log scale) against accuracy (y: 1 - cosine on a log
        scale, or the metric), every timed candidate labelled, the Pareto front drawn;
        failed and skipped ones are listed under the axes. Needs matplotlib.

        Example::

            res.plot("bench-out/bench.png")
        """
        path = Path(path)
        if path.suffix.lower() != ".png":
            raise SpecError(f"plot path {str(path)!r}: give a .png file")
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise SpecError(f"the bench plot needs matplotlib ({e}); pip install matplotlib"
                            ) from e
        key = self.accuracy_key()
        front = self.pareto()
        rows = [r for r in self.rows if r.timed and getattr(r, key) is not None
                and math.isfinite(getattr(r, key))]

        def y_of(r: Row) -> float:
            return getattr(r, key) if key == "metric" else max(1.0 - r.cosine, 1e-9)

        fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
        for r in rows:
            on = r.name in front
            ax.scatter(r.median_ms, y_of(r), s=60 if on else 30,
                       color="tab:red" if on else "tab:blue", zorder=3)
            ax.annotate(r.name, (r.median_ms, y_of(r)), textcoords="offset points",
                        xytext=(5, 4), fontsize=8)
        pts = sorted((r.median_ms, y_of(r)) for r in rows if r.name in front)
        if len(pts) > 1:
            ax.step([p[0] for p in pts], [p[1] for p in pts], where="post", color="tab:red",
                    alpha=0.6, label="Pareto front")
            ax.legend(loc="best", fontsize=8)
        ax.set_xscale("log")
        if key == "metric":
            ax.set_ylabel("metric (higher is better)")
        else:
            ax.set_yscale("log")
            ax.set_ylabel("1 - cosine vs the model (lower is better)")
        ax.set_xlabel("median latency per call, ms (log)")
        s = self.settings
        ax.set_title(title or f"{s.get('model', 'model')}: batch {s.get('batch')}, "
                     f"{s.get('threads')} threads", fontsize=10)
        ax.grid(True, which="both", alpha=0.3)
        missing = [f"{r.name}: {r.status}" for r in self.rows if not r.timed]
        if missing:
            fig.text(0.01, 0.01, "not timed: " + "; ".join(missing), fontsize=7, wrap=True)
        fig.tight_layout(rect=(0, 0.05 if missing else 0, 1, 1))
        tmp = path.with_name(path.name + ".tmp.png")
        fig.savefig(tmp)
        plt.close(fig)
        tmp.replace(path)
        return path

    def write(self, out_dir: str | os.PathLike) -> dict[str, Path]:
        """bench.json, bench.png (when matplotlib is installed) and table.txt in
        ``out_dir``; returns what was written.

        Example::

            res.write("bench-out/resnet")
        """
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"json": self.to_json(out / "bench.json"),
                 "table": _write(out / "table.txt", self.table() + "\n")}
        try:
            files["png"] = self.plot(out / "bench.png")
        except SpecError:
            pass  # no matplotlib: the JSON and the table still say everything
        return files


def _fmt(v: float | None) -> str:
    return "?" if v is None else f"{v:.2f}"


def _write(path: Path, text: str) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
