"""fp16 recovery training on CUDA: autocast with GradScaler, loss scale and skipped steps
in the history (skipped without a GPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "train"))
from train_helpers import digits, mlp  # noqa: E402

import fxopt  # noqa: E402

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def test_fp16_trains_with_gradient_scaling():
    train, val = digits(0, 256), digits(256, 512)
    gm = fxopt.capture(mlp(), (train[0][:2],))
    out = fxopt.finetune(gm, train, epochs=2, lr=5e-3, amp="fp16", val_data=val)
    assert out.amp["dtype"] == "float16"
    assert out.amp["loss_scale"] is not None and out.amp["loss_scale"] > 0
    assert out.amp["skipped_steps"] >= 0
    assert out.history[0]["amp_loss_scale"] is not None
    assert out.best_metric > 0.5
    assert next(out.module.parameters()).device.type == "cpu"  # back where it came from
