"""Sample ingest: batches from every agent stream go through one queue to the single
SQLite writer, many batches per transaction; acks go back only after the commit.

The queue is bounded: when the store (SQLite) falls behind, `submit` blocks, the servicer stops
reading its stream, and gRPC flow control pushes back on the agents (backpressure
instead of unbounded memory).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import structlog

from common.codes import RequestStatus
from common.proto.loadtest.v1 import agent_service_pb2
from controller.domain.results import sample_limits as limits
from controller.domain.results.server_metrics import scrape_rows
from controller.store import repository as repo
from controller.store.interface import SampleStore

log = structlog.get_logger(__name__)

MAX_BATCHES_PER_COMMIT = 64
QUEUE_BATCHES = 512

MAX_ERROR_CHARS = 1000


@dataclass(frozen=True)
class IngestTarget:
    """Where a batch belongs, as resolved by the coordinator, and the window its samples
    must lie in (controller clock)."""

    assignment_pk: int
    run_pk: int
    run_id: str
    stage_idx: int
    window_start_ns: int  # when the assignment was created
    window_end_ns: int | None  # when it ended; None while it runs (the window ends now)
    clock_offset_ns: int  # controller clock minus the agent's clock


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
_SENT = repo.SAMPLE_COLUMNS.index("sent_unix_ns")
# Columns sent as uint64: read as such and reinterpreted as int64 (a value beyond int64 turns negative and is refused).
_UNSIGNED64 = frozenset(
    {
        "queue_delay_ns",
        "first_byte_ns",
        "first_token_ns",
        "last_token_ns",
        "done_ns",
        "itl_ns",
        "first_reasoning_ns",
        "first_answer_ns",
        "session_id",
    }
)
# Columns a batch may leave empty (every value 0): the requested lengths (agents older than
# them send none) and the reasoning, prefix-cache and conversation columns (agent_service.proto).
_MAY_BE_EMPTY = frozenset(
    {
        "requested_input_tokens",
        "requested_output_tokens",
        "first_reasoning_ns",
        "first_answer_ns",
        "reasoning_tokens",
        "cached_prompt_tokens",
        "session_id",
        "turn_index",
    }
)


class MalformedBatch(ValueError):
    """A batch that cannot be stored: columns that disagree in length, or impossible values.
    The message names the batch, the column and the first offending sample."""


def to_ingest(
    target: IngestTarget, batch: agent_service_pb2.SampleBatch, now_ns: int | None = None
) -> repo.BatchIngest:
    """Check a batch's shape and every value against controller/domain/results/sample_limits.py, and
    turn it into a column table for the writer (numpy reads the packed repeated fields in a
    few microseconds each; no Python loop per sample). Raises MalformedBatch naming the
    batch, the rule and the first sample breaking it."""
    where = f"SampleBatch {batch.assignment_id[:64]} #{batch.batch_seq}"
    if not 1 <= batch.batch_seq <= limits.MAX_BATCH_SEQ:
        raise MalformedBatch(f"{where}: batch_seq must be between 1 and {limits.MAX_BATCH_SEQ}")
    n = len(batch.error)
    table = np.zeros((len(repo.SAMPLE_COLUMNS), n), dtype=np.int64)
    for i, name in enumerate(repo.SAMPLE_COLUMNS):
        values = getattr(batch, name)
        if len(values) != n:
            if not values and name in _MAY_BE_EMPTY:
                continue  # zeros: unknown, none, not a conversation
            raise MalformedBatch(f"{where}: sample columns differ in length ({name} has {len(values)}, error {n})")
        table[i] = _int64(name, values)
    itl = _int64("itl_ns", batch.itl_ns)
    if int(table[_ITL_COUNT].sum()) != itl.size:
        raise MalformedBatch(f"{where}: itl_count does not add up to len(itl_ns)")
    slack, now = limits.SLACK_NS, time.time_ns() if now_ns is None else now_ns
    # The window in the agent's clock (Python ints, compared exactly).
    lo = target.window_start_ns - slack - target.clock_offset_ns
    hi = (now if target.window_end_ns is None else target.window_end_ns) + slack - target.clock_offset_ns
    columns = dict(zip(repo.SAMPLE_COLUMNS, table, strict=True))
    for rule, bad in limits.violations(columns, itl, lo, hi):
        k = int(np.flatnonzero(bad)[0])
        raise MalformedBatch(
            f"{where}: sample {k} (sent_unix_ns {table[_SENT][k]}): {rule}; the window is [{lo}, {hi}] (agent clock)"
        )
    return repo.BatchIngest(
        assignment_pk=target.assignment_pk,
        run_pk=target.run_pk,
        stage_idx=target.stage_idx,
        batch_seq=batch.batch_seq,
        columns=table,
        # Only failed samples carry a message (agent/sample.py `fail`): look at those alone.
        errors=[
            (i, e[:MAX_ERROR_CHARS])
            for i in np.flatnonzero(table[_STATUS] != RequestStatus.OK).tolist()
            if (e := batch.error[i])
        ],
        itl_ns=itl.astype("<i8", copy=False).tobytes(),
        server_scrapes=scrape_rows(batch.server_scrapes),
    )


def _int64(name: str, values: Sequence[int]) -> np.ndarray:
    """A column as int64. uint64 columns are read as such and reinterpreted: a value beyond
    int64 becomes negative, which every limit refuses."""
    if name not in _UNSIGNED64:
        return np.asarray(values, dtype=np.int64)
    return np.asarray(values, dtype=np.uint64).view(np.int64)


class Ingestor:
    """Commits sample batches in order and calls back after each commit."""

    def __init__(self, store: SampleStore, observer: IngestObserver | None = None) -> None:
        self._store = store
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
            results = await self._write(items)
            for item, outcome in results:
                try:
                    if self._observer is not None:
                        self._observer.committed(item.run_id, item.batch, outcome)
                    item.on_committed(outcome, item.batch)
                except Exception:
                    log.exception("ingest_callback_failed", assignment_id=item.assignment_id)
            for _ in items:
                self._queue.task_done()

    async def _write(self, items: list[_Item]) -> list[tuple[_Item, repo.IngestOutcome]]:
        """Commit `items` in one transaction; if it fails, each one alone, so that a batch
        that cannot be written fails by itself and never takes the others down with it."""
        started = time.perf_counter()
        try:
            outcomes = await self._store.ingest_batches([i.batch for i in items])
            if self._observer is not None:
                self._observer.commit_took(time.perf_counter() - started)
            return list(zip(items, outcomes, strict=True))
        except Exception:
            if len(items) == 1:
                # Nothing was committed, so nothing is acked: the agent replays the batch
                # after its next reconnect.
                log.exception("ingest_failed", assignment_id=items[0].assignment_id, batch_seq=items[0].batch.batch_seq)
                return []
            log.warning("ingest_group_failed_retrying_alone", batches=len(items))
        done: list[tuple[_Item, repo.IngestOutcome]] = []
        for item in items:
            done.extend(await self._write([item]))
        return done
