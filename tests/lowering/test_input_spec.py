"""Artifacts check their inputs against a recorded spec, and refuse incompatible versions."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import pytest
import torch
import torch.fx as fx
from torch import nn

import fxopt
from fxopt.errors import ArtifactVersionError, InputSpecError, LoweringError
from fxopt.lowering.input_spec import check_inputs, format_spec, spec_for_eager


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 2)

    def forward(self, x, scale):
        return self.fc(self.conv(x).mean((2, 3))) * scale


def _inputs(batch: int = 2):
    return torch.randn(batch, 3, 8, 8), torch.randn(batch, 1)


SPEC_TEXT = "x: float32[batch, 3, 8, 8], scale: float32[batch, 1]"

# (what is wrong, the call's inputs, what the message must say)
MISTAKES = [
    ("count", lambda x, s: (x,), r"takes 2 input\(s\).*got 1"),
    ("dtype", lambda x, s: (x.double(), s), r"'x' has dtype float64, expected float32"),
    ("rank", lambda x, s: (x[0], s), r"'x' has rank 3, expected 4.*got x = float32\[3, 8, 8\]"),
    ("channels", lambda x, s: (torch.randn(2, 5, 8, 8), s),
     r"'x' has size 5 at dim 1, expected 3 \(static\)"),
    ("non-tensor", lambda x, s: (x.tolist(), s), r"'x' must be a tensor.*got x = a list"),
    ("batch mismatch", lambda x, s: (x, torch.randn(3, 1)),
     r"'scale' has size 3 at dim 0, but dynamic dim 'batch' is 2 in x"),
]


@pytest.fixture(scope="module")
def eager_art(tmp_path_factory):
    gm = fxopt.capture(Net().eval(), _inputs(), mode="symbolic")
    return gm, fxopt.lower(gm, "eager", _inputs(), path=tmp_path_factory.mktemp("e") / "art")


@pytest.fixture(scope="module")
def onnx_art(tmp_path_factory):
    gm = fx.symbolic_trace(Net().eval())
    path = tmp_path_factory.mktemp("o") / "m.onnx"
    return gm, fxopt.lower(gm, "onnx", _inputs(), path=path)


def _never_run(*args, **kwargs):
    raise AssertionError("the artifact ran on inputs its spec refuses")


class _NoSession:
    def __init__(self, session):
        self.session = session

    def __getattr__(self, name):
        return _never_run if name == "run" else getattr(self.session, name)


def test_spec_is_recorded(eager_art, onnx_art):
    _, art = eager_art
    assert art.manifest["input_spec"] == [
        {"name": "x", "dtype": "float32", "shape": ["batch", 3, 8, 8]},
        {"name": "scale", "dtype": "float32", "shape": ["batch", 1]},
    ]
    assert fxopt.load(art.path).input_spec == art.manifest["input_spec"]
    assert ", ".join(format_spec(s) for s in onnx_art[1].input_spec) == SPEC_TEXT


@pytest.mark.parametrize("kind", ["eager", "onnx"])
@pytest.mark.parametrize(("mistake", "make", "says"), MISTAKES, ids=[m[0] for m in MISTAKES])
def test_wrong_input_is_refused_before_running(kind, mistake, make, says, eager_art, onnx_art,
                                               monkeypatch):
    _, art = eager_art if kind == "eager" else onnx_art
    art = fxopt.load(art.path)
    if kind == "eager":
        monkeypatch.setattr(art, "module", _never_run)
    else:
        monkeypatch.setattr(art, "session", _NoSession(art.session))
    with pytest.raises(InputSpecError, match=says) as e:
        art(*make(*_inputs()))
    assert SPEC_TEXT in str(e.value)  # names the expected spec
    assert isinstance(e.value, LoweringError) and isinstance(e.value, fxopt.FxoptError)


@pytest.mark.parametrize("kind", ["eager", "onnx"])
@pytest.mark.parametrize("batch", [1, 5])
def test_other_batch_sizes_work(kind, batch, eager_art, onnx_art):
    gm, art = eager_art if kind == "eager" else onnx_art
    x, s = _inputs(batch)
    with torch.no_grad():
        want = gm(x, s)
    got = fxopt.load(art.path)(x, s)
    assert got.shape == (batch, 2) and torch.allclose(got, want, atol=1e-5)


def test_onnx_takes_numpy_and_checks_its_dtype(onnx_art):
    gm, art = onnx_art
    x, s = _inputs(3)
    assert torch.allclose(art(x.numpy(), s.numpy()), gm(x, s).detach(), atol=1e-5)
    with pytest.raises(InputSpecError, match="dtype float64"):
        art(x.numpy().astype(np.float64), s.numpy())


def test_static_batch_is_refused_when_not_dynamic(tmp_path):
    gm = fx.symbolic_trace(Net().eval())
    art = fxopt.lower(gm, "onnx", _inputs(), path=tmp_path / "m.onnx", dynamic=False)
    assert format_spec(art.input_spec[0]) == "x: float32[2, 3, 8, 8]"
    with pytest.raises(InputSpecError, match=r"size 4 at dim 0, expected 2 \(static\)"):
        art(*_inputs(4))


def test_export_capture_keeps_its_dynamic_batch(tmp_path):
    gm = fxopt.capture(Net().eval(), _inputs(), mode="export")
    art = fxopt.lower(gm, "eager", _inputs(), path=tmp_path / "art")
    spec = art.input_spec
    assert spec[0]["shape"][1:] == [3, 8, 8] and isinstance(spec[0]["shape"][0], str)
    assert spec[1]["shape"][0] == spec[0]["shape"][0]  # one batch symbol for both inputs
    x, s = _inputs(4)
    assert torch.allclose(fxopt.load(tmp_path / "art")(x, s), gm(x, s).detach(), atol=1e-5)
    with pytest.raises(InputSpecError, match="expected 3"):
        art(torch.randn(4, 2, 8, 8), s)


def test_eager_keyword_inputs(eager_art):
    gm, art = eager_art
    x, s = _inputs()
    assert torch.allclose(art(x, scale=s), art(x, s))
    with pytest.raises(InputSpecError, match="unexpected keyword.*'bias'"):
        art(x, bias=s)
    with pytest.raises(InputSpecError, match="missing input.*'scale'"):
        art(x=x)


def test_manifest_without_spec_still_loads_unchecked(eager_art, tmp_path):
    _, art = eager_art
    copy = art.save(tmp_path / "old")
    _edit(copy.path / "manifest.json", lambda d: d.pop("input_spec"))
    old = fxopt.load(copy.path)
    assert old.input_spec is None
    assert old(*_inputs(3)).shape == (3, 2)


def test_spec_helpers():
    gm = fx.symbolic_trace(nn.Conv2d(3, 4, 1))
    spec = spec_for_eager(gm, (torch.zeros(1, 3, 8, 8),))
    assert format_spec(spec[0]) == "input: float32[batch, 3, 8, 8]"
    assert spec_for_eager(gm, (torch.zeros(1, 3, 8, 8), torch.zeros(1))) is None
    check_inputs(spec, (torch.zeros(7, 3, 8, 8),), "m")
    with pytest.raises(InputSpecError, match="expected 4"):
        check_inputs(spec, (torch.zeros(7, 3, 8),), "m")


# --------------------------------------------------------------------------- versions


def _edit(path, fn):
    doc = json.loads(path.read_text())
    fn(doc)
    path.write_text(json.dumps(doc))


@pytest.fixture
def eager_copy(eager_art, tmp_path):
    return eager_art[1].save(tmp_path / "copy").path


def test_eager_newer_format_names_both_versions(eager_copy):
    from fxopt.lowering.eager_storage import FORMAT_VERSION, OLDEST_FORMAT_VERSION

    newer = FORMAT_VERSION + 1
    _edit(eager_copy / "manifest.json",
          lambda d: d.update(format_version=newer, fxopt_version="9.1.0", torch_version="2.99.0"))
    with pytest.raises(ArtifactVersionError) as e:
        fxopt.load(eager_copy)
    msg = str(e.value)
    assert f"written by fxopt 9.1.0 with torch 2.99.0 (format_version {newer})" in msg
    assert f"this fxopt reads (fxopt {fxopt.lowering.versions.running_fxopt()} with torch " \
           f"{torch.__version__}, format_version {OLDEST_FORMAT_VERSION}..{FORMAT_VERSION})" in msg
    assert "upgrade fxopt" in msg and "'fxopt>=9.1.0'" in msg and "lower the model again" in msg


def test_eager_older_format_says_relower(eager_copy):
    _edit(eager_copy / "manifest.json", lambda d: d.update(format_version=0))
    with pytest.raises(ArtifactVersionError, match="older than this fxopt still reads.*Lower "
                                                   "the model again"):
        fxopt.load(eager_copy)


def test_eager_other_torch_major_is_refused(eager_copy):
    _edit(eager_copy / "manifest.json", lambda d: d.update(torch_version="3.0.0"))
    with pytest.raises(ArtifactVersionError, match=r"torch major version 3; this is fxopt .* "
                                                   r"with torch " + re.escape(torch.__version__)):
        fxopt.load(eager_copy)


def test_eager_damaged_format_version(eager_copy):
    _edit(eager_copy / "manifest.json", lambda d: d.update(format_version="1"))
    with pytest.raises(ArtifactVersionError, match="damaged"):
        fxopt.load(eager_copy)


def test_load_failure_mentions_differing_versions(eager_copy):
    def edit(d):
        d.update(torch_version="2.0.1")
        d["tensors"]["conv.weight"]["shape"] = [9]

    _edit(eager_copy / "manifest.json", edit)
    with pytest.raises(LoweringError, match=r"written by fxopt .* with torch 2\.0\.1; this is"):
        fxopt.load(eager_copy)


def test_onnx_newer_format_names_both_versions(onnx_art, tmp_path):
    f = onnx_art[1].save(tmp_path / "m.onnx").path
    model = onnx.load_model(str(f))
    prop = next(p for p in model.metadata_props if p.key == "fxopt")
    manifest = json.loads(prop.value)
    assert manifest["format_version"] == 1 and manifest["torch"] == torch.__version__
    prop.value = json.dumps({**manifest, "format_version": 5, "fxopt": "7.0.0"})
    onnx.save_model(model, str(f))
    with pytest.raises(ArtifactVersionError,
                       match=r"written by fxopt 7\.0\.0 with torch .*format_version 5.*"
                             r"upgrade fxopt.*lower the model again"):
        fxopt.load(f)


class BatchBound(nn.Module):
    """Works only at the batch size it was traced with (a reshape bakes it in)."""

    def forward(self, x, table):
        return x.reshape(2, -1).sum(1) + table.sum()


def test_batch_stays_static_where_capture_found_it_fixed(tmp_path):
    inputs = (torch.randn(2, 3), torch.randn(5))
    gm = fxopt.capture(BatchBound(), inputs, mode="symbolic")
    assert gm.meta["fxopt"]["capture"]["dynamic_batch"] is False
    art = fxopt.lower(gm, "eager", inputs, path=tmp_path / "art")
    assert [format_spec(s) for s in art.input_spec] == ["x: float32[2, 3]", "table: float32[5]"]
    with pytest.raises(InputSpecError, match=r"size 3 at dim 0, expected 2 \(static\)"):
        art(torch.randn(3, 3), torch.randn(5))


def test_inputs_of_another_leading_size_keep_it_static(tmp_path):
    gm = fx.symbolic_trace(BatchBound())
    spec = spec_for_eager(gm, (torch.randn(2, 3), torch.randn(5)))
    assert [format_spec(s) for s in spec] == ["x: float32[batch, 3]", "table: float32[5]"]


@pytest.mark.parametrize("bad", [{"x": 1}, [{"name": "x", "shape": "1,3"}], [{"shape": [1]}]])
def test_malformed_spec_fails_at_load(eager_copy, bad):
    _edit(eager_copy / "manifest.json", lambda d: d.update(input_spec=bad))
    with pytest.raises(LoweringError, match="input_spec is malformed"):
        fxopt.load(eager_copy)
