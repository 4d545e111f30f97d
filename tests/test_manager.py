"""PassManager: verification after every pass, errors that name the culprit, tolerances,
instrumentation, dumps, and fxopt.optimize on the whole zoo."""

from __future__ import annotations

import pytest
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt import Pass, PassError, PassManager, PassResult, Semantics, Tolerance, zoo
from fxopt.ops import count_kinds, kind_of, op_of
from fxopt.pipeline import parse_pipeline


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.drop = nn.Dropout(0.1)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        h = F.relu(self.fc1(x))
        return self.fc2(self.drop(h) * 1)


@pytest.fixture
def net():
    torch.manual_seed(3)
    model = Net().eval()
    x = torch.randn(5, 8)
    return model, (x,)


@pytest.fixture(params=["symbolic", "export"])
def captured(request, net):
    model, inputs = net
    return model, inputs, fxopt.capture(model, inputs, mode=request.param)


def _output_node(gm: fx.GraphModule) -> fx.Node:
    return gm.graph.output_node()


def _scale_output(gm: fx.GraphModule, factor: float) -> None:
    out = _output_node(gm)
    (value,) = out.args
    with gm.graph.inserting_before(out):
        scaled = gm.graph.call_function(torch.mul, (value, factor))
    out.args = (scaled,)


def _nudge(factor: float):
    def nudge(gm, ctx) -> PassResult:
        _scale_output(gm, factor)
        return PassResult(gm, modified=True)

    return nudge


def _relu_to_sigmoid_in_place(gm, ctx) -> PassResult:
    """Wrong on purpose: relu becomes sigmoid (the node keeps its name)."""
    for node in gm.graph.nodes:
        if node.op.startswith("call") and kind_of(node) == "relu":
            aten = isinstance(node.target, torch._ops.OpOverload)
            node.target = torch.ops.aten.sigmoid.default if aten else torch.sigmoid
            node.kwargs = {}
    return PassResult(gm, modified=True, stats={"replaced": 1})


def _relu_to_new_sigmoid(gm, ctx) -> PassResult:
    """Wrong on purpose: a new sigmoid node replaces the relu."""
    for node in list(gm.graph.nodes):
        if node.op.startswith("call") and kind_of(node) == "relu":
            with gm.graph.inserting_after(node):
                sig = gm.graph.call_function(torch.sigmoid, (op_of(node).input,))
            node.replace_all_uses_with(sig)
            gm.graph.erase_node(node)
    return PassResult(gm, modified=True)


# --------------------------------------------------------------------------- verification
def test_a_wrong_pass_is_caught_and_named_with_its_history_and_node(captured, temp_pass) -> None:
    model, inputs, gm = captured
    temp_pass("t_relu_to_sigmoid", _relu_to_sigmoid_in_place)
    relu = next(n.name for n in gm.graph.nodes if kind_of(n) == "relu")
    with pytest.raises(PassError) as info:
        PassManager("remove_dropout,eliminate_noops,t_relu_to_sigmoid").run(gm, inputs)
    message = str(info.value)
    assert "pass t_relu_to_sigmoid changed the model's outputs" in message
    assert "passes before it: remove_dropout, eliminate_noops" in message
    assert f"node {relu!r}" in message
    assert "exact tolerance" in message
    assert not isinstance(info.value, AssertionError)


def test_a_new_node_that_goes_wrong_is_the_one_blamed(captured, temp_pass) -> None:
    _, inputs, gm = captured
    temp_pass("t_new_sigmoid", _relu_to_new_sigmoid)
    with pytest.raises(PassError) as info:
        PassManager("t_new_sigmoid").run(gm, inputs)
    assert "node 'sigmoid'" in str(info.value)
    assert "passes before it: none" in str(info.value)


def test_a_wrong_output_is_blamed_on_the_node_producing_it(temp_pass) -> None:
    model = nn.Linear(4, 4).eval()
    x = torch.randn(2, 4)
    gm = fxopt.capture(model, (x,), mode="export")

    def negate_output(gm, ctx) -> PassResult:
        _scale_output(gm, -1.0)
        return PassResult(gm, modified=True)

    temp_pass("t_negate", negate_output)
    with pytest.raises(PassError) as info:
        PassManager("t_negate").run(gm, (x,))
    assert "node 'mul'" in str(info.value)


