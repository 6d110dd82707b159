"""Repository functions: each one is a whole job for `Database.write`/`Database.read`.

They run on a worker thread inside a transaction and return plain dataclasses, never
Peewee model instances, so nothing lazy leaks back to the event loop.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import cast

import numpy as np
from peewee import IntegrityError, fn

from common.metrics import SampleColumns
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

# RunState values (mirrors loadtest.v1.RunState; the store does not import protos).
PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED, INTERRUPTED = 1, 2, 3, 4, 5, 6
FINAL_STATES = frozenset({SUCCEEDED, FAILED, CANCELLED, INTERRUPTED})
OK_STATUS = 1
WARMUP_FLAG = 2


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

    @property
    def is_final(self) -> bool:
        return self.state in FINAL_STATES


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
    columns: tuple[Sequence[int], ...]  # in SAMPLE_COLUMNS order, minus run/stage/batch
    errors: Sequence[str]
    itl_ns: bytes
    server_scrapes: Sequence[ScrapeRow] = ()


@dataclass(frozen=True)
class IngestOutcome:
    new: bool
    ok: int
    failed: int
    output_tokens: int


SAMPLE_COLUMNS = (
    "sent_unix_ns",
    "queue_delay_ns",
    "first_byte_ns",
    "first_token_ns",
    "last_token_ns",
    "done_ns",
    "prompt_tokens",
    "output_tokens",
    "status",
    "flags",
    "itl_count",
    "requested_input_tokens",
    "requested_output_tokens",
)
_INSERT_SAMPLE = (
    "INSERT INTO samples (run_pk, stage_idx, batch_pk, "
    + ", ".join(SAMPLE_COLUMNS)
    + ", error) VALUES ("
    + ", ".join("?" * (len(SAMPLE_COLUMNS) + 4))
    + ")"
)


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
) -> tuple[RunRecord, bool]:
    """Create a run; with a request_id already used, return that run and False."""
    if request_id:
        existing = RunRow.get_or_none(RunRow.request_id == request_id)
        if existing is not None:
            return _record(existing), False
    try:
        with database_proxy.atomic():
            row = RunRow.create(
                run_id=run_id,
                request_id=request_id or None,
                display_name=display_name,
                model=model,
                state=PENDING,
                spec_json=spec_json,
                created_at=now_ns,
            )
            StageRow.insert_many(
                [{"run": row.pk, "idx": i, "name": n} for i, n in enumerate(stage_names)]
            ).execute()
            if secret:  # the target's credentials (see controller/domain/secrets.py)
                RunSecretRow.create(run=row.pk, target_api_key=secret)
            if dataset_json:
                database_proxy.execute_sql(
                    "INSERT INTO run_datasets (run_pk, entries_json) VALUES (?, ?)", (row.pk, dataset_json)
                )
    except IntegrityError:
        if request_id:  # lost a race with the same request_id
            return _record(RunRow.get(RunRow.request_id == request_id)), False
        raise
    return _record(row), True


def get_run(run_id: str) -> RunRecord | None:
    row = RunRow.get_or_none(RunRow.run_id == run_id)
    return _record(row) if row is not None else None


def get_run_dataset(run_pk: int) -> str:
    row = database_proxy.execute_sql("SELECT entries_json FROM run_datasets WHERE run_pk = ?", (run_pk,)).fetchone()
    return str(row[0]) if row else ""


def get_run_secret(run_pk: int) -> str:
    row = RunSecretRow.get_or_none(RunSecretRow.run == run_pk)
    return row.target_api_key if row is not None else ""


def list_runs(
    page_size: int, after: tuple[int, int] | None, state: int, model: str
) -> tuple[list[RunRecord], tuple[int, int] | None]:
    """Newest first; `after` is the (created_at, pk) of the previous page's last run."""
    query = RunRow.select()
    if state:
        query = query.where(RunRow.state == state)
    if model:
        query = query.where(RunRow.model == model)
    if after is not None:
        created, pk = after
        query = query.where(
            (RunRow.created_at < created) | ((RunRow.created_at == created) & (RunRow.pk < pk))
        )
    rows = list(query.order_by(RunRow.created_at.desc(), RunRow.pk.desc()).limit(page_size + 1))
    more = len(rows) > page_size
    rows = rows[:page_size]
    cursor = (rows[-1].created_at, rows[-1].pk) if more and rows else None
    return [_record(r) for r in rows], cursor


