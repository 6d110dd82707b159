"""The store contract (controller/store/interface.py), one suite run against both stores: the
SQLite store on a real temporary file and the memory store. Every operation, with its edge
cases: unknown ids, pagination boundaries, idempotency, ordering, all-or-none writes."""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest

from common.codes import AssignmentState, RunState, SampleFlag
from common.proto.loadtest.v1 import run_pb2
from controller.domain.results import provider
from controller.domain.spec import parse_spec
from controller.store import columnar
from controller.store import repository as repo
from controller.store.baselines import BaselineRecord
from controller.store.database import Database
from controller.store.interface import INTEGRITY_ERRORS, SnapshotReads, Store
from controller.store.memory import MemoryStore
from controller.store.security import AuditRecord, KeyRecord
from controller.store.server_metrics import EVENT_SCRAPE_FAILED, EVENT_SCRAPE_RECOVERED, ScrapeRow
from controller.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(60)

COL = columnar.COL
T0 = 1_700_000_000 * 10**9  # controller clock of the tests' assignments
WARMUP, RETRIED = SampleFlag.WARMUP, SampleFlag.RETRIED
COUNTER = run_pb2.SERVER_METRIC_KIND_COUNTER
GAUGE = run_pb2.SERVER_METRIC_KIND_GAUGE


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    db = Database(tmp_path / "store.db")
    db.migrate()
    try:
        yield SqliteStore(db)
    finally:
        db.close()


# --- helpers ------------------------------------------------------------------------------


async def new_run(
    store: Store,
    run_id: str = "run_a",
    *,
    created: int = 1,
    model: str = "m",
    stages: Sequence[str] = ("s0", "s1"),
    request_id: str | None = None,
    secret: str = "",
    dataset: str = "",
    spec_pb: bytes = b"",
    spec_json: str = "{}",
    series: str = "",
) -> repo.RunRecord:
    record, created_now = await store.insert_run(
        run_id, request_id, f"name of {run_id}", model, spec_json, stages, secret, created, dataset, spec_pb, series
    )
    assert created_now
    return record


async def new_assignment(
    store: Store,
    run_pk: int,
    assignment_id: str,
    *,
    stage: int = 0,
    agent: str = "agent-a",
    session: str = "",
    created: int = T0,
    token: str = "",
) -> int:
    return await store.insert_assignment(
        assignment_id, run_pk, stage, session or f"ses-{assignment_id}", agent, 2, 10, 1, created, token
    )


def sample_table(
    n: int,
    *,
    sent0: int = T0 + 10**9,
    status: Sequence[int] | None = None,
    flags: Sequence[int] | None = None,
    seed: int = 0,
) -> tuple[np.ndarray, bytes]:
    """A (13, n) table of plausible samples (each 2 gaps) and its gaps as stored bytes."""
    rng = np.random.default_rng(seed)
    table = np.zeros((len(columnar.SAMPLE_COLUMNS), n), dtype=np.int64)
    table[COL["sent_unix_ns"]] = sent0 + np.arange(n) * 10**7
    table[COL["queue_delay_ns"]] = rng.integers(0, 10**5, n)
    table[COL["first_byte_ns"]] = rng.integers(10**6, 2 * 10**6, n)
    table[COL["first_token_ns"]] = table[COL["first_byte_ns"]] + 10**5
    table[COL["last_token_ns"]] = table[COL["first_token_ns"]] + 3 * 10**6
    table[COL["done_ns"]] = table[COL["last_token_ns"]] + 10**5
    table[COL["prompt_tokens"]] = rng.integers(10, 20, n)
    table[COL["output_tokens"]] = 3
    table[COL["status"]] = status if status is not None else 1
    table[COL["flags"]] = flags if flags is not None else 0
    table[COL["itl_count"]] = 2
    table[COL["requested_input_tokens"]] = 12
    table[COL["requested_output_tokens"]] = 3
    gaps = np.full(2 * n, 10**6, dtype=np.int64)
    return table, gaps.astype("<i8").tobytes()


def batch(
    assignment_pk: int,
    run_pk: int,
    seq: int,
    table: np.ndarray,
    itl: bytes,
    *,
    stage: int = 0,
    errors: Sequence[tuple[int, str]] = (),
    scrapes: Sequence[ScrapeRow] = (),
) -> repo.BatchIngest:
    return repo.BatchIngest(assignment_pk, run_pk, stage, seq, table, errors, itl, scrapes)


def key(key_id: str, created: int, *, expires: int | None = None, revoked: int | None = None) -> KeyRecord:
    return KeyRecord(key_id, bytes(32), "reader", f"key {key_id}", created, expires, revoked)


def audit(time_ns: int, *, key_id: str = "k", run_id: str = "", count: int = 1) -> AuditRecord:
    return AuditRecord(0, time_ns, key_id, "/m", run_id, "OK", f"req-{time_ns}", "peer", "", count)


async def snapshot_of(store: Store, read: str, *args: int) -> object:
    """One read of `SnapshotReads` by name, through `read_snapshot`."""

    def job(reads: SnapshotReads) -> object:
        return getattr(reads, read)(*args)

    return await store.read_snapshot(job)


# --- runs ---------------------------------------------------------------------------------


async def test_a_new_run_is_pending_with_its_stages_secret_and_dataset(store: Store) -> None:
    record, created = await store.insert_run(
        "run_a", "req-1", "first", "m", '{"x": 1}', ["warm", "load"], "sk-1", 5, '[{"p": 1}]', b"\x08\x01"
    )
    assert created and record.state == RunState.PENDING and not record.is_final
    assert (record.run_id, record.display_name, record.model, record.created_at) == ("run_a", "first", "m", 5)
    assert (record.started_at, record.ended_at, record.current_stage, record.state_reason) == (None, None, 0, "")
    assert (record.requests_ok, record.requests_failed, record.output_tokens) == (0, 0, 0)
    # As created, the record carries the JSON; read back, only the binary spec (which readers prefer).
    assert record.spec_json == '{"x": 1}' and record.spec_pb == b"\x08\x01"
    read = await store.get_run("run_a")
    assert read == dataclasses.replace(record, spec_json="")
    assert [(s.idx, s.name, s.started_at, s.ended_at) for s in await store.list_stages(record.pk)] == [
        (0, "warm", None, None),
        (1, "load", None, None),
    ]
    assert await store.get_run_secret(record.pk) == "sk-1"
    assert await store.get_run_dataset(record.pk) == '[{"p": 1}]'
    assert await store.list_events(record.pk) == []


async def test_a_run_without_binary_spec_reads_back_its_json(store: Store) -> None:
    record = await new_run(store, spec_json='{"old": true}')
    read = await store.get_run(record.run_id)
    assert read is not None and read.spec_json == '{"old": true}' and read.spec_pb == b""
    assert await store.get_run_secret(record.pk) == "" and await store.get_run_dataset(record.pk) == ""


async def test_a_request_id_creates_one_run_only(store: Store) -> None:
    first = await new_run(store, "run_a", request_id="req-1")
    again, created = await store.insert_run("run_b", "req-1", "other", "m2", "{}", ["s"], "", 9)
    assert not created and again == first  # the first run, as created
    assert await store.get_run("run_b") is None
    # No request id (None or ""): no idempotency, every call is a run.
    await new_run(store, "run_c", request_id="")
    await new_run(store, "run_d", request_id="")
    assert await store.pending_run_ids() == ["run_a", "run_c", "run_d"]


async def test_a_run_id_is_unique(store: Store) -> None:
    await new_run(store, "run_a")
    with pytest.raises(INTEGRITY_ERRORS):
        await store.insert_run("run_a", None, "", "m", "{}", ["s"], "sk", 2)
    assert await store.count_runs_by_state() == {RunState.PENDING: 1}


async def test_unknown_runs_read_as_nothing(store: Store) -> None:
    assert await store.get_run("run_none") is None
    assert await store.get_run_secret(404) == ""
    assert await store.get_run_dataset(404) == ""
    assert await store.list_stages(404) == []
    assert await store.list_events(404) == []
    assert await store.count_runs_by_state() == {}
    assert await store.pending_run_ids() == []


