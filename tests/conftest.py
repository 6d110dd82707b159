"""Shared fixtures: real servers on 127.0.0.1 (port 0), a real SQLite file per test."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import pytest

from client.sdk import ControllerClient
from controller.server import Controller
from tests.processes import CLI

T = TypeVar("T")


async def eventually(probe: Callable[[], Awaitable[T]], check: Callable[[T], bool], timeout_s: float = 10.0) -> T:
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


# What a test runs to start llm-loadtest without the installed script (`python -c "from
# agent.cli import ..."`, `python -m client.cli`).
_CLI_MODULES = ("client.cli", "agent.cli", "mockserver.cli")


def _starts_llm_loadtest(args: Any) -> bool:
    argv = [args] if isinstance(args, str | bytes | os.PathLike) else list(args)
    words = [os.fsdecode(a) for a in argv]
    if not words:
        return False
    if words[0] == CLI:
        return True
    return words[0] == sys.executable and any(m in w for w in words[1:] for m in _CLI_MODULES)


@pytest.fixture(autouse=True)
def _llm_loadtest_processes_only_in_e2e(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """A test that starts an llm-loadtest process must be marked `e2e`, so that
    `-m 'not e2e'` is the in-process suite: an unmarked one fails when it tries."""
    if request.node.get_closest_marker("e2e") is not None:
        return
    popen_init = subprocess.Popen.__init__

    def refuse_llm_loadtest(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        if _starts_llm_loadtest(args):
            pytest.fail(f"{request.node.nodeid} starts {args!r}: mark it @pytest.mark.e2e", pytrace=False)
        popen_init(self, args, *rest, **kwargs)

    monkeypatch.setattr(subprocess.Popen, "__init__", refuse_llm_loadtest)
