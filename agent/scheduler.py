"""When requests are sent: load schedules behind one small interface.

A `LoadSchedule` decides *when* each request starts and calls `send_one(scheduled_ns)`;
what a request contains, how it is sent and where its sample goes is the caller's
business (`agent.assignment`), so an open-loop schedule (precomputed arrival times from a
seeded RNG, `scheduled_ns` = the arrival time) can be added beside `ClosedLoopSchedule`
without touching the client or the batcher.

Closed loop: N workers; each worker takes `scheduled = now` (the moment it became free),
then awaits one request, and repeats until the stage duration has elapsed (measured from
the start of `run()`) or the shared request budget is used up, whichever comes first. The
budget is one counter shared by all workers, so exactly `max_requests` requests are sent in
total whatever their completion order.

At the end of the duration no new request is started, but requests in flight are allowed to
finish (each is bounded by the target's request timeout). Cutting them off would record the
slowest requests of every stage as `cancelled` and bias the latency distribution toward the
fast ones; the price is that a stage can overrun its duration by up to one request.
Cancelling `run()` (a cancelled assignment) cancels the in-flight requests instead.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol

from common.proto.loadtest.v1 import run_pb2

SendOne = Callable[[int], Awaitable[None]]
"""Performs one request scheduled at the given `perf_counter_ns()` time; never raises for
errors on the wire (they become samples)."""


class UnsupportedStageError(ValueError):
    """The stage asks for a load model or limits this agent cannot run."""


class RequestBudget:
    """A request counter shared by all workers of a stage (0 = unlimited)."""

    __slots__ = ("_limit", "_taken")

    def __init__(self, limit: int = 0) -> None:
        self._limit = limit
        self._taken = 0

    @property
    def taken(self) -> int:
        """Requests started so far."""
        return self._taken

    def take(self) -> bool:
        """Claim one request; False once the budget is used up."""
        if self._limit and self._taken >= self._limit:
            return False
        self._taken += 1
        return True


class LoadSchedule(Protocol):
    """Decides when requests start; `run` returns when the stage's load is done."""

    async def run(self, send_one: SendOne) -> None:
        """Start requests through `send_one` until the stage ends; wait for them."""
        ...


@dataclass(frozen=True, slots=True)
class ClosedLoopSchedule:
    """`concurrency` workers, each sending its next request as soon as the last one ended."""

    concurrency: int
    duration_s: float | None = None
    max_requests: int = 0

    async def run(self, send_one: SendOne) -> None:
        """Run the workers until the duration or the request budget is exhausted."""
        clock = time.perf_counter_ns
        deadline_ns = clock() + int(self.duration_s * 1e9) if self.duration_s is not None else None
        budget = RequestBudget(self.max_requests)
        async with asyncio.TaskGroup() as workers:
            for _ in range(self.concurrency):
                workers.create_task(self._worker(send_one, budget, deadline_ns))

    @staticmethod
    async def _worker(send_one: SendOne, budget: RequestBudget, deadline_ns: int | None) -> None:
        clock = time.perf_counter_ns
        while True:
            now = clock()
            if deadline_ns is not None and now >= deadline_ns:
                return
            if not budget.take():
                return
            await send_one(now)
            # A request that fails without awaiting anything (e.g. refused before any I/O)
            # must not let one worker monopolise the event loop.
            await asyncio.sleep(0)


def schedule_for_stage(stage: run_pb2.Stage) -> LoadSchedule:
    """The schedule for this agent's share of a stage."""
    load = stage.WhichOneof("load")
    if load != "concurrency":
        raise UnsupportedStageError(f"unsupported load model {load or 'unset'!r}")
    duration_s: float | None = None
    if stage.HasField("duration"):
        seconds = stage.duration.ToNanoseconds() / 1e9
        if seconds > 0:
            duration_s = seconds
    if duration_s is None and stage.requests == 0:
        raise UnsupportedStageError("stage needs a duration or a request count")
    return ClosedLoopSchedule(concurrency=stage.concurrency, duration_s=duration_s, max_requests=stage.requests)
