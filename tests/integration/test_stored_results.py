"""Stored results of final runs (migration 8, controller/domain/results/provider.py): computed once
when a run ends, without anyone asking; read back after a restart; recomputed when late
batches or a new result format make them stale; gone with their run; never computed twice
for concurrent requests; and cancelled cleanly at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog

from client.sdk import ControllerClient
from common.codes import RunState
from common.proto.loadtest.v1 import run_pb2
from controller.domain.results import provider
from controller.domain.results.provider import RESULT_FORMAT, RunResults
from controller.server import Controller
from controller.store import columnar, migrations
from controller.store import repository as repo
from controller.store.database import Database
from controller.store.interface import SnapshotReads
from controller.store.sqlite import SqliteStore
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.conftest import eventually, poll_until
from tests.integration.test_results import by_requests
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final

pytestmark = pytest.mark.timeout(120)

ROW = (
    "SELECT rr.state, rr.batches, rr.last_batch_pk, rr.format, rr.result FROM run_results rr"
    " JOIN runs r ON r.pk = rr.run_pk WHERE r.run_id = ?"
)
VERSION = (
    "SELECT r.state, COUNT(b.pk), COALESCE(MAX(b.pk), 0) FROM runs r LEFT JOIN sample_batches b ON b.run_pk = r.pk"
    " WHERE r.run_id = ? GROUP BY r.pk"
)


def sql(db_path: Path, query: str, *params: object) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db_path, timeout=10)) as conn, conn:
        return conn.execute(query, params).fetchall()


async def stored_row(db_path: Path, run_id: str) -> tuple[Any, ...]:
    """The run's run_results row once it is there (polled: it is written in the background)."""

    async def probe() -> list[tuple[Any, ...]]:
        return sql(db_path, ROW, run_id)

    return (await eventually(probe, bool, 20))[0]


@contextlib.contextmanager
def structlog_events() -> Iterator[list[dict[str, Any]]]:
    """Every structlog event while the block runs, whatever level an earlier test configured."""
    wrapper_class = structlog.get_config()["wrapper_class"]
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.DEBUG))
    try:
        with structlog.testing.capture_logs() as events:
            yield events
    finally:
        structlog.configure(wrapper_class=wrapper_class)


@contextlib.asynccontextmanager
async def started(db_path: Path) -> AsyncIterator[tuple[Controller, ControllerClient]]:
    controller = Controller(str(db_path), lost_grace_s=3.0)
    await controller.start("127.0.0.1:0")
    try:
        async with ControllerClient(f"127.0.0.1:{controller.port}", timeout_s=10.0) as client:
            yield controller, client
    finally:
        await controller.stop(1.0)


async def finished_run(controller: Controller, client: ControllerClient) -> str:
    """A two-stage run on the mock that ended SUCCEEDED; nobody asked for its result."""
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=6, error_rate=0.1, seed=5)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        run = await client.create_run(by_requests(spec_for(mock, [(2, 0.0), (4, 0.0)], output_tokens=6), 24))
        final = await wait_final(client, run.id)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    return run.id


