"""Confidence intervals through the real controller, agent and mock model server: every figure
of GetRunResult carries an interval that contains it, and more requests make it narrower."""

from __future__ import annotations

from pathlib import Path

import pytest

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.domain.results.provider import RESULT_FORMAT
from controller.server import Controller
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final
from tests.integration.test_stored_results import ROW, finished_run, sql, started, stored_row

pytestmark = pytest.mark.timeout(120)

LATENCIES = ("ttft", "tpot", "itl", "e2e", "queue_delay", "e2e_including_queue")
FIGURES = ("mean", "p50", "p90", "p95", "p99", "p999")
RATES = ("request_throughput", "output_token_throughput", "total_token_throughput")


def assert_intervals_contain_their_figures(row: run_pb2.StageResult) -> None:
    for name in LATENCIES:
        latency: run_pb2.LatencyStats = getattr(row, name)
        for figure in FIGURES:
            field = f"{figure}_ci"
            if figure == "mean" and latency.count < 2:
                assert not latency.HasField(field)
                continue
            assert latency.HasField(field), (row.name, name, field)
            ci: run_pb2.Interval = getattr(latency, field)
            assert ci.low <= getattr(latency, f"{figure}_ms") <= ci.high, (row.name, name, figure, ci)
            if figure != "mean":  # a percentile's bounds are values seen
                assert latency.min_ms <= ci.low and ci.high <= latency.max_ms, (row.name, name, figure, ci)
    for name in RATES:
        # Rates need 3 whole seconds of the stage.
        assert row.HasField(f"{name}_ci") == (row.duration_s >= 3.0), (row.name, name, row.duration_s)
        if row.HasField(f"{name}_ci"):
            ci = getattr(row, f"{name}_ci")
            assert 0 <= ci.low <= getattr(row, name) <= ci.high
    counted = row.requests_ok + row.requests_failed
    assert row.error_rate == row.requests_failed / counted
    assert row.HasField("error_rate_ci")
    assert row.error_rate_ci.low <= row.error_rate <= row.error_rate_ci.high
    # Goodput and the good fraction only with an SLO.
    assert row.HasField("good_fraction_ci") == row.HasField("good_fraction")
    assert row.HasField("goodput_ci") == (row.HasField("goodput") and row.duration_s >= 3.0)
    if row.HasField("good_fraction"):
        assert row.good_fraction_ci.low <= row.good_fraction <= row.good_fraction_ci.high


async def test_get_run_result_carries_intervals_narrower_with_more_requests(
    controller: Controller, client: ControllerClient
) -> None:
    # TTFT spread by the jitter, so its percentiles have something to be uncertain about.
    config = MockConfig(ttft_ms=30, itl_ms=2, output_tokens=8, jitter_ms=20, error_rate=0.05, seed=3)
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = spec_for(mock, [(1, 0.0), (8, 4.0)], output_tokens=8)
        spec.stages[0].ClearField("duration")
        spec.stages[0].requests = 20
        spec.slo.ttft.FromMilliseconds(45)
        run = await client.create_run(spec)
        final = await wait_final(client, run.id)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        result = await client.get_result(run.id)

    assert result.confidence_percent == 95.0
    few, many = result.stages
    assert few.requests_ok + few.requests_failed == 20
    # 8 requests in flight for 4 s at ~50 ms each: hundreds of requests, even on a loaded machine.
    assert many.requests_ok > 5 * few.requests_ok
    for row in (few, many, *many.agents, result.overall):
        assert row.HasField("good_fraction")  # the SLO is set
        assert_intervals_contain_their_figures(row)
    # About 1/sqrt(n): the median of hundreds of requests is known far better than of 20.
    width = [s.ttft.p50_ci.high - s.ttft.p50_ci.low for s in (few, many)]
    assert 0 < width[1] < width[0], width
    # 20 values do not bound p99 from above; the interval's top is then the largest value.
    assert few.ttft.p99_ci.high_open and few.ttft.p99_ci.high == few.ttft.max_ms


async def test_a_result_stored_before_intervals_gains_them_when_read(db_path: Path) -> None:
    async with started(db_path) as (controller, client):
        run_id = await finished_run(controller, client)
        await stored_row(db_path, run_id)
    # What a controller before intervals stored (format 4): the same figures, no intervals.
    _, _, _, fmt, stored = sql(db_path, ROW, run_id)[0]
    assert fmt == RESULT_FORMAT > 4
    old = run_pb2.RunResult.FromString(stored)
    old.ClearField("confidence_percent")
    for row in (*old.stages, old.overall):
        for name in LATENCIES:
            for figure in FIGURES:
                getattr(row, name).ClearField(f"{figure}_ci")
        for name in (*RATES, "goodput", "good_fraction", "error_rate"):
            row.ClearField(f"{name}_ci")
    sql(db_path, "UPDATE run_results SET result = ?, format = 4", old.SerializeToString())
    async with started(db_path) as (_, client):
        result = await client.get_result(run_id)
    assert result.confidence_percent == 95.0
    for row in (*result.stages, result.overall):
        assert row.ttft.HasField("p50_ci") and row.HasField("error_rate_ci")
        assert_intervals_contain_their_figures(row)
    assert sql(db_path, ROW, run_id)[0][3] == RESULT_FORMAT  # and stored again in this format
