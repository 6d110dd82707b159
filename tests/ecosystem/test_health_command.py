"""`llm-loadtest health`: the container healthcheck, against a live controller."""

from __future__ import annotations

import socket
import subprocess

import pytest

from tests.ecosystem.conftest import Stack
from tests.processes import CLI, ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(60)]


def health(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "health", *args], capture_output=True, text=True, timeout=30, env=env or ENV, check=False
    )


def test_serving_controller_is_healthy(stack: Stack) -> None:
    done = health("--controller", stack.address)
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING")
    done = health("--controller", stack.address, "--service", "loadtest.v1.RunService")
    assert (done.returncode, done.stdout.strip()) == (0, "SERVING")
    # The address can come from the environment, as in the agent containers.
    done = health(env={**ENV, "LLM_LOADTEST_CONTROLLER": stack.address})
    assert done.returncode == 0


def test_unknown_service_and_unreachable_controller_are_unhealthy(stack: Stack) -> None:
    done = health("--controller", stack.address, "--service", "no.such.Service")
    assert done.returncode == 1
    assert "NOT_FOUND" in done.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = f"127.0.0.1:{s.getsockname()[1]}"  # bound, never listening: refused
        done = health("--controller", closed, "--timeout", "2")
    assert done.returncode == 1
    assert "UNAVAILABLE" in done.stderr or "DEADLINE_EXCEEDED" in done.stderr
