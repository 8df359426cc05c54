"""Which way a validation metric improves: what the results tables bold and the equal-compute fits expect."""

from __future__ import annotations

# words in a metric's name; anything else (fid, kid, loss, ppl, mse): lower is better
HIGHER_IS_BETTER = ("cond_gap", "geneval", "acc", "caption_precision", "caption_recall", "caption_f1")


def higher_is_better(metric: str) -> bool:
    """True if the metric's name holds a word of ``HIGHER_IS_BETTER``; fid, kid, loss, ppl, mse and anything else:
    lower."""
    return any(word in metric for word in HIGHER_IS_BETTER)


def arrow(metric: str) -> str:
    """↑ where higher is better, ↓ where lower is (the tables' column heads)."""
    return "↑" if higher_is_better(metric) else "↓"
