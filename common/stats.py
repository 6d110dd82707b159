"""Statistics behind the confidence intervals and comparisons of docs/metrics.md.

Pure Python (no scipy): normal quantiles from the standard library, Student's t from its
closed-form distribution function for whole degrees of freedom, inverted by bisection, and the
intervals built on them. Levels are given in percent (95.0), as in the API.
"""

from __future__ import annotations

import math
from statistics import NormalDist
from typing import Final

DEFAULT_CONFIDENCE_PERCENT: Final = 95.0
MIN_CONFIDENCE_PERCENT: Final = 80.0
MAX_CONFIDENCE_PERCENT: Final = 99.9

_NORMAL: Final = NormalDist()
# Beyond this many degrees of freedom t and the normal quantile agree to better than 0.1 %.
_T_AS_NORMAL_DF: Final = 1000


def _tail(confidence_percent: float) -> float:
    """The two-sided interval's upper probability: 0.975 for 95 %."""
    if not 0.0 < confidence_percent < 100.0:
        raise ValueError(f"confidence must be in (0, 100) percent, got {confidence_percent}")
    return 1.0 - (1.0 - confidence_percent / 100.0) / 2.0


def z_value(confidence_percent: float = DEFAULT_CONFIDENCE_PERCENT) -> float:
    """The two-sided standard normal quantile: 1.96 for 95 %."""
    return _NORMAL.inv_cdf(_tail(confidence_percent))


def normal_two_sided_p(z: float) -> float:
    """P(|Z| >= |z|) for a standard normal Z."""
    return math.erfc(abs(z) / math.sqrt(2.0))


def t_central_probability(t: float, df: int) -> float:
    """P(|T| <= t) for Student's t with `df` (>= 1) degrees of freedom.

    The closed form for whole degrees of freedom (Abramowitz & Stegun 26.7.3 and 26.7.4): with
    theta = atan(t / sqrt(df)), a finite series in cos(theta) of about df / 2 terms.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    t = abs(t)
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 1:
        if df == 1:
            return 2.0 * theta / math.pi
        term, total = 1.0, 1.0
        for k in range(1, (df - 1) // 2):  # (2k)/(2k+1) factors: 2/3, 2*4/(3*5), ...
            term *= c2 * (2 * k) / (2 * k + 1)
            total += term
        return 2.0 / math.pi * (theta + s * math.cos(theta) * total)
    term, total = 1.0, 1.0
    for k in range(1, df // 2):  # (2k-1)/(2k) factors: 1/2, 1*3/(2*4), ...
        term *= c2 * (2 * k - 1) / (2 * k)
        total += term
    return s * total


def t_value(confidence_percent: float, df: int) -> float:
    """The two-sided Student t quantile with `df` degrees of freedom: 2.776 for 95 % and 4."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df >= _T_AS_NORMAL_DF:
        return z_value(confidence_percent)
    target = confidence_percent / 100.0
    low, high = 0.0, max(2.0 * z_value(confidence_percent), 1.0)
    while t_central_probability(high, df) < target:
        high *= 2.0
    for _ in range(100):  # bisection to double precision
        mid = (low + high) / 2.0
        if t_central_probability(mid, df) < target:
            low = mid
        else:
            high = mid
        if high - low <= 1e-12 * high:
            break
    return (low + high) / 2.0


def mean_interval(
    mean: float, std: float, n: int, confidence_percent: float = DEFAULT_CONFIDENCE_PERCENT
) -> tuple[float, float] | None:
    """Interval of a mean from `n` values with population standard deviation `std` (ddof=0):
    mean +- t * s / sqrt(n), s the sample standard deviation. None with fewer than 2 values."""
    if n < 2:
        return None
    sample_std = std * math.sqrt(n / (n - 1))
    half = t_value(confidence_percent, n - 1) * sample_std / math.sqrt(n)
    return mean - half, mean + half


def proportion_interval(
    successes: int, n: int, confidence_percent: float = DEFAULT_CONFIDENCE_PERCENT
) -> tuple[float, float] | None:
    """The Wilson score interval of a proportion `successes / n`; None with no trials.

    Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to a
    point at 0 or n successes.
    """
    if n <= 0:
        return None
    z = z_value(confidence_percent)
    p = successes / n
    denominator = 1.0 + z * z / n
    centre = (p + z * z / (2 * n)) / denominator
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)