def counting(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Record every computation of a result (the run id) from now on."""
    calls: list[str] = []
    real = provider.compute_result

    def compute(
        reads: SnapshotReads, run_pk: int, run_id: str, spec: run_pb2.RunSpec, state: int
    ) -> provider.ComputedResult:
        calls.append(run_id)
        return real(reads, run_pk, run_id, spec, state)

    monkeypatch.setattr(provider, "compute_result", compute)
    return calls


async def test_a_finished_runs_result_is_stored_unasked_and_read_back_after_a_restart(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with structlog_events() as logs:
        async with started(db_path) as (controller, client):
            run_id = await finished_run(controller, client)
            state, batches, last_batch_pk, fmt, blob = await stored_row(db_path, run_id)
            assert (state, batches, last_batch_pk) == sql(db_path, VERSION, run_id)[0]
            assert state == run_pb2.RUN_STATE_SUCCEEDED and batches > 0 and fmt == RESULT_FORMAT
            first = await client.get_result(run_id)
    assert run_pb2.RunResult.FromString(blob) == first
    assert [s.requests_ok + s.requests_failed for s in first.stages] == [24, 24]
    [event] = [e for e in logs if e["event"] == "run_result_stored"]
    assert event["run_id"] == run_id and event["samples"] == 48 and event["compute_ms"] > 0

    # A new controller on the same file answers from the stored row: nothing is computed.
    calls = counting(monkeypatch)
    async with started(db_path) as (_, client):
        assert await client.get_result(run_id) == first
        assert (await client.compare_runs(run_id, [run_id])).comparisons[0].stages
    assert calls == []


async def test_a_batch_stored_after_the_result_makes_it_stale(db_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async with started(db_path) as (controller, client):
        run_id = await finished_run(controller, client)
        _, batches, _, _, _ = await stored_row(db_path, run_id)
        before = await client.get_result(run_id)
        # A late replay of a batch (as after an agent rejoins): a copy of a stored one, new seq.
        run_pk, assignment_pk, n, blob, itl = sql(
            db_path,
            "SELECT b.run_pk, b.assignment_pk, b.n_samples, b.sample_columns, b.itl_ns FROM sample_batches b"
            " JOIN runs r ON r.pk = b.run_pk WHERE r.run_id = ? AND b.stage_idx = 0 ORDER BY b.pk LIMIT 1",
            run_id,
        )[0]
        table = columnar.unpack(blob, n).copy()
        late = repo.BatchIngest(assignment_pk, run_pk, 0, 1_000_000, table, (), bytes(itl))
        [outcome] = await controller.db.write(repo.ingest_batches, [late])
        assert outcome.new
        calls = counting(monkeypatch)
        after = await client.get_result(run_id)
        assert calls == [run_id]
        stage0 = (after.stages[0].requests_ok, after.stages[0].requests_failed)
        assert stage0 == (before.stages[0].requests_ok + outcome.ok, before.stages[0].requests_failed + outcome.failed)
        assert after.stages[1] == before.stages[1]
        # The stored row now holds the new result at the new version; reading it again computes nothing.
        state, new_batches, last_batch_pk, _, stored = sql(db_path, ROW, run_id)[0]
        assert (state, new_batches, last_batch_pk) == sql(db_path, VERSION, run_id)[0]
        assert new_batches == batches + 1 and run_pb2.RunResult.FromString(stored) == after
        assert await client.get_result(run_id) == after
        assert calls == [run_id]


async def test_a_result_stored_in_an_older_format_or_damaged_is_recomputed(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with started(db_path) as (controller, client):
        run_id = await finished_run(controller, client)
        await stored_row(db_path, run_id)
        first = await client.get_result(run_id)
    # What an older controller stored: a different message, marked with the older format.
    stale = run_pb2.RunResult(run_id=run_id, state=run_pb2.RUN_STATE_SUCCEEDED)
    sql(db_path, "UPDATE run_results SET result = ?", stale.SerializeToString())
    monkeypatch.setattr(provider, "RESULT_FORMAT", RESULT_FORMAT + 1)  # this controller's format is newer
    calls = counting(monkeypatch)
    async with started(db_path) as (_, client):
        assert await client.get_result(run_id) == first
        assert calls == [run_id]
        _, _, _, fmt, stored = sql(db_path, ROW, run_id)[0]
        assert fmt == RESULT_FORMAT + 1 and run_pb2.RunResult.FromString(stored) == first
        assert await client.get_result(run_id) == first
    assert calls == [run_id]
    # A damaged row is computed again too, never an error.
    sql(db_path, "UPDATE run_results SET result = ?", b"\xff\xff")
    async with started(db_path) as (_, client):
        assert await client.get_result(run_id) == first
    assert calls == [run_id, run_id]


async def test_concurrent_requests_share_one_computation_and_delete_removes_the_row(
    db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with started(db_path) as (controller, client):
        run_id = await finished_run(controller, client)
        await stored_row(db_path, run_id)
    sql(db_path, "DELETE FROM run_results")  # as for a run that ended before migration 8
    calls = counting(monkeypatch)
    async with started(db_path) as (_, client):
        results = await asyncio.gather(*(client.get_result(run_id) for _ in range(4)))
        assert calls == [run_id]
        assert all(r == results[0] for r in results) and results[0].stages
        assert len(sql(db_path, ROW, run_id)) == 1
        await client.delete_run(run_id)
        assert sql(db_path, "SELECT COUNT(*) FROM run_results") == [(0,)]


async def test_every_way_to_a_final_state_stores_a_result(db_path: Path) -> None:
    async with started(db_path) as (_, client):
        spec = run_pb2.RunSpec()
        spec.target.base_url = "http://127.0.0.1:9/v1"
        spec.target.model = "m"
        spec.stages.add(concurrency=1, requests=1)
        cancelled = await client.create_run(spec)  # no agent: it stays pending
        await client.cancel_run(cancelled.id)
        left_running = await client.create_run(spec)
        spec.placement.wait_timeout.FromMilliseconds(100)
        unplaced = await client.create_run(spec)
        assert (await wait_final(client, unplaced.id, 10)).state == run_pb2.RUN_STATE_FAILED
        for run_id, state in ((cancelled.id, run_pb2.RUN_STATE_CANCELLED), (unplaced.id, run_pb2.RUN_STATE_FAILED)):
            assert (await stored_row(db_path, run_id))[:4] == (state, 0, 0, RESULT_FORMAT)
    # A run a controller left RUNNING (it died) is interrupted by the next one at start.
    sql(db_path, "UPDATE runs SET state = ? WHERE run_id = ?", run_pb2.RUN_STATE_RUNNING, left_running.id)
    async with started(db_path) as (_, client):
        row = await stored_row(db_path, left_running.id)
        assert row[0] == run_pb2.RUN_STATE_INTERRUPTED
        assert (await client.get_result(left_running.id)).state == run_pb2.RUN_STATE_INTERRUPTED


async def test_shutdown_cancels_a_computation_in_progress_cleanly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    db = Database(tmp_path / "runs.db")
    db.migrate()
    spec = run_pb2.RunSpec()
    spec.stages.add(concurrency=1, requests=1)
    record, _ = await db.write(
        repo.insert_run, "run_x", None, "", "m", "{}", ["s0"], "", 1, "", spec.SerializeToString()
    )
    await db.write(repo.finish_run, record.pk, RunState.SUCCEEDED, "", 2)
    entered, release = threading.Event(), threading.Event()
    real: Callable[..., provider.ComputedResult] = provider.compute_result

    def slow(*args: Any) -> provider.ComputedResult:
        entered.set()
        release.wait(30)  # a long computation on a reader thread
        return real(*args)

    monkeypatch.setattr(provider, "compute_result", slow)
    caplog.set_level(logging.WARNING)
    results = RunResults(SqliteStore(db))
    with structlog_events() as logs:
        results.run_finished("run_x")
        assert await poll_until(entered.is_set, 10)
        await results.close()
        results.run_finished("run_x")  # after close: ignored
        release.set()
        db.close()  # waits for the reader thread's job
    assert sql(tmp_path / "runs.db", "SELECT COUNT(*) FROM run_results") == [(0,)]
    assert not [e for e in logs if e["log_level"] in ("warning", "error", "critical")]
    assert not caplog.records


def test_migration_8_adds_run_results_to_an_existing_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.db"
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:7])
        assert Database(path).migrate() == [1, 2, 3, 4, 5, 6, 7]
    sql(path, "INSERT INTO runs (run_id, model, state, spec_json, created_at) VALUES ('run_old', 'm', 3, '{}', 1)")
    db = Database(path)
    assert db.migrate() == [v for v, _, _ in migrations.MIGRATIONS[7:]]  # 8 and any later
    assert db.migrate() == []
    db.db.connect(reuse_if_open=True)
    try:
        record = repo.get_run("run_old")
        assert record is not None and repo.get_run_result(record.pk) is None
        row = repo.StoredResult(3, 0, 0, RESULT_FORMAT, b"\x08\x01")
        assert repo.put_run_result(record.pk, "run_old", row)
        assert repo.get_run_result(record.pk) == row
        assert not repo.put_run_result(record.pk, "run_other", row)  # a pk is checked with its run id
        repo.delete_run(record.pk)
        assert repo.get_run_result(record.pk) is None
        assert not repo.put_run_result(record.pk, "run_old", row)  # nothing stored for a deleted run
    finally:
        db.close()
    assert sql(path, "SELECT COUNT(*) FROM run_results") == [(0,)]
