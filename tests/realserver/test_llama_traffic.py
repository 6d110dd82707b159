"""Issue 18's traffic against llama.cpp's llama-server, driven through the real CLI, controller
and agent processes: conversations (every turn carries the history with the server's own
replies, results by turn, llama-server's slot cache as a hit rate from both sides), exact
prompt lengths with the tiny model's tokenizer (checked with llama-server's own `/tokenize`
and `/apply-template`), and prefix groups.

The CLI's target is a recording proxy in front of llama-server (it forwards every request
and response unchanged, and keeps the chat bodies and the streamed text), so the test sees
what reached the server and what the server answered.
"""

from __future__ import annotations

import asyncio
import json
import random
import string
import urllib.request
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from agent.preflight import PREFLIGHT_PROMPT
from common.tokenizer import Tokenizer
from tests.processes import CLI, ENV, Proc, wait_for_agents
from tests.realserver.conftest import MODEL_ALIAS, LlamaServer
from tests.realserver.tiny_model import write_tiny_tokenizer

pytestmark = [pytest.mark.realserver, pytest.mark.e2e, pytest.mark.timeout(90)]

# The counters a stage's server-side hit rate comes from (docs/server-metrics.md): this build
# of llama-server exports both.
LLAMA_CACHE_SOURCE = "llamacpp:prompt_tokens_cached_total, llamacpp:prompt_tokens_total"


@dataclass
class Exchange:
    """One chat completion request as the server received it, and what it streamed back."""

    body: dict[str, Any]
    reply: str
    usage: dict[str, Any]

    @property
    def messages(self) -> list[dict[str, str]]:
        return list(self.body["messages"])


def parse_reply(raw: bytes) -> tuple[str, dict[str, Any]]:
    """The answer text and the usage of a streamed (or plain JSON) chat response."""
    if raw.lstrip().startswith(b"{"):
        body = json.loads(raw)
        return body["choices"][0]["message"]["content"], body.get("usage") or {}
    text, usage = [], {}
    for line in raw.decode().splitlines():
        if not line.startswith("data: {"):
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices") or []:
            text.append((choice.get("delta") or {}).get("content") or "")
        usage = event.get("usage") or usage
    return "".join(text), usage


