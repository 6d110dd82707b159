"""Results people act on, on real parts: SLO goodput, checks and verdicts, abort on fail,
per-agent rows, time series, export and compare."""

from __future__ import annotations

import time

import grpc
import pytest
from rich.console import Console

from client.render import result_details
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from controller.store import repository as repo
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final

pytestmark = pytest.mark.timeout(120)


def by_requests(spec: run_pb2.RunSpec, n: int) -> run_pb2.RunSpec:
    for stage in spec.stages:
        stage.ClearField("duration")
        stage.requests = n
    return spec


async def test_goodput_counts_failures_and_checks_give_a_verdict(
    controller: Controller, client: ControllerClient
) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=20, itl_ms=2, output_tokens=8, error_rate=0.25, seed=7)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = by_requests(spec_for(mock, [(4, 0.0)], output_tokens=8), 80)
        spec.slo.ttft.FromMilliseconds(200)
        spec.checks.add(expression="p99(ttft) < 500ms")
        spec.checks.add(expression="error_rate < 1%")
        run = await client.create_run(spec)
        final = await wait_final(client, run.id)
        result = await client.get_result(run.id)
    stage = result.stages[0]
    total = stage.requests_ok + stage.requests_failed
    assert total == 80 and 5 < stage.requests_failed < 35
    assert stage.errors["http_5xx"] == stage.requests_failed
    # Every OK request meets the 200 ms TTFT objective; failed ones count in the denominator.
    assert stage.good_fraction == pytest.approx(stage.requests_ok / total)
    assert stage.goodput == pytest.approx(stage.requests_ok / stage.duration_s)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED
    assert [c.passed for c in result.checks] == [True, False]
    assert result.checks[1].measured == pytest.approx(100 * stage.requests_failed / total)
    assert result.verdict == run_pb2.VERDICT_FAIL
    assert stage.time_series and sum(b.completed for b in stage.time_series) == stage.requests_ok


async def test_malformed_check_is_rejected_at_create(client: ControllerClient) -> None:
    spec = run_pb2.RunSpec()
    spec.target.base_url = "http://127.0.0.1:9/v1"
    spec.target.model = "m"
    spec.stages.add(concurrency=1, requests=1)
    spec.checks.add(expression="p99(ttft) << fast")
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.create_run(spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.checks[0].expression" in info.value.details()


async def test_abort_on_fail_stops_a_broken_target(controller: Controller, client: ControllerClient) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=4, error_rate=1.0)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = spec_for(mock, [(4, 60.0), (4, 60.0)], output_tokens=4)
        spec.checks.add(expression="error_rate < 50%", abort_on_fail=True)
        spec.skip_preflight = True  # it would refuse this target before the check could abort
        started = time.monotonic()
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, 40)
    assert time.monotonic() - started < 30  # not the planned 2 minutes
    assert final.state == run_pb2.RUN_STATE_FAILED
    assert "aborted in stage 0" in final.state_reason and "error_rate" in final.state_reason
    assert final.current_stage == 0


async def test_per_agent_rows_export_and_compare(controller: Controller, client: ControllerClient) -> None:
    address = f"127.0.0.1:{controller.port}"
    async with (
        MockServer(MockConfig(ttft_ms=10, itl_ms=2, output_tokens=8)) as fast,
        MockServer(MockConfig(ttft_ms=60, itl_ms=2, output_tokens=8)) as slow,
        running_agent(address, "agent-a"),
        running_agent(address, "agent-b"),
    ):
        spec = by_requests(spec_for(fast, [(4, 0.0)], output_tokens=8), 40)
        spec.placement.agents = 2
        base = await client.create_run(spec)
        assert (await wait_final(client, base.id)).state == run_pb2.RUN_STATE_SUCCEEDED
        same = await client.create_run(spec)
        await wait_final(client, same.id)
        slower_spec = by_requests(spec_for(slow, [(4, 0.0)], output_tokens=8), 40)
        slower = await client.create_run(slower_spec)
        await wait_final(client, slower.id)

        result = await client.get_result(base.id)
        rows = sorted((a.agent_name, a.requests_ok) for a in result.stages[0].agents)
        assert rows == [("agent-a", 20), ("agent-b", 20)]

        exported = [s async for s in client.export_samples(base.id, page_size=7)]
        record = await controller.db.read(repo.get_run, base.id)
        assert record is not None
        assert len(exported) == await controller.db.read(repo.count_samples, record.pk) == 40
        assert {s.agent_name for s in exported} == {"agent-a", "agent-b"}
        assert all(s.status == run_pb2.REQUEST_STATUS_OK and s.output_tokens == 8 for s in exported)
        assert all(10 <= s.ttft_ms < s.e2e_ms for s in exported)
        # No reasoning and no conversation: those columns are 0 (TTFO, where stored, is TTFT).
        assert all(s.first_reasoning_ms == 0 and s.reasoning_tokens == 0 for s in exported)
        assert all(s.session_id == s.turn_index == 0 and not s.last_turn for s in exported)
        assert all(s.first_answer_ms in (0.0, s.ttft_ms) for s in exported)

        itself = await client.compare_runs(base.id, [base.id])
        deltas = [m for st in itself.comparisons[0].stages for m in st.metrics]
        assert deltas and all(m.delta == 0 and not m.regressed for m in deltas)
        compared = await client.compare_runs(base.id, [same.id, slower.id], tolerance_percent=25)
        by_run = {c.run_id: c for c in compared.comparisons}
        assert by_run[slower.id].regressed
        ttft = next(m for m in by_run[slower.id].stages[0].metrics if m.metric == "ttft_p50_ms")
        assert ttft.regressed and ttft.delta > 40
        assert by_run[slower.id].stages[0].load == "concurrency=4"


async def test_whole_run_figures_pool_every_stage(controller: Controller, client: ControllerClient) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=10, itl_ms=2, output_tokens=8, error_rate=0.1, seed=3)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = by_requests(spec_for(mock, [(1, 0.0), (4, 0.0)], output_tokens=8), 30)
        run = await client.create_run(spec)
        assert (await wait_final(client, run.id)).state == run_pb2.RUN_STATE_SUCCEEDED
        result = await client.get_result(run.id)
    overall, stages = result.overall, result.stages
    assert overall.requests_ok == sum(s.requests_ok for s in stages)
    assert overall.requests_failed == sum(s.requests_failed for s in stages) > 0
    assert overall.errors["http_5xx"] == overall.requests_failed
    assert overall.ttft.count == sum(s.ttft.count for s in stages)
    assert overall.itl.count == sum(s.itl.count for s in stages)
    assert overall.ttft.min_ms == min(s.ttft.min_ms for s in stages)
    assert overall.e2e.max_ms == max(s.e2e.max_ms for s in stages)
    assert overall.output_tokens == sum(s.output_tokens for s in stages)
    assert not overall.time_series
    # The detailed terminal view shows each stage and the whole run.
    console = Console(record=True, width=200)
    for part in result_details(result):
        console.print(part)
    text = console.export_text()
    assert "stage 0: " in text and "stage 1: " in text and "whole run" in text
    assert f"failed {overall.requests_failed} (http_5xx {overall.requests_failed})" in text
