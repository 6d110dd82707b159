"""The real `llm-loadtest` processes, started and driven the way a user would."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import CLI, ENV, Proc

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

def cli(*args: str, timeout_s: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=timeout_s, env=ENV, cwd=cwd, check=False
    )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, str, list[Proc]]]:
    procs: list[Proc] = []
    try:
        mock = Proc("mock-server", "--port", "0", "--ttft-ms", "20", "--itl-ms", "5", "--output-tokens", "16",
                    log=tmp_path / "mock.log")  # fmt: skip
        procs.append(mock)
        target = mock.wait_line("listening on").rsplit(" ", 1)[-1]
        ctl = Proc("controller", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "runs.db"),
                   log=tmp_path / "controller.log")  # fmt: skip
        procs.append(ctl)
        address = ctl.wait_line("listening on").rsplit(" ", 1)[-1]
        procs.append(Proc("agent", "--controller", address, "--name", "e2e-agent", "--label", "zone=a",
                          log=tmp_path / "agent.log"))  # fmt: skip
        yield target, address, procs
    finally:
        codes = [p.stop() for p in reversed(procs)]
        assert codes == [0, 0, 0], f"processes did not exit cleanly: {codes}"


def test_user_flow(stack: tuple[str, str, list[Proc]], tmp_path: Path) -> None:
    target, address, _ = stack
    done = cli("run", "--controller", address, "--target", target, "--model", "mock",
               "--concurrency", "1,4", "--duration", "2s", "--output-tokens", "16")  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout
    assert "TTFT p50" in done.stdout
    run_id = next(w for w in done.stdout.split() if w.startswith("run_"))

    listed = cli("runs", "list", "--controller", address, "--json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    assert [r["id"] for r in runs] == [run_id]
    assert runs[0]["state"] == "RUN_STATE_SUCCEEDED"

    result = cli("runs", "result", run_id, "--controller", address, "--json")
    assert result.returncode == 0, result.stderr
    stages = json.loads(result.stdout)["stages"]
    assert len(stages) == 2
    assert all(int(s["output_tokens"]) == 16 * int(s["requests_ok"]) for s in stages)

    as_json = cli("run", "--controller", address, "--target", target, "--model", "mock",
                  "--concurrency", "2", "--requests", "10", "--json")  # fmt: skip
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    assert json.loads(as_json.stdout)["stages"][0]["requests_ok"] == "10"  # uint64 is a JSON string

    missing = cli("runs", "get", "run_nope", "--controller", address)
    assert missing.returncode == 1 and "NOT_FOUND" in missing.stderr
    cancel = cli("runs", "cancel", run_id, "--controller", address)
    assert cancel.returncode == 1 and "FAILED_PRECONDITION" in cancel.stderr
    deleted = cli("runs", "delete", run_id, "--controller", address)
    assert deleted.returncode == 0, deleted.stderr
    assert run_id not in cli("runs", "list", "--controller", address).stdout


def test_invalid_run_reports_the_field(stack: tuple[str, str, list[Proc]]) -> None:
    _, address, _ = stack
    bad = cli("run", "--controller", address, "--target", "ftp://x/v1", "--model", "m", "--requests", "1")
    assert bad.returncode != 0
    assert "INVALID_ARGUMENT" in bad.stderr and "spec.target.base_url" in bad.stderr


@pytest.mark.parametrize("command", ["quickstart", "run", "runs", "controller", "agent", "mock-server"])
def test_help(command: str) -> None:
    out = cli(command, "--help")
    assert out.returncode == 0 and "usage: llm-loadtest" in out.stdout


def test_quickstart_exits_zero_and_keeps_the_run(tmp_path: Path) -> None:
    db = tmp_path / "qs.db"
    out = cli("quickstart", "--db", str(db), "--duration", "2s", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "SUCCEEDED" in out.stdout and "concurrency=32" in out.stdout
    import sqlite3

    with sqlite3.connect(db) as conn:
        (state,) = conn.execute("SELECT state FROM runs").fetchone()
    assert state == 3  # RUN_STATE_SUCCEEDED