def repeats(*run_ids: str) -> list[repo.NewRepeat]:
    return [repo.NewRepeat(run_id, f'{{"seed": {i}}}', bytes([8, i + 1])) for i, run_id in enumerate(run_ids)]


async def test_a_group_is_created_together_in_repeat_order(store: Store) -> None:
    records, created = await store.insert_group(
        "grp_a", "req-g", "grouped", "m", repeats("run_x", "run_y", "run_z"), ["s0", "s1"], "sk-g", 7, "[1]"
    )
    assert created
    assert [(r.run_id, r.group_id, r.repeat_index, r.state) for r in records] == [
        ("run_x", "grp_a", 0, RunState.PENDING),
        ("run_y", "grp_a", 1, RunState.PENDING),
        ("run_z", "grp_a", 2, RunState.PENDING),
    ]
    assert {(r.display_name, r.model, r.created_at) for r in records} == {("grouped", "m", 7)}
    assert [r.spec_pb for r in records] == [b"\x08\x01", b"\x08\x02", b"\x08\x03"]  # each its own spec
    assert records[1].spec_json == '{"seed": 1}'
    for r in records:  # every repeat is a whole run: its stages, secret and dataset
        assert [s.name for s in await store.list_stages(r.pk)] == ["s0", "s1"]
        assert await store.get_run_secret(r.pk) == "sk-g"
        assert await store.get_run_dataset(r.pk) == "[1]"
    listed = await store.list_group("grp_a")
    assert listed == [dataclasses.replace(r, spec_json="") for r in records]
    assert await store.pending_run_ids() == ["run_x", "run_y", "run_z"]  # started in repeat order


async def test_a_request_id_creates_one_group_only(store: Store) -> None:
    first, created = await store.insert_group("grp_a", "req-g", "", "m", repeats("run_x", "run_y"), ["s"], "", 1)
    assert created and len(first) == 2
    again, created = await store.insert_group("grp_b", "req-g", "", "m", repeats("run_p", "run_q"), ["s"], "", 2)
    assert not created and [r.run_id for r in again] == ["run_x", "run_y"]
    assert await store.list_group("grp_b") == [] and await store.get_run("run_p") is None
    # A single run with the group's request id is the group's first run, as created.
    single, created = await store.insert_run("run_s", "req-g", "", "m", "{}", ["s"], "", 3)
    assert not created and single.run_id == "run_x"
    # A group with a single run's request id is that run.
    await new_run(store, "run_solo", request_id="req-solo")
    solo, created = await store.insert_group("grp_c", "req-solo", "", "m", repeats("run_c0", "run_c1"), ["s"], "", 4)
    assert not created and [(r.run_id, r.group_id) for r in solo] == [("run_solo", "")]


async def test_a_group_with_a_taken_run_id_stores_nothing(store: Store) -> None:
    await new_run(store, "run_y")
    with pytest.raises(INTEGRITY_ERRORS):
        await store.insert_group("grp_a", None, "", "m", repeats("run_x", "run_y"), ["s"], "", 1)
    assert await store.get_run("run_x") is None and await store.list_group("grp_a") == []
    assert await store.count_runs_by_state() == {RunState.PENDING: 1}


async def test_a_run_alone_has_no_group_and_an_unknown_group_no_runs(store: Store) -> None:
    record = await new_run(store, "run_a")
    read = await store.get_run("run_a")
    assert (record.group_id, record.repeat_index) == ("", 0)
    assert read is not None and (read.group_id, read.repeat_index) == ("", 0)
    assert await store.list_group("grp_none") == [] and await store.list_group("") == []


async def test_list_runs_filters_by_group(store: Store) -> None:
    await new_run(store, "run_before", created=1)
    await store.insert_group("grp_a", None, "", "m", repeats("run_a0", "run_a1", "run_a2"), ["s"], "", 2)
    await store.insert_group("grp_b", None, "", "other", repeats("run_b0", "run_b1"), ["s"], "", 3)
    await new_run(store, "run_after", created=4)
    # Runs created together share their creation time: the later repeat (pk) first, as ever.
    assert (await store.list_runs(10, None, 0, "", 10**9, page_of, group_id="grp_a"))[0] == [
        "run_a2",
        "run_a1",
        "run_a0",
    ]
    ids, cursor = await store.list_runs(2, None, 0, "", 10**9, page_of, group_id="grp_a")
    assert ids == ["run_a2", "run_a1"] and cursor is not None
    ids, cursor = await store.list_runs(2, cursor, 0, "", 10**9, page_of, group_id="grp_a")
    assert (ids, cursor) == (["run_a0"], None)
    b0 = await store.get_run("run_b0")
    assert b0 is not None
    await store.update_run(b0.pk, state=RunState.RUNNING)
    assert (await store.list_runs(10, None, RunState.RUNNING, "other", 10**9, page_of, group_id="grp_b"))[0] == [
        "run_b0"
    ]
    assert (await store.list_runs(10, None, 0, "m", 10**9, page_of, group_id="grp_b")) == ([], None)
    assert (await store.list_runs(10, None, 0, "", 10**9, page_of, group_id="grp_none")) == ([], None)
    assert len((await store.list_runs(10, None, 0, "", 10**9, page_of))[0]) == 7  # no filter: every run


async def test_deleting_a_repeat_leaves_the_rest_of_its_group(store: Store) -> None:
    records, _ = await store.insert_group("grp_a", None, "", "m", repeats("run_x", "run_y"), ["s"], "", 1)
    await store.finish_run(records[0].pk, RunState.SUCCEEDED, "", 2)
    await store.delete_run(records[0].pk)
    assert [(r.run_id, r.repeat_index) for r in await store.list_group("grp_a")] == [("run_y", 1)]


def page_of(records: list[repo.RunRecord], cursor: tuple[int, int] | None) -> tuple[list[str], tuple[int, int] | None]:
    return [r.run_id for r in records], cursor


async def test_list_runs_pages_newest_first_without_overlap(store: Store) -> None:
    created = [5, 3, 3, 9, 1, 3, 7]
    for i, t in enumerate(created):
        await new_run(store, f"run_{i}", created=t, model="even" if i % 2 == 0 else "odd")
    # Newest first; equal creation times: the later pk first.
    expected = [f"run_{i}" for i in sorted(range(7), key=lambda i: (created[i], i), reverse=True)]
    assert expected == ["run_3", "run_6", "run_0", "run_5", "run_2", "run_1", "run_4"]
    ids, cursor = await store.list_runs(7, None, 0, "", 10**9, page_of)
    assert (ids, cursor) == (expected, None)  # exactly a page: no next page
    ids, cursor = await store.list_runs(6, None, 0, "", 10**9, page_of)
    assert ids == expected[:6] and cursor is not None
    last = await store.get_run("run_1")
    assert last is not None and cursor == (last.created_at, last.pk)
    seen: list[str] = []
    after = None
    while True:
        ids, after = await store.list_runs(3, after, 0, "", 10**9, page_of)
        seen += ids
        if after is None:
            break
    assert seen == expected
    ids, cursor = await store.list_runs(10, cursor, 0, "", 10**9, page_of)
    assert (ids, cursor) == (["run_4"], None)


async def test_list_runs_filters_by_state_and_model(store: Store) -> None:
    for i in range(6):
        record = await new_run(store, f"run_{i}", created=i, model="a" if i < 3 else "b")
        if i % 2:
            await store.update_run(record.pk, state=RunState.RUNNING)
    assert (await store.list_runs(10, None, RunState.RUNNING, "", 10**9, page_of))[0] == ["run_5", "run_3", "run_1"]
    assert (await store.list_runs(10, None, 0, "a", 10**9, page_of))[0] == ["run_2", "run_1", "run_0"]
    assert (await store.list_runs(10, None, RunState.PENDING, "b", 10**9, page_of))[0] == ["run_4"]
    assert (await store.list_runs(10, None, RunState.FAILED, "", 10**9, page_of)) == ([], None)
    ids, cursor = await store.list_runs(1, None, RunState.RUNNING, "a", 10**9, page_of)
    assert ids == ["run_1"] and cursor is None


