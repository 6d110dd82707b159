"""The mock model server over real HTTP: wire format, token semantics, timing, errors, stats.

Every test starts its own `MockServer` on 127.0.0.1:0 and talks to it with a plain aiohttp
client, the way a load generator would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import signal
import statistics
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from mockserver import MockConfig, MockServer, create_app
from mockserver.generation import output_text

pytestmark = pytest.mark.timeout(60)

REPO_ROOT = Path(__file__).resolve().parents[2]
# Semantics tests need no latency; timing tests set their own.
INSTANT = {"ttft_ms": 0.0, "itl_ms": 0.0}
CHAT_MESSAGES = [{"role": "user", "content": "say something"}]

StartServer = Callable[..., Awaitable[MockServer]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    async with contextlib.AsyncExitStack() as stack:

        async def start(**config: Any) -> MockServer:
            return await stack.enter_async_context(MockServer(MockConfig(**config)))

        yield start


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as client:
        yield client


@dataclass
class Stream:
    """A streamed response: when the request was sent and each event with its arrival time."""

    status: int
    headers: dict[str, str]
    sent_at: float
    events: list[tuple[float, Any]]  # parsed JSON, or the string "[DONE]"

    @property
    def payloads(self) -> list[Any]:
        return [payload for _, payload in self.events]

    def token_events(self) -> list[tuple[float, dict[str, Any]]]:
        """Events that carry text: what a client must count as tokens."""
        return [(t, p) for t, p in self.events if p != "[DONE]" and _text(p)]


def _text(event: dict[str, Any]) -> str:
    if not event["choices"]:
        return ""
    choice = event["choices"][0]
    if event["object"] == "chat.completion.chunk":
        return str(choice["delta"].get("content") or "")
    return str(choice["text"])


async def _read_sse(response: aiohttp.ClientResponse) -> list[tuple[float, Any]]:
    """Parse an SSE body strictly: every event is exactly `data: <payload>\\n\\n`."""
    events: list[tuple[float, Any]] = []
    pending: tuple[float, str] | None = None
    async for line in response.content:
        if pending is None:
            assert line.startswith(b"data: ") and line.endswith(b"\n"), line
            pending = (time.monotonic(), line[len(b"data: ") : -1].decode())
        else:
            assert line == b"\n", f"event not ended by a blank line: {line!r}"
            arrived, data = pending
            events.append((arrived, data if data == "[DONE]" else json.loads(data)))
            pending = None
    assert pending is None, "body ended inside an event"
    return events


async def _stream(session: aiohttp.ClientSession, base_url: str, path: str, body: dict[str, Any]) -> Stream:
    sent_at = time.monotonic()
    async with session.post(f"{base_url}{path}", json={**body, "stream": True}) as resp:
        events = await _read_sse(resp) if resp.status == 200 else []
        return Stream(resp.status, dict(resp.headers), sent_at, events)


async def _chat_stream(session: aiohttp.ClientSession, base_url: str, **body: Any) -> Stream:
    return await _stream(session, base_url, "/chat/completions", {"messages": CHAT_MESSAGES, **body})


async def _post(session: aiohttp.ClientSession, base_url: str, path: str, body: Any) -> tuple[int, Any]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(f"{base_url}{path}", data=data, headers={"Content-Type": "application/json"}) as resp:
        return resp.status, await resp.json()


async def _stats(session: aiohttp.ClientSession, base_url: str, path: str = "") -> dict[str, Any]:
    async with session.get(base_url.removesuffix("/v1") + "/stats" + path) as resp:
        assert resp.status == 200
        stats: dict[str, Any] = await resp.json()
        return stats


async def _poll_stats(
    session: aiohttp.ClientSession,
    base_url: str,
    done: Callable[[dict[str, Any]], bool],
    timeout: float = 5.0,
) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        stats = await _stats(session, base_url)
        if done(stats) or time.monotonic() > deadline:
            return stats
        await asyncio.sleep(0.01)


# --- wire format ---------------------------------------------------------------------------


async def test_models_lists_the_configured_model(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(model="llama-mock")
    assert server.port > 0
    assert server.base_url == f"http://127.0.0.1:{server.port}/v1"
    async with session.get(f"{server.base_url}/models") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["llama-mock"]
    assert body["data"][0]["object"] == "model"


async def test_chat_stream_event_sequence_with_usage(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(output_tokens=7, model="m1", **INSTANT)
    stream = await _chat_stream(
        session, server.base_url, messages=CHAT_MESSAGES, stream_options={"include_usage": True}
    )

    assert stream.status == 200
    assert stream.headers["Content-Type"] == "text/event-stream"
    assert stream.headers["Cache-Control"] == "no-cache"
    role, *tokens, usage_event, done = stream.payloads
    assert role["choices"] == [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]
    assert len(tokens) == 7
    assert [len(_text(t).split()) for t in tokens] == [1] * 7
    assert [list(t["choices"][0]["delta"]) for t in tokens] == [["content"]] * 7
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None] * 6 + ["stop"]
    assert usage_event["choices"] == []
    assert usage_event["usage"] == {"prompt_tokens": 2, "completion_tokens": 7, "total_tokens": 9}
    assert done == "[DONE]"
    chunks = [role, *tokens, usage_event]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert {c["model"] for c in chunks} == {"m1"}
    assert len({c["id"] for c in chunks}) == 1
    assert role["id"].startswith("chatcmpl-")
    assert len(stream.token_events()) == usage_event["usage"]["completion_tokens"]


@pytest.mark.parametrize("stream_options", [None, {}, {"include_usage": False}])
async def test_chat_stream_has_no_usage_event_unless_asked(
    start_server: StartServer, session: aiohttp.ClientSession, stream_options: Any
) -> None:
    server = await start_server(output_tokens=3, **INSTANT)
    stream = await _chat_stream(session, server.base_url, stream_options=stream_options)
    assert stream.payloads[-1] == "[DONE]"
    chunks = stream.payloads[:-1]
    assert len(chunks) == 1 + 3
    assert all(c["choices"] and "usage" not in c for c in chunks)
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_completions_stream_event_sequence(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(output_tokens=5, **INSTANT)
    stream = await _stream(
        session,
        server.base_url,
        "/completions",
        {"prompt": "one two three", "max_tokens": 4, "stream_options": {"include_usage": True}},
    )
    *tokens, usage_event, done = stream.payloads
    # No role event on the completions endpoint: every chunk carries a token.
    assert len(tokens) == 4
    assert all(len(t["choices"][0]["text"].split()) == 1 for t in tokens)
    assert {t["object"] for t in tokens} == {"text_completion"}
    assert tokens[0]["id"].startswith("cmpl-")
    assert [t["choices"][0]["finish_reason"] for t in tokens] == [None] * 3 + ["length"]
    assert usage_event["choices"] == []
    assert usage_event["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert done == "[DONE]"


async def test_chat_non_streaming_body_and_usage(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(ttft_ms=30.0, itl_ms=5.0, output_tokens=5, model="m2")
    started = time.monotonic()
    status, body = await _post(
        session, server.base_url, "/chat/completions", {"messages": [{"role": "user", "content": "a b"}]}
    )
    elapsed_ms = (time.monotonic() - started) * 1000
    assert status == 200
    assert elapsed_ms >= 30.0 + 4 * 5.0
    assert body["object"] == "chat.completion"
    assert body["model"] == "m2"
    assert body["id"].startswith("chatcmpl-")
    [choice] = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert len(choice["message"]["content"].split()) == 5
    assert choice["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 2, "completion_tokens": 5, "total_tokens": 7}


async def test_completions_non_streaming_body(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(output_tokens=9, **INSTANT)
    status, body = await _post(session, server.base_url, "/completions", {"prompt": "x", "max_tokens": 3})
    assert status == 200
    assert body["object"] == "text_completion"
    [choice] = body["choices"]
    assert len(choice["text"].split()) == 3
    assert choice["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 1, "completion_tokens": 3, "total_tokens": 4}


# --- token semantics -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limits", "expected_tokens", "expected_finish"),
    [
        ({}, 8, "stop"),
        ({"max_tokens": 3}, 3, "length"),
        ({"max_tokens": 20}, 8, "stop"),
        ({"max_tokens": 8}, 8, "length"),  # the limit is reached before EOS
        ({"max_tokens": 20, "ignore_eos": True}, 20, "length"),
        ({"max_tokens": 5, "ignore_eos": True}, 5, "length"),
        ({"ignore_eos": True}, 8, "stop"),  # nothing to run to without max_tokens
        ({"max_completion_tokens": 4}, 4, "length"),
        ({"max_completion_tokens": 4, "max_tokens": 6}, 4, "length"),
        ({"min_tokens": 12}, 12, "stop"),
        ({"min_tokens": 3}, 8, "stop"),
        ({"min_tokens": 12, "max_tokens": 10}, 10, "length"),
    ],
)
async def test_output_length_semantics(
    start_server: StartServer,
    session: aiohttp.ClientSession,
    limits: dict[str, Any],
    expected_tokens: int,
    expected_finish: str,
) -> None:
    server = await start_server(output_tokens=8, **INSTANT)
    stream = await _chat_stream(session, server.base_url, stream_options={"include_usage": True}, **limits)
    tokens = stream.token_events()
    assert len(tokens) == expected_tokens
    assert tokens[-1][1]["choices"][0]["finish_reason"] == expected_finish
    assert stream.payloads[-2]["usage"]["completion_tokens"] == expected_tokens

    status, body = await _post(session, server.base_url, "/completions", {"prompt": "p", **limits})
    assert status == 200
    assert body["usage"]["completion_tokens"] == expected_tokens
    assert len(body["choices"][0]["text"].split()) == expected_tokens
    assert body["choices"][0]["finish_reason"] == expected_finish


@pytest.mark.parametrize(
    ("path", "body", "expected"),
    [
        ("/chat/completions", {"messages": [{"role": "user", "content": "one"}]}, 1),
        (
            "/chat/completions",
            {
                "messages": [
                    {"role": "system", "content": "  you are\n a\tmock  "},
                    {"role": "assistant", "content": None, "tool_calls": []},
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "two words"},
                            {"type": "image_url", "image_url": {"url": "data:x"}},
                            {"type": "text", "text": "and three more"},
                        ],
                    },
                ]
            },
            4 + 2 + 3,
        ),
        ("/chat/completions", {"messages": [{"role": "user", "content": ""}]}, 0),
        ("/completions", {"prompt": "the quick  brown\nfox"}, 4),
        ("/completions", {"prompt": ["a b", "c"]}, 3),
        ("/completions", {"prompt": [101, 7, 3, 9, 12]}, 5),
    ],
)
async def test_prompt_tokens_are_whitespace_words(
    start_server: StartServer,
    session: aiohttp.ClientSession,
    path: str,
    body: dict[str, Any],
    expected: int,
) -> None:
    server = await start_server(output_tokens=2, **INSTANT)
    status, response = await _post(session, server.base_url, path, body)
    assert status == 200
    assert response["usage"]["prompt_tokens"] == expected
    assert (await _stats(session, server.base_url))["prompt_tokens_total"] == expected


# --- timing --------------------------------------------------------------------------------

# The timing tests judge what a client sees against what the mock says it emitted
# (`/stats/emission`, measured in the same test): on a loaded machine the mock is late too, and
# by how much is the machine's business. The mock's own lateness (first-token lateness p99,
# emission ITL p99) is measured by bench/agent_accuracy.py. What the reading side may add: a
# stall of the process between the mock's write and the client's read.
CLIENT_SLACK_MS = 50.0
ITL_SLACK_MS = 3.0


async def test_ttft_is_measured_from_the_request_and_never_early(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(ttft_ms=50.0, itl_ms=10.0, output_tokens=2)
    await _chat_stream(session, server.base_url)  # warm the connection pool
    ttfts, role_delays = [], []
    for _ in range(20):
        stream = await _chat_stream(session, server.base_url)
        first_token_at = stream.token_events()[0][0]
        ttfts.append((first_token_at - stream.sent_at) * 1000)
        role_delays.append((stream.events[0][0] - stream.sent_at) * 1000)
    assert min(ttfts) >= 50.0, ttfts
    late_ms = (await _stats(session, server.base_url, "/emission"))["ttft_late"]["p50_ms"]
    assert statistics.median(ttfts) <= 50.0 + late_ms + CLIENT_SLACK_MS, (ttfts, late_ms)
    # The empty role event goes out at once, long before the first token.
    assert statistics.median(role_delays) < statistics.median(ttfts) - 10.0, (role_delays, ttfts)


async def test_inter_token_gaps_are_never_shorter_than_itl(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(ttft_ms=20.0, itl_ms=10.0, output_tokens=40)
    await _chat_stream(session, server.base_url, max_tokens=1)  # open a pooled connection
    streams = await asyncio.gather(*(_chat_stream(session, server.base_url) for _ in range(4)))
    gaps: list[float] = []
    for stream in streams:
        offsets_ms = [(t - stream.sent_at) * 1000 for t, _ in stream.token_events()]
        assert len(offsets_ms) == 40
        assert all(offset >= 20.0 + i * 10.0 for i, offset in enumerate(offsets_ms)), offsets_ms
        gaps += [b - a for a, b in itertools.pairwise(offsets_ms)]
    emitted = await _stats(session, server.base_url, "/emission")
    # Like a decode loop, a late token delays the next ones, but only by the timer's lateness
    # (what the mock's emission gaps show), never by a backlog growing on the client's side.
    for stream in streams:
        last_ms = (stream.token_events()[-1][0] - stream.sent_at) * 1000
        budget_ms = 20.0 + emitted["ttft_late"]["max_ms"] + 39 * emitted["itl"]["mean_ms"] + CLIENT_SLACK_MS
        assert last_ms <= budget_ms, (last_ms, emitted)
    # Each gap is itl plus this token's timer lateness: the median is the mock's own.
    assert statistics.median(gaps) >= 10.0 - ITL_SLACK_MS, gaps
    assert abs(statistics.median(gaps) - emitted["itl"]["p50_ms"]) <= ITL_SLACK_MS, (gaps, emitted["itl"])


async def test_jitter_spreads_the_gaps_around_the_configured_itl(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(ttft_ms=0.0, itl_ms=10.0, jitter_ms=5.0, output_tokens=60)
    stream = await _chat_stream(session, server.base_url)
    times = [t for t, _ in stream.token_events()]
    gaps = [(b - a) * 1000 for a, b in itertools.pairwise(times)]
    emitted = (await _stats(session, server.base_url, "/emission"))["itl"]
    # About the configured 10 ms: never much below, and above only by the mock's own lateness.
    assert statistics.mean(gaps) >= 8.5, gaps
    assert statistics.mean(gaps) <= 12.5 + max(0.0, emitted["mean_ms"] - 10.0) + 1.0, (gaps, emitted)
    assert max(gaps) - min(gaps) > 5.0, gaps  # without jitter they would all be ~10 ms


# --- errors --------------------------------------------------------------------------------


async def test_error_rate_one_fails_every_request(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(error_rate=1.0, **INSTANT)
    for path, body in [
        ("/chat/completions", {"messages": CHAT_MESSAGES, "stream": True}),
        ("/completions", {"prompt": "x"}),
    ]:
        status, error = await _post(session, server.base_url, path, body)
        assert status == 500
        assert error == {
            "error": {
                "message": "mock injected error",
                "type": "server_error",
                "param": None,
                "code": 500,
            }
        }
    stats = await _stats(session, server.base_url)
    assert (stats["requests_total"], stats["requests_failed"], stats["requests_ok"]) == (2, 2, 0)
    assert stats["output_tokens_total"] == 0


async def test_error_rate_zero_never_fails(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server(error_rate=0.0, output_tokens=1, **INSTANT)
    statuses = [(await _post(session, server.base_url, "/completions", {"prompt": "x"}))[0] for _ in range(50)]
    assert statuses == [200] * 50


async def test_error_rate_is_seeded_and_reproducible(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    async def statuses(server: MockServer) -> list[int]:
        return [(await _post(session, server.base_url, "/completions", {"prompt": "x"}))[0] for _ in range(200)]

    first = await statuses(await start_server(error_rate=0.5, seed=7, output_tokens=1, **INSTANT))
    second = await statuses(await start_server(error_rate=0.5, seed=7, output_tokens=1, **INSTANT))
    other = await statuses(await start_server(error_rate=0.5, seed=8, output_tokens=1, **INSTANT))
    assert set(first) == {200, 500}
    assert 70 <= first.count(500) <= 130
    assert second == first
    assert other != first


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/chat/completions", b"{not json"),
        ("/chat/completions", b"\xff\xfe"),
        ("/chat/completions", b"[1, 2]"),
        ("/chat/completions", {"model": "mock"}),
        ("/chat/completions", {"messages": []}),
        ("/chat/completions", {"messages": ["hi"]}),
        ("/chat/completions", {"messages": [{"role": "user", "content": 3}]}),
        ("/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": 0}),
        ("/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": "5"}),
        ("/chat/completions", {"messages": CHAT_MESSAGES, "max_tokens": True}),
        ("/chat/completions", {"messages": CHAT_MESSAGES, "min_tokens": -1}),
        ("/chat/completions", {"messages": CHAT_MESSAGES, "stream": "yes"}),
        ("/chat/completions", {"messages": CHAT_MESSAGES, "n": 2}),
        ("/completions", {"messages": CHAT_MESSAGES}),
        ("/completions", {"prompt": 5}),
        ("/completions", {"prompt": []}),
        ("/completions", {"prompt": ["a", 1]}),
    ],
)
async def test_malformed_requests_get_400(
    start_server: StartServer, session: aiohttp.ClientSession, path: str, body: Any
) -> None:
    # error_rate 1 shows that validation comes first: a bad request is a 400, never a 500.
    server = await start_server(error_rate=1.0, **INSTANT)
    status, error = await _post(session, server.base_url, path, body)
    assert status == 400
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == 400
    assert isinstance(error["error"]["message"], str) and error["error"]["message"]
    stats = await _stats(session, server.base_url)
    assert (stats["requests_total"], stats["requests_failed"]) == (1, 1)


# --- stats ---------------------------------------------------------------------------------


async def test_stats_match_what_was_sent_and_reset_zeroes_them(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(output_tokens=6, **INSTANT)
    await _chat_stream(session, server.base_url)  # 6 tokens, prompt 2
    await _chat_stream(session, server.base_url, max_tokens=2)  # 2 tokens, prompt 2
    await _post(session, server.base_url, "/completions", {"prompt": "a b c", "max_tokens": 4})
    await _post(session, server.base_url, "/completions", {"prompt": "a b c d", "stream": False})
    await _post(session, server.base_url, "/completions", b"nope")

    stats = await _stats(session, server.base_url)
    assert stats == {
        "requests_total": 5,
        "requests_ok": 4,
        "requests_failed": 1,
        "requests_cancelled": 0,
        "output_tokens_total": 6 + 2 + 4 + 6,
        "prompt_tokens_total": 2 + 2 + 3 + 4,
        "cached_tokens_total": 0,  # no prefix cache
        "running": 0,
        "waiting": 0,
        "by_endpoint": {"chat": 2, "completions": 3},
    }
    assert server.stats.as_dict() == stats

    async with session.post(server.base_url.removesuffix("/v1") + "/stats/reset") as resp:
        assert resp.status == 200
    zeroed = {k: 0 for k in stats} | {"by_endpoint": {"chat": 0, "completions": 0}}
    assert await _stats(session, server.base_url) == zeroed

    await _chat_stream(session, server.base_url, max_tokens=1)
    after = await _stats(session, server.base_url)
    assert (after["requests_total"], after["requests_ok"], after["output_tokens_total"]) == (1, 1, 1)


async def test_client_disconnect_mid_stream_is_counted_as_cancelled(
    start_server: StartServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    server = await start_server(ttft_ms=0.0, itl_ms=20.0, output_tokens=500)
    resp = await session.post(f"{server.base_url}/chat/completions", json={"messages": CHAT_MESSAGES, "stream": True})
    lines_seen = 0
    while lines_seen < 6:  # role event and two token events, each two lines
        await resp.content.readline()
        lines_seen += 1
    assert (await _stats(session, server.base_url))["running"] == 1
    resp.close()  # drops the connection

    stats = await _poll_stats(session, server.base_url, lambda s: s["running"] == 0)
    assert stats["running"] == 0
    assert (stats["requests_cancelled"], stats["requests_ok"], stats["requests_failed"]) == (1, 0, 0)
    assert 2 <= stats["output_tokens_total"] < 10
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_client_disconnect_while_waiting_for_a_full_response(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(ttft_ms=5000.0, itl_ms=0.0, output_tokens=3)
    request = asyncio.create_task(_post(session, server.base_url, "/completions", {"prompt": "x", "stream": False}))
    await _poll_stats(session, server.base_url, lambda s: s["running"] == 1)
    request.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await request

    stats = await _poll_stats(session, server.base_url, lambda s: s["running"] == 0)
    assert (stats["running"], stats["requests_cancelled"], stats["requests_ok"]) == (0, 1, 0)
    assert stats["output_tokens_total"] == 0


async def test_disconnect_without_handler_cancellation_is_noticed_at_the_next_write(
    session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    # create_app may be served by other runners, which do not cancel handlers on disconnect.
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    app = create_app(MockConfig(ttft_ms=0.0, itl_ms=10.0, output_tokens=500))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        base_url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        resp = await session.post(f"{base_url}/completions", json={"prompt": "x", "stream": True})
        await resp.content.readline()
        resp.close()
        stats = await _poll_stats(session, base_url, lambda s: s["running"] == 0)
        assert (stats["running"], stats["requests_cancelled"], stats["requests_ok"]) == (0, 1, 0)
    finally:
        await runner.cleanup()
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


async def test_health(start_server: StartServer, session: aiohttp.ClientSession) -> None:
    server = await start_server()
    async with session.get(server.base_url.removesuffix("/v1") + "/health") as resp:
        assert resp.status == 200


# --- server styles (their byte shapes: tests/unit/test_mock_styles.py) ----------------------


async def test_multi_token_events_are_one_decode_step_apart(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(style="multi_token", ttft_ms=20.0, itl_ms=5.0, output_tokens=12)
    stream = await _chat_stream(session, server.base_url, stream_options={"include_usage": True})
    tokens = stream.token_events()
    assert [len(_text(payload).split()) for _, payload in tokens] == [4, 4, 4]
    offsets_ms = [(t - stream.sent_at) * 1000 for t, _ in tokens]
    # The first event at TTFT, each next one step of 4 tokens (4 x 5 ms) later, never early.
    assert all(offset >= 20.0 + i * 20.0 for i, offset in enumerate(offsets_ms)), offsets_ms
    assert stream.payloads[-2]["usage"]["completion_tokens"] == 12
    assert (await _stats(session, server.base_url))["output_tokens_total"] == 12


async def test_non_streamed_answer_under_reports_and_splits_reasoning(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(style="reasoning", output_tokens=16, under_report_usage=0.25, **INSTANT)
    status, body = await _post(session, server.base_url, "/chat/completions", {"messages": CHAT_MESSAGES})
    assert status == 200
    message = body["choices"][0]["message"]
    assert len(message["reasoning_content"].split()) == len(message["content"].split()) == 8
    assert message["reasoning_content"] + message["content"] == output_text(16)
    assert body["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 12,
        "total_tokens": 14,
        "completion_tokens_details": {"reasoning_tokens": 8},  # not under-reported
    }
    assert (await _stats(session, server.base_url))["output_tokens_total"] == 16  # what was sent


async def test_client_disconnect_during_split_writes_is_counted_as_cancelled(
    start_server: StartServer, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp")
    server = await start_server(style="litellm", ttft_ms=0.0, itl_ms=20.0, output_tokens=500)
    resp = await session.post(f"{server.base_url}/chat/completions", json={"messages": CHAT_MESSAGES, "stream": True})
    received = b""
    while received.count(b"\r\n\r\n") < 4:  # the ping, the role event and two token events
        received += await resp.content.readany()
    assert (await _stats(session, server.base_url))["running"] == 1
    resp.close()

    stats = await _poll_stats(session, server.base_url, lambda s: s["running"] == 0)
    assert (stats["running"], stats["requests_cancelled"], stats["requests_ok"]) == (0, 1, 0)
    assert 2 <= stats["output_tokens_total"] < 10
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]


# --- command line --------------------------------------------------------------------------

_CLI_SCRIPT = """
import argparse, sys
from mockserver.cli import add_arguments, run
parser = argparse.ArgumentParser()
add_arguments(parser)
sys.exit(run(parser.parse_args()))
"""


@pytest.mark.e2e
@pytest.mark.parametrize("stop_signal", [signal.SIGINT, signal.SIGTERM])
async def test_cli_serves_until_signalled_and_never_emits_early(
    session: aiohttp.ClientSession, stop_signal: signal.Signals
) -> None:
    """The CLI runs on uvloop, whose millisecond timers must not make tokens early."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLI_SCRIPT,
        "--port=0",
        "--ttft-ms=30",
        "--itl-ms=5",
        "--output-tokens=5",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 15.0)).decode()
        assert line.startswith("mock server listening on http://127.0.0.1:"), line
        base_url = line.split()[-1]
        assert base_url.endswith("/v1")
        assert int(base_url.removesuffix("/v1").rsplit(":", 1)[1]) > 0

        async def staggered_stream(delay_s: float) -> Stream:
            await asyncio.sleep(delay_s)
            return await _chat_stream(session, base_url)

        # Concurrent, staggered streams keep the server's loop waking at odd times, which is
        # when a millisecond-tick timer fires before its deadline.
        streams = await asyncio.gather(*(staggered_stream(i * 0.0013) for i in range(40)))
        for stream in streams:
            offsets_ms = [(t - stream.sent_at) * 1000 for t, _ in stream.token_events()]
            assert len(offsets_ms) == 5
            for index, offset in enumerate(offsets_ms):
                assert offset >= 30.0 + index * 5.0, offsets_ms

        # Stopping with a stream in flight: it is cut off and the process exits cleanly.
        async with session.post(
            f"{base_url}/chat/completions",
            json={"messages": CHAT_MESSAGES, "stream": True, "max_tokens": 5000, "ignore_eos": True},
        ) as in_flight:
            await in_flight.content.readline()
            proc.send_signal(stop_signal)
            assert await asyncio.wait_for(proc.wait(), 10.0) == 0
        assert await proc.stderr.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


@pytest.mark.e2e
async def test_cli_passes_style_and_under_report_to_the_server(session: aiohttp.ClientSession) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _CLI_SCRIPT,
        "--port=0",
        "--ttft-ms=0",
        "--itl-ms=0",
        "--output-tokens=4",
        "--style=tgi",
        "--under-report-usage=0.5",
        cwd=REPO_ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        base_url = (await asyncio.wait_for(proc.stdout.readline(), 15.0)).decode().split()[-1]
        body = {"messages": CHAT_MESSAGES, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{base_url}/chat/completions", json=body) as resp:
            streamed = await resp.read()
        assert streamed.startswith(b"data:{")  # TGI's framing
        assert b"usage" not in streamed
        status, answer = await _post(session, base_url, "/completions", {"prompt": "x"})
        assert (status, answer["usage"]["completion_tokens"]) == (200, 2)
        assert (await _stats(session, base_url))["output_tokens_total"] == 8
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 10.0) == 0
        assert await proc.stderr.read() == b""
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
