"""The store seam: what the domain may ask of storage, one typed async method per operation.

Two implementations keep the same contract (tests/unit/store/test_store_contract.py runs one
suite against both): `SqliteStore` (controller/store/sqlite.py), the controller's, over the
repository functions on the database's threads; and `MemoryStore` (controller/store/memory.py),
plain dicts for unit tests of the domain. Each method has the name and parameters of the
repository function it runs (`repository`, `security`), so the repository's docstrings are
the reference for what each one does.

The interface is split by subsystem, as the schema is: runs with their stages and events
(`RunStore`), agents and assignments (`FleetStore`), samples and results (`SampleStore`), API
keys (`ApiKeyStore`), the audit log (`AuditStore`), the baselines of series (`SeriesStore`)
and uploaded datasets (`DatasetStore`);
`Store` is all of them. A domain object
takes the part it uses (the key store and the audit log need no run tables, the ingestor
only samples), so its dependencies read off its signature and a test can hand it a small
double.

A result is computed from several reads that must see one state of the store (the version
it is stored under is read with the samples): `SampleStore.read_snapshot` runs a function
with `SnapshotReads`, synchronous reads of one consistent snapshot. The SQLite store runs it
on a reader thread in one read transaction, the memory store inline, between two awaits.
Nothing of the result computation needs SQL, so the memory store has every operation.

Errors: a write that breaks a uniqueness or reference rule (a duplicate id, a run or
assignment that does not exist) raises one of `INTEGRITY_ERRORS`, and nothing of it is
stored. Reads of what does not exist return None, "" or an empty list, as each method says;
updates of what does not exist change nothing.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence
from typing import Concatenate, ParamSpec, Protocol, TypeVar, Unpack

import peewee

from controller.store.baselines import BaselineRecord
from controller.store.datasets import DatasetRecord, DatasetsPage
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

# The SQLite store raises them as SQLite reports them: peewee's wrapper, or sqlite3's own on
# the paths that use the raw connection (sample ingest). The memory store raises peewee's.
INTEGRITY_ERRORS: tuple[type[Exception], ...] = (peewee.IntegrityError, sqlite3.IntegrityError)

# A ListRuns page as the store returns it: the runs and the (created_at, pk) of the last one
# when more follow (the next page's `after`), else None.
RunsPage = tuple[list[RunRecord], tuple[int, int] | None]


class RunStore(Protocol):
    """Runs, their stages and their events."""

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
        """Create a PENDING run with its stages (and its secret and dataset when not empty);
        with a request_id already used, that run and False instead. The record returned
        carries the spec JSON as given (reads leave it out when the binary spec is kept)."""
        ...

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
        """Create a group of repeats, one PENDING run per entry of `repeats` (all or none), each
        with its stages, secret and dataset and in `series` (RunSpec.series), `repeat_index` in
        the order given; the request_id goes with the first. With a request_id already used:
        the runs of the group it created (or its single run) and False."""
        ...

    async def get_run(self, run_id: str) -> RunRecord | None: ...

    async def list_group(self, group_id: str) -> list[RunRecord]:
        """A group's runs in repeat order; [] for an unknown group."""
        ...

    async def get_run_dataset(self, run_pk: int) -> str:
        """The run's parsed dataset entries (JSON); "" when it has none."""
        ...

    async def get_run_secret(self, run_pk: int) -> str:
        """The run's target credentials; "" when it has none or they were erased."""
        ...

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
        """`build` of a page of runs, newest first, `after` the (created_at, pk) of the previous
        page's last run, only of `series` / `group_id` when given (repository.list_runs). `build`
        runs where the page is read (the SQLite store: on the reader thread, so a page's
        conversion stays off the event loop)."""
        ...

    async def update_run(self, run_pk: int, **fields: Unpack[RunChanges]) -> None: ...

    async def finish_run(self, run_pk: int, state: int, reason: str, now_ns: int) -> None:
        """Move a run to a final state and erase its target credentials."""
        ...

    async def delete_run(self, run_pk: int) -> None:
        """Delete a run and everything of it (stages, events, secret, dataset, assignments,
        samples, scrapes, stored result, the baselines naming it); agent sessions stay."""
        ...

    async def interrupt_running(self, reason: str, now_ns: int) -> list[str]:
        """Every RUNNING run becomes INTERRUPTED (credentials erased, a `run_interrupted`
        event); their run ids, in creation (pk) order."""
        ...

    async def pending_run_ids(self) -> list[str]:
        """PENDING runs, oldest first (created_at, then pk)."""
        ...

    async def count_runs_by_state(self) -> dict[int, int]: ...

    async def set_stage_time(
        self, run_pk: int, idx: int, *, started_at: int | None = None, ended_at: int | None = None
    ) -> None:
        """Set the times given (at least one)."""
        ...

    async def set_stage_reduced_load(self, run_pk: int, stage_idx: int, reason: str) -> None: ...

    async def append_stage(self, run_pk: int, idx: int, name: str, spec_json: str, spec_pb: bytes) -> None:
        """A stage planned while the run runs (a capacity search's probe): its row, and the run's
        stored spec (both forms) replaced by one whose `stages` ends with it, together.
        IntegrityError for an unknown run or a stage index the run already has."""
        ...

    async def list_stages(self, run_pk: int) -> list[StageRecord]:
        """A run's stages in order (for tools and tests)."""
        ...

    async def add_event(self, run_pk: int, kind: str, message: str, now_ns: int) -> EventRecord: ...

    async def list_events(self, run_pk: int, after_pk: int = 0) -> list[EventRecord]:
        """The run's events after `after_pk`, in the order they were added."""
        ...


