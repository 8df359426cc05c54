"""val/cond_gap and its bootstrap interval over caption pairs, on hand-built per-pair terms."""

import numpy as np
import pytest
import torch

from lit_transfusion.cond_gap import cond_gap, cond_gap_interval


def test_value_is_the_relative_drop_averaged_over_levels():
    # Level 0: true 1, shuffled 2 -> 0.5. Level 1: true 3, shuffled 4 -> 0.25. Mean 0.375.
    terms = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]] * 5)  # [5 pairs, 2 levels, 2]
    assert cond_gap(terms) == pytest.approx(0.375)
    # Means over pairs first, then the ratio: pairs (1, 1) and (1, 3) have mean true 1, mean shuffled 2.
    terms = torch.tensor([[[1.0, 1.0]], [[1.0, 3.0]]])
    assert cond_gap(terms) == pytest.approx(0.5)
    # A caption that is ignored gives 0; one that makes things worse gives a negative gap.
    assert cond_gap(torch.tensor([[[2.0, 2.0]]] * 3)) == 0.0
    assert cond_gap(torch.tensor([[[3.0, 2.0]]] * 3)) == pytest.approx(-0.5)


def test_interval_covers_the_value_and_shrinks_with_pairs():
    rng = np.random.default_rng(0)

    def terms(n):  # true loss ~ 0.6 * shuffled with per-pair noise: gap ~0.4
        shuffled = rng.uniform(0.5, 1.5, size=(n, 3))
        true = shuffled * rng.uniform(0.2, 1.0, size=(n, 3))
        return np.stack([true, shuffled], axis=-1)

    small, large = terms(32), terms(2048)
    lo_s, hi_s = cond_gap_interval(small)
    lo_l, hi_l = cond_gap_interval(large)
    assert lo_s <= cond_gap(small) <= hi_s and lo_l <= cond_gap(large) <= hi_l
    assert (hi_l - lo_l) < 0.35 * (hi_s - lo_s)  # ~sqrt(32 / 2048) = 1/8 of the width
    assert lo_l < 0.4 < hi_l or abs(cond_gap(large) - 0.4) < 0.02
    # Identical pairs leave nothing to resample: the interval is the point.
    same = np.tile([[[1.0, 2.0]]], (10, 1, 1))
    assert cond_gap_interval(same) == pytest.approx((0.5, 0.5))
    # Deterministic given the seed.
    assert cond_gap_interval(small, seed=3) == cond_gap_interval(small, seed=3)
