"""Whether the target accepts connections: back-off while it does not, and when to give up.

A model server that was killed, or is restarting, refuses every connection at once; a load
loop that simply carries on turns that into thousands of failed requests a second and a
stage that "succeeds" on nothing but errors. `TargetReachability` serves one assignment:

* Back-off: after a request could not open a connection (`connect_failed`), requests wait
  (`wait_turn`) and go one at a time: one request (a probe) may try after `initial_s`
  (50 ms), and every probe that fails again doubles the wait, up to `max_s` (1 s). Requests
  that were already on their way when the first refusal came do not double it. Any request
  that got a connection (whatever its outcome) ends the back-off and lets everyone go.
* Dead target: when connections have kept failing for `limit_s` (the target's
  `unreachable_timeout`, 10 s by default) with no connection in between, `on_dead` is called
  once with the reason; the assignment then stops its load and fails.

Waiting requests keep their scheduled time, so the wait shows as queue delay.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class RefusalBackoff:
    """How long requests wait after a refused connection: `initial_s` doubling to `max_s`."""

    initial_s: float = 0.05
    max_s: float = 1.0


class TargetReachability:
    """Back-off on refused connections and the dead-target rule, for one assignment."""

    def __init__(
        self,
        limit_s: float,
        on_dead: Callable[[str], None],
        backoff: RefusalBackoff | None = None,
    ) -> None:
        self._limit_ns = int(limit_s * 1e9)
        self._limit_s = limit_s
        self._on_dead = on_dead
        self._backoff = backoff or RefusalBackoff()
        self._since_ns = 0  # first failed connection of the current streak; 0 = reachable
        self._delay_s = 0.0
        self._next_ns = 0  # when the next probe may go
        self._probing = False
        self._dead = False
        self._changed = asyncio.Event()
        self.failures = 0  # connections that failed in the current streak
        self.last_error = ""

    @property
    def refusing(self) -> bool:
        """True while connections fail (requests wait for their turn)."""
        return self._since_ns != 0

    async def wait_turn(self) -> bool:
        """Wait until this request may go; True if it goes as the streak's probe."""
        while self._since_ns:
            now = time.perf_counter_ns()
            if not self._probing and now >= self._next_ns:
                self._probing = True
                return True
            self._changed.clear()
            timeout = None if self._probing else (self._next_ns - now) / 1e9
            try:
                async with asyncio.timeout(timeout):
                    await self._changed.wait()
            except TimeoutError:
                pass
        return False

    def outcome(self, connect_failed: bool, error: str, probe: bool) -> None:
        """What became of a request that was sent (`probe`: it went as the probe)."""
        if connect_failed:
            self._failed(error, probe)
        elif self._since_ns:
            self._since_ns = 0
            self._probing = False
            self.failures = 0
            self._changed.set()
        elif probe:
            self._probing = False
            self._changed.set()

    def probe_abandoned(self) -> None:
        """The probe did not get to an outcome (cancelled): let the next one go."""
        self._probing = False
        self._changed.set()

    def _failed(self, error: str, probe: bool) -> None:
        now = time.perf_counter_ns()
        self.last_error = error
        self.failures += 1
        if not self._since_ns:
            self._since_ns = now
            self._delay_s = self._backoff.initial_s
            self._next_ns = now + int(self._delay_s * 1e9)
        elif probe:
            self._delay_s = min(self._delay_s * 2, self._backoff.max_s)
            self._next_ns = now + int(self._delay_s * 1e9)
        if probe:
            self._probing = False
        self._changed.set()
        if not self._dead and now - self._since_ns >= self._limit_ns:
            self._dead = True
            self._on_dead(
                f"the target refused connections for {(now - self._since_ns) / 1e9:.1f} s "
                f"(unreachable_timeout {self._limit_s:g} s; {self.failures} attempts, backing off "
                f"up to {self._backoff.max_s:g} s): {error}"
            )
