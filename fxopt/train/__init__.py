"""Recovery training: fine-tune an fxopt graph back to the original model's accuracy.

Modules: ``losses`` (task loss, logit and feature distillation), ``data`` (what a dataset
item is), ``loop`` (``finetune``: AMP, DDP under torchrun, early stop), ``checkpoint``
(atomic, pickle-free, resumable), ``structure`` (masks and fake-quant kept while
training) and ``distributed`` (torchrun processes).
"""

from fxopt.train.data import as_dataset, split_batch
from fxopt.train.losses import DistillLoss, kl_distill, task_loss


def __getattr__(name: str):
    if name in ("finetune", "FinetuneResult"):  # loaded on use: it imports DDP and QAT
        from fxopt.train import loop

        return getattr(loop, name)
    raise AttributeError(f"module 'fxopt.train' has no attribute {name!r}")


__all__ = ["DistillLoss", "FinetuneResult", "as_dataset", "finetune", "kl_distill",
           "split_batch", "task_loss"]
