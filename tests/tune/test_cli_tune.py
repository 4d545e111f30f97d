"""``fxopt tune``: writes the artifact, recipe.toml and the report; bad input is a typed
error before any work, and leaves no folder behind."""

from __future__ import annotations

import json

import pytest
import torch

import fxopt
from fxopt.cli import main


def test_tune_writes_artifact_recipe_and_report(capsys, tmp_path):
    out = tmp_path / "tuned"
    code = main(["tune", "mlp", "--budget", "cosine>=0.99", "-o", str(out), "--runtimes",
                 "onnx", "--quant", "int8", "--precisions", "none", "--no-prune",
                 "--rounds", "1"])
    stdout, _ = capsys.readouterr()
    assert code == 0
    assert "winner" in stdout and "candidate" in stdout
    report = json.loads((out / "report.json").read_text())
    winner = report["settings"]["winner"]
    assert winner in ("onnx-plain", "onnx-fp32", "onnx-int8")
    art = fxopt.load(out / "model.onnx")
    model, inputs = fxopt.zoo.load("mlp")
    rebuilt = fxopt.tune.rebuild(out / "recipe.toml", model, inputs, path=tmp_path / "again")
    assert torch.equal(rebuilt(*inputs), art(*inputs))
    assert (out / ".tune-cache" / "records").is_dir()
    # the same command again resumes from the cache: nothing is built a second time
    code = main(["tune", "mlp", "--budget", "cosine>=0.99", "-o", str(out), "--runtimes",
                 "onnx", "--quant", "int8", "--precisions", "none", "--no-prune",
                 "--rounds", "1"])
    stdout, _ = capsys.readouterr()
    assert code == 0 and stdout.count("(cached)") == 3


@pytest.mark.parametrize("argv, match", [
    (["--budget", "cosine<=0.9"], "cosine>=VALUE"),
    (["--budget", "speed>=2"], "unknown measure"),
    ([], "no budget given"),
    (["--max-drop", "0.5"], "--metric"),
    (["--metric", "nosuchmodule_xyz:fn", "--max-drop", "0.5"], "cannot import"),
    (["--budget", "cosine>=0.9", "--runtimes", "tpu"], "unknown tpu"),
    (["--budget", "cosine>=0.9", "--threads", "two"], "--threads"),
])
def test_bad_arguments_fail_before_any_work(capsys, tmp_path, argv, match):
    out = tmp_path / "never"
    code = main(["tune", "mlp", "-o", str(out), *argv])
    _, err = capsys.readouterr()
    assert code == 2
    assert match in err
    assert not out.exists()
