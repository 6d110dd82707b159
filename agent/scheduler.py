"""When requests are sent: the closed-loop and open-loop schedules behind one interface.

A `LoadSchedule` decides *when* each request starts and calls `send_one(scheduled_ns,
warmup)`; what a request contains, how it is sent and where its sample goes is the caller's
business (`agent.assignment`). `scheduled_ns` is a `perf_counter_ns()` reading: when the
load model wanted the request sent. Whatever happens between it and the client's `sent`
stamp (a late timer, a concurrency cap, batcher backpressure) is queue delay, so an agent
that falls behind shows it instead of hiding it (no coordinated omission).

Closed loop (`ClosedLoopSchedule`): N workers; a worker sends, waits for the response and
sends again, each time with `scheduled = now` (the moment it became free). Worker i starts
at `ramp * i / N` when the stage has a ramp (active workers rise linearly from 1 to N),
otherwise at `start_window * i / N`: spreading the first requests over a short window keeps
N streams from starting, and then ticking, in lockstep (see `default_start_window_s`). A
worker's first request is scheduled at its planned start.

Open loop (`OpenLoopSchedule`): due times come from an `ArrivalSchedule` (seeded, computed
ahead in blocks). One dispatcher task sleeps until the next due time and spawns a task per
request; when it is behind it sends every request already due at once, each with its own
due time as `scheduled`, never skipping or bunching them into one. With `max_concurrency`
the dispatcher waits for a free slot before spawning, so a request held back by the cap
keeps its due time and its wait shows as queue delay (and memory stays bounded by the cap).

Stopping: at the end of the duration (measured from the start of `run()`) no new request is
started, but requests in flight finish (each is bounded by the target's request timeout):
cutting them off would record the slowest requests of every stage as `cancelled` and bias
the latencies toward the fast ones. An open-loop arrival that was due before the end but is
still held back when the stage ends (by the cap, or an agent too slow to keep up) is handed
to `abandon(scheduled_ns, warmup)`, which records it as a cancelled request, so traffic the
stage did not deliver is counted rather than silently dropped. A lag of up to
`END_GRACE_S` (timer jitter) is not "held back": such a request is still sent. The request
budget (`requests`) counts every request, warmup included, sent or abandoned.

Warmup (`Warmup`): a request *scheduled* within the first `warmup_duration` of the stage,
or among its first `warmup_requests`, is flagged; it runs like any other.

Stopping early (`stop`): `run()` takes an optional `asyncio.Event`; once it is set, no new
unit is started (a closed-loop worker returns instead of sending again, the open-loop
dispatcher stops dispatching, also while it sleeps until the next due time) and the units in
flight finish. Conversations use it: a schedule unit is then a whole session
(`agent.conversation`), and the stage's request budget, counted in turns, is spent inside
the sessions, so only they know when it is used up.

Cancelling `run()` (a cancelled assignment) cancels the in-flight requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

from google.protobuf import duration_pb2

from agent.arrivals import ArrivalSchedule
from common.durations import seconds
from common.proto.loadtest.v1 import run_pb2

SendOne = Callable[[int, bool], Awaitable[None]]
"""Performs one request scheduled at `scheduled_ns` (a `perf_counter_ns()` time), flagged as
warmup or not; never raises for errors on the wire (they become samples)."""

Abandon = Callable[[int, bool], None]
"""Records a request that was due at `scheduled_ns` but never sent (the stage ended first)."""

END_GRACE_S = 0.1
MAX_START_WINDOW_S = 1.0
START_WINDOW_PER_WORKER_S = 0.002


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


@dataclass(frozen=True, slots=True)
class Warmup:
    """Which requests of a stage are warmup: scheduled within `duration_s` of its start, or
    among its first `requests`."""

    duration_s: float = 0.0
    requests: int = 0

    def applies(self, index: int, offset_ns: int) -> bool:
        """Whether request number `index` (0-based), scheduled `offset_ns` into the stage, is warmup."""
        return index < self.requests or offset_ns < self.duration_s * 1e9


def default_start_window_s(concurrency: int) -> float:
    """How long a closed loop takes to start all its workers: 2 ms each, at most 1 s.

    Starting N streams in the same millisecond makes the agent (and the server) handle N
    requests and then N token events at once, every ITL; the queueing that causes shows up
    as TTFT. 2 ms per worker is short against any stage yet spreads the events apart.
    """
    return min(MAX_START_WINDOW_S, START_WINDOW_PER_WORKER_S * concurrency)


class LoadSchedule(Protocol):
    """Decides when requests start; `run` returns when the stage's load is done."""

    async def run(self, send_one: SendOne, abandon: Abandon, stop: asyncio.Event | None = None) -> None:
        """Start requests through `send_one` until the stage ends (or `stop` is set); wait for them."""
        ...