async def test_list_runs_ends_a_page_before_its_byte_budget(store: Store) -> None:
    for i in range(5):
        await new_run(store, f"run_{i}", created=i, spec_pb=bytes(1000))
    one = repo.listed_bytes((await store.list_runs(1, None, 0, "", 10**9, lambda r, _: r))[0])
    assert one == 1000 + 128
    ids, cursor = await store.list_runs(10, None, 0, "", 2 * one, page_of)
    assert ids == ["run_4", "run_3"] and cursor is not None
    ids, cursor = await store.list_runs(10, None, 0, "", 3 * one - 1, page_of)
    assert ids == ["run_4", "run_3"]
    # A run larger than the budget still makes a page of its own.
    ids, cursor = await store.list_runs(10, None, 0, "", 10, page_of)
    assert ids == ["run_4"] and cursor is not None
    ids, cursor = await store.list_runs(10, cursor, 0, "", 10, page_of)
    assert ids == ["run_3"]


async def test_list_runs_returns_what_build_makes_of_the_page(store: Store) -> None:
    await new_run(store, "run_a")
    seen: list[tuple[int, tuple[int, int] | None]] = []

    def build(records: list[repo.RunRecord], cursor: tuple[int, int] | None) -> str:
        seen.append((len(records), cursor))
        return "built"

    assert await store.list_runs(5, None, 0, "", 10**9, build) == "built"
    assert seen == [(1, None)]


async def test_update_run_sets_the_given_columns_only(store: Store) -> None:
    record = await new_run(store)
    await store.update_run(record.pk, state=RunState.RUNNING, started_at=11)
    await store.update_run(record.pk, current_stage=1)
    read = await store.get_run(record.run_id)
    assert read is not None
    assert (read.state, read.started_at, read.current_stage, read.ended_at) == (RunState.RUNNING, 11, 1, None)
    await store.update_run(404, state=RunState.FAILED)  # no such run: nothing happens
    assert await store.count_runs_by_state() == {RunState.RUNNING: 1}


async def test_finishing_a_run_erases_its_secret(store: Store) -> None:
    record = await new_run(store, secret="sk-1", dataset="[]")
    await store.finish_run(record.pk, RunState.FAILED, "it broke", 20)
    read = await store.get_run(record.run_id)
    assert read is not None and read.is_final
    assert (read.state, read.state_reason, read.ended_at) == (RunState.FAILED, "it broke", 20)
    assert await store.get_run_secret(record.pk) == ""
    assert await store.get_run_dataset(record.pk) == "[]"
    await store.finish_run(404, RunState.FAILED, "", 1)


async def test_interrupting_ends_running_runs_only(store: Store) -> None:
    assert await store.interrupt_running("restart", 1) == []
    runs = [await new_run(store, f"run_{i}", created=10 - i, secret=f"sk-{i}") for i in range(4)]
    for r in (runs[0], runs[2], runs[3]):
        await store.update_run(r.pk, state=RunState.RUNNING)
    await store.finish_run(runs[3].pk, RunState.SUCCEEDED, "", 5)
    assert await store.interrupt_running("controller restarted", 30) == ["run_0", "run_2"]  # pk order
    for r in (runs[0], runs[2]):
        read = await store.get_run(r.run_id)
        assert read is not None and (read.state, read.state_reason, read.ended_at) == (
            RunState.INTERRUPTED,
            "controller restarted",
            30,
        )
        assert await store.get_run_secret(r.pk) == ""
        [event] = await store.list_events(r.pk)
        assert (event.kind, event.message, event.time_ns) == ("run_interrupted", "controller restarted", 30)
    assert await store.get_run_secret(runs[1].pk) == "sk-1"
    assert await store.list_events(runs[1].pk) == []
    assert await store.count_runs_by_state() == {RunState.INTERRUPTED: 2, RunState.PENDING: 1, RunState.SUCCEEDED: 1}


async def test_pending_runs_come_oldest_first(store: Store) -> None:
    for i, t in enumerate([5, 2, 5, 1]):
        await new_run(store, f"run_{i}", created=t)
    started = await store.get_run("run_3")
    assert started is not None
    await store.update_run(started.pk, state=RunState.RUNNING)
    assert await store.pending_run_ids() == ["run_1", "run_0", "run_2"]


async def test_stage_times_and_reduced_load(store: Store) -> None:
    record = await new_run(store)
    await store.set_stage_time(record.pk, 0, started_at=100)
    await store.set_stage_time(record.pk, 0, ended_at=200)
    await store.set_stage_time(record.pk, 1, started_at=300, ended_at=400)
    await store.set_stage_time(record.pk, 7, started_at=1)  # no such stage
    await store.set_stage_reduced_load(record.pk, 1, "agent lost")
    await store.set_stage_reduced_load(record.pk, 9, "nothing")
    assert await store.list_stages(record.pk) == [
        repo.StageRecord(0, "s0", 100, 200, ""),
        repo.StageRecord(1, "s1", 300, 400, "agent lost"),
    ]
    assert await snapshot_of(store, "stage_reduced_load_reason", record.pk, 1) == "agent lost"
    assert await snapshot_of(store, "stage_reduced_load_reason", record.pk, 0) == ""
    assert await snapshot_of(store, "stage_reduced_load_reason", 404, 0) == ""


async def test_an_appended_stage_extends_the_stored_spec_and_the_stages(store: Store) -> None:
    spec = run_pb2.RunSpec(display_name="search")
    spec.stages.add(name="s0", concurrency=1)
    record = await new_run(store, stages=["s0"], spec_pb=spec.SerializeToString())
    spec.stages.add(name="probe 1: concurrency=2", concurrency=2)
    await store.append_stage(record.pk, 1, "probe 1: concurrency=2", "{}", spec.SerializeToString())
    stored = await store.get_run("run_a")
    assert stored is not None and parse_spec(stored) == spec
    assert [(s.idx, s.name) for s in await store.list_stages(record.pk)] == [(0, "s0"), (1, "probe 1: concurrency=2")]
    for run_pk, idx in ((record.pk, 1), (404, 0)):  # the index is taken; no such run
        with pytest.raises(INTEGRITY_ERRORS):
            await store.append_stage(run_pk, idx, "again", "{}", b"")
    assert len(await store.list_stages(record.pk)) == 2


async def test_events_are_listed_in_order_after_a_pk(store: Store) -> None:
    a, b = await new_run(store, "run_a"), await new_run(store, "run_b")
    e1 = await store.add_event(a.pk, "k1", "first", 10)
    await store.add_event(b.pk, "other", "", 11)
    e3 = await store.add_event(a.pk, "k2", "second", 9)
    assert e1.pk < e3.pk and (e3.kind, e3.message, e3.time_ns) == ("k2", "second", 9)
    assert await store.list_events(a.pk) == [e1, e3]
    assert await store.list_events(a.pk, e1.pk) == [e3]
    assert await store.list_events(a.pk, e3.pk) == []
    with pytest.raises(INTEGRITY_ERRORS):
        await store.add_event(404, "k", "", 1)
    assert await store.list_events(404) == []