def update_run(run_pk: int, **fields: object) -> None:
    RunRow.update(**fields).where(RunRow.pk == run_pk).execute()


@erases_secrets
def finish_run(run_pk: int, state: int, reason: str, now_ns: int) -> None:
    """Move a run to a final state and erase its target API key."""
    RunRow.update(state=state, state_reason=reason, ended_at=now_ns).where(
        RunRow.pk == run_pk
    ).execute()
    RunSecretRow.delete().where(RunSecretRow.run == run_pk).execute()


@erases_secrets
def delete_run(run_pk: int) -> None:
    # Children first in bulk: cascading through 1M sample rows one by one is slow.
    database_proxy.execute_sql("DELETE FROM samples WHERE run_pk = ?", (run_pk,))
    delete_run_scrapes(run_pk)
    RunRow.delete().where(RunRow.pk == run_pk).execute()


@erases_secrets
def interrupt_running(reason: str, now_ns: int) -> list[str]:
    """At start-up: runs left RUNNING by a previous controller become INTERRUPTED."""
    rows = list(RunRow.select(RunRow.pk, RunRow.run_id).where(RunRow.state == RUNNING))
    for row in rows:
        finish_run(row.pk, INTERRUPTED, reason, now_ns)
        RunEventRow.create(run=row.pk, time_ns=now_ns, kind="run_interrupted", message=reason)
    return [r.run_id for r in rows]


def pending_run_ids() -> list[str]:
    query = RunRow.select(RunRow.run_id).where(RunRow.state == PENDING)
    return [r.run_id for r in query.order_by(RunRow.created_at, RunRow.pk)]


def count_runs_by_state() -> dict[int, int]:
    """Number of runs in each state (for the metrics endpoint; uses the state index)."""
    query = RunRow.select(RunRow.state, fn.COUNT(RunRow.pk)).group_by(RunRow.state).tuples()
    return {int(state): int(n) for state, n in cast(Iterable[tuple[int, int]], query)}


def set_stage_time(run_pk: int, idx: int, *, started_at: int | None = None, ended_at: int | None = None) -> None:
    fields = {k: v for k, v in (("started_at", started_at), ("ended_at", ended_at)) if v is not None}
    StageRow.update(**fields).where((StageRow.run == run_pk) & (StageRow.idx == idx)).execute()


# --- events -----------------------------------------------------------------------------


def add_event(run_pk: int, kind: str, message: str, now_ns: int) -> EventRecord:
    row = RunEventRow.create(run=run_pk, time_ns=now_ns, kind=kind, message=message)
    return EventRecord(row.pk, now_ns, kind, message)


def list_events(run_pk: int, after_pk: int = 0) -> list[EventRecord]:
    query = RunEventRow.select().where((RunEventRow.run == run_pk) & (RunEventRow.pk > after_pk))
    return [EventRecord(r.pk, r.time_ns, r.kind, r.message) for r in query.order_by(RunEventRow.pk)]


# --- agents and assignments -------------------------------------------------------------


def record_agent_connected(
    session_id: str, name: str, labels: dict[str, str], version: str, now_ns: int
) -> None:
    AgentRow.create(
        session_id=session_id,
        name=name,
        labels_json=json.dumps(labels, sort_keys=True),
        version=version,
        connected_at=now_ns,
    )


def record_agent_disconnected(session_id: str, now_ns: int) -> None:
    AgentRow.update(disconnected_at=now_ns).where(AgentRow.session_id == session_id).execute()


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
    )
    return int(row.pk)


