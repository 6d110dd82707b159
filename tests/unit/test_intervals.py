"""Confidence intervals (common/stats.py, common/metrics.py) against distributions whose
quantiles and rates are known.

Coverage is checked over many seeded trials; each threshold is the nominal level less 3.3
binomial standard deviations of the observed coverage (a false-positive rate of 5e-4 per
check if the true coverage were exactly the level; the seeds are fixed, so a run either
passes or fails for good).
"""

from __future__ import annotations

import math
from statistics import NormalDist

import numpy as np
import pytest

from common import stats
from common.codes import RequestStatus, SampleFlag
from common.metrics import PERCENTILES, SampleColumns, Slo, compute_stage_metrics, summarize
from common.proto.loadtest.v1 import run_pb2
from common.stats import (
    EXACT_RANKS_MAX_N,
    MIN_RATE_SECONDS,
    Interval,
    percentile_rank_interval,
    rate_interval,
    t_value,
)
from controller.domain.results.compute import RunOutcome, StageOutcome
from controller.domain.results.message import result_message

pytestmark = pytest.mark.timeout(120)

MS = 1_000_000  # ns
S = 1_000_000_000  # ns
T0 = 1_700_000_000 * S
LEVEL = 95.0
ALPHA_2 = (1 - LEVEL / 100) / 2
MU, SIGMA = math.log(20 * MS), 0.6  # lognormal latencies around 20 ms


def slack(trials: int, p: float = LEVEL / 100) -> float:
    return 3.3 * math.sqrt(p * (1 - p) / trials)


def true_quantile_ms(percentile: float) -> float:
    return math.exp(MU + SIGMA * NormalDist().inv_cdf(percentile / 100)) / MS


# --- percentile ranks ------------------------------------------------------------------------


def brute_force_ranks(n: int, q: float) -> tuple[int, int]:
    """l, u straight from the definition with exact integer binomial coefficients."""
    pmf = [math.comb(n, k) * q**k * (1 - q) ** (n - k) for k in range(n + 1)]
    below = np.cumsum(pmf)  # P(K <= k)
    low = max((k + 1 for k in range(n + 1) if below[k] <= ALPHA_2), default=0)
    above = [sum(pmf[k:]) for k in range(n + 1)]  # P(K >= k)
    high = min((k for k in range(n + 1) if above[k] <= ALPHA_2), default=n + 1)
    return low, high


@pytest.mark.parametrize("n", [1, 2, 5, 10, 37, 50, 120, 367, 368, 500])
@pytest.mark.parametrize("percentile", PERCENTILES)
def test_ranks_are_the_exact_binomial_ones(n: int, percentile: float) -> None:
    low, high = brute_force_ranks(n, percentile / 100)
    r = percentile_rank_interval(n, percentile, LEVEL)
    assert (r.low_open, r.high_open) == (low < 1, high > n)
    assert (r.low, r.high) == (max(low, 1), min(high, n))


@pytest.mark.parametrize("percentile", PERCENTILES)
def test_sides_are_open_exactly_when_no_rank_reaches_the_level(percentile: float) -> None:
    q = percentile / 100
    for n in range(1, 4000):
        r = percentile_rank_interval(n, percentile, LEVEL)
        # The lowest rank covers from below with P(K >= 1) = 1 - (1 - q)^n, the highest from
        # above with P(K < n) = 1 - q^n.
        assert r.low_open == ((1 - q) ** n > ALPHA_2), n
        assert r.high_open == (q**n > ALPHA_2), n
    # The sizes docs/metrics.md quotes.
    assert percentile_rank_interval(367, 99.0).high_open and not percentile_rank_interval(368, 99.0).high_open
    assert percentile_rank_interval(3687, 99.9).high_open and not percentile_rank_interval(3688, 99.9).high_open


@pytest.mark.parametrize("percentile", PERCENTILES)
def test_normal_approximation_beyond_the_exact_range_agrees_with_the_exact_ranks(percentile: float) -> None:
    n = EXACT_RANKS_MAX_N + 1
    exact = stats._binomial_ranks(n, percentile / 100, ALPHA_2)
    approx = percentile_rank_interval(n, percentile, LEVEL)
    assert abs(approx.low - exact[0]) <= 3 and abs(approx.high - exact[1]) <= 3, (approx, exact)


# --- percentile intervals of samples ---------------------------------------------------------