async def test_deleting_a_run_takes_everything_of_it(store: Store) -> None:
    keep = await new_run(store, "run_keep", secret="sk-keep")
    gone = await new_run(store, "run_gone", secret="sk", dataset="[]", request_id="req-gone")
    await store.record_agent_connected("ses-1", "agent-a", {}, "1", 1)
    for run in (keep, gone):
        a_pk = await new_assignment(store, run.pk, f"asg_{run.run_id}", session="ses-1")
        table, itl = sample_table(4)
        scrape = ScrapeRow("http://m/metrics", T0, "down", ())
        await store.ingest_batches([batch(a_pk, run.pk, 1, table, itl, errors=[(0, "e")], scrapes=[scrape])])
        await store.add_event(run.pk, "k", "", 1)
        await store.put_run_result(run.pk, run.run_id, repo.StoredResult(3, 1, 1, 1, b"r"))
    await store.finish_run(gone.pk, RunState.SUCCEEDED, "", 2)
    await store.delete_run(gone.pk)
    assert await store.get_run("run_gone") is None
    assert await store.lookup_assignment("asg_run_gone") is None
    assert await store.get_assignment("asg_run_gone") is None
    for read in ("get_run_secret", "get_run_dataset", "list_stages", "list_events", "count_samples"):
        assert not await getattr(store, read)(gone.pk), read
    assert await store.sample_batches_version(gone.pk) == (0, 0)
    assert await store.export_page(gone.pk, 0, 10, True) == []
    assert await snapshot_of(store, "get_run_result", gone.pk) is None
    scrapes = await snapshot_of(store, "load_stage_scrapes", gone.pk, 0)
    assert scrapes.scrapes == []  # type: ignore[attr-defined]
    # The request id is free again; the other run and the agent session are untouched.
    await new_run(store, "run_new", request_id="req-gone")
    assert await store.get_agent("ses-1") is not None
    assert await store.get_run_secret(keep.pk) == "sk-keep"
    assert await store.count_samples(keep.pk) == 4
    assert len(await store.list_events(keep.pk)) == 2  # its own, and the scrape failure's
    assert await snapshot_of(store, "get_run_result", keep.pk) is not None
    await store.delete_run(404)


async def test_a_freed_pk_is_given_again_so_results_check_the_run_id(store: Store) -> None:
    await new_run(store, "run_a")
    b = await new_run(store, "run_b")
    await store.delete_run(b.pk)
    c = await new_run(store, "run_c")
    assert c.pk == b.pk  # as SQLite numbers rows: one more than the largest
    stored = repo.StoredResult(1, 0, 0, 1, b"x")
    assert not await store.put_run_result(b.pk, "run_b", stored)
    assert await store.put_run_result(c.pk, "run_c", stored)


# --- agents and assignments ---------------------------------------------------------------


async def test_agent_sessions(store: Store) -> None:
    await store.record_agent_connected("ses-1", "agent-a", {"zone": "b", "gpu": "no"}, "1.2", 10)
    agent = await store.get_agent("ses-1")
    assert agent == repo.AgentRecord("ses-1", "agent-a", {"gpu": "no", "zone": "b"}, "1.2", 10, None)
    await store.record_agent_disconnected("ses-1", 20)
    agent = await store.get_agent("ses-1")
    assert agent is not None and agent.disconnected_at == 20
    with pytest.raises(INTEGRITY_ERRORS):
        await store.record_agent_connected("ses-1", "again", {}, "1", 30)
    await store.record_agent_disconnected("ses-none", 1)
    assert await store.get_agent("ses-none") is None


async def test_a_new_assignment_and_its_lookup(store: Store) -> None:
    run = await new_run(store)
    pk = await store.insert_assignment("asg_1", run.pk, 1, "ses-1", "agent-a", 4, 100, 1, 50, "digest")
    found = await store.lookup_assignment("asg_1")
    assert found == repo.StoredAssignment(pk, run.pk, "run_a", 1, "digest", 50, None, 0)
    assert await store.get_assignment("asg_1") == repo.AssignmentRecord(
        pk,
        "asg_1",
        run.pk,
        1,
        "ses-1",
        "agent-a",
        4,
        100,
        1,
        "",
        None,
        0,
        50,
        None,
        0.0,
        0.0,
        None,
        None,
        0,
        0,
        "digest",
    )
    other = await new_assignment(store, run.pk, "asg_2")
    assert other > pk
    assert await store.lookup_assignment("asg_none") is None
    assert await store.get_assignment("asg_none") is None


async def test_an_assignment_needs_a_run_and_a_new_id(store: Store) -> None:
    run = await new_run(store)
    await new_assignment(store, run.pk, "asg_1")
    with pytest.raises(INTEGRITY_ERRORS):
        await new_assignment(store, run.pk, "asg_1")
    with pytest.raises(INTEGRITY_ERRORS):
        await new_assignment(store, 404, "asg_2")
    assert await store.lookup_assignment("asg_2") is None


async def test_assignment_updates(store: Store) -> None:
    run = await new_run(store)
    pk = await new_assignment(store, run.pk, "asg_1", created=5)
    await store.update_assignment(pk, planned_start_ns=7, takeover=1, clock_offset_ns=-3)
    await store.update_assignment(pk, started_ns=8, clock_offset_ns=4)
    await store.update_assignment(pk, state=3, message="done", batch_count=2, requests_sent=9, ended_at=12)
    await store.record_assignment_health(pk, 12.5, 80.0)
    await store.update_assignment(404, state=3)
    await store.record_assignment_health(404, 1.0, 1.0)
    a = await store.get_assignment("asg_1")
    assert a is not None
    assert (a.planned_start_ns, a.started_ns, a.takeover, a.clock_offset_ns) == (7, 8, 1, 4)
    assert (a.state, a.message, a.batch_count, a.requests_sent, a.ended_at) == (3, "done", 2, 9, 12)
    assert (a.max_loop_lag_ms, a.max_cpu_percent, a.created_at) == (12.5, 80.0, 5)
    found = await store.lookup_assignment("asg_1")
    assert found is not None and (found.ended_at, found.clock_offset_ns) == (12, 4)


async def test_stage_assignments_count_their_stored_samples(store: Store) -> None:
    run = await new_run(store)
    a1 = await new_assignment(store, run.pk, "asg_1", agent="agent-b")
    a2 = await new_assignment(store, run.pk, "asg_2", agent="agent-a")
    await new_assignment(store, run.pk, "asg_3", stage=1)
    await store.update_assignment(
        a2, takeover=1, requests_sent=7, planned_start_ns=3, started_ns=4, state=AssignmentState.LOST
    )
    t1, g1 = sample_table(3)
    t2, g2 = sample_table(5)
    await store.ingest_batches(
        [batch(a1, run.pk, 1, t1, g1), batch(a2, run.pk, 1, t2, g2), batch(a1, run.pk, 2, t1, g1)]
    )
    rows = await snapshot_of(store, "stage_assignments", run.pk, 0)
    assert rows == [
        repo.AssignmentSummary("agent-b", "ses-asg_1", 1, 0, 6, None, None, False),
        repo.AssignmentSummary("agent-a", "ses-asg_2", AssignmentState.LOST, 7, 5, 3, 4, True),
    ]
    assert await snapshot_of(store, "stage_assignments", run.pk, 5) == []


# --- samples ------------------------------------------------------------------------------


async def test_ingest_is_idempotent_and_counts_without_warmup(store: Store) -> None:
    run = await new_run(store)
    a = await new_assignment(store, run.pk, "asg_1")
    table, itl = sample_table(6, status=[1, 1, 3, 1, 4, 1], flags=[WARMUP, 0, 0, RETRIED, WARMUP, 0])
    assert await store.sample_batches_version(run.pk) == (0, 0)
    [first] = await store.ingest_batches([batch(a, run.pk, 1, table, itl)])
    # Counted: samples 1, 2, 3, 5 (0 and 4 are warmup); OK among them: 1, 3, 5, 3 tokens each.
    assert first == repo.IngestOutcome(True, 3, 1, 9)
    version = await store.sample_batches_version(run.pk)
    assert version[0] == 1 and version[1] > 0
    # A replay (same assignment and seq), alone or twice in one call, stores nothing.
    again = await store.ingest_batches(
        [batch(a, run.pk, 1, table, itl), batch(a, run.pk, 2, table, itl), batch(a, run.pk, 2, table, itl)]
    )
    assert again == [
        repo.IngestOutcome(False, 0, 0, 0),
        repo.IngestOutcome(True, 3, 1, 9),
        repo.IngestOutcome(False, 0, 0, 0),
    ]
    read = await store.get_run(run.run_id)
    assert read is not None and (read.requests_ok, read.requests_failed, read.output_tokens) == (6, 2, 18)
    assert await store.count_samples(run.pk) == 12  # warmup included
    later = await store.sample_batches_version(run.pk)
    assert later[0] == 2 and later[1] > version[1]
    assert await store.count_samples(404) == 0 and await store.sample_batches_version(404) == (0, 0)


