"""Which way a validation metric improves: what the results tables bold and the equal-compute fits expect."""

from __future__ import annotations

HIGHER_IS_BETTER = ("cond_gap", "geneval", "acc")  # words in a metric's name; anything else: lower is better


def higher_is_better(metric: str) -> bool:
    """True if the metric's name says cond_gap, geneval or acc; fid, loss, ppl, mse and anything else: lower."""
    return any(word in metric for word in HIGHER_IS_BETTER)


def arrow(metric: str) -> str:
    """↑ where higher is better, ↓ where lower is (the tables' column heads)."""
    return "↑" if higher_is_better(metric) else "↓"
