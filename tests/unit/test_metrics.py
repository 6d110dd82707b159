"""Metric math against values computed by hand (the arithmetic is in the comments)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pytest

from common import metrics
from common.codes import RequestStatus, SampleFlag
from common.metrics import (
    ERROR_KINDS,
    LatencySummary,
    SampleColumns,
    SecondBucket,
    Slo,
    compute_stage_metrics,
    error_kind_name,
    summarize,
)

pytestmark = pytest.mark.timeout(30)

MS = 1_000_000  # ns
T0 = 1_700_000_000 * 1_000_000_000  # an arbitrary wall-clock start, ns
HTTP_5XX, TIMEOUT, CONNECTION = 3, 4, 5


@dataclass(frozen=True)
class Req:
    """One request; times in ms (`sent` from T0, the others from `sent`), 0 = absent."""

    sent: float = 0.0
    first: float = 0.0
    last: float = 0.0
    done: float = 0.0
    queue: float = 0.0
    prompt: int = 0
    output: int = 0
    status: int = RequestStatus.OK
    flags: int = SampleFlag.USAGE_FROM_SERVER
    gaps: Sequence[float] = ()


def streamed(sent: float, first: float, gaps: Sequence[float], output: int, status: int = RequestStatus.OK) -> Req:
    """A streaming request whose last token is its first plus its gaps, done 1 ms later."""
    last = first + sum(gaps)
    return Req(sent=sent, first=first, last=last, done=last + 1, gaps=gaps, output=output, status=status)


def columns(*reqs: Req) -> SampleColumns:
    def ns(ms: float) -> int:
        return round(ms * MS)

    return SampleColumns(
        sent_unix_ns=np.array([T0 + ns(r.sent) for r in reqs], dtype=np.int64),
        queue_delay_ns=np.array([ns(r.queue) for r in reqs], dtype=np.int64),
        first_token_ns=np.array([ns(r.first) for r in reqs], dtype=np.int64),
        last_token_ns=np.array([ns(r.last) for r in reqs], dtype=np.int64),
        done_ns=np.array([ns(r.done) for r in reqs], dtype=np.int64),
        prompt_tokens=np.array([r.prompt for r in reqs], dtype=np.int64),
        output_tokens=np.array([r.output for r in reqs], dtype=np.int64),
        status=np.array([r.status for r in reqs], dtype=np.int64),
        flags=np.array([r.flags for r in reqs], dtype=np.int64),
        itl_count=np.array([len(r.gaps) for r in reqs], dtype=np.int64),
        itl_ns=np.array([ns(g) for r in reqs for g in r.gaps], dtype=np.int64),
    )


# --- summarize -------------------------------------------------------------------------------


def test_summarize_by_hand() -> None:
    s = summarize(np.array([1, 2, 3, 4]) * MS)
    assert s.count == 4
    assert s.mean == pytest.approx(2.5)  # 10 / 4
    # deviations -1.5, -0.5, 0.5, 1.5 -> squares sum to 5, / 4 = 1.25 (population), sqrt = 1.1180...
    assert s.std == pytest.approx(1.25**0.5)
    assert (s.min, s.max) == (1.0, 4.0)
    # linear: index (n - 1) * q = 3q between sorted neighbours
    assert s.p50 == pytest.approx(2.5)  # 1.5   -> 2 + 0.5 * (3 - 2)
    assert s.p90 == pytest.approx(3.7)  # 2.7   -> 3 + 0.7 * (4 - 3)
    assert s.p95 == pytest.approx(3.85)  # 2.85
    assert s.p99 == pytest.approx(3.97)  # 2.97
    assert s.p999 == pytest.approx(3.997)  # 2.997


def test_summarize_unsorted_with_ties() -> None:
    # sorted: 1 1 5 9 10 (ms); p50 = index 2 -> 5; p90 = index 3.6 -> 9 + 0.6 * 1 = 9.6
    s = summarize(np.array([10, 1, 9, 1, 5]) * MS)
    assert s.p50 == pytest.approx(5.0)
    assert s.p90 == pytest.approx(9.6)
    assert s.mean == pytest.approx(26 / 5)
    # deviations from 5.2: 4.8 -4.2 3.8 -4.2 -0.2 -> squares 23.04 + 17.64 + 14.44 + 17.64 + 0.04
    assert s.std == pytest.approx((72.8 / 5) ** 0.5)


def test_summarize_single_value_and_empty() -> None:
    one = summarize(np.array([7 * MS]))
    assert (one.count, one.mean, one.std, one.min, one.max, one.p50, one.p999) == (1, 7, 0, 7, 7, 7, 7)
    assert summarize(np.array([], dtype=np.int64)) == LatencySummary()
    assert summarize(np.array([], dtype=np.int64)).p99 == 0.0


@pytest.mark.parametrize(
    "kind", ["continuous", "few distinct values", "narrow band and one outlier", "all equal", "floats"]
)
def test_summarize_matches_numpy_on_large_arrays(kind: str) -> None:
    # Above 2**16 values the percentiles come from a histogram search, not np.percentile; the
    # definition is numpy's 'linear' method, so the result must be identical, not just close.
    rng = np.random.default_rng(7)
    n = 300_001
    values: np.ndarray = {
        "continuous": rng.lognormal(np.log(20 * MS), 0.6, n).astype(np.int64),
        "few distinct values": rng.integers(5, 30, n) * MS,
        "narrow band and one outlier": np.append(10 * MS + rng.integers(0, 2000, n - 1), 60_000 * MS),
        "all equal": np.full(n, 3 * MS),
        "floats": rng.random(n) * 1e8,
    }[kind]
    s = summarize(values)
    expected = np.percentile(values, [50, 90, 95, 99, 99.9]) / MS
    assert [s.p50, s.p90, s.p95, s.p99, s.p999] == expected.tolist()
    assert s.mean == pytest.approx(values.mean() / MS, rel=1e-12)
    assert s.std == pytest.approx(values.std() / MS, rel=1e-9, abs=1e-12)
    assert (s.min, s.max, s.count) == (values.min() / MS, values.max() / MS, n)


# --- per-request definitions -----------------------------------------------------------------


def test_tpot_is_per_token_after_the_first() -> None:
    m = compute_stage_metrics(
        columns(
            # (1000 - 100) ms over 10 - 1 tokens after the first = 100 ms
            Req(first=100, last=1000, done=1001, output=10),
            Req(first=50, last=50, done=60, output=1),  # one token: no TPOT
            Req(done=500, output=40),  # non-streaming: no first/last token, no TPOT
            Req(first=10, last=20, done=30, output=5, status=HTTP_5XX),  # failed: never in latencies
        )
    )
    assert m.tpot.count == 1
    assert m.tpot.mean == pytest.approx(100.0)


def test_per_request_tpot_is_defined_only_with_two_tokens_and_both_token_times() -> None:
    values, defined = metrics.per_request_tpot(
        # (1000 - 100) / 9; one token; no first token; no last token; (70 - 40) / 3, in ms
        [100.0, 50.0, 0.0, 30.0, 40.0],
        [1000.0, 50.0, 900.0, 0.0, 70.0],
        [10, 1, 8, 4, 4],
    )
    assert defined.tolist() == [True, False, False, False, True]
    assert values[defined].tolist() == [100.0, 10.0]
    assert np.isnan(values[~defined]).all()


def test_itl_pools_every_gap_of_ok_requests() -> None:
    m = compute_stage_metrics(
        columns(
            streamed(0, 100, [10, 10, 10, 10], output=5),
            streamed(0, 100, [100], output=2),
            streamed(0, 100, [5000, 5000], output=3, status=TIMEOUT),  # failed: gaps left out
        )
    )
    # pooled gaps 10 10 10 10 100 -> mean 140 / 5 = 28 (the mean of per-request means is 55)
    assert m.itl.count == 5
    assert m.itl.mean == pytest.approx(28.0)
    assert m.itl.p50 == pytest.approx(10.0)
    assert m.itl.p90 == pytest.approx(64.0)  # index 3.6 -> 10 + 0.6 * 90
    assert m.itl.max == pytest.approx(100.0)


def test_ttft_e2e_and_queueing() -> None:
    m = compute_stage_metrics(
        columns(
            Req(first=200, last=900, done=950, queue=100, output=3, gaps=[300, 400]),
            Req(done=600, queue=20, output=4),  # non-streaming: no TTFT, E2E from done
            Req(done=5, queue=1000, status=CONNECTION),  # failed: only in queue delay
        )
    )
    assert m.ttft.count == 1
    assert m.ttft.mean == pytest.approx(200.0)
    # E2E = last token - sent = 900, and done - sent = 600 for the non-streaming one
    assert (m.e2e.count, m.e2e.min, m.e2e.max) == (2, 600.0, 900.0)
    # plus queueing: 900 + 100 = 1000, 600 + 20 = 620
    assert (m.e2e_including_queue.min, m.e2e_including_queue.max) == (620.0, 1000.0)
    # all three requests: (100 + 20 + 1000) / 3
    assert m.queue_delay.count == 3
    assert m.queue_delay.mean == pytest.approx(1120 / 3)


# --- counts, warmup, errors ------------------------------------------------------------------


def test_errors_by_kind_and_names() -> None:
    m = compute_stage_metrics(
        columns(
            Req(done=10, output=1),
            Req(done=10, status=HTTP_5XX),
            Req(done=10, status=HTTP_5XX),
            Req(done=10, status=TIMEOUT),
            Req(done=10, status=99),  # a kind this version does not know is still a failure
        )
    )
    assert (m.requests_ok, m.requests_failed) == (1, 4)
    assert m.errors == {"http_5xx": 2, "timeout": 1, "unknown": 1}
    assert [error_kind_name(s) for s in range(2, 8)] == [
        "http_4xx",
        "http_5xx",
        "timeout",
        "connection",
        "protocol",
        "cancelled",
    ]
    assert dict(ERROR_KINDS) == {s: error_kind_name(s) for s in range(2, 8)}
    assert error_kind_name(0) == "unknown"
    with pytest.raises(ValueError):
        error_kind_name(RequestStatus.OK)


def test_warmup_requests_are_excluded_everywhere() -> None:
    warm = SampleFlag.USAGE_FROM_SERVER | SampleFlag.WARMUP
    m = compute_stage_metrics(
        columns(
            # warmup: earlier, slower, failing and token-heavy; none of it may show
            Req(sent=0, first=5000, last=9000, done=9000, output=1000, queue=700, flags=warm, gaps=[4000]),
            Req(sent=0, done=20_000, status=TIMEOUT, flags=warm),
            Req(sent=10_000, first=100, last=300, done=1000, prompt=10, output=3, gaps=[100, 100]),
        )
    )
    assert (m.requests_ok, m.requests_failed, m.errors) == (1, 0, {})
    assert m.duration_s == pytest.approx(1.0)  # 10 s -> 11 s, the warmup window ignored
    assert (m.ttft.max, m.itl.max, m.queue_delay.max) == (100.0, 100.0, 0.0)
    assert (m.prompt_tokens, m.output_tokens) == (10, 3)
    assert m.output_token_throughput == pytest.approx(3.0)
    assert [b.second for b in m.time_series] == [0, 1]  # from the first non-warmup sent


def test_output_tokens_estimated_only_from_ok_requests() -> None:
    counted = compute_stage_metrics(columns(Req(done=1, output=5), Req(done=1, output=5, flags=0)))
    assert counted.output_tokens_estimated
    failed = compute_stage_metrics(columns(Req(done=1, output=5), Req(done=1, status=TIMEOUT, flags=0)))
    assert not failed.output_tokens_estimated


# --- goodput ---------------------------------------------------------------------------------


def test_good_fraction_counts_failed_requests() -> None:
    # 10 requests over 2 s: 7 good, 1 OK but TTFT 900 ms > 500 ms, 2 failed
    reqs = [Req(sent=0, first=100, last=500, done=2000, output=5)] * 7
    reqs.append(Req(sent=0, first=900, last=1000, done=2000, output=5))
    reqs += [Req(sent=0, done=1500, status=HTTP_5XX)] * 2
    m = compute_stage_metrics(columns(*reqs), Slo(ttft_ms=500))
    assert m.good_fraction == pytest.approx(0.7)  # 7 / 10, not 7 / 8
    assert m.goodput == pytest.approx(3.5)  # 7 good / 2 s
    assert m.request_throughput == pytest.approx(4.0)  # 8 OK / 2 s


def test_goodput_needs_every_slo() -> None:
    reqs = [
        # TTFT 100, TPOT (1100 - 100) / 10 = 100, E2E 1100: good
        Req(first=100, last=1100, done=1100, output=11),
        # TPOT (2100 - 100) / 10 = 200 > 150: not good
        Req(first=100, last=2100, done=2100, output=11),
        # E2E 2500 > 2000: not good
        Req(first=100, last=2500, done=2500, output=25),
        # one token: TPOT undefined, which meets the objective (vLLM counts it as 0): good
        Req(first=300, last=300, done=300, output=1),
        # non-streaming: TTFT cannot be shown to meet the objective: not good
        Req(done=400, output=3),
    ]
    m = compute_stage_metrics(columns(*reqs), Slo(ttft_ms=500, tpot_ms=150, e2e_ms=2000))
    assert m.duration_s == pytest.approx(2.5)
    assert m.good_fraction == pytest.approx(2 / 5)
    assert m.goodput == pytest.approx(2 / 2.5)
    # the boundary counts as meeting the objective: TTFT 100 <= 100
    assert compute_stage_metrics(columns(reqs[0]), Slo(ttft_ms=100)).good_fraction == 1.0


def test_goodput_absent_without_thresholds() -> None:
    cols = columns(Req(first=1, last=1, done=1, output=1))
    for slo in (None, Slo()):
        m = compute_stage_metrics(cols, slo)
        assert (m.goodput, m.good_fraction) == (None, None)


# --- stage-wide rates ------------------------------------------------------------------------


def test_duration_and_throughputs() -> None:
    m = compute_stage_metrics(
        columns(
            Req(sent=0, first=100, last=900, done=1000, prompt=10, output=20, gaps=[800]),
            Req(sent=500, done=2000, prompt=30, output=40),  # ends at 2.5 s
            Req(sent=3000, done=1000, prompt=99, output=99, status=TIMEOUT),  # ends at 4 s
        )
    )
    # first sent 0 -> last end 3000 + 1000 = 4000 ms
    assert m.duration_s == pytest.approx(4.0)
    assert m.request_throughput == pytest.approx(0.5)  # 2 OK / 4 s
    assert (m.prompt_tokens, m.output_tokens) == (40, 60)  # OK requests only
    assert m.output_token_throughput == pytest.approx(15.0)  # 60 / 4
    assert m.total_token_throughput == pytest.approx(25.0)  # (40 + 60) / 4
    # in flight: 1 + 2 + 1 s = 4 s over 4 s
    assert m.achieved_concurrency == pytest.approx(1.0)


def test_achieved_concurrency() -> None:
    # two requests in flight for the whole 2 s window
    both = compute_stage_metrics(columns(Req(sent=0, done=2000, output=1), Req(sent=0, done=2000, output=1)))
    assert both.achieved_concurrency == pytest.approx(2.0)
    # back to back: one at a time
    serial = compute_stage_metrics(columns(Req(sent=0, done=1000, output=1), Req(sent=1000, done=1000, output=1)))
    assert serial.achieved_concurrency == pytest.approx(1.0)
    # a failed request without `done` still occupied a slot until its last known event (1 s)
    failed = compute_stage_metrics(columns(Req(sent=0, done=2000, output=1), Req(sent=0, first=1000, status=TIMEOUT)))
    assert failed.achieved_concurrency == pytest.approx(1.5)  # (2 + 1) / 2


def test_peak_and_time_series() -> None:
    m = compute_stage_metrics(
        columns(
            # events at 0.1, 0.5, 0.9, 1.3 s carrying 8 tokens -> 2 each: 6 in second 0, 2 in second 1
            Req(sent=0, first=100, last=1300, done=1350, output=8, gaps=[400, 400, 400]),
            # non-streaming: all 10 tokens at done = 1.5 s
            Req(sent=1000, done=500, output=10),
            # one event (no gaps): all 5 tokens at its last token, 2.2 s
            Req(sent=2000, first=200, last=200, done=900, output=5),
            # failed at 2.5 s
            Req(sent=2400, done=100, status=HTTP_5XX),
        )
    )
    assert m.time_series == [
        SecondBucket(second=0, completed=0, errors=0, output_tokens=6.0, ttft_p50_ms=0.0, ttft_p99_ms=0.0),
        # A (TTFT 100) and B (no TTFT) end in second 1
        SecondBucket(second=1, completed=2, errors=0, output_tokens=12.0, ttft_p50_ms=100.0, ttft_p99_ms=100.0),
        # C ends at 2.9 s
        SecondBucket(second=2, completed=1, errors=1, output_tokens=5.0, ttft_p50_ms=200.0, ttft_p99_ms=200.0),
    ]
    assert m.peak_output_token_throughput == pytest.approx(12.0)  # 2 + 10 in second 1


def test_tokens_follow_each_requests_own_events() -> None:
    m = compute_stage_metrics(
        columns(
            # events at 0.1, 0.7 s; 5 tokens -> 2.5 each, both in second 0
            streamed(0, 100, [600], output=5),
            # events at 1.7, 2.0, 2.6 s; 6 tokens -> 2 each: 2 in second 1, 4 in second 2
            streamed(1500, 200, [300, 600], output=6),
            # listed after a later request: events at 0.6, 0.7, 0.8, 0.9 s, 1 token each
            streamed(500, 100, [100, 100, 100], output=4),
        )
    )
    assert [b.output_tokens for b in m.time_series] == pytest.approx([2.5 + 2.5 + 4, 2, 4])
    assert m.peak_output_token_throughput == pytest.approx(9.0)


@pytest.mark.parametrize("chunk", [1, 7, 65_536])
def test_tokens_per_second_match_a_per_event_count_in_any_slicing(chunk: int, monkeypatch: pytest.MonkeyPatch) -> None:
    # Requests are counted a slice at a time (metrics._CHUNK_REQUESTS); the slicing must not
    # change a single bucket. Reference: every event of every request placed one by one.
    monkeypatch.setattr(metrics, "_CHUNK_REQUESTS", chunk)
    rng = np.random.default_rng(7)
    reqs = []
    for _ in range(300):
        gaps = rng.integers(1, 400, size=int(rng.integers(1, 12))).tolist()
        reqs.append(
            streamed(float(rng.integers(0, 5000)), float(rng.integers(1, 900)), gaps, output=int(rng.integers(1, 40)))
        )
    expected = np.zeros(16)
    t0 = min(r.sent for r in reqs)
    for r in reqs:
        events = np.cumsum([r.sent - t0 + r.first, *r.gaps])
        for at in events:
            expected[int(at // 1000)] += r.output / len(events)
    got = [b.output_tokens for b in compute_stage_metrics(columns(*reqs)).time_series]
    assert got == pytest.approx(expected[: len(got)].tolist())
    assert expected[len(got) :].sum() == 0


def test_time_series_ttft_percentiles_per_second() -> None:
    m = compute_stage_metrics(
        columns(
            Req(sent=0, first=100, last=100, done=150, output=1),
            Req(sent=0, first=300, last=300, done=350, output=1),
            Req(sent=0, first=200, last=200, done=250, output=1),
            Req(sent=1000, first=50, last=50, done=60, output=1),
        )
    )
    first, second = m.time_series
    # second 0 holds TTFTs 100 200 300: p50 = 200, p99 = index 1.98 -> 200 + 0.98 * 100
    assert first.ttft_p50_ms == pytest.approx(200.0)
    assert first.ttft_p99_ms == pytest.approx(298.0)
    assert (second.ttft_p50_ms, second.ttft_p99_ms, second.completed) == (50.0, 50.0, 1)


# --- columns ---------------------------------------------------------------------------------


def test_select_slices_gaps_by_request() -> None:
    cols = columns(
        Req(gaps=[1, 2], sent=1),
        Req(sent=2),  # no gaps
        Req(gaps=[3, 4, 5], sent=3),
    )

    def picked(mask: list[bool]) -> tuple[list[int], list[int]]:
        s = cols.select(np.array(mask))
        return ((s.sent_unix_ns - T0) // MS).tolist(), (s.itl_ns // MS).tolist()

    assert picked([True, False, True]) == ([1, 3], [1, 2, 3, 4, 5])
    assert picked([False, True, True]) == ([2, 3], [3, 4, 5])
    assert picked([True, True, False]) == ([1, 2], [1, 2])
    assert picked([False, True, False]) == ([2], [])
    assert picked([False, False, False]) == ([], [])
    assert cols.select(np.array([True] * 3)) is cols
    with pytest.raises(ValueError):
        cols.select(np.array([True, False]))


def test_concat_keeps_gaps_aligned() -> None:
    a = columns(Req(sent=1, gaps=[1]), Req(sent=2))
    b = columns(Req(sent=3, gaps=[7, 8]))
    both = SampleColumns.concat([a, SampleColumns.empty(), b])
    assert len(both) == 3
    assert both.itl_count.tolist() == [1, 0, 2]
    assert (both.select(np.array([False, False, True])).itl_ns // MS).tolist() == [7, 8]
    assert len(SampleColumns.concat([])) == 0


def test_columns_are_validated() -> None:
    good = columns(Req(gaps=[1, 2]))
    with pytest.raises(ValueError, match="itl_count"):
        SampleColumns(**{**vars(good), "itl_ns": np.array([1], dtype=np.int64)})
    with pytest.raises(ValueError, match="status"):
        SampleColumns(**{**vars(good), "status": np.array([1, 1], dtype=np.int64)})


def test_empty_inputs_give_zeros() -> None:
    warm = SampleFlag.USAGE_FROM_SERVER | SampleFlag.WARMUP
    for cols in (SampleColumns.empty(), columns(Req(done=5, output=3, flags=warm))):
        m = compute_stage_metrics(cols)
        assert (m.requests_ok, m.requests_failed, m.errors) == (0, 0, {})
        assert (m.duration_s, m.request_throughput, m.output_token_throughput) == (0.0, 0.0, 0.0)
        assert (m.peak_output_token_throughput, m.achieved_concurrency) == (0.0, 0.0)
        assert (m.ttft, m.itl, m.queue_delay) == (LatencySummary(), LatencySummary(), LatencySummary())
        assert (m.time_series, m.goodput, m.good_fraction) == ([], None, None)
        with_slo = compute_stage_metrics(cols, Slo(ttft_ms=100))
        assert (with_slo.goodput, with_slo.good_fraction) == (0.0, 0.0)


def test_only_failures() -> None:
    m = compute_stage_metrics(columns(Req(sent=0, done=1000, status=TIMEOUT), Req(sent=0, status=CONNECTION)))
    assert (m.requests_ok, m.requests_failed, m.duration_s) == (0, 2, 1.0)
    assert (m.ttft.count, m.e2e.count, m.itl.count, m.output_token_throughput) == (0, 0, 0, 0.0)
    assert [(b.completed, b.errors) for b in m.time_series] == [(0, 1), (0, 1)]
