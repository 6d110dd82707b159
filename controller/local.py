"""A controller database opened in-process, for the CLI's `--db FILE`: the one entry point of
the controller that the client package uses (it imports nothing else of the controller).

* `LocalRunReader`: the RunService's read calls, answered from the file opened read-only
  (SQLite refuses every write). The same domain reads the controller serves, packed by the same
  converters as the RunService, so a `--db` read prints what the RPC would; a final run's
  result is computed and not stored. No controller needs to run, and one may run on the file.
* `LocalKeyAdmin`: the KeyService's calls on the file, for bootstrapping the first keys (the
  file is created and migrated when needed; a controller running on it notices new and revoked
  keys within a second).

Both raise the domain's errors (`DomainError`), which `error_text` words as the RPC's status
would be; `LocalKeyAdmin` raises `UnusableDatabase` for a file that is not a usable database.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from types import TracebackType

from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from controller.domain.access.audit import AuditLog
from controller.domain.access.destinations import DestinationPolicy
from controller.domain.access.keys import KeyStore
from controller.domain.baselines import Baselines
from controller.domain.errors import DomainError
from controller.domain.execution.coordinator import RunCoordinator
from controller.domain.results.live import RunHub
from controller.domain.results.provider import RunResults
from controller.domain.runs import Runs
from controller.servicers import convert
from controller.servicers.errors import to_status
from controller.store.database import Database, UnusableDatabase
from controller.store.security import AuditRecord, KeyRecord
from controller.store.sqlite import SqliteStore

__all__ = [
    "AuditRecord",
    "DomainError",
    "KeyRecord",
    "LocalKeyAdmin",
    "LocalRunReader",
    "UnusableDatabase",
    "error_text",
]


def error_text(exc: DomainError) -> str:
    """`error: CODE: details`, as for the same error over gRPC."""
    status = to_status(exc)
    return f"error: {status.code.name}: {status.details}"


class LocalRunReader:
    """The read calls of ControllerClient, answered from a database file."""

    def __init__(self, path: str | Path) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no database file at {path}")
        self._db = Database(path, read_workers=1, read_only=True)
        hub = RunHub()
        # The coordinator is never started: it only answers "is this run executing here" (no);
        # no run is created here, so the destination policy is never consulted.
        store = SqliteStore(self._db)
        self._runs = Runs(store, RunCoordinator(store, hub), hub, RunResults(store, keep=False), DestinationPolicy())
        self._baselines = Baselines(store, self._runs)

    async def __aenter__(self) -> LocalRunReader:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._db.close()

    async def get_run(self, run_id: str) -> run_pb2.Run:
        return convert.run_message(await self._runs.get(run_id))

    async def get_run_events(self, run_id: str) -> list[run_service_pb2.RunEvent]:
        record = await self._runs.get(run_id)
        return [convert.event_message(e) for e in await self._runs.events(record, 0)]

    async def list_runs(
        self,
        page_size: int = 50,
        page_token: str = "",
        state: int = 0,
        model: str = "",
        series: str = "",
        group_id: str = "",
    ) -> run_service_pb2.ListRunsResponse:
        return await self._runs.list_runs(page_size, page_token, state, model, convert.list_response, series, group_id)

    async def get_group_result(self, group_id: str) -> run_service_pb2.GetGroupResultResponse:
        records, result = await self._runs.group(group_id)
        return run_service_pb2.GetGroupResultResponse(result=result, runs=[convert.run_message(r) for r in records])

    async def get_result(self, run_id: str) -> run_pb2.RunResult:
        return (await self._runs.result(run_id))[1]

    async def export_samples(
        self, run_id: str, page_size: int = 1000, include_warmup: bool = False
    ) -> AsyncIterator[run_service_pb2.ExportedSample]:
        async for rows in self._runs.export(run_id, page_size, include_warmup):
            for row in rows:
                yield convert.exported_sample(row)

    async def compare_runs(
        self,
        baseline_run_id: str,
        run_ids: list[str],
        tolerance_percent: float = 0.0,
        confidence_percent: float = 0.0,
        metrics: Sequence[str] = (),
    ) -> run_service_pb2.CompareRunsResponse:
        comparison = await self._runs.compare(baseline_run_id, run_ids, tolerance_percent, confidence_percent, metrics)
        return convert.compare_message(comparison)

    async def get_baseline(self, name: str) -> run_service_pb2.Baseline:
        return convert.baseline_message(await self._baselines.get_baseline(name))

    async def list_baselines(self) -> list[run_service_pb2.Baseline]:
        return [convert.baseline_message(b) for b in await self._baselines.list_baselines()]

    async def series_history(
        self, name: str, metric: str = "", label: str = "", load: str = "", limit: int = 0
    ) -> run_service_pb2.GetSeriesHistoryResponse:
        return convert.history_message(await self._baselines.history(name, metric, label, load, limit))


class LocalKeyAdmin:
    """The KeyService's calls on a database file; stored records in, stored records out."""

    def __init__(self, path: str | Path) -> None:
        self._db = Database(path, read_workers=1)
        try:
            self._db.migrate()
        except BaseException:
            self._db.close()
            raise
        store = SqliteStore(self._db)
        self._keys = KeyStore(store)
        self._audit = AuditLog(store)

    async def __aenter__(self) -> LocalKeyAdmin:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._db.close()

    async def create_key(self, name: str, role: str, ttl_s: float | None = None) -> tuple[KeyRecord, str]:
        """A new key's record and its secret (the whole key, shown only this once)."""
        return await self._keys.create(name, role, ttl_s)

    async def list_keys(self, include_revoked: bool = False) -> list[KeyRecord]:
        return await self._keys.list(include_revoked)

    async def revoke_key(self, key_id: str) -> KeyRecord:
        return await self._keys.revoke(key_id)

    async def list_audit_events(
        self, page_size: int, page_token: str = "", key_id: str = "", run_id: str = ""
    ) -> tuple[list[AuditRecord], str]:
        """A page of events, newest first, and the token of the next page ("" at the end)."""
        return await self._audit.list(page_size, page_token, key_id, run_id)