def lookup_assignment(assignment_id: str) -> tuple[int, int, str, int] | None:
    """(assignment pk, run pk, run id, stage index) of a stored assignment."""
    row = (
        AssignmentRow.select(AssignmentRow.pk, AssignmentRow.stage_idx, RunRow.pk, RunRow.run_id)
        .join(RunRow)
        .where(AssignmentRow.assignment_id == assignment_id)
        .first()
    )
    if row is None:
        return None
    return int(row.pk), int(row.run.pk), str(row.run.run_id), int(row.stage_idx)


def update_assignment(assignment_pk: int, **fields: object) -> None:
    AssignmentRow.update(**fields).where(AssignmentRow.pk == assignment_pk).execute()


# --- samples ----------------------------------------------------------------------------


def ingest_batches(batches: Sequence[BatchIngest]) -> list[IngestOutcome]:
    """Store batches (one transaction for all); a batch seen before is skipped."""
    conn = database_proxy.connection()
    outcomes: list[IngestOutcome] = []
    per_run: dict[int, list[int]] = {}
    for b in batches:
        cur = conn.execute(
            "INSERT OR IGNORE INTO sample_batches "
            "(assignment_pk, batch_seq, run_pk, stage_idx, n_samples, itl_ns) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            (b.assignment_pk, b.batch_seq, b.run_pk, b.stage_idx, len(b.errors), b.itl_ns),
        )
        if cur.rowcount == 0:
            outcomes.append(IngestOutcome(False, 0, 0, 0))
            continue
        batch_pk = cur.lastrowid
        n = len(b.errors)
        conn.executemany(
            _INSERT_SAMPLE,
            zip(
                itertools.repeat(b.run_pk, n),
                itertools.repeat(b.stage_idx, n),
                itertools.repeat(batch_pk, n),
                *b.columns,
                b.errors,
                strict=True,
            ),
        )
        if b.server_scrapes:
            insert_scrapes(conn, b.run_pk, b.stage_idx, batch_pk, b.server_scrapes)
        status = b.columns[SAMPLE_COLUMNS.index("status")]
        flags = b.columns[SAMPLE_COLUMNS.index("flags")]
        out_tokens = b.columns[SAMPLE_COLUMNS.index("output_tokens")]
        ok = failed = tokens = 0
        for s, f, t in zip(status, flags, out_tokens, strict=True):
            if f & WARMUP_FLAG:
                continue
            if s == OK_STATUS:
                ok += 1
                tokens += t
            else:
                failed += 1
        totals = per_run.setdefault(b.run_pk, [0, 0, 0])
        totals[0] += ok
        totals[1] += failed
        totals[2] += tokens
        outcomes.append(IngestOutcome(True, ok, failed, tokens))
    for run_pk, (ok, failed, tokens) in per_run.items():
        conn.execute(
            "UPDATE runs SET requests_ok = requests_ok + ?, requests_failed = requests_failed + ?,"
            " output_tokens = output_tokens + ? WHERE pk = ?",
            (ok, failed, tokens, run_pk),
        )
    return outcomes


_COLUMN_SQL = (
    "SELECT s.sent_unix_ns, s.queue_delay_ns, s.first_token_ns, s.last_token_ns, s.done_ns, s.prompt_tokens,"
    " s.output_tokens, s.status, s.flags, s.itl_count, s.requested_input_tokens, s.requested_output_tokens,"
    " b.assignment_pk FROM samples s JOIN sample_batches b ON b.pk = s.batch_pk"
    " WHERE s.run_pk = ? AND s.stage_idx = ? ORDER BY s.rowid"
)


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


