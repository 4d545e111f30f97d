"""fxopt.progress: one progress library (tqdm), quiet unless asked, quiet off a terminal."""

from __future__ import annotations

import pytest
import torch

import fxopt
import fxopt.progress as progress
from fxopt.errors import SpecError


@pytest.fixture
def restore_mode():
    previous = progress.show_progress(False)
    yield
    progress.show_progress(previous)


def test_quiet_by_default_and_visible_when_asked(capsys, restore_mode):
    assert list(progress.bar(range(3), "counting")) == [0, 1, 2]
    with progress.stage("exporting"):
        pass
    assert capsys.readouterr() == ("", "")
    assert list(progress.bar(range(3), "counting", progress="always")) == [0, 1, 2]
    with progress.stage("exporting", progress="always"):
        pass
    err = capsys.readouterr().err
    assert "counting" in err and "exporting" in err


def test_terminal_mode_is_quiet_off_a_terminal(capsys, restore_mode):
    progress.show_progress(True)  # what the fxopt command sets
    list(progress.bar(range(3), "counting"))
    assert capsys.readouterr().err == ""  # pytest's captured stderr is not a terminal
    assert progress.show_progress("always") is True
    list(progress.bar(range(3), "counting"))
    assert "counting" in capsys.readouterr().err


def test_a_bad_mode_is_a_spec_error(restore_mode):
    with pytest.raises(SpecError, match="'always'"):
        progress.show_progress("loud")


def test_onnx_export_and_verification_are_named_stages(zoo_model, capsys, tmp_path,
                                                      restore_mode):
    model, inputs = zoo_model("mlp")
    gm = fxopt.optimize(model, inputs, "default").module
    fxopt.lower(gm, "onnx", inputs, path=tmp_path / "quiet.onnx")
    assert capsys.readouterr().err == ""
    progress.show_progress("always")
    fxopt.lower(gm, "onnx", inputs, path=tmp_path / "shown.onnx")
    err = capsys.readouterr().err
    assert "exporting to ONNX" in err and "verifying in ONNX Runtime" in err


def test_sensitivity_sweeps_show_progress_when_asked(zoo_model, capsys, restore_mode):
    model, inputs = zoo_model("mlp")
    gm = fxopt.optimize(model, inputs, "default").module
    fxopt.quant.sensitivity.dynamic_fallback(gm, [inputs], budget=0.0)
    assert capsys.readouterr().err == ""
    fxopt.quant.sensitivity.dynamic_fallback(gm, [inputs], budget=1.0 - 1e-12,
                                             progress="always")
    err = capsys.readouterr().err
    assert "sensitivity (dynamic int8)" in err and "keeping layers float" in err
    assert torch.is_grad_enabled()