def test_a_pass_that_raises_is_a_pass_error(captured, temp_pass) -> None:
    _, inputs, gm = captured

    def boom(gm, ctx):
        raise ValueError("boom")

    temp_pass("t_boom", boom)
    with pytest.raises(PassError) as info:
        PassManager("dce,t_boom").run(gm, inputs)
    message = str(info.value)
    assert "pass t_boom crashed: ValueError: boom" in message
    assert "passes before it: dce" in message
    assert isinstance(info.value.__cause__, ValueError)


@pytest.mark.parametrize("returned", [None, "gm", (None, True)], ids=["none", "gm", "tuple"])
def test_a_pass_that_returns_something_else_is_a_pass_error(captured, temp_pass, returned):
    _, inputs, gm = captured

    def sloppy(gm, ctx):
        return gm if returned == "gm" else returned

    temp_pass("t_sloppy", sloppy)
    with pytest.raises(PassError, match=r"pass t_sloppy returned .*not PassResult"):
        PassManager("t_sloppy").run(gm, inputs)


def test_a_pass_that_breaks_the_graph_is_a_pass_error(captured, temp_pass) -> None:
    _, inputs, gm = captured

    def use_before_define(gm, ctx) -> PassResult:
        nodes = [n for n in gm.graph.nodes if n.op.startswith("call")]
        first, last = nodes[0], nodes[-1]
        with gm.graph.inserting_before(first):
            gm.graph.call_function(torch.neg, (last,))
        return PassResult(gm, modified=True)

    temp_pass("t_break", use_before_define)
    with pytest.raises(PassError) as info:
        PassManager("remove_identity,t_break").run(gm, inputs)
    message = str(info.value)
    assert "pass t_break left a graph that is invalid" in message
    assert "passes before it: remove_identity" in message


def test_after_each_pass_the_graph_is_recompiled_and_annotated(captured, temp_pass) -> None:
    model, inputs, gm = captured

    def double_negate(gm, ctx) -> PassResult:
        out = _output_node(gm)
        (value,) = out.args
        with gm.graph.inserting_before(out):
            a = gm.graph.call_function(torch.neg, (value,))
            b = gm.graph.call_function(torch.neg, (a,))
        out.args = (b,)
        return PassResult(gm, modified=True)  # no recompile, no metadata: the manager's job

    temp_pass("t_double_negate", double_negate)
    res = PassManager("t_double_negate").run(gm, inputs)
    new = [n for n in res.module.graph.nodes if n.target is torch.neg]
    assert len(new) == 2
    for node in new:
        assert node.meta["shape"] == (5, 4)
        assert node.meta["dtype"] == torch.float32
    assert "torch.neg" in res.module.code
    torch.testing.assert_close(res.module(*inputs), model(*inputs))


# --------------------------------------------------------------------------- tolerances
def test_an_approximate_change_fails_the_exact_tolerance(captured, temp_pass) -> None:
    _, inputs, gm = captured
    temp_pass("t_nudge", _nudge(1 + 1e-3))
    with pytest.raises(PassError, match="t_nudge"):
        PassManager("t_nudge").run(gm, inputs)


@pytest.mark.parametrize("how", ["pass", "manager", "by-name", "by-semantics"])
def test_a_tolerance_override_lets_an_expected_change_through(captured, temp_pass, how) -> None:
    model, inputs, gm = captured
    temp_pass("t_nudge", _nudge(1 + 1e-3))
    loose = Tolerance(rtol=1e-2, atol=1e-3)
    if how == "pass":
        manager = PassManager([Pass("t_nudge", tolerance=loose)])
    elif how == "manager":
        manager = PassManager("t_nudge", tolerance=loose)
    elif how == "by-name":
        manager = PassManager("t_nudge", tolerance={"t_nudge": loose})
    else:
        manager = PassManager("t_nudge", tolerance={"exact": loose})
    res = manager.run(gm, inputs)
    (record,) = res.report
    assert 5e-4 < record.max_error < 2e-3
    torch.testing.assert_close(res.module(*inputs), model(*inputs) * (1 + 1e-3))


def test_a_tolerance_for_another_pass_does_not_apply(captured, temp_pass) -> None:
    _, inputs, gm = captured
    temp_pass("t_nudge", _nudge(1 + 1e-3))
    with pytest.raises(PassError):
        PassManager("t_nudge", tolerance={"dce": Tolerance(rtol=1, atol=1)}).run(gm, inputs)


