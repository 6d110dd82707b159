"""Streamed response bodies parsed where they arrive: in the connection's `data_received`.

A plain aiohttp client reads a streamed body with `async for chunk in resp.content`: every
network read sets a future, the event loop schedules the reading task, and the task resumes
through the stream's async iterator before the bytes reach the parser. At hundreds of
streams with a token every few milliseconds that wake-up is most of a load generator's CPU,
and the time stamp is taken when the task runs, not when the bytes arrived.

Here the connection protocol does the work instead. `StreamingConnector` is aiohttp's
`TCPConnector` whose connections use `TimedResponseHandler`, aiohttp's own protocol plus two
things: every read is stamped with `perf_counter_ns()` before aiohttp parses it (`read_ns`),
and a `BodySink` attached to the connection is pumped right after aiohttp has fed the read's
body bytes into the response's `StreamReader`. The sink takes those bytes out at once
(`read_nowait`) and hands them, with the read's time stamp, to the `StreamParser`, all inside
`data_received`. The request task sleeps on one future, woken only when the response is
over: the end of the body, `[DONE]` or a protocol error, or a failure.

Connection reuse: `StreamingConnector` also tells a request whether it went out on a pooled
connection. The request's body is a `TrackedBody`; when aiohttp hands the request a
connection, the connector notes on that body the connection and whether it had served a
request before (`reused`). With the connection's `read_ns`, the client can then tell a pooled
connection that the server had already closed (nothing of the response arrived after the
send) from one that failed while the server was answering (see `TargetClient.send`).

Everything else is aiohttp's: connection pooling and keep-alive (the body is read to its
end, so aiohttp releases the connection as usual), chunked and content-length framing,
decompression, and its error reporting (`ClientPayloadError` for a cut body, the parser's
errors for a malformed response). The sink only watches the `StreamReader` through its
public methods; if a connection is not a `TimedResponseHandler`, `TargetClient` falls back
to reading the body in the task.
"""

from __future__ import annotations

import asyncio
import functools
import time
from typing import Any, cast

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.payload import BytesPayload

from agent.sse import StreamParser


class BodySink:
    """Feeds one response body to its `StreamParser` from the connection's data path.

    Attached to a `TimedResponseHandler`, the sink receives every body chunk aiohttp parses
    out of a read, stamped with that read's arrival, and wakes the waiting task (`woken`)
    once there is nothing more to wait for: the body ended (`eof`), the parser closed
    (`[DONE]` or a protocol error), or the stream failed (the exception is set on `woken`).
    """

    __slots__ = ("content", "eof", "parser", "protocol", "woken")

    def __init__(self, content: aiohttp.StreamReader, parser: StreamParser, loop: asyncio.AbstractEventLoop) -> None:
        self.content = content
        self.parser = parser
        self.woken: asyncio.Future[None] = loop.create_future()
        self.eof = False
        self.protocol: TimedResponseHandler | None = None

    def start(self, now_ns: int) -> None:
        """Parse what arrived before the sink existed (stamped `now_ns`) and settle."""
        content = self.content
        try:
            data = content.read_nowait()
        except Exception as exc:  # the stream already failed
            self.fail(exc)
            return
        if data:
            self.parser.feed(data, now_ns)
        self.settle()

    def rearm(self, loop: asyncio.AbstractEventLoop) -> None:
        """A new `woken` future: wait for the end of the body after `[DONE]`."""
        self.woken = loop.create_future()
        if self.eof:
            self.woken.set_result(None)

    def settle(self) -> None:
        """Wake the task if the body ended, failed or needs no more parsing."""
        content = self.content
        if content.is_eof():
            self.eof = True
            self.detach()
            self._wake()
            return
        exc = content.exception()
        if exc is not None:
            self.fail(exc)
        elif self.parser.closed:
            self._wake()

    def fail(self, exc: BaseException) -> None:
        """The body cannot be read any further."""
        self.detach()
        if not self.woken.done():
            self.woken.set_exception(exc)

    def detach(self) -> None:
        """Stop receiving body bytes (idempotent); aiohttp buffers any that still come."""
        protocol = self.protocol
        if protocol is not None:
            if protocol.sink is self:
                protocol.sink = None
            self.protocol = None

    def _wake(self) -> None:
        if not self.woken.done():
            self.woken.set_result(None)


