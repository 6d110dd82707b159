"""The real `llm-loadtest` processes, started and driven the way a user would."""

from __future__ import annotations

import json
import re
import shlex
import signal
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pytest
from google.protobuf import timestamp_pb2

from tests.processes import CLI, ENV, Proc, wait_for_agents

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]
T = TypeVar("T")


def cli(*args: str, timeout_s: float = 120, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, *args], capture_output=True, text=True, timeout=timeout_s, env=ENV, cwd=cwd, check=False
    )


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, str, list[Proc]]]:
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
            log=tmp_path / "mock.log",
        )
        procs.append(mock)
        target = mock.wait_line("listening on").rsplit(" ", 1)[-1]
        ctl = Proc(
            "controller", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "runs.db"), log=tmp_path / "controller.log"
        )
        procs.append(ctl)
        address = ctl.wait_line("listening on").rsplit(" ", 1)[-1]
        procs.append(
            Proc(
                "agent", "--controller", address, "--name", "e2e-agent", "--label", "zone=a", log=tmp_path / "agent.log"
            )
        )
        wait_for_agents(address)
        yield target, address, procs
    finally:
        codes = [p.stop() for p in reversed(procs)]
        assert codes == [0, 0, 0], f"processes did not exit cleanly: {codes}"


def test_user_flow(stack: tuple[str, str, list[Proc]], tmp_path: Path) -> None:
    target, address, _ = stack
    done = cli(
        "run",
        "--controller",
        address,
        "--target",
        target,
        "--model",
        "mock",
        "--concurrency",
        "1,4",
        "--duration",
        "2s",
        "--output-tokens",
        "16",
    )
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
    assert all(s["output_tokens"] == 16 * s["requests_ok"] for s in stages)

    as_json = cli(
        "run",
        "--controller",
        address,
        "--target",
        target,
        "--model",
        "mock",
        "--concurrency",
        "2",
        "--requests",
        "10",
        "--json",
    )
    assert as_json.returncode == 0, as_json.stderr[-3000:]
    printed = json.loads(as_json.stdout)
    # Numbers as numbers (uint64 too) and zero fields present (docs/json.md).
    assert printed["stages"][0]["requests_ok"] == 10
    assert printed["stages"][0]["requests_failed"] == 0
    # The mock ends every answer after 16 tokens; the default max_tokens asks for 128. (On a
    # loaded machine the agent may also be flagged saturated: another warning, as it should be.)
    assert printed["cli"]["verdict"] == "NONE"
    assert "stage 0: output length 128 → 16 tokens (mean requested → actual)" in printed["cli"]["warnings"]
    shown = [line.removeprefix("WARNING ") for line in as_json.stderr.splitlines() if line.startswith("WARNING ")]
    assert shown == printed["cli"]["warnings"]
    other_id = printed["run_id"]

    # Nothing matched is no pass: exit 2, with the loads of both runs.
    compared = cli("runs", "compare", run_id, other_id, "--controller", address)
    assert compared.returncode == 2, compared.stdout + compared.stderr
    assert "concurrency=1, concurrency=4" in compared.stderr and "concurrency=2" in compared.stderr

    # `run --resume` reads the earlier run first: one of fixed stages is no search to continue,
    # and nothing is created.
    resumed = cli("run", "--controller", address, "--target", target, "--model", "mock", "--resume", run_id)
    assert resumed.returncode == 2, resumed.stdout + resumed.stderr
    assert resumed.stderr.strip() == f"llm-loadtest run: error: --resume: run {run_id} is not a capacity search"
    gone = cli("run", "--controller", address, "--target", target, "--model", "mock", "--resume", "run_nope")
    assert gone.returncode == 2 and "NOT_FOUND" in gone.stderr, gone.stderr
    assert len(json.loads(cli("runs", "list", "--controller", address, "--json").stdout)) == 2

    # The read commands read the database file itself, as the RPCs would answer.
    from_db = cli("runs", "result", run_id, "--db", str(tmp_path / "runs.db"), "--json")
    assert from_db.returncode == 0, from_db.stderr
    assert json.loads(from_db.stdout) == json.loads(result.stdout)

    unreachable = cli("runs", "list", "--controller", "127.0.0.1:1")
    assert unreachable.returncode == 4, unreachable.stderr
    assert "no controller at 127.0.0.1:1" in unreachable.stderr and "Traceback" not in unreachable.stderr

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
    assert "SUCCEEDED" in out.stdout and "32" in out.stdout
    import sqlite3

    with sqlite3.connect(db) as conn:
        (state,) = conn.execute("SELECT state FROM runs").fetchone()
    assert state == 3  # RUN_STATE_SUCCEEDED

    # It ends with the commands that look at the run; they work with no controller running.
    steps = [line.strip() for line in out.stderr.splitlines() if line.strip().startswith("llm-loadtest ")]
    assert len(steps) == 3, out.stderr[-2000:]
    for step in steps:
        words = shlex.split(step)
        done = cli(*words[1:], cwd=tmp_path)
        assert done.returncode == 0, f"{step}: {done.stderr[-2000:]}"
    assert (tmp_path / "report.html").stat().st_size > 1000
    assert (tmp_path / "samples.csv").read_text().count("\n") > 10


