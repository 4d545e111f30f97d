"""Quickstart: capture a model, inspect it, optimize it, write and reload an eager artifact.

Run:  python examples/quickstart.py [OUT_DIR]
"""

import sys
import tempfile

import torch
from torch import nn

import fxopt


class SmallNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        y = torch.relu(self.bn(self.conv(x)))
        y = self.drop(y.mean((2, 3)))
        return self.head(y) * 1  # the "* 1" is a no-op fxopt removes


def main(out_dir: str) -> None:
    model = SmallNet().eval()
    x = torch.randn(2, 3, 32, 32)

    gm = fxopt.capture(model, (x,))
    print(fxopt.inspect(gm))

    res = fxopt.optimize(model, (x,), pipeline="default")
    print(res.report)
    print(fxopt.inspect.diff(gm, res.module))

    artifact = fxopt.lower(res.module, "eager", (x,), path=f"{out_dir}/smallnet")
    reloaded = fxopt.load(artifact.path)
    assert torch.allclose(reloaded(x), model(x), rtol=1e-4, atol=1e-5)
    print(f"reloaded {artifact.path}: outputs match")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp())
