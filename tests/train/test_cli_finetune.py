"""``fxopt finetune``: in one process, under ``torchrun --nproc-per-node 2 -m fxopt`` (same
weights, only rank 0 writes, a rank's failure named), and every user mistake as a typed
CLI error with nothing written."""

from __future__ import annotations

import glob
import inspect
import json
import sys
from pathlib import Path

import pytest
import torch
from test_distributed import ROOT, run_bounded, torchrun

import fxopt
from fxopt.cli import main

DIGITS = str(ROOT / "tests" / "digits_data.py")
FT = ["finetune", f"{DIGITS}:model", "--pipeline", "default,sparsify(ratio=0.5)",
      "--train-data", f"{DIGITS}:train_set", "--val-data", f"{DIGITS}:val_set",
      "--epochs", "2", "--optimizer", "sgd", "--lr", "0.05", "--batch-size", "32"]


def test_one_process_trains_keeps_zeros_and_writes(tmp_path, capsys):
    out = tmp_path / "art"
    rc = main([*FT, "-o", str(out), "--history-json", str(tmp_path / "h.json"),
               "--log-dir", str(tmp_path / "tb"), "--checkpoint-dir", str(tmp_path / "ck")])
    assert rc == 0, capsys.readouterr().err
    text = capsys.readouterr().out
    assert "fine-tuned 16 steps; best accuracy" in text and "wrote eager artifact" in text
    hist = json.loads((tmp_path / "h.json").read_text())
    assert [r["epoch"] for r in hist["history"]] == [1, 2]
    assert hist["structure"]["masks"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    assert hist["world"]["world_size"] == 1
    weights = fxopt.load(out).module.state_dict()
    total = sum(int((v == 0).sum()) for k, v in weights.items() if k.endswith("weight"))
    assert total / sum(v.numel() for k, v in weights.items() if k.endswith("weight")) >= 0.5
    assert glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))
    assert (tmp_path / "ck" / "best").is_dir()