@pytest.fixture
async def proxy(llama_server: LlamaServer) -> AsyncIterator[tuple[str, list[Exchange]]]:
    """A recording HTTP proxy on 127.0.0.1 in front of llama-server: (its /v1 URL, exchanges)."""
    exchanges: list[Exchange] = []
    # A new connection per request: llama-server closes a connection after a streamed response
    # despite its Keep-Alive header, and a reused one would fail the proxy's forward.
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True))

    async def forward(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = {"Content-Type": request.headers.get("Content-Type", "application/json")}
        async with session.request(
            request.method, llama_server.root + request.path_qs, data=body, headers=headers
        ) as up:
            response = web.StreamResponse(status=up.status)
            response.content_type = up.content_type
            await response.prepare(request)
            chunks = []
            async for chunk in up.content.iter_any():
                chunks.append(chunk)
                await response.write(chunk)
            await response.write_eof()
        if request.path.endswith("/chat/completions") and up.status == 200:
            exchanges.append(Exchange(json.loads(body), *parse_reply(b"".join(chunks))))
        return response

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", forward)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/v1", exchanges
    finally:
        await runner.cleanup()
        await session.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A controller and one agent, real processes; the controller's address."""
    logs = tmp_path_factory.mktemp("stack")
    procs: list[Proc] = []
    try:
        ctl = Proc("controller", "--listen", "127.0.0.1:0", "--db", str(logs / "runs.db"), log=logs / "controller.log")
        procs.append(ctl)
        address = ctl.wait_line("listening on").rsplit(" ", 1)[-1]
        procs.append(Proc("agent", "--controller", address, "--name", "llama-traffic", log=logs / "agent.log"))
        wait_for_agents(address)
        yield address
    finally:
        codes = [p.stop() for p in reversed(procs)]
        assert codes == [0] * len(procs), f"processes did not exit cleanly: {codes}"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.json")


async def cli(*args: str, timeout_s: float = 75) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class ServerTokens:
    """llama-server's own view of a chat body: its template (`/apply-template`) and its
    tokenizer (`/tokenize`, with the BOS the server adds to a prompt)."""

    def __init__(self, server: LlamaServer) -> None:
        self.root = server.root

    def _post(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        request = urllib.request.Request(
            self.root + path, json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=10) as r:
            return dict(json.loads(r.read()))

    def tokenize(self, text: str, add_special: bool = False) -> list[int]:
        return list(self._post("/tokenize", {"content": text, "add_special": add_special})["tokens"])

    def prompt_tokens(self, messages: list[dict[str, str]]) -> int:
        """The tokens of the prompt these messages become."""
        prompt = self._post("/apply-template", {"messages": messages})["prompt"]
        return len(self.tokenize(prompt, add_special=True))

    def content_tokens(self, messages: list[dict[str, str]], index: int) -> int:
        """Tokens of message `index`'s content where it stands in the prompt: the prompt's
        tokens minus those of the same prompt with that content empty (the template's text
        around a content never merges with it in this vocabulary)."""
        emptied = [dict(m, content="") if i == index else m for i, m in enumerate(messages)]
        return self.prompt_tokens(messages) - self.prompt_tokens(emptied)


def run_exchanges(exchanges: list[Exchange]) -> list[Exchange]:
    """The run's requests, without the preflight check's."""
    return [e for e in exchanges if e.messages[-1]["content"] != PREFLIGHT_PROMPT]


def server_metrics_of(stage: dict[str, Any]) -> dict[str, Any]:
    return dict(stage.get("server_metrics") or {})


def test_the_tiny_tokenizer_encodes_as_llama_server_does(llama_server: LlamaServer, tokenizer_path: Path) -> None:
    # The premise of the exactness checks below: the tokenizer.json written from the GGUF's
    # vocabulary gives llama-server's own ids for a text where it stands in a prompt (after a
    # newline, as a chat template puts it: llama.cpp prepends a space only at the prompt's start).
    tokenizer = Tokenizer.from_path(tokenizer_path)
    server = ServerTokens(llama_server)
    rng = random.Random(18)
    alphabet = string.ascii_letters + string.digits + " .,;:!?'-\n\té€日"
    texts = [PREFLIGHT_PROMPT, " of to in", "Hello  there,\tfriend!", " zz ZZ z9 \u00e9t\u00e9"]
    texts += ["".join(rng.choices(alphabet, k=rng.randint(1, 60))) for _ in range(30)]
    newline = server.tokenize("\n")
    for text in texts:
        ids = server.tokenize("\n" + text)
        assert ids[: len(newline)] == newline
        assert tokenizer.encode(text) == ids[len(newline) :], text


async def test_conversations_carry_the_history_and_hit_the_slot_cache(
    stack: str, proxy: tuple[str, list[Exchange]], llama_server: LlamaServer, tokenizer_path: Path
) -> None:
    target, exchanges = proxy
    turns, budget, user_tokens, system_tokens = 3, 12, 16, 24
    code, out, err = await cli(
        "run",
        "--controller",
        stack,
        "--target",
        target,
        "--model",
        MODEL_ALIAS,
        "--turns",
        str(turns),
        "--think-time",
        "10ms-40ms",
        "--input-tokens",
        str(user_tokens),
        "--output-tokens",
        "6",
        "--system-prompt-tokens",
        str(system_tokens),
        "--concurrency",
        "2",
        "--requests",
        str(budget),
        "--seed",
        "18",
        "--server-metrics",
        llama_server.metrics_url,
        "--tokenizer",
        str(tokenizer_path),
        "--json",
    )
    assert code == 0, err[-3000:]
    result = json.loads(out)
    (stage,) = result["stages"]

    # What reached the server: each turn k > 1 is turn k-1's messages, the server's reply to
    # it verbatim, and a new user prompt of exactly `user_tokens` of the server's tokens.
    server = ServerTokens(llama_server)
    sent = run_exchanges(exchanges)
    assert len(sent) == budget
    by_messages = {json.dumps(e.messages): e for e in sent}
    for e in sent:
        m = e.messages
        assert m[0]["role"] == "system" and server.content_tokens(m, 0) == system_tokens
        assert m[-1]["role"] == "user" and server.content_tokens(m, len(m) - 1) == user_tokens
        # usage.prompt_tokens is the whole rendered history, counted by the server.
        assert e.usage["prompt_tokens"] == server.prompt_tokens(m), e.usage
        if len(m) == 2:
            continue
        previous = by_messages[json.dumps(m[:-2])]
        assert m[-2] == {"role": "assistant", "content": previous.reply}
        # The prompt grew by the previous reply, the new prompt and their two messages' template.
        empty_pair = [{"role": "assistant", "content": ""}, {"role": "user", "content": ""}]
        pair_template = server.prompt_tokens([*m[:-2], *empty_pair]) - previous.usage["prompt_tokens"]
        reply_tokens = server.content_tokens(m, len(m) - 2)
        grew = e.usage["prompt_tokens"] - previous.usage["prompt_tokens"]
        assert grew == reply_tokens + user_tokens + pair_template, (grew, reply_tokens, pair_template)

    # Results by turn: the requests of each turn index the server saw; sessions completed:
    # those whose last turn it answered. (Two sessions at a time share the budget of turns,
    # so the last sessions started may be cut short.)
    turn_of = [sum(m["role"] == "user" for m in e.messages) for e in sent]
    by_turn = {t["turn"]: t for t in stage["turns"]}
    assert sorted(by_turn) == list(range(1, turns + 1))
    for k, t in by_turn.items():
        assert t["requests_ok"] == turn_of.count(k) > 0 and not t.get("requests_failed"), t
    completed = turn_of.count(turns)
    assert stage["sessions_completed"] == completed >= 2
    assert stage["session_duration"]["count"] == completed
    # A turn's mean prompt is the server's count of its requests' prompts (history included).
    for k, t in by_turn.items():
        prompts = [e.usage["prompt_tokens"] for e, turn in zip(sent, turn_of, strict=True) if turn == k]
        assert t["mean_input_tokens"] == pytest.approx(sum(prompts) / len(prompts))
    means = [by_turn[k]["mean_input_tokens"] for k in range(1, turns + 1)]
    assert means == sorted(means) and means[0] < means[-1], means
    # The template overhead the run measured is llama-server's for the preflight's message.
    preflight = [{"role": "user", "content": PREFLIGHT_PROMPT}]
    overhead = server.prompt_tokens(preflight) - server.content_tokens(preflight, 0)
    assert result["tokens"]["exact"] is True and result["tokens"]["template_overhead_tokens"] == overhead

    # llama-server's slot cache: each later turn reuses its history. The client's view, from
    # usage.prompt_tokens_details.cached_tokens, by turn and over the stage...
    for k in range(2, turns + 1):
        assert by_turn[k]["prefix_cache_hit_percent"] > 0, by_turn[k]
    cached = sum(e.usage["prompt_tokens_details"]["cached_tokens"] for e in sent)
    prompt = sum(e.usage["prompt_tokens"] for e in sent)
    assert stage["cached_prompt_tokens"] == cached > 0
    assert stage["prefix_cache_hit_percent"] == pytest.approx(100 * cached / prompt)
    # ... and the server's, from its counters over the stage: the same tokens.
    sm = server_metrics_of(stage)
    assert sm["prefix_cache_source"] == LLAMA_CACHE_SOURCE
    assert sm["prefix_cache_hit_percent"] == pytest.approx(stage["prefix_cache_hit_percent"], abs=0.01)

    # The human form of the same result: the by-turn table and the exact-token note.
    run_id = result["run_id"]
    code, shown, err = await cli("runs", "result", run_id, "--controller", stack)
    assert code == 0, err[-3000:]
    assert " by turn" in shown, shown
    assert f"sessions completed {completed}," in shown, shown
    assert "tokens: exact:" in shown, shown


async def test_prompts_are_exactly_n_tokens_and_the_template_overhead_is_the_servers(
    stack: str, proxy: tuple[str, list[Exchange]], llama_server: LlamaServer, tokenizer_path: Path
) -> None:
    # Single-turn prompts of two prefix groups, with the model's tokenizer.
    target, exchanges = proxy
    input_tokens, prefix_tokens, requests = 48, 32, 16
    code, out, err = await cli(
        "run",
        "--controller",
        stack,
        "--target",
        target,
        "--model",
        MODEL_ALIAS,
        "--input-tokens",
        str(input_tokens),
        "--output-tokens",
        "4",
        "--shared-prefix",
        str(prefix_tokens),
        "--prefix-groups",
        "2",
        "--concurrency",
        "2",
        "--requests",
        str(requests),
        "--seed",
        "18",
        "--server-metrics",
        llama_server.metrics_url,
        "--tokenizer",
        str(tokenizer_path),
    )
    assert code == 0, err[-3000:]
    server = ServerTokens(llama_server)
    tokenizer = Tokenizer.from_path(tokenizer_path)

    # What the chat template adds, as llama-server renders and counts the preflight's message.
    preflight = [{"role": "user", "content": PREFLIGHT_PROMPT}]
    overhead = server.prompt_tokens(preflight) - server.content_tokens(preflight, 0)
    assert tokenizer.count(PREFLIGHT_PROMPT) == server.content_tokens(preflight, 0)
    assert overhead > 0
    assert f"the chat template adds {overhead}" in " ".join(out.split()), out  # the caption wraps
    assert "server hit %" in out, out  # the prefix-cache table

    sent = run_exchanges(exchanges)
    assert len(sent) == requests
    prefixes = set()
    for e in sent:
        (message,) = e.messages
        assert server.content_tokens([message], 0) == input_tokens
        assert e.usage["prompt_tokens"] == input_tokens + overhead
        ids = tokenizer.encode(message["content"])
        prefixes.add(tuple(ids[:prefix_tokens]))
    assert len(prefixes) == 2  # the two groups (16 uniform draws: both, all but surely)

    run_id = next(w for w in out.split() if w.startswith("run_"))
    code, shown, err = await cli("runs", "result", run_id, "--controller", stack, "--json")
    assert code == 0, err[-3000:]
    result = json.loads(shown)
    assert result["tokens"]["exact"] is True
    assert result["tokens"]["template_overhead_tokens"] == overhead
    (stage,) = result["stages"]
    # The slots keep each group's prefix: hits on both sides, the same tokens.
    cached = sum(e.usage["prompt_tokens_details"]["cached_tokens"] for e in sent)
    assert stage["cached_prompt_tokens"] == cached > 0
    sm = server_metrics_of(stage)
    assert sm["prefix_cache_source"] == LLAMA_CACHE_SOURCE
    prompt = sum(e.usage["prompt_tokens"] for e in sent)
    assert stage["prefix_cache_hit_percent"] == pytest.approx(100 * cached / prompt)
    assert sm["prefix_cache_hit_percent"] == pytest.approx(stage["prefix_cache_hit_percent"], abs=0.01)