class FleetStore(Protocol):
    """Agent sessions and the assignments given to them."""

    async def record_agent_connected(
        self, session_id: str, name: str, labels: dict[str, str], version: str, now_ns: int
    ) -> None: ...

    async def record_agent_disconnected(self, session_id: str, now_ns: int) -> None: ...

    async def get_agent(self, session_id: str) -> AgentRecord | None:
        """An agent session (for tools and tests)."""
        ...

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
        """Store an assignment of a stored run; its pk."""
        ...

    async def lookup_assignment(self, assignment_id: str) -> StoredAssignment | None: ...

    async def get_assignment(self, assignment_id: str) -> AssignmentRecord | None:
        """Every column of an assignment (for tools and tests)."""
        ...

    async def update_assignment(self, assignment_pk: int, **fields: Unpack[AssignmentChanges]) -> None: ...

    async def record_assignment_health(
        self, assignment_pk: int, max_loop_lag_ms: float, max_cpu_percent: float
    ) -> None: ...


class SnapshotReads(Protocol):
    """Reads of one consistent snapshot of the store, for `SampleStore.read_snapshot` (all
    synchronous: they run inside the snapshot, on whatever thread holds it)."""

    def get_run(self, run_id: str) -> RunRecord | None: ...

    def sample_batches_version(self, run_pk: int) -> tuple[int, int]: ...

    def stage_indexes_with_samples(self, run_pk: int) -> list[int]: ...

    def load_stage_samples(self, run_pk: int, stage_idx: int) -> StageSamples: ...

    def stage_assignments(self, run_pk: int, stage_idx: int) -> list[AssignmentSummary]: ...

    def stage_reduced_load_reason(self, run_pk: int, stage_idx: int) -> str: ...

    def load_stage_scrapes(self, run_pk: int, stage_idx: int) -> StageScrapes: ...

    def list_events(self, run_pk: int, after_pk: int = 0) -> list[EventRecord]: ...

    def get_run_result(self, run_pk: int) -> StoredResult | None: ...


