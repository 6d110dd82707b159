"""The mock as the ground truth of production-like traffic (issue 18), over real HTTP.

Exact token counts with a tokenizer (`--tokenizer`), the chat template's overhead
(`--bos-tokens`, `--chat-template-tokens`), multi-turn bodies, the prefix-cache model
(`--prefix-cache`) with its counters on `/metrics`, and reasoning deltas (`--style reasoning`,
`--reasoning-tokens`, `--reasoning-field`). Every test starts its own `MockServer` on
127.0.0.1:0 and talks to it with aiohttp; expected token counts come from the tokenizer
itself (`common.tokenizer.Tokenizer` on the small BPE model of `tests.tokenizers_fixture`),
and timing is judged against references measured in the same test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from common.tokenizer import Tokenizer
from mockserver import MockConfig, MockServer
from mockserver.capacity import Workload, closed_loop
from mockserver.cli import add_arguments
from mockserver.cli import run as run_cli

pytestmark = pytest.mark.timeout(60)

INSTANT = {"ttft_ms": 0.0, "itl_ms": 0.0}
TEXTS = (
    "The quick brown fox jumps over the lazy dog.",
    "Serving engines are tuned for what production sends: conversations, bursts, reasoning!",
    "tokenizers count 1024 tokens where a word count says otherwise",
)

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
class Streamed:
    """A streamed response as a client sees it."""

    sent_at: float
    events: list[tuple[float, dict[str, Any]]]  # arrival time, parsed JSON (without [DONE])

    def texts(self, field: str) -> list[tuple[float, str]]:
        """(arrival, text) of every event carrying text in `field` (`content`, `reasoning_content`,
        `reasoning`, or `text` for completions)."""
        out = []
        for t, event in self.events:
            for choice in event.get("choices") or []:
                value = choice.get("text") if field == "text" else (choice.get("delta") or {}).get(field)
                if value:
                    out.append((t, value))
        return out

    @property
    def usage(self) -> dict[str, Any]:
        usages = [e["usage"] for _, e in self.events if e.get("usage")]
        assert len(usages) == 1, usages
        return usages[0]


async def _stream(session: aiohttp.ClientSession, server: MockServer, path: str, body: dict[str, Any]) -> Streamed:
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    sent_at = time.monotonic()
    events: list[tuple[float, dict[str, Any]]] = []
    async with session.post(f"{server.base_url}{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data: ") and line.strip() != b"data: [DONE]":
                events.append((time.monotonic(), json.loads(line[len(b"data: ") :])))
    return Streamed(sent_at, events)


async def _post(session: aiohttp.ClientSession, server: MockServer, path: str, body: dict[str, Any]) -> Any:
    async with session.post(f"{server.base_url}{path}", json=body) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def _metrics(session: aiohttp.ClientSession, server: MockServer) -> dict[str, float]:
    """The /metrics page as {name: value} (the mock's series have one label set each)."""
    async with session.get(server.base_url.removesuffix("/v1") + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    values: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            name = series.split("{", 1)[0]
            if name == "vllm:request_success_total":
                continue  # one series per finish reason
            assert name not in values, name
            values[name] = float(value)
    return values


def _words(n: int, tag: str = "w") -> str:
    """A prompt of `n` distinct whitespace words (n tokens for the mock without a tokenizer)."""
    return " ".join(f"{tag}{i}" for i in range(n))


# --- exact counts with a tokenizer -----------------------------------------------------------


@pytest.mark.parametrize("text", TEXTS)
async def test_prompt_tokens_are_the_tokenizers_count(
    start_server: StartServer, session: aiohttp.ClientSession, tokenizer_path: Path, tok: Tokenizer, text: str
) -> None:
    server = await start_server(tokenizer=str(tokenizer_path), output_tokens=2, **INSTANT)
    expected = tok.count(text)
    assert expected != len(text.split())  # the test tells a tokenizer from a word count
    chat = await _post(session, server, "/chat/completions", {"messages": [{"role": "user", "content": text}]})
    assert chat["usage"]["prompt_tokens"] == expected
    completion = await _post(session, server, "/completions", {"prompt": text})
    assert completion["usage"]["prompt_tokens"] == expected
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": t} for t in TEXTS]}]}
    assert (await _post(session, server, "/chat/completions", parts))["usage"]["prompt_tokens"] == sum(
        tok.count(t) for t in TEXTS
    )
    ids = tok.encode(text)
    assert (await _post(session, server, "/completions", {"prompt": ids}))["usage"]["prompt_tokens"] == len(ids)


async def test_a_model_directory_is_a_tokenizer(
    start_server: StartServer, session: aiohttp.ClientSession, tokenizer_path: Path, tok: Tokenizer
) -> None:
    server = await start_server(tokenizer=str(tokenizer_path.parent), output_tokens=2, **INSTANT)
    answer = await _post(session, server, "/completions", {"prompt": TEXTS[1]})
    assert answer["usage"]["prompt_tokens"] == tok.count(TEXTS[1])


@pytest.mark.parametrize("style", ["openai", "vllm", "sglang", "llamacpp", "litellm", "multi_token", "reasoning"])
@pytest.mark.parametrize("path", ["/chat/completions", "/completions"])
async def test_streamed_text_is_exactly_completion_tokens_for_the_tokenizer(
    start_server: StartServer,
    session: aiohttp.ClientSession,
    tokenizer_path: Path,
    tok: Tokenizer,
    style: str,
    path: str,
) -> None:
    server = await start_server(tokenizer=str(tokenizer_path), style=style, **INSTANT)
    tokens = 37  # not a multiple of the 8 output words nor of multi_token's 4 per event
    body: dict[str, Any] = {"max_tokens": tokens, "ignore_eos": True}
    body |= {"messages": [{"role": "user", "content": "hi"}]} if path == "/chat/completions" else {"prompt": "hi"}
    streamed = await _stream(session, server, path, body)
    fields = ["text"] if path == "/completions" else ["reasoning_content", "content"]
    text = "".join(t for field in fields for _, t in streamed.texts(field))
    assert tok.count(text) == streamed.usage["completion_tokens"] == tokens
    # Not by chance: the words are each one token, and not whitespace-word counts.
    assert len(text.split()) == tokens
    plain = await _post(session, server, path, {**body, "stream": False})
    choice = plain["choices"][0]
    plain_text = choice.get("text") or (choice["message"].get("reasoning_content") or "") + choice["message"]["content"]
    assert tok.count(plain_text) == plain["usage"]["completion_tokens"] == tokens


async def test_a_tokenizer_that_cannot_be_loaded_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    for path in (bad, tmp_path / "missing"):
        assert run_cli(parser.parse_args(["--port", "0", "--tokenizer", str(path)])) == 2


# --- template overhead and multi-turn bodies -------------------------------------------------


@pytest.mark.parametrize(("bos", "per_message"), [(0, 0), (1, 0), (1, 3), (0, 5)])
async def test_chat_template_overhead_is_bos_plus_a_header_per_message_and_the_reply(
    start_server: StartServer,
    session: aiohttp.ClientSession,
    tokenizer_path: Path,
    tok: Tokenizer,
    bos: int,
    per_message: int,
) -> None:
    server = await start_server(
        tokenizer=str(tokenizer_path), bos_tokens=bos, chat_template_tokens=per_message, output_tokens=2, **INSTANT
    )
    for count in (1, 3):
        messages = [{"role": "user", "content": TEXTS[i]} for i in range(count)]
        answer = await _post(session, server, "/chat/completions", {"messages": messages})
        own = sum(tok.count(m["content"]) for m in messages)
        # What a client measures with its preflight: usage.prompt_tokens minus its own count.
        assert answer["usage"]["prompt_tokens"] - own == bos + per_message * (count + 1)
    completion = await _post(session, server, "/completions", {"prompt": TEXTS[0]})
    assert completion["usage"]["prompt_tokens"] - tok.count(TEXTS[0]) == bos
    ids = await _post(session, server, "/completions", {"prompt": tok.encode(TEXTS[0])})
    assert ids["usage"]["prompt_tokens"] == tok.count(TEXTS[0])  # token ids: taken as they are


def _conversation(reply: str) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": TEXTS[0]},
        {"role": "user", "content": TEXTS[1]},
        {"role": "assistant", "content": reply},
        {"role": "user", "content": TEXTS[2]},
    ]


async def test_a_multi_turn_body_is_counted_over_all_its_messages(
    start_server: StartServer, session: aiohttp.ClientSession, tokenizer_path: Path, tok: Tokenizer
) -> None:
    reply = " the answer was forty two"
    messages = _conversation(reply)
    server = await start_server(tokenizer=str(tokenizer_path), chat_template_tokens=2, output_tokens=2, **INSTANT)
    answer = await _post(session, server, "/chat/completions", {"messages": messages})
    assert answer["usage"]["prompt_tokens"] == sum(tok.count(m["content"]) for m in messages) + 2 * (4 + 1)
    words = await start_server(output_tokens=2, **INSTANT)  # without a tokenizer: whitespace words
    answer = await _post(session, words, "/chat/completions", {"messages": messages})
    assert answer["usage"]["prompt_tokens"] == sum(len(m["content"].split()) for m in messages)


# --- the prefix cache ------------------------------------------------------------------------

PREFILL = {"ttft_ms": 5.0, "itl_ms": 1.0, "prefill_ms_per_1k_tokens": 400.0}


def _ttft(streamed: Streamed) -> float:
    return streamed.texts("text")[0][0] - streamed.sent_at


async def test_an_identical_prompt_hits_its_whole_blocks_and_skips_their_prefill(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(prefix_cache=True, **PREFILL)
    prompt = _words(500)
    body = {"prompt": prompt, "max_tokens": 2}
    first = await _stream(session, server, "/completions", body)
    second = await _stream(session, server, "/completions", body)
    assert first.usage["prompt_tokens"] == second.usage["prompt_tokens"] == 500
    assert first.usage["prompt_tokens_details"] == {"cached_tokens": 0}
    # Whole 16-token blocks, the last token always computed: 31 blocks of 500 tokens.
    assert second.usage["prompt_tokens_details"] == {"cached_tokens": (500 - 1) // 16 * 16}
    # 5 ms + 500 uncached tokens x 0.4 ms first; 5 ms + 4 tokens x 0.4 ms then.
    assert _ttft(first) >= 0.205  # never early
    assert _ttft(second) < _ttft(first) * 0.5, (_ttft(first), _ttft(second))
    # A prompt of exactly whole blocks is cached less its last block.
    exact = {"prompt": _words(64, "x"), "max_tokens": 2}
    await _post(session, server, "/completions", exact)
    again = await _post(session, server, "/completions", exact)
    assert again["usage"]["prompt_tokens_details"] == {"cached_tokens": 48}
    stats = await (await session.get(server.base_url.removesuffix("/v1") + "/stats")).json()
    assert stats["cached_tokens_total"] == 496 + 48


async def test_only_a_shared_prefix_of_whole_blocks_hits(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(prefix_cache=True, output_tokens=2, **INSTANT)

    async def cached(prompt: str) -> int:
        answer = await _post(session, server, "/completions", {"prompt": prompt})
        return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])

    shared = _words(40, "s")
    assert await cached(shared + " " + _words(60, "a")) == 0
    # 40 shared tokens: the first two blocks (32 tokens) match, the third differs.
    assert await cached(shared + " " + _words(60, "b")) == 32
    # The same words after a different first word: the chained hashes never match.
    assert await cached("different " + shared + " " + _words(60, "a")) == 0
    # The same block content at another position does not match either.
    assert await cached(_words(16, "z") + " " + shared + " " + _words(60, "a")) == 0


async def test_the_cache_evicts_the_least_recently_used_blocks(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(
        prefix_cache=True, prefix_cache_block_tokens=8, prefix_cache_blocks=6, output_tokens=1, **INSTANT
    )

    async def cached(prompt: str) -> int:
        answer = await _post(session, server, "/completions", {"prompt": prompt, "max_tokens": 1})
        return int(answer["usage"]["prompt_tokens_details"]["cached_tokens"])

    a, b = _words(33, "a"), _words(33, "b")  # 4 full blocks each (+ output blocks: none full)
    assert await cached(a) == 0
    assert await cached(a) == 32
    assert await cached(b) == 0  # 4 blocks of b: 2 of a's 4 evicted, its tail first
    assert await cached(a) == 16  # a's head survived
    assert await cached(b) == 16  # a's return evicted b's tail, and b's head survived


@pytest.mark.parametrize("tokenizer", [True, False])
async def test_the_second_turn_hits_the_first_turns_prompt_and_reply(
    start_server: StartServer,
    session: aiohttp.ClientSession,
    tokenizer_path: Path,
    tok: Tokenizer,
    tokenizer: bool,
) -> None:
    server = await start_server(
        tokenizer=str(tokenizer_path) if tokenizer else "",
        bos_tokens=1,
        chat_template_tokens=3,
        prefix_cache=True,
        **INSTANT,
    )
    history = _conversation("")[:2]
    turn1 = await _stream(session, server, "/chat/completions", {"messages": history, "max_tokens": 40})
    reply = "".join(t for _, t in turn1.texts("content"))
    prompt1, output1 = turn1.usage["prompt_tokens"], turn1.usage["completion_tokens"]
    assert output1 == 40 == (tok.count(reply) if tokenizer else len(reply.split()))
    turn2 = await _stream(session, server, "/chat/completions", {"messages": _conversation(reply), "max_tokens": 4})
    # Turn 2 repeats turn 1's prompt (its generation prompt is the assistant header) and the
    # reply: every whole block of the two is cached.
    cached2 = turn2.usage["prompt_tokens_details"]["cached_tokens"]
    assert cached2 == (prompt1 + output1) // 16 * 16
    assert cached2 > prompt1  # the reply's blocks too, not only the prompt's
    # A different reply at the same place shares only turn 1's prompt.
    other = await _stream(
        session, server, "/chat/completions", {"messages": _conversation(" a different reply"), "max_tokens": 4}
    )
    assert other.usage["prompt_tokens_details"]["cached_tokens"] == prompt1 // 16 * 16


@pytest.mark.parametrize("style", ["openai", "vllm", "sglang", "llamacpp"])
async def test_metrics_count_the_cached_tokens_as_the_styles_server_does(
    start_server: StartServer, session: aiohttp.ClientSession, style: str
) -> None:
    server = await start_server(prefix_cache=True, style=style, output_tokens=2, **INSTANT)
    prompts = [_words(30, "r"), _words(100), _words(100), _words(50) + " " + _words(70, "q")]
    usages = [(await _post(session, server, "/completions", {"prompt": p}))["usage"] for p in prompts]
    cached = [u["prompt_tokens_details"]["cached_tokens"] for u in usages]
    prompt = [u["prompt_tokens"] for u in usages]
    assert cached[2] > 0 and cached[3] > 0  # the test has hits to count
    metrics = await _metrics(session, server)
    if style == "sglang":
        assert metrics["sglang:cache_hit_rate"] == pytest.approx(cached[-1] / prompt[-1])
        assert "vllm:prefix_cache_hits_total" not in metrics
    elif style == "llamacpp":
        assert metrics["llamacpp:prompt_tokens_cached_total"] == sum(cached)
        assert metrics["llamacpp:prompt_tokens_total"] == sum(prompt) - sum(cached)
        assert "vllm:prompt_tokens_total" not in metrics
    else:
        assert metrics["vllm:prefix_cache_hits_total"] == sum(cached)
        assert metrics["vllm:prefix_cache_queries_total"] == sum(prompt)
        assert metrics["vllm:prompt_tokens_total"] == sum(prompt)


async def test_without_the_flag_there_is_no_prefix_cache(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    server = await start_server(output_tokens=2, **INSTANT)
    body = {"prompt": _words(100)}
    await _post(session, server, "/completions", body)
    answer = await _post(session, server, "/completions", body)
    assert "prompt_tokens_details" not in answer["usage"]
    metrics = await _metrics(session, server)
    assert not [name for name in metrics if "cache_hit" in name or "prefix_cache" in name]


# --- reasoning -------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_deltas_counts_and_usage_details(
    start_server: StartServer, session: aiohttp.ClientSession, tokenizer_path: Path, tok: Tokenizer, field: str
) -> None:
    server = await start_server(
        style="reasoning", reasoning_tokens=12, reasoning_field=field, tokenizer=str(tokenizer_path), **INSTANT
    )
    body = {"messages": [{"role": "user", "content": "think"}], "max_tokens": 30, "ignore_eos": True}
    streamed = await _stream(session, server, "/chat/completions", body)
    other = "reasoning" if field == "reasoning_content" else "reasoning_content"
    assert streamed.texts(other) == []
    thinking, answer = streamed.texts(field), streamed.texts("content")
    assert (len(thinking), len(answer)) == (12, 18)
    assert max(t for t, _ in thinking) <= min(t for t, _ in answer)  # all reasoning comes first
    for _, event in streamed.events:  # no event carries both
        delta = (event.get("choices") or [{}])[0].get("delta") or {}
        assert not (delta.get(field) and delta.get("content"))
    assert tok.count("".join(t for _, t in thinking)) == 12
    assert tok.count("".join(t for _, t in answer)) == 18
    usage = streamed.usage
    assert usage["completion_tokens"] == 30
    assert usage["completion_tokens_details"] == {"reasoning_tokens": 12}
    plain = await _post(session, server, "/chat/completions", body)
    message = plain["choices"][0]["message"]
    assert tok.count(message[field]) == 12 and tok.count(message["content"]) == 18
    assert other not in message
    assert plain["usage"]["completion_tokens_details"] == {"reasoning_tokens": 12}


@pytest.mark.parametrize(("configured", "tokens", "expected"), [(None, 9, 4), (0, 5, 0), (50, 8, 7)])
async def test_reasoning_token_count_is_the_configured_one_at_most_all_but_the_last(
    start_server: StartServer,
    session: aiohttp.ClientSession,
    configured: int | None,
    tokens: int,
    expected: int,
) -> None:
    server = await start_server(style="reasoning", reasoning_tokens=configured, **INSTANT)
    body = {"messages": [{"role": "user", "content": "think"}], "max_tokens": tokens, "ignore_eos": True}
    streamed = await _stream(session, server, "/chat/completions", body)
    assert len(streamed.texts("reasoning_content")) == expected
    assert len(streamed.texts("content")) == tokens - expected
    assert streamed.usage["completion_tokens_details"] == {"reasoning_tokens": expected}


async def test_first_answer_token_comes_reasoning_tokens_times_itl_after_the_first_reasoning_token(
    start_server: StartServer, session: aiohttp.ClientSession
) -> None:
    ttft_ms, itl_ms, reasoning = 60.0, 20.0, 15
    server = await start_server(style="reasoning", reasoning_tokens=reasoning, ttft_ms=ttft_ms, itl_ms=itl_ms)
    body = {"messages": [{"role": "user", "content": "think"}], "max_tokens": 20, "ignore_eos": True}
    streamed = await _stream(session, server, "/chat/completions", body)
    first_reasoning = streamed.texts("reasoning_content")[0][0] - streamed.sent_at
    first_answer = streamed.texts("content")[0][0] - streamed.sent_at
    # Time to first reasoning token = the TTFT (never early); the answer starts R gaps later.
    assert first_reasoning >= ttft_ms / 1000.0
    thinking = first_answer - first_reasoning
    # Generous: each gap is never shorter than the ITL at the mock, and the client may read the
    # first event late; a loaded machine may delay the answer too, not by another R x ITL.
    assert reasoning * itl_ms / 1000.0 * 0.8 <= thinking <= reasoning * itl_ms / 1000.0 * 2.0, thinking
    # The reasoning gaps, as the client saw them, average about one ITL.
    gaps = thinking / reasoning
    assert gaps >= itl_ms / 1000.0 * 0.8


def test_reasoning_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="reasoning_tokens needs style reasoning"):
        MockConfig(reasoning_tokens=3)
    with pytest.raises(ValueError, match="reasoning_tokens must be an integer >= 0"):
        MockConfig(style="reasoning", reasoning_tokens=-1)
    with pytest.raises(ValueError, match="reasoning_field must be one of"):
        MockConfig(style="reasoning", reasoning_field="thoughts")  # type: ignore[arg-type]
    for field in ("bos_tokens", "chat_template_tokens"):
        with pytest.raises(ValueError, match=f"{field} must be an integer >= 0"):
            MockConfig(**{field: -1})
    for field in ("prefix_cache_block_tokens", "prefix_cache_blocks"):
        with pytest.raises(ValueError, match=f"{field} must be an integer >= 1"):
            MockConfig(**{field: 0})


async def test_the_prefix_cache_counts_prompts_as_without_it(
    start_server: StartServer, session: aiohttp.ClientSession, tokenizer_path: Path
) -> None:
    counts: list[list[int]] = []
    for cache in (False, True):
        server = await start_server(
            tokenizer=str(tokenizer_path), bos_tokens=2, chat_template_tokens=4, prefix_cache=cache, **INSTANT
        )
        bodies: list[tuple[str, dict[str, Any]]] = [
            ("/chat/completions", {"messages": _conversation(" a reply")}),
            ("/completions", {"prompt": TEXTS[1]}),
            ("/completions", {"prompt": list(TEXTS)}),
            ("/completions", {"prompt": [5, 6, 7]}),
        ]
        counts.append(
            [
                (await _post(session, server, path, {**b, "max_tokens": 1}))["usage"]["prompt_tokens"]
                for path, b in bodies
            ]
        )
    assert counts[0] == counts[1]


def test_the_capacity_model_refuses_the_prefix_cache() -> None:
    with pytest.raises(ValueError, match="no prefix cache"):
        closed_loop(MockConfig(prefix_cache=True), Workload(prompt_tokens=10, output_tokens=4), 1)
