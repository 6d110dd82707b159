"""Real `llm-loadtest` processes for tests that start them the way a user would."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

CLI = str(Path(sys.executable).parent / "llm-loadtest")
# The stack's processes take their settings from flags only: a developer's LLM_LOADTEST_*
# variables must not change what the tests start.
ENV = {k: v for k, v in os.environ.items() if not k.startswith("LLM_LOADTEST_")} | {"PYTHONUNBUFFERED": "1"}


class Proc:
    """A real `llm-loadtest` process whose stdout announces its addresses."""

    def __init__(self, *args: str, log: Path) -> None:
        self.log = log
        self._log_file = log.open("wb")
        self.p = subprocess.Popen([CLI, *args], stdout=subprocess.PIPE, stderr=self._log_file, env=ENV)

    def wait_line(self, marker: str, timeout_s: float = 30) -> str:
        assert self.p.stdout is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            line = self.p.stdout.readline().decode()
            if not line and self.p.poll() is not None:
                break
            if marker in line:
                return line.strip()
        raise AssertionError(f"no {marker!r} from {self.p.args}; log:\n{self.log.read_text()[-3000:]}")

    def stop(self) -> int:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(20)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log_file.close()
        return self.p.returncode


def wait_for_agents(address: str, count: int = 1, timeout_s: float = 60.0) -> None:
    """Until `count` agents are connected to the controller at `address`. A fixture waits for
    this before its test: an agent stopped while still starting up (importing, on a loaded
    machine) would die of the SIGTERM instead of exiting cleanly."""
    from client.sdk import ControllerClient

    async def connected() -> None:
        async with ControllerClient(address, timeout_s=10.0) as client, asyncio.timeout(timeout_s):
            while len(await client.list_agents()) < count:  # noqa: ASYNC110 - another process
                await asyncio.sleep(0.1)

    asyncio.run(connected())
