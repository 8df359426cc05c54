"""The learning-rate schedule every trainer of the project uses: linear warmup, then cosine decay to a floor."""

from __future__ import annotations

import math
from collections.abc import Callable


def warmup_cosine(warmup: int, total: float, floor: float) -> Callable[[int], float]:
    """A ``LambdaLR`` factor: ``(step + 1) / warmup`` for the first ``warmup`` steps, then a cosine from 1 down
    to ``floor`` (a fraction of the peak) at step ``total``, constant after it. ``total = inf`` (a run bounded
    only by time) keeps the peak after warmup."""

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if not math.isfinite(total):
            return 1.0
        progress = min((step - warmup) / max(total - warmup, 1), 1.0)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor
