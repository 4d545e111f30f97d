"""What pruning changed: params and MACs per layer before/after (counted by
``fxopt.inspect``), the achieved ratios, kept channels per layer, and a PNG bar chart.

Example::

    res = fxopt.optimize(model, (x,), "prune(macs=0.5)")
    stats = res.report.records[-1].stats
    print(fxopt.prune.prune_table(stats))          # layer, params, MACs, channels
    fxopt.prune.plot_kept(stats, "out/kept.png")   # bar chart of kept channels per layer
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch.fx as fx

from fxopt.errors import PassError

_CALLS = ("call_module", "call_function", "call_method")


def layer_counts(gm: fx.GraphModule) -> dict[str, dict[str, Any]]:
    """Params and MACs per layer of an annotated graph, as ``fxopt.inspect`` counts them:
    the rows of its call nodes summed by module path (the node name when there is none).

    >>> layer_counts(gm)["conv1"]  # doctest: +SKIP
    {'kind': 'conv', 'params': 432, 'macs': 442368}
    """
    from fxopt.inspect import inspect  # inspect imports capture, which imports the passes

    out: dict[str, dict[str, Any]] = {}
    for r in inspect(gm).rows:
        if r.op not in _CALLS or not (r.params or r.macs):
            continue
        entry = out.setdefault(r.module_path or r.name, {"kind": r.kind, "params": 0, "macs": 0})
        entry["params"] += r.params
        entry["macs"] += r.macs
    return out


def totals(gm: fx.GraphModule) -> dict[str, int]:
    """``fxopt.inspect``'s totals (each tensor counted once) of an annotated graph."""
    from fxopt.inspect import inspect

    s = inspect(gm)
    return {"params": s.params, "macs": s.macs}


def layer_report(before: dict[str, dict[str, Any]], after: dict[str, dict[str, Any]],
                 channels: dict[str, tuple[int, int]], totals_before: dict[str, int],
                 totals_after: dict[str, int]) -> dict[str, Any]:
    """The JSON-ready report the pass stores in its stats: ``layers`` (one row per layer:
    params/MACs before and after, channels before and after where the layer's output
    channels were pruned), ``totals`` and ``achieved`` (after/before fractions)."""
    rows = []
    for name in [*before, *(k for k in after if k not in before)]:
        b, a = before.get(name, {}), after.get(name, {})
        ch = channels.get(name)
        rows.append({"layer": name, "kind": b.get("kind") or a.get("kind", ""),
                     "params_before": b.get("params", 0), "params_after": a.get("params", 0),
                     "macs_before": b.get("macs", 0), "macs_after": a.get("macs", 0),
                     "channels_before": ch[0] if ch else None,
                     "channels_after": ch[1] if ch else None})
    tot = {"params_before": totals_before["params"], "params_after": totals_after["params"],
           "macs_before": totals_before["macs"], "macs_after": totals_after["macs"]}
    achieved = {k: round(totals_after[k] / totals_before[k], 4) if totals_before[k] else 1.0
                for k in ("params", "macs")}
    return {"layers": rows, "totals": tot, "achieved": achieved}


def _fraction(a: int, b: int) -> str:
    return f"{a / b:.1%}" if b else "-"


