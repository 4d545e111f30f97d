"""The tuner's answer as a TOML recipe that rebuilds the artifact from the original model.

The format is fxopt's recipe format (``fxopt.pipeline.load_recipe``): ``pipeline`` holds
the pass spec, and three tables say the rest:

.. code-block:: toml

    pipeline = "default,quantize(scheme=int8,target=ort,per_channel=true,skip=['fc'])"

    [lower]
    runtime = "onnx"       # eager | onnx
    threads = 2            # ONNX Runtime intra-op threads (optional)

    [calibration]          # the batches static int8 calibrated on
    source = "random"      # fxopt.bench.candidates.calibration_batches(inputs, count, seed)
    count = 8
    seed = 4242            # or source = "given": pass the same batches to rebuild()

    [finetune]             # only for a fine-tuned winner: the pipeline's finetune stage
    steps = 41             # the steps it ran (the stage replays them: max_steps = 41)
    lr = 0.0001            # these four: as in the stage (a mismatch is a SpecError)
    seed = 0
    output_loss = "cosine"
    batch_size = 32
    threads = 2            # the intra-op threads it trained with (rebuild trains with them)
    time_limit = 30.0      # what the tuner allowed, and what it took (information)
    seconds = 30.2
    stop = "max_time"
    samples = 512          # the data it trained on: rebuild() refuses other data
    labels = false
    data_sha256 = "9f2c..."

    [tune]                 # what the tuner measured (information only)
    budget = "cosine>=0.99"

``fxopt optimize SPEC --pipeline recipe.toml`` replays the passes (``--train-data`` for a
finetune stage); ``rebuild`` replays the whole artifact, calibration and fine-tuning
included (deterministic: the seed, the data's order and the step count are fixed).

Example::

    text = recipe_text(candidate, calibration={"source": "random", "count": 8, "seed": 4242})
    art = rebuild(text, model, (x,), path="out/rebuilt")
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from fxopt.errors import LoweringError, SpecError

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf" if v < 0 else "nan")
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{_key(k)} = {_value(x)}" for k, x in v.items()
                                if x is not None) + " }"
    return json.dumps(str(v))  # JSON string escapes are valid TOML basic strings


def _key(k: str) -> str:
    return k if k.replace("_", "").replace("-", "").isalnum() else json.dumps(k)


def recipe_text(candidate: Any, *, calibration: dict[str, Any],
                tune: dict[str, Any] | None = None,
                finetune: dict[str, Any] | None = None) -> str:
    """The TOML recipe for a ``fxopt.bench.candidates.Candidate`` (see the module
    docstring); ``calibration``: ``{"source": "random", "count": n, "seed": s}`` or
    ``{"source": "given", "count": n}``; ``tune``: measured figures to keep beside it;
    ``finetune``: the ``[finetune]`` table of a candidate whose pipeline fine-tunes."""
    if candidate.runtime not in ("eager", "onnx") or candidate.baseline not in (
            None, "plain-export"):
        raise SpecError(f"candidate {candidate.name!r}: a recipe rebuilds eager or onnx "
                        "artifacts from an fxopt pipeline (or the plain ONNX export)")
    lines = ["# fxopt tune recipe: rebuild with fxopt.tune.rebuild(recipe, model, inputs)",
             f"# candidate {candidate.name}"]
    if candidate.pipeline is not None:
        lines.append(f"pipeline = {_value(candidate.pipeline)}")
    lines += ["", "[lower]", f"runtime = {_value(candidate.runtime)}"]
    if candidate.baseline is not None:
        lines += ["# no fxopt pass: torch.onnx.export of the model as given",
                  f"baseline = {_value(candidate.baseline)}"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in candidate.options if v is not None]
    lines += ["", "[calibration]"]
    lines += [f"{_key(k)} = {_value(v)}" for k, v in calibration.items() if v is not None]
    if finetune:
        lines += ["", "[finetune]", "# rebuild needs the same train_data (the hash says which)"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in finetune.items() if v is not None]
    if tune:
        lines += ["", "[tune]"]
        lines += [f"{_key(k)} = {_value(v)}" for k, v in tune.items() if v is not None]
    return "\n".join(lines) + "\n"


def read_recipe(recipe: str | os.PathLike) -> dict[str, Any]:
    """A recipe (path or TOML text) as ``{"candidate": Candidate, "calibration": {...},
    "finetune": {...} or None, "tune": {...}}``; its passes are checked by parsing them,
    and a ``[finetune]`` table against the pipeline's finetune stage (``SpecError``)."""
    from fxopt.bench.candidates import Candidate
    from fxopt.pipeline import load_recipe, parse_pipeline

    path = None
    if isinstance(recipe, os.PathLike) or (isinstance(recipe, str) and "\n" not in recipe):
        path = Path(recipe)
        if not path.is_file():
            raise SpecError(f"recipe file {os.fspath(path)!r} does not exist")
        text = path.read_text()
    else:
        text = recipe
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise SpecError(f"the recipe is not valid TOML: {e}") from e
    lower = dict(data.get("lower", {}))
    baseline = lower.pop("baseline", None)
    if "lower" not in data or ("pipeline" not in data) == (baseline is None):
        raise SpecError("a tune recipe needs a [lower] table (runtime = ...) and either "
                        "'pipeline' or [lower] baseline = 'plain-export'")
    if baseline not in (None, "plain-export"):
        raise SpecError(f"recipe [lower] baseline must be 'plain-export', not {baseline!r}")
    passes = []
    if "pipeline" in data:
        passes = parse_pipeline(data["pipeline"])
        if path is not None:
            load_recipe(path)  # the same checks as fxopt optimize --pipeline recipe.toml
    runtime = lower.pop("runtime", None)
    if runtime not in ("eager", "onnx") or (baseline and runtime != "onnx"):
        raise SpecError(f"recipe [lower] runtime must be 'eager' or 'onnx' ('onnx' for a "
                        f"baseline), not {runtime!r}")
    name = data.get("tune", {}).get("candidate", f"recipe-{runtime}")
    cand = Candidate(name, runtime, data.get("pipeline"), baseline,
                     tuple(sorted(lower.items())))
    calibration = dict(data.get("calibration", {"source": "random"}))
    if calibration.get("source") not in ("random", "given"):
        raise SpecError("recipe [calibration] source must be 'random' or 'given', not "
                        f"{calibration.get('source')!r}")
    finetune = _finetune_table(data.get("finetune"), passes)
    return {"candidate": cand, "calibration": calibration, "finetune": finetune,
            "tune": data.get("tune", {})}