@dataclass(frozen=True, slots=True)
class ClosedLoopSchedule:
    """`concurrency` workers, each sending its next request as soon as the last one ended."""

    concurrency: int
    duration_s: float | None = None
    max_requests: int = 0
    ramp_s: float = 0.0
    start_window_s: float = 0.0
    warmup: Warmup = field(default_factory=Warmup)

    def start_offset_s(self, worker: int) -> float:
        """When worker number `worker` (0-based) sends its first request."""
        window = self.ramp_s if self.ramp_s > 0 else self.start_window_s
        return window * worker / self.concurrency

    async def run(self, send_one: SendOne, abandon: Abandon | None = None, stop: asyncio.Event | None = None) -> None:
        """Run the workers until the duration or the request budget is exhausted (or `stop` is set)."""
        start_ns = time.perf_counter_ns()
        deadline_ns = start_ns + int(self.duration_s * 1e9) if self.duration_s is not None else None
        budget = RequestBudget(self.max_requests)
        async with asyncio.TaskGroup() as workers:
            for i in range(self.concurrency):
                first_ns = start_ns + int(self.start_offset_s(i) * 1e9)
                workers.create_task(self._worker(send_one, budget, start_ns, first_ns, deadline_ns, stop))

    async def _worker(
        self,
        send_one: SendOne,
        budget: RequestBudget,
        start_ns: int,
        first_ns: int,
        deadline_ns: int | None,
        stop: asyncio.Event | None = None,
    ) -> None:
        clock = time.perf_counter_ns
        if deadline_ns is not None and first_ns >= deadline_ns:
            return
        delay_ns = first_ns - clock()
        if delay_ns > 0:
            await asyncio.sleep(delay_ns / 1e9)
        scheduled = first_ns
        warmup = self.warmup
        while True:
            if deadline_ns is not None and scheduled >= deadline_ns:
                return
            if stop is not None and stop.is_set():
                return
            if not budget.take():
                return
            await send_one(scheduled, warmup.applies(budget.taken - 1, scheduled - start_ns))
            # A request that fails without awaiting anything (e.g. refused before any I/O)
            # must not let one worker monopolise the event loop.
            await asyncio.sleep(0)
            scheduled = clock()


