"""`run --compare-to` as a CI gate, with the real `llm-loadtest` processes: a controller, an
agent and two mock servers of known TTFT (10 ms and 200 ms), driven as a user would.

The regression is twenty-fold (10 -> 200 ms TTFT over 100 requests), and the same-server
comparison gets a 500 % tolerance: neither outcome depends on how loaded the machine is.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import CLI, ENV, Proc, wait_for_agents

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout_s, env=ENV, check=False)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """(fast mock URL, slow mock URL, controller address)."""
    procs: list[Proc] = []
    try:
        targets = []
        for name, ttft in (("fast", "10"), ("slow", "200")):
            mock = Proc(
                "mock-server",
                "--port",
                "0",
                "--ttft-ms",
                ttft,
                "--itl-ms",
                "1",
                "--output-tokens",
                "8",
                log=tmp_path / f"mock-{name}.log",
            )
            procs.append(mock)
            targets.append(mock.wait_line("listening on").rsplit(" ", 1)[-1])
        ctl = Proc(
            "controller", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "runs.db"), log=tmp_path / "controller.log"
        )
        procs.append(ctl)
        address = ctl.wait_line("listening on").rsplit(" ", 1)[-1]
        procs.append(Proc("agent", "--controller", address, "--name", "e2e-agent", log=tmp_path / "agent.log"))
        wait_for_agents(address)
        yield targets[0], targets[1], address
    finally:
        codes = [p.stop() for p in reversed(procs)]
        assert codes == [0] * len(procs), f"processes did not exit cleanly: {codes}"


def run(address: str, target: str, *flags: str) -> subprocess.CompletedProcess[str]:
    return cli(
        "run",
        "--controller",
        address,
        "--target",
        target,
        "--model",
        "mock",
        "--concurrency",
        "4",
        "--requests",
        "100",
        "--output-tokens",
        "8",
        *flags,
    )


def run_id_of(done: subprocess.CompletedProcess[str]) -> str:
    return next(w for w in done.stderr.split() if w.startswith("run_"))


def test_run_compare_to_gates_on_the_series_baseline(stack: tuple[str, str, str], tmp_path: Path) -> None:
    fast, slow, address = stack
    # No baseline yet: the run's own exit code, and how to set one.
    first = run(address, fast, "--compare-to", "svc", "--label", "commit=a")
    assert first.returncode == 0, first.stderr[-3000:]
    base = run_id_of(first)
    assert f"runs baseline set svc {base}" in first.stdout
    done = cli("runs", "baseline", "set", "svc", base, "--controller", address)
    assert done.returncode == 0 and f"baseline of svc: {base}" in done.stdout, done.stderr

    regressed = run(address, slow, "--compare-to", "svc", "--label", "commit=b")
    assert regressed.returncode == 1, regressed.stdout[-3000:] + regressed.stderr[-3000:]
    assert "REGRESSED" in regressed.stdout and f"vs baseline {base}" in regressed.stdout
    same = run(address, fast, "--compare-to", "svc", "--compare-tolerance", "500", "--label", "commit=c")
    assert same.returncode == 0, same.stdout[-3000:] + same.stderr[-3000:]
    assert "no regression" in same.stdout
    # --json keeps stdout one JSON document: the comparison goes to stderr.
    as_json = run(address, slow, "--compare-to", "svc", "--json", "--label", "commit=d")
    assert as_json.returncode == 1 and "REGRESSED" in as_json.stderr
    assert json.loads(as_json.stdout)["stages"][0]["requests_ok"] == 100

    listed = cli("runs", "list", "--series", "svc", "--controller", address, "--json")
    series_runs = [r["id"] for r in json.loads(listed.stdout)]
    assert len(series_runs) == 4 and series_runs[-1] == base
    history = cli("runs", "history", "svc", "--label", "commit", "--controller", address, "--json")
    assert history.returncode == 0, history.stderr
    points = json.loads(history.stdout)["points"]
    assert [p["label_value"] for p in points] == ["a", "b", "c", "d"]
    assert [p["baseline"] for p in points] == [True, False, False, False]
    assert points[1]["value"] > 10 * points[0]["value"]  # 200 ms against 10 ms
    table = cli("runs", "history", "svc", "--label", "commit", "--controller", address)
    assert table.returncode == 0 and "◆ baseline" in table.stdout and "trend" in table.stdout, table.stderr

    shown = cli("runs", "baseline", "show", "svc", "--json", "--controller", address)
    assert json.loads(shown.stdout)["run_id"] == base
    page = tmp_path / "report.html"
    report = cli("report", series_runs[0], "-o", str(page), "--no-samples", "--controller", address)
    assert report.returncode == 0, report.stderr
    assert "History of svc" in page.read_text(encoding="utf-8")

    assert cli("runs", "baseline", "delete", "svc", "--controller", address).returncode == 0
    gone = cli("runs", "baseline", "show", "svc", "--controller", address)
    assert gone.returncode == 1 and "NOT_FOUND" in gone.stderr
    bad = run(address, fast, "--series", "other", "--compare-to", "svc")
    assert bad.returncode == 2 and "--compare-to svc" in bad.stderr