@pytest.mark.parametrize("n", [50, 500])
def test_percentile_intervals_cover_the_true_quantiles_at_the_level(n: int) -> None:
    trials = 2000
    rng = np.random.default_rng(20261203 + n)
    misses_low = dict.fromkeys(PERCENTILES, 0)
    misses_high = dict.fromkeys(PERCENTILES, 0)
    opened = dict.fromkeys(PERCENTILES, 0)
    for _ in range(trials):
        s = summarize(rng.lognormal(MU, SIGMA, n).astype(np.int64))
        for p, ci in zip(PERCENTILES, (s.p50_ci, s.p90_ci, s.p95_ci, s.p99_ci, s.p999_ci), strict=True):
            assert ci is not None
            truth = true_quantile_ms(p)
            # An open side bounds nothing, so it never misses.
            misses_low[p] += not ci.low_open and ci.low > truth
            misses_high[p] += not ci.high_open and ci.high < truth
            opened[p] += ci.high_open
    for p in PERCENTILES:
        assert (misses_low[p] + misses_high[p]) / trials <= 1 - LEVEL / 100 + slack(trials), p
        # Each side misses at most half as often.
        for misses in (misses_low[p], misses_high[p]):
            assert misses / trials <= ALPHA_2 + slack(trials, ALPHA_2), p
        # Whether a side is open depends on n only.
        assert opened[p] in (0, trials)
        assert (opened[p] == trials) == ((p / 100) ** n > ALPHA_2)


def test_pooled_gaps_of_correlated_requests_get_intervals_that_rest_on_the_requests() -> None:
    # Each request's 50 gaps all equal one lognormal draw: 2000 gaps but 40 independent values.
    # The true quantiles of a gap are the lognormal's. Counted as 2000 values the intervals
    # are far too narrow; counted by request (clusters) they keep their level.
    trials, requests, gaps = 400, 40, 50
    rng = np.random.default_rng(7)
    covered = {"gaps": 0, "requests": 0}
    truth = true_quantile_ms(50.0)
    for _ in range(trials):
        pooled = np.repeat(rng.lognormal(MU, SIGMA, requests), gaps).astype(np.int64)
        for name, clusters in (("gaps", 0), ("requests", requests)):
            ci = summarize(pooled, clusters=clusters).p50_ci
            assert ci is not None
            covered[name] += ci.low <= truth <= ci.high
    assert covered["requests"] / trials >= LEVEL / 100 - slack(trials)
    assert covered["gaps"] / trials < 0.6  # what counting every gap as independent would claim
    # Independent gaps lose little: the interval widens to the requests' shares, no more.
    independent = rng.lognormal(MU, SIGMA, requests * gaps).astype(np.int64)
    exact, by_request = summarize(independent).p50_ci, summarize(independent, clusters=requests).p50_ci
    assert exact is not None and by_request is not None
    assert by_request.low <= exact.low <= exact.high <= by_request.high


def test_itl_intervals_count_requests_not_gaps() -> None:
    rng = np.random.default_rng(3)
    n, gaps = 30, 20
    ok = np.full(n, int(RequestStatus.OK))
    cols = SampleColumns(
        sent_unix_ns=T0 + np.arange(n) * 100 * MS,
        queue_delay_ns=np.zeros(n),
        first_token_ns=np.full(n, 10 * MS),
        last_token_ns=np.full(n, 50 * MS),
        done_ns=np.full(n, 51 * MS),
        prompt_tokens=np.full(n, 8),
        output_tokens=np.full(n, gaps + 1),
        status=ok,
        flags=np.full(n, int(SampleFlag.USAGE_FROM_SERVER)),
        itl_count=np.full(n, gaps),
        itl_ns=rng.lognormal(MU, SIGMA, n * gaps).astype(np.int64),
    )
    itl = compute_stage_metrics(cols).itl
    assert itl == summarize(cols.itl_ns, clusters=n)
    assert itl.p99_ci is not None and itl.p99_ci.high_open  # 30 requests cannot bound a p99


def test_intervals_are_order_statistics_of_the_values_and_contain_the_percentiles() -> None:
    rng = np.random.default_rng(3)
    for n in (1, 2, 7, 100, 1000, 300_001):  # the last goes through the histogram search
        values = rng.lognormal(MU, SIGMA, n).astype(np.int64)
        ordered = np.sort(values) / MS
        s = summarize(values)
        for p, estimate, ci in zip(
            PERCENTILES,
            (s.p50, s.p90, s.p95, s.p99, s.p999),
            (s.p50_ci, s.p90_ci, s.p95_ci, s.p99_ci, s.p999_ci),
            strict=True,
        ):
            r = percentile_rank_interval(n, p, LEVEL)
            assert ci == Interval(
                min(ordered[r.low - 1], estimate), max(ordered[r.high - 1], estimate), r.low_open, r.high_open
            )
            assert ci.low <= estimate <= ci.high
            if r.high_open:
                assert ci.high == s.max