class _SinkStreamReader(aiohttp.StreamReader):
    """A response's `StreamReader` handing body chunks to the connection's sink.

    aiohttp's HTTP parser calls `feed_data` for every body chunk of a read; instead of
    buffering the chunk and waking a reader, this parses it on the spot. The class of a
    live reader is switched to this one (no new slots, so the layout is the same) when a
    sink attaches; without a sink for this reader it behaves as a plain `StreamReader`.
    """

    __slots__ = ()

    def feed_data(self, data: bytes, size: int = 0) -> bool:
        protocol = self._protocol
        if isinstance(protocol, TimedResponseHandler):
            sink = protocol.sink
            if sink is not None and sink.content is self:
                parser = sink.parser
                parser.feed(data, protocol.read_ns)
                if parser.closed:
                    sink.settle()
                return False
        return bool(super().feed_data(data, size))

    # Chunk boundaries only matter to `readchunk()`, which nobody calls on a sink's body.
    def begin_http_chunk_receiving(self) -> None:
        pass

    def end_http_chunk_receiving(self) -> None:
        pass

    def feed_eof(self) -> None:
        super().feed_eof()  # marks EOF; its callbacks let aiohttp pool the connection
        sink = self._sink()
        if sink is not None:
            sink.settle()

    def set_exception(self, exc: BaseException, *args: Any, **kwargs: Any) -> None:
        super().set_exception(exc, *args, **kwargs)
        sink = self._sink()
        if sink is not None:
            sink.fail(exc)

    def _sink(self) -> BodySink | None:
        protocol = self._protocol
        sink = protocol.sink if isinstance(protocol, TimedResponseHandler) else None
        return sink if sink is not None and sink.content is self else None


class TimedResponseHandler(ResponseHandler):
    """aiohttp's client protocol, stamping each read and feeding an attached `BodySink`.

    `uses` counts the requests the connection was handed out for (see `StreamingConnector`).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.read_ns = 0
        self.uses = 0
        self.sink: BodySink | None = None

    def attach(self, sink: BodySink) -> None:
        """Hand the body chunks of `sink.content` to `sink` until it detaches."""
        content = sink.content
        if type(content) is aiohttp.StreamReader:
            content.__class__ = _SinkStreamReader
        sink.protocol = self
        self.sink = sink

    def data_received(self, data: bytes) -> None:
        """Stamp the read, then let aiohttp parse it (body chunks go to the sink)."""
        if data:  # b"" is aiohttp resuming its own parser, not a read from the socket
            self.read_ns = time.perf_counter_ns()
        super().data_received(data)

    def connection_lost(self, exc: BaseException | None) -> None:
        """Let aiohttp settle the response, then make sure the sink's task learns of it."""
        super().connection_lost(exc)
        sink = self.sink
        if sink is not None:
            sink.settle()
            if self.sink is sink:  # the body neither ended nor failed: it was cut off
                sink.fail(self.exception() or aiohttp.ServerDisconnectedError())


class TrackedBody(BytesPayload):
    """A request body that learns which connection its request went out on.

    `connection` is the `TimedResponseHandler` aiohttp handed the request; `reused` is True
    when that connection had carried a request before (it came from the pool).
    """

    def __init__(self, value: bytes) -> None:
        super().__init__(value, content_type="application/json")
        self.connection: TimedResponseHandler | None = None
        self.reused = False


class StreamingConnector(aiohttp.TCPConnector):
    """A `TCPConnector` whose connections are `TimedResponseHandler`s."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # aiohttp builds every connection's protocol from this factory (plain and TLS).
        factory = functools.partial(TimedResponseHandler, loop=self._loop)
        self._factory = cast("functools.partial[ResponseHandler]", factory)

    async def connect(self, req: ClientRequest, traces: list[Any], timeout: aiohttp.ClientTimeout) -> Any:
        """aiohttp's `connect`, noting on a `TrackedBody` the connection it got."""
        conn = await super().connect(req, traces, timeout)
        protocol = conn.protocol
        if isinstance(protocol, TimedResponseHandler):
            body = req.body
            if isinstance(body, TrackedBody):
                body.connection = protocol
                body.reused = protocol.uses > 0
            protocol.uses += 1
        return conn
