"""SSE bodies parsed in the connection's data path (`agent.stream`), against raw HTTP servers.

A scripted asyncio server writes exact bytes, so each framing aiohttp supports (chunked,
content-length, read-until-close, gzip) and each way a body can break is provoked for real;
the measured tokens and outcome must be what the bytes say, and a complete body must leave
its connection in the pool for the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from agent.sample import RequestSample
from agent.stream import StreamingConnector, TimedResponseHandler
from agent.target_client import TargetClient
from common.proto.loadtest.v1 import run_pb2
from tests.conftest import poll_until

pytestmark = pytest.mark.timeout(60)

OK = run_pb2.REQUEST_STATUS_OK


def event(content: str, finish: str | None = None) -> bytes:
    chunk = {"choices": [{"index": 0, "delta": {"content": content}, "finish_reason": finish}]}
    return b"data: " + json.dumps(chunk, separators=(",", ":")).encode() + b"\n\n"


USAGE = b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":4,"total_tokens":7}}\n\n'
BODY = event("a") + event("b") + event("c") + event("d", "length") + USAGE + b"data: [DONE]\n\n"
HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"


def chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


Script = Callable[[asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(script: Script) -> AsyncIterator[tuple[str, list[int]]]:
    """A server answering every request on a connection with `script`; yields (base URL,
    the number of requests served on each connection so far)."""
    per_connection: list[int] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = len(per_connection)
        per_connection.append(0)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                per_connection[index] += 1
                await script(writer)
                if writer.is_closing():
                    return
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}/v1", per_connection
    finally:
        server.close()
        await server.wait_closed()


def target(base_url: str, timeout_s: float = 20) -> run_pb2.Target:
    t = run_pb2.Target(base_url=base_url, model="m")
    t.request_timeout.FromNanoseconds(int(timeout_s * 1e9))
    return t


async def chunked_in_reads(writer: asyncio.StreamWriter) -> None:
    writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n")
    for line in BODY.split(b"\n\n")[:-1]:
        writer.write(chunk(line + b"\n\n"))
        await writer.drain()
        await asyncio.sleep(0.01)  # the server's pacing, so each event is its own read
    writer.write(b"0\r\n\r\n")
    await writer.drain()


async def test_chunked_stream_is_parsed_and_the_connection_reused() -> None:
    async with raw_server(chunked_in_reads) as (base_url, per_connection), TargetClient(target(base_url)) as client:
        samples = [await client.send("x", 4) for _ in range(3)]
    for sample in samples:
        assert sample.status == OK, sample.error
        assert sample.output_tokens == 4 and sample.usage_from_server
        assert len(sample.itl_ns) == 3
        # Each token came in its own read, ~10 ms apart: stamped per read, not per body.
        assert all(gap >= 5_000_000 for gap in sample.itl_ns)
        assert sample.sent_ns < sample.first_byte_ns <= sample.first_token_ns < sample.last_token_ns
        assert sample.last_token_ns <= sample.done_ns
    assert per_connection == [3]


@pytest.mark.parametrize("framing", ["content-length", "until-close", "gzip"])
async def test_other_framings(framing: str) -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        if framing == "content-length":
            writer.write(HEAD + b"Content-Length: %d\r\n\r\n" % len(BODY))
            writer.write(BODY[:40])
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(BODY[40:])
        elif framing == "until-close":
            writer.write(HEAD + b"Connection: close\r\n\r\n" + BODY[:40])
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(BODY[40:])
            await writer.drain()
            writer.close()
        else:
            packed = gzip.compress(BODY)
            writer.write(HEAD + b"Content-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n")
            writer.write(chunk(packed[:20]))
            await writer.drain()
            await asyncio.sleep(0.02)
            writer.write(chunk(packed[20:]) + b"0\r\n\r\n")
        await writer.drain()

    async with raw_server(script) as (base_url, per_connection), TargetClient(target(base_url)) as client:
        first = await client.send("x", 4)
        second = await client.send("x", 4)
    for sample in (first, second):
        assert sample.status == OK, sample.error
        assert sample.output_tokens == 4
        assert len(sample.itl_ns) == 3
    assert per_connection == ([1, 1] if framing == "until-close" else [2])


@pytest.mark.parametrize(
    ("behaviour", "status", "text"),
    [
        ("bad_chunk_size", run_pb2.REQUEST_STATUS_CONNECTION, ""),
        ("reset_mid_body", run_pb2.REQUEST_STATUS_CONNECTION, ""),
        ("short_content_length", run_pb2.REQUEST_STATUS_CONNECTION, ""),
        ("stall", run_pb2.REQUEST_STATUS_TIMEOUT, "timed out"),
    ],
)
async def test_broken_bodies(behaviour: str, status: int, text: str) -> None:
    async def script(writer: asyncio.StreamWriter) -> None:
        if behaviour == "short_content_length":
            writer.write(HEAD + b"Content-Length: %d\r\n\r\n" % (len(BODY) + 100) + BODY[: len(event("a")) + 10])
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
            return
        writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(event("a")))
        await writer.drain()
        await asyncio.sleep(0.05)
        if behaviour == "bad_chunk_size":
            writer.write(b"zz\r\nnot a chunk\r\n")
        elif behaviour == "reset_mid_body":
            writer.transport.abort()
            return
        else:
            await asyncio.sleep(30)
        await writer.drain()

    async with raw_server(script) as (base_url, _), TargetClient(target(base_url, timeout_s=1)) as client:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sample = await client.send("x", 4)
        assert loop.time() - started < 10
    assert sample.status == status, sample.error
    assert text in sample.error
    assert sample.first_token_ns > 0
    assert sample.done_ns >= sample.first_token_ns


async def test_cancelled_mid_stream_closes_the_connection_and_the_client_still_works() -> None:
    stalled = [False]

    async def script(writer: asyncio.StreamWriter) -> None:
        if not stalled[0]:
            stalled[0] = True
            writer.write(HEAD + b"Transfer-Encoding: chunked\r\n\r\n" + chunk(event("a")))
            await writer.drain()
            await asyncio.sleep(30)
        await chunked_in_reads(writer)

    async with raw_server(script) as (base_url, per_connection), TargetClient(target(base_url)) as client:
        cancelled = RequestSample()
        task = asyncio.create_task(client.send("x", 4, cancelled))
        assert await poll_until(lambda: cancelled.first_token_ns > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        after = await client.send("x", 4)
    assert cancelled.status == run_pb2.REQUEST_STATUS_CANCELLED
    assert after.status == OK, after.error
    assert len(per_connection) == 2  # the cancelled body's connection was not reused


async def test_connector_builds_timed_connections() -> None:
    async with raw_server(chunked_in_reads) as (base_url, _), TargetClient(target(base_url)) as client:
        await client.send("x", 4)
        connector = client._session.connector
        assert isinstance(connector, StreamingConnector)
        protocols = [proto for conns in connector._conns.values() for proto, _ in conns]
        assert len(protocols) == 1
        for protocol in protocols:
            assert isinstance(protocol, TimedResponseHandler)
            assert protocol.sink is None  # nothing stays attached to a pooled connection
