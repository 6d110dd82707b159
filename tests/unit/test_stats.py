"""common/stats.py against published values: normal and Student t quantiles, and the
intervals built on them."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.stats import (
    mean_interval,
    normal_two_sided_p,
    proportion_interval,
    t_central_probability,
    t_value,
    z_value,
)

pytestmark = pytest.mark.timeout(30)


def test_normal_quantiles_and_p_values_are_the_tabulated_ones() -> None:
    assert z_value(95) == pytest.approx(1.959964, abs=1e-6)
    assert z_value(99) == pytest.approx(2.575829, abs=1e-6)
    assert z_value(90) == pytest.approx(1.644854, abs=1e-6)
    assert normal_two_sided_p(1.959964) == pytest.approx(0.05, abs=1e-6)
    assert normal_two_sided_p(-2.575829) == pytest.approx(0.01, abs=1e-6)


# Two-sided 95 % and 99 % quantiles from a t table.
@pytest.mark.parametrize(
    ("df", "t95", "t99"),
    [
        (1, 12.706, 63.657),
        (2, 4.303, 9.925),
        (3, 3.182, 5.841),
        (4, 2.776, 4.604),
        (5, 2.571, 4.032),
        (9, 2.262, 3.250),
        (10, 2.228, 3.169),
        (29, 2.045, 2.756),
        (30, 2.042, 2.750),
        (120, 1.980, 2.617),
    ],
)
def test_t_quantiles_are_the_tabulated_ones(df: int, t95: float, t99: float) -> None:
    assert t_value(95, df) == pytest.approx(t95, abs=1.5e-3)
    assert t_value(99, df) == pytest.approx(t99, abs=1.5e-3)
    assert t_central_probability(t_value(95, df), df) == pytest.approx(0.95, abs=1e-9)


def test_t_approaches_the_normal_quantile() -> None:
    assert t_value(95, 999) > z_value(95)
    assert t_value(95, 999) - z_value(95) < 3e-3
    assert t_value(95, 5000) == z_value(95)


def test_t_distribution_function_matches_a_sampled_one() -> None:
    rng = np.random.default_rng(7)
    draws = np.abs(rng.standard_t(6, size=200_000))
    for t in (0.5, 1.0, 2.0, 3.5):
        assert t_central_probability(t, 6) == pytest.approx(float((draws <= t).mean()), abs=4e-3)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_value(95, 0)
    with pytest.raises(ValueError, match="confidence"):
        z_value(100)


def test_mean_interval_covers_the_true_mean_at_its_level() -> None:
    rng = np.random.default_rng(11)
    covered = 0
    trials = 2000
    for _ in range(trials):
        x = rng.exponential(10.0, size=8)
        interval = mean_interval(float(x.mean()), float(x.std()), len(x))
        assert interval is not None
        covered += interval[0] <= 10.0 <= interval[1]
    # Small skewed samples: the t interval is known to cover a little less than 95 % here.
    assert 0.86 < covered / trials < 0.97
    assert mean_interval(5.0, 1.0, 1) is None


def test_wilson_interval_is_the_known_one() -> None:
    interval = proportion_interval(95, 100)
    assert interval is not None
    assert interval[0] == pytest.approx(0.8882, abs=1e-3) and interval[1] == pytest.approx(0.9785, abs=1e-3)
    assert proportion_interval(0, 0) is None
    full = proportion_interval(100, 100)
    assert full is not None and full[1] == 1.0 and 0.96 < full[0] < 0.97
    none = proportion_interval(0, 50)
    assert none is not None and none[0] == 0.0 and 0.0 < none[1] < 0.08
    assert math.isclose(sum(proportion_interval(30, 60) or (0, 0)), 1.0)
