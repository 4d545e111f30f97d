"""Pruning coverage: every zoo model in both capture forms, and the Hugging Face architectures
of tests/real_architectures.py, pruned at ``prune(ratio=0.5)``: groups found / prunable /
refused (and why), the masked-twin error rebuilt from the plan alone, and whether the pruned
graph exports to ONNX and verifies in ONNX Runtime.

Run:  .venv/bin/python benchmarks/prune_coverage.py            (rewrites its section)
      .venv/bin/python benchmarks/prune_coverage.py --no-hf --no-write

*twin error*: the relative error between the pruned graph and ``fxopt.prune.masked_twin``
(the user's original model with only the plan's consumer slices zeroed, located by
state_dict key, dim and indices) on fresh inputs; EXACT tolerance is 1e-4. *refused*: the
groups the pass leaves whole, counted by reason, with node names replaced by ``·``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time
from collections import Counter

import torch

import fxopt
from fxopt import zoo
from fxopt.prune import masked_twin
from fxopt.verify import EXACT, compare_outputs

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from results_file import publish  # noqa: E402

SPEC = "prune(ratio=0.5)"
_NAME = re.compile(r"\b[A-Za-z_][\w.]*?_\d+\b|\b[a-z]\w*\.\w[\w.]*\b")


def _fresh(inputs: tuple) -> tuple:
    """Other inputs of the same shapes and dtypes (ids within the examples' range)."""
    gen = torch.Generator().manual_seed(123)
    out = []
    for x in inputs:
        if x.is_floating_point():
            out.append(torch.randn(x.shape, generator=gen, dtype=x.dtype))
        else:
            out.append(torch.randint(int(x.min()), int(x.max()) + 1, x.shape, generator=gen,
                                     dtype=x.dtype))
    return tuple(out)


def reason_kind(reason: str, names: set[str]) -> str:
    """A refusal reason without its node / tensor names, so that reasons can be counted.
    Reasons read ``"<node> ..."`` or ``"<kind> op <node> ..."`` / ``"<kind> <node> ..."``:
    a word right before ``op`` or before another name is the op kind and stays, and so
    does the object of ``"the graph output"`` / ``"one index"``.

    >>> reason_kind("mul op mul declares no channel flow", {"mul", "x"})
    'mul op · declares no channel flow'
    >>> reason_kind("output reaches the graph output", {"output"})
    '· reaches the graph output'
    """
    words = reason.split()

    def is_name(w: str) -> bool:
        return w in names or bool(_NAME.fullmatch(w))

    out = []
    for i, w in enumerate(words):
        after = words[i + 1] if i + 1 < len(words) else ""
        before = words[i - 1] if i else ""
        keep = after == "op" or is_name(after) or before in ("graph", "one")
        out.append("·" if is_name(w) and not keep else w)
    return " ".join(out)


def _summary(refused: list[dict], names: set[str], top: int = 3) -> str:
    counts = Counter(reason_kind(r["reasons"][0], names) for r in refused)
    parts = [f"{n}× {why}" for why, n in counts.most_common(top)]
    rest = sum(counts.values()) - sum(n for _, n in counts.most_common(top))
    return "; ".join(parts) + (f"; {rest} other" if rest else "")


def row(label: str, mode: str, model, inputs: tuple, fresh: tuple) -> dict:
    """One coverage row: prune ``model`` at ratio 0.5 in ``mode``, check the plan's twin,
    export the pruned graph to ONNX (verified by fxopt.lower in ONNX Runtime)."""
    out = {"model": label, "mode": mode}
    start = time.perf_counter()
    try:
        res = fxopt.optimize(model, inputs, SPEC, mode=mode)
    except Exception as e:  # noqa: BLE001 - a crash is a coverage row too
        return out | {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
    record = res.report.records[-1]
    stats = record.stats
    names = {n.name for n in res.module.graph.nodes}
    plan = json.loads(json.dumps(stats.get("plan", [])))
    out |= {"groups": stats["groups"], "prunable": stats["prunable"],
            "refused": len(stats["refused"]), "why": _summary(stats["refused"], names),
            "params": record.params[1] / record.params[0],
            "macs": record.macs[1] / record.macs[0] if record.macs[0] else 1.0,
            "exact": all(g["exact"] for g in plan), "seconds": time.perf_counter() - start}
    with torch.no_grad():
        got = res.module(*fresh)
        want = masked_twin(model, plan)(*fresh)
    report = compare_outputs(want, got, EXACT)
    out["twin"] = report.rel if report.ok(EXACT) else f"FAIL {report.rel:.2g}"
    with tempfile.TemporaryDirectory() as d:
        try:
            art = fxopt.lower(res.module, "onnx", inputs, path=os.path.join(d, "m.onnx"))
            worst = max(c["max_rel"] for c in art.manifest["verified"].values())
            out["onnx"] = f"yes ({worst:.1e})"
        except Exception as e:  # noqa: BLE001 - a crash is a coverage row too
            out["onnx"] = f"no: {type(e).__name__}: {str(e).splitlines()[0][:100]}"
    return out


def zoo_rows(heavy: bool) -> list[dict]:
    rows = []
    for name in zoo.names(include_heavy=heavy):
        spec = zoo.get(name)
        model, inputs = zoo.load(name)
        for mode in ("symbolic", "export"):
            if mode == "symbolic" and not spec.symbolic:
                rows.append({"model": name, "mode": mode,
                             "error": "not symbolically traceable (data-dependent control "
                                      "flow): torch.export only"})
                continue
            rows.append(row(name, mode, model, inputs, _fresh(inputs)))
            print(rows[-1], flush=True)
    return rows


def hf_rows() -> list[dict]:
    sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
    from real_architectures import ARCHITECTURES

    rows = []
    for name, arch in ARCHITECTURES.items():
        model = arch.build()
        rows.append(row(f"HF {name} ({arch.model_class})", "auto", model, arch.make_inputs(),
                        arch.make_inputs(batch=2, seed=1)))
        print(rows[-1], flush=True)
    return rows


def table(rows: list[dict]) -> list[str]:
    lines = ["| model | capture | groups | prunable | refused | params kept | MACs kept "
             "| twin error | ONNX verified | refused because |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['mode']} | – | – | – | – | – | – | – "
                         f"| {r['error']} |")
            continue
        twin = r["twin"] if isinstance(r["twin"], str) else f"{r['twin']:.1e}"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['groups']} | {r['prunable']} | {r['refused']} "
            f"| {r['params']:.2f} | {r['macs']:.2f} | {twin} | {r['onnx']} | {r['why'] or '–'} |")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-hf", action="store_true", help="zoo models only")
    ap.add_argument("--no-heavy", action="store_true", help="leave out resnet50")
    ap.add_argument("--no-write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    rows = zoo_rows(heavy=not args.no_heavy)
    if not args.no_hf:
        rows += hf_rows()
    flags = " ".join(f for f, on in (("--no-hf", args.no_hf), ("--no-heavy", args.no_heavy))
                     if on)
    ok = sum(1 for r in rows if "error" not in r and not str(r["twin"]).startswith("FAIL")
             and r["onnx"].startswith("yes"))
    lines = ["## Pruning coverage: groups, masked twin, ONNX", "",
             f"`python benchmarks/prune_coverage.py {flags}`".replace(" `", "`") +
             f" on {platform.machine()}, torch {torch.__version__}, `{SPEC}`; capture "
             "`auto` for the Hugging Face architectures (tests/real_architectures.py: small "
             "configs, random weights). *twin error*: pruned graph vs the user's model with "
             "only the plan's consumer slices zeroed (from the JSON plan alone), fresh "
             "inputs, relative; *ONNX verified*: `fxopt.lower(..., 'onnx')` checked in ONNX "
             "Runtime (worst relative error); *refused because*: first reason per refused "
             "group, counted (node names as `·`).", "",
             f"{ok} of {len(rows)} rows prune, match their masked twin and verify in ONNX "
             f"Runtime ({time.perf_counter() - start:.0f} s in all).", ""]
    publish("prune-coverage", "\n".join(lines + table(rows)), write=not args.no_write)


if __name__ == "__main__":
    main()
