"""The agent's load path against the real mock model server on 127.0.0.1:0.

The mock's latencies are known, so measured TTFT/ITL are checked against them; error
kinds are provoked for real (injected 500s, a closed port, a tiny timeout); and a closed
loop with a request budget must send exactly that many requests by the server's count.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import statistics
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from agent.assignment import AssignmentRunner
from agent.sample import RequestSample
from agent.target_client import TargetClient
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from mockserver.config import MockConfig
from mockserver.server import MockServer
from mockserver.styles import IDLE_CLOSE_S
from tests.conftest import poll_until

pytestmark = pytest.mark.timeout(60)

MS = 1_000_000
TARGET_KEY = "sk-target-secret-0123456789"


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(ttft_ms=50, itl_ms=10, output_tokens=32)) as server:
        yield server


def target(base_url: str, **kwargs: object) -> run_pb2.Target:
    t = run_pb2.Target(base_url=base_url, model="mock", api_key=TARGET_KEY)
    for key, value in kwargs.items():
        if key == "timeout_s":
            t.request_timeout.FromNanoseconds(int(float(value) * 1e9))  # type: ignore[arg-type]
        elif key == "headers":
            t.headers.update(value)  # type: ignore[call-overload]
        else:
            setattr(t, key, value)
    return t


async def stats(server: MockServer) -> dict[str, int]:
    url = server.base_url.removesuffix("/v1") + "/stats"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        data: dict[str, int] = await resp.json()
        return data


async def send_one(t: run_pb2.Target, max_tokens: int = 64) -> RequestSample:
    async with TargetClient(t) as client:
        return await client.send("1 the of and to in", max_tokens)


async def emission(server: MockServer) -> dict[str, dict[str, float]]:
    """When the mock really wrote its tokens (`/stats/emission`): the reference a client's
    timing is judged against in these tests, since on a loaded machine the mock is late too."""
    url = server.base_url.removesuffix("/v1") + "/stats/emission"
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        data: dict[str, dict[str, float]] = await resp.json()
        return data


# What the client may add to the mock's own lateness, with room for a loaded machine (the
# process stalled between the mock's write and the client's read); the precision itself is
# measured by bench/agent_accuracy.py (TTFT p99 error, ITL p99 beside the mock's emission).
CLIENT_SLACK_MS = 50.0
ITL_SLACK_MS = 3.0


async def test_streaming_chat_ttft_itl_and_usage(mock: MockServer) -> None:
    sample = await send_one(target(mock.base_url))
    assert sample.status == run_pb2.REQUEST_STATUS_OK, sample.error
    emitted = await emission(mock)
    ttft_ms = (sample.first_token_ns - sample.sent_ns) / MS
    assert 50 <= ttft_ms <= 50 + emitted["ttft_late"]["max_ms"] + CLIENT_SLACK_MS, (ttft_ms, emitted)
    assert sample.usage_from_server
    assert sample.output_tokens == 32
    assert sample.prompt_tokens == 6
    assert len(sample.itl_ns) == 31
    assert abs(statistics.median(sample.itl_ns) / MS - emitted["itl"]["p50_ms"]) <= ITL_SLACK_MS, emitted
    assert sample.sent_ns < sample.first_byte_ns <= sample.first_token_ns
    assert sample.first_token_ns < sample.last_token_ns <= sample.done_ns
    assert sample.error == ""


async def test_max_tokens_limits_output(mock: MockServer) -> None:
    sample = await send_one(target(mock.base_url), max_tokens=5)
    assert sample.status == run_pb2.REQUEST_STATUS_OK
    assert sample.output_tokens == 5


async def test_completions_endpoint(mock: MockServer) -> None:
    sample = await send_one(target(mock.base_url, api_kind=run_pb2.API_KIND_COMPLETIONS))
    assert sample.status == run_pb2.REQUEST_STATUS_OK, sample.error
    assert sample.output_tokens == 32
    assert sample.usage_from_server
    late_ms = (await emission(mock))["ttft_late"]["max_ms"]
    assert 50 <= (sample.first_token_ns - sample.sent_ns) / MS <= 50 + late_ms + CLIENT_SLACK_MS
    assert (await stats(mock))["requests_ok"] == 1


async def test_non_streaming_has_no_ttft(mock: MockServer) -> None:
    sample = await send_one(target(mock.base_url, stream=False))
    assert sample.status == run_pb2.REQUEST_STATUS_OK, sample.error
    assert sample.first_token_ns == 0
    assert sample.last_token_ns == 0
    assert sample.itl_ns == []
    assert sample.output_tokens == 32
    assert sample.usage_from_server
    # 50 ms TTFT + 31 gaps of 10 ms before the answer exists.
    assert (sample.done_ns - sample.sent_ns) / MS >= 360


async def test_http_5xx_with_error_rate_one() -> None:
    async with MockServer(MockConfig(error_rate=1.0)) as server:
        sample = await send_one(target(server.base_url, headers={"X-Team": "t-secret-header"}))
    assert sample.status == run_pb2.REQUEST_STATUS_HTTP_5XX
    assert sample.error.startswith("HTTP 500")
    assert "mock injected error" in sample.error
    assert len(sample.error) <= 200
    assert TARGET_KEY not in sample.error
    assert "Bearer" not in sample.error
    assert sample.first_token_ns == 0
    assert sample.done_ns > sample.sent_ns


async def test_http_4xx_from_an_unknown_route(mock: MockServer) -> None:
    sample = await send_one(target(mock.base_url + "/nope"))
    assert sample.status == run_pb2.REQUEST_STATUS_HTTP_4XX
    assert sample.error.startswith("HTTP 404")


async def test_connection_error_against_a_closed_port() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    sample = await send_one(target(f"http://127.0.0.1:{port}/v1"))
    assert sample.status == run_pb2.REQUEST_STATUS_CONNECTION
    assert sample.error
    assert TARGET_KEY not in sample.error
    assert sample.first_byte_ns == 0


async def test_timeout_with_a_tiny_timeout(mock: MockServer) -> None:
    sample = await send_one(target(mock.base_url, timeout_s=0.02))
    assert sample.status == run_pb2.REQUEST_STATUS_TIMEOUT
    assert "timed out" in sample.error
    assert sample.first_token_ns == 0  # the first token was due at 50 ms


async def test_cancellation_records_cancelled_and_propagates(mock: MockServer) -> None:
    sample = RequestSample()
    async with TargetClient(target(mock.base_url)) as client:
        task = asyncio.create_task(client.send("1 the of", 64, sample))
        assert await poll_until(lambda: sample.first_token_ns > 0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    assert sample.status == run_pb2.REQUEST_STATUS_CANCELLED
    assert sample.first_token_ns > 0
    assert sample.output_tokens >= 1  # estimated from what arrived


def assign(
    base_url: str,
    *,
    concurrency: int,
    requests: int = 0,
    duration_s: float = 0.0,
    api_kind: run_pb2.ApiKind.ValueType = run_pb2.API_KIND_CHAT,
) -> agent_service_pb2.Assign:
    stage = run_pb2.Stage(concurrency=concurrency, requests=requests)
    if duration_s:
        stage.duration.FromNanoseconds(int(duration_s * 1e9))
    return agent_service_pb2.Assign(
        assignment_id="asg-1",
        run_id="run-1",
        target=run_pb2.Target(base_url=base_url, model="mock", api_kind=api_kind),
        workload=run_pb2.Workload(
            seed=7,
            synthetic=run_pb2.SyntheticWorkload(
                input_tokens=run_pb2.LengthDistribution(fixed=16),
                output_tokens=run_pb2.LengthDistribution(fixed=8),
            ),
        ),
        stage=stage,
    )


def split(
    messages: list[agent_service_pb2.ConnectRequest],
) -> tuple[list[agent_service_pb2.AssignmentUpdate], list[agent_service_pb2.SampleBatch]]:
    updates = [m.assignment_update for m in messages if m.HasField("assignment_update")]
    batches = [m.sample_batch for m in messages if m.HasField("sample_batch")]
    return updates, batches


async def test_closed_loop_request_budget_sends_exactly_that_many(mock: MockServer) -> None:
    messages: list[agent_service_pb2.ConnectRequest] = []
    runner = AssignmentRunner(assign(mock.base_url, concurrency=8, requests=40), messages.append)
    await asyncio.wait_for(runner.start(), 30)

    updates, batches = split(messages)
    assert [u.state for u in updates] == [
        agent_service_pb2.ASSIGNMENT_STATE_RUNNING,
        agent_service_pb2.ASSIGNMENT_STATE_COMPLETED,
    ]
    final = updates[-1]
    assert final.requests_sent == 40
    assert final.batch_count == len(batches)
    assert [b.batch_seq for b in batches] == list(range(1, len(batches) + 1))
    statuses = [s for b in batches for s in b.status]
    assert statuses == [run_pb2.REQUEST_STATUS_OK] * 40
    assert all(n == 8 for b in batches for n in b.output_tokens)
    assert all(n == 16 for b in batches for n in b.prompt_tokens)
    assert sum(b.itl_count[i] for b in batches for i in range(len(b.status))) == 40 * 7
    server = await stats(mock)
    assert server["requests_total"] == 40
    assert server["requests_ok"] == 40
    assert server["output_tokens_total"] == 40 * 8
    assert runner.in_flight == 0
    # Nothing acked yet: everything stays for replay, final update last.
    replay = runner.replay_messages()
    assert len(replay) == len(batches) + 1
    assert replay[-1].assignment_update == final
    runner.ack(final.batch_count)
    assert runner.released


async def test_closed_loop_duration_ends_the_stage() -> None:
    async with MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=8)) as server:
        messages: list[agent_service_pb2.ConnectRequest] = []
        runner = AssignmentRunner(assign(server.base_url, concurrency=4, duration_s=0.3), messages.append)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await asyncio.wait_for(runner.start(), 30)
        elapsed = loop.time() - started
        updates, batches = split(messages)
        final = updates[-1]
        assert final.state == agent_service_pb2.ASSIGNMENT_STATE_COMPLETED
        assert 0.3 <= elapsed < 5
        n = sum(len(b.status) for b in batches)
        assert n == final.requests_sent == (await stats(server))["requests_total"]
        assert n >= 8  # ~12 ms per request, 4 workers, 300 ms
        first_sent = min(s for b in batches for s in b.sent_unix_ns)
        last_sent = max(s for b in batches for s in b.sent_unix_ns)
        assert last_sent - first_sent < 0.3e9  # nothing started after the duration


async def test_cancel_turns_in_flight_requests_into_cancelled_samples() -> None:
    async with MockServer(MockConfig(ttft_ms=5000, itl_ms=10, output_tokens=8)) as server:
        messages: list[agent_service_pb2.ConnectRequest] = []
        runner = AssignmentRunner(assign(server.base_url, concurrency=3, duration_s=30), messages.append)
        task = runner.start()
        assert await poll_until(lambda: runner.in_flight == 3)
        runner.cancel("user cancelled the run")
        await asyncio.wait_for(task, 10)
    updates, batches = split(messages)
    final = updates[-1]
    assert final.state == agent_service_pb2.ASSIGNMENT_STATE_CANCELLED
    assert final.message == "user cancelled the run"
    assert final.requests_sent == 3
    assert final.batch_count == len(batches) >= 1
    assert [s for b in batches for s in b.status] == [run_pb2.REQUEST_STATUS_CANCELLED] * 3
    assert runner.in_flight == 0


async def test_invalid_target_fails_the_assignment() -> None:
    messages: list[agent_service_pb2.ConnectRequest] = []
    runner = AssignmentRunner(assign("ftp://example/v1", concurrency=1, requests=1), messages.append)
    await asyncio.wait_for(runner.start(), 10)
    updates, batches = split(messages)
    assert updates[-1].state == agent_service_pb2.ASSIGNMENT_STATE_FAILED
    assert "http" in updates[-1].message
    assert batches == []


# --- misbehaving servers (a scripted aiohttp server, not the mock) ----------------------

CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"x"},"finish_reason":null}]}\n\n'


@contextlib.asynccontextmanager
async def scripted_server(behaviour: str) -> AsyncIterator[str]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(CHUNK)
        if behaviour == "open_after_done":
            await response.write(b"data: [DONE]\n\n")
            await asyncio.sleep(30)  # never ends the body
        elif behaviour == "error_event":
            await response.write(b'data: {"error": {"message": "engine died"}}\n\n')
            await response.write_eof()
        elif behaviour == "no_done":
            await response.write(CHUNK)
            await response.write_eof()
        elif behaviour == "cut":
            assert request.transport is not None
            request.transport.close()  # no chunked terminator: the body is incomplete
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        await runner.cleanup()


async def test_server_keeping_the_body_open_after_done_does_not_hold_the_worker() -> None:
    async with scripted_server("open_after_done") as base_url:
        loop = asyncio.get_running_loop()
        started = loop.time()
        sample = await send_one(target(base_url, timeout_s=20))
        assert loop.time() - started < 5
    assert sample.status == run_pb2.REQUEST_STATUS_OK, sample.error
    assert sample.output_tokens == 1
    assert not sample.usage_from_server


@pytest.mark.parametrize(
    ("behaviour", "status", "text"),
    [
        ("error_event", run_pb2.REQUEST_STATUS_PROTOCOL, "engine died"),
        ("no_done", run_pb2.REQUEST_STATUS_PROTOCOL, "without [DONE]"),
        ("cut", run_pb2.REQUEST_STATUS_CONNECTION, ""),
    ],
)
async def test_broken_streams(behaviour: str, status: int, text: str) -> None:
    async with scripted_server(behaviour) as base_url:
        sample = await send_one(target(base_url, timeout_s=20))
    assert sample.status == status, sample.error
    assert text in sample.error
    assert sample.first_token_ns > 0
    assert sample.done_ns >= sample.first_token_ns


# --- request bodies --------------------------------------------------------------------


async def test_request_body_merges_extra_body_under_the_protected_fields() -> None:
    t = target("http://127.0.0.1:1/v1")
    t.extra_body.update(
        {
            "top_k": 1,
            "temperature": 0.7,
            "nested": {"n": 2.0, "items": [1.0, 1.5]},
            "max_completion_tokens": 5,  # would override max_tokens on OpenAI-style servers
            "ignore_eos": False,  # the workload's flag wins
        }
    )
    async with TargetClient(t, ignore_eos=True, pin_min_tokens=True) as client:
        body = json.loads(client.encode_body("a b c", 40))
        chat = json.loads(client.encode_body("a b c", 40, [{"role": "system", "content": "s"}]))
    assert body == {
        "model": "mock",
        "max_tokens": 40,
        "messages": [{"role": "user", "content": "a b c"}],
        "stream": True,
        "stream_options": {"include_usage": True},
        "top_k": 1,
        "temperature": 0.7,
        "nested": {"n": 2, "items": [1, 1.5]},
        "ignore_eos": True,
        "min_tokens": 40,
    }
    assert isinstance(body["top_k"], int)
    assert chat["messages"] == [{"role": "system", "content": "s"}]


async def test_request_body_completions_non_streaming_without_extras() -> None:
    t = target("http://127.0.0.1:1/v1", api_kind=run_pb2.API_KIND_COMPLETIONS, stream=False)
    async with TargetClient(t) as client:
        body = json.loads(client.encode_body("a b c", 8, [{"role": "user", "content": "ignored"}]))
    assert body == {"model": "mock", "max_tokens": 8, "prompt": "a b c", "stream": False}


async def test_preconnect_opens_pooled_connections(mock: MockServer) -> None:
    async with TargetClient(target(mock.base_url)) as client:
        assert await client.preconnect(4) == 4
        sample = await client.send("1 the of", 4)
    assert sample.status == run_pb2.REQUEST_STATUS_OK
    assert (await stats(mock))["requests_total"] == 1  # /models is not a completion


async def test_preconnect_ignores_a_dead_target() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with TargetClient(target(f"http://127.0.0.1:{port}/v1")) as client:
        assert await client.preconnect(3, timeout_s=5) == 0


# --- connection reuse against servers that close kept-alive connections --------------------


@pytest.mark.parametrize("connections", ["close_after_response", "close_idle"])
async def test_a_closed_pooled_connection_is_retried_once_on_a_fresh_one(connections: str) -> None:
    """A request that meets a pooled connection the server had closed (nothing of the answer
    arrived) goes again on a fresh connection: no failure, the model sees it once, flagged."""
    config = MockConfig(ttft_ms=2, itl_ms=1, output_tokens=4, connections=connections)  # type: ignore[arg-type]
    async with MockServer(config) as server, TargetClient(target(server.base_url)) as client:
        samples = []
        for _ in range(12):
            samples.append(await client.send("hello there", 4))
            if connections == "close_idle":
                await asyncio.sleep(IDLE_CLOSE_S * 1.5)  # what the style is about: an idle connection
        counted = await stats(server)
    assert [s.error for s in samples if s.status != run_pb2.REQUEST_STATUS_OK] == []
    retried = [s for s in samples if s.retried]
    assert len(retried) >= 3, "the style must have closed pooled connections under some requests"
    assert counted["requests_total"] == 12  # a dropped attempt never reached the model
    for s in retried:
        assert s.scheduled_ns <= s.sent_ns < s.first_byte_ns <= s.done_ns  # timed from the second send


async def test_requests_on_connections_that_are_not_pooled_are_not_retried() -> None:
    """A refused fresh connection is not retried (it is `connect_failed`); neither is a request
    whose connection broke after bytes of its answer arrived."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with TargetClient(target(f"http://127.0.0.1:{port}/v1")) as client:
        refused = await client.send("hi", 4)
    assert refused.status == run_pb2.REQUEST_STATUS_CONNECTION
    assert refused.connect_failed and not refused.retried

    requests = 0

    async def half_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal requests
        await reader.readuntil(b"\r\n\r\n")
        requests += 1
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b'10\r\ndata: {"choices\r\n')  # part of one event, then the server dies
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(half_answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with TargetClient(target(f"http://127.0.0.1:{port}/v1")) as client:
            cut = await client.send("hi", 4)
    finally:
        server.close()
        await server.wait_closed()
    assert cut.status == run_pb2.REQUEST_STATUS_CONNECTION, cut.error
    assert not cut.retried and cut.first_byte_ns
    assert requests == 1  # nothing sent twice
