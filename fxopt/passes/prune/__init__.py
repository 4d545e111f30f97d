"""Structured pruning: channel groups found from the op table's flow rules, a shrink that
rewrites weights and shape constants, and the masked twin that proves the result.

Example::

    for g in fxopt.prune.groups(gm):
        print(g.id, g.prunable, g.reasons[:1])
    res = fxopt.optimize(model, (x,), "prune(ratio=0.5)")
    res.report.records[-1].stats["plan"]
"""

from fxopt.passes.prune import prune_pass  # noqa: F401 - registers "prune"
from fxopt.passes.prune.attention import decompose_attention
from fxopt.passes.prune.groups import Group, Member, build_graph, groups
from fxopt.passes.prune.report import plot_kept, prune_table
from fxopt.passes.prune.twin import masked_twin, zero_consumers

__all__ = ["Group", "Member", "build_graph", "decompose_attention", "groups", "masked_twin",
           "plot_kept", "prune_table", "zero_consumers"]