@pytest.mark.parametrize("kind", ["continuous", "few distinct values", "all equal", "floats"])
def test_percentiles_stay_numpys_bit_for_bit_with_the_interval_ranks_in_the_same_pass(kind: str) -> None:
    rng = np.random.default_rng(11)
    n = 400_003
    values: np.ndarray = {
        "continuous": rng.lognormal(MU, SIGMA, n).astype(np.int64),
        "few distinct values": rng.integers(5, 30, n) * MS,
        "all equal": np.full(n, 3 * MS),
        "floats": rng.random(n) * 1e8,
    }[kind]
    s = summarize(values)
    assert [s.p50, s.p90, s.p95, s.p99, s.p999] == (np.percentile(values, PERCENTILES) / MS).tolist()
    ordered = np.sort(values)
    for p, ci in zip(PERCENTILES, (s.p50_ci, s.p90_ci, s.p95_ci, s.p99_ci, s.p999_ci), strict=True):
        r = percentile_rank_interval(n, p, LEVEL)
        assert ci is not None
        assert (ci.low, ci.high) == (ordered[r.low - 1] / MS, ordered[r.high - 1] / MS)


def test_mean_interval_covers_the_true_mean() -> None:
    trials, n = 2000, 500
    rng = np.random.default_rng(5)
    truth = math.exp(MU + SIGMA**2 / 2) / MS
    hits = 0
    for _ in range(trials):
        ci = summarize(rng.lognormal(MU, SIGMA, n)).mean_ci
        assert ci is not None
        hits += ci.low <= truth <= ci.high
    # The t interval is approximate for a skewed distribution; at n = 500 it is close.
    assert hits / trials >= LEVEL / 100 - 0.01 - slack(trials)
    assert summarize(np.array([5 * MS])).mean_ci is None


# --- rates -----------------------------------------------------------------------------------


def test_rate_interval_is_batch_means_with_t_on_the_batches() -> None:
    amounts = np.arange(100, dtype=np.float64) % 7  # 100 seconds -> 20 batches of 5
    means = amounts.reshape(20, 5).mean(axis=1)
    half = t_value(LEVEL, 19) * means.std(ddof=1) / math.sqrt(20)
    assert rate_interval(3.1, amounts, LEVEL) == Interval(pytest.approx(3.1 - half), pytest.approx(3.1 + half))
    # Few seconds: one batch each; the remainder of an uneven split is left out.
    assert rate_interval(1.0, [1.0, 2.0, 0.0], LEVEL) == Interval(
        0.0, pytest.approx(1.0 + t_value(LEVEL, 2) * 1.0 / math.sqrt(3))
    )
    assert rate_interval(1.0, [1.0] * (MIN_RATE_SECONDS - 1)) is None


def poisson_stage(rng: np.random.Generator, rate: float, seconds: float) -> SampleColumns:
    """Requests sent as a Poisson process, each done 10-60 ms later with 4 output tokens."""
    n = rng.poisson(rate * seconds)
    sent = np.sort(rng.random(n) * seconds * S).astype(np.int64)
    done = rng.integers(10 * MS, 60 * MS, n)
    zeros = np.zeros(n, dtype=np.int64)
    return SampleColumns(
        sent_unix_ns=T0 + sent,
        queue_delay_ns=zeros,
        first_token_ns=zeros,
        last_token_ns=zeros,
        done_ns=done,
        prompt_tokens=np.full(n, 10),
        output_tokens=np.full(n, 4),
        status=np.ones(n, dtype=np.int64),
        flags=np.full(n, int(SampleFlag.USAGE_FROM_SERVER)),
        itl_count=zeros,
        itl_ns=np.zeros(0, dtype=np.int64),
    )


def test_rate_intervals_cover_the_true_rate_of_a_poisson_process() -> None:
    trials, rate = 1000, 20.0
    rng = np.random.default_rng(42)
    hits = {"request": 0, "output": 0, "total": 0}
    for _ in range(trials):
        m = compute_stage_metrics(poisson_stage(rng, rate, 60.0))
        for name, ci, truth in (
            ("request", m.request_throughput_ci, rate),
            ("output", m.output_token_throughput_ci, 4 * rate),
            ("total", m.total_token_throughput_ci, 14 * rate),
        ):
            assert ci is not None
            hits[name] += ci.low <= truth <= ci.high
    for name, count in hits.items():
        # Approximate (t on 20 batches of ~60 counts each): about the level, not below it
        # by more than 2 points, and not uselessly wide either.
        assert LEVEL / 100 - 0.02 - slack(trials) <= count / trials <= 0.99, name


