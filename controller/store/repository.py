"""Repository functions: each one is a whole job for `Database.write`/`Database.read`, run by
the SQLite store (controller/store/sqlite.py) for the operation of the same name.

They run on a worker thread inside a transaction and return plain dataclasses, never
Peewee model instances, so nothing lazy leaks back to the event loop.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TypedDict, Unpack, cast

import numpy as np
from peewee import IntegrityError, fn

from common.codes import FINAL_RUN_STATES, RunState
from common.metrics import SampleColumns
from controller.store import columnar
from controller.store.database import erases_secrets
from controller.store.models import (
    AgentRow,
    AssignmentRow,
    RunEventRow,
    RunRow,
    RunSecretRow,
    StageRow,
    database_proxy,
)
from controller.store.server_metrics import ScrapeRow, delete_run_scrapes, insert_scrapes

# The per-sample columns, in stored order (how they are stored: controller/store/columnar.py).
SAMPLE_COLUMNS = columnar.SAMPLE_COLUMNS
_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class RunRecord:
    pk: int
    run_id: str
    display_name: str
    model: str
    state: int
    state_reason: str
    spec_json: str
    created_at: int
    started_at: int | None
    ended_at: int | None
    current_stage: int
    requests_ok: int
    requests_failed: int
    output_tokens: int
    spec_pb: bytes = b""  # the spec as protobuf binary (empty: in spec_json only, see migration 7)
    series: str = ""  # RunSpec.series (migration 12)
    group_id: str = ""  # its group of repeats (migration 13); "" for a run created alone
    repeat_index: int = 0  # which repeat of its group, from 0

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_RUN_STATES


@dataclass(frozen=True)
class EventRecord:
    pk: int
    time_ns: int
    kind: str
    message: str


@dataclass(frozen=True)
class BatchIngest:
    """One sample batch to store, with the ids the controller resolved in memory."""

    assignment_pk: int
    run_pk: int
    stage_idx: int
    batch_seq: int
    columns: np.ndarray  # (len(SAMPLE_COLUMNS), n) int64, rows in SAMPLE_COLUMNS order
    errors: Sequence[tuple[int, str]]  # (offset, message) of the samples that carry a message
    itl_ns: bytes
    server_scrapes: Sequence[ScrapeRow] = ()

    @property
    def n_samples(self) -> int:
        return int(self.columns.shape[1])

    @functools.cached_property
    def metric_columns(self) -> SampleColumns:
        """The batch as metric columns (views of `columns` and `itl_ns`, built once: the live
        view, the abort checks and the live Prometheus histograms all read them)."""
        # A table may predate the last columns (controller/store/columnar.py); these are the first.
        col = dict(zip(SAMPLE_COLUMNS, self.columns, strict=False))
        return SampleColumns(
            sent_unix_ns=col["sent_unix_ns"],
            queue_delay_ns=col["queue_delay_ns"],
            first_token_ns=col["first_token_ns"],
            last_token_ns=col["last_token_ns"],
            done_ns=col["done_ns"],
            prompt_tokens=col["prompt_tokens"],
            output_tokens=col["output_tokens"],
            status=col["status"],
            flags=col["flags"],
            itl_count=col["itl_count"],
            itl_ns=np.frombuffer(self.itl_ns, dtype="<i8"),
        )


@dataclass(frozen=True)
class IngestOutcome:
    new: bool
    ok: int
    failed: int
    output_tokens: int


def _record(row: RunRow) -> RunRecord:
    return RunRecord(
        pk=row.pk,
        run_id=row.run_id,
        display_name=row.display_name,
        model=row.model,
        state=row.state,
        state_reason=row.state_reason,
        spec_json=row.spec_json,
        created_at=row.created_at,
        started_at=row.started_at,
        ended_at=row.ended_at,
        current_stage=row.current_stage,
        requests_ok=row.requests_ok,
        requests_failed=row.requests_failed,
        output_tokens=row.output_tokens,
        spec_pb=bytes(row.spec_pb or b""),
        series=row.series,
        group_id=row.group_id or "",
        repeat_index=row.repeat_index,
    )


# --- runs -------------------------------------------------------------------------------


def insert_run(
    run_id: str,
    request_id: str | None,
    display_name: str,
    model: str,
    spec_json: str,
    stage_names: Sequence[str],
    secret: str,
    now_ns: int,
    dataset_json: str = "",
    spec_pb: bytes = b"",
    series: str = "",
) -> tuple[RunRecord, bool]:
    """Create a run; with a request_id already used, return that run and False."""
    if request_id:
        existing = RunRow.get_or_none(RunRow.request_id == request_id)
        if existing is not None:
            return _record(existing), False
    try:
        with database_proxy.atomic():
            row = _create_run(
                run_id,
                request_id,
                display_name,
                model,
                spec_json,
                spec_pb,
                stage_names,
                secret,
                now_ns,
                dataset_json,
                series,
            )
    except IntegrityError:
        if request_id:  # lost a race with the same request_id
            return _record(RunRow.get(RunRow.request_id == request_id)), False
        raise
    return _record(row), True


def _create_run(
    run_id: str,
    request_id: str | None,
    display_name: str,
    model: str,
    spec_json: str,
    spec_pb: bytes,
    stage_names: Sequence[str],
    secret: str,
    now_ns: int,
    dataset_json: str,
    series: str,
    group_id: str | None = None,
    repeat_index: int = 0,
) -> RunRow:
    row = RunRow.create(
        run_id=run_id,
        request_id=request_id or None,
        display_name=display_name,
        model=model,
        state=RunState.PENDING,
        spec_json=spec_json,
        spec_pb=spec_pb,
        created_at=now_ns,
        series=series,
        group_id=group_id,
        repeat_index=repeat_index,
    )
    StageRow.insert_many([{"run": row.pk, "idx": i, "name": n} for i, n in enumerate(stage_names)]).execute()
    if secret:  # the target's credentials (see controller/domain/access/secrets.py)
        RunSecretRow.create(run=row.pk, target_api_key=secret)
    if dataset_json:
        database_proxy.execute_sql(
            "INSERT INTO run_datasets (run_pk, entries_json) VALUES (?, ?)", (row.pk, dataset_json)
        )
    return row


@dataclass(frozen=True)
class NewRepeat:
    """One run of a group to create: its id and its stored spec (each repeat has its own seed)."""

    run_id: str
    spec_json: str
    spec_pb: bytes


def insert_group(
    group_id: str,
    request_id: str | None,
    display_name: str,
    model: str,
    repeats: Sequence[NewRepeat],
    stage_names: Sequence[str],
    secret: str,
    now_ns: int,
    dataset_json: str = "",
    series: str = "",
) -> tuple[list[RunRecord], bool]:
    """Create a group's runs together (all or none), PENDING, `repeat_index` 0.. in the order
    given; the request_id is kept on the first. With a request_id already used: the runs of
    the group it created (or the single run) and False."""

    def existing() -> list[RunRecord] | None:
        row = RunRow.get_or_none(RunRow.request_id == request_id)
        if row is None:
            return None
        return list_group(row.group_id) if row.group_id else [_record(row)]

    if request_id:
        found = existing()
        if found is not None:
            return found, False
    try:
        with database_proxy.atomic():
            rows = [
                _create_run(
                    r.run_id,
                    request_id if i == 0 else None,
                    display_name,
                    model,
                    r.spec_json,
                    r.spec_pb,
                    stage_names,
                    secret,
                    now_ns,
                    dataset_json,
                    series,
                    group_id,
                    i,
                )
                for i, r in enumerate(repeats)
            ]
    except IntegrityError:
        found = existing() if request_id else None
        if found is not None:  # lost a race with the same request_id
            return found, False
        raise
    return [_record(row) for row in rows], True


def list_group(group_id: str) -> list[RunRecord]:
    """The runs of a group, in repeat order; [] for an unknown group (the partial index
    runs_group finds them)."""
    rows = database_proxy.connection().execute(
        f"SELECT {_RUN_FIELDS} FROM runs WHERE group_id = ? ORDER BY repeat_index", (group_id,)
    )
    return [RunRecord(*row) for row in rows]


def get_run(run_id: str) -> RunRecord | None:
    # Plain SQL, as list_runs: GetRun, WatchRun and every run-scoped call start here, and a
    # Peewee query object per call cost far more than the query (BENCHMARKS.md, "GetRun").
    row = database_proxy.connection().execute(f"SELECT {_RUN_FIELDS} FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    return RunRecord(*row) if row is not None else None


def get_run_dataset(run_pk: int) -> str:
    row = database_proxy.execute_sql("SELECT entries_json FROM run_datasets WHERE run_pk = ?", (run_pk,)).fetchone()
    return str(row[0]) if row else ""


def get_run_secret(run_pk: int) -> str:
    row = RunSecretRow.get_or_none(RunSecretRow.run == run_pk)
    return row.target_api_key if row is not None else ""


def list_runs(
    page_size: int,
    after: tuple[int, int] | None,
    state: int,
    model: str,
    max_bytes: int,
    series: str = "",
    group_id: str = "",
) -> tuple[list[RunRecord], tuple[int, int] | None]:
    """Newest first; `after` is the (created_at, pk) of the previous page's last run. The page
    ends after `page_size` runs or before the run that would take its stored specs past
    `max_bytes` (at least one run), whichever comes first.

    Plain SQL rather than Peewee model rows (a page of model instances cost milliseconds);
    the row-value keyset `(created_at, pk) < (?, ?)` lets SQLite seek in the indexes on
    (created_at DESC, pk DESC), (state, created_at DESC, pk DESC), (model, created_at DESC,
    pk DESC), (series, created_at DESC, pk DESC) and (group_id, created_at DESC, pk DESC) and
    stop after the page (see EXPLAIN QUERY PLAN in tests/integration/test_columnar_store.py).
    Rows are fetched one at a time, so the runs past the byte budget are never read.
    """
    where: list[str] = []
    params: list[object] = []
    if state:
        where.append("state = ?")
        params.append(state)
    if model:
        where.append("model = ?")
        params.append(model)
    if series:
        where.append("series = ?")
        params.append(series)
    if group_id:
        where.append("group_id = ?")
        params.append(group_id)
    if after is not None:
        where.append("(created_at, pk) < (?, ?)")
        params.extend(after)
    sql = (
        f"SELECT {_RUN_FIELDS} FROM runs"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY created_at DESC, pk DESC LIMIT ?"
    )
    cursor = database_proxy.connection().execute(sql, (*params, page_size + 1))
    records: list[RunRecord] = []
    used = 0
    more = False
    for row in cursor:
        record = RunRecord(*row)
        size = listed_bytes(record)
        if len(records) == page_size or (records and used + size > max_bytes):
            more = True
            break
        records.append(record)
        used += size
    cursor.close()
    last = (records[-1].created_at, records[-1].pk) if more and records else None
    return records, last


def series_runs(series: str, limit: int) -> list[RunRecord]:
    """The series' `limit` most recent runs, newest first (the index on (series, created_at
    DESC, pk DESC) serves it)."""
    cursor = database_proxy.connection().execute(
        f"SELECT {_RUN_FIELDS} FROM runs WHERE series = ? ORDER BY created_at DESC, pk DESC LIMIT ?", (series, limit)
    )
    return [RunRecord(*row) for row in cursor]


def listed_bytes(record: RunRecord) -> int:
    """About what the run takes in a ListRuns page: its stored spec plus the other fields."""
    return len(record.spec_pb or record.spec_json) + len(record.state_reason) + 128


# spec_json only for runs without the binary spec: every reader prefers spec_pb, and reading
# both doubled the bytes of every run read.
_RUN_FIELDS = (
    "pk, run_id, display_name, model, state, state_reason,"
    " CASE WHEN length(spec_pb) > 0 THEN '' ELSE spec_json END, created_at, started_at, ended_at,"
    " current_stage, requests_ok, requests_failed, output_tokens, spec_pb, series, IFNULL(group_id, ''), repeat_index"
)


class RunChanges(TypedDict, total=False):
    """The columns of a run that `update_run` may set."""

    state: int
    state_reason: str
    started_at: int
    ended_at: int
    current_stage: int


def update_run(run_pk: int, **fields: Unpack[RunChanges]) -> None:
    RunRow.update(**fields).where(RunRow.pk == run_pk).execute()


@erases_secrets
def finish_run(run_pk: int, state: int, reason: str, now_ns: int) -> None:
    """Move a run to a final state and erase its target API key."""
    RunRow.update(state=state, state_reason=reason, ended_at=now_ns).where(RunRow.pk == run_pk).execute()
    RunSecretRow.delete().where(RunSecretRow.run == run_pk).execute()


@erases_secrets
def delete_run(run_pk: int) -> None:
    # Children first in bulk: cascading through many rows one by one is slow.
    database_proxy.execute_sql(
        "DELETE FROM sample_errors WHERE batch_pk IN (SELECT pk FROM sample_batches WHERE run_pk = ?)", (run_pk,)
    )
    delete_run_scrapes(run_pk)
    # A baseline names its run by id (it may name a group instead, so there is no foreign key).
    database_proxy.execute_sql("DELETE FROM baselines WHERE run_id = (SELECT run_id FROM runs WHERE pk = ?)", (run_pk,))
    # The rest (stages, events, batches, its stored result in run_results, ...) goes with the
    # run: foreign keys are enforced (PRAGMAS in database.py), every child is ON DELETE CASCADE.
    RunRow.delete().where(RunRow.pk == run_pk).execute()


@erases_secrets
def interrupt_running(reason: str, now_ns: int) -> list[str]:
    """At start-up: runs left RUNNING by a previous controller become INTERRUPTED."""
    rows = list(RunRow.select(RunRow.pk, RunRow.run_id).where(RunRow.state == RunState.RUNNING))
    for row in rows:
        finish_run(row.pk, RunState.INTERRUPTED, reason, now_ns)
        RunEventRow.create(run=row.pk, time_ns=now_ns, kind="run_interrupted", message=reason)
    return [r.run_id for r in rows]


def pending_run_ids() -> list[str]:
    query = RunRow.select(RunRow.run_id).where(RunRow.state == RunState.PENDING)
    return [r.run_id for r in query.order_by(RunRow.created_at, RunRow.pk)]


def count_runs_by_state() -> dict[int, int]:
    """Number of runs in each state (for the metrics endpoint; uses the state index)."""
    query = RunRow.select(RunRow.state, fn.COUNT(RunRow.pk)).group_by(RunRow.state).tuples()
    return {int(state): int(n) for state, n in cast(Iterable[tuple[int, int]], query)}


def append_stage(run_pk: int, idx: int, name: str, spec_json: str, spec_pb: bytes) -> None:
    """A stage planned while the run runs (a capacity search's probe): its row, and the run's
    stored spec (both forms) replaced by one whose `stages` ends with it, in one transaction."""
    with database_proxy.atomic():
        RunRow.update(spec_json=spec_json, spec_pb=spec_pb).where(RunRow.pk == run_pk).execute()
        StageRow.insert(run=run_pk, idx=idx, name=name).execute()


def set_stage_time(run_pk: int, idx: int, *, started_at: int | None = None, ended_at: int | None = None) -> None:
    fields = {k: v for k, v in (("started_at", started_at), ("ended_at", ended_at)) if v is not None}
    StageRow.update(**fields).where((StageRow.run == run_pk) & (StageRow.idx == idx)).execute()


@dataclass(frozen=True)
class StageRecord:
    """One stage of a run as stored (times: controller clock)."""

    idx: int
    name: str
    started_at: int | None
    ended_at: int | None
    reduced_load_reason: str


def list_stages(run_pk: int) -> list[StageRecord]:
    """A run's stages in order (for tools and tests: the domain reads what it needs of them
    through the results' reads)."""
    rows = database_proxy.execute_sql(
        "SELECT idx, name, started_at, ended_at, reduced_load_reason FROM stages WHERE run_pk = ? ORDER BY idx",
        (run_pk,),
    ).fetchall()
    return [StageRecord(int(r[0]), str(r[1]), r[2], r[3], str(r[4])) for r in rows]


# --- events -----------------------------------------------------------------------------


def add_event(run_pk: int, kind: str, message: str, now_ns: int) -> EventRecord:
    row = RunEventRow.create(run=run_pk, time_ns=now_ns, kind=kind, message=message)
    return EventRecord(row.pk, now_ns, kind, message)


def list_events(run_pk: int, after_pk: int = 0) -> list[EventRecord]:
    rows = database_proxy.connection().execute(
        "SELECT pk, time_ns, kind, message FROM run_events WHERE run_pk = ? AND pk > ? ORDER BY pk", (run_pk, after_pk)
    )
    return [EventRecord(*r) for r in rows]


# --- agents and assignments -------------------------------------------------------------


def record_agent_connected(session_id: str, name: str, labels: dict[str, str], version: str, now_ns: int) -> None:
    AgentRow.create(
        session_id=session_id,
        name=name,
        labels_json=json.dumps(labels, sort_keys=True),
        version=version,
        connected_at=now_ns,
    )


def record_agent_disconnected(session_id: str, now_ns: int) -> None:
    AgentRow.update(disconnected_at=now_ns).where(AgentRow.session_id == session_id).execute()


@dataclass(frozen=True)
class AgentRecord:
    """One agent session as stored."""

    session_id: str
    name: str
    labels: dict[str, str]
    version: str
    connected_at: int
    disconnected_at: int | None


def get_agent(session_id: str) -> AgentRecord | None:
    """An agent session (for tools and tests: the domain keeps live sessions in memory)."""
    row = database_proxy.execute_sql(
        "SELECT session_id, name, labels_json, version, connected_at, disconnected_at FROM agents WHERE session_id = ?",
        (session_id,),
    ).fetchone()
    if row is None:
        return None
    return AgentRecord(str(row[0]), str(row[1]), json.loads(row[2]), str(row[3]), int(row[4]), row[5])


def insert_assignment(
    assignment_id: str,
    run_pk: int,
    stage_idx: int,
    agent_session: str,
    agent_name: str,
    concurrency: int,
    requests: int,
    state: int,
    now_ns: int,
    resume_token_sha256: str = "",
) -> int:
    row = AssignmentRow.create(
        assignment_id=assignment_id,
        run=run_pk,
        stage_idx=stage_idx,
        agent_session=agent_session,
        agent_name=agent_name,
        concurrency=concurrency,
        requests=requests,
        state=state,
        created_at=now_ns,
        resume_token_sha256=resume_token_sha256,
    )
    return int(row.pk)


@dataclass(frozen=True)
class StoredAssignment:
    """What the ingest path needs of a stored assignment (one that is no longer live)."""

    pk: int
    run_pk: int
    run_id: str
    stage_idx: int
    resume_token_sha256: str
    created_at: int  # controller clock
    ended_at: int | None  # controller clock
    clock_offset_ns: int  # controller clock minus the agent's, when it was assigned


def lookup_assignment(assignment_id: str) -> StoredAssignment | None:
    row = database_proxy.execute_sql(
        "SELECT a.pk, a.run_pk, r.run_id, a.stage_idx, a.resume_token_sha256, a.created_at, a.ended_at,"
        " a.clock_offset_ns FROM assignments a JOIN runs r ON r.pk = a.run_pk WHERE a.assignment_id = ?",
        (assignment_id,),
    ).fetchone()
    if row is None:
        return None
    return StoredAssignment(
        int(row[0]),
        int(row[1]),
        str(row[2]),
        int(row[3]),
        str(row[4]),
        int(row[5]),
        None if row[6] is None else int(row[6]),
        int(row[7] or 0),
    )


@dataclass(frozen=True)
class AssignmentRecord:
    """Every stored column of an assignment (for tools and tests; times: controller clock)."""

    pk: int
    assignment_id: str
    run_pk: int
    stage_idx: int
    agent_session: str
    agent_name: str
    concurrency: int
    requests: int
    state: int
    message: str
    batch_count: int | None
    requests_sent: int
    created_at: int
    ended_at: int | None
    max_loop_lag_ms: float
    max_cpu_percent: float
    planned_start_ns: int | None
    started_ns: int | None
    clock_offset_ns: int
    takeover: int
    resume_token_sha256: str


def get_assignment(assignment_id: str) -> AssignmentRecord | None:
    row = database_proxy.execute_sql(
        "SELECT pk, assignment_id, run_pk, stage_idx, agent_session, agent_name, concurrency, requests, state,"
        " message, batch_count, requests_sent, created_at, ended_at, max_loop_lag_ms, max_cpu_percent,"
        " planned_start_ns, started_ns, clock_offset_ns, takeover, resume_token_sha256 FROM assignments"
        " WHERE assignment_id = ?",
        (assignment_id,),
    ).fetchone()
    return AssignmentRecord(*row) if row is not None else None


class AssignmentChanges(TypedDict, total=False):
    """The columns of an assignment that `update_assignment` may set (times: controller clock)."""

    state: int
    message: str
    batch_count: int
    requests_sent: int
    ended_at: int
    planned_start_ns: int
    started_ns: int
    clock_offset_ns: int
    takeover: int  # 0 or 1


def update_assignment(assignment_pk: int, **fields: Unpack[AssignmentChanges]) -> None:
    AssignmentRow.update(**fields).where(AssignmentRow.pk == assignment_pk).execute()


# --- samples ----------------------------------------------------------------------------


def ingest_batches(batches: Sequence[BatchIngest]) -> list[IngestOutcome]:
    """Store batches (one transaction for all); a batch seen before is skipped.

    One `sample_batches` row per batch holds its columns as one blob (controller/store/
    columnar.py); messages of the samples that carry one go to `sample_errors`, all of the
    transaction's in one executemany.
    """
    conn = database_proxy.connection()
    outcomes: list[IngestOutcome] = []
    per_run: dict[int, list[int]] = {}
    errors: list[tuple[int, int, str]] = []
    for b in batches:
        cur = conn.execute(
            "INSERT OR IGNORE INTO sample_batches "
            "(assignment_pk, batch_seq, run_pk, stage_idx, n_samples, itl_ns, sample_columns) "
            "VALUES (?, ?, ?, ?, ?, ?, ?)",
            (b.assignment_pk, b.batch_seq, b.run_pk, b.stage_idx, b.n_samples, b.itl_ns, columnar.pack(b.columns)),
        )
        if cur.rowcount == 0:
            outcomes.append(IngestOutcome(False, 0, 0, 0))
            continue
        batch_pk = int(cur.lastrowid or 0)
        errors.extend((batch_pk, offset, message) for offset, message in b.errors)
        if b.server_scrapes:
            insert_scrapes(conn, b.run_pk, b.stage_idx, batch_pk, b.server_scrapes)
        ok, failed, tokens = columnar.tally(b.columns)
        totals = per_run.setdefault(b.run_pk, [0, 0, 0])
        totals[0] += ok
        totals[1] += failed
        totals[2] += tokens
        outcomes.append(IngestOutcome(True, ok, failed, tokens))
    if errors:
        conn.executemany("INSERT INTO sample_errors (batch_pk, idx, error) VALUES (?, ?, ?)", errors)
    for run_pk, (ok, failed, tokens) in per_run.items():
        conn.execute(
            "UPDATE runs SET requests_ok = requests_ok + ?, requests_failed = requests_failed + ?,"
            " output_tokens = output_tokens + ? WHERE pk = ?",
            (ok, failed, tokens, run_pk),
        )
    return outcomes


@dataclass(frozen=True)
class StageSamples:
    """The stored samples of one stage, with who sent them."""

    columns: SampleColumns
    agent: np.ndarray  # per sample: index into `agent_names`
    agent_names: list[str]
    requested_input_tokens: np.ndarray
    requested_output_tokens: np.ndarray
    max_loop_lag_ms: float
    max_cpu_percent: float
    first_byte_ns: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    # Per sample: index into `windows`, the (created_at, ended_at or None, clock_offset_ns) of
    # the assignment that sent it (controller clock), and the stage's end (None: not ended).
    assignment: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    windows: list[tuple[int, int | None, int]] = field(default_factory=list)
    stage_ended_at: int | None = None


def load_stage_samples(run_pk: int, stage_idx: int) -> StageSamples:
    """Every stored sample of one stage as numpy columns (inter-token gaps included), agent by
    agent (by name, then assignment, then batch): the stage's batch blobs copied into place
    (controller/store/columnar.py). Metrics do not depend on the order of samples."""
    conn = database_proxy.connection()
    rows = conn.execute(
        "SELECT pk, agent_name, max_loop_lag_ms, max_cpu_percent, created_at, ended_at, clock_offset_ns"
        " FROM assignments WHERE run_pk = ? AND stage_idx = ? ORDER BY pk",
        (run_pk, stage_idx),
    ).fetchall()
    assignments = [
        StageAssignment(
            int(r[0]),
            str(r[1]),
            float(r[2]),
            float(r[3]),
            int(r[4]),
            None if r[5] is None else int(r[5]),
            int(r[6] or 0),
        )
        for r in rows
    ]
    ended = conn.execute("SELECT ended_at FROM stages WHERE run_pk = ? AND idx = ?", (run_pk, stage_idx)).fetchone()
    table, itl, batch_assignments, counts = columnar.read_stage(conn, run_pk, stage_idx, reading_order(assignments))
    stage_ended_at = None if ended is None or ended[0] is None else int(ended[0])
    return assemble_stage_samples(assignments, stage_ended_at, table, itl, batch_assignments, counts)


@dataclass(frozen=True)
class StageAssignment:
    """What `load_stage_samples` needs of each assignment of the stage."""

    pk: int
    agent_name: str
    max_loop_lag_ms: float
    max_cpu_percent: float
    created_at: int
    ended_at: int | None
    clock_offset_ns: int


def reading_order(assignments: Sequence[StageAssignment]) -> list[int]:
    """The assignment pks in the order a stage's samples are laid out: by agent name, then pk."""
    return [a.pk for a in sorted(assignments, key=lambda a: (a.agent_name, a.pk))]


def assemble_stage_samples(
    assignments: Sequence[StageAssignment],
    stage_ended_at: int | None,
    table: columnar.Table,
    itl: columnar.Table,
    batch_assignments: Sequence[int],
    counts: Sequence[int],
) -> StageSamples:
    """A stage's StageSamples from its assignments (pk order) and its samples read in
    `reading_order`: the (19, n) table, the pooled gaps, each batch's assignment pk and sample
    count. Shared by both stores (how the samples were kept is theirs; this is the layout)."""
    names = sorted({a.agent_name for a in assignments})
    lag = max((a.max_loop_lag_ms for a in assignments), default=0.0)
    cpu = max((a.max_cpu_percent for a in assignments), default=0.0)
    if not table.shape[1]:
        empty = np.zeros(0, dtype=np.int64)
        return StageSamples(SampleColumns.empty(), empty, names, empty, empty, lag, cpu)
    name_of = {a.pk: names.index(a.agent_name) for a in assignments}
    agent = np.repeat(np.array([name_of[pk] for pk in batch_assignments], dtype=np.int64), counts)
    index_of = {a.pk: i for i, a in enumerate(assignments)}
    assignment = np.repeat(np.array([index_of[pk] for pk in batch_assignments], dtype=np.int64), counts)
    windows = [(a.created_at, a.ended_at, a.clock_offset_ns) for a in assignments]
    col = columnar.COL
    pks = np.array(batch_assignments, dtype=np.int64)
    optional = set(columnar.SAMPLE_COLUMNS[len(columnar.LEGACY_COLUMNS) :])
    columns = SampleColumns(
        # A column of the reasoning, cache and conversation columns that is all 0 (most stages)
        # goes in empty: SampleColumns then keeps one shared zero, copied by no selection.
        **{
            name: _EMPTY if name in optional and not table[col[name]].any() else table[col[name]]
            for name in SampleColumns.__dataclass_fields__
            if name in col
        },
        itl_ns=itl,
        # Session ids are unique per assignment: its pk (unique in the store) keys them.
        session_group=np.repeat(pks, counts),
    )
    return StageSamples(
        columns,
        agent,
        names,
        table[col["requested_input_tokens"]],
        table[col["requested_output_tokens"]],
        lag,
        cpu,
        first_byte_ns=table[col["first_byte_ns"]],
        assignment=assignment,
        windows=windows,
        stage_ended_at=stage_ended_at,
    )


def load_stage_columns(run_pk: int, stage_idx: int) -> SampleColumns:
    return load_stage_samples(run_pk, stage_idx).columns


def export_page(run_pk: int, after: int, limit: int, include_warmup: bool) -> list[tuple[object, ...]]:
    """One page of samples in storage order; the first column is the cursor of the sample (an
    int encoding its (batch pk, offset), see columnar.cursor) for the next page's `after`."""
    return columnar.export_rows(database_proxy.connection(), run_pk, after, limit, include_warmup)


def record_assignment_health(assignment_pk: int, max_loop_lag_ms: float, max_cpu_percent: float) -> None:
    AssignmentRow.update(max_loop_lag_ms=max_loop_lag_ms, max_cpu_percent=max_cpu_percent).where(
        AssignmentRow.pk == assignment_pk
    ).execute()


def stage_indexes_with_samples(run_pk: int) -> list[int]:
    rows = database_proxy.execute_sql(
        "SELECT DISTINCT stage_idx FROM sample_batches WHERE run_pk = ? ORDER BY stage_idx",
        (run_pk,),
    ).fetchall()
    return [int(r[0]) for r in rows]


def count_samples(run_pk: int) -> int:
    """Stored samples of a run (warmup included)."""
    row = database_proxy.execute_sql(
        "SELECT COALESCE(SUM(n_samples), 0) FROM sample_batches WHERE run_pk = ?", (run_pk,)
    )
    return int(row.fetchone()[0])


def sample_batches_version(run_pk: int) -> tuple[int, int]:
    """(stored batches, highest batch pk) of a run: changes whenever a batch is stored."""
    row = database_proxy.execute_sql(
        "SELECT COUNT(*), COALESCE(MAX(pk), 0) FROM sample_batches WHERE run_pk = ?", (run_pk,)
    ).fetchone()
    return int(row[0]), int(row[1])


# --- stored results ---------------------------------------------------------------------


@dataclass(frozen=True)
class StoredResult:
    """A final run's stored result (the bytes of a serialized loadtest.v1.RunResult, which the
    store does not decode) and the version of the run it was computed at."""

    state: int
    batches: int
    last_batch_pk: int
    format: int
    result: bytes

    @property
    def version(self) -> tuple[int, int, int]:
        """(state, stored batches, highest batch pk), as `sample_batches_version` reads them."""
        return self.state, self.batches, self.last_batch_pk


def get_run_result(run_pk: int) -> StoredResult | None:
    row = database_proxy.execute_sql(
        "SELECT state, batches, last_batch_pk, format, result FROM run_results WHERE run_pk = ?", (run_pk,)
    ).fetchone()
    if row is None:
        return None
    return StoredResult(int(row[0]), int(row[1]), int(row[2]), int(row[3]), bytes(row[4]))


def put_run_result(run_pk: int, run_id: str, stored: StoredResult) -> bool:
    """Store a run's result, replacing the one it had, in one statement; False if the run is
    gone (deleted while its result was being computed). The run id is checked with the pk: a
    pk freed by a delete can be given to the next run."""
    cur = database_proxy.execute_sql(
        "INSERT OR REPLACE INTO run_results (run_pk, state, batches, last_batch_pk, format, result)"
        " SELECT pk, ?, ?, ?, ?, ? FROM runs WHERE pk = ? AND run_id = ?",
        (stored.state, stored.batches, stored.last_batch_pk, stored.format, stored.result, run_pk, run_id),
    )
    return bool(cur.rowcount)


def failure_summary(run_pk: int) -> tuple[int, int, str]:
    """(ok, failed, one error message) over the run's non-warmup samples."""
    ok, failed = database_proxy.execute_sql(
        "SELECT requests_ok, requests_failed FROM runs WHERE pk = ?", (run_pk,)
    ).fetchone()
    row = database_proxy.execute_sql(
        "SELECT e.error FROM sample_batches b JOIN sample_errors e ON e.batch_pk = b.pk WHERE b.run_pk = ?"
        " ORDER BY b.pk, e.idx LIMIT 1",
        (run_pk,),
    ).fetchone()
    return int(ok), int(failed), str(row[0]) if row else ""


# --- fleet: synchronized starts, lost agents ---------------------------------------------


@dataclass(frozen=True)
class AssignmentSummary:
    """What the result needs to know about one assignment of a stage."""

    agent_name: str
    agent_session: str
    state: int
    requests_sent: int
    stored_samples: int
    planned_start_ns: int | None
    started_ns: int | None
    takeover: bool


def stage_assignments(run_pk: int, stage_idx: int) -> list[AssignmentSummary]:
    """Every assignment of a stage with its stored sample count, in creation order."""
    rows = database_proxy.execute_sql(
        "SELECT a.agent_name, a.agent_session, a.state, a.requests_sent,"
        " (SELECT COALESCE(SUM(b.n_samples), 0) FROM sample_batches b WHERE b.assignment_pk = a.pk),"
        " a.planned_start_ns, a.started_ns, a.takeover FROM assignments a"
        " WHERE a.run_pk = ? AND a.stage_idx = ? ORDER BY a.pk",
        (run_pk, stage_idx),
    ).fetchall()
    return [
        AssignmentSummary(str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5], r[6], bool(r[7])) for r in rows
    ]


def stage_reduced_load_reason(run_pk: int, stage_idx: int) -> str:
    row = StageRow.get_or_none((StageRow.run == run_pk) & (StageRow.idx == stage_idx))
    return str(row.reduced_load_reason) if row is not None else ""


def set_stage_reduced_load(run_pk: int, stage_idx: int, reason: str) -> None:
    StageRow.update(reduced_load_reason=reason).where((StageRow.run == run_pk) & (StageRow.idx == stage_idx)).execute()
