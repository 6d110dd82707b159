"""The store in memory: the same contract as the SQLite store in plain dicts, for unit tests of
the domain (no file, no threads).

The tables mirror the schema (controller/store/migrations.py) and keep its rules: unique ids,
references to runs and assignments that must exist (else peewee's IntegrityError, nothing
stored), a run deleted with everything that belongs to it, and new rows numbered as SQLite
numbers a rowid (one more than the largest in the table, so a pk freed by deleting the newest
row is given again, which is why results are stored under the pk *and* the run id). Samples are
kept as each batch's (19, n) int64 table (controller/store/columnar.py's layout, without the
blob), so results are computed by the same code as over SQLite (`read_snapshot`).

Every operation completes at once and then gives the event loop one turn, as a call to the
SQLite store suspends its caller until a thread has answered: code that runs between a call
and its answer runs here too. Nothing is shared with threads, so a snapshot is simply the
tables between two turns.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Concatenate, ParamSpec, TypeVar, Unpack

import numpy as np
from peewee import IntegrityError

from common.codes import RunState, SampleFlag
from controller.store import columnar
from controller.store.baselines import BaselineRecord
from controller.store.datasets import MAX_CHUNK_BYTES, DatasetRecord, DatasetsPage
from controller.store.interface import SnapshotReads, Store
from controller.store.repository import (
    AgentRecord,
    AssignmentChanges,
    AssignmentRecord,
    AssignmentSummary,
    BatchIngest,
    EventRecord,
    IngestOutcome,
    NewRepeat,
    RunChanges,
    RunRecord,
    StageAssignment,
    StageRecord,
    StageSamples,
    StoredAssignment,
    StoredResult,
    assemble_stage_samples,
    listed_bytes,
    reading_order,
)
from controller.store.security import AUDIT_RETENTION_EVENTS, AuditRecord, KeyRecord
from controller.store.server_metrics import (
    EVENT_SCRAPE_FAILED,
    EVENT_SCRAPE_RECOVERED,
    ScrapeRow,
    StageScrapes,
    StoredScrape,
)

T = TypeVar("T")
P = ParamSpec("P")
Row = TypeVar("Row")

_COL = columnar.COL
_EXPORTED = [_COL[c] for c in columnar.SAMPLE_COLUMNS[:11]]  # the sample columns of an export row
_EXPORTED_EXTRA = [_COL.get(c) for c in columnar.EXPORT_EXTRA_COLUMNS]  # after the session; None: 0


def _next_pk(table: dict[int, Row]) -> int:
    """The pk SQLite would give a new row: one more than the largest (rows are added in pk
    order, so the largest is the last)."""
    return next(reversed(table), 0) + 1


@dataclass
class _Run:
    pk: int
    run_id: str
    request_id: str | None
    display_name: str
    model: str
    spec_json: str
    spec_pb: bytes
    created_at: int
    state: int = RunState.PENDING
    state_reason: str = ""
    started_at: int | None = None
    ended_at: int | None = None
    current_stage: int = 0
    requests_ok: int = 0
    requests_failed: int = 0
    output_tokens: int = 0
    series: str = ""
    group_id: str = ""
    repeat_index: int = 0

    def record(self, *, spec_json: bool = False) -> RunRecord:
        """The run as read; the spec JSON only when asked for or when there is no binary spec
        (what repository.get_run and list_runs read)."""
        return RunRecord(
            self.pk,
            self.run_id,
            self.display_name,
            self.model,
            self.state,
            self.state_reason,
            self.spec_json if spec_json or not self.spec_pb else "",
            self.created_at,
            self.started_at,
            self.ended_at,
            self.current_stage,
            self.requests_ok,
            self.requests_failed,
            self.output_tokens,
            self.spec_pb,
            self.series,
            self.group_id,
            self.repeat_index,
        )


@dataclass
class _Stage:
    idx: int
    name: str
    started_at: int | None = None
    ended_at: int | None = None
    reduced_load_reason: str = ""


@dataclass
class _Assignment:
    pk: int
    assignment_id: str
    run_pk: int
    stage_idx: int
    agent_session: str
    agent_name: str
    concurrency: int
    requests: int
    state: int
    created_at: int
    resume_token_sha256: str
    message: str = ""
    batch_count: int | None = None
    requests_sent: int = 0
    ended_at: int | None = None
    max_loop_lag_ms: float = 0.0
    max_cpu_percent: float = 0.0
    planned_start_ns: int | None = None
    started_ns: int | None = None
    clock_offset_ns: int = 0
    takeover: int = 0


@dataclass(frozen=True)
class _Batch:
    pk: int
    assignment_pk: int
    batch_seq: int
    run_pk: int
    stage_idx: int
    table: columnar.Table  # (19, n), read-only
    itl: columnar.Table  # the batch's gaps, read-only
    errors: dict[int, str]  # offset -> message, for the samples that carry one

    @property
    def n_samples(self) -> int:
        return int(self.table.shape[1])


@dataclass(frozen=True)
class _Scrape:
    stored: StoredScrape
    run_pk: int
    stage_idx: int
    batch_pk: int
    values: tuple[tuple[str, str, int, float], ...]


def _frozen(values: np.ndarray) -> columnar.Table:
    copy = np.array(values, dtype=np.int64)
    copy.setflags(write=False)
    return copy


def _all_columns(table: np.ndarray) -> np.ndarray:
    """A table with every SAMPLE_COLUMNS row: one that predates the last columns gets them as
    0, as the SQLite store reads such a blob (controller/store/columnar.py)."""
    missing = len(columnar.SAMPLE_COLUMNS) - table.shape[0]
    if missing <= 0:
        return table
    return np.concatenate([table, np.zeros((missing, table.shape[1]), dtype=np.int64)])


class MemoryTables:
    """The tables and every operation on them, synchronous (they also serve as the
    `SnapshotReads` of `MemoryStore.read_snapshot`)."""

    def __init__(self) -> None:
        self.runs: dict[int, _Run] = {}
        self.stages: dict[int, list[_Stage]] = {}  # by run pk, in idx order
        self.secrets: dict[int, str] = {}
        self.datasets: dict[int, str] = {}
        self.events: dict[int, tuple[int, EventRecord]] = {}  # pk -> (run pk, event)
        self.agents: dict[str, AgentRecord] = {}
        self.assignments: dict[int, _Assignment] = {}
        self.batches: dict[int, _Batch] = {}
        self.scrapes: dict[int, _Scrape] = {}
        self.results: dict[int, StoredResult] = {}
        self.keys: dict[str, KeyRecord] = {}
        self.audit: dict[int, AuditRecord] = {}
        self.baselines: dict[str, BaselineRecord] = {}
        # Uploaded datasets by pk (dataset_id "" while the upload is under way) and their chunks.
        self.uploaded: dict[int, DatasetRecord] = {}
        self.uploaded_chunks: dict[int, dict[int, bytes]] = {}
        # the unique keys of the tables above
        self._run_by_id: dict[str, int] = {}
        self._run_by_request: dict[str, int] = {}
        self._assignment_by_id: dict[str, int] = {}
        self._batch_by_seq: dict[tuple[int, int], int] = {}

    # --- runs, stages, events ----------------------------------------------------------

    def insert_run(
        self,
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
        if request_id and request_id in self._run_by_request:
            return self.runs[self._run_by_request[request_id]].record(spec_json=True), False
        if run_id in self._run_by_id:
            raise IntegrityError("UNIQUE constraint failed: runs.run_id")
        pk = _next_pk(self.runs)
        run = self.runs[pk] = _Run(
            pk, run_id, request_id or None, display_name, model, spec_json, spec_pb, now_ns, series=series
        )
        self._run_by_id[run_id] = pk
        if request_id:
            self._run_by_request[request_id] = pk
        self.stages[pk] = [_Stage(i, name) for i, name in enumerate(stage_names)]
        if secret:
            self.secrets[pk] = secret
        if dataset_json:
            self.datasets[pk] = dataset_json
        return run.record(spec_json=True), True

    def insert_group(
        self,
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
        if request_id and request_id in self._run_by_request:
            first = self.runs[self._run_by_request[request_id]]
            return (self.list_group(first.group_id) if first.group_id else [first.record()]), False
        ids = [r.run_id for r in repeats]
        if len(set(ids)) != len(ids) or any(run_id in self._run_by_id for run_id in ids):
            raise IntegrityError("UNIQUE constraint failed: runs.run_id")  # before any is stored
        records: list[RunRecord] = []
        for i, r in enumerate(repeats):
            record, _ = self.insert_run(
                r.run_id,
                request_id if i == 0 else None,
                display_name,
                model,
                r.spec_json,
                stage_names,
                secret,
                now_ns,
                dataset_json,
                r.spec_pb,
                series,
            )
            run = self.runs[record.pk]
            run.group_id, run.repeat_index = group_id, i
            records.append(run.record(spec_json=True))
        return records, True

    def get_run(self, run_id: str) -> RunRecord | None:
        pk = self._run_by_id.get(run_id)
        return self.runs[pk].record() if pk is not None else None

    def list_group(self, group_id: str) -> list[RunRecord]:
        runs = sorted(
            (r for r in self.runs.values() if group_id and r.group_id == group_id), key=lambda r: r.repeat_index
        )
        return [r.record() for r in runs]

    def get_run_dataset(self, run_pk: int) -> str:
        return self.datasets.get(run_pk, "")

    def get_run_secret(self, run_pk: int) -> str:
        return self.secrets.get(run_pk, "")

    def list_runs(
        self,
        page_size: int,
        after: tuple[int, int] | None,
        state: int,
        model: str,
        max_bytes: int,
        series: str = "",
        group_id: str = "",
    ) -> tuple[list[RunRecord], tuple[int, int] | None]:
        chosen = [
            r
            for r in self.runs.values()
            if (not state or r.state == state)
            and (not model or r.model == model)
            and (not series or r.series == series)
            and (not group_id or r.group_id == group_id)
            and (after is None or (r.created_at, r.pk) < after)
        ]
        chosen.sort(key=lambda r: (r.created_at, r.pk), reverse=True)
        records: list[RunRecord] = []
        used = 0
        more = False
        for run in chosen[: page_size + 1]:
            record = run.record()
            size = listed_bytes(record)
            if len(records) == page_size or (records and used + size > max_bytes):
                more = True
                break
            records.append(record)
            used += size
        last = (records[-1].created_at, records[-1].pk) if more and records else None
        return records, last

    def update_run(self, run_pk: int, **fields: Unpack[RunChanges]) -> None:
        run = self.runs.get(run_pk)
        if run is not None:
            for name, value in fields.items():
                setattr(run, name, value)

    def finish_run(self, run_pk: int, state: int, reason: str, now_ns: int) -> None:
        self.update_run(run_pk, state=state, state_reason=reason, ended_at=now_ns)
        self.secrets.pop(run_pk, None)

    def delete_run(self, run_pk: int) -> None:
        run = self.runs.pop(run_pk, None)
        if run is None:
            return
        del self._run_by_id[run.run_id]
        if run.request_id:
            del self._run_by_request[run.request_id]
        for table in (self.stages, self.secrets, self.datasets, self.results):
            table.pop(run_pk, None)
        self.events = {pk: e for pk, e in self.events.items() if e[0] != run_pk}
        for a in [a for a in self.assignments.values() if a.run_pk == run_pk]:
            del self.assignments[a.pk], self._assignment_by_id[a.assignment_id]
        for b in [b for b in self.batches.values() if b.run_pk == run_pk or b.assignment_pk not in self.assignments]:
            del self.batches[b.pk], self._batch_by_seq[(b.assignment_pk, b.batch_seq)]
        self.scrapes = {pk: s for pk, s in self.scrapes.items() if s.run_pk != run_pk and s.batch_pk in self.batches}
        self.baselines = {name: b for name, b in self.baselines.items() if b.run_id != run.run_id}

    def interrupt_running(self, reason: str, now_ns: int) -> list[str]:
        running = [r for r in self.runs.values() if r.state == RunState.RUNNING]
        for run in running:
            self.finish_run(run.pk, RunState.INTERRUPTED, reason, now_ns)
            self.add_event(run.pk, "run_interrupted", reason, now_ns)
        return [r.run_id for r in running]

    def pending_run_ids(self) -> list[str]:
        pending = sorted(
            (r for r in self.runs.values() if r.state == RunState.PENDING), key=lambda r: (r.created_at, r.pk)
        )
        return [r.run_id for r in pending]

    def count_runs_by_state(self) -> dict[int, int]:
        return dict(Counter(r.state for r in self.runs.values()))

    def _stage(self, run_pk: int, idx: int) -> _Stage | None:
        return next((s for s in self.stages.get(run_pk, ()) if s.idx == idx), None)

    def set_stage_time(
        self, run_pk: int, idx: int, *, started_at: int | None = None, ended_at: int | None = None
    ) -> None:
        if started_at is None and ended_at is None:
            raise ValueError("set_stage_time needs started_at or ended_at")  # SQLite: an UPDATE without SET
        stage = self._stage(run_pk, idx)
        if stage is not None:
            stage.started_at = started_at if started_at is not None else stage.started_at
            stage.ended_at = ended_at if ended_at is not None else stage.ended_at

    def append_stage(self, run_pk: int, idx: int, name: str, spec_json: str, spec_pb: bytes) -> None:
        run = self.runs.get(run_pk)
        if run is None:
            raise IntegrityError("FOREIGN KEY constraint failed")
        if self._stage(run_pk, idx) is not None:
            raise IntegrityError("UNIQUE constraint failed: stages.run_pk, stages.idx")
        run.spec_json, run.spec_pb = spec_json, spec_pb
        self.stages[run_pk].append(_Stage(idx, name))

    def set_stage_reduced_load(self, run_pk: int, stage_idx: int, reason: str) -> None:
        stage = self._stage(run_pk, stage_idx)
        if stage is not None:
            stage.reduced_load_reason = reason

    def stage_reduced_load_reason(self, run_pk: int, stage_idx: int) -> str:
        stage = self._stage(run_pk, stage_idx)
        return stage.reduced_load_reason if stage is not None else ""

    def list_stages(self, run_pk: int) -> list[StageRecord]:
        return [
            StageRecord(s.idx, s.name, s.started_at, s.ended_at, s.reduced_load_reason)
            for s in self.stages.get(run_pk, ())
        ]

    def add_event(self, run_pk: int, kind: str, message: str, now_ns: int) -> EventRecord:
        if run_pk not in self.runs:
            raise IntegrityError("FOREIGN KEY constraint failed")
        pk = _next_pk(self.events)
        event = EventRecord(pk, now_ns, kind, message)
        self.events[pk] = (run_pk, event)
        return event

    def list_events(self, run_pk: int, after_pk: int = 0) -> list[EventRecord]:
        return [e for pk, (run, e) in self.events.items() if run == run_pk and pk > after_pk]

    # --- agents and assignments -------------------------------------------------------

    def record_agent_connected(
        self, session_id: str, name: str, labels: dict[str, str], version: str, now_ns: int
    ) -> None:
        if session_id in self.agents:
            raise IntegrityError("UNIQUE constraint failed: agents.session_id")
        self.agents[session_id] = AgentRecord(session_id, name, dict(sorted(labels.items())), version, now_ns, None)

    def record_agent_disconnected(self, session_id: str, now_ns: int) -> None:
        agent = self.agents.get(session_id)
        if agent is not None:
            self.agents[session_id] = dataclasses.replace(agent, disconnected_at=now_ns)

    def get_agent(self, session_id: str) -> AgentRecord | None:
        agent = self.agents.get(session_id)
        return dataclasses.replace(agent, labels=dict(agent.labels)) if agent is not None else None

    def insert_assignment(
        self,
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
        if assignment_id in self._assignment_by_id:
            raise IntegrityError("UNIQUE constraint failed: assignments.assignment_id")
        if run_pk not in self.runs:
            raise IntegrityError("FOREIGN KEY constraint failed")
        pk = _next_pk(self.assignments)
        self.assignments[pk] = _Assignment(
            pk,
            assignment_id,
            run_pk,
            stage_idx,
            agent_session,
            agent_name,
            concurrency,
            requests,
            state,
            now_ns,
            resume_token_sha256,
        )
        self._assignment_by_id[assignment_id] = pk
        return pk

    def lookup_assignment(self, assignment_id: str) -> StoredAssignment | None:
        pk = self._assignment_by_id.get(assignment_id)
        if pk is None:
            return None
        a = self.assignments[pk]
        return StoredAssignment(
            a.pk,
            a.run_pk,
            self.runs[a.run_pk].run_id,
            a.stage_idx,
            a.resume_token_sha256,
            a.created_at,
            a.ended_at,
            a.clock_offset_ns,
        )

    def get_assignment(self, assignment_id: str) -> AssignmentRecord | None:
        pk = self._assignment_by_id.get(assignment_id)
        if pk is None:
            return None
        values = dataclasses.asdict(self.assignments[pk])
        return AssignmentRecord(**values)

    def update_assignment(self, assignment_pk: int, **fields: Unpack[AssignmentChanges]) -> None:
        a = self.assignments.get(assignment_pk)
        if a is not None:
            for name, value in fields.items():
                setattr(a, name, value)

    def record_assignment_health(self, assignment_pk: int, max_loop_lag_ms: float, max_cpu_percent: float) -> None:
        a = self.assignments.get(assignment_pk)
        if a is not None:
            a.max_loop_lag_ms, a.max_cpu_percent = max_loop_lag_ms, max_cpu_percent

    def _stage_assignments(self, run_pk: int, stage_idx: int) -> list[_Assignment]:
        return [a for a in self.assignments.values() if a.run_pk == run_pk and a.stage_idx == stage_idx]

    def stage_assignments(self, run_pk: int, stage_idx: int) -> list[AssignmentSummary]:
        stored = Counter[int]()
        for b in self.batches.values():
            stored[b.assignment_pk] += b.n_samples
        return [
            AssignmentSummary(
                a.agent_name,
                a.agent_session,
                a.state,
                a.requests_sent,
                stored[a.pk],
                a.planned_start_ns,
                a.started_ns,
                bool(a.takeover),
            )
            for a in self._stage_assignments(run_pk, stage_idx)
        ]

    # --- samples ----------------------------------------------------------------------

    def ingest_batches(self, batches: Sequence[BatchIngest]) -> list[IngestOutcome]:
        # All or none, as one transaction: the references are checked before anything is stored.
        for b in batches:
            if b.assignment_pk not in self.assignments or b.run_pk not in self.runs:
                raise IntegrityError("FOREIGN KEY constraint failed")
        outcomes: list[IngestOutcome] = []
        for b in batches:
            if (b.assignment_pk, b.batch_seq) in self._batch_by_seq:
                outcomes.append(IngestOutcome(False, 0, 0, 0))
                continue
            pk = _next_pk(self.batches)
            self.batches[pk] = _Batch(
                pk,
                b.assignment_pk,
                b.batch_seq,
                b.run_pk,
                b.stage_idx,
                _frozen(_all_columns(b.columns)),
                _frozen(np.frombuffer(b.itl_ns, dtype="<i8")),
                dict(b.errors),
            )
            self._batch_by_seq[(b.assignment_pk, b.batch_seq)] = pk
            self._insert_scrapes(b.run_pk, b.stage_idx, pk, b.server_scrapes)
            ok, failed, tokens = columnar.tally(b.columns)
            run = self.runs[b.run_pk]
            run.requests_ok += ok
            run.requests_failed += failed
            run.output_tokens += tokens
            outcomes.append(IngestOutcome(True, ok, failed, tokens))
        return outcomes

    def _insert_scrapes(self, run_pk: int, stage_idx: int, batch_pk: int, scrapes: Sequence[ScrapeRow]) -> None:
        """As controller/store/server_metrics.py `insert_scrapes`: an event when an endpoint
        starts failing (or fails differently) and when it recovers."""
        now_ns = time.time_ns()
        for s in scrapes:
            same = [
                x.stored
                for x in self.scrapes.values()
                if x.run_pk == run_pk and x.stage_idx == stage_idx and x.stored.endpoint == s.endpoint
            ]
            previous = max(same, key=lambda x: (x.time_unix_ns, x.pk), default=None)
            before = None if previous is None else previous.error
            if s.error and s.error != before:
                message = f"stage {stage_idx}: scraping {s.endpoint} failed: {s.error}"
                self.add_event(run_pk, EVENT_SCRAPE_FAILED, message, now_ns)
            elif not s.error and before:
                message = f"stage {stage_idx}: scraping {s.endpoint} works again"
                self.add_event(run_pk, EVENT_SCRAPE_RECOVERED, message, now_ns)
            pk = _next_pk(self.scrapes)
            stored = StoredScrape(pk, s.endpoint, s.time_unix_ns, s.error)
            self.scrapes[pk] = _Scrape(stored, run_pk, stage_idx, batch_pk, tuple(s.values))

    def load_stage_scrapes(self, run_pk: int, stage_idx: int) -> StageScrapes:
        mine = [s for s in self.scrapes.values() if s.run_pk == run_pk and s.stage_idx == stage_idx]
        sums: dict[tuple[int, str, int], float] = {}
        for s in mine:
            for name, _labels, kind, value in s.values:
                key = (s.stored.pk, name, kind)
                sums[key] = sums.get(key, 0.0) + value
        ordered = sorted((s.stored for s in mine), key=lambda x: (x.time_unix_ns, x.pk))
        return StageScrapes(ordered, [(*key, total) for key, total in sorted(sums.items())])

    def _run_batches(self, run_pk: int) -> list[_Batch]:
        return [b for b in self.batches.values() if b.run_pk == run_pk]

    def stage_indexes_with_samples(self, run_pk: int) -> list[int]:
        return sorted({b.stage_idx for b in self._run_batches(run_pk)})

    def load_stage_samples(self, run_pk: int, stage_idx: int) -> StageSamples:
        assignments = [
            StageAssignment(
                a.pk, a.agent_name, a.max_loop_lag_ms, a.max_cpu_percent, a.created_at, a.ended_at, a.clock_offset_ns
            )
            for a in self._stage_assignments(run_pk, stage_idx)
        ]
        stage = self._stage(run_pk, stage_idx)
        in_stage = [b for b in self._run_batches(run_pk) if b.stage_idx == stage_idx]
        chosen: list[_Batch] = []
        for assignment_pk in reading_order(assignments):
            chosen += sorted((b for b in in_stage if b.assignment_pk == assignment_pk), key=lambda b: b.batch_seq)
        none = np.zeros((len(columnar.SAMPLE_COLUMNS), 0), dtype=np.int64)
        table = np.concatenate([none, *(b.table for b in chosen)], axis=1)
        itl = np.concatenate([none[0], *(b.itl for b in chosen)])
        return assemble_stage_samples(
            assignments,
            stage.ended_at if stage is not None else None,
            table,
            itl,
            [b.assignment_pk for b in chosen],
            [b.n_samples for b in chosen],
        )

    def export_page(self, run_pk: int, after: int, limit: int, include_warmup: bool) -> list[tuple[object, ...]]:
        after_pk, after_offset = columnar.split_cursor(after)
        out: list[tuple[object, ...]] = []
        for b in self._run_batches(run_pk):
            if b.pk < after_pk:
                continue
            a = self.assignments[b.assignment_pk]
            for i in range(after_offset + 1 if b.pk == after_pk else 0, b.n_samples):
                if len(out) >= limit:
                    return out
                if include_warmup or not b.table[_COL["flags"], i] & SampleFlag.WARMUP:
                    values = [int(b.table[c, i]) for c in _EXPORTED]
                    out.append(
                        (
                            columnar.cursor(b.pk, i),
                            b.stage_idx,
                            a.agent_name,
                            *values,
                            b.errors.get(i, ""),
                            a.agent_session,
                            *(0 if c is None else int(b.table[c, i]) for c in _EXPORTED_EXTRA),
                        )
                    )
        return out

    def count_samples(self, run_pk: int) -> int:
        return sum(b.n_samples for b in self._run_batches(run_pk))

    def sample_batches_version(self, run_pk: int) -> tuple[int, int]:
        pks = [b.pk for b in self._run_batches(run_pk)]
        return len(pks), max(pks, default=0)

    def failure_summary(self, run_pk: int) -> tuple[int, int, str]:
        run = self.runs[run_pk]
        first = next((b.errors[min(b.errors)] for b in self._run_batches(run_pk) if b.errors), "")
        return run.requests_ok, run.requests_failed, first

    def get_run_result(self, run_pk: int) -> StoredResult | None:
        return self.results.get(run_pk)

    def put_run_result(self, run_pk: int, run_id: str, stored: StoredResult) -> bool:
        run = self.runs.get(run_pk)
        if run is None or run.run_id != run_id:
            return False
        self.results[run_pk] = stored
        return True

    # --- keys and audit ---------------------------------------------------------------

    def insert_key(self, record: KeyRecord) -> None:
        if record.key_id in self.keys:
            raise IntegrityError("UNIQUE constraint failed: api_keys.key_id")
        self.keys[record.key_id] = record

    def get_key(self, key_id: str) -> KeyRecord | None:
        return self.keys.get(key_id)

    def list_keys(self, include_revoked: bool) -> list[KeyRecord]:
        keys = [k for k in self.keys.values() if include_revoked or k.revoked_at is None]
        keys.sort(key=lambda k: k.key_id)
        keys.sort(key=lambda k: k.created_at, reverse=True)  # stable: key id ascending among equal times
        return keys

    def get_keys(self, key_ids: Sequence[str]) -> list[KeyRecord]:
        return [self.keys[k] for k in sorted(set(key_ids)) if k in self.keys]

    def revoke_key(self, key_id: str, now_ns: int) -> KeyRecord | None:
        record = self.keys.get(key_id)
        if record is not None and record.revoked_at is None:
            record = self.keys[key_id] = dataclasses.replace(record, revoked_at=now_ns)
        return record

    def any_keys(self) -> bool:
        return bool(self.keys)

    def insert_audit(self, events: Sequence[AuditRecord], retention: int = AUDIT_RETENTION_EVENTS) -> int:
        for e in events:
            pk = _next_pk(self.audit)
            self.audit[pk] = dataclasses.replace(e, pk=pk)
        newest = next(reversed(self.audit), 0)
        for pk in [pk for pk in self.audit if pk <= newest - retention]:
            del self.audit[pk]
        return newest

    def set_audit_counts(self, counts: Sequence[tuple[int, int]]) -> None:
        for count, pk in counts:
            if pk in self.audit:
                self.audit[pk] = dataclasses.replace(self.audit[pk], count=count)

    def list_audit(self, limit: int, before_pk: int | None, key_id: str, run_id: str) -> list[AuditRecord]:
        rows = [
            r
            for r in reversed(self.audit.values())
            if (not key_id or r.key_id == key_id)
            and (not run_id or r.run_id == run_id)
            and (before_pk is None or r.pk < before_pk)
        ]
        return rows[:limit]

    # --- series ------------------------------------------------------------------------

    def set_baseline(self, record: BaselineRecord) -> None:
        self.baselines[record.name] = record

    def get_baseline(self, name: str) -> BaselineRecord | None:
        return self.baselines.get(name)

    def list_baselines(self) -> list[BaselineRecord]:
        return [self.baselines[name] for name in sorted(self.baselines)]

    def delete_baseline(self, name: str) -> bool:
        return self.baselines.pop(name, None) is not None

    def series_runs(self, series: str, limit: int) -> list[RunRecord]:
        chosen = sorted((r for r in self.runs.values() if r.series == series), key=lambda r: (r.created_at, r.pk))
        return [r.record() for r in reversed(chosen[-limit:])] if limit > 0 else []

    # --- uploaded datasets -------------------------------------------------------------

    def begin_dataset_upload(self, name: str, fmt: int, now_ns: int) -> int:
        pk = _next_pk(self.uploaded)
        self.uploaded[pk] = DatasetRecord(pk, "", name, fmt, 0, "", 0, 0.0, now_ns)
        self.uploaded_chunks[pk] = {}
        return pk

    def append_dataset_chunk(self, dataset_pk: int, seq: int, blob: bytes) -> None:
        if len(blob) > MAX_CHUNK_BYTES:
            raise ValueError(f"a dataset chunk is at most {MAX_CHUNK_BYTES} bytes")
        chunks = self.uploaded_chunks.get(dataset_pk)
        if chunks is None:
            raise IntegrityError("FOREIGN KEY constraint failed")
        if seq in chunks:
            raise IntegrityError("UNIQUE constraint failed: dataset_chunks.dataset_pk, dataset_chunks.seq")
        chunks[seq] = bytes(blob)

    def _dataset(self, dataset_id: str) -> DatasetRecord | None:
        return next((d for d in self.uploaded.values() if d.dataset_id == dataset_id and dataset_id), None)

    def finish_dataset_upload(
        self, dataset_pk: int, dataset_id: str, size: int, sha256: str, entry_count: int, span_s: float
    ) -> tuple[DatasetRecord, bool]:
        stored = self._dataset(dataset_id)
        if stored is not None:
            self.discard_dataset_upload(dataset_pk)
            return stored, True
        row = self.uploaded.get(dataset_pk)
        if row is None or row.dataset_id:
            raise LookupError(f"no upload {dataset_pk} under way")
        self.uploaded[dataset_pk] = dataclasses.replace(
            row, dataset_id=dataset_id, size=size, sha256=sha256, entry_count=entry_count, span_s=span_s
        )
        found = self.get_dataset(dataset_id)
        assert found is not None
        return found, False

    def discard_dataset_upload(self, dataset_pk: int) -> None:
        row = self.uploaded.get(dataset_pk)
        if row is not None and not row.dataset_id:
            del self.uploaded[dataset_pk]
            del self.uploaded_chunks[dataset_pk]

    def discard_incomplete_uploads(self) -> int:
        pks = [pk for pk, d in self.uploaded.items() if not d.dataset_id]
        for pk in pks:
            self.discard_dataset_upload(pk)
        return len(pks)

    def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        d = self._dataset(dataset_id)
        return dataclasses.replace(d, chunks=len(self.uploaded_chunks[d.pk])) if d is not None else None

    def list_datasets(self, limit: int, after: tuple[int, int] | None, fmt: int) -> DatasetsPage:
        rows = sorted(
            (
                d
                for d in self.uploaded.values()
                if d.dataset_id and (not fmt or d.format == fmt) and (after is None or (d.created_at, d.pk) < after)
            ),
            key=lambda d: (d.created_at, d.pk),
            reverse=True,
        )
        page = rows[:limit]
        return page, ((page[-1].created_at, page[-1].pk) if len(rows) > limit and page else None)

    def read_dataset_chunks(self, dataset_pk: int, from_seq: int, limit: int) -> list[bytes]:
        chunks = self.uploaded_chunks.get(dataset_pk, {})
        return [chunks[s] for s in sorted(chunks) if s >= from_seq][:limit]

    def delete_dataset(self, dataset_id: str) -> tuple[bool, str]:
        d = self._dataset(dataset_id)
        if d is None:
            return False, ""
        active = (RunState.PENDING, RunState.RUNNING)
        user = next((r.run_id for r in self.runs.values() if r.state in active and dataset_id in r.spec_json), "")
        if user:
            return True, user
        del self.uploaded[d.pk]
        del self.uploaded_chunks[d.pk]
        return True, ""


async def _turn() -> None:
    """Give the event loop one turn, as waiting for an answer from a thread does."""
    await asyncio.sleep(0)


async def _after_a_turn(value: T) -> T:
    await _turn()
    return value


class MemoryStore(Store):
    """`Store` in memory (`tables` holds the data; tests may read it directly)."""

    def __init__(self) -> None:
        self.tables = MemoryTables()

    # --- runs, stages, events ----------------------------------------------------------

    async def insert_run(
        self,
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
        return await _after_a_turn(
            self.tables.insert_run(
                run_id,
                request_id,
                display_name,
                model,
                spec_json,
                stage_names,
                secret,
                now_ns,
                dataset_json,
                spec_pb,
                series,
            )
        )

    async def insert_group(
        self,
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
        return await _after_a_turn(
            self.tables.insert_group(
                group_id, request_id, display_name, model, repeats, stage_names, secret, now_ns, dataset_json, series
            )
        )

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await _after_a_turn(self.tables.get_run(run_id))

    async def list_group(self, group_id: str) -> list[RunRecord]:
        return await _after_a_turn(self.tables.list_group(group_id))

    async def get_run_dataset(self, run_pk: int) -> str:
        return await _after_a_turn(self.tables.get_run_dataset(run_pk))

    async def get_run_secret(self, run_pk: int) -> str:
        return await _after_a_turn(self.tables.get_run_secret(run_pk))

    async def list_runs(
        self,
        page_size: int,
        after: tuple[int, int] | None,
        state: int,
        model: str,
        max_bytes: int,
        build: Callable[[list[RunRecord], tuple[int, int] | None], T],
        series: str = "",
        group_id: str = "",
    ) -> T:
        return await _after_a_turn(
            build(*self.tables.list_runs(page_size, after, state, model, max_bytes, series, group_id))
        )

    async def update_run(self, run_pk: int, **fields: Unpack[RunChanges]) -> None:
        self.tables.update_run(run_pk, **fields)
        await _turn()

    async def finish_run(self, run_pk: int, state: int, reason: str, now_ns: int) -> None:
        self.tables.finish_run(run_pk, state, reason, now_ns)
        await _turn()

    async def delete_run(self, run_pk: int) -> None:
        self.tables.delete_run(run_pk)
        await _turn()

    async def interrupt_running(self, reason: str, now_ns: int) -> list[str]:
        return await _after_a_turn(self.tables.interrupt_running(reason, now_ns))

    async def pending_run_ids(self) -> list[str]:
        return await _after_a_turn(self.tables.pending_run_ids())

    async def count_runs_by_state(self) -> dict[int, int]:
        return await _after_a_turn(self.tables.count_runs_by_state())

    async def set_stage_time(
        self, run_pk: int, idx: int, *, started_at: int | None = None, ended_at: int | None = None
    ) -> None:
        self.tables.set_stage_time(run_pk, idx, started_at=started_at, ended_at=ended_at)
        await _turn()

    async def append_stage(self, run_pk: int, idx: int, name: str, spec_json: str, spec_pb: bytes) -> None:
        self.tables.append_stage(run_pk, idx, name, spec_json, spec_pb)
        await _turn()

    async def set_stage_reduced_load(self, run_pk: int, stage_idx: int, reason: str) -> None:
        self.tables.set_stage_reduced_load(run_pk, stage_idx, reason)
        await _turn()

    async def list_stages(self, run_pk: int) -> list[StageRecord]:
        return await _after_a_turn(self.tables.list_stages(run_pk))

    async def add_event(self, run_pk: int, kind: str, message: str, now_ns: int) -> EventRecord:
        return await _after_a_turn(self.tables.add_event(run_pk, kind, message, now_ns))

    async def list_events(self, run_pk: int, after_pk: int = 0) -> list[EventRecord]:
        return await _after_a_turn(self.tables.list_events(run_pk, after_pk))

    # --- agents and assignments -------------------------------------------------------

    async def record_agent_connected(
        self, session_id: str, name: str, labels: dict[str, str], version: str, now_ns: int
    ) -> None:
        self.tables.record_agent_connected(session_id, name, labels, version, now_ns)
        await _turn()

    async def record_agent_disconnected(self, session_id: str, now_ns: int) -> None:
        self.tables.record_agent_disconnected(session_id, now_ns)
        await _turn()

    async def get_agent(self, session_id: str) -> AgentRecord | None:
        return await _after_a_turn(self.tables.get_agent(session_id))

    async def insert_assignment(
        self,
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
        return await _after_a_turn(
            self.tables.insert_assignment(
                assignment_id,
                run_pk,
                stage_idx,
                agent_session,
                agent_name,
                concurrency,
                requests,
                state,
                now_ns,
                resume_token_sha256,
            )
        )

    async def lookup_assignment(self, assignment_id: str) -> StoredAssignment | None:
        return await _after_a_turn(self.tables.lookup_assignment(assignment_id))

    async def get_assignment(self, assignment_id: str) -> AssignmentRecord | None:
        return await _after_a_turn(self.tables.get_assignment(assignment_id))

    async def update_assignment(self, assignment_pk: int, **fields: Unpack[AssignmentChanges]) -> None:
        self.tables.update_assignment(assignment_pk, **fields)
        await _turn()

    async def record_assignment_health(
        self, assignment_pk: int, max_loop_lag_ms: float, max_cpu_percent: float
    ) -> None:
        self.tables.record_assignment_health(assignment_pk, max_loop_lag_ms, max_cpu_percent)
        await _turn()

    # --- samples and results ----------------------------------------------------------

    async def ingest_batches(self, batches: Sequence[BatchIngest]) -> list[IngestOutcome]:
        return await _after_a_turn(self.tables.ingest_batches(batches))

    async def export_page(self, run_pk: int, after: int, limit: int, include_warmup: bool) -> list[tuple[object, ...]]:
        return await _after_a_turn(self.tables.export_page(run_pk, after, limit, include_warmup))

    async def count_samples(self, run_pk: int) -> int:
        return await _after_a_turn(self.tables.count_samples(run_pk))

    async def sample_batches_version(self, run_pk: int) -> tuple[int, int]:
        return await _after_a_turn(self.tables.sample_batches_version(run_pk))

    async def failure_summary(self, run_pk: int) -> tuple[int, int, str]:
        return await _after_a_turn(self.tables.failure_summary(run_pk))

    async def put_run_result(self, run_pk: int, run_id: str, stored: StoredResult) -> bool:
        return await _after_a_turn(self.tables.put_run_result(run_pk, run_id, stored))

    async def read_snapshot(
        self, job: Callable[Concatenate[SnapshotReads, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        reads: SnapshotReads = self.tables
        return await _after_a_turn(job(reads, *args, **kwargs))

    # --- keys and audit ---------------------------------------------------------------

    async def insert_key(self, record: KeyRecord) -> None:
        self.tables.insert_key(record)
        await _turn()

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await _after_a_turn(self.tables.get_key(key_id))

    async def list_keys(self, include_revoked: bool) -> list[KeyRecord]:
        return await _after_a_turn(self.tables.list_keys(include_revoked))

    async def get_keys(self, key_ids: Sequence[str]) -> list[KeyRecord]:
        return await _after_a_turn(self.tables.get_keys(key_ids))

    async def revoke_key(self, key_id: str, now_ns: int) -> KeyRecord | None:
        return await _after_a_turn(self.tables.revoke_key(key_id, now_ns))

    async def any_keys(self) -> bool:
        return await _after_a_turn(self.tables.any_keys())

    async def insert_audit(self, events: Sequence[AuditRecord], retention: int = AUDIT_RETENTION_EVENTS) -> int:
        return await _after_a_turn(self.tables.insert_audit(events, retention))

    async def set_audit_counts(self, counts: Sequence[tuple[int, int]]) -> None:
        self.tables.set_audit_counts(counts)
        await _turn()

    async def list_audit(self, limit: int, before_pk: int | None, key_id: str, run_id: str) -> list[AuditRecord]:
        return await _after_a_turn(self.tables.list_audit(limit, before_pk, key_id, run_id))

    # --- series ------------------------------------------------------------------------

    async def set_baseline(self, record: BaselineRecord) -> None:
        self.tables.set_baseline(record)
        await _turn()

    async def get_baseline(self, name: str) -> BaselineRecord | None:
        return await _after_a_turn(self.tables.get_baseline(name))

    async def list_baselines(self) -> list[BaselineRecord]:
        return await _after_a_turn(self.tables.list_baselines())

    async def delete_baseline(self, name: str) -> bool:
        return await _after_a_turn(self.tables.delete_baseline(name))

    async def begin_dataset_upload(self, name: str, fmt: int, now_ns: int) -> int:
        return await _after_a_turn(self.tables.begin_dataset_upload(name, fmt, now_ns))

    async def append_dataset_chunk(self, dataset_pk: int, seq: int, blob: bytes) -> None:
        self.tables.append_dataset_chunk(dataset_pk, seq, blob)
        await _turn()

    async def finish_dataset_upload(
        self, dataset_pk: int, dataset_id: str, size: int, sha256: str, entry_count: int, span_s: float
    ) -> tuple[DatasetRecord, bool]:
        return await _after_a_turn(
            self.tables.finish_dataset_upload(dataset_pk, dataset_id, size, sha256, entry_count, span_s)
        )

    async def discard_dataset_upload(self, dataset_pk: int) -> None:
        self.tables.discard_dataset_upload(dataset_pk)
        await _turn()

    async def discard_incomplete_uploads(self) -> int:
        return await _after_a_turn(self.tables.discard_incomplete_uploads())

    async def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        return await _after_a_turn(self.tables.get_dataset(dataset_id))

    async def list_datasets(self, limit: int, after: tuple[int, int] | None, fmt: int) -> DatasetsPage:
        return await _after_a_turn(self.tables.list_datasets(limit, after, fmt))

    async def read_dataset_chunks(self, dataset_pk: int, from_seq: int, limit: int) -> list[bytes]:
        return await _after_a_turn(self.tables.read_dataset_chunks(dataset_pk, from_seq, limit))

    async def delete_dataset(self, dataset_id: str) -> tuple[bool, str]:
        return await _after_a_turn(self.tables.delete_dataset(dataset_id))

    async def series_runs(self, series: str, limit: int) -> list[RunRecord]:
        return await _after_a_turn(self.tables.series_runs(series, limit))