def load_stage_samples(run_pk: int, stage_idx: int) -> StageSamples:
    """Every stored sample of one stage as numpy columns (inter-token gaps included)."""
    conn = database_proxy.connection()
    rows = conn.execute(_COLUMN_SQL, (run_pk, stage_idx)).fetchall()
    blobs = conn.execute(
        "SELECT itl_ns FROM sample_batches WHERE run_pk = ? AND stage_idx = ? ORDER BY pk", (run_pk, stage_idx)
    ).fetchall()
    assignments = conn.execute(
        "SELECT pk, agent_name, max_loop_lag_ms, max_cpu_percent FROM assignments"
        " WHERE run_pk = ? AND stage_idx = ? ORDER BY pk",
        (run_pk, stage_idx),
    ).fetchall()
    names = sorted({a[1] for a in assignments})
    lag = max((float(a[2]) for a in assignments), default=0.0)
    cpu = max((float(a[3]) for a in assignments), default=0.0)
    if not rows:
        empty = np.zeros(0, dtype=np.int64)
        return StageSamples(SampleColumns.empty(), empty, names, empty, empty, lag, cpu)
    data = np.array(rows, dtype=np.int64)
    itl = np.frombuffer(b"".join(b[0] for b in blobs), dtype="<i8").astype(np.int64)
    name_of = {int(a[0]): names.index(a[1]) for a in assignments}
    agent = np.array([name_of[int(pk)] for pk in data[:, 12]], dtype=np.int64)
    columns = SampleColumns(
        sent_unix_ns=data[:, 0],
        queue_delay_ns=data[:, 1],
        first_token_ns=data[:, 2],
        last_token_ns=data[:, 3],
        done_ns=data[:, 4],
        prompt_tokens=data[:, 5],
        output_tokens=data[:, 6],
        status=data[:, 7],
        flags=data[:, 8],
        itl_count=data[:, 9],
        itl_ns=itl,
    )
    return StageSamples(columns, agent, names, data[:, 10], data[:, 11], lag, cpu)


def load_stage_columns(run_pk: int, stage_idx: int) -> SampleColumns:
    return load_stage_samples(run_pk, stage_idx).columns


_EXPORT_SQL = (
    "SELECT s.rowid, s.stage_idx, a.agent_name, s.sent_unix_ns, s.queue_delay_ns, s.first_byte_ns,"
    " s.first_token_ns, s.last_token_ns, s.done_ns, s.prompt_tokens, s.output_tokens, s.status, s.flags,"
    " s.itl_count, s.error, a.agent_session FROM samples s JOIN sample_batches b ON b.pk = s.batch_pk"
    " JOIN assignments a ON a.pk = b.assignment_pk WHERE s.run_pk = ? AND s.rowid > ?"
)


def export_page(run_pk: int, after_rowid: int, limit: int, include_warmup: bool) -> list[tuple[object, ...]]:
    """One page of samples in storage order (the first column is the rowid cursor)."""
    sql = _EXPORT_SQL + ("" if include_warmup else f" AND (s.flags & {WARMUP_FLAG}) = 0") + " ORDER BY s.rowid LIMIT ?"
    return list(database_proxy.connection().execute(sql, (run_pk, after_rowid, limit)).fetchall())


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
    row = database_proxy.execute_sql("SELECT COUNT(*) FROM samples WHERE run_pk = ?", (run_pk,))
    return int(row.fetchone()[0])


def failure_summary(run_pk: int) -> tuple[int, int, str]:
    """(ok, failed, one error message) over the run's non-warmup samples."""
    ok, failed = database_proxy.execute_sql(
        "SELECT requests_ok, requests_failed FROM runs WHERE pk = ?", (run_pk,)
    ).fetchone()
    row = database_proxy.execute_sql(
        "SELECT error FROM samples WHERE run_pk = ? AND status != ? LIMIT 1", (run_pk, OK_STATUS)
    ).fetchone()
    return int(ok), int(failed), str(row[0]) if row else ""


# --- fleet: synchronized starts, lost agents ---------------------------------------------

ASSIGNMENT_LOST_STATE = -1  # assignments.state of an assignment whose agent was lost


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
        AssignmentSummary(str(r[0]), str(r[1]), int(r[2]), int(r[3]), int(r[4]), r[5], r[6], bool(r[7]))
        for r in rows
    ]


def stage_reduced_load_reason(run_pk: int, stage_idx: int) -> str:
    row = StageRow.get_or_none((StageRow.run == run_pk) & (StageRow.idx == stage_idx))
    return str(row.reduced_load_reason) if row is not None else ""


def set_stage_reduced_load(run_pk: int, stage_idx: int, reason: str) -> None:
    StageRow.update(reduced_load_reason=reason).where((StageRow.run == run_pk) & (StageRow.idx == stage_idx)).execute()
