"""Results of runs as the API returns them; a final run's is computed once and kept in SQLite.

A result is a pure function of the run's stored batches, its spec and its state. A running
run's result is computed on every call. A final run's is computed when the run ends (a
background task: the coordinator calls `run_finished` on every path to a final state, and so
does cancelling a pending run) and stored (SQLite: `run_results`, migration 8) as the serialized
loadtest.v1.RunResult itself; the most recently read ones are also kept in memory. A stored
or cached result is used while the run's version is the one it was computed at: (state,
stored batches, highest batch pk) and `RESULT_FORMAT`. A batch stored later (a replay after
an agent rejoins) changes the version; the next read recomputes and replaces the result.

Costs, 1M samples with 8 gaps each: the version is one covering-index lookup; a stored result is one
row and a protobuf parse (milliseconds); computing it takes one to two seconds on a reader
thread. Requests for the same run at the same version share one computation.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import OrderedDict
from dataclasses import dataclass

import structlog
from google.protobuf.message import DecodeError

from common.proto.loadtest.v1 import run_pb2
from controller.domain.results.compute import compute_run_result
from controller.domain.results.message import result_message
from controller.domain.spec import parse_spec
from controller.store import repository as repo
from controller.store.interface import SnapshotReads, Store

log = structlog.get_logger(__name__)

# The version of the computation and of its message. Bump it whenever either changes
# (controller/domain/results/compute.py, the metric math in common/metrics.py,
# controller/domain/results/message.py, loadtest.v1.RunResult): results stored with another format are
# recomputed and replaced when next read.
# 2: stored samples impossible for their stage are left out (StageResult.samples_ignored).
# 3: StageResult.requests_retried, RunResult.warnings.
# 4: RunResult.capacity (a capacity search), run-level checks (`capacity`, stage_index -1).
# 5: confidence intervals (LatencyStats.*_ci, StageResult.*_ci and error_rate,
#    RunResult.confidence_percent); results stored before them gain them when next read.
# 6: ITL intervals rest on the requests with gaps, not on every gap (docs/metrics.md, "ITL").
# 7: RunResult.tokens (how exact token counts are, the chat template's overhead); reasoning
#    (ttfr, ttfo, reasoning/answer tokens), prefix cache (cached tokens, hit percent, client
#    and server), conversations (turns, sessions); samples' new columns.
RESULT_FORMAT = 7
DEFAULT_MAX_CACHED = 16
# Background computations run one at a time: a burst of finishing runs leaves the rest of the
# read pool to the API's reads.
BACKGROUND_CONCURRENCY = 1

Version = tuple[int, int, int]  # (state, stored batches, highest batch pk)


class ResultCache:
    """Results of the most recently read final runs (least recently used leave first)."""

    def __init__(self, max_runs: int = DEFAULT_MAX_CACHED) -> None:
        self._max_runs = max_runs
        self._entries: OrderedDict[str, tuple[Version, run_pb2.RunResult]] = OrderedDict()

    def get(self, run_id: str, version: Version) -> run_pb2.RunResult | None:
        """The cached result of the run if it was computed at `version`."""
        entry = self._entries.get(run_id)
        if entry is None or entry[0] != version:
            return None
        self._entries.move_to_end(run_id)
        return entry[1]

    def put(self, run_id: str, version: Version, result: run_pb2.RunResult) -> None:
        self._entries[run_id] = (version, result)
        self._entries.move_to_end(run_id)
        while len(self._entries) > self._max_runs:
            self._entries.popitem(last=False)

    def forget(self, run_id: str) -> None:
        self._entries.pop(run_id, None)


@dataclass(frozen=True)
class ComputedResult:
    version: Version
    message: run_pb2.RunResult
    compute_ms: float


def compute_result(reads: SnapshotReads, run_pk: int, run_id: str, spec: run_pb2.RunSpec, state: int) -> ComputedResult:
    """A snapshot job: the result computed from the stored samples. The version is read in the
    same snapshot as the samples, so it is exactly the version computed."""
    started = time.perf_counter()
    batches, last_batch_pk = reads.sample_batches_version(run_pk)
    message = result_message(run_id, state, compute_run_result(reads, run_pk, spec, state))
    compute_ms = (time.perf_counter() - started) * 1000.0
    return ComputedResult((state, batches, last_batch_pk), message, compute_ms)


def stored_result(reads: SnapshotReads, run_pk: int, run_id: str, version: Version) -> run_pb2.RunResult | None:
    """A snapshot job (the parse runs where the row is read): the run's stored result if it was
    computed at `version` in this format."""
    row = reads.get_run_result(run_pk)
    if row is None or row.version != version or row.format != RESULT_FORMAT:
        return None
    try:
        message = run_pb2.RunResult.FromString(row.result)
    except DecodeError:
        return None  # a damaged row is only a result to compute again
    return message if message.run_id == run_id else None


class RunResults:
    """Results of runs: computed for running runs, stored once for final ones."""

    def __init__(self, store: Store, max_cached: int = DEFAULT_MAX_CACHED, *, keep: bool = True) -> None:
        self._store = store
        self._keep = keep  # False on a read-only database (the CLI's --db): compute, keep nothing
        self._cache = ResultCache(max_cached)
        # One computation (or stored-row read) per run and version, shared by whoever asks.
        self._shared: dict[tuple[str, Version], asyncio.Task[run_pb2.RunResult]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self._background_slots = asyncio.Semaphore(BACKGROUND_CONCURRENCY)
        self._closed = False

    async def get(self, record: repo.RunRecord) -> run_pb2.RunResult:
        """The run's result. A final run's is shared with other callers: read it, don't modify it."""
        if not record.is_final:
            computed = await self._store.read_snapshot(
                compute_result, record.pk, record.run_id, parse_spec(record), record.state
            )
            return computed.message
        version = (record.state, *await self._store.sample_batches_version(record.pk))
        cached = self._cache.get(record.run_id, version)
        if cached is not None:
            return cached
        key = (record.run_id, version)
        task = self._shared.get(key)
        if task is None:
            task = asyncio.create_task(self._load_or_compute(record, version), name=f"result-{record.run_id}")
            self._shared[key] = task
            task.add_done_callback(functools.partial(self._shared_done, key))
        # Shielded: a caller that goes away (a cancelled RPC) leaves the computation to the others.
        return await asyncio.shield(task)

    def run_finished(self, run_id: str) -> None:
        """Compute and store the result of a run that has just reached a final state, in the background."""
        if self._closed:
            return
        task = asyncio.create_task(self._store_finished(run_id), name=f"store-result-{run_id}")
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def forget(self, run_id: str) -> None:
        """Drop the in-memory copy of a deleted run's result (its stored row goes with the run)."""
        self._cache.forget(run_id)

    async def close(self) -> None:
        """Cancel the computations still pending (before the database closes). A store is one
        statement in one transaction: a cancelled computation leaves no row, never half of one."""
        self._closed = True
        tasks = [*self._background, *self._shared.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _load_or_compute(self, record: repo.RunRecord, version: Version) -> run_pb2.RunResult:
        message = await self._store.read_snapshot(stored_result, record.pk, record.run_id, version)
        if message is None:
            computed = await self._store.read_snapshot(
                compute_result, record.pk, record.run_id, parse_spec(record), record.state
            )
            if not self._keep:
                return computed.message
            serialized = computed.message.SerializeToString(deterministic=True)
            row = repo.StoredResult(*computed.version, RESULT_FORMAT, serialized)
            if not await self._store.put_run_result(record.pk, record.run_id, row):
                return computed.message  # the run was deleted meanwhile: nothing to keep
            log.info(
                "run_result_stored",
                run_id=record.run_id,
                samples=await self._store.count_samples(record.pk),
                compute_ms=round(computed.compute_ms, 1),
                result_bytes=len(serialized),
            )
            message, version = computed.message, computed.version
        self._cache.put(record.run_id, version, message)
        return message

    async def _store_finished(self, run_id: str) -> None:
        async with self._background_slots:
            try:
                record = await self._store.get_run(run_id)
                if record is not None and record.is_final:
                    await self.get(record)
            except Exception:
                log.exception("run_result_failed", run_id=run_id)

    def _shared_done(self, key: tuple[str, Version], task: asyncio.Task[run_pb2.RunResult]) -> None:
        if self._shared.get(key) is task:
            del self._shared[key]
        if not task.cancelled():
            task.exception()  # retrieved here: every caller waiting for it has it already
