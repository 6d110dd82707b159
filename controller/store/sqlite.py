"""The store over SQLite: each operation is its repository function, run by `Database` on the
writer thread (writes, one transaction each) or the read pool (reads).

Writes and reads go where they went when the domain called `Database.write`/`read` itself; a
job marked `erases_secrets` (finish, delete, interrupt) still has the WAL truncated after it
commits, since `Database.write` looks at the function it is given. `db` is the `Database`
itself, for what is not an operation on the data (migrations, closing, memory).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Concatenate, ParamSpec, TypeVar, Unpack

from controller.store import baselines, security
from controller.store import datasets as ds
from controller.store import repository as repo
from controller.store import server_metrics as scrapes
from controller.store.baselines import BaselineRecord
from controller.store.database import Database
from controller.store.datasets import DatasetRecord, DatasetsPage
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
    StageRecord,
    StageSamples,
    StoredAssignment,
    StoredResult,
)
from controller.store.security import AUDIT_RETENTION_EVENTS, AuditRecord, KeyRecord
from controller.store.server_metrics import StageScrapes

T = TypeVar("T")
P = ParamSpec("P")


class _TransactionReads:
    """`SnapshotReads` inside the read transaction of the thread that runs the job."""

    def get_run(self, run_id: str) -> RunRecord | None:
        return repo.get_run(run_id)

    def sample_batches_version(self, run_pk: int) -> tuple[int, int]:
        return repo.sample_batches_version(run_pk)

    def stage_indexes_with_samples(self, run_pk: int) -> list[int]:
        return repo.stage_indexes_with_samples(run_pk)

    def load_stage_samples(self, run_pk: int, stage_idx: int) -> StageSamples:
        return repo.load_stage_samples(run_pk, stage_idx)

    def stage_assignments(self, run_pk: int, stage_idx: int) -> list[AssignmentSummary]:
        return repo.stage_assignments(run_pk, stage_idx)

    def stage_reduced_load_reason(self, run_pk: int, stage_idx: int) -> str:
        return repo.stage_reduced_load_reason(run_pk, stage_idx)

    def load_stage_scrapes(self, run_pk: int, stage_idx: int) -> StageScrapes:
        return scrapes.load_stage_scrapes(run_pk, stage_idx)

    def list_events(self, run_pk: int, after_pk: int = 0) -> list[EventRecord]:
        return repo.list_events(run_pk, after_pk)

    def get_run_result(self, run_pk: int) -> StoredResult | None:
        return repo.get_run_result(run_pk)


_READS: SnapshotReads = _TransactionReads()


class SqliteStore(Store):
    """`Store` over one SQLite database."""

    def __init__(self, db: Database) -> None:
        self.db = db

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
        return await self.db.write(
            repo.insert_run,
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
        return await self.db.write(
            repo.insert_group,
            group_id,
            request_id,
            display_name,
            model,
            repeats,
            stage_names,
            secret,
            now_ns,
            dataset_json,
            series,
        )

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self.db.read(repo.get_run, run_id)

    async def list_group(self, group_id: str) -> list[RunRecord]:
        return await self.db.read(repo.list_group, group_id)

    async def get_run_dataset(self, run_pk: int) -> str:
        return await self.db.read(repo.get_run_dataset, run_pk)

    async def get_run_secret(self, run_pk: int) -> str:
        return await self.db.read(repo.get_run_secret, run_pk)

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
        def page() -> T:
            return build(*repo.list_runs(page_size, after, state, model, max_bytes, series, group_id))

        return await self.db.read(page)

    async def update_run(self, run_pk: int, **fields: Unpack[RunChanges]) -> None:
        await self.db.write(repo.update_run, run_pk, **fields)

    async def finish_run(self, run_pk: int, state: int, reason: str, now_ns: int) -> None:
        await self.db.write(repo.finish_run, run_pk, state, reason, now_ns)

    async def delete_run(self, run_pk: int) -> None:
        await self.db.write(repo.delete_run, run_pk)

    async def interrupt_running(self, reason: str, now_ns: int) -> list[str]:
        return await self.db.write(repo.interrupt_running, reason, now_ns)

    async def pending_run_ids(self) -> list[str]:
        return await self.db.read(repo.pending_run_ids)

    async def count_runs_by_state(self) -> dict[int, int]:
        return await self.db.read(repo.count_runs_by_state)

    async def set_stage_time(
        self, run_pk: int, idx: int, *, started_at: int | None = None, ended_at: int | None = None
    ) -> None:
        await self.db.write(repo.set_stage_time, run_pk, idx, started_at=started_at, ended_at=ended_at)

    async def set_stage_reduced_load(self, run_pk: int, stage_idx: int, reason: str) -> None:
        await self.db.write(repo.set_stage_reduced_load, run_pk, stage_idx, reason)

    async def append_stage(self, run_pk: int, idx: int, name: str, spec_json: str, spec_pb: bytes) -> None:
        await self.db.write(repo.append_stage, run_pk, idx, name, spec_json, spec_pb)

    async def list_stages(self, run_pk: int) -> list[StageRecord]:
        return await self.db.read(repo.list_stages, run_pk)

    async def add_event(self, run_pk: int, kind: str, message: str, now_ns: int) -> EventRecord:
        return await self.db.write(repo.add_event, run_pk, kind, message, now_ns)

    async def list_events(self, run_pk: int, after_pk: int = 0) -> list[EventRecord]:
        return await self.db.read(repo.list_events, run_pk, after_pk)

    # --- agents and assignments -------------------------------------------------------

    async def record_agent_connected(
        self, session_id: str, name: str, labels: dict[str, str], version: str, now_ns: int
    ) -> None:
        await self.db.write(repo.record_agent_connected, session_id, name, labels, version, now_ns)

    async def record_agent_disconnected(self, session_id: str, now_ns: int) -> None:
        await self.db.write(repo.record_agent_disconnected, session_id, now_ns)

    async def get_agent(self, session_id: str) -> AgentRecord | None:
        return await self.db.read(repo.get_agent, session_id)

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
        return await self.db.write(
            repo.insert_assignment,
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

    async def lookup_assignment(self, assignment_id: str) -> StoredAssignment | None:
        return await self.db.read(repo.lookup_assignment, assignment_id)

    async def get_assignment(self, assignment_id: str) -> AssignmentRecord | None:
        return await self.db.read(repo.get_assignment, assignment_id)

    async def update_assignment(self, assignment_pk: int, **fields: Unpack[AssignmentChanges]) -> None:
        await self.db.write(repo.update_assignment, assignment_pk, **fields)

    async def record_assignment_health(
        self, assignment_pk: int, max_loop_lag_ms: float, max_cpu_percent: float
    ) -> None:
        await self.db.write(repo.record_assignment_health, assignment_pk, max_loop_lag_ms, max_cpu_percent)

    # --- samples and results ----------------------------------------------------------

    async def ingest_batches(self, batches: Sequence[BatchIngest]) -> list[IngestOutcome]:
        return await self.db.write(repo.ingest_batches, batches)

    async def export_page(self, run_pk: int, after: int, limit: int, include_warmup: bool) -> list[tuple[object, ...]]:
        return await self.db.read(repo.export_page, run_pk, after, limit, include_warmup)

    async def count_samples(self, run_pk: int) -> int:
        return await self.db.read(repo.count_samples, run_pk)

    async def sample_batches_version(self, run_pk: int) -> tuple[int, int]:
        return await self.db.read(repo.sample_batches_version, run_pk)

    async def failure_summary(self, run_pk: int) -> tuple[int, int, str]:
        return await self.db.read(repo.failure_summary, run_pk)

    async def put_run_result(self, run_pk: int, run_id: str, stored: StoredResult) -> bool:
        return await self.db.write(repo.put_run_result, run_pk, run_id, stored)

    async def read_snapshot(
        self, job: Callable[Concatenate[SnapshotReads, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        return await self.db.read(job, _READS, *args, **kwargs)

    # --- keys and audit ---------------------------------------------------------------

    async def insert_key(self, record: KeyRecord) -> None:
        await self.db.write(security.insert_key, record)

    async def get_key(self, key_id: str) -> KeyRecord | None:
        return await self.db.read(security.get_key, key_id)

    async def list_keys(self, include_revoked: bool) -> list[KeyRecord]:
        return await self.db.read(security.list_keys, include_revoked)

    async def get_keys(self, key_ids: Sequence[str]) -> list[KeyRecord]:
        return await self.db.read(security.get_keys, key_ids)

    async def revoke_key(self, key_id: str, now_ns: int) -> KeyRecord | None:
        return await self.db.write(security.revoke_key, key_id, now_ns)

    async def any_keys(self) -> bool:
        return await self.db.read(security.any_keys)

    async def insert_audit(self, events: Sequence[AuditRecord], retention: int = AUDIT_RETENTION_EVENTS) -> int:
        return await self.db.write(security.insert_audit, events, retention)

    async def set_audit_counts(self, counts: Sequence[tuple[int, int]]) -> None:
        await self.db.write(security.set_audit_counts, counts)

    async def list_audit(self, limit: int, before_pk: int | None, key_id: str, run_id: str) -> list[AuditRecord]:
        return await self.db.read(security.list_audit, limit, before_pk, key_id, run_id)

    # --- series ------------------------------------------------------------------------

    async def set_baseline(self, record: BaselineRecord) -> None:
        await self.db.write(baselines.set_baseline, record)

    async def get_baseline(self, name: str) -> BaselineRecord | None:
        return await self.db.read(baselines.get_baseline, name)

    async def list_baselines(self) -> list[BaselineRecord]:
        return await self.db.read(baselines.list_baselines)

    async def delete_baseline(self, name: str) -> bool:
        return await self.db.write(baselines.delete_baseline, name)

    async def series_runs(self, series: str, limit: int) -> list[RunRecord]:
        return await self.db.read(repo.series_runs, series, limit)

    # --- uploaded datasets -------------------------------------------------------------

    async def begin_dataset_upload(self, name: str, fmt: int, now_ns: int) -> int:
        return await self.db.write(ds.begin_dataset_upload, name, fmt, now_ns)

    async def append_dataset_chunk(self, dataset_pk: int, seq: int, blob: bytes) -> None:
        await self.db.write(ds.append_dataset_chunk, dataset_pk, seq, blob)

    async def finish_dataset_upload(
        self, dataset_pk: int, dataset_id: str, size: int, sha256: str, entry_count: int, span_s: float
    ) -> tuple[DatasetRecord, bool]:
        return await self.db.write(ds.finish_dataset_upload, dataset_pk, dataset_id, size, sha256, entry_count, span_s)

    async def discard_dataset_upload(self, dataset_pk: int) -> None:
        await self.db.write(ds.discard_dataset_upload, dataset_pk)

    async def discard_incomplete_uploads(self) -> int:
        return await self.db.write(ds.discard_incomplete_uploads)

    async def get_dataset(self, dataset_id: str) -> DatasetRecord | None:
        return await self.db.read(ds.get_dataset, dataset_id)

    async def list_datasets(self, limit: int, after: tuple[int, int] | None, fmt: int) -> DatasetsPage:
        return await self.db.read(ds.list_datasets, limit, after, fmt)

    async def read_dataset_chunks(self, dataset_pk: int, from_seq: int, limit: int) -> list[bytes]:
        return await self.db.read(ds.read_dataset_chunks, dataset_pk, from_seq, limit)

    async def delete_dataset(self, dataset_id: str) -> tuple[bool, str]:
        return await self.db.write(ds.delete_dataset, dataset_id)
