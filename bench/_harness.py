"""Shared pieces of the benchmarks: a pinned mock server, process-tree CPU, steady windows.

The machine is small (2 cores): the mock is pinned to one core (`MOCK_CPU`) and the client
under test to the other (`CLIENT_CPU`) with `os.sched_setaffinity`, so the client's CPU
time is its own and the mock's pacing is not disturbed by it. A client's cost is measured
over a *steady window*: from `warmup` seconds after its start to one second before its
end, the CPU time of its whole process tree (from /proc) over the output tokens the mock
wrote in that window (from the mock's `/stats`), so start-up, imports and the ramp-down
count for nobody.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
CLI = str(Path(sys.executable).with_name("llm-loadtest"))
MOCK_CPU = 0
CLIENT_CPU = 1
_TICK = os.sysconf("SC_CLK_TCK")
_MOCK_PIDS: dict[str, int] = {}  # base URL -> pid of the mock serving it


def pin(cpu: int | None) -> Any:
    """A `preexec_fn` pinning the child to `cpu` (None: no pinning, or fewer CPUs than needed)."""
    if cpu is None or cpu >= (os.cpu_count() or 1):
        return None
    return lambda: os.sched_setaffinity(0, {cpu})


def machine() -> str:
    """One line: date, nproc, CPU model, Python, load average."""
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return f"{now} | nproc {os.cpu_count()} | {model} | Python {platform.python_version()} | loadavg {load}"


@contextlib.contextmanager
def mock_server(
    ttft_ms: float, itl_ms: float, output_tokens: int, *, workers: int = 1, cpu: int | None = MOCK_CPU
) -> Iterator[str]:
    """`llm-loadtest mock-server` in its own process (pinned); yields its base URL."""
    cmd = [CLI, "mock-server", "--port", "0", "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms)]
    cmd += ["--output-tokens", str(output_tokens), "--workers", str(workers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, preexec_fn=pin(cpu))  # noqa: PLW1509
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"mock server did not start: {line!r}")
        url = line.rsplit(" ", 1)[-1].strip()
        _MOCK_PIDS[url] = proc.pid
        yield url
    finally:
        proc.terminate()
        proc.wait(15)


def http_json(url: str, method: str = "GET") -> Any:
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.loads(resp.read())


def mock_root(base_url: str) -> str:
    return base_url.removesuffix("/").removesuffix("/v1")


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in (p.name for p in Path("/proc").iterdir()):
        if not entry.isdigit():
            continue
        with contextlib.suppress(OSError, IndexError, ValueError):
            stat = Path(f"/proc/{entry}/stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, ()))
    return out


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and all its live descendants."""
    total = 0
    for p in _descendants(pid):
        with contextlib.suppress(OSError, IndexError, ValueError):
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


@dataclass
class Window:
    """CPU and tokens of one client over its steady window."""

    start_unix_ns: int = 0
    end_unix_ns: int = 0
    cpu_s: float = 0.0
    tokens: int = 0
    requests: int = 0
    seconds: float = 0.0
    mock_cpu_s: float = 0.0
    mock_emission: dict[str, Any] = field(default_factory=dict)

    @property
    def cpu_ms_per_1k_tokens(self) -> float:
        return self.cpu_s * 1e6 / self.tokens if self.tokens else float("nan")

    @property
    def mock_utilisation(self) -> float:
        return self.mock_cpu_s / self.seconds if self.seconds else 0.0

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def cpu_utilisation(self) -> float:
        return self.cpu_s / self.seconds if self.seconds else 0.0


# A mock at this share of its core(s) is no longer a neutral target: its own lateness then
# shows in every client's latencies at that level.
MOCK_BUSY = 0.9


def mock_busy_note(streams: int, kind: str, window: Window) -> list[str]:
    """A note (or none) for a run whose mock was near the end of its CPU."""
    if window.mock_utilisation < MOCK_BUSY:
        return []
    return [
        f"NOTE {streams} streams {kind}: the mock used {window.mock_utilisation:.0%} of a core; latencies at this "
        "level include its own lateness (give it more cores: --mock-workers N, on a machine with cores to spare)"
    ]


