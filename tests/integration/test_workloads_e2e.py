"""Load shapes and workloads through the whole stack: controller, agent, mock, SQLite."""

from __future__ import annotations

import json

import pytest

from agent.preflight import PREFLIGHT_REQUESTS
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from controller.store import repository as repo
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.integration.test_run_end_to_end import mock_stats, running_agent, spec_for, wait_final

pytestmark = pytest.mark.timeout(120)


def by_requests(spec: run_pb2.RunSpec, n: int) -> run_pb2.RunSpec:
    for stage in spec.stages:
        stage.ClearField("duration")
        stage.requests = n
    return spec


async def run_to_end(client: ControllerClient, spec: run_pb2.RunSpec) -> tuple[run_pb2.Run, run_pb2.RunResult]:
    run = await client.create_run(spec)
    final = await wait_final(client, run.id, 90)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    return final, await client.get_result(run.id)


async def test_open_loop_rate_and_cap(controller: Controller, client: ControllerClient) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=20, itl_ms=5, output_tokens=16)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = spec_for(mock, [], output_tokens=16)
        # Constant arrivals: the count is then exact, not a Poisson draw (sd ~7% of 200).
        free_stage = spec.stages.add(request_rate=40.0, arrival=run_pb2.ARRIVAL_PROCESS_CONSTANT)
        free_stage.duration.FromSeconds(5)
        # 40 req/s of ~100 ms requests need ~4 in flight; a cap of 1 must queue them.
        capped = spec.stages.add(request_rate=40.0, max_concurrency=1, requests=40)
        capped.duration.FromSeconds(30)
        final, result = await run_to_end(client, spec)
        stats = await mock_stats(mock)
    free, held = result.stages
    sent = free.requests_ok + free.requests_failed
    assert abs(sent / 5.0 - 40.0) <= 40.0 * 0.05, sent
    assert held.requests_ok == 40
    assert held.queue_delay.p50_ms > 100  # requests waited for the cap
    assert held.e2e_including_queue.mean_ms > held.e2e.mean_ms + held.queue_delay.mean_ms * 0.99
    # No cap: sent on schedule. Judged against the capped stage of the same run, not a fixed
    # bound: a loaded machine delays sends too (send lag is measured by bench/agent_stream_start.py).
    assert free.queue_delay.p99_ms < held.queue_delay.p50_ms, (free.queue_delay, held.queue_delay)
    assert stats["requests_total"] == final.progress.requests_ok + final.progress.requests_failed + PREFLIGHT_REQUESTS


async def test_warmup_requests_are_excluded(controller: Controller, client: ControllerClient) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=4)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = by_requests(spec_for(mock, [(2, 0.0)], output_tokens=4), 20)
        spec.stages[0].warmup_requests = 5
        final, result = await run_to_end(client, spec)
        stats = await mock_stats(mock)
    assert stats["requests_total"] == 20 + PREFLIGHT_REQUESTS  # warmup requests ran
    assert result.stages[0].requests_ok == 15  # and appear in no metric
    assert result.stages[0].ttft.count == 15
    assert final.progress.requests_ok == 15


async def test_non_streaming_and_completions(controller: Controller, client: ControllerClient) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=10, itl_ms=2, output_tokens=8)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = by_requests(spec_for(mock, [(2, 0.0)], output_tokens=8), 6)
        spec.target.stream = False
        _, result = await run_to_end(client, spec)
        stage = result.stages[0]
        assert stage.requests_ok == 6
        assert stage.ttft.count == 0  # not measurable without streaming: absent, not E2E
        assert stage.e2e.count == 6 and stage.e2e.p50_ms >= 10 + 7 * 2
        assert stage.output_tokens == 48

        spec = by_requests(spec_for(mock, [(2, 0.0)], output_tokens=8), 6)
        spec.target.api_kind = run_pb2.API_KIND_COMPLETIONS
        _, result = await run_to_end(client, spec)
        assert result.stages[0].requests_ok == 6 and result.stages[0].ttft.count == 6
        stats = await mock_stats(mock)
    assert stats["by_endpoint"]["completions"] == 6 + PREFLIGHT_REQUESTS


async def test_dataset_prompts_and_lengths(controller: Controller, client: ControllerClient) -> None:
    lines = [json.dumps({"prompt": f"question number {i} " + "word " * 20, "max_tokens": 3 + i}) for i in range(4)]
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=100)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = by_requests(spec_for(mock, [(1, 0.0)]), 12)
        spec.workload.dataset.format = run_pb2.DATASET_FORMAT_JSONL
        spec.workload.dataset.content = "\n".join(lines)
        run = await client.create_run(spec)
        assert run.spec.workload.dataset.content == ""  # not echoed back
        assert run.spec.workload.dataset.entry_count == 4
        final = await wait_final(client, run.id)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    cols = await controller.db.read(repo.load_stage_columns, record.pk, 0)
    assert set(cols.output_tokens.tolist()) <= {3, 4, 5, 6}
    assert set(cols.prompt_tokens.tolist()) <= {23}  # "question number i" + 20 words


async def test_fixed_input_length_reaches_the_server(controller: Controller, client: ControllerClient) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=4)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = by_requests(spec_for(mock, [(2, 0.0)], output_tokens=4), 10)
        spec.workload.synthetic.input_tokens.fixed = 300
        run = await client.create_run(spec)
        await wait_final(client, run.id)
        result = await client.get_result(run.id)
    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    cols = await controller.db.read(repo.load_stage_columns, record.pk, 0)
    assert len(cols) == 10
    assert all(abs(p - 300) <= 15 for p in cols.prompt_tokens.tolist()), cols.prompt_tokens
    # The result shows requested next to actual lengths.
    stage = result.stages[0]
    assert stage.mean_requested_input_tokens == 300
    assert stage.mean_requested_output_tokens == 4
    assert abs(stage.mean_input_tokens - 300) <= 15
