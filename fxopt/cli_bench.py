"""``fxopt bench``: every candidate artifact of a model measured side by side.

    fxopt bench resnet                         # table, bench-out/resnet/bench.{json,png}
    fxopt bench my.py:build --input-shape 1,3,224,224 --threads 2 --batch 8
    fxopt bench resnet --candidates torch,ort-plain,ort-fxopt-int8 --rounds 10
    fxopt bench mlp --val-data data.py:val_batches --metric metrics.py:top1
    fxopt bench --zoo -o bench-out             # every zoo model, one folder each
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fxopt.errors import SpecError

# defaults chosen so that `fxopt bench --zoo` stays under 5 minutes on a 2-core machine
DEFAULT_ROUNDS, DEFAULT_WARMUP = 3, 2
# one thread: with torch's default (every core) on a loaded 2-core machine, OpenMP workers
# spin-wait against other processes and eager calls slow down 10-100x (measured: --zoo
# 383 s wall at load 6.5 with 2 threads, 209 s with 1)
DEFAULT_THREADS = 1


def _say(msg: str) -> None:
    print(f"  {msg}", file=sys.stderr, flush=True)


def _factory(flag: str, spec: str) -> Any:
    from fxopt.cli import import_attr  # cli imports this module

    return import_attr(flag, spec)


def load_metric(spec: str) -> Callable[[Any, Any], float]:
    """``--metric pkg.mod:fn``: a callable ``fn(outputs, target) -> float`` (higher is
    better).

    Example::

        metric = load_metric("metrics.py:top1")
    """
    fn = _factory("--metric", spec)
    if not callable(fn):
        raise SpecError(f"--metric {spec}: {type(fn).__name__} is not callable; give a "
                        "function fn(outputs, target) -> float")
    return fn


def load_val_data(spec: str) -> list:
    """``--val-data file.py:factory``: the factory returns an iterable of ``(inputs,
    target)`` batches (``inputs`` a tensor or a tuple of tensors); they are checked here.

    Example::

        batches = load_val_data("data.py:val_batches")
    """
    from fxopt.bench.accuracy import split_batch

    made = _factory("--val-data", spec)
    try:
        made = made() if callable(made) else made
        batches = list(made)
    except TypeError as e:
        raise SpecError(f"--val-data {spec}: the factory must return an iterable of "
                        f"(inputs, target) batches ({e})") from e
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise SpecError(f"--val-data {spec}: the factory raised {type(e).__name__}: {e}") from e
    if not batches:
        raise SpecError(f"--val-data {spec}: the factory yielded no batches")
    for i, b in enumerate(batches):
        try:
            split_batch(b)
        except SpecError as e:
            raise SpecError(f"--val-data {spec}: batch {i}: {e}") from None
    return batches


def _names(text: str | None) -> list[str] | None:
    if text is None:
        return None
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SpecError("--candidates is empty; give comma-separated names, e.g. "
                        "torch,ort-plain,ort-fxopt-int8")
    return names


def _check_args(args: argparse.Namespace) -> None:
    if args.zoo and args.spec:
        raise SpecError("give either SPEC or --zoo, not both")
    if not args.zoo and not args.spec:
        raise SpecError("give a model SPEC (zoo name, file.py:factory) or --zoo")
    for flag, value, low in (("--rounds", args.rounds, 1), ("--warmup", args.warmup, 0),
                             ("--threads", args.threads, 1), ("--batch", args.batch, 1),
                             ("--build-threads", args.build_threads, 1),
                             ("--calibration-batches", args.calibration_batches, 1)):
        if value is not None and value < low:
            raise SpecError(f"{flag} must be >= {low}, got {value}")
    if (args.val_data is None) != (args.metric is None):
        raise SpecError("--val-data and --metric go together: pass both or neither")
    if args.zoo and (args.input_shape or args.calibration_data or args.val_data):
        raise SpecError("--zoo uses each zoo model's own inputs; --input-shape, "
                        "--calibration-data and --val-data need a single SPEC")
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise SpecError(f"-o {args.output}: exists and is not a folder")


def _one(spec: str, args: argparse.Namespace, out_dir: Path, candidates: list | None,
         extra: dict) -> Any:
    import fxopt.bench
    from fxopt.cli import load_calibration, load_spec

    model, inputs, name = load_spec(spec, args.input_shape)
    calibration = None
    if args.calibration_data:
        calibration = load_calibration(args.calibration_data, inputs, args.calibration_batches)
    _say(f"{name}: benchmarking")
    res = fxopt.bench.compare(
        model, inputs, candidates, rounds=args.rounds, warmup=args.warmup,
        threads=args.threads, batch=args.batch, calibration=calibration,
        out_dir=out_dir, compile=args.compile, build_threads=args.build_threads, name=name,
        progress=_say, **extra)
    print(res.table())
    print(f"wrote {out_dir / 'bench.json'}, {out_dir / 'bench.png'}, {out_dir / 'table.txt'}")
    return res


def cmd_bench(args: argparse.Namespace) -> int:
    """Run ``fxopt bench`` (one SPEC or ``--zoo``); exit 1 when nothing could be timed."""
    _check_args(args)
    candidates = _names(args.candidates)
    extra: dict = {}
    if args.val_data:
        extra = {"val_data": load_val_data(args.val_data), "metric": load_metric(args.metric)}
    out = Path(args.output)
    if not args.zoo:
        res = _one(args.spec, args, out, candidates, extra)
        return 0 if any(r.timed for r in res.rows) else 1
    from fxopt import zoo

    names = zoo.names(include_heavy=args.heavy)
    if candidates is not None:  # fail on a bad name before building anything
        from fxopt.bench.compare import select_candidates

        model, inputs = zoo.load(names[0])
        select_candidates(model, inputs, candidates, compile=True)
    start, cpu, summary = time.perf_counter(), time.process_time(), []
    for name in names:
        res = _one(name, args, out / name, candidates, extra)
        summary.append(res.to_dict())
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    tmp = out / "zoo.json.tmp"
    tmp.write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu, "models": summary},
                              indent=2, default=str) + "\n")
    tmp.replace(out / "zoo.json")
    print(f"benchmarked {len(names)} zoo models in {seconds:.0f} s ({cpu:.0f} s CPU); "
          f"summary in {out / 'zoo.json'}")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``fxopt bench`` on the ``fxopt`` command's subparsers."""
    p = sub.add_parser("bench", help="measure every candidate artifact side by side "
                       "(latency, accuracy, size, memory, build time)",
                       description=__doc__.split("\n")[0])
    p.add_argument("spec", nargs="?", help="zoo name, file.py:factory or package.module:factory")
    p.add_argument("--zoo", action="store_true", help="benchmark every zoo model (one folder "
                   "each under -o)")
    p.add_argument("--heavy", action="store_true", help="with --zoo: include the heavy models "
                   "(resnet50)")
    p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                   help="example input shape, e.g. 1,3,224,224 (repeat per input)")
    p.add_argument("--candidates", metavar="A,B,...",
                   help="comma-separated candidate names (default: all; list them with "
                        "--list-candidates)")
    p.add_argument("--list-candidates", action="store_true",
                   help="print the candidates for SPEC and exit")
    p.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS,
                   help=f"interleaved timing rounds (default {DEFAULT_ROUNDS})")
    p.add_argument("--warmup", type=int, default=DEFAULT_WARMUP,
                   help=f"untimed calls per candidate before timing (default {DEFAULT_WARMUP})")
    p.add_argument("--threads", type=int, default=DEFAULT_THREADS,
                   help="torch and ONNX Runtime intra-op threads while timing (default "
                        f"{DEFAULT_THREADS}: reproducible on a shared machine; give the "
                        "deployment's count, e.g. --threads 8)")
    p.add_argument("--build-threads", type=int, default=1, metavar="N",
                   help="torch threads while building (export, calibration; default 1, "
                        "which is fastest on a small shared machine)")
    p.add_argument("--batch", type=int, help="batch size (example rows repeated; default: "
                   "the example inputs' own)")
    p.add_argument("--compile", action="store_true",
                   help="also torch.compile (slow to build; its compile time is build s)")
    p.add_argument("--calibration-data", metavar="SPEC",
                   help="file.py:factory of calibration batches for the static int8 "
                        "candidates (default: random batches like the inputs)")
    p.add_argument("--calibration-batches", type=int, metavar="N",
                   help="use at most N calibration batches")
    p.add_argument("--val-data", metavar="SPEC",
                   help="file.py:factory of (inputs, target) validation batches")
    p.add_argument("--metric", metavar="SPEC",
                   help="pkg.mod:fn, fn(outputs, target) -> float (higher is better)")
    p.add_argument("-o", "--output", default="bench-out",
                   help="folder for bench.json, bench.png, table.txt and the artifacts "
                        "(default bench-out; --zoo: one subfolder per model)")
    p.set_defaults(fn=_dispatch)


def _dispatch(args: argparse.Namespace) -> int:
    if args.list_candidates:
        return _list(args)
    return cmd_bench(args)


def _list(args: argparse.Namespace) -> int:
    from fxopt.bench.candidates import default_candidates
    from fxopt.cli import load_spec

    if not args.spec:
        raise SpecError("--list-candidates needs a model SPEC")
    model, inputs, _ = load_spec(args.spec, args.input_shape)
    for c in default_candidates(model, inputs, compile=True):
        print(f"{c.name:<24} {c.runtime:<14} {c.pipeline or c.baseline or 'the model as given'}")
    return 0

