"""Sample ingest: batches from every agent stream go through one queue to the single
SQLite writer, many batches per transaction; acks go back only after the commit.

The queue is bounded: when SQLite falls behind, `submit` blocks, the servicer stops
reading its stream, and gRPC flow control pushes back on the agents (backpressure
instead of unbounded memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog

from common.proto.loadtest.v1 import agent_service_pb2
from controller.domain.server_metrics import scrape_rows
from controller.store import repository as repo
from controller.store.database import Database

log = structlog.get_logger(__name__)

MAX_BATCHES_PER_COMMIT = 64
QUEUE_BATCHES = 512


@dataclass(frozen=True)
class IngestTarget:
    """Where a batch belongs, as resolved by the coordinator."""

    assignment_pk: int
    run_pk: int
    run_id: str
    stage_idx: int


@dataclass(frozen=True)
class _Item:
    batch: repo.BatchIngest
    assignment_id: str
    on_committed: Callable[[repo.IngestOutcome, repo.BatchIngest], None]
    run_id: str = ""


class IngestObserver(Protocol):
    """Watches the ingest path for metrics (see controller/observability.py)."""

    def committed(self, run_id: str, batch: repo.BatchIngest, outcome: repo.IngestOutcome) -> None:
        """One batch went through a commit (stored now, or a replay already stored)."""

    def commit_took(self, seconds: float) -> None:
        """One transaction of the writer took `seconds`."""


_STATUS = repo.SAMPLE_COLUMNS.index("status")
_ITL_COUNT = repo.SAMPLE_COLUMNS.index("itl_count")


class MalformedBatch(ValueError):
    """A batch whose columns disagree in length."""


def to_ingest(target: IngestTarget, batch: agent_service_pb2.SampleBatch) -> repo.BatchIngest:
    """Check a batch's shape and turn it into a column table for the writer (numpy reads the
    packed repeated fields in a few microseconds each; no Python loop per sample)."""
    n = len(batch.error)
    table = np.zeros((len(repo.SAMPLE_COLUMNS), n), dtype=np.int64)
    for i, name in enumerate(repo.SAMPLE_COLUMNS):
        values = getattr(batch, name)
        if len(values) != n:
            # Agents older than the requested-length columns send none: zeros ("unknown").
            if not values and name.startswith("requested_"):
                continue
            raise MalformedBatch("sample columns differ in length")
        table[i] = np.asarray(values, dtype=np.int64)
    itl = np.asarray(batch.itl_ns, dtype=np.int64)
    if int(table[_ITL_COUNT].sum()) != itl.size:
        raise MalformedBatch("itl_count does not add up to len(itl_ns)")
    return repo.BatchIngest(
        assignment_pk=target.assignment_pk,
        run_pk=target.run_pk,
        stage_idx=target.stage_idx,
        batch_seq=batch.batch_seq,
        columns=table,
        # Only failed samples carry a message (agent/sample.py `fail`): look at those alone.
        errors=[(i, e) for i in np.flatnonzero(table[_STATUS] != repo.OK_STATUS).tolist() if (e := batch.error[i])],
        itl_ns=itl.astype("<i8", copy=False).tobytes(),
        server_scrapes=scrape_rows(batch.server_scrapes),
    )


class Ingestor:
    """Commits sample batches in order and calls back after each commit."""

    def __init__(self, db: Database, observer: IngestObserver | None = None) -> None:
        self._db = db
        self._observer = observer
        self._queue: asyncio.Queue[_Item] = asyncio.Queue(QUEUE_BATCHES)
        self._task: asyncio.Task[None] | None = None

    @property
    def queue_depth(self) -> int:
        """Batches waiting for the writer."""
        return self._queue.qsize()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="ingest")

    async def submit(
        self,
        target: IngestTarget,
        batch: agent_service_pb2.SampleBatch,
        on_committed: Callable[[repo.IngestOutcome, repo.BatchIngest], None],
    ) -> None:
        """Queue a batch; raises MalformedBatch for a batch that cannot be stored."""
        item = _Item(to_ingest(target, batch), batch.assignment_id, on_committed, target.run_id)
        await self._queue.put(item)

    async def drain(self) -> None:
        """Wait until every queued batch is committed (used at shutdown)."""
        await self._queue.join()

    async def stop(self) -> None:
        await self.drain()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _run(self) -> None:
        while True:
            items = [await self._queue.get()]
            while len(items) < MAX_BATCHES_PER_COMMIT and not self._queue.empty():
                items.append(self._queue.get_nowait())
            started = time.perf_counter()
            try:
                outcomes = await self._db.write(repo.ingest_batches, [i.batch for i in items])
                if self._observer is not None:
                    self._observer.commit_took(time.perf_counter() - started)
            except Exception:
                # Nothing was committed, so nothing is acked: the agents replay these
                # batches after their next reconnect.
                log.exception("ingest_failed", batches=len(items))
                outcomes = []
            for item, outcome in zip(items, outcomes, strict=False):
                try:
                    if self._observer is not None:
                        self._observer.committed(item.run_id, item.batch, outcome)
                    item.on_committed(outcome, item.batch)
                except Exception:
                    log.exception("ingest_callback_failed", assignment_id=item.assignment_id)
            for _ in items:
                self._queue.task_done()