def test_a_per_pass_tolerance_beats_the_managers(captured, temp_pass) -> None:
    _, inputs, gm = captured
    temp_pass("t_nudge", _nudge(1 + 1e-3))
    strict = Tolerance(rtol=1e-6, atol=1e-7)
    manager = PassManager([Pass("t_nudge", tolerance=strict)], tolerance=Tolerance(rtol=1, atol=1))
    with pytest.raises(PassError, match="rtol=1e-06"):
        manager.run(gm, inputs)


@pytest.mark.parametrize(("factor", "ok"), [(1 + 1e-3, True), (1.5, False)])
def test_approximate_passes_get_the_approximate_tolerance(captured, temp_pass, factor, ok):
    _, inputs, gm = captured
    temp_pass("t_approx", _nudge(factor), Semantics.APPROXIMATE)
    manager = PassManager("t_approx")
    if ok:
        (record,) = manager.run(gm, inputs).report
        assert record.semantics == "approximate"
    else:
        with pytest.raises(PassError, match="approximate tolerance"):
            manager.run(gm, inputs)


def test_changes_passes_are_not_verified_and_later_passes_compare_to_them(
    captured, temp_pass
) -> None:
    model, inputs, gm = captured
    temp_pass("t_double", _nudge(2.0), Semantics.CHANGES)
    temp_pass("t_relu_to_sigmoid", _relu_to_sigmoid_in_place)
    res = PassManager("t_double,cleanup").run(gm, inputs)
    assert [r.name for r in res.report] == ["t_double", "cleanup"]
    assert res.report[0].max_error == pytest.approx(1.0, rel=1e-4)
    torch.testing.assert_close(res.module(*inputs), 2 * model(*inputs))
    # an exact pass after a changing one is still checked, against the changed outputs
    with pytest.raises(PassError, match="passes before it: t_double"):
        PassManager("t_double,t_relu_to_sigmoid").run(gm, inputs)


def test_verify_false_skips_the_numeric_check(captured, temp_pass) -> None:
    _, inputs, gm = captured
    temp_pass("t_relu_to_sigmoid", _relu_to_sigmoid_in_place)
    res = PassManager("t_relu_to_sigmoid", verify=False).run(gm, inputs)
    assert res.report[0].max_error > 1e-3


# --------------------------------------------------------------------------- report and dumps
def test_the_report_has_a_row_per_pass_with_the_numbers(zoo_case) -> None:
    _, inputs, gm = zoo_case("mlp", "symbolic")
    res = PassManager("remove_dropout,cleanup,dce").run(gm, inputs)
    report = res.report
    assert len(report) == 3
    first, second, third = report
    assert [r.spec for r in report] == ["remove_dropout", "cleanup", "dce"]
    assert first.modified and not second.modified and not third.modified
    assert first.stats == {"removed": 2}
    assert first.nodes == (7, 5) and second.nodes == (5, 5)
    params = 64 * 128 + 128 + 128 * 128 + 128 + 128 * 10 + 10
    macs = 4 * (64 * 128 + 128 * 128 + 128 * 10)
    assert first.params == (params, params)
    assert first.macs == (macs, macs)
    assert all(r.seconds >= 0 for r in report)
    assert all(r.max_error == 0.0 for r in report)
    assert all(r.semantics == "exact" for r in report)
    assert report.to_dict()[0]["name"] == "remove_dropout"
    assert res.module.meta["fxopt"]["pipeline"] == ["remove_dropout", "cleanup", "dce"]

    table = str(report)
    lines = table.splitlines()
    assert lines[0].split() == [
        "pass",
        "sem",
        "changed",
        "time",
        "ms",
        "nodes",
        "params",
        "MACs",
        "max",
        "err",
    ]
    assert set(lines[1]) <= {"-", " "}
    assert len(lines) == 2 + 3
    assert lines[2].split()[:5] == ["remove_dropout", "exact", "yes", lines[2].split()[3], "7"]
    assert "7 -> 5" in lines[2]
    assert "26.12k" in lines[2] and "103.42k" in lines[2]
    assert "0.00e+00" in lines[2]
    assert table == report.table()