def test_random_data_smoke_on_a_zoo_model(tmp_path, capsys):
    rc = main(["finetune", "mlp", "--pipeline", "default,prune(ratio=0.5)", "--epochs", "1",
               "--random-samples", "32", "--batch-size", "16", "-o", str(tmp_path / "m.onnx"),
               "--target", "onnx"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "random inputs like the example" in captured.err
    assert (tmp_path / "m.onnx").is_file()


def test_max_steps_stops_the_cli_run(tmp_path, capsys):
    rc = main(["finetune", f"{DIGITS}:model", "--pipeline", "default,prune(ratio=0.5)",
               "--train-data", f"{DIGITS}:train_set", "--max-steps", "11", "--history-json",
               str(tmp_path / "h.json")])
    assert rc == 0, capsys.readouterr().err
    assert "fine-tuned 11 steps (stopped: max_steps)" in capsys.readouterr().out
    hist = json.loads((tmp_path / "h.json").read_text())["history"]
    assert [r["steps"] for r in hist] == [8, 3] and hist[-1]["stop"] == "max_steps"


@pytest.mark.parametrize(("extra", "message"), [
    (["--train-data", f"{DIGITS}:nope"], "has no attribute 'nope'"),
    (["--train-data", f"{DIGITS}:bad_train_set"], "input 0 is (2, 65) float32; the model"),
    (["--train-data", f"{DIGITS}:fails"], "the factory raised RuntimeError: dataset not mounted"),
    (["--train-data", f"{DIGITS}:not_iterable"], "must be a torch Dataset"),
    (["--epochs", "0"], "--epochs 0: give the epochs to train after --pipeline"),
    (["--pipeline", "default,finetune(epochs=1)", "--epochs", "-1"], "--epochs -1"),
    (["--batch-size", "0"], "--batch-size must be a positive integer"),
    (["--max-steps", "0"], "--max-steps is a number of optimizer steps"),
    (["--max-time", "-2"], "--max-time is a number of seconds"),
    (["--target", "tensorrt"], "--target 'tensorrt'"),
    (["--no-teacher"], "drop --no-teacher"),
])
def test_mistakes_are_typed_and_write_nothing(tmp_path, capsys, extra, message):
    out = tmp_path / "art"
    argv = ["finetune", f"{DIGITS}:model", "--epochs", "1", *extra, "-o", str(out)]
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("fxopt: error: ") and message in err
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_pipeline_finetune_stages_train_on_the_same_data(tmp_path, capsys):
    rc = main(["finetune", f"{DIGITS}:model", "--pipeline",
               "default,sparsify(ratio=0.5),finetune(epochs=2,optimizer=sgd,lr=0.05)",
               "--train-data", f"{DIGITS}:train_set", "--val-data", f"{DIGITS}:val_set",
               "--epochs", "0", "-o", str(tmp_path / "art"),
               "--history-json", str(tmp_path / "h.json")])
    assert rc == 0, capsys.readouterr().err
    hist = json.loads((tmp_path / "h.json").read_text())
    assert "history" not in hist  # nothing trained after the pipeline
    (stage,) = hist["stages"]
    assert stage["pass"].startswith("finetune(") and len(stage["history"]) == 2
    assert stage["structure"]["masks"]["sparsity"] == pytest.approx(0.5, abs=0.01)
    weights = fxopt.load(tmp_path / "art").module.state_dict()
    zeros = sum(int((v == 0).sum()) for k, v in weights.items() if k.endswith("weight"))
    assert zeros / sum(v.numel() for k, v in weights.items() if k.endswith("weight")) >= 0.5


def test_optimize_feeds_finetune_stages(tmp_path, capsys):
    art = tmp_path / "art"
    base = ["optimize", f"{DIGITS}:model", "-o", str(art)]
    stage = ["--pipeline", "default,sparsify(ratio=0.5),finetune(epochs=1)"]
    assert main([*base, *stage]) == 2
    assert "has a finetune stage: give --train-data" in capsys.readouterr().err
    assert main([*base, "--train-data", f"{DIGITS}:train_set"]) == 2
    assert "has none; add one" in capsys.readouterr().err
    assert main([*base, *stage, "--train-data", f"{DIGITS}:bad_train_set"]) == 2
    assert "input 0 is (2, 65) float32" in capsys.readouterr().err
    assert not art.exists()
    rc = main([*base, *stage, "--train-data", f"{DIGITS}:train_set", "--val-data",
               f"{DIGITS}:val_set"])
    assert rc == 0, capsys.readouterr().err
    assert "finetune(epochs=1)" in capsys.readouterr().out and art.is_dir()


def test_no_output_is_refused(capsys):
    assert main(["finetune", "mlp"]) == 2
    assert "-o/--output" in capsys.readouterr().err


def test_python_dash_m_fxopt_runs_the_cli(tmp_path):
    res = run_bounded([sys.executable, "-m", "fxopt", "finetune", "--help"], cwd=tmp_path)
    assert res.returncode == 0 and "--train-data" in res.stdout and "GLOBAL batch" in res.stdout


def test_help_states_the_real_defaults():
    from fxopt.cli import build_parser
    from fxopt.train.loop import finetune

    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["finetune"]
    defaults = inspect.signature(finetune).parameters
    for action in sub._actions:
        if action.default not in (None, False) and action.help and action.dest != "help":
            assert str(action.default) in action.help or "default pipeline" in action.help \
                or action.dest == "pipeline", action.dest
        name = {"temperature": "T"}.get(action.dest, action.dest)
        if name in defaults and action.default is not None:  # the CLI's defaults are the API's
            assert action.default == defaults[name].default, action.dest


# --------------------------------------------------------------------------- torchrun
def _rank_stdout(log_dir: Path, rank: int) -> str:
    files = glob.glob(str(log_dir / "**" / str(rank) / "stdout.log"), recursive=True)
    assert len(files) == 1, files
    return Path(files[0]).read_text()


def test_torchrun_two_processes_match_one_and_only_rank0_writes(tmp_path):
    one = run_bounded([sys.executable, "-m", "fxopt", *FT, "-o", str(tmp_path / "one"),
                       "--history-json", str(tmp_path / "one.json")], cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    logs = tmp_path / "ranks"
    two = torchrun(2, "--log-dir", str(logs), "--redirects", "3", "-m", "fxopt", *FT,
                   "-o", str(tmp_path / "two"), "--history-json", str(tmp_path / "two.json"),
                   "--checkpoint-dir", str(tmp_path / "ck"), "--log-dir", str(tmp_path / "tb"),
                   cwd=tmp_path)
    assert two.returncode == 0, two.stderr
    a = fxopt.load(tmp_path / "one").module.state_dict()
    b = fxopt.load(tmp_path / "two").module.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)
    h1 = json.loads((tmp_path / "one.json").read_text())
    h2 = json.loads((tmp_path / "two.json").read_text())
    assert h2["world"]["world_size"] == 2 and h2["world"]["backend"] == "gloo"
    assert [r["metric"] for r in h2["history"]] == [r["metric"] for r in h1["history"]]
    rank0, rank1 = _rank_stdout(logs, 0), _rank_stdout(logs, 1)
    assert "wrote eager artifact" in rank0 and "fine-tuned 16 steps" in rank0
    assert rank1.strip() == ""  # rank 1 trained, printed nothing and wrote nothing
    assert len(glob.glob(str(tmp_path / "tb" / "events.out.tfevents.*"))) == 1


def test_torchrun_prune_finetune_then_qat(tmp_path):
    """prune, a finetune stage, int8, then QAT, on 2 processes: the stage trains under DDP
    too, every trainable parameter takes part (a quantized graph keeps orphan float biases
    DDP would wait for) and the frozen QAT graph is written."""
    res = torchrun(2, "-m", "fxopt", "finetune", f"{DIGITS}:model", "--pipeline",
                   "default,prune(ratio=0.25),finetune(epochs=1,optimizer=sgd,lr=0.05),"
                   "quantize(scheme=int8)", "--train-data",
                   f"{DIGITS}:train_set", "--epochs", "1", "--optimizer", "sgd", "--lr", "0.05",
                   "--history-json", str(tmp_path / "h.json"), "-o", str(tmp_path / "art"),
                   cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    hist = json.loads((tmp_path / "h.json").read_text())
    assert hist["structure"]["qat"]["mode"] == "observed" and hist["world"]["world_size"] == 2
    (stage,) = hist["stages"]
    assert stage["structure"]["qat"]["mode"] is None and len(stage["history"]) == 1
    art = fxopt.load(tmp_path / "art")
    kinds = {type(m).__name__ for m in art.module.modules()}
    assert "FakeQuantize" in kinds
    assert all(m.mode == "quantize" for m in art.module.modules()
               if type(m).__name__ == "FakeQuantize")


def test_torchrun_failure_on_rank1_names_it_and_writes_nothing(tmp_path):
    res = torchrun(2, "-m", "fxopt", "finetune", f"{DIGITS}:model", "--train-data",
                   f"{DIGITS}:rank1_fails", "--epochs", "1", "-o", str(tmp_path / "art"),
                   cwd=tmp_path)
    assert res.returncode != 0
    text = res.stdout + res.stderr
    assert "fxopt: error: rank 1 of 2 failed during fxopt finetune" in text
    assert "dataset not mounted on this node" in text
    assert not (tmp_path / "art").exists()
