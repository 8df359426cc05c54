"""Tests for the intervals and the verdict rule (lit_transfusion/stats.py)."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from lit_transfusion.stats import (
    RULE,
    bootstrap_interval,
    mean_interval,
    normal_quantile,
    t_quantile,
    verdict,
    wilson_interval,
)

Z95 = 1.959963984540054  # the two-sided 95 % normal critical value


def test_wilson_known_values():
    """By hand, z = 1.96: 0/10 -> high = (z^2/n) / (1 + z^2/n); 5/10 -> 0.5 -/+ z/(1 + z^2/n) * sqrt(1/40 + z^2/400)."""
    z2n = Z95**2 / 10
    assert wilson_interval(0, 10) == (0.0, pytest.approx(z2n / (1 + z2n), abs=1e-12))
    assert wilson_interval(0, 10)[1] == pytest.approx(0.2775328, abs=1e-6)
    half = Z95 / (1 + z2n) * math.sqrt(0.25 / 10 + Z95**2 / 400)
    assert wilson_interval(5, 10) == pytest.approx((0.5 - half, 0.5 + half), abs=1e-12)
    assert wilson_interval(5, 10) == pytest.approx((0.2365931, 0.7634069), abs=1e-6)
    assert wilson_interval(10, 10) == (pytest.approx(0.7224672, abs=1e-6), 1.0)
    assert wilson_interval(0, 0) == (0.0, 1.0)


def test_wilson_rejects_bad_counts():
    for s, n in [(-1, 10), (11, 10), (0.5, 10)]:
        with pytest.raises(ValueError):
            wilson_interval(s, n)


def test_wilson_coverage_near_nominal():
    """Simulated Binomial(n, p) rates: the 95 % interval covers p about 95 % of the time."""
    rng = np.random.default_rng(0)
    for n, p in [(30, 0.5), (50, 0.2), (100, 0.63)]:
        hits = [lo <= p <= hi for lo, hi in (wilson_interval(int(k), n) for k in rng.binomial(n, p, 4000))]
        assert 0.92 <= np.mean(hits) <= 0.975, (n, p, np.mean(hits))


def test_quantiles_match_scipy():
    assert normal_quantile(0.95) == pytest.approx(Z95, abs=1e-12)
    for confidence in (0.9, 0.95, 0.99):
        assert normal_quantile(confidence) == pytest.approx(scipy_stats.norm.ppf(0.5 + confidence / 2), abs=1e-10)
        for df in [*range(1, 101), 1000, 1e5, 1e6, 1e9]:
            expected = scipy_stats.t.ppf(0.5 + confidence / 2, df)
            assert t_quantile(df, confidence) == pytest.approx(expected, abs=1e-9), (df, confidence)
    # A few textbook two-sided 95 % values.
    assert [round(t_quantile(df), 3) for df in (1, 2, 5, 10, 30)] == [12.706, 4.303, 2.571, 2.228, 2.042]


def test_mean_interval_known_sample():
    """[1, 2, 3]: mean 2, s = 1, half-width t_{2, 0.975} * 1 / sqrt(3) = 4.302653 / 1.732051 = 2.484138."""
    mean, lo, hi = mean_interval([1, 2, 3])
    assert mean == 2.0
    assert hi - mean == pytest.approx(4.302652729749464 / math.sqrt(3), abs=1e-9)
    assert mean - lo == pytest.approx(2.484138, abs=1e-6)
    m99 = mean_interval([1, 2, 3], confidence=0.99)
    assert m99[2] - 2 == pytest.approx(scipy_stats.t.ppf(0.995, 2) / math.sqrt(3), abs=1e-9)


def test_mean_interval_single_value_is_undefined():
    mean, lo, hi = mean_interval([0.7])
    assert mean == 0.7 and math.isnan(lo) and math.isnan(hi)
    with pytest.raises(ValueError):
        mean_interval([])


def test_bootstrap_deterministic_and_contains_mean():
    values = np.random.default_rng(1).normal(0.3, 1.0, 200)
    a = bootstrap_interval(values, seed=3)
    assert a == bootstrap_interval(values, seed=3)
    assert a != bootstrap_interval(values, seed=4)
    assert a[0] < values.mean() < a[1]
    # Close to the normal-theory interval mean ± 1.96 s / sqrt(n) for a sample this large.
    se = values.std(ddof=1) / math.sqrt(len(values))
    assert a == pytest.approx((values.mean() - Z95 * se, values.mean() + Z95 * se), abs=0.25 * se * Z95)
    assert bootstrap_interval([5.0]) == (5.0, 5.0)


def test_bootstrap_paired_rows_resampled_together():
    """Paired (matched, shuffled) losses: the gap is resampled per row; perfectly paired rows have no gap spread."""
    rng = np.random.default_rng(0)
    base = rng.normal(3.0, 1.0, 100)
    rows = np.stack([base, base + 0.5], axis=1)
    gap = lambda r: np.mean(r[:, 1] - r[:, 0])
    # Resampling the columns independently would give a wide interval (spread ~ 0.2); by row it is degenerate.
    assert bootstrap_interval(rows, statistic=gap) == pytest.approx((0.5, 0.5), abs=1e-12)
    noisy = np.stack([base, base + 0.5 + rng.normal(0, 0.1, 100)], axis=1)
    lo, hi = bootstrap_interval(noisy, statistic=gap, seed=7)
    assert lo < gap(noisy) < hi and hi - lo < 0.06


ARM = (0.60, 0.55, 0.65)
REF = (0.40, 0.35, 0.45)
FLOOR = (0.10, 0.05, 0.15)


def test_verdict_holds_and_reversed():
    assert verdict(ARM, REF, "higher") == "holds"
    assert verdict(ARM, REF, "lower") == "reversed"
    assert verdict(REF, ARM, "lower") == "holds"  # e.g. FID: the paper found the arm lower
    assert verdict(REF, ARM, "higher") == "reversed"
    assert verdict(ARM, REF, "higher", arm_floor=FLOOR, reference_floor=FLOOR) == "holds"


def test_verdict_overlap_not_resolved():
    assert verdict(ARM, (0.5, 0.45, 0.56), "higher") == "not resolved"
    assert verdict(ARM, (0.5, 0.45, 0.55), "higher") == "not resolved"  # touching counts as overlap
    assert verdict(ARM, (0.5, math.nan, math.nan), "higher") == "not resolved"  # one seed: no interval


def test_verdict_at_floor_not_resolved():
    low_ref = (0.12, 0.08, 0.16)
    assert verdict(ARM, low_ref, "higher", reference_floor=FLOOR) == "not resolved"  # reference at its floor
    assert verdict(ARM, low_ref, "higher") == "holds"  # without the floor check it would hold
    arm_floor = (0.6, 0.5, 0.7)  # e.g. the arm's prompt-ignoring control scores as well as the arm
    assert verdict(ARM, REF, "higher", arm_floor=arm_floor) == "not resolved"


def test_verdict_rejects_bad_input():
    with pytest.raises(ValueError):
        verdict(ARM, REF, "better")
    with pytest.raises(ValueError):
        verdict((0.5, 0.6, 0.4), REF, "higher")
    assert "not resolved" in RULE and "holds" in RULE and "reversed" in RULE
