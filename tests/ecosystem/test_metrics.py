"""Prometheus metrics of controller and agent: scraped over HTTP, parsed with
prometheus_client's own text parser, checked against what the run did."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator

import aiohttp
import grpc
import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.results.ingest import IngestTarget, to_ingest
from controller.observability import TTFT_BUCKETS_S, LiveRunCollector
from controller.server import Controller
from tests.conftest import eventually
from tests.ecosystem.conftest import ROOT, Stack

pytestmark = [pytest.mark.timeout(120)]

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> Samples:
    """Every sample of an endpoint: (name, sorted labels) -> value, via the official parser."""
    async with aiohttp.ClientSession() as http, http.get(url, timeout=aiohttp.ClientTimeout(total=10)) as r:
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/plain")
        text = await r.text()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over the series whose labels include `labels` (0 when none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def has(samples: Samples, name: str, **labels: str) -> bool:
    want = set(labels.items())
    return any(n == name and want <= set(ls) for n, ls in samples)


def dashboard_metrics() -> set[str]:
    """Metric names in the expressions of examples/grafana/llm-loadtest.json."""
    dashboard = json.loads((ROOT / "examples" / "grafana" / "llm-loadtest.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 15
    return {m for e in exprs for m in re.findall(r"\b((?:llm_loadtest|grpc_server|process)_[a-z_]+)\b", e)}


def spec(target: str, **stage: object) -> run_pb2.RunSpec:
    return run_pb2.RunSpec(
        display_name="metrics",
        target=run_pb2.Target(base_url=target, model="mock"),
        workload=run_pb2.Workload(
            synthetic=run_pb2.SyntheticWorkload(
                input_tokens=run_pb2.LengthDistribution(fixed=32), output_tokens=run_pb2.LengthDistribution(fixed=16)
            )
        ),
        stages=[run_pb2.Stage(**stage)],  # type: ignore[arg-type]
    )


@pytest.mark.e2e
async def test_scrape_controller_and_agent_during_and_after_a_run(stack: Stack) -> None:
    async with ControllerClient(stack.address, timeout_s=10) as client:
        s = spec(stack.target, concurrency=2)
        s.stages[0].duration.FromSeconds(3)
        run = await client.create_run(s)

        # While it runs: its live series are there, labelled by run and stage.
        live = await eventually(
            lambda: scrape(stack.controller_metrics),
            lambda m: value(m, "llm_loadtest_run_requests_total", run_id=run.id, stage="0") > 0,
            timeout_s=30,
        )
        assert value(live, "llm_loadtest_runs", state="running") >= 1
        assert value(live, "llm_loadtest_agents_connected") == 1
        assert value(live, "llm_loadtest_agents_busy") == 1
        assert value(live, "llm_loadtest_run_ttft_seconds_count", run_id=run.id, stage="0") > 0
        assert value(live, "llm_loadtest_run_itl_seconds_count", run_id=run.id, stage="0") > 0
        assert value(live, "llm_loadtest_run_errors_total", run_id=run.id, stage="0") == 0
        agent_live = await eventually(
            lambda: scrape(stack.agent_metrics),
            lambda m: value(m, "llm_loadtest_agent_in_flight_requests") >= 1,
            timeout_s=10,
        )
        assert value(agent_live, "llm_loadtest_agent_connected") == 1
        # Every series the Grafana dashboard queries is served (a renamed metric breaks this).
        served = {name for name, _ in live} | {name for name, _ in agent_live}
        assert dashboard_metrics() <= served, dashboard_metrics() - served

        result = None
        async for update in client.watch(run.id):
            if update.HasField("result"):
                result = update.result
        assert result is not None and result.state == run_pb2.RUN_STATE_SUCCEEDED
        done = result.stages[0].requests_ok + result.stages[0].requests_failed

    after = await scrape(stack.controller_metrics)
    # A finished run's series are gone (cardinality stays bounded by what is running).
    assert not has(after, "llm_loadtest_run_requests_total", run_id=run.id)
    assert value(after, "llm_loadtest_runs", state="succeeded") >= 1
    assert value(after, "llm_loadtest_runs", state="running") == 0
    assert value(after, "llm_loadtest_samples_ingested_total") >= done
    assert value(after, "llm_loadtest_sample_batches_ingested_total", outcome="new") >= 1
    assert value(after, "llm_loadtest_ingest_commit_seconds_count") >= 1
    assert has(after, "llm_loadtest_ingest_queue_batches")
    ok_creates = value(after, "grpc_server_handled_total", grpc_method="CreateRun", grpc_code="OK")
    assert ok_creates >= 1
    assert value(after, "grpc_server_handling_seconds_count", grpc_method="CreateRun") >= ok_creates
    assert value(after, "grpc_server_handled_total", grpc_method="WatchRun", grpc_type="server_stream") >= 1

    agent = await scrape(stack.agent_metrics)
    assert value(agent, "llm_loadtest_agent_requests_total", status="ok") >= done - 2  # the in-flight tail
    assert value(agent, "llm_loadtest_agent_send_lag_seconds_count") >= done - 2
    assert value(agent, "llm_loadtest_agent_event_loop_lag_seconds_hist_count") > 0
    assert has(agent, "llm_loadtest_agent_event_loop_lag_seconds")
    assert has(agent, "llm_loadtest_agent_cpu_percent")
    assert value(agent, "process_cpu_seconds_total") > 0
    assert value(agent, "llm_loadtest_agent_in_flight_requests") == 0


@pytest.fixture
async def metered(tmp_path: object) -> AsyncIterator[Controller]:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    c = Controller(str(tmp_path / "m.db"), metrics_listen="127.0.0.1:0")
    await c.start("127.0.0.1:0")
    try:
        yield c
    finally:
        await c.stop(1.0)


async def test_rpcs_are_counted_by_method_and_status_code(metered: Controller) -> None:
    url = f"http://127.0.0.1:{metered.metrics_port}/metrics"
    async with ControllerClient(f"127.0.0.1:{metered.port}", timeout_s=10) as client:
        for _ in range(3):
            with pytest.raises(grpc.aio.AioRpcError) as missing:
                await client.get_run("run_missing")
            assert missing.value.code() == grpc.StatusCode.NOT_FOUND
        bad = spec("http://127.0.0.1:9/v1", concurrency=0)
        bad.stages[0].duration.FromSeconds(1)
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await client.create_run(bad)
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        await client.list_runs()
    # A call is counted when its handler returns, which may be just after the client has its
    # status (the server may still be writing its audit record): poll.
    m = await eventually(
        lambda: scrape(url),
        lambda m: value(m, "grpc_server_handled_total", grpc_method="CreateRun") >= 1,
        timeout_s=10,
    )
    assert value(m, "grpc_server_handled_total", grpc_method="GetRun", grpc_code="NOT_FOUND") == 3
    assert value(m, "grpc_server_handled_total", grpc_method="CreateRun", grpc_code="INVALID_ARGUMENT") == 1
    assert value(m, "grpc_server_handled_total", grpc_method="ListRuns", grpc_code="OK") == 1
    assert value(m, "grpc_server_started_total", grpc_method="GetRun", grpc_type="unary") == 3
    assert value(m, "grpc_server_handling_seconds_count", grpc_method="GetRun") == 3
    assert value(m, "llm_loadtest_runs", state="pending") == 0
    assert value(m, "llm_loadtest_agents_connected") == 0
    # Its own registry: the process-global default registry saw none of it.
    assert REGISTRY.get_sample_value("grpc_server_handled_total", {"grpc_method": "GetRun"}) is None


async def test_metrics_endpoint_is_off_unless_asked(tmp_path: object) -> None:
    from pathlib import Path

    assert isinstance(tmp_path, Path)
    c = Controller(str(tmp_path / "off.db"))
    await c.start("127.0.0.1:0")
    try:
        assert c.metrics_port == 0
    finally:
        await c.stop(1.0)


def test_live_collector_counts_and_buckets_exactly() -> None:
    """Known samples in, exact counters and bucket counts out; warmup excluded."""
    ok, err = run_pb2.REQUEST_STATUS_OK, run_pb2.REQUEST_STATUS_HTTP_5XX
    batch = agent_service_pb2.SampleBatch(
        assignment_id="asg_1",
        batch_seq=1,
        sent_unix_ns=[1, 2, 3, 4],
        queue_delay_ns=[0] * 4,
        first_byte_ns=[0] * 4,
        first_token_ns=[50_000_000, 100_000_000, 0, 10_000_000],
        last_token_ns=[0] * 4,
        done_ns=[0] * 4,
        prompt_tokens=[1] * 4,
        output_tokens=[3, 2, 0, 5],
        status=[ok, ok, err, ok],
        flags=[0, 0, 0, 2],
        itl_count=[2, 1, 0, 4],
        itl_ns=[5_000_000, 20_000_000, 1_000_000, 1, 1, 1, 1],
        error=["", "", "boom", ""],
    )
    running = {"run_a"}
    collector = LiveRunCollector(lambda: running)
    collector.observe("run_a", to_ingest(IngestTarget(1, 1, "run_a", 0, 0, 10, 0), batch))
    families = {f.name: f for f in collector.collect()}
    sample = {(s.name, s.labels.get("le")): s.value for f in families.values() for s in f.samples}
    assert sample[("llm_loadtest_run_requests_total", None)] == 3  # the warmup request is not counted
    assert sample[("llm_loadtest_run_errors_total", None)] == 1
    assert sample[("llm_loadtest_run_output_tokens_total", None)] == 5
    assert sample[("llm_loadtest_run_ttft_seconds_count", None)] == 2
    assert sample[("llm_loadtest_run_ttft_seconds_sum", None)] == pytest.approx(0.15)
    assert sample[("llm_loadtest_run_ttft_seconds_bucket", "0.05")] == 1  # le is inclusive
    assert sample[("llm_loadtest_run_ttft_seconds_bucket", "0.1")] == 2
    assert sample[("llm_loadtest_run_ttft_seconds_bucket", "+Inf")] == 2
    assert sample[("llm_loadtest_run_itl_seconds_count", None)] == 3  # the warmup request's 4 gaps excluded
    assert sample[("llm_loadtest_run_itl_seconds_bucket", "0.005")] == 2
    assert str(TTFT_BUCKETS_S[0]) in {le for _, le in sample if le}
    running.clear()
    assert all(not f.samples for f in collector.collect())