async def test_ingest_stores_all_batches_or_none(store: Store) -> None:
    run = await new_run(store)
    a = await new_assignment(store, run.pk, "asg_1")
    table, itl = sample_table(4)
    with pytest.raises(INTEGRITY_ERRORS):
        await store.ingest_batches([batch(a, run.pk, 1, table, itl), batch(a + 1000, run.pk, 2, table, itl)])
    with pytest.raises(INTEGRITY_ERRORS):
        await store.ingest_batches([batch(a, run.pk, 1, table, itl), batch(a, 404, 2, table, itl)])
    assert await store.count_samples(run.pk) == 0
    read = await store.get_run(run.run_id)
    assert read is not None and read.requests_ok == 0
    # The good batch alone goes in (it was not half stored before).
    assert (await store.ingest_batches([batch(a, run.pk, 1, table, itl)]))[0].new


async def test_a_stored_batch_is_a_copy(store: Store) -> None:
    run = await new_run(store)
    a = await new_assignment(store, run.pk, "asg_1")
    table, itl = sample_table(3)
    await store.ingest_batches([batch(a, run.pk, 1, table, itl)])
    sent = table[COL["sent_unix_ns"]].copy()
    table[COL["sent_unix_ns"]] = 0
    data = await snapshot_of(store, "load_stage_samples", run.pk, 0)
    assert np.array_equal(data.columns.sent_unix_ns, sent)  # type: ignore[attr-defined]


async def test_export_rows_end_with_the_reasoning_and_conversation_columns(store: Store) -> None:
    run = await new_run(store)
    a1 = await new_assignment(store, run.pk, "asg_1", session="ses-a")
    t, g = sample_table(3, seed=4)
    stored = [c for c in columnar.EXPORT_EXTRA_COLUMNS if c in COL]
    for k, name in enumerate(stored):
        t[COL[name]] = (k + 1) * 1000 + np.arange(3)
    await store.ingest_batches([batch(a1, run.pk, 1, t, g)])
    rows = await store.export_page(run.pk, 0, 10, True)
    extra = {name: [r[16 + k] for r in rows] for k, name in enumerate(columnar.EXPORT_EXTRA_COLUMNS)}
    for name, values in extra.items():
        k = stored.index(name) if name in stored else -1
        assert values == ([(k + 1) * 1000 + i for i in range(3)] if k >= 0 else [0, 0, 0]), name


async def test_export_pages_through_samples_in_storage_order(store: Store) -> None:
    run = await new_run(store)
    a1 = await new_assignment(store, run.pk, "asg_1", agent="agent-a", session="ses-a")
    a2 = await new_assignment(store, run.pk, "asg_2", agent="agent-b", session="ses-b", stage=1)
    t1, g1 = sample_table(4, flags=[0, WARMUP, 0, 0], status=[1, 3, 1, 4], seed=1)
    t2, g2 = sample_table(3, seed=2)
    t3, g3 = sample_table(2, flags=[WARMUP, WARMUP], seed=3)
    await store.ingest_batches(
        [
            batch(a1, run.pk, 1, t1, g1, errors=[(1, "warm boom"), (3, "boom")]),
            batch(a2, run.pk, 1, t2, g2, stage=1),
            batch(a1, run.pk, 2, t3, g3),
        ]
    )

    def rows(t: np.ndarray, stage: int, agent: str, session: str, errors: dict[int, str]) -> list[tuple[object, ...]]:
        extra = [COL.get(c) for c in columnar.EXPORT_EXTRA_COLUMNS]
        return [
            (
                stage,
                agent,
                *(int(v) for v in t[:11, i]),
                errors.get(i, ""),
                session,
                *(0 if c is None else int(t[c, i]) for c in extra),
            )
            for i in range(t.shape[1])
        ]

    everything = [
        *rows(t1, 0, "agent-a", "ses-a", {1: "warm boom", 3: "boom"}),
        *rows(t2, 1, "agent-b", "ses-b", {}),
        *rows(t3, 0, "agent-a", "ses-a", {}),
    ]
    warm = everything[1][11]
    assert warm == WARMUP
    counted = [r for r in everything if not int(r[11]) & WARMUP]  # type: ignore[call-overload]
    last_cursor = 0
    for include_warmup, expected in ((True, everything), (False, counted)):
        one_page = await store.export_page(run.pk, 0, 100, include_warmup)
        last_cursor = max(last_cursor, int(one_page[-1][0]))  # type: ignore[call-overload]
        assert [r[1:] for r in one_page] == expected
        cursors = [int(r[0]) for r in one_page]  # type: ignore[call-overload]
        assert cursors == sorted(set(cursors))
        # Pages of 2 (one ending exactly at the end, so the last page is empty) cover it once.
        paged: list[tuple[object, ...]] = []
        after = 0
        while page := await store.export_page(run.pk, after, 2, include_warmup):
            assert len(page) <= 2
            paged += page
            after = int(page[-1][0])  # type: ignore[call-overload]
        assert paged == one_page
    assert await store.export_page(run.pk, last_cursor, 5, True) == []
    assert await store.export_page(404, 0, 5, True) == []


async def test_stage_samples_come_agent_by_agent(store: Store) -> None:
    run = await new_run(store)
    # Created b first: a stage reads by agent name, then assignment, then batch seq.
    ab = await new_assignment(store, run.pk, "asg_b", agent="agent-b", created=T0)
    aa = await new_assignment(store, run.pk, "asg_a", agent="agent-a", created=T0 + 5)
    ab2 = await new_assignment(store, run.pk, "asg_b2", agent="agent-b", created=T0 + 9)
    await new_assignment(store, run.pk, "asg_other", agent="agent-0", stage=1)
    await store.update_assignment(ab, ended_at=T0 + 10**10, clock_offset_ns=7)
    await store.record_assignment_health(ab, 30.0, 50.0)
    await store.record_assignment_health(aa, 10.0, 90.0)
    parts = {name: sample_table(n, seed=n) for name, n in (("b2", 2), ("a1", 3), ("b1", 4), ("b3", 5), ("a2", 1))}
    await store.ingest_batches(
        [
            batch(ab, run.pk, 2, *parts["b2"]),
            batch(aa, run.pk, 1, *parts["a1"]),
            batch(ab, run.pk, 1, *parts["b1"]),
            batch(ab2, run.pk, 1, *parts["b3"]),
            batch(aa, run.pk, 2, *parts["a2"]),
        ]
    )
    await store.set_stage_time(run.pk, 0, ended_at=T0 + 99)
    data = await snapshot_of(store, "load_stage_samples", run.pk, 0)
    assert isinstance(data, repo.StageSamples)
    order = ["a1", "a2", "b1", "b2", "b3"]
    expected = np.concatenate([parts[p][0] for p in order], axis=1)
    assert np.array_equal(data.columns.sent_unix_ns, expected[COL["sent_unix_ns"]])
    assert np.array_equal(data.first_byte_ns, expected[COL["first_byte_ns"]])
    assert np.array_equal(data.requested_input_tokens, expected[COL["requested_input_tokens"]])
    assert len(data.columns.itl_ns) == 2 * expected.shape[1]
    assert data.agent_names == ["agent-a", "agent-b"]
    assert data.agent.tolist() == [0] * 4 + [1] * 11
    # Per sample, the assignment (in creation order: b, a, b2) whose window it lies in.
    assert data.assignment.tolist() == [1] * 4 + [0] * 6 + [2] * 5
    assert data.windows == [(T0, T0 + 10**10, 7), (T0 + 5, None, 0), (T0 + 9, None, 0)]
    assert (data.max_loop_lag_ms, data.max_cpu_percent, data.stage_ended_at) == (30.0, 90.0, T0 + 99)
    assert await snapshot_of(store, "stage_indexes_with_samples", run.pk) == [0]
    empty = await snapshot_of(store, "load_stage_samples", run.pk, 1)
    assert isinstance(empty, repo.StageSamples)
    assert len(empty.columns) == 0 and empty.agent_names == ["agent-0"] and empty.windows == []
    assert empty.stage_ended_at is None
    nothing = await snapshot_of(store, "load_stage_samples", 404, 0)
    assert isinstance(nothing, repo.StageSamples) and len(nothing.columns) == 0 and nothing.agent_names == []


