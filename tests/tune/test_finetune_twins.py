"""Fine-tuned twins (fxopt/tune/twins.py): a budget only the fine-tuned twin of a pruned
candidate meets, the time cap, the recipe's [finetune] table replayed exactly, the data
fingerprint, the cache, static int8 QAT twins, and the CLI flags."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
from fake_clock import fake_interleave  # tests/tune/fake_clock.py

import fxopt
from fxopt.cli import main
from fxopt.errors import SpecError
from fxopt.pipeline import load_recipe
from fxopt.tune import Space
from fxopt.tune.recipe import read_recipe
from fxopt.tune.twins import train_spec

TWIN, BASE = "prune0.25-onnx-fp32+ft", "prune0.25-onnx-fp32"
PRUNE = Space(runtimes=("onnx",), quant=(), precisions=(), prune=0.5, prune_steps=1,
              plain=False)
# the zoo MLP pruned without training: cosine ~0.44 at 0.5, ~0.70 at 0.25; distilled
# for 0.2 s (~200 steps) the 0.25 twin reaches ~0.89, in 1 s ~0.92
BUDGET = "cosine>=0.85"


def _data(seed: int) -> tuple[torch.Tensor]:
    return (torch.randn(512, 64, generator=torch.Generator().manual_seed(seed)),)


@pytest.fixture(scope="module")
def tuned(mlp, tmp_path_factory):
    model, inputs = mlp
    cache = tmp_path_factory.mktemp("ft-cache")
    with pytest.MonkeyPatch.context() as mp:  # only the clock is fake: the twin is fastest
        times = {"torch": [5.0] * 5, TWIN: [1.0] * 5, "onnx-fp32": [2.0] * 5}
        fake_interleave(mp, {"onnx-fp32": 2.0}, times)
        # one thread: training steps on two threads of a loaded two-core machine crawl
        res = fxopt.tune(model, inputs, BUDGET, space=PRUNE, rounds=1, warmup=1, cache=cache,
                         threads=1, train_data=_data(0), train_time=1.0, train_total=1.0)
    return res, cache


def test_only_the_fine_tuned_twin_meets_the_budget(tuned):
    res, _ = tuned
    assert res.winner == TWIN
    row, base = res.table.row(TWIN), res.table.row(BASE)
    assert base["status"] == "over budget" and res.table.row("prune0.5-onnx-fp32")[
        "status"] == "over budget"
    assert row["status"] == "accepted" and row["stage"] == "finetune"
    assert row["cosine"] >= 0.88 > base["cosine"]  # within the pruning margin too
    assert row["finetune"]["stop"] == "max_time" and row["finetune"]["steps"] > 0
    assert "finetune(epochs=none,max_time=1,lr=0.0001,output_loss=cosine" in row["pipeline"]
    assert row["verdict"].startswith("winner; fine-tuned")
    assert f"from {BASE}: cosine {base['cosine']:.6g} -> {row['cosine']:.6g}" in row["verdict"]
    # the closest over-budget candidate went first; the cap then left the other out
    skipped = res.table.row("prune0.5-onnx-fp32+ft")
    assert skipped["status"] == "skipped" and "time cap (1 s" in skipped["verdict"]
    assert res.table.settings["finetune"]["train_total"] == 1.0


def test_the_recipe_replays_the_fine_tuning_exactly(tuned, mlp, tmp_path):
    res, _ = tuned
    model, inputs = mlp
    steps = res.table.row(TWIN)["finetune"]["steps"]
    spec = read_recipe(res.recipe)
    ft = spec["finetune"]
    assert ft["steps"] == steps and ft["lr"] == 1e-4 and ft["output_loss"] == "cosine"
    assert ft["seed"] == 0 and ft["batch_size"] == 32 and ft["samples"] == 512
    assert ft["stop"] == "max_time" and ft["time_limit"] == 1.0 and ft["threads"] == 1
    assert f"max_steps={steps}" in spec["candidate"].pipeline
    assert "max_time" not in spec["candidate"].pipeline
    saved = res.save(tmp_path / "tuned")
    # fxopt optimize --pipeline recipe.toml --train-data replays the same stage
    assert load_recipe(saved / "recipe.toml")[-1].spec == (
        f"finetune(epochs=None,lr=0.0001,output_loss=cosine,seed=0,batch_size=32,"
        f"max_steps={steps})")
    art = fxopt.tune.rebuild(saved / "recipe.toml", model, inputs, path=tmp_path / "re",
                             train_data=_data(0))
    x = torch.randn(7, 64)
    with torch.no_grad():
        assert torch.equal(art(x), res.best(x))


def test_rebuild_needs_the_same_training_data(tuned, mlp, tmp_path):
    res, _ = tuned
    model, inputs = mlp
    with pytest.raises(SpecError, match="pass the same data as train_data="):
        fxopt.tune.rebuild(res.recipe, model, inputs, path=tmp_path / "a")
    with pytest.raises(SpecError, match="not the data this recipe fine-tuned on"):
        fxopt.tune.rebuild(res.recipe, model, inputs, path=tmp_path / "b",
                           train_data=_data(1))
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    edited = res.recipe.replace("lr = 0.0001", "lr = 0.001")
    with pytest.raises(SpecError, match="lr = 0.001 but the pipeline's finetune stage"):
        read_recipe(edited)
    table = res.recipe[res.recipe.index("[finetune]"):res.recipe.index("[tune]")]
    with pytest.raises(SpecError, match="no \\[finetune\\] table"):
        read_recipe(res.recipe.replace(table, ""))


def test_twins_are_cached_by_data_and_time(tuned, mlp, monkeypatch):
    import importlib

    search_mod = importlib.import_module("fxopt.tune.search")
    res, cache = tuned
    model, inputs = mlp
    real, built = search_mod.build, []

    def counting(cand, *a, **kw):
        built.append(cand.name)
        return real(cand, *a, **kw)

    monkeypatch.setattr(search_mod, "build", counting)
    kw = dict(space=PRUNE, rounds=1, warmup=1, cache=cache, threads=1, train_time=1.0,
              train_total=1.0)
    again = fxopt.tune(model, inputs, BUDGET, train_data=_data(0), **kw)
    assert built == [] and again.table.row(TWIN)["cached"]
    assert again.table.row(TWIN)["finetune"] == res.table.row(TWIN)["finetune"]
    fxopt.tune(model, inputs, BUDGET, train_data=_data(2), **kw)
    assert built == [TWIN]  # other data: a new twin; the rest came from the cache


def test_static_int8_twin_trains_through_fake_quant(mlp, small_space, tmp_path):
    model, inputs = mlp
    # int8 reaches ~0.99985 here: over this budget, so it gets a QAT twin
    res = fxopt.tune(model, inputs, "cosine>=0.99999", space=small_space, rounds=1,
                     warmup=1, cache=tmp_path, threads=1, train_data=_data(0), train_time=0.3)
    row = res.table.row("onnx-int8+ft")
    assert row["status"] in ("accepted", "over budget") and row["stage"] == "finetune"
    assert row["pipeline"].index("quantize(") < row["pipeline"].index("finetune(")
    assert "lr=1e-05" in row["pipeline"]  # QAT next to the teacher: a tenth of the lr
    assert "fine-tuned" in row["verdict"] and "from onnx-int8: cosine" in row["verdict"]
    rec = next(json.loads(f.read_text()) for f in (tmp_path / "records").glob("*.json")
               if json.loads(f.read_text()).get("name") == "onnx-int8+ft")
    ops = {n.op_type for n in onnx.load(rec["path"]).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops  # frozen back to Q/DQ


def test_training_options_are_checked_up_front(mlp):
    model, inputs = mlp
    assert train_spec(None, None, None, inputs) is None  # nothing given: no twins
    for kw, match in ((dict(train_data=_data(0)), "add train_time="),
                      (dict(train_time=5), "add train_data="),
                      (dict(train_data=_data(0), train_time=0), "train_time is a number"),
                      (dict(train_total=3), "train_total caps"),
                      (dict(train_data=(torch.randn(8, 65),), train_time=1),
                       "train_data: batch input 0 has shape")):
        with pytest.raises(SpecError, match=match):
            fxopt.tune(model, inputs, BUDGET, space=PRUNE, **kw)


def test_cli_flags(capsys, tmp_path):
    out = tmp_path / "tuned"
    code = main(["tune", "tests/digits_data.py:model", "--budget", "cosine>=0.999", "-o",
                 str(out), "--runtimes", "onnx", "--quant", "none", "--precisions", "none",
                 "--max-prune", "0.5", "--no-plain", "--rounds", "1", "--threads", "1",
                 "--train-data", "tests/digits_data.py:train_set", "--train-time", "0.3",
                 "--train-total", "0.3"])
    stdout, _ = capsys.readouterr()
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    twins = [r for r in report["rows"] if r["name"].endswith("+ft")]
    assert twins and twins[0]["stage"] == "finetune" and twins[0]["finetune"]["steps"] > 0
    assert report["settings"]["finetune"]["labels"]  # labelled data: task loss + KL
    assert report["settings"]["finetune"]["output_loss"] == "kl"
    assert "fine-tuned" in stdout


@pytest.mark.parametrize("argv, match", [
    (["--train-data", "tests/digits_data.py:train_set"], "add --train-time"),
    (["--train-time", "5"], "add --train-data"),
    (["--train-data", "tests/digits_data.py:train_set", "--train-time", "-1"],
     "--train-time is a number of seconds"),
    (["--train-total", "5"], "--train-total caps"),
    (["--train-data", "tests/digits_data.py:nosuch", "--train-time", "1"], "no attribute"),
    (["--train-data", "tests/digits_data.py:bad_train_set", "--train-time", "1"],
     "--train-data"),
])
def test_cli_training_flags_errors(capsys, tmp_path, argv, match):
    out = tmp_path / "never"
    code = main(["tune", "tests/digits_data.py:model", "--budget", "cosine>=0.9", "-o",
                 str(out), *argv])
    _, err = capsys.readouterr()
    assert code == 2 and match in err
    assert not out.exists() or not any(Path(out).iterdir())
