"""``val/cond_gap``: does the caption change the image prediction? The statistic and its bootstrap interval.

Per caption pair and level (noise level, or one level for codes) the representation measures the image loss
under the pair's true caption and under another image's caption (``ImageRepresentation.cond_gap``:
terms [n, levels, 2]). The gap is the relative drop of the mean loss, averaged over levels:

    cond_gap = mean_l (mean_i shuffled[i, l] - mean_i true[i, l]) / mean_i shuffled[i, l]

0 when the caption is ignored, 1 when it removes the whole loss. Its 95 % interval resamples the pairs
(percentile bootstrap, rows resampled whole so that each pair's levels and both captions stay together).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lit_transfusion.stats import bootstrap_interval


def cond_gap(terms: Tensor | np.ndarray) -> float:
    """The gap of terms [n, levels, 2] (true, shuffled) -- see the module docstring."""
    terms = torch.as_tensor(terms, dtype=torch.float64)
    true, shuffled = terms[..., 0].mean(0), terms[..., 1].mean(0)  # [levels]
    return float(((shuffled - true) / shuffled).mean())


def cond_gap_interval(terms: Tensor | np.ndarray, confidence: float = 0.95, resamples: int = 1000,
                      seed: int = 0) -> tuple[float, float]:
    """(low, high): the percentile bootstrap interval of :func:`cond_gap` over pairs (deterministic given seed)."""
    terms = torch.as_tensor(terms, dtype=torch.float64)
    rows = terms.flatten(1).numpy()  # [n, levels * 2]: a pair's terms resampled together
    return bootstrap_interval(rows, lambda r: cond_gap(r.reshape(len(r), *terms.shape[1:])), confidence=confidence,
                              resamples=resamples, seed=seed)
