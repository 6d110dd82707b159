"""Series, baselines and history on real parts: the controller (real SQLite file), one agent over
a real gRPC stream and the mock model server, all on 127.0.0.1.

Each history value is checked against the figure of that run's own stored result, so the test
says the history reads the right run, stage and figure, whatever the machine's speed.
"""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import key_service_pb2, run_pb2
from controller.local import LocalRunReader
from controller.server import Controller
from controller.store import migrations
from controller.store.database import Database
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.integration.test_controller_api import valid_spec, violations
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final

pytestmark = pytest.mark.timeout(120)
KEY = "test-admin-key-123"


def quick_spec(mock: MockServer, series: str = "", **labels: str) -> run_pb2.RunSpec:
    spec = spec_for(mock, [(2, 0.0)], output_tokens=8)
    spec.stages[0].ClearField("duration")
    spec.stages[0].requests = 40
    spec.series = series
    spec.labels.update(labels)
    return spec


async def finished(client: ControllerClient, spec: run_pb2.RunSpec) -> run_pb2.Run:
    run = await client.create_run(spec)
    final = await wait_final(client, run.id)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    return final


async def failed_run(client: ControllerClient, series: str = "") -> run_pb2.Run:
    """A run no agent can take (its selector matches none): FAILED when its wait runs out."""
    spec = valid_spec()
    spec.series = series
    spec.placement.selector["zone"] = "nowhere"
    spec.placement.wait_timeout.FromMilliseconds(100)
    run = await client.create_run(spec)
    final = await wait_final(client, run.id, 20)
    assert final.state == run_pb2.RUN_STATE_FAILED
    return final


async def rpc_error(call: object) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await call  # type: ignore[misc]
    return info.value


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=8)) as server:
        yield server


async def test_baselines_are_set_replaced_listed_and_deleted(
    controller: Controller, client: ControllerClient, mock: MockServer
) -> None:
    async with running_agent(f"127.0.0.1:{controller.port}"):
        first = await finished(client, quick_spec(mock, "chat"))
        second = await finished(client, quick_spec(mock, "chat"))
        other = await finished(client, quick_spec(mock))
    baseline = await client.set_baseline("chat", first.id)
    assert (baseline.name, baseline.run_id, baseline.set_by_key_id) == ("chat", first.id, "")
    assert baseline.set_time.seconds > 0
    assert await client.get_baseline("chat") == baseline
    # A run of no series (or of another) can be a baseline too.
    await client.set_baseline("api.v2", other.id)
    replaced = await client.set_baseline("chat", second.id)
    assert (await client.get_baseline("chat")).run_id == second.id == replaced.run_id
    assert [(b.name, b.run_id) for b in await client.list_baselines()] == [("api.v2", other.id), ("chat", second.id)]

    listed = await client.list_runs(series="chat")
    assert [r.id for r in listed.runs] == [second.id, first.id]
    assert listed.runs[0].spec.series == "chat"

    await client.delete_baseline("api.v2")
    for call in (client.get_baseline("api.v2"), client.delete_baseline("api.v2")):
        error = await rpc_error(call)
        assert error.code() == grpc.StatusCode.NOT_FOUND and "no baseline for series 'api.v2'" in (
            error.details() or ""
        )
    # Deleting the baseline's run deletes the baseline with it.
    await client.delete_run(second.id)
    assert (await rpc_error(client.get_baseline("chat"))).code() == grpc.StatusCode.NOT_FOUND


async def test_only_a_succeeded_run_with_a_good_name_is_a_baseline(
    controller: Controller, client: ControllerClient
) -> None:
    error = await rpc_error(client.set_baseline("chat", "run_nope"))
    assert error.code() == grpc.StatusCode.NOT_FOUND
    failed = await failed_run(client)
    pending = await client.create_run(valid_spec())  # no agent: it stays pending, then is cancelled
    cancelled = await client.cancel_run(pending.id)
    assert cancelled.state == run_pb2.RUN_STATE_CANCELLED
    for run in (failed, cancelled):
        error = await rpc_error(client.set_baseline("chat", run.id))
        assert error.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "only a SUCCEEDED run" in (error.details() or "")
    for name in ("", "has space", "x" * 65, "a/b", "é"):
        error = await rpc_error(client.set_baseline(name, failed.id))
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(error) == ["name"], name
        for call in (client.get_baseline(name), client.delete_baseline(name), client.series_history(name)):
            assert violations(await rpc_error(call)) == ["name"]
    assert violations(await rpc_error(client.set_baseline("chat", ""))) == ["run_id"]
    spec = valid_spec()
    spec.series = "bad series"
    error = await rpc_error(client.create_run(spec))
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and violations(error) == ["spec.series"]
    spec.series = "x" * 64  # the longest name
    assert (await client.create_run(spec)).spec.series == "x" * 64
    assert await client.list_baselines() == []


