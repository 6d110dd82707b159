"""One live stack for the ecosystem tests: the real `llm-loadtest` mock server, controller
and agent processes, with Prometheus endpoints on, driven by outside tools (buf curl, Node)."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.processes import Proc

ROOT = Path(__file__).resolve().parents[2]
BUF = ROOT / "node_modules" / ".bin" / "buf"


@dataclass(frozen=True)
class Stack:
    target: str  # the mock server's base URL
    address: str  # the controller's gRPC HOST:PORT
    controller_metrics: str  # http://.../metrics
    agent_metrics: str


def _last_word(line: str) -> str:
    return line.rsplit(" ", 1)[-1]


@pytest.fixture(scope="package")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("ecosystem")
    procs: list[Proc] = []
    try:
        mock = Proc(
            "mock-server",
            "--port",
            "0",
            "--ttft-ms",
            "20",
            "--itl-ms",
            "5",
            "--output-tokens",
            "16",
            log=tmp / "mock.log",
        )
        procs.append(mock)
        target = _last_word(mock.wait_line("listening on"))
        ctl = Proc(
            "controller",
            "--listen",
            "127.0.0.1:0",
            "--db",
            str(tmp / "runs.db"),
            "--metrics-listen",
            "127.0.0.1:0",
            log=tmp / "controller.log",
        )
        procs.append(ctl)
        address = _last_word(ctl.wait_line("listening on"))
        controller_metrics = _last_word(ctl.wait_line("metrics on"))
        agent = Proc(
            "agent",
            "--controller",
            address,
            "--name",
            "eco-agent",
            "--metrics-listen",
            "127.0.0.1:0",
            log=tmp / "agent.log",
        )
        procs.append(agent)
        agent_metrics = _last_word(agent.wait_line("metrics on"))
        yield Stack(target, address, controller_metrics, agent_metrics)
    finally:
        codes = [p.stop() for p in reversed(procs)]
        assert all(c == 0 for c in codes), f"processes did not exit cleanly: {codes}"


def require_node_tool(path: Path) -> None:
    """The npm-installed tools come with `scripts/bootstrap.sh --dev`: missing means a broken setup."""
    if not path.exists():
        pytest.fail(f"{path} is missing: run scripts/bootstrap.sh --dev (npm install)")
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH (needed for buf and the Node example)")
