"""What verification costs: unchanged passes are not re-run, verify="end" checks once and
bisects to the guilty pass, metadata stays right, and the rollback copy stays private."""

from __future__ import annotations

import pytest
import torch
from test_manager import Net  # linear, relu, dropout, x * 1, linear
from test_manager import _relu_to_sigmoid_in_place as _relu_to_sigmoid  # wrong on purpose
from torch import nn

import fxopt
from fxopt import PassError, PassManager, PassResult, Semantics, SpecError
from fxopt.graph_utils import annotate
from fxopt.ops import kind_of


@pytest.fixture
def net():
    torch.manual_seed(3)
    return Net().eval(), (torch.randn(5, 8),)


def _count_runs(module: nn.Module) -> list[int]:
    """A counter of forward runs through ``module`` (a leaf the graph calls)."""
    calls = [0]

    def hook(*_):
        calls[0] += 1

    module.register_forward_hook(hook)
    return calls


def _unchanged(gm, ctx) -> PassResult:
    return PassResult(gm, modified=False)


def _double_fc2_in_place(gm, ctx) -> PassResult:
    """Wrong on purpose, and writes into an existing weight instead of replacing it."""
    with torch.no_grad():
        gm.get_submodule("fc2").weight.mul_(2.0)
    return PassResult(gm, modified=True)


# --------------------------------------------------------------------------- cost
@pytest.mark.parametrize("verify", [True, "each", "end", False])
def test_a_pass_that_changes_nothing_is_not_run_again(net, temp_pass, verify) -> None:
    model, inputs = net
    gm = fxopt.capture(model, inputs, mode="symbolic")
    temp_pass("t_unchanged", _unchanged)
    runs = _count_runs(gm.get_submodule("fc1"))
    res = PassManager("t_unchanged,t_unchanged,t_unchanged", verify=verify).run(gm, inputs)
    assert runs[0] == 1  # the one annotating run at the start, nothing per pass
    assert [r.modified for r in res.report] == [False, False, False]
    assert all(r.max_error == 0.0 for r in res.report)


def test_each_runs_once_per_changed_pass_and_end_once_in_all(net, temp_pass) -> None:
    model, inputs = net
    counts = {}
    for verify in ("each", "end"):
        gm = fxopt.capture(model, inputs, mode="symbolic")
        runs = _count_runs(gm.get_submodule("fc1"))
        PassManager("remove_dropout,eliminate_noops,cleanup", verify=verify).run(gm, inputs)
        counts[verify] = runs[0]
    # start + one per changed pass (remove_dropout, eliminate_noops) / start + the end check
    assert counts == {"each": 3, "end": 2}


def test_optimize_reuses_the_capture_run(net) -> None:
    model, inputs = net
    runs = _count_runs(model.fc1)  # the hook travels with capture's private copy
    fxopt.optimize(model, inputs, "remove_dropout", mode="symbolic", verify="end")
    # capture: model + graph on the example inputs, model + graph on fresh inputs of
    # another batch size; the pipeline: one end check. No run for the manager's start.
    assert runs[0] == 5


def test_verify_takes_only_known_modes(net) -> None:
    with pytest.raises(SpecError, match="'each'"):
        PassManager("cleanup", verify="sometimes")
    assert PassManager("cleanup", verify=True).mode == "each"
    assert PassManager("cleanup", verify=False).mode == "off"


# --------------------------------------------------------------------------- end + bisection
@pytest.mark.parametrize("mode", ["symbolic", "export"])
def test_end_names_the_guilty_pass_by_bisection(net, temp_pass, mode) -> None:
    model, inputs = net
    gm = fxopt.capture(model, inputs, mode=mode)
    temp_pass("t_relu_to_sigmoid", _relu_to_sigmoid)
    relu = next(n.name for n in gm.graph.nodes if kind_of(n) == "relu")
    pipeline = "remove_dropout,eliminate_noops,t_relu_to_sigmoid,cleanup,flatten_modules"
    with pytest.raises(PassError) as info:
        PassManager(pipeline, verify="end").run(gm, inputs)
    end = str(info.value)
    assert "pass t_relu_to_sigmoid changed the model's outputs (found by bisection" in end
    assert "passes before it: remove_dropout, eliminate_noops" in end
    assert f"node {relu!r}" in end
    assert "exact tolerance" in end
    # the same message shape as the check after every pass
    gm = fxopt.capture(model, inputs, mode=mode)
    with pytest.raises(PassError) as info:
        PassManager(pipeline, verify="each").run(gm, inputs)
    each = str(info.value)
    assert end.replace(" (found by bisection after the end-of-pipeline check failed)", "") == each


