"""Read-only access to a controller's SQLite file, for the read commands' `--db PATH`.

The same domain reads the controller serves (controller/domain/runs.py over its store), with
the answers packed by the same converters as the RunService: a `--db` read prints what the
RPC would. The file is opened read-only (SQLite refuses every write); a final run's result is
computed and not stored. No controller needs to run, and one may run on the same file.
Errors are the domain's (DomainError), which `error_text` words as the RPC's status would be.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType

from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from controller.domain.errors import DomainError
from controller.domain.live import RunHub
from controller.domain.run_results import RunResults
from controller.domain.runs import Runs
from controller.servicers import convert
from controller.servicers.errors import to_status
from controller.store.database import Database
from controller.store.sqlite import SqliteStore


def error_text(exc: DomainError) -> str:
    """`error: CODE: details`, as for the same error over gRPC."""
    status = to_status(exc)
    return f"error: {status.code.name}: {status.details}"


class LocalStore:
    """The read calls of ControllerClient, answered from a database file."""

    def __init__(self, path: str | Path) -> None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"no database file at {path}")
        from controller.domain.coordinator import RunCoordinator
        from controller.domain.destinations import DestinationPolicy

        self._db = Database(path, read_workers=1, read_only=True)
        store = SqliteStore(self._db)
        hub = RunHub()
        # The coordinator is never started: it only answers "is this run executing here" (no);
        # no run is created here, so the destination policy is never consulted.
        self._runs = Runs(store, RunCoordinator(self._db, hub), hub, RunResults(store, keep=False), DestinationPolicy())

    async def __aenter__(self) -> LocalStore:
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
        self, page_size: int = 50, page_token: str = "", state: int = 0, model: str = ""
    ) -> run_service_pb2.ListRunsResponse:
        return await self._runs.list_runs(page_size, page_token, state, model, convert.list_response)

    async def get_result(self, run_id: str) -> run_pb2.RunResult:
        return (await self._runs.result(run_id))[1]

    async def export_samples(
        self, run_id: str, page_size: int = 1000, include_warmup: bool = False
    ) -> AsyncIterator[run_service_pb2.ExportedSample]:
        async for rows in self._runs.export(run_id, page_size, include_warmup):
            for row in rows:
                yield convert.exported_sample(row)

    async def compare_runs(
        self, baseline_run_id: str, run_ids: list[str], tolerance_percent: float = 0.0
    ) -> run_service_pb2.CompareRunsResponse:
        baseline, comparisons = await self._runs.compare(baseline_run_id, run_ids, tolerance_percent)
        return convert.compare_message(baseline, comparisons)