class SampleStore(Protocol):
    """Sample batches, what is derived from them, and the stored results of final runs."""

    async def ingest_batches(self, batches: Sequence[BatchIngest]) -> list[IngestOutcome]:
        """Store batches, all or none (a batch seen before, by (assignment, seq), is skipped):
        their samples, error messages and server scrapes (with run events when a scrape
        starts or stops failing), and the run's request counters."""
        ...

    async def export_page(
        self, run_pk: int, after: int, limit: int, include_warmup: bool
    ) -> list[tuple[object, ...]]: ...

    async def count_samples(self, run_pk: int) -> int: ...

    async def sample_batches_version(self, run_pk: int) -> tuple[int, int]: ...

    async def failure_summary(self, run_pk: int) -> tuple[int, int, str]:
        """(ok, failed, one error message) of a stored run (`run_pk` must be one)."""
        ...

    async def put_run_result(self, run_pk: int, run_id: str, stored: StoredResult) -> bool: ...

    async def read_snapshot(
        self, job: Callable[Concatenate[SnapshotReads, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """`job(reads, *args, **kwargs)`, every read of `reads` from one snapshot."""
        ...


class ApiKeyStore(Protocol):
    """API keys (their secrets' digests, never the secrets)."""

    async def insert_key(self, record: KeyRecord) -> None: ...

    async def get_key(self, key_id: str) -> KeyRecord | None: ...

    async def list_keys(self, include_revoked: bool) -> list[KeyRecord]:
        """Newest first (created_at, then key id)."""
        ...

    async def get_keys(self, key_ids: Sequence[str]) -> list[KeyRecord]:
        """The keys of those ids that exist, each once, in no particular order."""
        ...

    async def revoke_key(self, key_id: str, now_ns: int) -> KeyRecord | None: ...

    async def any_keys(self) -> bool: ...


class AuditStore(Protocol):
    """The audit log (the newest `retention` rows are kept)."""

    async def insert_audit(self, events: Sequence[AuditRecord], retention: int = AUDIT_RETENTION_EVENTS) -> int:
        """Append events (rows get new pks: the pk of an event given is ignored); the pk of
        the newest row."""
        ...

    async def set_audit_counts(self, counts: Sequence[tuple[int, int]]) -> None: ...

    async def list_audit(self, limit: int, before_pk: int | None, key_id: str, run_id: str) -> list[AuditRecord]: ...


class SeriesStore(Protocol):
    """The baseline of each series (a run's or a group's id), and the runs of a series."""

    async def set_baseline(self, record: BaselineRecord) -> None:
        """Set the series' baseline, replacing the one it had."""
        ...

    async def get_baseline(self, name: str) -> BaselineRecord | None: ...

    async def list_baselines(self) -> list[BaselineRecord]:
        """Every baseline, by name."""
        ...

    async def delete_baseline(self, name: str) -> bool:
        """True when the series had a baseline."""
        ...

    async def series_runs(self, series: str, limit: int) -> list[RunRecord]:
        """The series' `limit` most recent runs, newest first (created_at, then pk)."""
        ...


class DatasetStore(Protocol):
    """Uploaded datasets and their content in chunks (controller/store/datasets.py)."""

    async def begin_dataset_upload(self, name: str, fmt: int, now_ns: int) -> int: ...

    async def append_dataset_chunk(self, dataset_pk: int, seq: int, blob: bytes) -> None: ...

    async def finish_dataset_upload(
        self, dataset_pk: int, dataset_id: str, size: int, sha256: str, entry_count: int, span_s: float
    ) -> tuple[DatasetRecord, bool]: ...

    async def discard_dataset_upload(self, dataset_pk: int) -> None: ...

    async def discard_incomplete_uploads(self) -> int: ...

    async def get_dataset(self, dataset_id: str) -> DatasetRecord | None: ...

    async def list_datasets(self, limit: int, after: tuple[int, int] | None, fmt: int) -> DatasetsPage: ...

    async def read_dataset_chunks(self, dataset_pk: int, from_seq: int, limit: int) -> list[bytes]: ...

    async def delete_dataset(self, dataset_id: str) -> tuple[bool, str]: ...


class Store(RunStore, FleetStore, SampleStore, ApiKeyStore, AuditStore, SeriesStore, DatasetStore, Protocol):
    """Everything the controller keeps."""
