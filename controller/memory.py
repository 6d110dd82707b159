"""Giving memory back to the OS after large requests.

Large requests leave behind memory the controller no longer uses but keeps: SQLite's page
cache of the writer connection (up to `cache_size`, 64 MB a connection, filled by big writes
such as datasets and sample batches) and heap freed by Python and SQLite that glibc keeps in
its arenas. Neither shrinks by itself. Every CHECK_S, MemoryReleaser looks at the process's
anonymous resident memory; when it is GROWTH_MB or more above what it was at start, it
empties SQLite's unused cached pages (`PRAGMA shrink_memory` on the writer connection, on
the writer thread between two jobs) and calls glibc's `malloc_trim(0)`. A release that
frees little (the memory is in use: a big run being served) doubles the wait before the
next one, up to MAX_WAIT_S; one that frees much brings it back to CHECK_S. Measured with
bench/controller_memory.py (BENCHMARKS.md).

The `llm-loadtest controller` process also caps glibc's malloc arenas at ARENA_MAX
(`limit_arenas`, before its threads start; `MALLOC_ARENA_MAX` in the environment wins):
by default every thread that allocates under contention (SQLite workers, gRPC's pollers,
`asyncio.to_thread`) may get an arena of its own, up to 8 per core, and memory freed in one
arena cannot serve another, so after large requests each keeps its high-water mark.

Linux with glibc only (RSS from /proc, `malloc_trim` and `mallopt` from glibc); elsewhere
these do nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

ARENA_MAX = 2
_M_ARENA_MAX = -8  # glibc's mallopt parameter number
CHECK_S = 5.0
MAX_WAIT_S = 120.0
GROWTH_MB = 32.0


def anon_rss_mb() -> float | None:
    """This process's anonymous resident memory (heap, not mapped files), MB; None off Linux."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError):
        pass
    return None


def malloc_trim() -> bool:
    """Return free heap pages of every glibc arena to the OS; False without glibc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True


def limit_arenas(arena_max: int = ARENA_MAX) -> bool:
    """Cap glibc's malloc arenas for this process (call before starting threads); False when
    not applied (no glibc, or MALLOC_ARENA_MAX set by the operator)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, arena_max))


class MemoryReleaser:
    """Releases cached and freed memory once the process has grown (see the module docstring)."""

    def __init__(
        self,
        shrink_caches: Callable[[], Awaitable[None]],
        *,
        check_s: float = CHECK_S,
        growth_mb: float = GROWTH_MB,
        rss_mb: Callable[[], float | None] = anon_rss_mb,
    ) -> None:
        self._shrink_caches = shrink_caches
        self._check_s = check_s
        self._growth_mb = growth_mb
        self._rss_mb = rss_mb
        self._floor: float | None = None
        self._wait_s = check_s
        self._next_at = 0.0
        self._task: asyncio.Task[None] | None = None
        self.releases = 0

    def start(self) -> None:
        self._floor = self._rss_mb()
        if self._floor is not None:
            self._task = asyncio.create_task(self._loop(), name="memory-releaser")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def check(self) -> bool:
        """Release if the process grew past its start and the wait is over; True when it released."""
        loop = asyncio.get_running_loop()
        now = self._rss_mb()
        if now is None or self._floor is None or now < self._floor + self._growth_mb:
            self._wait_s = self._check_s
            return False
        if loop.time() < self._next_at:
            return False
        await self._shrink_caches()
        await asyncio.to_thread(malloc_trim)
        after = self._rss_mb() or now
        freed = now - after
        self._wait_s = self._check_s if freed >= self._growth_mb / 2 else min(self._wait_s * 2, MAX_WAIT_S)
        self._next_at = loop.time() + self._wait_s
        self.releases += 1
        log.info("memory_released", rss_anon_mb_before=round(now), rss_anon_mb_after=round(after))
        return True

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._check_s)
            try:
                await self.check()
            except Exception:  # the next check retries; serving matters more
                log.exception("memory_release_failed")