def _poll(probe: Callable[[], T], check: Callable[[T], bool], timeout_s: float = 60.0) -> T:
    """`probe()` until `check` holds, with a deadline (a subprocess, so no event loop here)."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = probe()
        if check(value):
            return value
        assert time.monotonic() < deadline, f"condition not met within {timeout_s} s; last value: {value!r}"
        time.sleep(0.1)


def _start_run(target: str, address: str) -> tuple[subprocess.Popen[str], str]:
    """A real `llm-loadtest run` of 60 s at concurrency 8, once its requests are flowing."""
    proc = subprocess.Popen(
        [
            CLI,
            "run",
            "--controller",
            address,
            "--target",
            target,
            "--model",
            "mock",
            "--concurrency",
            "8",
            "--duration",
            "60s",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stderr is not None
    first = proc.stderr.readline()
    assert first.startswith("created run "), first
    run_id = first.split()[2]
    _poll(
        lambda: json.loads(cli("runs", "get", run_id, "--controller", address, "--json").stdout),
        lambda r: r["state"] == "RUN_STATE_RUNNING" and r["progress"]["requests_ok"] > 0,
    )
    return proc, run_id


def _mock_stats(target: str) -> dict[str, int]:
    with urllib.request.urlopen(target.removesuffix("/v1") + "/stats", timeout=10) as response:
        stats: dict[str, int] = json.load(response)
    return stats


def test_ctrl_c_cancels_the_run_and_prints_its_partial_result(stack: tuple[str, str, list[Proc]]) -> None:
    target, address, _ = stack
    proc, run_id = _start_run(target, address)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert f"Ctrl-C: cancelling run {run_id}" in stderr
    assert "CANCELLED" in stdout and "TTFT p50" in stdout, stdout  # the partial result's table
    state = json.loads(cli("runs", "get", run_id, "--controller", address, "--json").stdout)
    assert state["state"] == "RUN_STATE_CANCELLED" and state["state_reason"] == "cancelled from the CLI (Ctrl-C)"
    # The load has stopped: nothing in flight at the mock, and no new requests.
    sent = _poll(lambda: _mock_stats(target), lambda s: s["running"] == 0, timeout_s=30)["requests_total"]
    assert _mock_stats(target)["requests_total"] == sent


def test_a_second_ctrl_c_detaches_and_names_the_cancel_command(stack: tuple[str, str, list[Proc]]) -> None:
    target, address, procs = stack
    agent = procs[-1].p
    proc, run_id = _start_run(target, address)
    assert proc.stderr is not None
    # A frozen agent cannot stop, so the run cannot end while the CLI counts down.
    agent.send_signal(signal.SIGSTOP)
    try:
        proc.send_signal(signal.SIGINT)
        lines = []
        while not (line := proc.stderr.readline()).startswith("waiting for run"):
            assert line, "".join(lines)
            lines.append(line)
        assert re.fullmatch(rf"waiting for run {run_id} to end: \d+ s left\n", line), line
        proc.send_signal(signal.SIGINT)
        stdout, rest = proc.communicate(timeout=60)
    finally:
        agent.send_signal(signal.SIGCONT)
    assert proc.returncode == 130, rest[-3000:]
    command = f"llm-loadtest runs cancel {run_id} --controller {address}"
    assert "detached (Ctrl-C again)" in rest and command in rest, rest
    assert stdout == ""
    # The printed command is the one that cancels it (or finds it already cancelled by the first Ctrl-C).
    cancel = cli(*shlex.split(command)[1:])
    assert cancel.returncode == 0 or "already finished (RUN_STATE_CANCELLED)" in cancel.stderr, cancel.stderr
    _poll(
        lambda: json.loads(cli("runs", "get", run_id, "--controller", address, "--json").stdout),
        lambda r: r["state"] == "RUN_STATE_CANCELLED",
    )


def test_detach_leaves_the_run_going(stack: tuple[str, str, list[Proc]]) -> None:
    target, address, _ = stack
    out = cli("run", "--controller", address, "--target", target, "--model", "mock", "--requests", "20", "--detach")
    assert out.returncode == 0, out.stderr
    run_id = out.stdout.strip()
    assert f"llm-loadtest runs cancel {run_id} --controller {address}" in out.stderr
    _poll(
        lambda: json.loads(cli("runs", "get", run_id, "--controller", address, "--json").stdout),
        lambda r: r["state"] == "RUN_STATE_SUCCEEDED",
    )


def test_run_repeat_runs_a_group_one_repeat_after_another(stack: tuple[str, str, list[Proc]], tmp_path: Path) -> None:
    target, address, _ = stack
    base = ("--controller", address, "--target", target, "--model", "mock", "--concurrency", "2", "--requests", "10")
    done = cli("run", *base, "--repeat", "2", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    printed = json.loads(done.stdout)
    group_id = printed["run_id"]
    assert group_id.startswith("grp_") and printed["group"]["id"] == group_id
    run_ids = printed["group"]["run_ids"]
    assert len(run_ids) == 2 and printed["group"]["counted_run_ids"] == run_ids
    assert printed["stages"][0]["repeats"] == 2 and printed["stages"][0]["requests_ok"] == 20
    assert f"created group {group_id}" in done.stderr
    for i, run_id in enumerate(run_ids):
        assert re.search(rf"^repeat {i + 1}/2 {run_id} SUCCEEDED  ok 10  failed 0", done.stderr, re.M), done.stderr

    shown = cli("runs", "result", group_id, "--controller", address, "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["stages"][0]["requests_ok"] == 20
    table = cli("runs", "result", group_id, "--controller", address)
    assert table.returncode == 0 and f"group id: {group_id}" in table.stdout and "counted: 2 of 2" in table.stdout
    listed = json.loads(cli("runs", "list", "--group", group_id, "--controller", address, "--json").stdout)
    assert sorted((r["id"], r["group_id"]) for r in listed) == sorted((r, group_id) for r in run_ids)
    runs = [json.loads(cli("runs", "get", r, "--controller", address, "--json").stdout) for r in run_ids]
    assert _ns(runs[1]["start_time"]) >= _ns(runs[0]["end_time"])
    assert runs[0]["spec"]["workload"]["seed"] != runs[1]["spec"]["workload"]["seed"]
    # The report of a group: its result, and both runs' samples in the distributions.
    page = tmp_path / "group.html"
    reported = cli("report", group_id, "--controller", address, "-o", str(page))
    assert reported.returncode == 0, reported.stderr
    text = page.read_text()
    assert group_id in text and "20 samples exported" in text

    refused = cli("run", *base, "--repeat", "101")
    assert refused.returncode == 2 and "repeat" in refused.stderr, refused.stderr

    detached = cli("run", *base, "--repeat", "2", "--detach")
    assert detached.returncode == 0, detached.stderr
    other = detached.stdout.strip()
    assert other.startswith("grp_") and f"llm-loadtest runs result {other}" in detached.stderr
    _poll(
        lambda: json.loads(cli("runs", "list", "--group", other, "--controller", address, "--json").stdout),
        lambda runs: [r["state"] for r in runs] == ["RUN_STATE_SUCCEEDED"] * 2,
    )


def test_ctrl_c_on_a_group_cancels_the_current_and_later_repeats(stack: tuple[str, str, list[Proc]]) -> None:
    target, address, _ = stack
    args = ["run", "--controller", address, "--target", target, "--model", "mock", "--duration", "60s"]
    proc = subprocess.Popen(
        [CLI, *args, "--concurrency", "4", "--repeat", "3"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=ENV,
    )
    assert proc.stderr is not None
    created = proc.stderr.readline()
    assert created.startswith("created group grp_"), created
    group_id = created.split()[2].rstrip(":")
    watching = proc.stderr.readline()
    assert watching.startswith("repeat 1/3: run "), watching
    first = watching.split()[-1]
    _poll(
        lambda: json.loads(cli("runs", "get", first, "--controller", address, "--json").stdout),
        lambda r: r["state"] == "RUN_STATE_RUNNING" and r["progress"]["requests_ok"] > 0,
    )
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr[-3000:]
    assert f"Ctrl-C: cancelling run {first}" in stderr
    assert f"group id: {group_id}" in stdout and "CANCELLED" in stdout, stdout
    listed = json.loads(cli("runs", "list", "--group", group_id, "--controller", address, "--json").stdout)
    assert len(listed) == 3 and {r["state"] for r in listed} == {"RUN_STATE_CANCELLED"}


def _ns(rfc3339: str) -> int:
    ts = timestamp_pb2.Timestamp()
    ts.FromJsonString(rfc3339)
    return ts.ToNanoseconds()
