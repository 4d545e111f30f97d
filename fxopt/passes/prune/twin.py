"""The masked twin: the unpruned graph with only the consumer slices of a plan zeroed.

Removing a channel that no consumer reads changes nothing, so for every exact group the
physically pruned graph must compute what the twin computes, to float round-off. The
twin is built from the plan alone (state_dict keys, dims, roles, indices), so the same
check works on the user's original model.

Example::

    twin = masked_twin(model, plan)          # a copy; ``model`` is untouched
    torch.testing.assert_close(pruned(x), twin(x))
"""

from __future__ import annotations

import torch
from torch import nn

from fxopt.errors import PassError
from fxopt.graph_utils import copy_graph_module
from fxopt.ops import _set_path, fetch_attr
from fxopt.verify import EXACT, compare_outputs


def zero_consumers(module: nn.Module, plan: list[dict], key: str = "param") -> nn.Module:
    """Zero, in ``module`` (in place), every consumer slice of every exact group of ``plan``;
    members are found by their state_dict key (``key="attr"``: by their path in the graph
    module the plan was made on)."""
    for group in plan:
        if not group.get("exact", True):
            continue
        for m in group["members"]:
            if m["role"] != "consumer" or not m["indices"]:
                continue
            try:
                t = fetch_attr(module, m[key])
            except AttributeError:
                raise PassError(
                    f"prune plan: {m[key]!r} is not a tensor of this model; the plan was "
                    "made for another model") from None
            if t.shape[m["dim"]] <= max(m["indices"]):
                raise PassError(
                    f"prune plan: {m['param']} has {t.shape[m['dim']]} entries on dim "
                    f"{m['dim']}, the plan removes index {max(m['indices'])}: it was made "
                    "for another model")
            idx = torch.as_tensor(m["indices"], dtype=torch.long)
            _set_path(module, m[key], t.detach().clone().index_fill_(m["dim"], idx, 0))
    return module


def masked_twin(module: nn.Module, plan: list[dict]) -> nn.Module:
    """A deep copy of ``module`` with the consumer slices of ``plan`` zeroed."""
    return zero_consumers(copy_graph_module(module), plan)


def check_twin(pruned: nn.Module, twin: nn.Module, inputs: tuple) -> float:
    """Run both on ``inputs``; raise ``PassError`` unless they agree to round-off."""
    with torch.no_grad():
        want, got = twin(*inputs), pruned(*inputs)
    report = compare_outputs(want, got, EXACT)
    if not report.ok(EXACT):
        raise PassError(
            f"prune: the pruned graph differs from its masked twin (relative error "
            f"{report.rel:.3g}): a channel flow rule is wrong for an op in a pruned group; "
            "report it with the model, or skip= the group's layers")
    return report.rel
