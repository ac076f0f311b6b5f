"""`--checkpoint-activations`: recompute each transformer block in the backward pass instead of
keeping its activations (torch.utils.checkpoint, non-reentrant), for ViT-L/H-size encoders whose
activations do not fit beside a large per-GPU batch.

Only blocks normalised by LayerNorm are wrapped (the ViT encoders, online and target -- the target
runs without grad, where checkpointing is a no-op). Blocks with BatchNorm (SIM's projector and
predictor, ResNet blocks) are left alone: recomputing them would update the running statistics a
second time. Gradients are unchanged (the recomputation is the same arithmetic; tests/test_faults.py
checks them bit for bit); the cost is about one more forward of the wrapped blocks.
"""
from __future__ import annotations

import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from engine.models.vit import Block, FP32LayerNorm


class _Recomputed:
    """The block's forward, run under torch.utils.checkpoint while training with grad."""

    def __init__(self, block: nn.Module):
        self.block, self.forward = block, block.forward

    def __call__(self, x):
        if self.block.training and x.requires_grad:
            return checkpoint(self.forward, x, use_reentrant=False)
        return self.forward(x)


def checkpoint_activations(model: nn.Module) -> int:
    """Wrap every LayerNorm transformer block of `model` in place; returns how many."""
    count = 0
    for module in model.modules():
        if isinstance(module, Block) and isinstance(module.norm1, FP32LayerNorm) \
                and not isinstance(module.forward, _Recomputed):
            module.forward = _Recomputed(module)
            count += 1
    return count


__all__ = ["checkpoint_activations"]