def test_end_passes_a_good_pipeline_and_reports_the_final_error(net) -> None:
    model, inputs = net
    gm = fxopt.capture(model, inputs, mode="symbolic")
    res = PassManager("remove_dropout,eliminate_noops,cleanup", verify="end").run(gm, inputs)
    torch.testing.assert_close(res.module(*inputs), model(*inputs))
    assert res.report[-1].max_error == 0.0
    assert "-" in str(res.report)  # an error not measured between passes shows as "-"


def test_end_checks_before_a_semantics_changing_pass(net, temp_pass) -> None:
    model, inputs = net
    temp_pass("t_relu_to_sigmoid", _relu_to_sigmoid)

    def double(gm, ctx) -> PassResult:
        out = gm.graph.output_node()
        with gm.graph.inserting_before(out):
            out.args = (gm.graph.call_function(torch.mul, (out.args[0], 2.0)),)
        return PassResult(gm, modified=True)

    temp_pass("t_double", double, Semantics.CHANGES)
    gm = fxopt.capture(model, inputs, mode="symbolic")
    res = PassManager("remove_dropout,t_double,cleanup", verify="end").run(gm, inputs)
    torch.testing.assert_close(res.module(*inputs), 2 * model(*inputs))
    for pipeline in ("t_relu_to_sigmoid,t_double", "t_double,t_relu_to_sigmoid"):
        gm = fxopt.capture(model, inputs, mode="symbolic")
        with pytest.raises(PassError, match="pass t_relu_to_sigmoid changed"):
            PassManager(pipeline, verify="end").run(gm, inputs)


# --------------------------------------------------------------------------- metadata
@pytest.mark.parametrize("verify", ["each", "end", False])
def test_metadata_after_the_pipeline_is_what_a_fresh_run_gives(zoo_case, verify) -> None:
    _, inputs, gm = zoo_case("resnet", "symbolic")
    res = PassManager("default", verify=verify).run(gm, inputs)
    kept = {n.name: (n.meta["shape"], n.meta["dtype"], n.meta["device"])
            for n in res.module.graph.nodes}
    annotate(res.module, inputs)
    fresh = {n.name: (n.meta["shape"], n.meta["dtype"], n.meta["device"])
             for n in res.module.graph.nodes}
    assert kept == fresh
    assert any(kind_of(n) == "conv" for n in res.module.graph.nodes)


# --------------------------------------------------------------------------- rollback copy
def test_the_rollback_copy_is_not_changed_by_a_pass_that_writes_in_place(net, temp_pass):
    model, inputs = net
    temp_pass("t_double_fc2", _double_fc2_in_place)
    before = model.fc2.weight.detach().clone()
    # optimize can make the starting graph again (re-capture): bisection still works
    with pytest.raises(PassError) as info:
        fxopt.optimize(model, inputs, "remove_dropout,t_double_fc2,cleanup", mode="symbolic",
                       verify="end")
    assert "pass t_double_fc2 changed the model's outputs (found by bisection" in str(info.value)
    assert "passes before it: remove_dropout" in str(info.value)
    torch.testing.assert_close(model.fc2.weight, before)  # the user's model is untouched
    # a bare PassManager cannot: it says so instead of blaming the wrong pass
    gm = fxopt.capture(model, inputs, mode="symbolic")
    with pytest.raises(PassError, match="wrote into the graph's weights in place"):
        PassManager("remove_dropout,t_double_fc2,cleanup", verify="end").run(gm, inputs)
    # checked after every pass, the pass is named either way
    gm = fxopt.capture(model, inputs, mode="symbolic")
    with pytest.raises(PassError, match="pass t_double_fc2 changed"):
        PassManager("remove_dropout,t_double_fc2", verify="each").run(gm, inputs)


def test_replaying_for_attribution_leaves_the_optimized_graph_alone(net, temp_pass) -> None:
    """Attribution replays passes on a private copy: the failing run's graph keeps what
    the passes before the culprit did, and nothing is applied twice."""
    model, inputs = net
    gm = fxopt.capture(model, inputs, mode="symbolic")
    temp_pass("t_relu_to_sigmoid", _relu_to_sigmoid)
    with pytest.raises(PassError):
        PassManager("remove_dropout,t_relu_to_sigmoid", verify="end").run(gm, inputs)
    kinds = [kind_of(n) for n in gm.graph.nodes]
    assert "dropout" not in kinds and kinds.count("sigmoid") == 1
