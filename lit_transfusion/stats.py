"""Intervals and a verdict rule for measurements a researcher can trust.

Every reported score gets an interval, and a claim ("arm beats reference") gets a verdict computed by one
rule (`verdict`, stated in words in `RULE`):

* `wilson_interval`    a rate (k of n images correct): the Wilson score interval.
* `bootstrap_interval` a statistic over items (e.g. the cond-gap over caption pairs): percentile bootstrap,
                       rows of a 2-D array resampled together for paired data.
* `mean_interval`      a mean over seeds: Student's t interval.

Only numpy and `math` are used (scipy is a dev dependency, not a run-time one): the normal and Student t
quantiles are computed here, by bisection on their distribution functions, to 1e-10 or better.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

Interval = tuple[float, float, float]  # (mean or point estimate, low, high)

RULE = (
    "Verdict rule: each arm's metric is reported as an interval (Wilson for rates, percentile bootstrap over "
    "items for per-item statistics, Student's t over seeds for means). A claim that the arm is better than "
    "the reference in the paper's direction is \"not resolved\" if any interval bound is undefined, if the arm's "
    "and the reference's intervals overlap (touching counts as overlap), or if either arm's interval overlaps "
    "the interval of its own floor (chance level or control, measured at the same n), because then the "
    "measurement cannot tell that arm from its floor. Otherwise the claim \"holds\" if the arm's interval lies "
    "entirely on the paper's side of the reference's interval, and is \"reversed\" if it lies entirely on the "
    "other side."
)


# ----------------------------------------------------------------------------- quantiles

def _check_confidence(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence!r}")
    return float(confidence)


def _bisect(f: Callable[[float], float], lo: float, hi: float, iterations: int = 200) -> float:
    """The root of an increasing `f` in [lo, hi] by bisection (200 halvings: exhausts double precision)."""
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def normal_quantile(confidence: float = 0.95) -> float:
    """The two-sided standard normal critical value z: P(|Z| <= z) = confidence (1.959964 for 0.95)."""
    alpha = 1.0 - _check_confidence(confidence)
    # P(|Z| > z) = erfc(z / sqrt 2) decreases in z; solve erfc(z / sqrt 2) = alpha.
    return _bisect(lambda z: alpha - math.erfc(z / math.sqrt(2.0)), 0.0, 40.0)


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularized incomplete beta function (modified Lentz), converged to ~1e-15."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 100_000):
        for aa in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                   -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + aa * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + aa / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """The regularized incomplete beta function I_x(a, b) for a, b > 0 and x in [0, 1]."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    # The continued fraction converges fast only below the mean; use the symmetry I_x(a, b) = 1 - I_{1-x}(b, a).
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def t_quantile(df: float, confidence: float = 0.95) -> float:
    """The two-sided Student t critical value t: P(|T_df| <= t) = confidence
    (12.706205 for df 1, 4.302653 for df 2, 2.042272 for df 30 at 0.95; tends to `normal_quantile`)."""
    alpha = 1.0 - _check_confidence(confidence)
    if not df > 0:
        raise ValueError(f"df must be > 0, got {df!r}")
    if df > 1e5:
        # The continued fraction loses digits for huge df; the Cornish-Fisher expansion around the normal
        # quantile is then exact to O(df^-3), i.e. far below 1e-12.
        z = normal_quantile(confidence)
        return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)
    # P(|T| > t) = I_x(df/2, 1/2) with x = df / (df + t^2), increasing in x: solve for x, then t.
    x = _bisect(lambda x: _betainc(df / 2.0, 0.5, x) - alpha, 0.0, 1.0)
    return math.sqrt(df * (1.0 - x) / x)


# ----------------------------------------------------------------------------- intervals

