"""The server-side view on real parts: the mock's /metrics, runs that scrape it, the
client-vs-server cross-check, scrape failures as events, and the report's server charts."""

from __future__ import annotations

import asyncio
import json
import socket

import aiohttp
import grpc
import pytest

from agent.scrape import COUNTER, GAUGE, ExpositionError, MetricSample, parse_exposition
from client.formats import result_warnings
from client.report.collect import collect
from client.report.page import build_report
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from controller.store import repository as repo
from controller.store.models import database_proxy
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.conftest import eventually
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final

pytestmark = pytest.mark.timeout(90)


def metrics_url(mock: MockServer) -> str:
    return mock.base_url.removesuffix("/v1") + "/metrics"


async def scrape(mock: MockServer) -> dict[str, MetricSample]:
    async with aiohttp.ClientSession() as s, s.get(metrics_url(mock)) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        samples = parse_exposition(await r.text())
    out: dict[str, MetricSample] = {}
    for sample in samples:
        key = sample.name + ("{" + sample.labels + "}" if "finished_reason" in sample.labels else "")
        out[key] = sample
    return out


async def complete(session: aiohttp.ClientSession, mock: MockServer, max_tokens: int, stream: bool) -> dict[str, int]:
    body = {
        "model": "mock",
        "messages": [{"role": "user", "content": "one two three four"}],
        "max_tokens": max_tokens,
        "stream": stream,
    }
    if stream:
        body["stream_options"] = {"include_usage": True}
    async with session.post(mock.base_url + "/chat/completions", json=body) as r:
        text = await r.text()
    if not stream:
        return dict(json.loads(text)["usage"])
    chunks = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    return dict(next(c["usage"] for c in chunks if c.get("usage")))


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def with_server_metrics(spec: run_pb2.RunSpec, *endpoints: str, interval_ms: int = 250) -> run_pb2.RunSpec:
    spec.server_metrics.endpoints.extend(endpoints)
    spec.server_metrics.scrape_interval.FromMilliseconds(interval_ms)
    return spec


async def test_mock_metrics_count_what_it_did() -> None:
    async with MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=16, under_report_usage=0.25)) as mock:
        before = await scrape(mock)
        assert before["vllm:generation_tokens_total"].value == 0
        assert before["vllm:num_requests_running"] == MetricSample(
            "vllm:num_requests_running", 'model_name="mock"', GAUGE, 0.0
        )
        async with aiohttp.ClientSession() as session:
            usages = [await complete(session, mock, 16, stream=True) for _ in range(4)]
            usages.append(await complete(session, mock, 8, stream=False))
        after = await scrape(mock)
        stats = mock.stats
        # The usage under-reports (12 of 16, 6 of 8); the counters count what was generated.
        assert [u["completion_tokens"] for u in usages] == [12, 12, 12, 12, 6]
        assert after["vllm:generation_tokens_total"].value == stats.output_tokens_total == 4 * 16 + 8
        assert after["vllm:generation_tokens_total"].kind == COUNTER
        assert (
            after["vllm:prompt_tokens_total"].value
            == stats.prompt_tokens_total
            == sum(u["prompt_tokens"] for u in usages)
        )
        assert after['vllm:request_success_total{finished_reason="length",model_name="mock"}'].value == 5
        assert after["vllm:num_requests_running"].value == 0
        assert after["vllm:kv_cache_usage_perc"].value == 0

        # A request in flight shows in the running gauge and in the KV-cache use.
        slow = MockServer(MockConfig(ttft_ms=5, itl_ms=50, output_tokens=100))
        async with slow, aiohttp.ClientSession() as session:
            task = asyncio.create_task(complete(session, slow, 100, stream=True))
            busy = await eventually(lambda: scrape(slow), lambda m: m["vllm:num_requests_running"].value == 1)
            assert busy["vllm:kv_cache_usage_perc"].value > 0
            task.cancel()

        # Counters are monotonic: resetting /stats does not reset them.
        async with (
            aiohttp.ClientSession() as session,
            session.post(mock.base_url.removesuffix("/v1") + "/stats/reset") as r,
        ):
            assert r.status == 200
        assert (await scrape(mock))["vllm:generation_tokens_total"].value == 4 * 16 + 8

    async with MockServer(MockConfig(malformed_metrics=True)) as broken:
        async with aiohttp.ClientSession() as s, s.get(metrics_url(broken)) as r:
            text = await r.text()
        with pytest.raises(ExpositionError):
            parse_exposition(text)


