"""Shared fixtures: real servers on 127.0.0.1 (port 0), a real SQLite file per test."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import TypeVar

import pytest

from client.sdk import ControllerClient
from controller.server import Controller

T = TypeVar("T")


async def eventually(
    probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], timeout_s: float = 10.0
) -> T:
    """Poll `probe` until `check` holds (no sleeping as synchronisation: a deadline)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s; last value: {value!r}")
        await asyncio.sleep(0.05)


async def poll_until(predicate: Callable[[], bool], timeout_s: float = 20.0) -> bool:
    """Poll `predicate` until it holds or `timeout_s` passes (synchronisation without sleeps)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if predicate():
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.005)


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "runs.db"


@pytest.fixture
async def controller(db_path: Path) -> AsyncIterator[Controller]:
    c = Controller(str(db_path), lost_grace_s=3.0)
    await c.start("127.0.0.1:0")
    try:
        yield c
    finally:
        await c.stop(1.0)


@pytest.fixture
async def client(controller: Controller) -> AsyncIterator[ControllerClient]:
    async with ControllerClient(f"127.0.0.1:{controller.port}", timeout_s=10.0) as c:
        yield c
