"""Statistics behind the confidence intervals and comparisons of docs/metrics.md.

No scipy: normal quantiles from the standard library, Student's t from its closed-form
distribution function for whole degrees of freedom, inverted by bisection, the binomial
distribution from log-gamma (numpy for the arithmetic over ranks), and the intervals built on
them. Levels are given in percent (95.0), as in the API.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import Final

import numpy as np

DEFAULT_CONFIDENCE_PERCENT: Final = 95.0
MIN_CONFIDENCE_PERCENT: Final = 80.0
MAX_CONFIDENCE_PERCENT: Final = 99.9

_NORMAL: Final = NormalDist()
# Beyond this many degrees of freedom t and the normal quantile agree to better than 0.1 %.
_T_AS_NORMAL_DF: Final = 1000
# From this many on, t comes from its expansion around the normal quantile (`_t_expansion`).
_T_EXPANSION_DF: Final = 100
# Up to this many values a percentile's ranks come from the exact binomial distribution;
# beyond it, even p99.9 has over 1000 expected values above it, and the normal approximation
# (with continuity correction) picks the same ranks or one off, at a fraction of the cost.
EXACT_RANKS_MAX_N: Final = 1_000_000
# A rate's interval needs at least this many whole seconds (each one a batch at the least).
MIN_RATE_SECONDS: Final = 3
# Batch means aim at this many batches: enough degrees of freedom for the t quantile (2.09
# at 19 against 1.96), while batches of a long stage span many seconds, so the correlation
# between successive seconds stays inside a batch.
RATE_BATCHES: Final = 20


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


@functools.lru_cache(maxsize=4096)
def t_value(confidence_percent: float, df: int) -> float:
    """The two-sided Student t quantile with `df` degrees of freedom: 2.776 for 95 % and 4.

    Newton's method on P(|T| <= t) from the normal quantile, which lies below every t
    quantile: the function is concave for t > 0, so each step stays below the root and the
    steps shrink monotonically (a handful of them; a bisection took ~40 evaluations, each
    df / 2 terms long, which the intervals of every stage paid). Cached: a result asks for
    the same few (level, df) pairs many times.
    """
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df >= _T_AS_NORMAL_DF:
        return z_value(confidence_percent)
    if df >= _T_EXPANSION_DF:
        return _t_expansion(z_value(confidence_percent), df)
    target = confidence_percent / 100.0
    # The density of T: Gamma((df+1)/2) / (sqrt(df pi) Gamma(df/2)) (1 + t^2/df)^(-(df+1)/2).
    log_norm = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    t = z_value(confidence_percent)
    for _ in range(200):
        density = math.exp(log_norm - (df + 1) / 2 * math.log1p(t * t / df))
        step = (target - t_central_probability(t, df)) / (2.0 * density)
        t += step
        if step <= 1e-13 * t:
            break
    return t


def _t_expansion(z: float, df: int) -> float:
    """The t quantile from the normal one by its expansion in 1/df (Abramowitz & Stegun 26.7.5),
    to four terms: within 1e-8 of the exact quantile from 100 degrees of freedom on, where
    Newton's method would sum ~50 terms of the series for each of its steps."""
    z2 = z * z
    return z * (
        1.0
        + (z2 + 1) / (4 * df)
        + ((5 * z2 + 16) * z2 + 3) / (96 * df**2)
        + (((3 * z2 + 19) * z2 + 17) * z2 - 15) / (384 * df**3)
        + ((((79 * z2 + 776) * z2 + 1482) * z2 - 1920) * z2 - 945) / (92160 * df**4)
    )


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


@dataclass(frozen=True)
class Interval:
    """A confidence interval. An open side is not a bound at the level asked: there were too
    few values to bound the figure on that side, and the value given is the extreme seen."""

    low: float
    high: float
    low_open: bool = False
    high_open: bool = False


@dataclass(frozen=True)
class RankInterval:
    """Ranks (1-based, into the n values sorted) of a percentile's interval [x_(low), x_(high)].

    An open side is clamped to the extreme rank (1 or n): no rank inside 1..n bounds the
    percentile on that side at the level asked.
    """

    low: int
    high: int
    low_open: bool
    high_open: bool


