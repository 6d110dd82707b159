"""Placement of a group's repeats (controller/domain/execution/placement.py) on the coordinator
with fake agents (tests/unit/test_run_coordinator.py), both stores: a repeat starts only once the
repeat before it is final, later runs wait behind it, and its placement wait counts from when
the repeat before it ended."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.protobuf import json_format

from common.codes import RunState
from common.proto.loadtest.v1 import run_pb2
from controller.domain.spec import validate_and_default
from controller.store import repository as repo
from controller.store.database import Database
from controller.store.interface import Store
from controller.store.memory import MemoryStore
from controller.store.sqlite import SqliteStore
from tests.unit.test_run_coordinator import (
    COMPLETED,
    FakeAgent,
    coordinator,
    create_run,
    final_run,
    first_assigns,
    make_spec,
)

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    database = Database(tmp_path / "runs.db", read_workers=1)
    database.migrate()
    yield SqliteStore(database)
    database.close()


async def create_group(
    store: Store, spec: run_pb2.RunSpec, n: int, *, created_ns: int | None = None
) -> list[repo.RunRecord]:
    """As `Runs.create` stores a group (not queued: the coordinator's start loads it)."""
    valid = validate_and_default(spec)
    repeats = [
        repo.NewRepeat(
            f"run_{uuid.uuid4().hex[:20]}",
            json_format.MessageToJson(valid),
            valid.SerializeToString(deterministic=True),
        )
        for _ in range(n)
    ]
    records, _ = await store.insert_group(
        f"grp_{uuid.uuid4().hex[:20]}",
        None,
        "",
        valid.target.model,
        repeats,
        [s.name for s in valid.stages],
        "",
        created_ns or time.time_ns(),
    )
    return records


async def state_of(store: Store, record: repo.RunRecord) -> int:
    stored = await store.get_run(record.run_id)
    assert stored is not None
    return stored.state


async def test_a_repeat_starts_after_the_one_before_it_and_later_runs_wait(store: Store) -> None:
    first, second = await create_group(store, make_spec(agents=1), 2)
    async with coordinator(store) as (c, finals):
        a, b = FakeAgent(c, "a"), FakeAgent(c, "b")
        await a.connect()
        await b.connect()
        alone = await create_run(store, c, make_spec(agents=1))  # created after the group
        (assign,) = await first_assigns(store, first, a)
        # One agent is free, yet neither the next repeat nor the run behind it starts.
        await c._placement._dispatch_once()
        assert b.unread() == []
        assert (await state_of(store, second), await state_of(store, alone)) == (RunState.PENDING, RunState.PENDING)

        await a.report(assign.assignment_id, COMPLETED, requests_sent=20, batch_count=0)
        ended = await final_run(store, finals, first)
        assert ended.state == RunState.SUCCEEDED and ended.ended_at is not None
        (next_assign,) = await first_assigns(store, second, a)  # the free agent it got first
        started = await store.get_run(second.run_id)
        assert started is not None and started.started_at is not None and started.started_at >= ended.ended_at
        # The lone run goes on the other free agent only now: it waited behind the repeat.
        await first_assigns(store, alone, b)
        assert next_assign.workload.seed  # a real assignment of the repeat


async def test_a_repeats_placement_wait_counts_from_the_end_of_the_one_before(store: Store) -> None:
    timeout_ns = 500_000_000
    created = time.time_ns() - 10 * 10**9  # created long before: its wait would be over already
    first, second = await create_group(store, make_spec(agents=1, wait_timeout_ns=timeout_ns), 2, created_ns=created)
    first_end = time.time_ns()
    await store.finish_run(first.pk, RunState.SUCCEEDED, "", first_end)
    async with coordinator(store) as (_, finals):  # no agent at all: the repeat cannot be placed
        stored = await final_run(store, finals, second)
    assert stored.state == RunState.FAILED and "after waiting 0.5 s" in stored.state_reason
    assert stored.ended_at is not None and stored.ended_at - first_end >= timeout_ns


async def test_a_failed_repeat_does_not_hold_up_the_next(store: Store) -> None:
    first, second = await create_group(store, make_spec(agents=1), 2)
    await store.finish_run(first.pk, RunState.FAILED, "broken", time.time_ns())
    async with coordinator(store) as (c, _):
        a = FakeAgent(c, "a")
        await a.connect()
        await first_assigns(store, second, a)
        assert await state_of(store, second) == RunState.RUNNING