async def test_failure_summary_names_the_first_stored_error(store: Store) -> None:
    run = await new_run(store)
    a = await new_assignment(store, run.pk, "asg_1")
    ok, g_ok = sample_table(2)
    assert await store.failure_summary(run.pk) == (0, 0, "")
    bad, g_bad = sample_table(3, status=[1, 3, 3])
    await store.ingest_batches(
        [
            batch(a, run.pk, 1, ok, g_ok),
            batch(a, run.pk, 2, bad, g_bad, errors=[(2, "late"), (1, "early")]),
            batch(a, run.pk, 3, bad, g_bad, errors=[(1, "next batch")]),
        ]
    )
    assert await store.failure_summary(run.pk) == (4, 4, "early")


async def test_server_scrapes_and_their_failure_events(store: Store) -> None:
    run = await new_run(store)
    a = await new_assignment(store, run.pk, "asg_1")
    url, other = "http://m:8000/metrics", "http://n:8000/metrics"
    running, generated = "vllm:num_requests_running", "vllm:generation_tokens_total"
    values = ((running, 'model="x"', GAUGE, 2.0), (running, 'model="y"', GAUGE, 3.0), (generated, "", COUNTER, 40.0))
    # An endpoint's state is that of its latest scrape by scrape time, whatever the arrival order.
    rounds = [
        [ScrapeRow(url, T0 + 3, "", values), ScrapeRow(other, T0 + 1, "refused", ())],  # other fails
        [ScrapeRow(url, T0 + 2, "timeout", ()), ScrapeRow(other, T0 + 4, "refused", ())],  # url fails; other still
        # url: the latest scrape (T0 + 3) was fine, so this failure is news again; other fails differently
        [ScrapeRow(url, T0 + 5, "timeout", ()), ScrapeRow(other, T0 + 6, "HTTP 500", ())],
        [ScrapeRow(url, T0 + 7, "", values)],  # url recovers
    ]
    table, itl = sample_table(1)
    for seq, scrapes in enumerate(rounds, 1):
        await store.ingest_batches([batch(a, run.pk, seq, table, itl, scrapes=scrapes)])
    # A replayed batch stores neither its scrapes nor their events again.
    await store.ingest_batches([batch(a, run.pk, 1, table, itl, scrapes=rounds[0])])
    events = [(e.kind, e.message) for e in await store.list_events(run.pk)]
    assert events == [
        (EVENT_SCRAPE_FAILED, f"stage 0: scraping {other} failed: refused"),
        (EVENT_SCRAPE_FAILED, f"stage 0: scraping {url} failed: timeout"),
        (EVENT_SCRAPE_FAILED, f"stage 0: scraping {url} failed: timeout"),
        (EVENT_SCRAPE_FAILED, f"stage 0: scraping {other} failed: HTTP 500"),
        (EVENT_SCRAPE_RECOVERED, f"stage 0: scraping {url} works again"),
    ]
    data = await snapshot_of(store, "load_stage_scrapes", run.pk, 0)
    scrapes = data.scrapes  # type: ignore[attr-defined]
    assert [(s.endpoint, s.time_unix_ns, s.error) for s in scrapes] == [
        (other, T0 + 1, "refused"),
        (url, T0 + 2, "timeout"),
        (url, T0 + 3, ""),
        (other, T0 + 4, "refused"),
        (url, T0 + 5, "timeout"),
        (other, T0 + 6, "HTTP 500"),
        (url, T0 + 7, ""),
    ]
    pk_of = {s.time_unix_ns: s.pk for s in scrapes}
    assert sorted(data.values) == sorted(  # type: ignore[attr-defined]
        (pk_of[t], name, kind, total)
        for t in (T0 + 3, T0 + 7)
        for name, kind, total in ((running, GAUGE, 5.0), (generated, COUNTER, 40.0))
    )
    assert (await snapshot_of(store, "load_stage_scrapes", run.pk, 1)).scrapes == []  # type: ignore[attr-defined]


async def test_stored_results_are_replaced_and_bound_to_their_run(store: Store) -> None:
    run = await new_run(store)
    assert await snapshot_of(store, "get_run_result", run.pk) is None
    first, second = repo.StoredResult(3, 1, 5, 2, b"one"), repo.StoredResult(3, 2, 9, 3, b"two")
    assert await store.put_run_result(run.pk, "run_a", first)
    assert await snapshot_of(store, "get_run_result", run.pk) == first
    assert await store.put_run_result(run.pk, "run_a", second)
    stored = await snapshot_of(store, "get_run_result", run.pk)
    assert stored == second and stored.version == (3, 2, 9)  # type: ignore[attr-defined]
    assert not await store.put_run_result(run.pk, "run_other", first)
    assert not await store.put_run_result(404, "run_a", first)
    assert await snapshot_of(store, "get_run_result", run.pk) == second


async def test_a_snapshot_job_gets_its_arguments(store: Store) -> None:
    run = await new_run(store)
    await store.add_event(run.pk, "k", "m", 1)

    def job(reads: SnapshotReads, run_pk: int, *, kind: str) -> list[str]:
        return [e.message for e in reads.list_events(run_pk) if e.kind == kind]

    assert await store.read_snapshot(job, run.pk, kind="k") == ["m"]
    assert await store.read_snapshot(job, run.pk, kind="other") == []


# --- a whole result ---------------------------------------------------------------------


def result_spec() -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec()
    spec.target.model = "m"
    spec.stages.add(name="low", concurrency=2).duration.FromSeconds(5)
    spec.stages.add(name="high", concurrency=4).duration.FromSeconds(5)
    spec.checks.add(expression="error_rate < 0.5")
    spec.server_metrics.endpoints.append("http://m:8000/metrics")
    return spec


async def stored_run_for_result(store: Store) -> repo.RunRecord:
    """A finished two-stage run of two agents, one lost in stage 1, with scrapes and warnings."""
    spec = result_spec()
    run = await new_run(store, spec_pb=spec.SerializeToString(), stages=["low", "high"])
    await store.update_run(run.pk, state=RunState.RUNNING, started_at=T0)
    url = spec.server_metrics.endpoints[0]
    seq = 0
    for stage in (0, 1):
        a = await new_assignment(store, run.pk, f"asg_a{stage}", stage=stage, agent="agent-a", session="ses-a")
        b = await new_assignment(store, run.pk, f"asg_b{stage}", stage=stage, agent="agent-b", session="ses-b")
        await store.update_assignment(a, started_ns=T0 + 10**9, planned_start_ns=T0 + 10**9 - 5000)
        await store.update_assignment(b, started_ns=T0 + 10**9 + 2 * 10**6, planned_start_ns=T0 + 10**9 - 5000)
        for i, pk in enumerate((a, b)):
            seq += 1
            table, itl = sample_table(
                20,
                sent0=T0 + 10**9 + stage * 5 * 10**9,
                status=[1] * 18 + [3, 1],
                flags=[WARMUP] + [0] * 18 + [RETRIED],
                seed=seq,
            )
            gauges = (
                ("vllm:num_requests_running", "", GAUGE, float(2 + i)),
                ("vllm:generation_tokens_total", "", COUNTER, float(100 * seq)),
            )
            scrapes = [ScrapeRow(url, T0 + 10**9 + stage * 5 * 10**9 + k * 10**9, "", gauges) for k in range(2)]
            await store.ingest_batches(
                [
                    batch(
                        pk,
                        run.pk,
                        seq,
                        table,
                        itl,
                        stage=stage,
                        errors=[(18, "HTTP 500")],
                        scrapes=scrapes if i == 0 else (),
                    )
                ]
            )
        await store.record_assignment_health(a, 12.0, 40.0)
        await store.set_stage_time(run.pk, stage, started_at=T0 + 10**9 + stage * 5 * 10**9)
        await store.set_stage_time(run.pk, stage, ended_at=T0 + 10**9 + (stage + 1) * 5 * 10**9)
    lost = await store.lookup_assignment("asg_b1")
    assert lost is not None
    await store.update_assignment(lost.pk, state=AssignmentState.LOST, requests_sent=25)
    await store.set_stage_reduced_load(run.pk, 1, "agent-b was lost")
    await store.add_event(run.pk, "preflight_warning", "the target answered slowly", T0)
    await store.finish_run(run.pk, RunState.SUCCEEDED, "", T0 + 20 * 10**9)
    final = await store.get_run("run_a")
    assert final is not None
    return final