def wilson_interval(successes: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """(low, high): the Wilson score interval for a rate of `successes` out of `n` trials; (0.0, 1.0) if n == 0.

    Unlike the normal (Wald) interval it stays inside [0, 1] and is not empty at 0/n or n/n (0/10 -> (0, 0.2775)).
    """
    if int(successes) != successes or int(n) != n or not 0 <= successes <= n:
        raise ValueError(f"need integers 0 <= successes <= n, got successes={successes!r}, n={n!r}")
    z = normal_quantile(confidence)
    if n == 0:
        return 0.0, 1.0
    p, z2 = successes / n, z * z
    center = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    # At 0/n and n/n the bound is exactly 0 or 1; rounding would otherwise leave ~1e-17.
    low = 0.0 if successes == 0 else max(0.0, center - half)
    high = 1.0 if successes == n else min(1.0, center + half)
    return low, high


def bootstrap_interval(values, statistic: Callable = np.mean, confidence: float = 0.95, resamples: int = 2000,
                       seed: int = 0) -> tuple[float, float]:
    """(low, high): the percentile bootstrap interval of `statistic` over the items of `values`.

    `values` is 1-D (one number per item) or 2-D (one row per item: paired data, e.g. a caption pair's
    matched and shuffled losses; rows are resampled whole, so `statistic` receives a [n, k] array and must
    reduce it to a number, e.g. ``lambda r: np.mean(r[:, 1] - r[:, 0])``). Each of `resamples` resamples
    draws n items with replacement; the bounds are the (1-confidence)/2 and (1+confidence)/2 quantiles
    (numpy's linear interpolation) of the resampled statistics. Deterministic given `seed`.
    """
    _check_confidence(confidence)
    values = np.asarray(values, dtype=float)
    if values.ndim not in (1, 2) or len(values) == 0:
        raise ValueError(f"values must be a non-empty 1-D or 2-D array, got shape {values.shape}")
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples!r}")
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(values), size=(resamples, len(values)))
    stats = np.array([float(statistic(values[i])) for i in idx])
    alpha = 1.0 - confidence
    low, high = np.quantile(stats, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def mean_interval(values, confidence: float = 0.95) -> Interval:
    """(mean, low, high): the mean of `values` (e.g. one score per seed) and its Student t interval
    mean ± t_{n-1} · s / sqrt(n), s the sample standard deviation (ddof 1).

    With one value there is no spread to estimate: (value, nan, nan), which `verdict` treats as not resolved.
    """
    _check_confidence(confidence)
    values = np.asarray(values, dtype=float).ravel()
    if len(values) == 0:
        raise ValueError("values must not be empty")
    mean = float(values.mean())
    if len(values) == 1:
        return mean, math.nan, math.nan
    half = t_quantile(len(values) - 1, confidence) * float(values.std(ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


# ----------------------------------------------------------------------------- verdict

def _bounds(interval: Interval, name: str) -> tuple[float, float]:
    """(low, high) of a (mean, low, high) interval."""
    if len(interval) != 3:
        raise ValueError(f"{name} must be a (mean, low, high) interval, got {interval!r}")
    _, low, high = (float(v) for v in interval)
    if low > high:
        raise ValueError(f"{name}: low > high in {interval!r}")
    return low, high


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> bool:
    """True if the closed intervals a and b share a point, or a bound is nan (an undefined interval can't separate)."""
    if any(math.isnan(v) for v in (*a, *b)):
        return True
    return a[0] <= b[1] and b[0] <= a[1]


def verdict(arm: Interval, reference: Interval, direction: str, arm_floor: Interval | None = None,
            reference_floor: Interval | None = None) -> str:
    """"holds", "reversed" or "not resolved" for the claim "`arm` is better than `reference`" (see `RULE`).

    `arm`, `reference` and the floors are (mean, low, high) intervals of one metric. `direction` is how the
    paper's arm compares with the reference on this metric's raw value, whatever the metric's polarity:
    "higher" claims arm > reference (e.g. GenEval accuracy), "lower" claims arm < reference (e.g. FID, where
    lower is better and the paper found Transfusion lower). A floor is the metric's chance/control value
    for that arm (None: no floor check). Returns "not resolved" if any bound is nan, if arm and reference
    overlap, or if an arm overlaps its floor; else "holds" if the arm lies on the claimed side, "reversed"
    if on the other.
    """
    if direction not in ("higher", "lower"):
        raise ValueError(f"direction must be 'higher' or 'lower', got {direction!r}")
    a, r = _bounds(arm, "arm"), _bounds(reference, "reference")
    if _overlap(a, r):
        return "not resolved"
    for interval, floor, name in ((a, arm_floor, "arm_floor"), (r, reference_floor, "reference_floor")):
        if floor is not None and _overlap(interval, _bounds(floor, name)):
            return "not resolved"
    arm_higher = a[0] > r[1]  # separated, so either the arm is wholly above or wholly below
    return "holds" if arm_higher == (direction == "higher") else "reversed"
