"""The learning-rate schedule every LocTex training uses (the engine's runs and the in-process
trainings of ``loctex reproduce``): linear warmup, then cosine decay to ``min_ratio``."""
from __future__ import annotations

import math


def lr_multiplier(step: int, warmup_steps: int, max_steps: int, min_ratio: float) -> float:
    """The factor applied to every group's base lr before optimizer step ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
