"""`MockServer`: the mock model served over TCP, for the CLI and for tests.

Typical use: `async with MockServer(MockConfig(ttft_ms=20)) as server:`, then point an
OpenAI client at `server.base_url`; `server.stats` holds what the server saw.
"""

from __future__ import annotations

from types import TracebackType

from aiohttp import web

from mockserver.app import STATS_KEY, MockStats, create_app
from mockserver.config import MockConfig

# Many load generators open all their connections at once; the kernel default (128) would
# drop SYNs and add a retransmit second to some first requests.
_BACKLOG = 4096
_WILDCARD_HOSTS = frozenset({"", "0.0.0.0", "::"})


class MockServer:
    """Serves `create_app(config)` on a TCP port until closed.

    A client that disconnects has its handler cancelled at once (and counted as cancelled),
    rather than when the next token fails to write. `close()` lets in-flight responses run
    for up to `shutdown_timeout` seconds before cancelling them.
    """

    def __init__(self, config: MockConfig | None = None, *, shutdown_timeout: float = 2.0):
        self.config = config if config is not None else MockConfig()
        self._app = create_app(self.config)
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self._started = False
        self._host = ""
        self._port: int | None = None

    @property
    def stats(self) -> MockStats:
        """The live counters also served at `/stats`."""
        return self._app[STATS_KEY]

    @property
    def app(self) -> web.Application:
        """The aiohttp application (middlewares may be added before `start()`)."""
        return self._app

    @property
    def port(self) -> int:
        """The bound TCP port (the one picked when started with port 0)."""
        if self._port is None:
            raise RuntimeError("MockServer is not started")
        return self._port

    @property
    def base_url(self) -> str:
        """The OpenAI base URL, e.g. `http://127.0.0.1:8000/v1`."""
        host = "127.0.0.1" if self._host in _WILDCARD_HOSTS else self._host
        if ":" in host:
            host = f"[{host}]"
        return f"http://{host}:{self.port}/v1"

    async def start(self, host: str = "127.0.0.1", port: int = 0, *, reuse_port: bool = False) -> None:
        """Bind and start serving; port 0 picks a free port. A server starts only once.

        With `reuse_port`, the socket is bound with SO_REUSEPORT, so that several processes
        can listen on the same port and the kernel spreads new connections over them.
        """
        if self._started:
            raise RuntimeError("MockServer can only be started once")
        self._started = True
        runner = web.AppRunner(
            self._app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            site = web.TCPSite(runner, host, port, backlog=_BACKLOG, reuse_address=True, reuse_port=reuse_port or None)
            await site.start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self._host = host
        self._port = int(runner.addresses[0][1])

    async def close(self) -> None:
        """Stop serving. Safe to call more than once."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MockServer:
        if not self._started:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
