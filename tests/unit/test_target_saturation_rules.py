"""The target-saturation tests on synthetic stages: each of the three flags, and the stages
that must not be flagged (Poisson noise, long requests, closed loop)."""

from __future__ import annotations

import numpy as np
import pytest

from common.codes import RequestStatus
from common.metrics import SampleColumns, compute_stage_metrics
from common.proto.loadtest.v1 import run_pb2
from controller.domain.results.server_metrics import GAUGE, SeriesOutcome, ServerStageOutcome
from controller.domain.results.target_saturation import planned_window, target_saturation

pytestmark = pytest.mark.timeout(30)
T0 = 1_700_000_000 * 10**9


def columns(
    sent_s: np.ndarray, ttft_s: np.ndarray | float, e2e_s: np.ndarray | float, ok: int | None = None
) -> SampleColumns:
    n = len(sent_s)
    ttft = np.broadcast_to(np.asarray(ttft_s, dtype=float), (n,))
    e2e = np.broadcast_to(np.asarray(e2e_s, dtype=float), (n,))
    status = np.full(n, RequestStatus.OK)
    if ok is not None:
        status[ok:] = 7  # cancelled: held back by a cap past the stage's end
    zeros = np.zeros(n, dtype=np.int64)
    return SampleColumns(
        sent_unix_ns=T0 + (sent_s * 1e9).astype(np.int64),
        queue_delay_ns=zeros,
        first_token_ns=np.where(status == RequestStatus.OK, ttft * 1e9, 0).astype(np.int64),
        last_token_ns=np.where(status == RequestStatus.OK, e2e * 1e9, 0).astype(np.int64),
        done_ns=np.where(status == RequestStatus.OK, e2e * 1e9 + 1e6, 1e3).astype(np.int64),
        prompt_tokens=np.full(n, 64),
        output_tokens=np.where(status == RequestStatus.OK, 32, 0),
        status=status,
        flags=zeros,
        itl_count=zeros,
        itl_ns=np.zeros(0, dtype=np.int64),
    )


def rate_stage(rate: float, seconds: float = 30.0) -> run_pb2.Stage:
    stage = run_pb2.Stage(request_rate=rate)
    stage.duration.FromSeconds(int(seconds))
    return stage


def poisson_sends(rate: float, seconds: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    times = np.cumsum(rng.exponential(1 / rate, int(rate * seconds * 2)))
    return times[times < seconds]


def judge(stage: run_pb2.Stage, cols: SampleColumns, server: ServerStageOutcome | None = None) -> tuple[bool, str]:
    out = target_saturation(stage, compute_stage_metrics(cols), cols, server)
    return out.saturated, out.reason


def test_a_target_that_keeps_up_is_not_flagged_whatever_the_poisson_draw() -> None:
    for seed in range(50):
        sends = poisson_sends(10.0, 30.0, seed)
        assert judge(rate_stage(10.0), columns(sends, 0.05, 3.0)) == (False, ""), seed


def test_long_requests_are_not_an_overrun() -> None:
    # 25 s per request at 2/s: the stage ends ~25 s after its 30 s, all of it generation.
    sends = poisson_sends(2.0, 30.0, 1)
    assert judge(rate_stage(2.0), columns(sends, 0.1, 25.0)) == (False, "")


def test_a_stage_that_stretched_is_flagged_with_the_achieved_rate() -> None:
    # The case: rate 2/s for 30 s, one slot of ~1.3 s: the last request ends at ~78 s.
    sends = np.arange(60) / 2.0
    service = 1.3
    finish = sends + service
    for i in range(1, 60):
        finish[i] = max(finish[i - 1] + service, sends[i] + service)
    e2e = finish - sends
    ttft = e2e - service + 0.05
    cols = columns(sends, ttft, e2e)
    m = compute_stage_metrics(cols)
    flagged, reason = judge(rate_stage(2.0), cols)
    assert flagged
    assert reason.startswith(f"the target did not keep up at rate 2/s: achieved {m.request_throughput:.2f}/s (")
    assert f"the stage ran {m.duration_s:.1f} s for a planned 30.0 s" in reason
    assert "drain allowance 12.6 s" in reason  # 10 s + 2 x (0.05 s TTFT + 1.25 s generation)


def test_requests_held_back_by_a_cap_are_a_rate_shortfall() -> None:
    sends = poisson_sends(10.0, 30.0, 3)
    cols = columns(sends, 0.05, 0.5, ok=200)
    flagged, reason = judge(rate_stage(10.0), cols)
    assert flagged and "200 requests ok of 300 expected, more than 3 sigma (17.3) short" in reason


def test_a_rising_waiting_gauge_is_flagged_a_flat_one_is_not() -> None:
    sends = poisson_sends(4.0, 20.0, 5)
    cols = columns(sends, 0.05, 0.5)

    def server(values: list[float]) -> ServerStageOutcome:
        series = SeriesOutcome(
            "http://s/metrics", "llamacpp:requests_deferred", GAUGE, "waiting_requests", list(enumerate(values))
        )
        return ServerStageOutcome([series], [], [], len(values), 0, False)

    rising = [float(i // 4) for i in range(20)]  # 0 .. 4: seconds 0-4 average 0.2, seconds 15-19 average 3.8
    flagged, reason = judge(rate_stage(4.0, 20), cols, server(rising))
    assert flagged and "the server's llamacpp:requests_deferred rose from 0.2 to 3.8 over the stage" in reason
    assert judge(rate_stage(4.0, 20), cols, server([3.0] * 20)) == (False, "")


def test_closed_loop_stages_are_not_judged() -> None:
    stage = run_pb2.Stage(concurrency=4)
    stage.duration.FromSeconds(30)
    assert planned_window(stage) is None
    sends = np.arange(10) * 10.0
    assert judge(stage, columns(sends, 50.0, 60.0)) == (False, "")


def test_planned_window_counts_warmup_ramp_and_request_budgets() -> None:
    stage = rate_stage(10.0, 60)
    stage.warmup_duration.FromSeconds(10)
    assert planned_window(stage) == (50.0, 500.0, True)
    stage.ramp.FromSeconds(20)  # counted part of the ramp, 10 s .. 20 s, misses 100 / 40 s
    counted, expected, _ = planned_window(stage)  # type: ignore[misc]
    assert counted == 50.0 and expected == pytest.approx(10 * (50 - 2.5))
    budget = run_pb2.Stage(request_rate=5.0, requests=100)
    assert planned_window(budget) == (20.0, 100.0, False)
