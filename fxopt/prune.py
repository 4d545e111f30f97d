"""``fxopt.prune``: the public face of structured pruning (``fxopt/passes/prune/``).

Example::

    gs = fxopt.prune.groups(fxopt.capture(model, (x,)))
    gm, replaced, kept = fxopt.prune.decompose_attention(gm, (x,))  # MHA heads, as prune sees
    res = fxopt.optimize(model, (x,), "prune(ratio=0.5)")
    stats = res.report.records[-1].stats
    twin = fxopt.prune.masked_twin(model, stats["plan"])
    print(fxopt.prune.prune_table(stats))          # params / MACs per layer, before -> after
    fxopt.prune.plot_kept(stats, "kept.png")       # bar chart of kept channels per layer
"""

from fxopt.passes.prune import (
    Group,
    Member,
    build_graph,
    decompose_attention,
    groups,
    masked_twin,
    plot_kept,
    prune_table,
    zero_consumers,
)

__all__ = ["Group", "Member", "build_graph", "decompose_attention", "groups", "masked_twin",
           "plot_kept", "prune_table", "zero_consumers"]
