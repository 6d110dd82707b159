"""The real mock against its computed serving model (`mockserver.capacity`): TTFT and TPOT
measured over HTTP at a few loads agree with the formulas.

Each test starts a `MockServer` on 127.0.0.1:0 in this process and loads it with plain aiohttp
clients. The bounds hold on a busy machine: a token goes out late by up to `LATENESS_MS`
(and a late token delays the ones after it), so the upper bound is the model with each gap
that much longer; the lower bound allows one request fewer running for a moment (a
closed-loop client between two requests), never a TPOT below the model's otherwise.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from mockserver import MockConfig, MockServer
from mockserver.capacity import Workload, closed_loop, open_loop
from mockserver.pacing import sleep_until
from tests.conftest import eventually
from tests.integration.test_server_metrics import scrape

pytestmark = pytest.mark.timeout(120)

LATENESS_MS = 3.0  # per token, what a loaded 2-core machine may add to every gap
SLACK = 1.15  # and 15 % on top for everything else (the client's own reads, the network)


@dataclasses.dataclass(frozen=True)
class Measured:
    ttft_ms: float
    tpot_ms: float
    e2e_ms: float
    prompt_tokens: int


def _prompt(words: int) -> str:
    return " ".join(["w"] * words)


async def _stream(session: aiohttp.ClientSession, base_url: str, prompt_words: int, tokens: int) -> Measured:
    """One streamed completion of exactly `tokens` tokens, timed at the client."""
    body = {
        "model": "mock",
        "prompt": _prompt(prompt_words),
        "max_tokens": tokens,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.perf_counter()
    arrivals: list[float] = []
    prompt_tokens = -1
    async with session.post(base_url + "/completions", json=body) as resp:
        assert resp.status == 200
        async for line in resp.content:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[len(b"data: ") :])
            if event["choices"] and event["choices"][0]["text"]:
                arrivals.append(time.perf_counter())
            if event.get("usage"):
                prompt_tokens = event["usage"]["prompt_tokens"]
    assert len(arrivals) == tokens
    return Measured(
        ttft_ms=(arrivals[0] - sent) * 1000,
        tpot_ms=(arrivals[-1] - arrivals[0]) * 1000 / (tokens - 1),
        e2e_ms=(arrivals[-1] - sent) * 1000,
        prompt_tokens=prompt_tokens,
    )


async def _closed_loop(base_url: str, clients: int, requests: int, prompt_words: int, tokens: int) -> list[Measured]:
    """`clients` clients each sending `requests` requests back to back, on its own kept-alive
    connection; the first and last request of each are dropped (the load starting and
    ending around them)."""

    async def client() -> list[Measured]:
        connector = aiohttp.TCPConnector(limit=1)
        timeout = aiohttp.ClientTimeout(total=60)
        async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
            return [await _stream(session, base_url, prompt_words, tokens) for _ in range(requests)]

    per_client = await asyncio.gather(*(client() for _ in range(clients)))
    return [m for measured in per_client for m in measured[1:-1]]


def _slower(config: MockConfig) -> MockConfig:
    """The model with every gap `LATENESS_MS` longer: what a late mock still stays within."""
    return dataclasses.replace(config, itl_ms=config.itl_ms + LATENESS_MS)


def _median(values: Iterator[float] | list[float]) -> float:
    return statistics.median(list(values))


async def test_tpot_grows_with_the_requests_generating() -> None:
    # The brief's example: TPOT 5 + 2 x running, so 7 ms alone and 21 ms at 8 running.
    config = MockConfig(ttft_ms=5, itl_ms=5, itl_per_running_ms=2)
    workload = Workload(prompt_tokens=3, output_tokens=16)
    medians: dict[int, float] = {}
    async with MockServer(config) as mock:
        for clients in (1, 8):
            expected = closed_loop(config, workload, clients)
            upper = closed_loop(_slower(config), workload, clients)
            measured = await _closed_loop(mock.base_url, clients, 6, 3, 16)
            medians[clients] = _median(m.tpot_ms for m in measured)
            assert expected.tpot_ms - config.itl_per_running_ms <= medians[clients] <= upper.tpot_ms * SLACK, clients
            assert _median(m.ttft_ms for m in measured) <= expected.ttft_max_ms + 20 * SLACK  # nobody waits
    assert (closed_loop(config, workload, 1).tpot_ms, closed_loop(config, workload, 8).tpot_ms) == (7.0, 21.0)
    assert medians[8] - medians[1] >= 10.0  # 14 ms apart in the model


async def test_prefill_adds_to_the_ttft_by_the_prompt_tokens() -> None:
    config = MockConfig(ttft_ms=10, itl_ms=2, prefill_ms_per_1k_tokens=200)
    async with MockServer(config) as mock, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        ttfts: dict[int, list[float]] = {3: [], 300: []}
        for words in (3, 300, 3, 300, 3, 300):
            measured = await _stream(session, mock.base_url, words, 4)
            assert measured.prompt_tokens == words
            ttfts[words].append(measured.ttft_ms)
        long_t0 = closed_loop(config, Workload(300, 4), 1).ttft_max_ms
        short_t0 = closed_loop(config, Workload(3, 4), 1).ttft_max_ms
        assert (short_t0, long_t0) == pytest.approx((10.6, 70.0))
        for words, t0 in ((3, short_t0), (300, long_t0)):
            assert min(ttfts[words]) >= t0  # never early
            assert _median(ttfts[words]) <= t0 * SLACK + 20
        assert _median(ttfts[300]) - _median(ttfts[3]) >= 45.0  # 59.4 ms in the model

        # A non-streamed answer takes its prefill and its gaps (each reading R, here 1) too.
        body = {"model": "mock", "prompt": _prompt(300), "max_tokens": 4, "ignore_eos": True}
        sent = time.perf_counter()
        async with session.post(mock.base_url + "/completions", json=body) as resp:
            answer = await resp.json()
        assert answer["usage"]["prompt_tokens"] == 300
        assert (time.perf_counter() - sent) * 1000 >= closed_loop(config, Workload(300, 4), 1).e2e_max_ms


async def test_a_queue_for_the_slots_adds_the_computed_wait_and_only_the_slots_count_as_running() -> None:
    # Two slots, four clients: R = 2 (TPOT 10 ms, not ITL(4) = 18), and with M dividing C
    # every request waits exactly one slot time S = 10 + 9 x 10 = 100 ms: TTFT 110 ms.
    config = MockConfig(ttft_ms=10, itl_ms=2, itl_per_running_ms=4, max_running=2)
    workload = Workload(prompt_tokens=3, output_tokens=10)
    expected = closed_loop(config, workload, 4)
    assert (expected.tpot_ms, expected.service_ms, expected.ttft_min_ms, expected.ttft_max_ms) == (10, 100, 110, 110)
    upper = closed_loop(_slower(config), workload, 4)
    async with MockServer(config) as mock:
        load = asyncio.create_task(_closed_loop(mock.base_url, 4, 10, 3, 10))
        seen: list[tuple[float, float]] = []

        async def gauges() -> tuple[float, float]:
            page = await scrape(mock)
            seen.append((page["vllm:num_requests_running"].value, page["vllm:num_requests_waiting"].value))
            return seen[-1]

        assert await eventually(gauges, lambda g: g == (2, 2), timeout_s=30) == (2, 2)
        measured = await asyncio.wait_for(load, 60)
        after = await gauges()
    assert after == (0, 0)
    assert all(running <= 2 and waiting <= 2 for running, waiting in seen), seen
    tpot = _median(m.tpot_ms for m in measured)
    assert expected.tpot_ms - config.itl_per_running_ms <= tpot <= upper.tpot_ms * SLACK
    assert tpot < closed_loop(dataclasses.replace(config, max_running=0), workload, 4).tpot_ms  # 18 ms
    ttft = _median(m.ttft_ms for m in measured)
    # The wait is S less the client's time between two requests; a late mock makes S longer.
    assert expected.ttft_mean_ms - 15 <= ttft <= upper.ttft_max_ms * SLACK


async def test_evenly_spaced_arrivals_see_the_computed_tpot() -> None:
    # 25 requests/s, each holding its slot ~290 ms: about 7 generating at once, TPOT ~9 ms
    # against 3 ms for a request alone.
    config = MockConfig(ttft_ms=150, itl_ms=2, itl_per_running_ms=1)
    workload = Workload(prompt_tokens=3, output_tokens=16)
    rate, count = 25.0, 80
    expected = open_loop(config, workload, rate)
    upper = open_loop(_slower(config), workload, rate)
    alone = closed_loop(config, workload, 1).tpot_ms
    assert not expected.overloaded and expected.seen_running > 5
    async with MockServer(config) as mock, aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        start = time.monotonic()
        tasks = []
        for i in range(count):
            await sleep_until(start + i / rate)  # the arrival schedule, not synchronisation
            tasks.append(asyncio.create_task(_stream(session, mock.base_url, 3, 16)))
        measured = await asyncio.wait_for(asyncio.gather(*tasks), 60)
    # The steady part: after the first slot time of arrivals, before the last.
    steady = measured[int(rate * expected.service_ms / 1000) + 1 : -int(rate * expected.service_ms / 1000) - 1]
    assert len(steady) >= 40
    tpot = _median(m.tpot_ms for m in steady)
    assert expected.tpot_ms - config.itl_per_running_ms <= tpot <= upper.tpot_ms * SLACK
    assert tpot >= alone + 3.0  # the model's 9 ms against 3 ms alone
    assert _median(m.ttft_ms for m in steady) <= expected.ttft_ms * SLACK + 20  # nobody waits


CLI = str(Path(sys.executable).parent / "llm-loadtest")


@pytest.fixture
def two_workers_one_slot_each(tmp_path: Path) -> Iterator[str]:
    log = (tmp_path / "mock.log").open("wb")
    args = ["--port", "0", "--workers", "2", "--max-running", "1", "--ttft-ms", "5", "--itl-ms", "5"]
    args += ["--itl-per-running-ms", "5", "--prefill-ms-per-1k-tokens", "100"]
    proc = subprocess.Popen(
        [CLI, "mock-server", *args],
        stdout=subprocess.PIPE,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        assert "(2 workers) listening on" in line, (line, (tmp_path / "mock.log").read_text())
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


@pytest.mark.e2e
async def test_each_worker_has_its_own_slots_and_the_flags_reach_it(two_workers_one_slot_each: str) -> None:
    base_url = two_workers_one_slot_each
    config = MockConfig(ttft_ms=5, itl_ms=5, itl_per_running_ms=5, prefill_ms_per_1k_tokens=100, max_running=1)
    workload = Workload(prompt_tokens=100, output_tokens=6)
    alone = closed_loop(config, workload, 1)  # T0 = 15 ms, ITL = 10 ms, S = 65 ms
    assert (alone.ttft_max_ms, alone.tpot_ms, alone.service_ms) == (15.0, 10.0, 65.0)

    async def on_a_new_connection() -> Measured:
        connector = aiohttp.TCPConnector(force_close=True)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=30)) as session:
            return await _stream(session, base_url, 100, 6)

    # Pairs at once on new connections: the kernel puts the two on one worker or on both.
    # One worker serves them one after the other (one slot); two serve them together.
    together = queued = 0
    for _ in range(40):
        firsts = sorted(m.ttft_ms for m in await asyncio.gather(on_a_new_connection(), on_a_new_connection()))
        assert firsts[0] >= alone.ttft_max_ms  # the prefill reached the worker
        if firsts[1] < alone.ttft_max_ms + alone.service_ms / 2:
            together += 1
        elif firsts[1] >= alone.service_ms:
            queued += 1
        if together and queued:
            break
    assert together and queued, (together, queued)
    single = await on_a_new_connection()
    assert alone.tpot_ms - 0.5 <= single.tpot_ms <= closed_loop(_slower(config), workload, 1).tpot_ms * SLACK