def prune_table(stats: dict[str, Any]) -> str:
    """The per-layer table of a ``prune`` record's stats (what the CLI prints): params and
    MACs before -> after, kept channels, and the achieved ratios at the bottom.

    >>> print(prune_table(res.report.records[-1].stats))  # doctest: +SKIP
    layer   kind  params       MACs               channels
    conv1   conv  432 -> 216   442368 -> 221184   16 -> 8
    total         ...
    achieved: params 51.2%, MACs 49.8% of the original; 50.0% of the prunable channels ...
    target 50.0% of MACs, achieved 49.8% (searched ratio 0.412)
    """
    report = stats.get("report")
    if not report:
        return "prune: nothing was removed"
    rows = [("layer", "kind", "params", "MACs", "channels")]
    for r in report["layers"]:
        ch = (f"{r['channels_before']} -> {r['channels_after']}"
              if r["channels_before"] is not None else "")
        if not r.get("exact", True):
            ch = f"{ch} (not exact)".lstrip()
        rows.append((r["layer"], r["kind"], f"{r['params_before']} -> {r['params_after']}",
                     f"{r['macs_before']} -> {r['macs_after']}", ch))
    t = report["totals"]
    rows.append(("total", "", f"{t['params_before']} -> {t['params_after']}",
                 f"{t['macs_before']} -> {t['macs_after']}",
                 f"{stats.get('units_in_pruned_groups', 0)} -> "
                 f"{stats.get('units_in_pruned_groups', 0) - stats.get('units_removed', 0)}"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    pruned = len(stats.get("plan", []))
    achieved = report.get("achieved", {})
    removed = (f"; {achieved['channels_removed']:.1%} of the prunable channels removed"
               if "channels_removed" in achieved else "")
    lines.append(f"achieved: params {_fraction(t['params_after'], t['params_before'])}, "
                 f"MACs {_fraction(t['macs_after'], t['macs_before'])} of the original"
                 f"{removed}; {pruned} of {stats.get('groups', pruned)} groups pruned")
    lines.append(_target_line(stats, report))
    for e in report.get("not_exact", []):
        shown = ", ".join(e["layers"][:4]) + (f", ... ({len(e['layers'])} layers)"
                                              if len(e["layers"]) > 4 else "")
        lines.append(f"NOT EXACT (hidden=True): group {e['group']} ({shown}), "
                     f"{e['removed_units']} of {e['units']} channels removed: {e['reason']}; "
                     "the masked-twin check covers the exact groups only")
    if stats.get("macs_note"):
        lines.append(f"note: {stats['macs_note']}")
    return "\n".join(lines)


def _target_line(stats: dict[str, Any], report: dict[str, Any]) -> str:
    """What was asked next to what was achieved: the MAC target, the ratio, or the plan."""
    target, t = report.get("target", {}), report["totals"]
    got = _fraction(t["macs_after"], t["macs_before"])
    if target.get("plan"):
        return "target: a saved plan, replayed"
    if stats.get("macs_target") is not None:
        return (f"target {stats['macs_target']:.1%} of MACs, achieved {got} (searched ratio "
                f"{stats['ratio']:.3f})")
    if target.get("ratio") is not None:
        got = report["achieved"].get("channels_removed")
        if got is None:
            return f"target ratio {target['ratio']:.3f}"
        why = (" (whole units, round_to, max_layer_ratio or scope=global move it)"
               if abs(got - target["ratio"]) >= 5e-4 else "")
        return (f"target ratio {target['ratio']:.3f} of the channels of each prunable group, "
                f"achieved {got:.3f} overall{why}")
    return "target: -"


def plot_kept(stats: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write a PNG bar chart of the channels each pruned layer keeps (of how many it had)
    from a ``prune`` record's stats; written to a temporary name and renamed, so a failure
    leaves no half-written file. Needs matplotlib (``pip install fxopt[plot]``).

    Example::

        fxopt.prune.plot_kept(res.report.records[-1].stats, "out/kept.png")
    """
    rows = [r for r in (stats.get("report") or {}).get("layers", [])
            if r["channels_before"] is not None]
    if not rows:
        raise PassError("plot_kept: these stats hold no pruned layers (pass the stats of a "
                        "prune record that removed channels: res.report.records[i].stats)")
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise PassError(f"plot_kept writes a PNG: give a path ending in .png, not {str(path)!r}")
    if not path.parent.is_dir():
        raise PassError(f"plot_kept: folder {str(path.parent)!r} does not exist")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PassError("plot_kept needs matplotlib: pip install 'fxopt[plot]'") from None
    names = [r["layer"] for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.35 * len(rows) + 2), 4.5))
    try:
        x = range(len(rows))
        ax.bar(x, [r["channels_before"] for r in rows], color="#d0d0d0", label="before")
        ax.bar(x, [r["channels_after"] for r in rows], color="#3a7bd5", label="kept")
        ax.set_xticks(list(x), names, rotation=75, ha="right", fontsize=7)
        ax.set_ylabel("output channels")
        achieved = (stats.get("report") or {}).get("achieved", {})
        ax.set_title(f"kept channels per layer\nparams {achieved.get('params', 1):.1%}, "
                     f"MACs {achieved.get('macs', 1):.1%} of the original", fontsize=10)
        ax.legend()
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=100)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)
    return path


__all__ = ["layer_counts", "layer_report", "plot_kept", "prune_table", "totals"]