def measure(
    proc: subprocess.Popen[Any], base_url: str, warmup_s: float, duration_s: float, *, first_token_within_s: float = 0.0
) -> Window:
    """Wait out `warmup_s`, then measure until 1 s before `duration_s` ends (from now).

    With `first_token_within_s`, "now" is when the mock emits its first token to this client
    (waited for at most that long): a client that takes a while to start (the peers load
    tokenizers and spawn workers) gets the same steady window as one that starts at once.
    """
    root = mock_root(base_url)
    if first_token_within_s > 0:
        _wait_for_first_token(root, proc, first_token_within_s)
    started = time.monotonic()
    end_at = started + max(duration_s - 1.0, warmup_s + 1.0)
    _sleep_until(started + warmup_s, proc)
    window = Window()
    stats0 = http_json(root + "/stats")
    http_json(root + "/stats/reset", "POST")  # emission histograms over the window only
    mock_pid = _MOCK_PIDS.get(base_url, 0)
    mock0 = tree_cpu_s(mock_pid) if mock_pid else 0.0
    cpu0 = tree_cpu_s(proc.pid)
    t0 = time.monotonic()
    window.start_unix_ns = time.time_ns()
    _sleep_until(end_at, proc)
    cpu1 = tree_cpu_s(proc.pid)
    t1 = time.monotonic()
    window.mock_cpu_s = (tree_cpu_s(mock_pid) - mock0) if mock_pid else 0.0
    window.end_unix_ns = time.time_ns()
    stats1 = http_json(root + "/stats")
    window.mock_emission = http_json(root + "/stats/emission")
    window.cpu_s = cpu1 - cpu0
    window.tokens = int(stats1["output_tokens_total"])  # reset at t0
    window.requests = int(stats1["requests_ok"])
    window.seconds = t1 - t0
    del stats0
    return window


def _wait_for_first_token(root: str, proc: subprocess.Popen[Any], timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while int(http_json(root + "/stats")["output_tokens_total"]) == 0:
        if time.monotonic() > deadline:
            raise RuntimeError(f"no token reached the client within {timeout_s:g} s: {proc.args}")
        _sleep_until(time.monotonic() + 0.1, proc)


def _sleep_until(deadline: float, proc: subprocess.Popen[Any]) -> None:
    while (left := deadline - time.monotonic()) > 0:
        if proc.poll() is not None:
            raise RuntimeError(f"client exited early ({proc.returncode}): {proc.args}")
        time.sleep(min(left, 0.2))


@dataclass
class ClientRun:
    """One client's run: its steady window and its samples."""

    kind: str
    streams: int
    window: Window
    ttft_ms: np.ndarray[Any, Any]
    itl_ms: np.ndarray[Any, Any]

    def ttft_p99_error_ms(self, injected_ms: float) -> float:
        return float(np.percentile(self.ttft_ms, 99)) - injected_ms if len(self.ttft_ms) else float("nan")

    def itl_p99_ms(self) -> float:
        return float(np.percentile(self.itl_ms, 99)) if len(self.itl_ms) else float("nan")


def run_client(kind: str, base_url: str, streams: int, duration_s: float, warmup_s: float, out_dir: Path) -> ClientRun:
    """Run `bench/_clients.py KIND` pinned to `CLIENT_CPU`; its steady-window figures."""
    out = out_dir / f"{kind}-{streams}.npz"
    cmd = [sys.executable, str(ROOT / "bench" / "_clients.py"), kind, "--url", base_url]
    cmd += ["--streams", str(streams), "--duration", str(duration_s), "--out", str(out)]
    log = (out_dir / f"{kind}-{streams}.log").open("wb")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=log, preexec_fn=pin(CLIENT_CPU))  # noqa: PLW1509
    try:
        # The client's own clock starts after its imports: give it a moment of slack.
        window = measure(proc, base_url, warmup_s + 1.0, duration_s + 1.0)
        proc.wait(duration_s + 60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} client failed ({proc.returncode}); see {out_dir / f'{kind}-{streams}.log'}")
    data = np.load(out)
    in_window = (data["sent_unix_ns"] >= window.start_unix_ns) & (data["sent_unix_ns"] < window.end_unix_ns)
    ttft = data["ttft_ns"][in_window] / 1e6
    itl_in = (data["itl_sent_unix_ns"] >= window.start_unix_ns) & (data["itl_sent_unix_ns"] < window.end_unix_ns)
    return ClientRun(kind, streams, window, ttft, data["itl_ns"][itl_in] / 1e6)


def run_arguments(
    doc: str | None, *, streams: str, duration_s: float, clients: str | None = None
) -> argparse.ArgumentParser:
    """The flags every client benchmark shares (stream counts, run length, warm-up, mock workers)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--streams", default=streams, help="comma-separated stream counts (default: %(default)s)")
    if clients is not None:
        parser.add_argument("--clients", default=clients, help="which clients (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=duration_s, help="seconds per run (default: %(default)s)")
    parser.add_argument("--warmup", type=float, default=4.0, help="seconds before the window (default: %(default)s)")
    parser.add_argument("--mock-workers", type=int, default=1, help="mock processes (default: %(default)s)")
    return parser


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-markdown table."""

    def cell(v: Any) -> str:
        return f"{v:.1f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