async def test_history_follows_a_metric_over_labelled_runs(
    controller: Controller, client: ControllerClient, mock: MockServer, db_path: Path
) -> None:
    async with running_agent(f"127.0.0.1:{controller.port}"):
        runs = [await finished(client, quick_spec(mock, "svc", commit=c)) for c in "abc"]
        await finished(client, quick_spec(mock, "elsewhere", commit="z"))
    failed = await failed_run(client, "svc")
    await client.set_baseline("svc", runs[1].id)
    results = [await client.get_result(r.id) for r in runs]

    history = await client.series_history("svc", label="commit")
    assert (history.name, history.metric, history.load) == ("svc", "ttft_p99_ms", "")
    assert [p.run_id for p in history.points] == [r.id for r in runs] + [failed.id]
    assert [p.label_value for p in history.points] == ["a", "b", "c", ""]
    assert [p.baseline for p in history.points] == [False, True, False, False]
    assert history.baseline.run_id == runs[1].id
    for point, result in zip(history.points, results, strict=False):
        assert point.state == run_pb2.RUN_STATE_SUCCEEDED
        assert point.HasField("value") and point.value == result.stages[0].ttft.p99_ms > 0
        assert point.HasField("ci") == result.stages[0].ttft.HasField("p99_ci")
        if point.HasField("ci"):
            assert point.ci == result.stages[0].ttft.p99_ci
    assert history.points[-1].state == run_pb2.RUN_STATE_FAILED and not history.points[-1].HasField("value")
    times = [p.create_time.ToNanoseconds() for p in history.points]
    assert times == sorted(times)

    throughput = await client.series_history("svc", metric="output_token_throughput", load="concurrency=2")
    assert throughput.load == "concurrency=2"
    assert [p.value for p in throughput.points[:3]] == [r.stages[0].output_token_throughput for r in results]
    elsewhere = await client.series_history("svc", load="concurrency=99")
    assert not any(p.HasField("value") for p in elsewhere.points) and len(elsewhere.points) == 4
    # A figure of reasoning models: the mock's plain replies have none (no value, not a 0).
    ttfr = await client.series_history("svc", metric="ttfr_p99_ms")
    assert ttfr.metric == "ttfr_p99_ms" and len(ttfr.points) == 4
    assert not any(p.HasField("value") for p in ttfr.points)
    # The most recent two runs, and the baseline before them although it is older.
    recent = await client.series_history("svc", limit=2)
    assert [p.run_id for p in recent.points] == [runs[1].id, runs[2].id, failed.id]
    assert (await client.series_history("nothing")).points == []
    # `--db`: the same domain code on the file, the same answer.
    async with LocalRunReader(db_path) as local:
        assert await local.series_history("svc", label="commit") == history
        assert [b.run_id for b in await local.list_baselines()] == [runs[1].id]
        assert (await local.get_baseline("svc")).run_id == runs[1].id
        assert [r.id for r in (await local.list_runs(series="svc")).runs] == [failed.id, *(r.id for r in runs[::-1])]

    error = await rpc_error(client.series_history("svc", metric="ttft_p42"))
    assert violations(error) == ["metric"] and "ttft_p99_ms" in (error.details() or "")
    assert violations(await rpc_error(client.series_history("svc", limit=1001))) == ["limit"]