async def test_a_result_computed_over_the_store(store: Store) -> None:
    record = await stored_run_for_result(store)
    computed = await store.read_snapshot(provider.compute_result, record.pk, record.run_id, result_spec(), record.state)
    assert computed.version == (record.state, *await store.sample_batches_version(record.pk))
    result = computed.message
    assert result.run_id == "run_a" and result.verdict == run_pb2.VERDICT_PASS
    assert [(s.requests_ok, s.requests_failed, s.requests_retried) for s in result.stages] == [(36, 2, 2)] * 2
    assert [a.agent_name for a in result.stages[0].agents] == ["agent-a", "agent-b"]
    # agent-b's stage-1 share: 25 requests sent, 20 stored before it was lost.
    assert (result.stages[1].agents_lost, result.stages[1].requests_lost) == (1, 5)
    assert (result.stages[0].agents_lost, result.stages[0].requests_lost) == (0, 0)
    assert result.stages[1].reduced_load and result.stages[1].reduced_load_reason == "agent-b was lost"
    assert result.stages[0].start_skew_ms == pytest.approx(2.0)
    assert [a.agent_sessions for a in result.stages[0].agents] == ["ses-a", "ses-b"]
    assert result.stages[0].max_event_loop_lag_ms == 12.0
    assert result.stages[0].server_metrics.series
    assert "the target answered slowly" in result.warnings


async def test_both_stores_compute_the_same_result(tmp_path: Path) -> None:
    db = Database(tmp_path / "same.db")
    db.migrate()
    try:
        results = []
        for store in (SqliteStore(db), MemoryStore()):
            record = await stored_run_for_result(store)
            computed = await store.read_snapshot(
                provider.compute_result, record.pk, record.run_id, result_spec(), record.state
            )
            results.append((computed.version, computed.message))
    finally:
        db.close()
    assert results[0] == results[1]


# --- keys ---------------------------------------------------------------------------------


async def test_keys(store: Store) -> None:
    assert not await store.any_keys()
    assert await store.get_key("k1") is None
    for record in (key("k2", 10), key("k1", 10), key("k3", 30, expires=99), key("k0", 5)):
        await store.insert_key(record)
    assert await store.any_keys()
    assert await store.get_key("k3") == key("k3", 30, expires=99)
    with pytest.raises(INTEGRITY_ERRORS):
        await store.insert_key(key("k1", 1))
    assert [k.key_id for k in await store.list_keys(False)] == ["k3", "k1", "k2", "k0"]
    revoked = await store.revoke_key("k1", 50)
    assert revoked == key("k1", 10, revoked=50)
    assert await store.revoke_key("k1", 60) == revoked  # the first revocation's time stays
    assert await store.revoke_key("k-none", 1) is None
    assert [k.key_id for k in await store.list_keys(False)] == ["k3", "k2", "k0"]
    assert [k.key_id for k in await store.list_keys(True)] == ["k3", "k1", "k2", "k0"]
    found = await store.get_keys(["k1", "k-none", "k3", "k1"])
    assert sorted(found, key=lambda k: k.key_id) == [key("k1", 10, revoked=50), key("k3", 30, expires=99)]
    assert await store.get_keys([]) == []
    assert await store.any_keys()  # revoked keys count


# --- audit --------------------------------------------------------------------------------


async def test_audit_rows_newest_first_with_filters_and_pages(store: Store) -> None:
    assert await store.list_audit(10, None, "", "") == []
    last = await store.insert_audit([audit(1, key_id="a"), audit(2, key_id="b", run_id="run_x")])
    more = await store.insert_audit([audit(3, key_id="a", run_id="run_x", count=4)])
    assert more > last > 0
    rows = await store.list_audit(10, None, "", "")
    assert [r.time_ns for r in rows] == [3, 2, 1] and rows[0].pk == more and rows[1].pk == last
    assert rows[0] == dataclasses.replace(audit(3, key_id="a", run_id="run_x", count=4), pk=more)
    assert [r.time_ns for r in await store.list_audit(10, None, "a", "")] == [3, 1]
    assert [r.time_ns for r in await store.list_audit(10, None, "", "run_x")] == [3, 2]
    assert [r.time_ns for r in await store.list_audit(10, None, "a", "run_x")] == [3]
    assert [r.time_ns for r in await store.list_audit(2, None, "", "")] == [3, 2]
    assert [r.time_ns for r in await store.list_audit(2, rows[1].pk, "", "")] == [1]
    assert await store.list_audit(2, rows[2].pk, "", "") == []


async def test_audit_counts_and_retention(store: Store) -> None:
    pks = [await store.insert_audit([audit(i)], 3) for i in range(5)]
    assert [r.time_ns for r in await store.list_audit(10, None, "", "")] == [4, 3, 2]
    await store.set_audit_counts([(7, pks[4]), (9, pks[0])])  # pks[0] is gone: skipped
    rows = await store.list_audit(10, None, "", "")
    assert [r.count for r in rows] == [7, 1, 1]
    assert await store.insert_audit([audit(5), audit(6)], 3) == pks[4] + 2
    assert [r.time_ns for r in await store.list_audit(10, None, "", "")] == [6, 5, 4]


# --- series and baselines -----------------------------------------------------------------


async def test_a_run_keeps_its_series_and_lists_filter_by_it(store: Store) -> None:
    for i in range(6):
        await new_run(store, f"run_{i}", created=i, series="chat" if i % 2 else "", model="a" if i < 4 else "b")
    record = await store.get_run("run_3")
    assert record is not None and record.series == "chat"
    assert (await store.get_run("run_2")).series == ""  # type: ignore[union-attr]
    assert (await store.list_runs(10, None, 0, "", 10**9, page_of, "chat"))[0] == ["run_5", "run_3", "run_1"]
    assert (await store.list_runs(10, None, 0, "a", 10**9, page_of, "chat"))[0] == ["run_3", "run_1"]
    assert (await store.list_runs(10, None, 0, "", 10**9, page_of, "other")) == ([], None)
    ids, cursor = await store.list_runs(2, None, 0, "", 10**9, page_of, "chat")
    assert ids == ["run_5", "run_3"] and cursor is not None
    assert (await store.list_runs(2, cursor, 0, "", 10**9, page_of, "chat")) == (["run_1"], None)


async def test_series_runs_are_the_most_recent_newest_first(store: Store) -> None:
    created = [5, 3, 3, 9, 1]
    for i, t in enumerate(created):
        await new_run(store, f"run_{i}", created=t, series="s")
    await new_run(store, "run_other", created=100, series="t")
    assert [r.run_id for r in await store.series_runs("s", 10)] == ["run_3", "run_0", "run_2", "run_1", "run_4"]
    assert [r.run_id for r in await store.series_runs("s", 2)] == ["run_3", "run_0"]
    assert [r.run_id for r in await store.series_runs("t", 10)] == ["run_other"]
    assert await store.series_runs("none", 10) == []
    record = (await store.series_runs("t", 1))[0]
    assert record == await store.get_run("run_other")


async def test_a_baseline_per_name_replaced_by_the_next(store: Store) -> None:
    assert await store.get_baseline("chat") is None
    assert await store.list_baselines() == []
    first = BaselineRecord("chat", "run_a", 10, "k1")
    await store.set_baseline(first)
    assert await store.get_baseline("chat") == first
    second = BaselineRecord("chat", "grp_b", 20, "")  # a group's id is a baseline too
    await store.set_baseline(second)
    await store.set_baseline(BaselineRecord("api", "run_c", 30, "k2"))
    assert await store.get_baseline("chat") == second
    assert [b.name for b in await store.list_baselines()] == ["api", "chat"]
    assert await store.delete_baseline("chat")
    assert not await store.delete_baseline("chat")
    assert await store.get_baseline("chat") is None
    assert [b.name for b in await store.list_baselines()] == ["api"]


