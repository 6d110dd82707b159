"""ClosedLoopSchedule: exact request budgets, duration, concurrency, cancellation."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.scheduler import (
    ClosedLoopSchedule,
    RequestBudget,
    UnsupportedStageError,
    schedule_for_stage,
)
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(60)


class FakeSender:
    """Stands in for the client: counts calls and concurrency, takes `delay_s` each."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0

    async def __call__(self, scheduled_ns: int) -> None:
        self.calls.append(scheduled_ns)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1


def test_budget_counts_exactly() -> None:
    budget = RequestBudget(3)
    assert [budget.take() for _ in range(5)] == [True, True, True, False, False]
    assert budget.taken == 3
    unlimited = RequestBudget(0)
    assert all(unlimited.take() for _ in range(1000))


@pytest.mark.parametrize(("concurrency", "requests"), [(8, 40), (8, 3), (1, 5), (7, 100)])
async def test_request_budget_is_exact(concurrency: int, requests: int) -> None:
    sender = FakeSender(delay_s=0.001)
    await ClosedLoopSchedule(concurrency=concurrency, max_requests=requests).run(sender)
    assert len(sender.calls) == requests
    assert sender.max_in_flight == min(concurrency, requests)


async def test_duration_stops_new_requests_and_lets_in_flight_finish() -> None:
    sender = FakeSender(delay_s=0.05)
    started = time.perf_counter_ns()
    await ClosedLoopSchedule(concurrency=4, duration_s=0.2).run(sender)
    elapsed_s = (time.perf_counter_ns() - started) / 1e9
    assert sender.cancelled == 0  # in-flight requests were allowed to finish
    assert all(t - started < 0.2e9 for t in sender.calls)
    assert 0.2 <= elapsed_s < 2
    assert 4 * 2 <= len(sender.calls) <= 4 * 5


async def test_duration_and_budget_whichever_first() -> None:
    sender = FakeSender(delay_s=0.001)
    await ClosedLoopSchedule(concurrency=2, duration_s=10, max_requests=6).run(sender)
    assert len(sender.calls) == 6


async def test_scheduled_time_is_when_the_worker_became_free() -> None:
    sender = FakeSender(delay_s=0.02)
    await ClosedLoopSchedule(concurrency=1, max_requests=3).run(sender)
    gaps = [b - a for a, b in zip(sender.calls, sender.calls[1:], strict=False)]
    assert all(g >= 0.02e9 for g in gaps)


async def test_cancellation_cancels_in_flight_and_propagates() -> None:
    sender = FakeSender(delay_s=30)
    task = asyncio.create_task(ClosedLoopSchedule(concurrency=5, duration_s=60).run(sender))
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 10
    while True:  # poll with a deadline
        if sender.in_flight == 5 or loop.time() > deadline:
            break
        await asyncio.sleep(0.001)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sender.cancelled == 5
    assert sender.in_flight == 0


async def test_sender_failure_fails_the_schedule() -> None:
    async def broken(_: int) -> None:
        raise RuntimeError("bug")

    with pytest.raises(ExceptionGroup):
        await ClosedLoopSchedule(concurrency=2, max_requests=10).run(broken)


def test_schedule_for_stage() -> None:
    stage = run_pb2.Stage(concurrency=4, requests=10)
    stage.duration.FromSeconds(30)
    schedule = schedule_for_stage(stage)
    assert schedule == ClosedLoopSchedule(concurrency=4, duration_s=30.0, max_requests=10)
    assert schedule_for_stage(run_pb2.Stage(concurrency=2, requests=5)) == ClosedLoopSchedule(
        concurrency=2, duration_s=None, max_requests=5
    )


@pytest.mark.parametrize(
    "stage",
    [run_pb2.Stage(requests=5), run_pb2.Stage(concurrency=3)],
    ids=["no load model", "no duration nor requests"],
)
def test_schedule_for_stage_refuses(stage: run_pb2.Stage) -> None:
    with pytest.raises(UnsupportedStageError):
        schedule_for_stage(stage)
