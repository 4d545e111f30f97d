"""Mixed precision in fxopt.finetune: bf16 autocast on CPU, fp16 refused without CUDA."""

from __future__ import annotations

import pytest
import torch
from train_helpers import digits, mlp

import fxopt
from fxopt.errors import TrainingError
from fxopt.train.loop import finetune

TRAIN, VAL = digits(0, 256), digits(256, 512)


def _graph():
    return fxopt.capture(mlp(), (TRAIN[0][:2],))


def test_bf16_autocast_trains_on_cpu_close_to_fp32():
    seen = []

    def dtype_probe(out, target):  # runs in eval, fp32: the weights stay fp32
        seen.append(out.dtype)
        return float((out.argmax(-1) == target).float().mean())

    fp32 = finetune(_graph(), TRAIN, epochs=3, lr=5e-3, val_data=VAL)
    bf16 = finetune(_graph(), TRAIN, epochs=3, lr=5e-3, val_data=VAL, amp="bf16",
                    metric=dtype_probe)
    assert bf16.amp == {"dtype": "bfloat16", "loss_scale": None, "skipped_steps": 0}
    assert fp32.amp["dtype"] == "float32"
    assert bf16.history[0]["amp_dtype"] == "bfloat16"
    # autocast really ran in bf16: the losses differ from fp32's beyond float round-off
    assert bf16.history[0]["loss"] != pytest.approx(fp32.history[0]["loss"], rel=1e-6)
    assert abs(bf16.best_metric - fp32.best_metric) < 0.05
    assert all(p.dtype == torch.float32 for p in bf16.module.parameters())
    assert seen and all(d == torch.float32 for d in seen)


def test_bf16_forward_runs_in_bf16():
    dtypes = []
    gm = _graph()
    gm.get_submodule("0").register_forward_hook(lambda m, i, o: dtypes.append(o.dtype))
    finetune(gm, TRAIN, epochs=1, amp="bf16")
    assert torch.bfloat16 in dtypes


def test_fp16_needs_cuda():
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: fp16 is allowed")
    with pytest.raises(TrainingError, match="fp16.*CUDA"):
        finetune(_graph(), TRAIN, amp="fp16")
    with pytest.raises(TrainingError, match="amp="):
        finetune(_graph(), TRAIN, amp="int8")