async def test_deleting_a_run_deletes_the_baselines_naming_it(store: Store) -> None:
    gone = await new_run(store, "run_gone")
    await new_run(store, "run_keep")
    await store.set_baseline(BaselineRecord("a", "run_gone", 1, ""))
    await store.set_baseline(BaselineRecord("b", "run_gone", 2, ""))
    await store.set_baseline(BaselineRecord("c", "run_keep", 3, ""))
    await store.delete_run(gone.pk)
    assert [b.name for b in await store.list_baselines()] == ["c"]


# --- uploaded datasets ----------------------------------------------------------------------


async def upload(store: Store, dataset_id: str, chunks: Sequence[bytes], *, created: int = 1, fmt: int = 1) -> int:
    pk = await store.begin_dataset_upload(f"name of {dataset_id}", fmt, created)
    for seq, blob in enumerate(chunks):
        await store.append_dataset_chunk(pk, seq, blob)
    return pk


async def test_dataset_upload_completes_under_its_id(store: Store) -> None:
    pk = await upload(store, "ds_a", [b"one\n", b"two\n"], created=5)
    assert await store.get_dataset("ds_a") is None  # not before it completes
    assert (await store.list_datasets(10, None, 0))[0] == []
    record, present = await store.finish_dataset_upload(pk, "ds_a", 8, "ab" * 32, 2, 1.5)
    assert not present
    assert (record.dataset_id, record.name, record.format, record.size, record.entry_count) == (
        "ds_a",
        "name of ds_a",
        1,
        8,
        2,
    )
    assert (record.sha256, record.span_s, record.created_at, record.chunks) == ("ab" * 32, 1.5, 5, 2)
    assert await store.get_dataset("ds_a") == record
    assert await store.read_dataset_chunks(record.pk, 0, 10) == [b"one\n", b"two\n"]
    assert await store.read_dataset_chunks(record.pk, 1, 10) == [b"two\n"]
    assert await store.read_dataset_chunks(record.pk, 0, 1) == [b"one\n"]
    assert await store.get_dataset("ds_missing") is None


async def test_dataset_same_id_again_keeps_one_copy(store: Store) -> None:
    first, _ = await store.finish_dataset_upload(await upload(store, "ds_a", [b"x"]), "ds_a", 1, "s", 1, 0.0)
    again = await upload(store, "ds_a", [b"x"], created=9)
    record, present = await store.finish_dataset_upload(again, "ds_a", 1, "s", 1, 0.0)
    assert present and record.pk == first.pk and record.created_at == 1
    assert await store.read_dataset_chunks(again, 0, 10) == []  # the second copy is gone
    assert len((await store.list_datasets(10, None, 0))[0]) == 1


async def test_dataset_discarded_uploads_leave_nothing(store: Store) -> None:
    kept, _ = await store.finish_dataset_upload(await upload(store, "ds_k", [b"k"]), "ds_k", 1, "s", 1, 0.0)
    pk = await upload(store, "ds_a", [b"x", b"y"])
    await store.discard_dataset_upload(pk)
    assert await store.read_dataset_chunks(pk, 0, 10) == []
    await store.discard_dataset_upload(kept.pk)  # a completed dataset is not an upload: it stays
    assert await store.read_dataset_chunks(kept.pk, 0, 10) == [b"k"]
    left = [await upload(store, f"ds_{i}", [b"z"]) for i in range(2)]
    assert await store.discard_incomplete_uploads() == 2
    assert all([await store.read_dataset_chunks(p, 0, 10) == [] for p in left])
    assert await store.get_dataset("ds_k") is not None
    with pytest.raises(LookupError):
        await store.finish_dataset_upload(pk, "ds_a", 2, "s", 1, 0.0)


async def test_dataset_chunks_are_unique_and_bounded(store: Store) -> None:
    pk = await upload(store, "ds_a", [b"x"])
    with pytest.raises(INTEGRITY_ERRORS):
        await store.append_dataset_chunk(pk, 0, b"again")
    with pytest.raises(ValueError, match="at most"):
        await store.append_dataset_chunk(pk, 1, b"x" * ((1 << 20) + 1))
    with pytest.raises(INTEGRITY_ERRORS):
        await store.append_dataset_chunk(pk + 100, 0, b"no such upload")


async def test_list_datasets_pages_newest_first_and_by_format(store: Store) -> None:
    for i, (created, fmt) in enumerate([(1, 1), (3, 2), (3, 1), (2, 1)]):
        await store.finish_dataset_upload(
            await upload(store, f"ds_{i}", [b"x"], created=created, fmt=fmt), f"ds_{i}", 1, "s", 1, 0.0
        )
    page, after = await store.list_datasets(2, None, 0)
    assert [d.dataset_id for d in page] == ["ds_2", "ds_1"] and after is not None
    page, after = await store.list_datasets(2, after, 0)
    assert [d.dataset_id for d in page] == ["ds_3", "ds_0"] and after is None
    assert [d.dataset_id for d in (await store.list_datasets(10, None, 1))[0]] == ["ds_2", "ds_3", "ds_0"]
    assert [d.dataset_id for d in (await store.list_datasets(10, None, 5))[0]] == []


async def test_delete_dataset_refused_while_an_active_run_refers_to_it(store: Store) -> None:
    record, _ = await store.finish_dataset_upload(await upload(store, "ds_abc", [b"x"]), "ds_abc", 1, "s", 1, 0.0)
    run = await new_run(store, "run_a", spec_json='{"workload": {"trace": {"datasetId": "ds_abc"}}}')
    await new_run(store, "run_other", spec_json='{"workload": {"tokenizerId": "ds_other"}}')
    assert await store.delete_dataset("ds_abc") == (True, "run_a")
    await store.update_run(run.pk, state=RunState.RUNNING)
    assert await store.delete_dataset("ds_abc") == (True, "run_a")
    await store.finish_run(run.pk, RunState.SUCCEEDED, "", 10)
    assert await store.delete_dataset("ds_abc") == (True, "")
    assert await store.get_dataset("ds_abc") is None
    assert await store.read_dataset_chunks(record.pk, 0, 10) == []
    assert await store.delete_dataset("ds_abc") == (False, "")


async def test_tables_without_the_reasoning_and_conversation_columns_read_them_as_zeros(store: Store) -> None:
    """A batch stored before the last columns existed (13 of them, as in older databases)
    reads back with those columns 0, beside a batch that has them all."""
    run = await new_run(store)
    a = await new_assignment(store, run.pk, "asg_a")
    old, old_itl = sample_table(3, seed=1)
    old = old[: len(columnar.LEGACY_COLUMNS)]
    new, new_itl = sample_table(2, sent0=T0 + 5 * 10**9, seed=2)
    new[COL["first_reasoning_ns"]] = new[COL["first_token_ns"]]
    new[COL["first_answer_ns"]] = new[COL["first_token_ns"]] + 10**6
    new[COL["reasoning_tokens"]] = [1, 2]
    new[COL["cached_prompt_tokens"]] = [5, 6]
    new[COL["session_id"]] = [7, 7]
    new[COL["turn_index"]] = [1, 2]
    await store.ingest_batches([batch(a, run.pk, 1, old, old_itl), batch(a, run.pk, 2, new, new_itl)])
    data = await snapshot_of(store, "load_stage_samples", run.pk, 0)
    assert isinstance(data, repo.StageSamples)
    cols = data.columns
    for name in columnar.SAMPLE_COLUMNS[len(columnar.LEGACY_COLUMNS) :]:
        assert getattr(cols, name).tolist() == [0, 0, 0, *new[COL[name]].tolist()], name
    assert np.array_equal(cols.sent_unix_ns[:3], old[COL["sent_unix_ns"]])
    assert cols.session_group.tolist() == [a] * 5
    exported = await store.export_page(run.pk, 0, 10, True)
    assert [r[3] for r in exported] == cols.sent_unix_ns.tolist()