async def test_run_stores_server_series_and_client_equals_server(
    controller: Controller, client: ControllerClient
) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=20, itl_ms=4, output_tokens=16)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = with_server_metrics(spec_for(mock, [(4, 2.0)], output_tokens=16), metrics_url(mock))
        spec.stages[0].warmup_requests = 3  # the server counts warmup requests too
        spec.skip_preflight = True  # its request would come before the first scrape, in no window
        run = await client.create_run(spec)
        final = await wait_final(client, run.id)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        result = await client.get_result(run.id)
        report = build_report([await collect(client, run.id)])
        served = mock.stats.output_tokens_total
        prompted = mock.stats.prompt_tokens_total

    stage = result.stages[0]
    sm = stage.server_metrics
    assert sm.scrapes_failed == 0 and sm.scrapes_ok >= 5 and not sm.errors
    checks = {c.quantity: c for c in sm.cross_checks}
    tokens, requests = checks["generated_tokens"], checks["finished_requests"]
    assert tokens.server_metrics == ["vllm:generation_tokens_total"]
    assert tokens.client_value == tokens.server_value == served > 0
    assert requests.client_value == requests.server_value == stage.requests_ok + 3
    prompt = checks["prompt_tokens"]
    assert prompt.server_metrics == ["vllm:prompt_tokens_total"]
    assert prompt.client_value == prompt.server_value == prompted > 0
    for c in (tokens, requests, prompt):
        assert c.window_complete and not c.mismatch and c.difference_percent == 0
        assert c.tolerance_percent == 2.0 and "agree" in c.message

    # Series aligned with the client time series: second 0 is the stage's first request.
    by_name = {s.name: s for s in sm.series}
    running = by_name["vllm:num_requests_running"]
    assert running.role == "running_requests" and running.kind == run_pb2.SERVER_METRIC_KIND_GAUGE
    last_second = max(b.second for b in stage.time_series)
    assert running.points and all(0 <= p.second <= last_second + 1 for p in running.points)
    assert max(p.value for p in running.points) <= 4 + 3  # never more than the concurrency
    rate = by_name["vllm:generation_tokens_total"]
    assert rate.role == "generated_tokens" and rate.kind == run_pb2.SERVER_METRIC_KIND_COUNTER
    assert sum(p.value for p in rate.points) > 0

    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    stored = await controller.db.read(
        lambda: database_proxy.execute_sql(
            "SELECT COUNT(*) FROM server_scrapes WHERE run_pk = ?", (record.pk,)
        ).fetchone()[0]
    )
    assert stored == sm.scrapes_ok

    # The report draws the server charts beside the client timeline, and the cross-check.
    assert 'data-chart="server-requests"' in report and 'data-chart="server-kv-cache"' in report
    assert 'id="server-metrics"' in report and "vllm:generation_tokens_total" in report


async def test_under_reported_usage_is_flagged(controller: Controller, client: ControllerClient) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=10, itl_ms=2, output_tokens=16, under_report_usage=0.25)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = with_server_metrics(spec_for(mock, [(4, 0.0)], output_tokens=16), metrics_url(mock))
        spec.stages[0].ClearField("duration")
        spec.stages[0].requests = 40
        run = await client.create_run(spec)
        final = await wait_final(client, run.id)
        result = await client.get_result(run.id)
        report = build_report([await collect(client, run.id, with_samples=False)])
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    checks = {c.quantity: c for c in result.stages[0].server_metrics.cross_checks}
    tokens = checks["generated_tokens"]
    assert tokens.server_value == 40 * 16 and tokens.client_value == 40 * 12
    assert tokens.difference_percent == pytest.approx(-25.0)
    assert tokens.mismatch and tokens.window_complete and "MISMATCH" in tokens.message
    assert not checks["finished_requests"].mismatch  # the requests themselves all arrived
    assert "mismatch" in report.lower()
    # What `llm-loadtest run` prints under its table, each line after "WARNING ".
    warnings = result_warnings(result)
    assert any(w.startswith("stage 0: client/server mismatch: generated tokens") and "MISMATCH" in w for w in warnings)


async def test_scrape_failures_are_events_not_failures(controller: Controller, client: ControllerClient) -> None:
    down = f"http://127.0.0.1:{closed_port()}/metrics"
    async with (
        MockServer(MockConfig(ttft_ms=10, itl_ms=2, output_tokens=8, malformed_metrics=True)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = with_server_metrics(spec_for(mock, [(2, 1.0)], output_tokens=8), metrics_url(mock), down)
        run = await client.create_run(spec)
        final = await wait_final(client, run.id)
        result = await client.get_result(run.id)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    sm = result.stages[0].server_metrics
    assert sm.scrapes_ok == 0 and sm.scrapes_failed >= 4 and not sm.series and not sm.cross_checks
    errors = {e.endpoint: e for e in sm.errors}
    assert set(errors) == {metrics_url(mock), down}
    assert "malformed exposition text" in errors[metrics_url(mock)].message
    assert "cannot connect" in errors[down].message
    assert all(e.count >= 2 and e.first_time.ToNanoseconds() <= e.last_time.ToNanoseconds() for e in sm.errors)

    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    events = await controller.db.read(repo.list_events, record.pk)
    failed = [e for e in events if e.kind == "server_metrics_scrape_failed"]
    # One event per endpoint (when it starts failing), not one per failed scrape.
    assert len(failed) == 2
    assert any(down in e.message for e in failed) and any("malformed" in e.message for e in failed)


async def test_invalid_server_metrics_spec_names_the_field(client: ControllerClient) -> None:
    spec = run_pb2.RunSpec()
    spec.target.base_url = "http://127.0.0.1:9/v1"
    spec.target.model = "m"
    spec.stages.add(concurrency=1, requests=1)
    spec.server_metrics.endpoints.extend(["ftp://model/metrics", "http://user:pw@model/metrics"])
    spec.server_metrics.scrape_interval.FromMilliseconds(10)
    spec.server_metrics.mismatch_tolerance_percent = -1
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.create_run(spec)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = info.value.details() or ""
    for path in (
        "spec.server_metrics.endpoints[0]",
        "spec.server_metrics.endpoints[1]",
        "spec.server_metrics.scrape_interval",
        "spec.server_metrics.mismatch_tolerance_percent",
    ):
        assert path in details
    assert "pw" not in details