@dataclass(frozen=True, slots=True)
class OpenLoopSchedule:
    """Requests at precomputed arrival times, optionally capped in flight."""

    arrivals: ArrivalSchedule
    max_concurrency: int = 0
    warmup: Warmup = field(default_factory=Warmup)
    end_grace_s: float = END_GRACE_S

    async def run(self, send_one: SendOne, abandon: Abandon, stop: asyncio.Event | None = None) -> None:
        """Dispatch every arrival (until `stop` is set); return when all requests have finished."""
        clock = time.perf_counter_ns
        start_ns = clock()
        duration_s = self.arrivals.duration_s
        # Past this point an arrival still waiting is abandoned rather than sent.
        cutoff_ns = start_ns + int((duration_s + self.end_grace_s) * 1e9) if duration_s is not None else None
        cap = asyncio.Semaphore(self.max_concurrency) if self.max_concurrency > 0 else None
        due = self._due(start_ns)
        async with asyncio.TaskGroup() as requests:
            for scheduled, warmup in due:
                delay_ns = scheduled - clock()
                if delay_ns > 0:
                    if stop is None:
                        await asyncio.sleep(delay_ns / 1e9)
                    else:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), delay_ns / 1e9)
                if stop is not None and stop.is_set():
                    break
                if cap is not None and not await _acquire(cap, cutoff_ns):
                    abandoned = True
                elif cutoff_ns is not None and clock() >= cutoff_ns:
                    if cap is not None:
                        cap.release()
                    abandoned = True
                else:
                    abandoned = False
                if abandoned:
                    abandon(scheduled, warmup)
                    for rest in due:
                        abandon(*rest)
                    break
                requests.create_task(_send_and_release(send_one, scheduled, warmup, cap))

    def _due(self, start_ns: int) -> Iterator[tuple[int, bool]]:
        """(scheduled_ns, warmup) of every arrival, in order."""
        warmup = self.warmup
        index = 0
        for block in self.arrivals.blocks():
            for offset_ns in block.tolist():
                yield start_ns + offset_ns, warmup.applies(index, offset_ns)
                index += 1


async def _acquire(cap: asyncio.Semaphore, cutoff_ns: int | None) -> bool:
    """Take a slot of the cap; False if the stage's cutoff passed first."""
    if cutoff_ns is None or not cap.locked():
        await cap.acquire()  # with a free slot this returns without suspending
        return True
    try:
        async with asyncio.timeout(max(cutoff_ns - time.perf_counter_ns(), 0) / 1e9):
            await cap.acquire()
    except TimeoutError:
        return False
    return True


async def _send_and_release(send_one: SendOne, scheduled_ns: int, warmup: bool, cap: asyncio.Semaphore | None) -> None:
    try:
        await send_one(scheduled_ns, warmup)
    finally:
        if cap is not None:
            cap.release()


def _seconds(duration: duration_pb2.Duration) -> float:
    """`duration` in seconds, a negative one as 0 (the controller rejects those anyway)."""
    return max(seconds(duration), 0.0)


def schedule_for_stage(stage: run_pb2.Stage, seed: int = 0) -> LoadSchedule:
    """The schedule for this agent's share of a stage (`seed`: the workload's seed)."""
    duration_s = _seconds(stage.duration) if stage.HasField("duration") else 0.0
    if duration_s <= 0 and stage.requests == 0:
        raise UnsupportedStageError("stage needs a duration or a request count")
    warmup = Warmup(duration_s=_seconds(stage.warmup_duration), requests=stage.warmup_requests)
    ramp_s = _seconds(stage.ramp)
    load = stage.WhichOneof("load")
    if load == "concurrency":
        if stage.concurrency == 0:
            raise UnsupportedStageError("concurrency must be at least 1")
        return ClosedLoopSchedule(
            concurrency=stage.concurrency,
            duration_s=duration_s or None,
            max_requests=stage.requests,
            ramp_s=ramp_s,
            start_window_s=default_start_window_s(stage.concurrency),
            warmup=warmup,
        )
    if load == "request_rate":
        try:
            arrivals = ArrivalSchedule(
                rate=stage.request_rate,
                process=stage.arrival or run_pb2.ARRIVAL_PROCESS_POISSON,
                burstiness=stage.burstiness or 1.0,
                seed=seed,
                duration_s=duration_s or None,
                max_requests=stage.requests,
                ramp_s=ramp_s,
            )
        except ValueError as exc:
            raise UnsupportedStageError(str(exc)) from None
        return OpenLoopSchedule(arrivals=arrivals, max_concurrency=stage.max_concurrency, warmup=warmup)
    raise UnsupportedStageError(f"unsupported load model {load or 'unset'!r}")