def test_rates_of_short_stages_have_no_interval() -> None:
    m = compute_stage_metrics(poisson_stage(np.random.default_rng(1), 50.0, 2.5))
    assert m.request_throughput > 0
    assert m.duration_s < MIN_RATE_SECONDS
    assert (m.request_throughput_ci, m.output_token_throughput_ci, m.total_token_throughput_ci) == (None, None, None)


# --- fractions, goodput, and the message -----------------------------------------------------


def test_error_rate_good_fraction_and_goodput_intervals() -> None:
    rng = np.random.default_rng(8)
    cols = poisson_stage(rng, 30.0, 20.0)
    status = np.where(rng.random(len(cols)) < 0.1, 3, 1)  # ~10 % HTTP 5xx
    cols = SampleColumns(**{**{f: getattr(cols, f) for f in cols.__dataclass_fields__}, "status": status})
    m = compute_stage_metrics(cols, Slo(e2e_ms=35.0))
    counted = m.requests_ok + m.requests_failed
    assert m.error_rate == m.requests_failed / counted
    assert m.error_rate_ci == Interval(*stats.proportion_interval(m.requests_failed, counted))  # type: ignore[misc]
    assert m.good_fraction is not None and m.goodput is not None
    good = round(m.good_fraction * counted)
    assert m.good_fraction_ci == Interval(*stats.proportion_interval(good, counted))  # type: ignore[misc]
    for value, ci in (
        (m.error_rate, m.error_rate_ci),
        (m.good_fraction, m.good_fraction_ci),
        (m.goodput, m.goodput_ci),
    ):
        assert ci is not None and ci.low < value < ci.high
    assert compute_stage_metrics(cols).goodput_ci is None  # no SLO


def test_result_message_fills_every_interval() -> None:
    rng = np.random.default_rng(9)
    cols = poisson_stage(rng, 30.0, 10.0)
    # Streamed with a TTFT and gaps, so every latency has values.
    n = len(cols)
    gaps = rng.integers(1 * MS, 5 * MS, 3 * n)
    first = rng.integers(5 * MS, 30 * MS, n)
    last = first + gaps.reshape(n, 3).sum(axis=1)
    fields = {f: getattr(cols, f) for f in cols.__dataclass_fields__}
    fields |= {
        "first_token_ns": first,
        "last_token_ns": last,
        "done_ns": last + MS,
        "queue_delay_ns": rng.integers(0, MS, n),
        "itl_count": np.full(n, 3),
        "itl_ns": gaps,
    }
    m = compute_stage_metrics(SampleColumns(**fields), Slo(ttft_ms=20.0))
    stage = StageOutcome(index=0, name="s", concurrency=0, request_rate=30.0, metrics=m, agents=[("a", m)], checks=[])
    result = result_message("run_x", run_pb2.RUN_STATE_SUCCEEDED, RunOutcome([stage], [], 1, overall=m))
    assert result.confidence_percent == LEVEL
    rows = [result.stages[0], result.stages[0].agents[0], result.overall]
    for row in rows:
        for field in ("ttft", "tpot", "itl", "e2e", "queue_delay", "e2e_including_queue"):
            latency = getattr(row, field)
            for p in ("mean", "p50", "p90", "p95", "p99", "p999"):
                assert latency.HasField(f"{p}_ci"), (field, p)
                ci = getattr(latency, f"{p}_ci")
                value = getattr(latency, f"{p}_ms")
                assert ci.low <= value <= ci.high
        for field in (
            "request_throughput",
            "output_token_throughput",
            "total_token_throughput",
            "goodput",
            "good_fraction",
            "error_rate",
        ):
            assert row.HasField(f"{field}_ci"), field
            ci = getattr(row, f"{field}_ci")
            assert ci.low <= getattr(row, field) <= ci.high
    # 300 values: p99 and p99.9 cannot be bounded from above.
    assert result.stages[0].ttft.p99_ci.high_open and result.stages[0].ttft.p999_ci.high_open
    assert not result.stages[0].ttft.p50_ci.high_open
    assert result.stages[0].ttft.p99_ci.high == result.stages[0].ttft.max_ms
    # Without an SLO or with too little data the interval stays unset.
    short = compute_stage_metrics(poisson_stage(rng, 30.0, 1.0))
    row = result_message("run_y", 1, RunOutcome([], [], 1, overall=short)).overall
    assert not row.HasField("request_throughput_ci") and not row.HasField("goodput_ci")
    assert not row.e2e.HasField("mean_ci") or row.e2e.count >= 2
    assert not row.ttft.HasField("p50_ci")  # no TTFT values at all