# the [finetune] keys that must agree with the pipeline's finetune stage (table: stage)
_STAGE_KEYS = {"steps": "max_steps", "lr": "lr", "seed": "seed", "output_loss": "output_loss",
               "batch_size": "batch_size"}


def _finetune_table(table: Any, passes: list) -> dict[str, Any] | None:
    stages = [p for p in passes if p.name == "finetune"]
    if table is None:
        if stages:
            raise SpecError("the recipe's pipeline has a finetune stage but no [finetune] "
                            "table saying which data it trained on (data_sha256, samples)")
        return None
    if not isinstance(table, dict) or not stages:
        raise SpecError("the recipe has a [finetune] table but its pipeline has no "
                        "finetune(...) stage: add the stage, or drop the table")
    if len(stages) > 1:
        raise SpecError("a tune recipe replays one finetune stage, this pipeline has "
                        f"{len(stages)}")
    if not isinstance(table.get("data_sha256"), str):
        raise SpecError("recipe [finetune] needs data_sha256 (the sha256 of the training "
                        "data, fxopt.train.data.fingerprint)")
    params = stages[0].params
    for key, arg in _STAGE_KEYS.items():
        if key in table and params.get(arg) != table[key]:
            raise SpecError(f"recipe [finetune] {key} = {table[key]!r} but the pipeline's "
                            f"finetune stage has {arg}={params.get(arg)!r}: the stage is what "
                            "runs, so edit both alike")
    if params.get("max_time") is not None or params.get("max_steps") is None:
        raise SpecError("the recipe's finetune stage must stop by max_steps (not max_time) "
                        "so that a rebuild runs the same steps")
    return dict(table)


def rebuild(recipe: str | os.PathLike, model: Any, inputs: Any, *,
            path: str | os.PathLike, calibration: Any = None, train_data: Any = None) -> Any:
    """Rebuild the artifact a recipe describes from the original ``model`` into ``path``
    (a folder) and load it (``fxopt.load``). A recipe calibrated on ``source = "given"``
    batches needs those batches again as ``calibration``; one with a ``[finetune]`` table
    needs the data it trained on as ``train_data`` (checked by its sha256: other data is a
    ``SpecError``), and gives the same weights (the same seed and steps).

    Example::

        art = rebuild("tuned/recipe.toml", model, (x,), path="rebuilt")
        art(x)
    """
    import fxopt
    from fxopt.bench.candidates import build, calibration_batches
    from fxopt.bench.timing import threads as torch_threads

    spec = read_recipe(recipe)
    cand, calib = spec["candidate"], spec["calibration"]
    inputs = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    train = _train_data(spec["finetune"], train_data, len(inputs))
    if calib.get("source") == "given":
        if calibration is None:
            raise SpecError("this recipe was calibrated on batches the user gave: pass the "
                            "same batches as calibration= (--calibration-data)")
        batches = list(calibration)
    else:
        if calibration is not None:
            raise SpecError("this recipe calibrates on its own random batches "
                            "([calibration] source = 'random'); drop calibration=")
        batches = calibration_batches(inputs, int(calib.get("count", 8)),
                                      int(calib.get("seed", 4242)))
    # fine-tuning replays bit for bit only on the thread count it ran with
    with torch_threads(spec["finetune"].get("threads") if spec["finetune"] else None):
        built = build(cand, model, inputs, workdir=path, calibration=batches, train_data=train)
    if not built.ok:
        raise LoweringError(f"rebuilding {cand.name} from its recipe failed: {built.error}")
    threads = cand.option("threads")
    return fxopt.load(built.path, threads=threads) if cand.runtime == "onnx" \
        else fxopt.load(built.path)


def _train_data(table: dict | None, train_data: Any, n_inputs: int) -> Any:
    """``train_data`` as a Dataset, checked against the recipe's ``[finetune]`` table."""
    from fxopt.errors import FxoptError
    from fxopt.train.data import as_dataset, fingerprint

    if table is None:
        if train_data is not None:
            raise SpecError("this recipe fine-tunes nothing (no [finetune] table); drop "
                            "train_data=")
        return None
    if train_data is None:
        raise SpecError(f"this recipe fine-tunes on training data ({table.get('samples')} "
                        f"samples, sha256 {table['data_sha256'][:12]}...): pass the same data "
                        "as train_data= (fxopt optimize: --train-data)")
    try:
        ds = as_dataset(train_data, n_inputs)
    except FxoptError as e:
        raise SpecError(f"train_data: {e}") from e
    got = fingerprint(ds, n_inputs)
    if got["sha256"] != table["data_sha256"]:
        raise SpecError(f"train_data is not the data this recipe fine-tuned on: sha256 "
                        f"{got['sha256'][:12]}... ({got['samples']} samples), the recipe's "
                        f"{table['data_sha256'][:12]}... ({table.get('samples')} samples); "
                        "pass the same tensors in the same order")
    return ds


__all__ = ["read_recipe", "rebuild", "recipe_text"]
