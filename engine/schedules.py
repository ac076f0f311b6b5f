"""Per-iteration schedules (spec/SIM.md §5.2, §7): learning rate and EMA momentum.

Both are pure functions of the step, so a resumed run recomputes them exactly.
"""
from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, warmup_steps: int, peak_lr: float,
                  min_lr: float = 0.0) -> float:
    """Linear warm-up from 0 over `warmup_steps`, then half-cycle cosine to `min_lr`."""
    if step < warmup_steps:
        return peak_lr * step / warmup_steps
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def ema_momentum(step: int, total_steps: int, base: float = 0.995) -> float:
    """m = 1 − (1 − base)·(1 + cos(π·progress))/2: base at the start, 1.0 at the end."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))
