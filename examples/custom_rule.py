"""Custom rewrite rule: fuse ``x * torch.sigmoid(x)`` into ``F.silu(x)`` in a few lines.

A rule is a pattern and a replacement written as plain torch code, plus an optional check
that says why it refuses. Registered as a rule set, it is a pass like any other and can be
named in a pipeline string. ``RuleSet.explain`` tells where and why it did not match.

Run:  python examples/custom_rule.py [OUT_DIR]   (OUT_DIR is not used)
"""

import sys

import torch
import torch.nn.functional as F
from torch import nn

import fxopt
from fxopt.passes.rules import Rule, RuleSet, register_rules


def only_float(match):
    """Refuse (with a reason) unless the input is a floating-point tensor."""
    dtype = match["x"].meta.get("dtype")
    return None if dtype is not None and dtype.is_floating_point else f"input dtype is {dtype}"


silu = Rule(
    "silu_from_sigmoid",
    pattern=lambda x: x * torch.sigmoid(x),  # also matches torch.sigmoid(x) * x
    replacement=lambda x: F.silu(x),
    check=only_float,
)
SILU_RULES = register_rules("silu_rules", RuleSet([silu]))  # now a pass called "silu_rules"


class Gated(nn.Module):
    """Two hand-written SiLUs, and a gate ``h * sigmoid(g)`` that is *not* one."""

    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.gate = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)

    def forward(self, x):
        h = self.fc1(x)
        h = h * torch.sigmoid(h)  # SiLU
        g = self.gate(x)
        h = h * torch.sigmoid(g)  # gated: two different tensors, no SiLU
        y = self.fc2(h)
        return torch.sigmoid(y) * y  # SiLU, operands the other way round


def main() -> None:
    torch.manual_seed(0)
    model = Gated().eval()
    x = torch.randn(4, 16)

    res = fxopt.optimize(model, (x,), pipeline="default,silu_rules")
    print(res.report)
    record = res.report[-1]
    print(f"\n{record.name}: fired {record.stats['fired']} (by op kind {record.stats['by_kind']})")
    assert record.stats["fired"] == {"silu_from_sigmoid": 2}

    kinds = fxopt.ops.count_kinds(res.module)
    print(f"op kinds after: {dict(kinds)}")
    assert kinds["silu"] == 2 and kinds["sigmoid"] == 1 and kinds["mul"] == 1

    # Why did the gate not match? Ask the rule set at every mul node of the result.
    print("\nexplain:")
    for result in SILU_RULES.explain(res.module):
        print(f"  {result}")
    (why,) = SILU_RULES.explain(res.module)
    assert not why and "already bound" in why.reason

    # The same answer comes from the pass itself in debug mode.
    debug = fxopt.optimize(model, (x,), pipeline="silu_rules(debug=true)")
    print(f"\ndebug stats: refused = {debug.report[0].stats['refused']}")

    with torch.no_grad():
        for inputs in ((x,), (torch.randn(7, 16) * 3,)):
            want, got = model(*inputs), res.module(*inputs)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-6), (got - want).abs().max()
    print("\noutputs match the original model")


if __name__ == "__main__":
    _ = sys.argv[1] if len(sys.argv) > 1 else None  # the examples test passes an output dir
    main()
