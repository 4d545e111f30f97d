"""``fxopt tune SPEC --budget ... -o DIR``: the fastest artifact within an accuracy budget.

    fxopt tune resnet --budget "cosine>=0.99" -o tuned/resnet
    fxopt tune my.py:build --input-shape 1,3,224,224 --budget "max_rel<=0.05" -o tuned
    fxopt tune resnet --metric mymetrics:top1 --max-drop 0.5 --val-data mydata:val -o tuned
    fxopt tune my.py:build --budget "cosine>=0.99" --train-data my.py:train_set \
        --train-time 60 -o tuned

Writes DIR/model.onnx (or the eager folder DIR/model), DIR/recipe.toml (rebuilds it from the
original model: ``fxopt.tune.rebuild``), DIR/report.txt and DIR/report.json. Built
candidates are cached in ``--cache`` (default DIR/.tune-cache): rerun the same command
after an interruption and it resumes without rebuilding them. ``--train-data`` (a factory
like ``--val-data``'s, returning a Dataset of ``(inputs..., [label])`` items or an ``(X, Y)``
pair) with ``--train-time S``: the lossy candidates that miss the budget also get a twin
fine-tuned for S seconds with the original model as teacher (``--train-total``: the cap on
all twins, default 4 x S); a fine-tuned winner's recipe needs the same data to rebuild.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fxopt.errors import SpecError


def _split(text: str | None, flag: str, known: tuple[str, ...]) -> tuple[str, ...] | None:
    if text is None:
        return None
    items = tuple(s.strip() for s in text.split(",") if s.strip())
    if text.strip() == "none":
        return ()
    bad = [s for s in items if s not in known]
    if bad:
        raise SpecError(f"{flag} {text!r}: unknown {', '.join(bad)}; use a comma-separated "
                        f"subset of {', '.join(known)} (or none)")
    return items


def _callable(spec: str, flag: str) -> Any:
    from fxopt.cli import _import_where

    if ":" not in spec:
        raise SpecError(f"{flag} {spec!r}: expected file.py:name or package.module:name")
    where, _, attr = spec.rpartition(":")
    try:
        fn = getattr(_import_where(where, spec), attr, None)
    except SpecError as e:
        raise SpecError(f"{flag}: {e}") from e
    if fn is None:
        raise SpecError(f"{flag}: {where!r} has no attribute {attr!r}")
    return fn


def _val_data(spec: str) -> list:
    factory = _callable(spec, "--val-data")
    try:
        made = factory() if callable(factory) else factory
        return list(made)
    except Exception as e:  # noqa: BLE001 - the user's factory failed: say so in one line
        raise SpecError(f"--val-data {spec}: the factory raised {type(e).__name__}: {e}") from e


def cmd_tune(args: argparse.Namespace) -> int:
    import fxopt
    from fxopt.cli import _progress, load_calibration, load_spec
    from fxopt.tune import Space, parse_budget
    from fxopt.tune.space import PRECISIONS, QUANT, RUNTIMES

    # everything the user typed is checked before any model is built
    metric = _callable(args.metric, "--metric") if args.metric else None
    if metric is not None and not callable(metric):
        raise SpecError(f"--metric {args.metric}: not callable")
    val = _val_data(args.val_data) if args.val_data else None
    if (args.train_data is None) != (args.train_time is None):
        missing = "--train-time S" if args.train_data else "--train-data SPEC"
        raise SpecError("candidates fine-tune only with both --train-data SPEC and "
                        f"--train-time S; add {missing}")
    if args.train_total is not None and args.train_data is None:
        raise SpecError("--train-total caps fine-tuning: give --train-data and --train-time too")
    for flag, v in (("--train-time", args.train_time), ("--train-total", args.train_total)):
        if v is not None and not (v > 0 and v != float("inf")):
            raise SpecError(f"{flag} is a number of seconds > 0, not {v:g}")
    train_factory = None
    if args.train_data:
        from fxopt.cli import import_attr

        train_factory = import_attr("--train-data", args.train_data)  # fails before any work
    budget = parse_budget(args.budget, metric=metric, max_drop=args.max_drop,
                          metric_name=args.metric, val_data=val)
    try:
        threads = tuple(int(t) for t in args.threads.split(",")) if args.threads else (None,)
    except ValueError:
        raise SpecError(f"--threads {args.threads!r}: expected integers like 1,2") from None
    space_args = {k: v for k, v in (
        ("runtimes", _split(args.runtimes, "--runtimes", RUNTIMES)),
        ("quant", _split(args.quant, "--quant", QUANT[1:])),
        ("precisions", _split(args.precisions, "--precisions", PRECISIONS[1:])),
    ) if v is not None}
    space = Space(**space_args, prune=0.0 if args.no_prune else args.max_prune,
                  threads=threads, plain=not args.no_plain)
    out = Path(args.output)
    if out.exists() and not out.is_dir():
        raise SpecError(f"-o {args.output}: exists and is not a folder")
    model, inputs, name = load_spec(args.spec, args.input_shape)
    calibration = None
    if args.calibration_data:
        calibration = load_calibration(args.calibration_data, inputs, args.calibration_batches)
    train = None
    if train_factory is not None:
        from fxopt.cli_train import _check_items, load_dataset

        train = load_dataset(args.train_data, len(inputs), "--train-data")
        _check_items(train, inputs, "--train-data")
    _progress(f"tuning {name} under budget {budget.describe()}")
    res = fxopt.tune(model, inputs, budget, val_data=val, metric=metric,
                     calibration=calibration, space=space,
                     cache=args.cache or out / ".tune-cache", rounds=args.rounds,
                     threads=threads[0], say=_progress, train_data=train,
                     train_time=args.train_time, train_total=args.train_total)
    print(res.table)
    res.save(out)
    print(f"winner {res.winner}: wrote {out}/{'model.onnx' if res.best.kind == 'onnx' else 'model'}"
          f", {out}/recipe.toml, {out}/report.txt, {out}/report.json")
    return 0


def add_parser(sub: Any) -> None:
    """Register ``fxopt tune`` on the ``fxopt`` command's subparsers."""
    p = sub.add_parser("tune", help="find the fastest artifact within an accuracy budget",
                       description=__doc__.split("\n")[0])
    p.add_argument("spec", help="zoo name, file.py:factory or package.module:factory")
    p.add_argument("--input-shape", action="append", metavar="SHAPE[:DTYPE]",
                   help="example input shape, e.g. 1,3,224,224 (repeat per input)")
    p.add_argument("--budget", help="e.g. 'cosine>=0.99' or 'max_rel<=0.05' (comma: all)")
    p.add_argument("--metric", metavar="pkg.mod:fn",
                   help="metric(outputs, target) -> float, higher is better (with --max-drop)")
    p.add_argument("--max-drop", type=float, help="how far the metric may fall")
    p.add_argument("--val-data", metavar="pkg.mod:fn",
                   help="factory returning (inputs, target) batches for --metric")
    p.add_argument("--calibration-data", metavar="SPEC",
                   help="file.py:factory or package.module:factory of calibration batches")
    p.add_argument("--calibration-batches", type=int, default=None, metavar="N")
    p.add_argument("--train-data", metavar="pkg.mod:fn",
                   help="factory of training data: lossy candidates also get a fine-tuned twin")
    p.add_argument("--train-time", type=float, metavar="S",
                   help="seconds of fine-tuning per candidate (with --train-data)")
    p.add_argument("--train-total", type=float, metavar="S",
                   help="cap on the fine-tuning of all candidates (default 4 x --train-time)")
    p.add_argument("--runtimes", help="comma-separated subset of eager,onnx (default both)")
    p.add_argument("--quant", help="subset of int8,int8-pt,dynamic, or none")
    p.add_argument("--precisions", help="subset of fp16,bf16, or none")
    p.add_argument("--max-prune", type=float, default=0.5,
                   help="largest pruning ratio to try (default 0.5; bisected below it)")
    p.add_argument("--no-prune", action="store_true", help="do not try pruning")
    p.add_argument("--no-plain", action="store_true",
                   help="do not try ONNX Runtime on the plain torch.onnx.export")
    p.add_argument("--threads", help="thread counts to time, e.g. 1,2 (default: current)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds")
    p.add_argument("--cache", help="folder for built candidates (default DIR/.tune-cache)")
    p.add_argument("-o", "--output", required=True, help="folder for the results")
    p.set_defaults(fn=cmd_tune)


if __name__ == "__main__":  # pragma: no cover
    from fxopt.cli import main

    sys.exit(main(["tune", *sys.argv[1:]]))
