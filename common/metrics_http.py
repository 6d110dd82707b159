"""Serve one Prometheus registry at `/metrics` from the running event loop (aiohttp).

Controller and agent each own a `CollectorRegistry` (never the process-global default, so
several controllers or agents in one process, as in tests, keep their numbers apart). The
scrape runs on the event loop, so collectors read in-memory state without locks; an
optional `before_scrape` coroutine refreshes figures that need awaiting (a database count).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest


def split_listen(listen: str) -> tuple[str, int]:
    """`HOST:PORT` (or `[v6]:PORT`, or `:PORT` for every interface) -> (host, port)."""
    host, sep, port = listen.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


class MetricsServer:
    """An HTTP endpoint with the text exposition of one registry."""

    def __init__(
        self,
        registry: CollectorRegistry,
        before_scrape: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._registry = registry
        self._before_scrape = before_scrape
        self._runner: web.AppRunner | None = None
        self.port = 0

    async def start(self, listen: str) -> int:
        """Listen on `listen` (HOST:PORT; port 0 picks one); returns the port."""
        host, port = split_listen(listen)
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _metrics(self, _: web.Request) -> web.Response:
        if self._before_scrape is not None:
            try:
                async with asyncio.timeout(5.0):
                    await self._before_scrape()
            except TimeoutError:
                pass  # serve what we have: a scrape must not hang on a busy database
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})
