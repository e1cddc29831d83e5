"""Learning rate as a pure function of the optimizer step: linear warm-up, then cosine decay.

Being a function of the step (not a stateful scheduler object) makes resume exact for free.
"""

from __future__ import annotations

import math


def learning_rate(step: int, peak: float, warmup: int, total: int, min_ratio: float) -> float:
    """LR for optimizer step `step` (0-based): warm-up over `warmup` steps, cosine to peak·min_ratio at `total`."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))
