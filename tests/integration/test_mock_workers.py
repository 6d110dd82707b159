"""`llm-loadtest mock-server --workers N`: several processes on one port, stats summed over them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

CLI = str(Path(sys.executable).parent / "llm-loadtest")
OUTPUT_TOKENS = 6
REQUESTS = 40


@pytest.fixture
def two_workers(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    log = (tmp_path / "mock.log").open("wb")
    proc = subprocess.Popen(
        [
            CLI,
            "mock-server",
            "--port",
            "0",
            "--workers",
            "2",
            "--ttft-ms",
            "2",
            "--itl-ms",
            "1",
            "--output-tokens",
            str(OUTPUT_TOKENS),
        ],
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "(2 workers) listening on" in line, (line, (tmp_path / "mock.log").read_text())
        yield line.rsplit(" ", 1)[-1].strip(), proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()


async def _get(url: str) -> Any:
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        return await resp.json()


async def _stream_once(base_url: str) -> int:
    """One streamed chat completion on its own connection; the number of text events."""
    body = {"model": "mock", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    connector = aiohttp.TCPConnector(force_close=True)
    async with (
        aiohttp.ClientSession(connector=connector) as session,
        session.post(base_url + "/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        text = await resp.text()
    return sum(1 for line in text.splitlines() if '"content":"' in line.replace(" ", ""))


async def test_two_workers_both_serve_and_stats_reconcile(two_workers: tuple[str, subprocess.Popen[bytes]]) -> None:
    base_url, _ = two_workers
    root = base_url.removesuffix("/v1")
    events = await asyncio.gather(*(_stream_once(base_url) for _ in range(REQUESTS)))
    assert all(n >= 1 for n in events)

    def settled(stats: Any) -> bool:
        return bool(stats["requests_ok"] == REQUESTS and stats["running"] == 0)

    stats = await eventually(lambda: _get(root + "/stats"), settled)
    assert stats["workers"] == 2
    assert stats["requests_total"] == REQUESTS
    assert stats["output_tokens_total"] == REQUESTS * OUTPUT_TOKENS
    assert stats["by_endpoint"] == {"chat": REQUESTS, "completions": 0}
    per_worker = stats["per_worker"]
    assert len(per_worker) == 2
    # 40 connections spread by the kernel's hash: each worker took some (1 in 2^39 to fail).
    assert all(w["requests_total"] > 0 for w in per_worker), per_worker
    assert sum(w["requests_ok"] for w in per_worker) == REQUESTS
    assert sum(w["output_tokens_total"] for w in per_worker) == REQUESTS * OUTPUT_TOKENS

    emission = await _get(root + "/stats/emission")
    assert emission["workers"] == 2
    assert emission["ttft_late"]["count"] == REQUESTS
    assert emission["itl"]["count"] == REQUESTS * (OUTPUT_TOKENS - 1)

    async with aiohttp.ClientSession() as session, session.post(root + "/stats/reset") as resp:
        assert resp.status == 200
    # Every worker, whichever answered the reset, is back to zero.
    for _ in range(3):
        stats = await eventually(lambda: _get(root + "/stats"), lambda s: s["requests_total"] == 0)
        assert [w["requests_total"] for w in stats["per_worker"]] == [0, 0]
    await _stream_once(base_url)
    stats = await eventually(lambda: _get(root + "/stats"), lambda s: s["requests_ok"] == 1)
    assert stats["requests_total"] == 1


def test_sigterm_stops_every_worker(two_workers: tuple[str, subprocess.Popen[bytes]]) -> None:
    _, proc = two_workers
    workers = _children(proc.pid)
    assert len(workers) >= 2
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(20) == 0
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in workers) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in workers)


def test_port_in_use_is_an_error(two_workers: tuple[str, subprocess.Popen[bytes]]) -> None:
    base_url, _ = two_workers
    port = base_url.rsplit(":", 1)[-1].split("/")[0]
    # The workers' sockets are SO_REUSEPORT, but only for processes of the same user that
    # also ask for it; a plain server (no --workers) must be refused.
    done = subprocess.run([CLI, "mock-server", "--port", port], capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 1
    assert "cannot listen" in done.stderr


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True, check=False)
    return [int(p) for p in out.stdout.split()]


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False
