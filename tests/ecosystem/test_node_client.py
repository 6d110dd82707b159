"""examples/node: a Node.js program using @grpc/grpc-js against a live controller."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.ecosystem.conftest import ROOT, Stack, require_node_tool
from tests.processes import ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

EXAMPLE = ROOT / "examples" / "node" / "watch_run.js"


def test_node_client_creates_watches_and_prints_the_result(stack: Stack) -> None:
    require_node_tool(ROOT / "node_modules" / "@grpc" / "grpc-js")
    done = subprocess.run(
        [
            "node",
            str(EXAMPLE),
            "--controller",
            stack.address,
            "--target",
            stack.target,
            "--model",
            "mock",
            "--concurrency",
            "3",
            "--requests",
            "30",
            "--output-tokens",
            "16",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env=ENV,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["state"] == "RUN_STATE_SUCCEEDED"
    assert result["run_id"].startswith("run_")
    [stage] = result["stages"]
    assert stage["requests_ok"] == 30
    assert stage["requests_failed"] == 0
    # The mock server's TTFT is 20 ms: the watched result carries real latencies.
    assert 15 <= stage["ttft_p50_ms"] < 1000
    assert "created run_" in done.stderr  # progress went to stderr


def test_node_client_reports_a_refused_run(stack: Stack) -> None:
    require_node_tool(ROOT / "node_modules" / "@grpc" / "grpc-js")
    done = subprocess.run(
        [
            "node",
            str(EXAMPLE),
            "--controller",
            stack.address,
            "--target",
            stack.target,
            "--model",
            "mock",
            "--concurrency",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        cwd=ROOT,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "INVALID_ARGUMENT" in done.stderr or " 3 " in done.stderr
