"""The learning-rate schedule shared by the trainer and the warm start (pure)."""

from __future__ import annotations

import math
from typing import Literal

Schedule = Literal["constant", "linear", "cosine"]


def lr_at(step: int, lr: float, warmup_steps: int, decay_end: int,
          schedule: Schedule = "cosine", min_lr_ratio: float = 0.0) -> float:
    """Learning rate of optimizer step `step` (0-based).

    Linear warm-up from lr / warmup_steps to lr over the first warmup_steps steps; then
    constant, or a linear / cosine decay from lr to min_lr_ratio * lr, reached at step
    `decay_end` and held after it (at once when decay_end <= warmup_steps).

    The trainer passes lr=1.0 and gets LambdaLR's multiplier. Written as lr * (step + 1) /
    warmup_steps and lr * (floor + (1 - floor) * ...) so both callers keep their former
    floating-point results to the last bit (cached warm starts depend on it).
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return lr
    span = decay_end - warmup_steps
    progress = 1.0 if span <= 0 else min(1.0, (step - warmup_steps) / span)
    shape = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * shape)
