"""The controller dies (kill -9) or is stopped (SIGTERM) during a run."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sqlite3
import time

import pytest

from common.codes import AssignmentState
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from tests.fleet.harness import Fleet, closed, eventually, make_spec, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

LEASE_S = 3.0  # three heartbeat intervals


def _batches(fleet: Fleet, run_id: str) -> set[tuple[str, int]]:
    rows = fleet.sql(
        "SELECT a.assignment_id, b.batch_seq FROM sample_batches b JOIN assignments a ON a.pk = b.assignment_pk"
        " JOIN runs r ON r.pk = b.run_pk WHERE r.run_id = ?",
        run_id,
    )
    return {(str(a), int(s)) for a, s in rows}


async def test_controller_kill9_then_restart_on_same_db(fleet: Fleet) -> None:
    target = await fleet.start_mock(ttft_ms=40, itl_ms=10)
    address = await fleet.start_controller()
    await fleet.start_agents(2)
    async with fleet.client() as client:
        await fleet.wait_agents(client, 2)
        run = await client.create_run(make_spec(target, [closed(6, 30.0)], agents=2))
        await eventually(lambda: client.get_run(run.id), lambda r: r.progress.requests_ok >= 60, 30)

    # Every batch committed (hence every batch acked) before the kill must survive it.
    committed = _batches(fleet, run.id)
    assert fleet.controller is not None
    fleet.controller.send(signal.SIGKILL)
    await fleet.controller.wait(10)
    killed_at = time.monotonic()
    # Cut off from the controller, the agents stop firing once their lease expires.
    await eventually(fleet.mock_stats, lambda s: s["running"] == 0, LEASE_S + 3)
    print(f"agents stopped firing {time.monotonic() - killed_at:.2f} s after the controller died")

    with contextlib.closing(sqlite3.connect(fleet.db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    await fleet.start_controller(listen=address)
    async with fleet.client() as client:
        old = await client.get_run(run.id)
        assert old.state == run_pb2.RUN_STATE_INTERRUPTED
        assert "controller stopped" in old.state_reason
        assert committed <= _batches(fleet, run.id)
        partial = await client.get_result(run.id)  # committed samples stay readable
        assert partial.stages and partial.stages[0].requests_ok >= 60

        # The agents reconnect by themselves (backoff) and take new work.
        await fleet.wait_agents(client, 2, timeout_s=20)
        new = await client.create_run(make_spec(target, [closed(2, 1.0)], agents=2))
        new = await wait_final(client, new.id, 30)
        assert new.state == run_pb2.RUN_STATE_SUCCEEDED, (new.state_reason, fleet.logs())
    with contextlib.closing(sqlite3.connect(fleet.db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_controller_sigterm_with_agents_and_watchers(fleet: Fleet) -> None:
    grace_s = 3.0
    target = await fleet.start_mock(ttft_ms=40, itl_ms=10)
    await fleet.start_controller(grace_s=grace_s)
    await fleet.start_agents(2)
    async with fleet.client() as client:
        await fleet.wait_agents(client, 2)
        run = await client.create_run(make_spec(target, [closed(6, 30.0)], agents=2))
        await eventually(lambda: client.get_run(run.id), lambda r: r.progress.requests_ok >= 30, 30)
        updates: list[run_service_pb2.WatchRunResponse] = []

        async def watch() -> None:
            with contextlib.suppress(Exception):
                async for update in client.watch(run.id):
                    updates.append(update)

        watchers = [asyncio.create_task(watch()) for _ in range(2)]
        await eventually(lambda: asyncio.sleep(0, len(updates)), lambda n: n >= 2, 10)
        before = _batches(fleet, run.id)

        assert fleet.controller is not None
        fleet.controller.send(signal.SIGTERM)
        started = time.monotonic()
        code = await fleet.controller.wait(grace_s + 5)
        took_s = time.monotonic() - started
        print(f"controller exited {took_s:.2f} s after SIGTERM (grace {grace_s:g} s)")
        assert code == 0
        assert took_s <= grace_s + 2.0
        async with asyncio.timeout(5):
            await asyncio.gather(*watchers)  # the watch streams ended

    assert updates[-1].run.state == run_pb2.RUN_STATE_INTERRUPTED
    assert before <= _batches(fleet, run.id)
    # The agents were stopped, flushed, and every batch they announced was committed and acked.
    rows = fleet.sql(
        "SELECT a.assignment_id, a.state, a.batch_count, (SELECT COUNT(*) FROM sample_batches b"
        " WHERE b.assignment_pk = a.pk) FROM assignments a JOIN runs r ON r.pk = a.run_pk WHERE r.run_id = ?",
        run.id,
    )
    assert len(rows) == 2
    for assignment_id, state, batch_count, stored in rows:
        assert state == AssignmentState.CANCELLED, (assignment_id, state)
        assert batch_count == stored, (assignment_id, batch_count, stored)
    with contextlib.closing(sqlite3.connect(fleet.db)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        state = conn.execute("SELECT state FROM runs WHERE run_id = ?", (run.id,)).fetchone()[0]
    assert state == run_pb2.RUN_STATE_INTERRUPTED
