"""Load schedules: closed-loop budgets, duration, start spreading, ramp and warmup; the open-loop
dispatcher's timing, concurrency cap, abandonment at the end and cancellation."""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from agent.arrivals import ArrivalSchedule
from agent.scheduler import (
    ClosedLoopSchedule,
    OpenLoopSchedule,
    RequestBudget,
    UnsupportedStageError,
    Warmup,
    default_start_window_s,
    schedule_for_stage,
)
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(60)

MS = 1_000_000


class FakeSender:
    """Stands in for the client: records calls and concurrency, takes `delay_s` each."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []  # scheduled_ns
        self.warmups: list[bool] = []
        self.sent: list[int] = []  # when the call came
        self.in_flight = 0
        self.max_in_flight = 0
        self.cancelled = 0
        self.abandoned: list[tuple[int, bool]] = []

    async def __call__(self, scheduled_ns: int, warmup: bool) -> None:
        self.sent.append(time.perf_counter_ns())
        self.calls.append(scheduled_ns)
        self.warmups.append(warmup)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.in_flight -= 1

    def abandon(self, scheduled_ns: int, warmup: bool) -> None:
        self.abandoned.append((scheduled_ns, warmup))


async def wait_for(predicate: object, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not predicate():  # type: ignore[operator]
        assert loop.time() < deadline, "condition not reached"
        await asyncio.sleep(0.001)


# --- closed loop ---------------------------------------------------------------------------


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
    # At most the 4 a worker fits in 200 ms (and one over the edge); at least one each, however
    # slowly a loaded machine runs the loop.
    assert 4 <= len(sender.calls) <= 4 * 5


async def test_duration_and_budget_whichever_first() -> None:
    sender = FakeSender(delay_s=0.001)
    await ClosedLoopSchedule(concurrency=2, duration_s=10, max_requests=6).run(sender)
    assert len(sender.calls) == 6


async def test_scheduled_time_is_when_the_worker_became_free() -> None:
    sender = FakeSender(delay_s=0.02)
    await ClosedLoopSchedule(concurrency=1, max_requests=3).run(sender)
    gaps = [b - a for a, b in zip(sender.calls, sender.calls[1:], strict=False)]
    assert all(g >= 0.02e9 for g in gaps)


async def test_first_requests_are_spread_over_the_start_window() -> None:
    sender = FakeSender(delay_s=0.5)
    await ClosedLoopSchedule(concurrency=10, max_requests=10, start_window_s=0.1).run(sender)
    first = sorted(sender.calls)
    # Worker i is scheduled at start + window * i / N exactly; its send follows.
    assert [b - a for a, b in itertools.pairwise(first)] == pytest.approx([10 * MS] * 9, abs=2)
    assert all(s >= c for s, c in zip(sender.sent, sender.calls, strict=True))
    assert sender.max_in_flight == 10


def test_default_start_window() -> None:
    assert default_start_window_s(1) == pytest.approx(0.002)
    assert default_start_window_s(300) == pytest.approx(0.6)
    assert default_start_window_s(100_000) == 1.0


async def test_ramp_starts_workers_linearly() -> None:
    sender = FakeSender(delay_s=10)
    schedule = ClosedLoopSchedule(concurrency=4, duration_s=0.35, ramp_s=0.4, start_window_s=0.05)
    assert [schedule.start_offset_s(i) for i in range(4)] == [0.0, 0.1, 0.2, 0.30000000000000004]
    task = asyncio.create_task(schedule.run(sender))
    await wait_for(lambda: sender.in_flight == 4)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    first = sorted(sender.calls)
    assert [b - first[0] for b in first] == pytest.approx([0, 100 * MS, 200 * MS, 300 * MS], abs=2)


async def test_ramp_workers_starting_after_the_duration_never_start() -> None:
    sender = FakeSender(delay_s=0.01)
    await ClosedLoopSchedule(concurrency=10, duration_s=0.1, ramp_s=1.0).run(sender)
    assert sender.max_in_flight == 1  # only worker 0 starts within the first 100 ms


async def test_closed_loop_warmup_by_count_is_exact() -> None:
    sender = FakeSender(delay_s=0.001)
    await ClosedLoopSchedule(concurrency=4, max_requests=30, warmup=Warmup(requests=7)).run(sender)
    assert sender.warmups.count(True) == 7
    assert sender.warmups[:7] == [True] * 7  # the first seven requests started


async def test_closed_loop_warmup_by_duration_flags_what_was_scheduled_in_it() -> None:
    sender = FakeSender(delay_s=0.01)
    await ClosedLoopSchedule(concurrency=3, duration_s=0.3, warmup=Warmup(duration_s=0.1)).run(sender)
    start = min(sender.calls)  # worker 0 is scheduled at the stage start exactly
    assert sender.warmups == [c - start < 100 * MS for c in sender.calls]
    assert 3 <= sender.warmups.count(True) < len(sender.calls) - 3


async def test_cancellation_cancels_in_flight_and_propagates() -> None:
    sender = FakeSender(delay_s=30)
    task = asyncio.create_task(ClosedLoopSchedule(concurrency=5, duration_s=60).run(sender))
    await wait_for(lambda: sender.in_flight == 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sender.cancelled == 5
    assert sender.in_flight == 0


async def test_sender_failure_fails_the_schedule() -> None:
    async def broken(_: int, __: bool) -> None:
        raise RuntimeError("bug")

    with pytest.raises(ExceptionGroup):
        await ClosedLoopSchedule(concurrency=2, max_requests=10).run(broken)


# --- open loop -----------------------------------------------------------------------------


def constant(rate: float, **kwargs: float) -> ArrivalSchedule:
    return ArrivalSchedule(rate=rate, process=run_pb2.ARRIVAL_PROCESS_CONSTANT, **kwargs)  # type: ignore[arg-type]


async def test_open_loop_sends_at_the_arrival_times() -> None:
    arrivals = ArrivalSchedule(rate=200, seed=5, duration_s=0.5)
    sender = FakeSender(delay_s=0.01)
    await OpenLoopSchedule(arrivals).run(sender, sender.abandon)
    offsets = arrivals.offsets_ns().tolist()
    assert len(sender.calls) == len(offsets) > 50
    assert [c - sender.calls[0] for c in sender.calls] == offsets  # scheduled = the arrival time
    lags = [s - c for s, c in zip(sender.sent, sender.calls, strict=True)]
    assert min(lags) >= 0
    # Sent at its time, not after a backlog (arrivals are 5 ms apart on average; a backlog would
    # grow to hundreds of ms over the stage). The bound leaves room for a loaded machine: the
    # send lag itself (sent - scheduled) is measured by bench/agent_stream_start.py.
    assert sorted(lags)[len(lags) // 2] < 50 * MS, sorted(lags)[len(lags) // 2] / MS
    assert sender.abandoned == []


async def test_open_loop_behind_schedule_sends_late_never_skips() -> None:
    arrivals = constant(1000, max_requests=100)
    stalled = False

    async def stalling(scheduled_ns: int, warmup: bool) -> None:
        nonlocal stalled
        if not stalled:
            stalled = True
            time.sleep(0.05)  # blocks the loop: 50 arrivals fall due meanwhile  # noqa: ASYNC251
        await sender(scheduled_ns, warmup)

    sender = FakeSender()
    await OpenLoopSchedule(arrivals).run(stalling, sender.abandon)
    assert len(sender.calls) == 100
    assert [c - sender.calls[0] for c in sender.calls] == [i * MS for i in range(100)]
    lags = [s - c for s, c in zip(sender.sent, sender.calls, strict=True)]
    assert max(lags) >= 40 * MS  # the stall shows as queue delay of the requests due during it


async def test_open_loop_cap_holds_requests_back_as_queue_delay() -> None:
    sender = FakeSender(delay_s=0.05)
    await OpenLoopSchedule(constant(100, max_requests=10), max_concurrency=2).run(sender, sender.abandon)
    assert len(sender.calls) == 10
    assert sender.max_in_flight == 2
    lags = [s - c for s, c in zip(sender.sent, sender.calls, strict=True)]
    # Two every 50 ms against one every 10 ms: the wait grows by ~15 ms per request.
    assert lags[-1] > lags[4] > lags[2] + 10 * MS
    assert lags[-1] >= 100 * MS


async def test_open_loop_abandons_what_the_cap_held_back_at_the_end() -> None:
    sender = FakeSender(delay_s=0.2)
    arrivals = constant(50, duration_s=0.3)  # 15 due: 0, 20, ..., 280 ms
    schedule = OpenLoopSchedule(arrivals, max_concurrency=1, end_grace_s=0.05)
    await schedule.run(sender, sender.abandon)
    assert len(sender.calls) == 2  # at 0 ms, and at 200 ms when the first finished
    assert len(sender.calls) + len(sender.abandoned) == 15
    start = sender.calls[0]
    assert [s - start for s, _ in sender.abandoned] == [i * 20 * MS for i in range(2, 15)]


async def test_open_loop_warmup_by_count_and_duration() -> None:
    sender = FakeSender()
    warmup = Warmup(duration_s=0.05, requests=3)
    await OpenLoopSchedule(constant(100, max_requests=20), warmup=warmup).run(sender, sender.abandon)
    # Due at 0, 10, ..., 190 ms: the first 3 by count, those before 50 ms by time.
    assert sender.warmups == [i < 5 for i in range(20)]
    sender = FakeSender()
    await OpenLoopSchedule(constant(100, max_requests=20), warmup=Warmup(requests=8)).run(sender, sender.abandon)
    assert sender.warmups == [i < 8 for i in range(20)]


async def test_open_loop_cancellation_cancels_in_flight() -> None:
    sender = FakeSender(delay_s=30)
    task = asyncio.create_task(OpenLoopSchedule(constant(1000, duration_s=60)).run(sender, sender.abandon))
    await wait_for(lambda: sender.in_flight >= 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sender.cancelled == len(sender.calls)
    assert sender.in_flight == 0


async def test_open_loop_sender_failure_fails_the_schedule() -> None:
    async def broken(_: int, __: bool) -> None:
        raise RuntimeError("bug")

    with pytest.raises(ExceptionGroup):
        await OpenLoopSchedule(constant(1000, max_requests=10)).run(broken, lambda _, __: None)


# --- from a Stage --------------------------------------------------------------------------


def test_schedule_for_stage_closed_loop() -> None:
    stage = run_pb2.Stage(concurrency=4, requests=10, warmup_requests=2)
    stage.duration.FromSeconds(30)
    stage.ramp.FromSeconds(5)
    stage.warmup_duration.FromMilliseconds(1500)
    assert schedule_for_stage(stage) == ClosedLoopSchedule(
        concurrency=4,
        duration_s=30.0,
        max_requests=10,
        ramp_s=5.0,
        start_window_s=0.008,
        warmup=Warmup(duration_s=1.5, requests=2),
    )
    assert schedule_for_stage(run_pb2.Stage(concurrency=2, requests=5)) == ClosedLoopSchedule(
        concurrency=2, duration_s=None, max_requests=5, start_window_s=0.004
    )


def test_schedule_for_stage_open_loop() -> None:
    stage = run_pb2.Stage(request_rate=12.5, requests=100, max_concurrency=3, arrival=run_pb2.ARRIVAL_PROCESS_GAMMA)
    stage.burstiness = 0.5
    stage.duration.FromSeconds(20)
    stage.ramp.FromSeconds(4)
    schedule = schedule_for_stage(stage, seed=99)
    assert schedule == OpenLoopSchedule(
        ArrivalSchedule(
            rate=12.5,
            process=run_pb2.ARRIVAL_PROCESS_GAMMA,
            burstiness=0.5,
            seed=99,
            duration_s=20.0,
            max_requests=100,
            ramp_s=4.0,
        ),
        max_concurrency=3,
    )
    # Unspecified arrival process: Poisson; burstiness unset: 1.
    defaults = schedule_for_stage(run_pb2.Stage(request_rate=2, requests=5), seed=1)
    assert isinstance(defaults, OpenLoopSchedule)
    assert defaults.arrivals.process == run_pb2.ARRIVAL_PROCESS_POISSON
    assert defaults.arrivals.burstiness == 1.0
    assert defaults.arrivals.duration_s is None


@pytest.mark.parametrize(
    "stage",
    [
        run_pb2.Stage(requests=5),
        run_pb2.Stage(concurrency=3),
        run_pb2.Stage(request_rate=3),
        run_pb2.Stage(request_rate=-1, requests=3),
        run_pb2.Stage(request_rate=1, requests=3, arrival=run_pb2.ARRIVAL_PROCESS_GAMMA, burstiness=-2),
    ],
    ids=["no load model", "no duration nor requests", "open loop without limits", "negative rate", "bad burstiness"],
)
def test_schedule_for_stage_refuses(stage: run_pb2.Stage) -> None:
    with pytest.raises(UnsupportedStageError):
        schedule_for_stage(stage)
