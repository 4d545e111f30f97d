"""Recovery training: losses (distillation), structure keepers (masks, fake-quant), the
loop (AMP, DDP under torchrun), checkpoints."""
