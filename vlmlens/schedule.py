"""The learning-rate schedule every trainer here uses: linear warm-up, then a cosine decay."""
from __future__ import annotations

import math


def warmup_cosine(lr: float, step: int, warmup: int, progress: float, min_frac: float = 0.0) -> float:
    """``lr`` at ``step``: scaled by ``(step + 1) / warmup`` during the first ``warmup`` steps, and by a
    cosine from 1 down to ``min_frac`` as ``progress`` (the fraction of the decay done, clipped to
    0..1) goes from 0 to 1."""
    ramp = min(1.0, (step + 1) / max(1, warmup))
    t = min(max(progress, 0.0), 1.0)
    return lr * ramp * (min_frac + (1 - min_frac) * 0.5 * (1 + math.cos(math.pi * t)))
