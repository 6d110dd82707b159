"""In-memory live view of running runs: a trailing window of recent requests and a
notification hub that wakes WatchRun streams when something changes.

Results are always computed from stored samples; these numbers are only for watching.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from common.metrics import SampleColumns, compute_stage_metrics, counted_ok_mask
from controller.domain.results.checks import ParsedCheck

WINDOW_S = 10.0


@dataclass
class LiveSnapshot:
    window_s: float = 0.0
    request_throughput: float = 0.0
    output_token_throughput: float = 0.0
    ttft_p50_ms: float = 0.0
    ttft_p99_ms: float = 0.0
    stage_elapsed_s: float = 0.0
    stage_planned_s: float = 0.0
    stage_requests_done: int = 0
    stage_requests_planned: int = 0


MIN_REQUESTS_FOR_ABORT = 10


@dataclass
class _Chunk:
    at: float  # controller monotonic time of commit
    ok: int
    tokens: int
    ttft_ms: np.ndarray
    columns: SampleColumns


@dataclass
class LiveWindow:
    """Recent committed samples of one run."""

    chunks: deque[_Chunk] = field(default_factory=deque)
    stage_index: int = 0
    stage_started: float = 0.0
    stage_planned_s: float = 0.0
    stage_requests_planned: int = 0
    stage_requests_done: int = 0

    def start_stage(self, index: int, planned_s: float, planned_requests: int) -> None:
        self.chunks.clear()
        self.stage_index = index
        self.stage_started = time.monotonic()
        self.stage_planned_s = planned_s
        self.stage_requests_planned = planned_requests
        self.stage_requests_done = 0

    def add(self, ok: int, failed: int, tokens: int, columns: SampleColumns) -> None:
        now = time.monotonic()
        keep = counted_ok_mask(columns.status, columns.flags) & (columns.first_token_ns > 0)
        self.chunks.append(_Chunk(now, ok, tokens, columns.first_token_ns[keep] / 1e6, columns))
        self.stage_requests_done += ok + failed
        self._trim(now)

    def snapshot(self) -> LiveSnapshot:
        now = time.monotonic()
        self._trim(now)
        elapsed = now - self.stage_started if self.stage_started else 0.0
        window = min(WINDOW_S, elapsed) or WINDOW_S
        ok = sum(c.ok for c in self.chunks)
        tokens = sum(c.tokens for c in self.chunks)
        ttft = np.concatenate([c.ttft_ms for c in self.chunks]) if self.chunks else np.empty(0)
        p50, p99 = np.percentile(ttft, [50, 99]) if ttft.size else (0.0, 0.0)
        return LiveSnapshot(
            window_s=window,
            request_throughput=ok / window,
            output_token_throughput=tokens / window,
            ttft_p50_ms=float(p50),
            ttft_p99_ms=float(p99),
            stage_elapsed_s=elapsed,
            stage_planned_s=self.stage_planned_s,
            stage_requests_done=self.stage_requests_done,
            stage_requests_planned=self.stage_requests_planned,
        )

    def failed_check(self, checks: list[ParsedCheck]) -> str | None:
        """The message of the first check lost over the window (None: all hold, or too few requests)."""
        self._trim(time.monotonic())
        if not self.chunks:
            return None
        cols = SampleColumns.concat([c.columns for c in self.chunks])
        metrics = compute_stage_metrics(cols)
        if metrics.requests_ok + metrics.requests_failed < MIN_REQUESTS_FOR_ABORT:
            return None
        for check in checks:
            passed, _, message = check.evaluate(metrics)
            if not passed:
                return message
        return None

    def _trim(self, now: float) -> None:
        while self.chunks and now - self.chunks[0].at > WINDOW_S:
            self.chunks.popleft()


class RunHub:
    """Wakes watchers of a run when it changes."""

    def __init__(self) -> None:
        self._events: dict[str, asyncio.Event] = {}

    def notify(self, run_id: str) -> None:
        event = self._events.pop(run_id, None)
        if event is not None:
            event.set()

    async def wait(self, run_id: str, timeout: float) -> bool:
        """Wait until the run changes or `timeout` passes; True if it changed."""
        event = self._events.setdefault(run_id, asyncio.Event())
        try:
            async with asyncio.timeout(timeout):
                await event.wait()
            return True
        except TimeoutError:
            return False
