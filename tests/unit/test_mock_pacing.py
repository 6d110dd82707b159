"""Deadline pacing never acts before a deadline, on the standard loop and on uvloop."""

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


async def _lateness_ms(streams: int, tokens: int, itl_s: float) -> list[float]:
    lateness: list[float] = []

    async def stream(offset_s: float) -> None:
        deadline = now() + offset_s
        for _ in range(tokens):
            deadline += itl_s
            await sleep_until(deadline)
            lateness.append((now() - deadline) * 1000)

    # Odd, staggered offsets keep the loop waking between deadlines: with uvloop's
    # millisecond timers that is what makes a plain asyncio.sleep return early.
    await asyncio.gather(*(stream(i * 0.00037) for i in range(streams)))
    return lateness


@pytest.mark.parametrize("loop_factory", _loop_factories())
def test_sleep_until_is_never_early_and_about_a_millisecond_late_at_most(
    loop_factory: LoopFactory,
) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        lateness = runner.run(_lateness_ms(streams=20, tokens=30, itl_s=0.01))
    assert len(lateness) == 600
    assert min(lateness) >= 0.0
    assert sorted(lateness)[len(lateness) // 2] < 1.5


def test_sleep_until_a_past_deadline_returns_at_once() -> None:
    async def elapsed_ms() -> float:
        start = now()
        await sleep_until(start - 1.0)
        return (now() - start) * 1000

    assert asyncio.run(elapsed_ms()) < 5.0


class _Ticker:
    """Fires `ticks` times, `itl_s` apart, recording how late each fire was."""

    def __init__(self, first: float, ticks: int, itl_s: float, lateness: list[float]) -> None:
        self.deadline = first
        self.remaining = ticks
        self.itl_s = itl_s
        self.lateness = lateness
        self.done = asyncio.get_running_loop().create_future()

    def fire(self) -> float | None:
        self.lateness.append((now() - self.deadline) * 1000)
        self.remaining -= 1
        if not self.remaining:
            self.done.set_result(None)
            return None
        self.deadline += self.itl_s
        return self.deadline


async def _scheduler_lateness_ms(streams: int, ticks: int, itl_s: float) -> list[float]:
    scheduler = DeadlineScheduler()
    lateness: list[float] = []
    tickers = []
    for i in range(streams):
        ticker = _Ticker(now() + 0.002 + i * 0.00037, ticks, itl_s, lateness)
        scheduler.schedule(ticker.deadline, ticker)
        tickers.append(ticker)
        await asyncio.sleep(0.0001)  # keeps the loop busy between deadlines
    await asyncio.gather(*(t.done for t in tickers))
    assert len(scheduler) == 0
    return lateness


@pytest.mark.parametrize("loop_factory", _loop_factories())
def test_scheduler_fires_every_item_on_time_and_never_early(loop_factory: LoopFactory) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        lateness = runner.run(_scheduler_lateness_ms(streams=50, ticks=20, itl_s=0.01))
    assert len(lateness) == 50 * 20
    assert min(lateness) >= 0.0
    assert sorted(lateness)[len(lateness) // 2] < 1.5


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
