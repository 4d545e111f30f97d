"""The fxopt command: inspect, optimize, passes, zoo, demo, and its error behaviour."""

from __future__ import annotations

import inspect
import json
import textwrap
from pathlib import Path

import pytest
import torch
from png_check import assert_png  # tests/png_check.py

import fxopt
from fxopt.cli import load_spec, main, parse_input_shape
from fxopt.errors import SpecError


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_inspect_zoo_prints_table_and_totals(capsys):
    code, out, _ = run(capsys, "inspect", "mlp")
    assert code == 0
    assert "linear" in out and "MACs" in out and "103,424" in out


def test_inspect_json(capsys):
    code, out, _ = run(capsys, "inspect", "resnet", "--json")
    assert code == 0
    data = json.loads(out)
    assert data["totals"]["macs"] > 0 if "totals" in data else data["macs"] > 0


def test_optimize_writes_verified_eager_artifact(capsys, tmp_path):
    out_dir = tmp_path / "m"
    code, out, err = run(capsys, "optimize", "resnet", "--target", "eager", "-o", str(out_dir),
                         "--report-json", str(tmp_path / "r.json"))
    assert code == 0, err
    assert "cleanup" in out and "wrote eager artifact" in out
    assert "[1/" in err  # progress lines
    model, inputs, _ = load_spec("resnet")
    torch.testing.assert_close(fxopt.load(out_dir)(*inputs), model(*inputs), rtol=1e-4,
                               atol=1e-5)
    assert json.loads((tmp_path / "r.json").read_text())[0]["name"] == "cleanup"


def test_file_factory_with_input_shape(capsys, tmp_path):
    src = tmp_path / "mymodels.py"
    src.write_text(textwrap.dedent("""
        import torch.nn as nn
        def build():
            layers = [nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2)]
            return nn.Sequential(*layers)
    """))
    code, out, err = run(capsys, "inspect", f"{src}:build", "--input-shape", "1,3,8,8")
    assert code == 0, err
    assert "conv" in out


def test_zoo_lists_models(capsys):
    code, out, _ = run(capsys, "zoo")
    assert code == 0 and "resnet50" in out


