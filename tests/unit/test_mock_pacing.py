"""Deadline pacing never acts before a deadline, and no later than the loop itself does at the
same moment, on the standard loop and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from mockserver.pacing import DeadlineScheduler, now, sleep_until

pytestmark = pytest.mark.timeout(30)

LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def _loop_factories() -> list[LoopFactory]:
    factories: list[LoopFactory] = [asyncio.new_event_loop]
    try:
        import uvloop
    except ImportError:
        return factories
    return [*factories, uvloop.new_event_loop]


# How late pacing may be beyond what the loop itself manages at the same moment (a plain
# timer at the same deadline, measured in the same test): one re-wait of uvloop's millisecond
# tick and a little. The absolute lateness depends on the machine's load, so it is measured
# in bench/agent_accuracy.py (the mock's first-token lateness p99 and its emission ITL p99,
# from /stats/emission), not asserted here.
EXTRA_LATENESS_MS = 2.5


def _median(values: list[float]) -> float:
    return sorted(values)[len(values) // 2]


def _reference(deadline: float, into: list[float]) -> None:
    """A plain loop timer at `deadline`, recording how late it fired: what the loop does now."""
    loop = asyncio.get_running_loop()
    loop.call_at(loop.time() + max(deadline - now(), 0.0), lambda: into.append(max(0.0, (now() - deadline) * 1000)))


async def _lateness_ms(streams: int, tokens: int, itl_s: float) -> tuple[list[float], list[float]]:
    lateness: list[float] = []
    reference: list[float] = []

    async def stream(offset_s: float) -> None:
        deadline = now() + offset_s
        for _ in range(tokens):
            deadline += itl_s
            _reference(deadline, reference)
            await sleep_until(deadline)
            lateness.append((now() - deadline) * 1000)

    # Odd, staggered offsets keep the loop waking between deadlines: with uvloop's
    # millisecond timers that is what makes a plain asyncio.sleep return early.
    await asyncio.gather(*(stream(i * 0.00037) for i in range(streams)))
    await asyncio.sleep(0.05)  # the last reference timers
    return lateness, reference


@pytest.mark.parametrize("loop_factory", _loop_factories())
def test_sleep_until_is_never_early_and_no_later_than_the_loop(
    loop_factory: LoopFactory,
) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        lateness, reference = runner.run(_lateness_ms(streams=20, tokens=30, itl_s=0.01))
    assert len(lateness) == 600
    assert min(lateness) >= 0.0
    assert _median(lateness) <= _median(reference) + EXTRA_LATENESS_MS, (_median(lateness), _median(reference))


def test_sleep_until_a_past_deadline_returns_at_once() -> None:
    async def elapsed_ms() -> float:
        start = now()
        await sleep_until(start - 1.0)
        return (now() - start) * 1000

    # Generous for a loaded machine: "at once" is one loop pass, not a sleep of any length.
    assert asyncio.run(elapsed_ms()) < 100.0


class _Ticker:
    """Fires `ticks` times, `itl_s` apart, recording how late each fire was, and how late a
    plain loop timer at the same deadline was (`reference`)."""

    def __init__(
        self, first: float, ticks: int, itl_s: float, lateness: list[float], reference: list[float] | None = None
    ) -> None:
        self.deadline = first
        self.remaining = ticks
        self.itl_s = itl_s
        self.lateness = lateness
        self.reference = reference
        self.done = asyncio.get_running_loop().create_future()
        if reference is not None:
            _reference(first, reference)

    def fire(self) -> float | None:
        self.lateness.append((now() - self.deadline) * 1000)
        self.remaining -= 1
        if not self.remaining:
            self.done.set_result(None)
            return None
        self.deadline += self.itl_s
        if self.reference is not None:
            _reference(self.deadline, self.reference)
        return self.deadline


async def _scheduler_lateness_ms(streams: int, ticks: int, itl_s: float) -> tuple[list[float], list[float]]:
    scheduler = DeadlineScheduler()
    lateness: list[float] = []
    reference: list[float] = []
    tickers = []
    for i in range(streams):
        ticker = _Ticker(now() + 0.002 + i * 0.00037, ticks, itl_s, lateness, reference)
        scheduler.schedule(ticker.deadline, ticker)
        tickers.append(ticker)
        await asyncio.sleep(0.0001)  # keeps the loop busy between deadlines
    await asyncio.gather(*(t.done for t in tickers))
    assert len(scheduler) == 0
    await asyncio.sleep(0.05)  # the last reference timers
    return lateness, reference


@pytest.mark.parametrize("loop_factory", _loop_factories())
def test_scheduler_fires_every_item_on_time_and_never_early(loop_factory: LoopFactory) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        lateness, reference = runner.run(_scheduler_lateness_ms(streams=50, ticks=20, itl_s=0.01))
    assert len(lateness) == 50 * 20
    assert min(lateness) >= 0.0
    assert _median(lateness) <= _median(reference) + EXTRA_LATENESS_MS, (_median(lateness), _median(reference))


def test_scheduler_close_drops_everything() -> None:
    async def fired_after_close() -> list[float]:
        scheduler = DeadlineScheduler()
        lateness: list[float] = []
        scheduler.schedule(now() + 0.01, _Ticker(now() + 0.01, 5, 0.01, lateness))
        scheduler.close()
        assert len(scheduler) == 0
        await asyncio.sleep(0.05)
        return lateness

    assert asyncio.run(fired_after_close()) == []