@functools.lru_cache(maxsize=4096)
def percentile_rank_interval(
    n: int, percentile: float, confidence_percent: float = DEFAULT_CONFIDENCE_PERCENT
) -> RankInterval:
    """The distribution-free interval of a percentile from order statistics.

    Of n values from any continuous distribution, the number K below its q-quantile xi_q is
    binomial B(n, q), and x_(l) <= xi_q <= x_(u) exactly when l <= K < u. So
    [x_(l), x_(u)] covers xi_q with probability P(l <= K <= u - 1), whatever the distribution.
    Each tail gets at most half the miss probability: l is the largest rank with
    P(K <= l - 1) <= alpha / 2 and u the smallest with P(K >= u) <= alpha / 2. A side is open
    when no rank in 1..n is far enough out: the lower one while (1 - q)**n > alpha / 2, the
    upper one while q**n > alpha / 2 (p99 needs n >= 368 values at 95 %, p99.9 n >= 3688).

    Why order statistics: the coverage holds exactly for any latency distribution (skewed,
    multi-modal), and the interval costs two more order statistics per percentile, found in
    the same pass as the percentile. A bootstrap would resample millions of values hundreds
    of times, and at the tails it is poor: it never reaches past the largest value seen.

    Exact binomial tails up to `EXACT_RANKS_MAX_N` values, the normal approximation beyond.
    Cached: a stage's latencies mostly share one count (TTFT, E2E, TPOT of the same requests).
    """
    if n < 1:
        raise ValueError(f"need at least one value, got n={n}")
    q = percentile / 100.0
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"percentile must be in [0, 100], got {percentile}")
    tail = 1.0 - _tail(confidence_percent)  # alpha / 2
    if n <= EXACT_RANKS_MAX_N:
        low, high = _binomial_ranks(n, q, tail)
    else:
        z = z_value(confidence_percent)
        sigma = math.sqrt(n * q * (1.0 - q))
        low = math.floor(n * q + 0.5 - z * sigma)
        high = math.ceil(n * q + 0.5 + z * sigma)
    return RankInterval(low=max(low, 1), high=min(high, n), low_open=low < 1, high_open=high > n)


def _binomial_ranks(n: int, q: float, tail: float) -> tuple[int, int]:
    """(l, u) of `percentile_rank_interval` from the exact B(n, q): l may be 0 and u n + 1
    (open sides). Only a window of +-(12 sigma + 30) around the mean is evaluated: the mass
    outside it is below 1e-30, far under any tail asked for."""
    if q <= 0.0:
        return 0, 1
    if q >= 1.0:
        return n, n + 1
    sigma = math.sqrt(n * q * (1.0 - q))
    k0 = max(0, math.floor(n * q - 12.0 * sigma - 30.0))
    k1 = min(n, math.ceil(n * q + 12.0 * sigma + 30.0))
    k = np.arange(k0, k1 + 1, dtype=np.float64)
    log_first = math.lgamma(n + 1) - math.lgamma(k0 + 1) - math.lgamma(n - k0 + 1)
    log_first += k0 * math.log(q) + (n - k0) * math.log1p(-q)
    # pmf(k + 1) / pmf(k) = (n - k) / (k + 1) * q / (1 - q), summed in logs from pmf(k0).
    log_ratio = np.log((n - k[:-1]) / (k[:-1] + 1.0)) + (math.log(q) - math.log1p(-q))
    pmf = np.exp(log_first + np.concatenate(([0.0], np.cumsum(log_ratio))))
    below = np.cumsum(pmf)  # P(K <= k)
    above = np.cumsum(pmf[::-1])[::-1]  # P(K >= k), summed from the top: no cancellation
    # l - 1 = the largest k with P(K <= k) <= tail (l = 0 when even P(K = 0) is more; the mass
    # below the window is negligible, so l = k0 when its first entry is already too much).
    at_most = np.flatnonzero(below <= tail)
    low = int(k[at_most[-1]]) + 1 if len(at_most) else k0
    # u = the smallest k with P(K >= k) <= tail (n + 1 when even P(K = n) is more).
    at_least = np.flatnonzero(above <= tail)
    high = int(k[at_least[0]]) if len(at_least) else (k1 + 1 if k1 < n else n + 1)
    return low, high


def rate_interval(
    rate: float, per_second: Sequence[float] | np.ndarray, confidence_percent: float = DEFAULT_CONFIDENCE_PERCENT
) -> Interval | None:
    """Interval of a rate (per second) by batch means over its whole seconds' amounts.

    Successive seconds are correlated (a slow spell lasts longer than a second), so seconds are
    grouped into about `RATE_BATCHES` batches of equal length and the spread of the batch means
    gives the standard error, with the t quantile on (batches - 1) degrees of freedom. The
    interval is centred on the reported `rate` (amount over the stage's exact duration), whose
    estimate the whole seconds' mean only approximates; its low side is not below 0. None with
    fewer than `MIN_RATE_SECONDS` seconds.
    """
    amounts = np.asarray(per_second, dtype=np.float64)
    seconds = len(amounts)
    if seconds < MIN_RATE_SECONDS:
        return None
    size = max(1, seconds // RATE_BATCHES)
    batches = seconds // size
    means = amounts[: batches * size].reshape(batches, size).mean(axis=1)
    half = t_value(confidence_percent, batches - 1) * float(means.std(ddof=1)) / math.sqrt(batches)
    return Interval(max(0.0, rate - half), rate + half)