async def test_compare_with_the_baseline_of_a_series(
    controller: Controller, client: ControllerClient, mock: MockServer
) -> None:
    async with running_agent(f"127.0.0.1:{controller.port}"):
        base = await finished(client, quick_spec(mock, "svc"))
        new = await finished(client, quick_spec(mock, "svc"))
    error = await rpc_error(client.compare_runs("", [new.id], baseline_name="svc"))
    assert error.code() == grpc.StatusCode.NOT_FOUND and "no baseline for series 'svc'" in (error.details() or "")
    await client.set_baseline("svc", base.id)
    response = await client.compare_runs("", [new.id], 1000.0, baseline_name="svc")
    assert (response.baseline_run_id, response.baseline_name) == (base.id, "svc")
    assert [c.run_id for c in response.comparisons] == [new.id]
    assert [s.load for s in response.comparisons[0].stages] == ["concurrency=2"]
    assert not response.comparisons[0].regressed  # a 1000 % tolerance
    assert violations(await rpc_error(client.compare_runs(base.id, [new.id], baseline_name="svc"))) == ["baseline_name"]
    assert violations(await rpc_error(client.compare_runs("", [new.id], baseline_name="no good"))) == ["baseline_name"]
    plain = await client.compare_runs(base.id, [new.id])
    assert plain.baseline_run_id == base.id and plain.baseline_name == ""


async def test_a_reader_key_reads_baselines_but_cannot_set_them(tmp_path: Path, mock: MockServer) -> None:
    controller = Controller(str(tmp_path / "auth.db"), api_key=KEY)
    await controller.start("127.0.0.1:0")
    address = f"127.0.0.1:{controller.port}"
    try:
        async with ControllerClient(address, api_key=KEY, timeout_s=10.0) as bootstrap:
            reader_key = (await bootstrap.create_key("dash", key_service_pb2.KEY_ROLE_READER)).secret
            admin = await bootstrap.create_key("ci", key_service_pb2.KEY_ROLE_ADMIN)
            async with running_agent(address, api_key=KEY):
                run = await finished(bootstrap, quick_spec(mock, "svc"))
        async with ControllerClient(address, api_key=admin.secret, timeout_s=10.0) as ci:
            baseline = await ci.set_baseline("svc", run.id)
            assert baseline.set_by_key_id == admin.key.id
        async with ControllerClient(address, api_key=reader_key, timeout_s=10.0) as reader:
            assert [b.run_id for b in await reader.list_baselines()] == [run.id]
            assert (await reader.get_baseline("svc")) == baseline
            assert [p.run_id for p in (await reader.series_history("svc")).points] == [run.id]
            for call in (reader.set_baseline("svc", run.id), reader.delete_baseline("svc")):
                assert (await rpc_error(call)).code() == grpc.StatusCode.PERMISSION_DENIED
        async with ControllerClient(address, api_key=KEY, timeout_s=10.0) as bootstrap:
            await bootstrap.delete_baseline("svc")
            events = (await bootstrap.list_audit_events(page_size=50)).events
    finally:
        await controller.stop(1.0)
    # Writes are audited, refused ones too, each naming the series.
    rows = [(e.method.rsplit("/", 1)[-1], e.outcome, e.detail) for e in events if "Baseline" in e.method]
    assert ("SetBaseline", "OK", "baseline svc") in rows
    assert ("DeleteBaseline", "OK", "baseline svc") in rows
    assert {("SetBaseline", "PERMISSION_DENIED"), ("DeleteBaseline", "PERMISSION_DENIED")} <= {r[:2] for r in rows}


def test_migration_12_fills_the_series_of_stored_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.db"
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:11])
        Database(path).migrate()
    with sqlite3.connect(path) as conn:
        for run_id, spec_json in (("run_a", '{"series": "chat"}'), ("run_b", "{}"), ("run_c", "not json")):
            conn.execute(
                "INSERT INTO runs (run_id, model, state, spec_json, created_at) VALUES (?, 'm', 3, ?, 1)",
                (run_id, spec_json),
            )
    db = Database(path)
    assert 12 in db.migrate()
    db.close()
    with sqlite3.connect(path) as conn:
        rows = conn.execute("SELECT run_id, series FROM runs ORDER BY run_id").fetchall()
        plan = conn.execute("EXPLAIN QUERY PLAN SELECT pk FROM runs WHERE series = 'chat' ORDER BY created_at DESC")
        assert "runs_series" in " ".join(str(row) for row in plan.fetchall())
    assert rows == [("run_a", "chat"), ("run_b", ""), ("run_c", "")]
