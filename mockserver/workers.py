"""`llm-loadtest mock-server --workers N`: N mock processes sharing one port.

One mock process paces a limited number of streams on one core (BENCHMARKS.md, "Mock
capacity"); benchmarks of clients that go further must not measure the mock instead. With
`--workers N` the command starts N worker processes, each a complete `MockServer` bound to
the same address with SO_REUSEPORT, so the kernel spreads new connections over them (a
keep-alive connection stays with the worker that accepted it). The parent process only
starts, watches and stops the workers; signals (SIGINT, SIGTERM) stop them all, and if one
worker dies the others are stopped too.

`/stats`, `/stats/reset` and `/stats/emission` are **aggregated over all workers**,
whichever worker answers: each worker publishes its counters and emission histograms into
a table in shared memory every `PUBLISH_INTERVAL_S` (and right before answering a stats
request), and the answer sums the rows. So another worker's figures can be up to
`PUBLISH_INTERVAL_S` old: poll until the counts settle, as after any load. `/stats` adds
`"workers": N` and `"per_worker"`, each worker's own counters (without `by_endpoint`).
A reset bumps a generation number in the table and zeroes every row; each worker zeroes
its own counters when it next sees the new generation, at the latest before it serves its next
request (so a request served after a reset is always counted). Each worker's `/health`,
`/v1/models` and completions behave exactly as a single server's — with its own
`max_running` slots, queue and count of requests generating (the R of `itl_per_running_ms`),
so N workers are N independent servers of the model; the `MockServer.stats` of a worker
object stays that worker's own.

Port 0 picks a free port: the parent first binds (without listening) a SO_REUSEPORT socket
to learn the port and holds it until every worker listens, so no other program can take it
in between; a socket that does not listen is never handed connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import multiprocessing.connection
import queue
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from multiprocessing.context import SpawnContext, SpawnProcess
from multiprocessing.sharedctypes import Synchronized
from typing import Any

import numpy as np
from aiohttp import web
from aiohttp.typedefs import Middleware

from mockserver.app import MockStats
from mockserver.config import MockConfig
from mockserver.emission import BIN_S, BINS, summarize
from mockserver.generation import Endpoint
from mockserver.server import MockServer

PUBLISH_INTERVAL_S = 0.1
STARTUP_TIMEOUT_S = 60.0

# Counters of `MockStats.as_dict()` summed across workers, in row order.
COUNTERS = (
    "requests_total",
    "requests_ok",
    "requests_failed",
    "requests_cancelled",
    "output_tokens_total",
    "prompt_tokens_total",
    "cached_tokens_total",
    "running",
)
ENDPOINTS: tuple[Endpoint, ...] = ("chat", "completions")
_HEAD = len(COUNTERS) + len(ENDPOINTS)
_ROW = _HEAD + 2 * BINS  # counters, then the ITL histogram, then the TTFT-lateness histogram


class SharedStatsTable:
    """One row of counters and histograms per worker, in shared memory, plus a reset generation.

    Created by the parent and handed to every worker process at start.
    """

    def __init__(self, workers: int, ctx: SpawnContext) -> None:
        self.workers = workers
        self._cells: Any = ctx.RawArray("q", workers * _ROW)
        self._generation: Synchronized[int] = ctx.Value("q", 0)

    def _view(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        return np.frombuffer(self._cells, dtype=np.int64).reshape(self.workers, _ROW)

    @property
    def generation(self) -> int:
        """The number of resets so far."""
        return int(self._generation.value)

    def publish(self, index: int, stats: MockStats, seen_generation: int) -> int:
        """Write `stats` into row `index`; returns the generation the row now belongs to.

        If a reset happened since `seen_generation`, `stats` is zeroed first, so counts from
        before the reset never reappear.
        """
        with self._generation.get_lock():
            generation = int(self._generation.value)
            if generation != seen_generation:
                stats.reset()
            row = self._view()[index]
            row[: len(COUNTERS)] = [getattr(stats, name) for name in COUNTERS]
            row[len(COUNTERS) : _HEAD] = [stats.by_endpoint[e] for e in ENDPOINTS]
            row[_HEAD : _HEAD + BINS] = stats.emission.itl
            row[_HEAD + BINS :] = stats.emission.ttft_late
            return generation

    def reset(self) -> int:
        """Zero every row and start a new generation; returns it."""
        with self._generation.get_lock():
            self._generation.value += 1
            self._view()[:] = 0
            return int(self._generation.value)

    def rows(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """A copy of the table, one row per worker."""
        with self._generation.get_lock():
            return self._view().copy()

    def totals(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """The rows summed."""
        totals: np.ndarray[Any, np.dtype[np.int64]] = self.rows().sum(axis=0)
        return totals


def aggregated_stats(rows: np.ndarray[Any, np.dtype[np.int64]]) -> dict[str, Any]:
    """The `/stats` object from the table: sums, the worker count and each worker's counters."""
    totals = rows.sum(axis=0)
    out: dict[str, Any] = {name: int(totals[i]) for i, name in enumerate(COUNTERS)}
    out["by_endpoint"] = {e: int(totals[len(COUNTERS) + i]) for i, e in enumerate(ENDPOINTS)}
    out["workers"] = len(rows)
    out["per_worker"] = [{name: int(row[i]) for i, name in enumerate(COUNTERS)} for row in rows]
    return out


