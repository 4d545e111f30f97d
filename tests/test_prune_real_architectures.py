"""Structured pruning of Hugging Face architectures nobody here wrote (tests/real_architectures.py:
small configs, seeded random weights, no download) through the public API, checked against
masked twins built from the JSON plan alone.

``fxopt.optimize(model, inputs, "prune(ratio=0.5)")`` (capture mode auto) gives a pruned graph
and ``stats["plan"]``. The plan is round-tripped through JSON; the twin is a deep copy of the
*user's* model with every consumer slice of every exact group zeroed, located only by the
plan's state_dict key, dim and indices — once by ``fxopt.prune.masked_twin`` and once by the
independent ``_state_dict_twin`` below (``load_state_dict`` on a zeroed copy of the
state_dict, so tied weights are handled the way torch handles them). Both must equal the
pruned graph on fresh inputs to float round-off.

Models where nothing is exactly prunable are in ``NOTHING_EXACT``: the typed PassError
must give the listed reasons. Models where the pass fails are strict xfails in ``XFAIL``
with the reason measured; the
groups each model refuses, and why, are checked to carry a reason (``stats["refused"]``,
the same reasons ``fxopt.prune.groups`` gives). Nothing here loosens the check.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

import fxopt
from fxopt import PassError
from fxopt.prune import masked_twin
from fxopt.verify import EXACT, compare_outputs

pytest.importorskip("transformers")

from real_architectures import ARCHITECTURES  # noqa: E402  (needs transformers)

pytestmark = pytest.mark.slow  # every test builds a third-party model

XFAIL: dict[str, str] = {}
# models where nothing can be pruned exactly: the typed PassError must give these reasons
NOTHING_EXACT: dict[str, tuple[str, ...]] = {
    # GRN divides by the mean over channels of its spatial norms; the rest sits under
    # LayerNorm or reaches the output
    "convnext-v2": ("mean", "mixes channels", "normalizes over axis", "reaches the graph output"),
}


def _state_dict_twin(model: torch.nn.Module, plan: list[dict]) -> torch.nn.Module:
    """The masked twin rebuilt independently of fxopt: zero, in a copy of the state_dict,
    ``indices`` along ``dim`` of every consumer member of every exact group."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for group in plan:
        if not group["exact"]:
            continue
        for m in group["members"]:
            if m["role"] == "consumer" and m["indices"]:
                t = state[m["param"]]
                assert max(m["indices"]) < t.shape[m["dim"]], m
                t.index_fill_(m["dim"], torch.tensor(m["indices"], dtype=torch.long), 0)
    twin = copy.deepcopy(model)
    twin.load_state_dict(state)
    return twin.eval()


def _params(plan_model: torch.nn.Module) -> int:
    return sum(p.numel() for p in plan_model.parameters())


@pytest.mark.parametrize("name", [
    pytest.param(n, marks=pytest.mark.xfail(reason=XFAIL[n], strict=True)) if n in XFAIL else n
    for n in ARCHITECTURES])
def test_pruned_equals_masked_twin_from_plan(name):
    arch = ARCHITECTURES[name]
    model = arch.build()
    before = copy.deepcopy(model.state_dict())
    if name in NOTHING_EXACT:
        with pytest.raises(PassError, match="nothing in this model can be pruned exactly") as e:
            fxopt.optimize(model, arch.make_inputs(), "prune(ratio=0.5)")
        assert all(why in str(e.value) for why in NOTHING_EXACT[name]), str(e.value)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        return
    res = fxopt.optimize(model, arch.make_inputs(), "prune(ratio=0.5)")
    record = res.report.records[-1]
    stats = record.stats
    plan = json.loads(json.dumps(stats["plan"]))  # only the JSON plan from here on
    assert record.modified and plan, stats.get("refused")
    res.module.graph.lint()
    # the user's model is untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # every member is a tensor of the user's model, with in-range, original-numbered indices
    sd = model.state_dict()
    for g in plan:
        assert g["exact"] is True and g["removed_units"] > 0
        assert any(m["role"] == "producer" and m["indices"] for m in g["members"])
        for m in g["members"]:
            assert m["param"] in sd, m["param"]
            assert m["role"] in ("producer", "consumer", "passthrough")
            size = sd[m["param"]].shape[m["dim"]]
            assert m["indices"] == sorted(set(m["indices"]))
            assert len(m["indices"]) < size and max(m["indices"], default=0) < size
    # refused groups are reported with their reason, and are disjoint from the plan
    planned = {(m["param"], m["dim"]) for g in plan for m in g["members"]}
    for r in stats["refused"]:
        assert r["reasons"] and all(isinstance(s, str) and s for s in r["reasons"]), r
    assert stats["prunable"] == len(plan)

    # the pruned graph stores fewer parameters
    assert record.params[1] < record.params[0]
    pruned_params = _params(res.module)
    assert pruned_params < _params(model)

    fresh = arch.make_inputs(batch=2, seed=1)
    with torch.no_grad():
        got = res.module(*fresh)
        original = model(*fresh)
        ours = _state_dict_twin(model, plan)(*fresh)
        theirs = masked_twin(model, plan)(*fresh)
    for want in (ours, theirs):
        report = compare_outputs(want, got, EXACT)
        assert report.ok(EXACT), (name, report.rel)
    assert not compare_outputs(original, got, EXACT).ok(EXACT)  # pruning changed something
    assert planned  # at least one member was located by the plan alone


@pytest.mark.parametrize("name", ["resnet", "mobilenet-v2", "convnext"])
def test_a_plan_made_after_default_applies_to_the_users_model(name, tmp_path):
    """``default,prune(ratio=0.5)`` folds batch norms (and layer scales) first; the plan
    still names only the user's state_dict keys (the folded tensors as passthrough
    members), its state_dict twin equals the pruned graph, and replaying the JSON plan
    after ``default`` gives the same weights."""
    arch = ARCHITECTURES[name]
    model = arch.build()
    res = fxopt.optimize(model, arch.make_inputs(), "default,prune(ratio=0.5)")
    plan = json.loads(json.dumps(res.report.records[-1].stats["plan"]))
    sd = model.state_dict()
    assert plan and all(m["param"] in sd for g in plan for m in g["members"])
    fresh = arch.make_inputs(batch=2, seed=1)
    with torch.no_grad():
        got = res.module(*fresh)
        assert compare_outputs(_state_dict_twin(model, plan)(*fresh), got, EXACT).ok(EXACT)
    path = tmp_path / "plan.json"
    path.write_text(json.dumps(plan))
    again = fxopt.optimize(model, arch.make_inputs(), f"default,prune(plan={str(path)!r})")
    a, b = res.module.state_dict(), again.module.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
