"""The learning-rate schedule every trainer of the project uses: linear warmup, then cosine decay to a floor,
driven by steps or by a time budget, whichever runs out first."""

from __future__ import annotations

import math
from typing import Protocol


class Clock(Protocol):
    """What the schedule needs of a time budget (Lightning's ``Timer`` callback, which ``max_time`` adds)."""

    def time_elapsed(self, stage: str = ...) -> float: ...

    def time_remaining(self, stage: str = ...) -> float | None: ...


class WarmupCosine:
    """A ``LambdaLR`` factor: ``(step + 1) / warmup`` for the first ``warmup`` steps, then a cosine from 1 down
    to ``floor`` (a fraction of the peak), constant after it.

    The cosine's progress is the larger of the step fraction ``(step - warmup) / (total - warmup)`` and, with a
    ``time_budget``, the fraction of the budget used: on a machine too slow for ``total`` steps in the budget the
    schedule still ends at ``floor`` when time runs out. ``total = inf`` without a budget keeps the peak.

    Pass ``lambda step: schedule(step)`` to ``LambdaLR`` (LambdaLR would pickle a callable object's attributes,
    the clock included, into every checkpoint).
    """

    def __init__(self, warmup: int, total: float, floor: float, time_budget: Clock | None = None):
        self.warmup, self.total, self.floor, self.clock = warmup, total, floor, time_budget

    def time_fraction(self) -> float:
        """Fraction of the time budget used (0 without one)."""
        if self.clock is None:
            return 0.0
        remaining = self.clock.time_remaining("train")
        if remaining is None:
            return 0.0
        elapsed = self.clock.time_elapsed("train")
        return min(elapsed / max(elapsed + remaining, 1e-9), 1.0)

    def progress(self, step: int) -> float:
        """How much of the whole schedule is done at ``step``, in [0, 1] (1: the learning rate is at its floor)."""
        return max(min(step / self.total, 1.0) if math.isfinite(self.total) else 0.0, self.time_fraction())

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        by_steps = (step - self.warmup) / max(self.total - self.warmup, 1) if math.isfinite(self.total) else 0.0
        if not math.isfinite(self.total) and self.clock is None:
            return 1.0
        progress = min(max(by_steps, self.time_fraction()), 1.0)
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * progress))


def training_timer(trainer) -> Clock | None:
    """The ``Timer`` callback Lightning adds for ``trainer.max_time`` (None without a time budget)."""
    from lightning.pytorch.callbacks import Timer

    return next((c for c in trainer.callbacks if isinstance(c, Timer)), None)


def warmup_cosine(warmup: int, total: float, floor: float):
    """A plain function of the step (no time budget); see :class:`WarmupCosine`."""
    schedule = WarmupCosine(warmup, total, floor)
    return lambda step: schedule(step)
