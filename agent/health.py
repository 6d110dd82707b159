"""Load-generator health: event-loop lag and CPU use of this process.

An agent that cannot keep up inflates every latency it measures, so it reports how late its
timers fire and how busy its core is; the controller flags stages whose agents were
saturated. Both meters report over the interval since they were last read.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopLagMonitor:
    """Measures how late a periodic timer fires: the event loop's scheduling lag."""

    def __init__(self, interval_s: float = 0.1, on_sample: Callable[[float], None] | None = None) -> None:
        self._interval_s = interval_s
        self._max_lag_s = 0.0
        self._on_sample = on_sample  # every measurement, seconds (the metrics histogram)
        self.last_lag_s = 0.0

    async def run(self) -> None:
        """Sample the lag until cancelled."""
        loop = asyncio.get_running_loop()
        while True:
            expected = loop.time() + self._interval_s
            await asyncio.sleep(self._interval_s)
            lag = loop.time() - expected
            self._max_lag_s = max(self._max_lag_s, lag)
            self.last_lag_s = max(lag, 0.0)
            if self._on_sample is not None:
                self._on_sample(self.last_lag_s)

    def take_max_ms(self) -> float:
        """Largest lag since the previous call, in milliseconds (the worst moment counts)."""
        lag, self._max_lag_s = self._max_lag_s, 0.0
        return max(lag, 0.0) * 1000.0


class CpuMeter:
    """CPU use of this process, percent of one core, from `time.process_time()` deltas."""

    def __init__(self) -> None:
        self._cpu_s = time.process_time()
        self._wall_s = time.perf_counter()

    def take_percent(self) -> float:
        """CPU percent since the previous call (or since creation)."""
        cpu_s, wall_s = time.process_time(), time.perf_counter()
        used, elapsed = cpu_s - self._cpu_s, wall_s - self._wall_s
        self._cpu_s, self._wall_s = cpu_s, wall_s
        return 100.0 * used / elapsed if elapsed > 0 else 0.0