def test_dump_dir_writes_code_before_and_after_each_pass(zoo_case, tmp_path) -> None:
    _, inputs, gm = zoo_case("mlp", "symbolic")
    dumps = tmp_path / "dumps"
    PassManager("cleanup,dce", dump_dir=dumps).run(gm, inputs)
    assert sorted(p.name for p in dumps.iterdir()) == [
        "00_cleanup.after.py",
        "00_cleanup.before.py",
        "01_dce.after.py",
        "01_dce.before.py",
    ]
    before = (dumps / "00_cleanup.before.py").read_text()
    after = (dumps / "00_cleanup.after.py").read_text()
    assert "def forward" in before and "def forward" in after
    assert "net_2" in before and "net_2" not in after  # the first dropout, by name
    assert (dumps / "01_dce.before.py").read_text() == after


def test_a_pass_that_fails_verification_is_not_dumped(captured, temp_pass, tmp_path) -> None:
    _, inputs, gm = captured
    temp_pass("t_relu_to_sigmoid", _relu_to_sigmoid_in_place)
    with pytest.raises(PassError):
        PassManager("dce,t_relu_to_sigmoid", dump_dir=tmp_path).run(gm, inputs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["00_dce.after.py", "00_dce.before.py"]


def test_progress_is_reported_per_pass(captured) -> None:
    _, inputs, gm = captured
    seen: list[str] = []
    PassManager("remove_dropout,cleanup(max_rounds=2)", progress=seen.append).run(gm, inputs)
    assert seen == ["[1/2] remove_dropout", "[2/2] cleanup(max_rounds=2)"]


# --------------------------------------------------------------------------- optimize
@pytest.mark.parametrize("name", zoo.names())
def test_optimize_default_works_on_every_zoo_model(name, zoo_model, fresh_inputs) -> None:
    model, inputs = zoo_model(name)
    res = fxopt.optimize(model, inputs, "default")
    assert isinstance(res.module, fx.GraphModule)
    assert res.capture["frontend"] == ("symbolic" if zoo.get(name).symbolic else "export")
    assert [r.name for r in res.report] == [p.name for p in parse_pipeline("default")]
    res.module.graph.lint()
    kinds = count_kinds(res.module)
    assert kinds["dropout"] == 0 and kinds["identity"] == 0
    with torch.no_grad():
        torch.testing.assert_close(res.module(*inputs), model(*inputs), rtol=1e-4, atol=1e-5)
        fresh = fresh_inputs(inputs)
        torch.testing.assert_close(res.module(*fresh), model(*fresh), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(res.reference, model(*inputs), rtol=1e-4, atol=1e-5)


def test_optimize_takes_a_captured_graph_without_touching_it(zoo_case) -> None:
    model, inputs, gm = zoo_case("mlp", "export")
    code = gm.code
    res = fxopt.optimize(gm, inputs, "cleanup")
    assert gm.code == code  # the caller's graph is left alone
    assert res.module is not gm
    assert res.capture["frontend"] == "export"
    assert count_kinds(res.module)["dropout"] == 0
    assert count_kinds(gm)["dropout"] == 2


def test_optimize_passes_capture_options_through() -> None:
    model, inputs = zoo.load("dynamic")
    with pytest.raises(fxopt.CaptureError, match="mode='export'"):
        fxopt.optimize(model, inputs, "default", mode="symbolic")
    res = fxopt.optimize(model, inputs, "default", mode="export", dynamic_batch=False)
    assert res.capture["dynamic_batch"] is False


# --------------------------------------------------------------------------- tolerances themselves
def test_the_cosine_floor_is_an_extra_condition_not_a_way_out() -> None:
    from fxopt.verify import APPROXIMATE, EXACT, compare_outputs

    want = torch.linspace(-1, 1, 100)
    assert compare_outputs(want, want * (1 + 1e-3), APPROXIMATE).ok()
    assert not compare_outputs(want, want * (1 + 1e-3), EXACT).ok()
    # cosine is blind to scale: 1.5x too large has cosine 1.0 and must still fail
    assert not compare_outputs(want, want * 1.5, APPROXIMATE).ok()
    # within rtol of a large outlier, but pointing elsewhere: the floor catches it
    want = torch.cat([want, torch.tensor([100.0])])
    got = want.clone()
    got[:100:2] = 0.0
    strict_direction = Tolerance(rtol=5e-2, atol=1e-3, min_cosine=0.99999)
    assert compare_outputs(want, got, Tolerance(rtol=5e-2, atol=1e-3)).ok()
    assert not compare_outputs(want, got, strict_direction).ok()
    assert not compare_outputs(want, torch.full_like(want, float("nan")), APPROXIMATE).ok()
