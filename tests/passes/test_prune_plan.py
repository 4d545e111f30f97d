"""Plans after other passes: ``default,prune(ratio=...)`` then ``default,prune(plan=...)`` on
the original model gives the same graph; the plan names only the user's own state_dict
keys even where ``fold_bn`` merged a batch norm into its conv (the batch norm's tensors are
passthrough members, a bias the fold created is not listed), so the plan applies to the
original model by hand; a plan that does not fit is a PassError naming the member."""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fxopt
from fxopt import PassError, zoo
from fxopt.ops import fetch_attr
from fxopt.verify import EXACT, compare_outputs

CASES = [("resnet", "symbolic"), ("resnet", "export"), ("mobilenet", "export")]


def _run(model, inputs, mode, spec):
    res = fxopt.optimize(model, inputs, spec, mode=mode)
    return res, json.loads(json.dumps(res.report.records[-1].stats["plan"]))


def _state_dict_twin(model, plan):
    """The masked twin from the plan and the user's state_dict alone."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for g in plan:
        for m in g["members"]:
            if m["role"] == "consumer" and m["indices"]:
                state[m["param"]].index_fill_(m["dim"], torch.tensor(m["indices"]), 0)
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin.eval()


def _same(a, b):
    a, b = a.state_dict(), b.state_dict()
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(("name", "mode"), CASES)
def test_a_plan_made_after_default_replays_and_names_the_users_tensors(name, mode, tmp_path):
    model, inputs = zoo.load(name)
    res, plan = _run(model, inputs, mode, "default,prune(ratio=0.5)")
    sd = model.state_dict()
    assert all(m["param"] in sd for g in plan for m in g["members"])
    bns = {k.rpartition(".")[0] for k in sd if k.endswith("running_var")}
    planned = {m["param"] for g in plan for m in g["members"]}
    for g in plan:  # every folded batch norm is there, cut like a conv's rows
        rows = [m["indices"] for m in g["members"] if m["role"] == "producer"]
        for m in g["members"]:
            if m["param"].rpartition(".")[0] in bns:
                assert m["role"] == "passthrough" and m["dim"] == 0 and m["indices"] in rows
    assert any(f"{bn}.running_mean" in planned for bn in bns)
    fresh = zoo.get(name).make_inputs(zoo.get(name).batch)
    with torch.no_grad():
        got = res.module(*fresh)
        assert compare_outputs(_state_dict_twin(model, plan)(*fresh), got, EXACT).ok(EXACT)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    again, plan2 = _run(model, inputs, mode, f"default,prune(plan={str(path)!r})")
    assert plan2 == plan and _same(res.module, again.module)
    assert again.module.code == res.module.code
    # the same plan on the model without the default pipeline: same function
    plain, _ = _run(model, inputs, mode, f"prune(plan={str(path)!r})")
    with torch.no_grad():
        assert compare_outputs(plain.module(*fresh), got, EXACT).ok(EXACT)


def test_the_plan_applies_by_hand_to_the_original_model():
    """Slice every member of the plan in a copy of the user's model (no fxopt): it runs and
    computes what the pruned graph computes, batch norms included."""
    model, inputs = zoo.load("resnet")
    res, plan = _run(model, inputs, "symbolic", "default,prune(ratio=0.5)")
    mine = copy.deepcopy(model)
    cuts = {}
    for g in plan:
        for m in g["members"]:
            cuts.setdefault(m["param"], []).append((m["dim"], m["indices"]))
    for key, dims in cuts.items():
        t = fetch_attr(mine, key).detach()
        for dim, idx in dims:
            keep = [i for i in range(t.shape[dim]) if i not in set(idx)]
            t = t.index_select(dim, torch.tensor(keep))
        owner, _, leaf = key.rpartition(".")
        mod = mine.get_submodule(owner)
        if leaf in mod._parameters:
            mod._parameters[leaf] = torch.nn.Parameter(t.contiguous())
        else:
            mod._buffers[leaf] = t.contiguous()
    x = zoo.get("resnet").make_inputs(2)
    with torch.no_grad():
        assert compare_outputs(mine.eval()(*x), res.module(*x), EXACT).ok(EXACT)


def _tampered(plan, change):
    plan = copy.deepcopy(plan)
    g = next(g for g in plan if len(g["members"]) > 2)
    m = next(m for m in g["members"] if m["role"] == "consumer")
    change(m)
    return plan, m["param"]


@pytest.mark.parametrize(("change", "needle"), [
    (lambda m: m.update(param=m["param"] + "x"), "is not in any prunable channel group"),
    (lambda m: m.update(dim=1 - m["dim"]), "is in another channel group"),
    (lambda m: m.update(indices=[10_000]), "the plan removes index 10000"),
    (lambda m: m.update(indices=m["indices"][1:]), "removes other channels"),
    (lambda m: m.pop("indices"), "has no list of integer 'indices'"),
    (lambda m: m.update(role="both"), "has a 'role' other than"),
])
def test_a_plan_that_does_not_match_names_the_first_mismatching_member(change, needle, tmp_path):
    model, inputs = zoo.load("resnet")
    _, plan = _run(model, inputs, "symbolic", "default,prune(ratio=0.5)")
    bad, member = _tampered(plan, change)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(PassError, match=needle) as info:
        _run(model, inputs, "symbolic", f"default,prune(plan={str(path)!r})")
    assert member.removesuffix("x") in str(info.value)
