"""Fixtures of the security tests: a controller served from a background thread (for
synchronous hypothesis tests that drive it through a real gRPC channel)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from controller.domain.access.ratelimit import RateLimits
from controller.server import Controller

T = TypeVar("T")
NO_LIMITS = RateLimits(1e9, 1e9, 1e9, 1e9, 1e9, 1e9)


class ThreadedController:
    """A real Controller running on its own event loop in a daemon thread."""

    def __init__(self, db_path: Path, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="controller-loop", daemon=True)
        self._thread.start()

        async def build() -> Controller:
            return Controller(str(db_path), **kwargs)

        self.controller = self.call(build())
        self.port = self.call(self.controller.start("127.0.0.1:0"))

    def call(self, coro: Coroutine[Any, Any, T], timeout_s: float = 30.0) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def close(self) -> None:
        try:
            self.call(self.controller.stop(1.0))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


@pytest.fixture
def threaded_controller(tmp_path: Path) -> Iterator[ThreadedController]:
    tc = ThreadedController(tmp_path / "fuzz.db", rate_limits=NO_LIMITS)
    try:
        yield tc
    finally:
        tc.close()


AGENT_BOOTSTRAP = "bootstrap-admin-key-for-stream-tests"


@pytest.fixture
async def keyed_controller(tmp_path: Path) -> AsyncIterator[Controller]:
    """A real controller with keys (a bootstrap admin key), reads public, no rate limits."""
    c = Controller(str(tmp_path / "keyed.db"), api_key=AGENT_BOOTSTRAP, rate_limits=NO_LIMITS, lost_grace_s=3.0)
    await c.start("127.0.0.1:0")
    try:
        yield c
    finally:
        await c.stop(1.0)
