"""Doing things at absolute deadlines on the monotonic clock, never before them.

Tokens are paced against deadlines computed from the start of a request (`t0 + ttft +
i * itl`), not by chaining relative sleeps, so lateness never accumulates. Deadlines are on
`time.monotonic()`, which is what the standard asyncio loop's `loop.time()` is. uvloop's
clock and timers tick in whole milliseconds and, when other work wakes the loop, fire up to
a millisecond early; the mock server is the ground truth of latency tests, so both helpers
here check the precise clock again and wait on. Either loop fires up to about a millisecond
late (epoll and libuv time out in whole milliseconds).

`DeadlineScheduler` runs many streams from one timer. The mock server must pace hundreds of
streams on one core, and a sleeping task per stream doubled the cost of a token, which is
otherwise mostly the `send` system call.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import math
import time
from typing import Protocol

# When a timer woke us early, wait at least one of uvloop's millisecond ticks more: a
# shorter delay rounds to zero there and would spin.
_MIN_REWAIT_S = 0.001


def now() -> float:
    """The clock deadlines are on."""
    return time.monotonic()


async def sleep_until(deadline: float) -> None:
    """Sleep until `now()` reaches `deadline`; never return before it."""
    await asyncio.sleep(max(deadline - now(), 0.0))
    while (remaining := deadline - now()) > 0:  # noqa: ASYNC110 (waits for a time)
        await asyncio.sleep(max(remaining, _MIN_REWAIT_S))


class Paced(Protocol):
    """Something that acts at deadlines, e.g. a stream emitting one token per deadline."""

    def fire(self) -> float | None:
        """Act now that the deadline has come; return the next deadline, or None when done."""


class DeadlineScheduler:
    """Calls `fire()` on each scheduled item once its deadline has passed, from one timer.

    Must be used from one event loop. Items that have nothing more to do (a cancelled
    stream) simply return None from `fire()`.
    """

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Paced]] = []
        self._order = itertools.count()  # ties fire in scheduling order; items never compare
        self._timer: asyncio.TimerHandle | None = None
        self._timer_deadline = math.inf

    def schedule(self, deadline: float, item: Paced) -> None:
        """Fire `item` at `deadline` (a `now()` time)."""
        heapq.heappush(self._heap, (deadline, next(self._order), item))
        if deadline < self._timer_deadline:
            self._arm(deadline, deadline - now())

    def close(self) -> None:
        """Drop every scheduled item and the timer."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_deadline = math.inf
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)

    def _arm(self, deadline: float, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_deadline = deadline
        self._timer = asyncio.get_running_loop().call_later(max(delay, 0.0), self._run)

    def _run(self) -> None:
        self._timer = None
        self._timer_deadline = math.inf
        heap = self._heap
        # Only what was due when the pass began: an overloaded pass still ends, and the
        # loop serves reads and new connections before the next one.
        started = now()
        fired = False
        while heap and heap[0][0] <= started:
            _, _, item = heapq.heappop(heap)
            fired = True
            next_deadline = item.fire()
            if next_deadline is not None:
                heapq.heappush(heap, (next_deadline, next(self._order), item))
        if heap:
            deadline = heap[0][0]
            delay = deadline - now()
            self._arm(deadline, delay if fired else max(delay, _MIN_REWAIT_S))