def aggregated_emission(totals: np.ndarray[Any, np.dtype[np.int64]], workers: int) -> dict[str, Any]:
    """The `/stats/emission` object from summed rows."""
    return {
        "bin_ms": BIN_S * 1000.0,
        "itl": summarize(totals[_HEAD : _HEAD + BINS].tolist()),
        "ttft_late": summarize(totals[_HEAD + BINS :].tolist()),
        "workers": workers,
    }


class WorkerStats:
    """One worker's side of the table: publishes its stats and answers the stats routes."""

    def __init__(self, table: SharedStatsTable, index: int, stats: MockStats) -> None:
        self._table = table
        self._index = index
        self._stats = stats
        self._generation = table.generation

    def publish(self) -> None:
        """Copy this worker's current figures into its row."""
        self._generation = self._table.publish(self._index, self._stats, self._generation)

    def reset(self) -> None:
        """Reset every worker's figures."""
        self._generation = self._table.reset()
        self._stats.reset()
        self.publish()

    async def run(self) -> None:
        """Publish every `PUBLISH_INTERVAL_S` until cancelled."""
        while True:
            self.publish()
            await asyncio.sleep(PUBLISH_INTERVAL_S)

    def middleware(self) -> Middleware:
        """An aiohttp middleware answering the stats routes from the whole table."""
        table = self._table

        @web.middleware
        async def shared_stats(
            request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
        ) -> web.StreamResponse:
            path, method = request.path, request.method
            if path == "/stats" and method == "GET":
                self.publish()
                return web.json_response(aggregated_stats(table.rows()))
            if path == "/stats/reset" and method == "POST":
                self.reset()
                return web.json_response(aggregated_stats(table.rows()))
            if path == "/stats/emission" and method == "GET":
                self.publish()
                return web.json_response(aggregated_emission(table.totals(), table.workers))
            if table.generation != self._generation:
                # Another worker answered a reset since this one last published: adopt it now,
                # or the next publish would zero this request's counts along with the old ones.
                self.publish()
            return await handler(request)

        return shared_stats


def _worker_main(
    config: MockConfig,
    host: str,
    port: int,
    index: int,
    table: SharedStatsTable,
    ready: multiprocessing.Queue[tuple[int, str]],
) -> None:
    loop_factory: Callable[[], asyncio.AbstractEventLoop] | None = None
    with contextlib.suppress(ImportError):
        import uvloop

        loop_factory = uvloop.new_event_loop
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(_serve_worker(config, host, port, index, table, ready))


async def _serve_worker(
    config: MockConfig,
    host: str,
    port: int,
    index: int,
    table: SharedStatsTable,
    ready: multiprocessing.Queue[tuple[int, str]],
) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server = MockServer(config)
    shared = WorkerStats(table, index, server.stats)
    server.app.middlewares.append(shared.middleware())
    try:
        await server.start(host, port, reuse_port=True)
    except OSError as exc:
        ready.put((index, f"cannot listen on {host}:{port}: {exc}"))
        return
    publisher = asyncio.create_task(shared.run())
    ready.put((index, ""))
    try:
        await stop.wait()
    finally:
        publisher.cancel()
        await server.close()


def _reserve_port(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def serve_workers(config: MockConfig, host: str, port: int, workers: int) -> int:
    """Run `workers` mock processes on one port until SIGINT/SIGTERM; the process exit code.

    Prints `mock server (N workers) listening on URL` once every worker listens.
    """
    try:
        reservation = _reserve_port(host, port)
    except OSError as exc:
        print(f"mock-server: error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
        return 1
    ctx = multiprocessing.get_context("spawn")
    table = SharedStatsTable(workers, ctx)
    ready: multiprocessing.Queue[tuple[int, str]] = ctx.Queue()
    port = reservation.getsockname()[1]
    stopping = False

    def stop(_signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    procs: list[SpawnProcess] = []
    try:
        for index in range(workers):
            proc = ctx.Process(
                target=_worker_main,
                args=(config, host, port, index, table, ready),
                name=f"mock-server-worker-{index}",
                daemon=True,
            )
            proc.start()
            procs.append(proc)
        error = _await_ready(ready, workers, procs)
        reservation.close()
        if error:
            print(f"mock-server: error: {error}", file=sys.stderr)
            return 1
        url_host = f"[{host}]" if ":" in host else host
        print(f"mock server ({workers} workers) listening on http://{url_host}:{port}/v1", flush=True)
        while not stopping:
            if multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.2):
                dead = [p for p in procs if p.exitcode is not None]
                if dead and not stopping:
                    print(f"mock-server: error: worker {dead[0].name} exited ({dead[0].exitcode})", file=sys.stderr)
                    return 1
        return 0
    finally:
        reservation.close()
        _stop_all(procs)
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _await_ready(ready: multiprocessing.Queue[tuple[int, str]], workers: int, procs: list[SpawnProcess]) -> str:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    started = 0
    while started < workers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return f"workers did not start within {STARTUP_TIMEOUT_S:g} s"
        try:
            _, error = ready.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            dead = [p for p in procs if p.exitcode is not None]
            if dead:
                return f"worker {dead[0].name} exited ({dead[0].exitcode}) while starting"
            continue
        if error:
            return error
        started += 1
    return ""


def _stop_all(procs: list[SpawnProcess]) -> None:
    for proc in procs:
        if proc.is_alive():
            proc.terminate()
    deadline = time.monotonic() + 5.0
    for proc in procs:
        proc.join(max(deadline - time.monotonic(), 0.0))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
