"""``fxopt.prune``: the public face of structured pruning (``fxopt/passes/prune/``).

Example::

    gs = fxopt.prune.groups(fxopt.capture(model, (x,)))
    res = fxopt.optimize(model, (x,), "prune(ratio=0.5)")
    twin = fxopt.prune.masked_twin(model, res.report.records[-1].stats["plan"])
"""

from fxopt.passes.prune import Group, Member, build_graph, groups, masked_twin, zero_consumers

__all__ = ["Group", "Member", "build_graph", "groups", "masked_twin", "zero_consumers"]