def test_module_factory_spec_returning_inputs(capsys, tmp_path, monkeypatch):
    (tmp_path / "cli_pkg_models.py").write_text(textwrap.dedent("""
        import torch, torch.nn as nn
        def factory():
            return nn.Sequential(nn.Linear(8, 4), nn.GELU()), (torch.randn(3, 8),)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    code, out, err = run(capsys, "inspect", "cli_pkg_models:factory", "--mode", "symbolic")
    assert code == 0, err
    assert "gelu" in out and "[3, 4]" in out


def test_passes_lists_registry_and_pipelines(capsys):
    code, out, _ = run(capsys, "passes")
    assert code == 0
    assert "cleanup" in out and "pipeline default:" in out


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "not_a_model"], "not a zoo model"),
    (["inspect", "nowhere/missing.py:build"], "does not exist"),
    (["inspect", "fxopt.zoo:nope"], "has no attribute"),
    (["inspect", "mlp", "--input-shape", "4,x"], "--input-shape"),
    (["inspect", "mlp", "--input-shape", "4,65"], "input"),
    (["optimize", "mlp", "--pipeline", "cleanup,,dce", "-o", "unused"], "position"),
])
def test_user_errors_print_one_line_and_exit_2(capsys, argv, needle, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = run(capsys, *argv)
    assert code == 2
    errors = [line for line in err.splitlines() if line.startswith("fxopt: error:")]
    assert len(errors) == 1
    assert needle in err
    assert "Traceback" not in err
    assert not (tmp_path / "unused").exists()


def test_debug_shows_traceback(capsys):
    code, _, err = run(capsys, "--debug", "inspect", "not_a_model")
    assert code == 2 and "Traceback" in err


def test_unwritable_output_leaves_nothing(capsys, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, _, err = run(capsys, "optimize", "mlp", "-o", str(blocker / "out"))
    assert code == 2 and "fxopt: error:" in err
    assert blocker.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]


def test_parse_input_shape_dtypes():
    assert parse_input_shape("2,16:int64").dtype == torch.int64
    assert parse_input_shape("1x3x8x8").shape == (1, 3, 8, 8)
    with pytest.raises(SpecError):
        parse_input_shape("0,3")
    with pytest.raises(SpecError):
        parse_input_shape("2:complex7")


def test_demo_runs(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--model", "mlp", "-o", str(tmp_path))
    assert code == 0
    assert "reloaded" in out and "(ok)" in out
    assert (Path(tmp_path) / "mlp" / "manifest.json").exists()
    assert "verified in ONNX Runtime" in out and "ONNX Runtime" in out.splitlines()[-2]
    assert fxopt.load(Path(tmp_path) / "mlp.onnx").kind == "onnx"


def test_optimize_to_onnx_writes_a_verified_model(capsys, tmp_path):
    code, out, err = run(capsys, "optimize", "resnet", "--target", "onnx", "-o",
                         str(tmp_path / "out"), "--opset", "20")
    assert code == 0, err
    art = fxopt.load(tmp_path / "out")
    assert art.path.name == "model.onnx" and art.manifest["opset"] == 20
    assert art.manifest["verified"]


def test_onnx_options_need_the_onnx_target(capsys, tmp_path):
    code, _, err = run(capsys, "optimize", "mlp", "-o", str(tmp_path / "m"), "--opset", "18")
    assert code == 2 and "--opset only apply to --target onnx" in err
    assert list(tmp_path.iterdir()) == []


def test_check_trt_exit_codes(capsys, tmp_path):
    import onnx
    from onnx import TensorProto, helper

    assert run(capsys, "optimize", "mlp", "--target", "onnx", "-o", str(tmp_path / "m"))[0] == 0
    model = str(tmp_path / "m" / "model.onnx")
    code, out, _ = run(capsys, "check-trt", model)
    assert code == 0 and "unbounded-dynamic-dim" in out and "0 blockers" in out
    code, out, _ = run(capsys, "check-trt", model, "--bound", "batch=1,4,16", "--trt-version", "11")
    assert code == 0 and "0 blockers, 0 warnings" in out
    node = helper.make_node("Unique", ["x"], ["y"], name="dedupe")
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])
    graph = helper.make_graph([node], "g", [x], [y])
    bad = tmp_path / "bad.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(bad))
    code, out, _ = run(capsys, "check-trt", str(bad), "--json")
    data = json.loads(out)
    assert code == 1 and any(f["node"] == "dedupe" and f["severity"] == "blocker"
                             for f in data["findings"])
    code, _, err = run(capsys, "check-trt", model, "--bound", "batch=1,4")
    assert code == 2 and "NAME=MIN,OPT,MAX" in err


def test_optimize_static_int8_to_onnx(capsys, tmp_path):
    code, out, err = run(capsys, "optimize", "resnet", "--pipeline",
                         "default,quantize(scheme=int8,target=ort)", "--target", "onnx",
                         "-o", str(tmp_path / "q"), "--calibration-batches", "3",
                         "--report-json", str(tmp_path / "report.json"))
    assert code == 0, err
    # all 3 batches calibrated, shown as a tqdm bar on a terminal, not a line per batch
    report = json.loads((tmp_path / "report.json").read_text())
    assert next(r for r in report if r["name"] == "quantize")["stats"][
        "calibration_batches"] == 3
    assert "calibrating" not in err
    assert fxopt.load(tmp_path / "q").manifest["verified"]


def test_help_states_the_real_defaults(capsys):
    from fxopt.cli import DEFAULT_OPSET, build_parser
    from fxopt.lowering.onnx import DEFAULT_OPSET as LOWERING_OPSET
    from fxopt.lowering.onnx import lower

    assert DEFAULT_OPSET == LOWERING_OPSET == inspect.signature(lower).parameters["opset"].default
    optimize = next(a for a in build_parser()._actions if a.dest == "command").choices["optimize"]
    text = optimize.format_help()
    assert f"default {LOWERING_OPSET})" in text and "default 18" not in text
    for action in optimize._actions:
        if action.default not in (None, False) and action.help and action.dest != "help":
            assert str(action.default) in action.help or "default pipeline" in action.help, \
                action.dest


def test_optimize_prints_no_line_per_calibration_batch(capsys, tmp_path):
    code, out, err = run(capsys, "optimize", "mlp", "--pipeline",
                         "default,quantize(scheme=int8)", "--calibration-batches", "5", "-o",
                         str(tmp_path / "q"))
    assert code == 0, err
    assert "calibrating" not in err  # a tqdm bar on a terminal, nothing in a log
    assert "[1/" in err  # the per-pass lines stay


# --------------------------------------------------------------------------- calibration data
DIGITS = str(Path(__file__).with_name("digits_data.py"))


def _digits_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits_data", DIGITS)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("factory", ["batches", "tuple_batches"])
def test_optimize_calibrates_on_real_batches_from_a_factory(capsys, tmp_path, factory):
    data = _digits_module()
    report = tmp_path / "r.json"
    code, _, err = run(capsys, "optimize", f"{DIGITS}:model", "--pipeline",
                       "quantize(scheme=int8)", "--calibration-data", f"{DIGITS}:{factory}",
                       "-o", str(tmp_path / "m"), "--report-json", str(report))
    assert code == 0, err
    assert f"calibration: {data.BATCHES} batches from" in err
    (quant,) = [r for r in json.loads(report.read_text()) if r["name"].startswith("quantize")]
    assert quant["stats"]["calibration_batches"] == data.BATCHES
    # --calibration-batches caps how many of the factory's batches are used
    code, _, err = run(capsys, "optimize", f"{DIGITS}:model", "--pipeline",
                       "quantize(scheme=int8)", "--calibration-data", f"{DIGITS}:{factory}",
                       "--calibration-batches", "2", "-o", str(tmp_path / "m2"))
    assert code == 0 and "calibration: 2 batches from" in err


def test_calibration_data_from_a_package_module(monkeypatch):
    from fxopt.cli import load_calibration

    data = _digits_module()
    monkeypatch.syspath_prepend(str(Path(DIGITS).parent))
    _, example = data.model()
    batches = load_calibration("digits_data:batches", example)
    assert len(batches) == data.BATCHES
    assert all(torch.equal(b[0], ref) for b, ref in zip(batches, data.batches(), strict=True))


@pytest.mark.parametrize(("factory", "needle"), [
    ("wrong_width", "batch 1, input 0 is (4, 65) float32; the model takes 1 input(s): (N, 64) "
                    "float32"),
    ("wrong_count", "batch 0 is ((4, 64) float32, (4, 64) float32); the model takes 1 input(s)"),
    ("not_iterable", "returned int, not an iterable of batches"),
    ("fails", "the factory raised RuntimeError: dataset not mounted"),
    ("empty", "yielded no batches"),
    ("missing", "has no attribute 'missing'"),
])
def test_bad_calibration_data_is_a_spec_error_and_writes_nothing(capsys, tmp_path, factory,
                                                                needle):
    out = tmp_path / "m"
    code, _, err = run(capsys, "optimize", f"{DIGITS}:model", "--pipeline",
                       "quantize(scheme=int8)", "--calibration-data", f"{DIGITS}:{factory}",
                       "-o", str(out))
    assert code == 2 and needle in err and "--calibration-data" in err
    assert not out.exists()


def test_bad_calibration_spec_names_the_flag():
    from fxopt.cli import load_calibration

    with pytest.raises(SpecError, match="file.py:factory or package.module:factory"):
        load_calibration("no_colon", (torch.randn(1, 64),))
    with pytest.raises(SpecError, match="--calibration-data nowhere/data.py:f: file "
                                        "'nowhere/data.py' does not exist"):
        load_calibration("nowhere/data.py:f", (torch.randn(1, 64),))
    with pytest.raises(SpecError, match="--calibration-data no_such_pkg.data:f: cannot import"):
        load_calibration("no_such_pkg.data:f", (torch.randn(1, 64),))


def test_optimize_prune_prints_the_per_layer_table(capsys, tmp_path):
    code, out, err = run(capsys, "optimize", "resnet", "--pipeline", "default,prune(macs=0.5)",
                         "-o", str(tmp_path / "m"), "--report-json", str(tmp_path / "r.json"),
                         "--prune-plot", str(tmp_path / "kept.png"))
    assert code == 0, err
    assert_png(tmp_path / "kept.png")
    assert f"wrote kept-channels chart to {tmp_path / 'kept.png'}" in out
    record = next(r for r in json.loads((tmp_path / "r.json").read_text())
                  if r["name"] == "prune")
    report = record["stats"]["report"]
    assert "achieved: params" in out and "MACs" in out
    for row in report["layers"]:  # every layer's before -> after figures are printed
        line = next(ln for ln in out.splitlines() if ln.startswith(row["layer"] + " "))
        assert f"{row['params_before']} -> {row['params_after']}" in line
        assert f"{row['macs_before']} -> {row['macs_after']}" in line
    assert abs(report["achieved"]["macs"] - 0.5) <= 0.03
    achieved = f"{report['totals']['macs_after'] / report['totals']['macs_before']:.1%}"
    assert f"target 50.0% of MACs, achieved {achieved}" in out
    assert "NOT EXACT" not in out and "(not exact)" not in out
    # the "before" of the table is the graph the default pipeline handed to prune
    model, inputs, _ = load_spec("resnet")
    cleaned = fxopt.optimize(model, inputs, "default").module
    assert report["totals"]["macs_before"] == fxopt.inspect(cleaned).macs
    written = fxopt.inspect(fxopt.load(tmp_path / "m").module, inputs)  # the artifact
    assert (report["totals"]["params_after"], report["totals"]["macs_after"]) == \
        (written.params, written.macs)


def test_optimize_prune_hidden_prints_which_groups_are_not_exact(capsys, tmp_path):
    code, out, err = run(capsys, "optimize", "transformer", "--pipeline",
                         "default,prune(ratio=0.5,hidden=True)", "-o", str(tmp_path / "m"),
                         "--report-json", str(tmp_path / "r.json"))
    assert code == 0, err
    record = next(r for r in json.loads((tmp_path / "r.json").read_text())
                  if r["name"] == "prune")
    (entry,) = record["stats"]["report"]["not_exact"]
    line = next(ln for ln in out.splitlines() if ln.startswith("NOT EXACT"))
    assert f"group {entry['group']}" in line and "normalizes" in line
    assert "embed" in entry["layers"] and all(x in line for x in entry["layers"][:4])
    marked = [ln.split()[0] for ln in out.splitlines() if ln.endswith("(not exact)")]
    assert "embed" in marked and set(marked) <= set(entry["layers"])
    assert "target ratio 0.500" in out


@pytest.mark.parametrize(("pipeline", "plot", "needle"), [
    ("default", "kept.png", "needs a prune pass"),
    ("prune(ratio=0.5)", "kept.svg", "give a .png path"),
    ("prune(ratio=0.5)", "nowhere/kept.png", "give a .png path"),
])
def test_prune_plot_mistakes_fail_before_any_work(capsys, tmp_path, pipeline, plot, needle):
    code, _, err = run(capsys, "optimize", "resnet", "--pipeline", pipeline, "-o",
                       str(tmp_path / "m"), "--prune-plot", str(tmp_path / plot))
    assert code == 2 and needle in err
    assert list(tmp_path.iterdir()) == []  # no artifact, no chart
