"""Server styles: the mock streams the way a named real server does.

OpenAI-compatible servers agree on the JSON of a streamed completion but not on the details a
load tester must get right: whether a role-only chunk comes first and what its content is,
where usage arrives (if at all), how many tokens one event carries, which text field is used,
and how the bytes are framed and written. A style reproduces one server's stream so the
agent's measurements can be checked against each. Non-streamed answers are OpenAI's shape in
every style (`reasoning` adds `message.reasoning_content`).

* `openai` (default): OpenAI's API. A chat stream opens with a role chunk whose content is
  `""`; each token is one event; the last token's event carries `finish_reason`; with
  `stream_options.include_usage` a usage chunk with `choices: []` follows; then
  `data: [DONE]`. Completions streams have no role chunk.
* `vllm`: vLLM's OpenAI server. As `openai`, with `"logprobs": null` in every choice,
  `"stop_reason": null` beside the finish reason (on every completions chunk), and, when
  usage was asked for, `"usage": null` on every chunk (vLLM sets the field to None and dumps
  with `exclude_unset`); the final usage chunk has `choices: []` and vLLM's key order
  (`prompt_tokens`, `total_tokens`, `completion_tokens`).
* `sglang`: SGLang's server. Pydantic models dumped whole, so every chunk carries
  `"usage": null` and null `role`/`reasoning_content`/`tool_calls`/`matched_stop`. The last
  token's event has no finish reason: a separate chunk follows whose one choice has an empty
  delta (`"text": ""` on completions) and the finish reason, and which carries the usage when
  asked for: usage on a chunk whose `choices` is *not* empty.
* `tgi`: Hugging Face text-generation-inference's Messages API. axum's SSE framing
  `data:{...}` (no space after the colon); no role-only chunk, every chunk repeats
  `"role": "assistant"` next to its token; `"id": ""` and a `system_fingerprint`; no usage
  while streaming even when asked (TGI before it honoured `stream_options`), so a client must
  estimate output tokens from text events; ends with `data:[DONE]`. No keep-alive comments:
  axum sends those only after 15 s without an event.
* `llamacpp`: llama.cpp's `llama-server`. nlohmann JSON in llama.cpp's key order (`choices`
  first, `object` last); a chat stream opens with `{"role": "assistant", "content": null}`;
  the last token's event has no finish reason: a final chunk with `"delta": {}` carries it,
  together with `usage` (sent whether asked for or not, as b6000-era builds do; newer builds
  move it to a `choices: []` chunk when asked) and a `timings` object (prompt and generation
  times measured by the mock). On the completions endpoint that final chunk is
  `{"text": "", ..., "finish_reason": ...}` with `usage` and `timings`. No comment lines.
* `litellm`: a proxy in front of the model (LiteLLM, or any server built on sse-starlette):
  OpenAI's events re-framed with `\\r\\n` line endings, `: ping - <time>` comment events
  (right after the headers and every eighth event), and every event written in three pieces
  on successive event-loop passes, so reads end in the middle of a line, as they do behind
  proxies that re-chunk the upstream bytes. Slower than the other styles.
* `multi_token`: a server that sends several tokens per event (speculative decoding,
  multi-token prediction, or a server that coalesces output): each event carries 4 tokens,
  one decode step of `4 x itl` after the previous; the last may carry fewer. Usage is exact,
  so ITL (per event) and TPOT (per token) differ by the factor 4.
* `reasoning`: a reasoning model behind a reasoning parser (vLLM, SGLang): the first R tokens
  arrive as `delta.reasoning_content` (or `delta.reasoning`, newer vLLM's and OpenRouter's
  name: `MockConfig.reasoning_field`), the rest as `delta.content`; both are generated text
  and usage counts all of them, with `completion_tokens_details.reasoning_tokens` = R.
  R is `MockConfig.reasoning_tokens` (at most all tokens but the last, which is always
  answer), or half the tokens (rounded down) when not set (`reasoning_tokens()`). With one
  token per event, the first reasoning token goes out at the TTFT and the first answer
  token R inter-token latencies later. Chat only; completions stream as `openai`.

Usage details: with the prefix cache on (`MockConfig.prefix_cache`) every usage object
carries `prompt_tokens_details.cached_tokens` (as vLLM with `--enable-prompt-tokens-details`,
SGLang with `--enable-cache-report` and llama-server do), and llama.cpp's `timings` add
`cache_n` (its `prompt_n` then counts only the uncached tokens).

Streaming is the hot path (hundreds of streams, tens of thousands of events a second), so an
encoder renders the few distinct events of one response once, when the response starts, with
a placeholder where the token goes; emitting a token is then a lookup, not a JSON dump.

Connection styles (`ConnectionStyle`, independent of the stream style) say what the server
does with a kept-alive connection, since real servers differ there too and a client that
reuses connections must cope:

* `keep_alive` (default): HTTP/1.1 keep-alive as aiohttp serves it.
* `close_after_response`: llama.cpp's `llama-server`. Every response advertises
  `Keep-Alive: timeout=5, max=100`, yet the server handles no further request on the
  connection and closes it `CLOSE_AFTER_RESPONSE_DELAY_S` after the response. A client that
  sends its next request at once on the pooled connection loses it before the server ever
  handled it, as the agent did against llama-server.
* `close_idle`: a server (or proxy) that closes idle connections earlier than it advertises
  (`Keep-Alive: timeout=5`): a request arriving on a connection idle for more than
  `IDLE_CLOSE_S` meets a connection the server has just closed, so it is dropped unread
  (reset). This is the race of an idle timeout with a client's request, made deterministic.

Requests dropped this way never reach the model: `/stats` does not count them.
"""

from __future__ import annotations

import datetime
import json
import math
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, Literal, NamedTuple, get_args

from mockserver.generation import VOCABULARY, Endpoint, FinishReason
from mockserver.wire import ID_PREFIX, OBJECT_CHUNK, dumps, usage_counts, with_details

ReasoningField = Literal["reasoning_content", "reasoning"]
REASONING_FIELDS: tuple[ReasoningField, ...] = get_args(ReasoningField)

Style = Literal["openai", "vllm", "sglang", "tgi", "llamacpp", "litellm", "multi_token", "reasoning"]
STYLES: tuple[Style, ...] = get_args(Style)

ConnectionStyle = Literal["keep_alive", "close_after_response", "close_idle"]
CONNECTION_STYLES: tuple[ConnectionStyle, ...] = get_args(ConnectionStyle)
# What `close_after_response` and `close_idle` advertise (llama-server's header).
ADVERTISED_KEEP_ALIVE = "timeout=5, max=100"
# Long enough for a client's next request to go out on the connection before the close
# reaches it, as llama-server's close does (BENCHMARKS.md, "Figures behind constants in the
# code"), even on a busy host.
CLOSE_AFTER_RESPONSE_DELAY_S = 0.005
IDLE_CLOSE_S = 0.1

# Token events are rendered with this placeholder string where the token's text goes.
_HOLE = "\x00"
_HOLE_JSON = json.dumps(_HOLE).encode()
_VOCABULARY_JSON = tuple(json.dumps(word).encode() for word in VOCABULARY)
_TGI_FINGERPRINT = "2.0.4-native"
_LLAMACPP_FINGERPRINT = "b6097-9515c613"


class TokenEvents(NamedTuple):
    """The pre-rendered token events of one streamed response.

    Event `j` of `event_count` is `table[j % len(table)]`, except the last, which is `last`.
    Every event carries `tokens_per_event` tokens except the last, which carries `last_tokens`.
    """

    table: tuple[bytes, ...]
    last: bytes
    event_count: int
    tokens_per_event: int
    last_tokens: int


@dataclass(frozen=True)
class StreamSummary:
    """What the closing events of a finished stream may report.

    Attributes:
        prompt_tokens: Prompt length.
        completion_tokens: Output length as the server reports it (under-reporting applied).
        finish_reason: Why generation stopped.
        prompt_ms: From the request being read to the first token (llama.cpp's `prompt_ms`).
        generation_ms: From the first token to the last (llama.cpp's `predicted_ms`).
        cached_tokens: Prompt tokens found in the prefix cache (None: no prefix cache, and
            no `prompt_tokens_details` in the usage).
        reasoning_tokens: Output tokens sent as reasoning (None: not a reasoning answer, and
            no `completion_tokens_details` in the usage).
    """

    prompt_tokens: int
    completion_tokens: int
    finish_reason: FinishReason
    prompt_ms: float
    generation_ms: float
    cached_tokens: int | None = None
    reasoning_tokens: int | None = None


class StreamEncoder:
    """Renders one streamed response as OpenAI does (the `openai` style); styles subclass it.

    A stream is `opening()` (written as soon as the response starts), then the token events
    of `token_events()` (written one per deadline), then `closing()`. A style with
    `split_writes` has each of them written in the pieces `pieces()` cuts it into.
    """

    tokens_per_event: ClassVar[int] = 1
    split_writes: ClassVar[bool] = False
    reasons: ClassVar[bool] = False  # the first `reasoning_tokens()` tokens are reasoning
    _data: ClassVar[bytes] = b"data: "
    _end: ClassVar[bytes] = b"\n\n"

    def __init__(
        self,
        endpoint: Endpoint,
        model: str,
        *,
        include_usage: bool,
        response_id: str | None = None,
        created: int | None = None,
        vocabulary: Sequence[str] = VOCABULARY,
        reasoning_tokens: int | None = None,
        reasoning_field: ReasoningField = "reasoning_content",
    ) -> None:
        self._endpoint = endpoint
        self._chat = endpoint == "chat"
        self._model = model
        self._include_usage = include_usage
        self._id = response_id if response_id is not None else self._new_id()
        self._created = created if created is not None else int(time.time())
        self._words = tuple(vocabulary)
        self._words_json = (
            _VOCABULARY_JSON if self._words == VOCABULARY else tuple(json.dumps(w).encode() for w in self._words)
        )
        self._reasoning_setting = reasoning_tokens
        self._reasoning_field = reasoning_field

    def opening(self) -> bytes:
        """The events sent before any token: the chat role chunk (b"" for none)."""
        if not self._chat:
            return b""
        return self._event(self._chunk([self._role_choice()]))

    def token_events(self, tokens: int, finish_reason: FinishReason) -> TokenEvents:
        """The events carrying `tokens` output tokens (token i is `vocabulary[i % len]`)."""
        per_event = self.tokens_per_event
        head, tail = self._halves(self._token_choice(_HOLE, None))
        if per_event == 1:  # every style but one: the per-response cost of the hot path
            table = tuple(head + word + tail for word in self._words_json)
        else:
            # Event j starts at token j * per_event, so events repeat with this period.
            size = len(self._words)
            period = size // math.gcd(size, per_event)
            table = tuple(head + self._text_json(m * per_event, per_event) + tail for m in range(period))
        count = -(-tokens // per_event)
        last_start = (count - 1) * per_event
        head, tail = self._halves(self._token_choice(_HOLE, self._last_token_finish(finish_reason)))
        last = head + self._text_json(last_start, tokens - last_start) + tail
        return TokenEvents(table, last, count, per_event, tokens - last_start)

    def closing(self, summary: StreamSummary) -> bytes:
        """The events after the last token: usage (when asked for), then `[DONE]`."""
        usage = b""
        if self._include_usage:
            usage = self._event(self._chunk([], usage=self._usage(summary)))
        return usage + self._done()

    def pieces(self, data: bytes) -> tuple[bytes, ...]:
        """How `data` is written: in one piece, unless the style splits writes."""
        return (data,)

    # --- shapes a style overrides ----------------------------------------------------------

    def _new_id(self) -> str:
        return ID_PREFIX[self._endpoint] + uuid.uuid4().hex

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {
            "id": self._id,
            "object": OBJECT_CHUNK[self._endpoint],
            "created": self._created,
            "model": self._model,
            "choices": choices,
            **extra,
        }

    def _role_choice(self) -> dict[str, Any]:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}

    def _token_choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        if self._chat:
            return {"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _last_token_finish(self, finish_reason: FinishReason) -> FinishReason | None:
        """The finish reason on the last token's event (None: it comes on a later chunk)."""
        return finish_reason

    def _usage(self, summary: StreamSummary) -> dict[str, Any]:
        """The usage object: the style's counts, then the details the summary has."""
        return with_details(self._counts(summary), summary.cached_tokens, summary.reasoning_tokens)

    def _counts(self, summary: StreamSummary) -> dict[str, Any]:
        return usage_counts(summary.prompt_tokens, summary.completion_tokens)

    # --- rendering -------------------------------------------------------------------------

    def _event(self, payload: dict[str, Any]) -> bytes:
        return self._data + dumps(payload) + self._end

    def _done(self) -> bytes:
        return self._data + b"[DONE]" + self._end

    def _halves(self, choice: dict[str, Any]) -> tuple[bytes, bytes]:
        """A token event rendered once around the placeholder: (before, after) the token."""
        head, hole, tail = self._event(self._chunk([choice])).partition(_HOLE_JSON)
        assert hole and _HOLE_JSON not in tail, "a token event has exactly one placeholder"
        return head, tail

    def _text_json(self, start: int, tokens: int) -> bytes:
        """The JSON string of output tokens `start` to `start + tokens`."""
        size = len(self._words)
        if tokens == 1:
            return self._words_json[start % size]
        return json.dumps("".join(self._words[i % size] for i in range(start, start + tokens))).encode()


class VLLMEncoder(StreamEncoder):
    """vLLM: `logprobs`/`stop_reason` nulls, `"usage": null` on every chunk when asked."""

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        chunk = super()._chunk(choices)
        if self._include_usage:
            chunk["usage"] = None
        chunk.update(extra)
        return chunk

    def _role_choice(self) -> dict[str, Any]:
        return {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}

    def _token_choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        if self._chat:
            choice: dict[str, Any] = {"index": 0, "delta": {"content": text}, "logprobs": None}
            choice["finish_reason"] = finish_reason
            if finish_reason is not None:
                choice["stop_reason"] = None
            return choice
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason, "stop_reason": None}

    def _counts(self, summary: StreamSummary) -> dict[str, Any]:
        prompt, completion = summary.prompt_tokens, summary.completion_tokens
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion}


class SGLangEncoder(StreamEncoder):
    """SGLang: whole pydantic dumps; finish reason and usage on a chunk after the last token."""

    def _new_id(self) -> str:
        return uuid.uuid4().hex

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {**super()._chunk(choices), "usage": None, **extra}

    def _role_choice(self) -> dict[str, Any]:
        delta = {"role": "assistant", "content": "", "reasoning_content": None, "tool_calls": None}
        return self._choice({"delta": delta}, None)

    def _token_choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        if self._chat:
            delta = {"role": None, "content": text, "reasoning_content": None, "tool_calls": None}
            return self._choice({"delta": delta}, finish_reason)
        return self._choice({"text": text}, finish_reason)

    def _last_token_finish(self, finish_reason: FinishReason) -> FinishReason | None:
        return None

    def closing(self, summary: StreamSummary) -> bytes:
        body: dict[str, Any] = {"delta": {}} if self._chat else {"text": ""}
        usage = self._usage(summary) if self._include_usage else None
        return self._event(self._chunk([self._choice(body, summary.finish_reason)], usage=usage)) + self._done()

    @staticmethod
    def _choice(body: dict[str, Any], finish_reason: FinishReason | None) -> dict[str, Any]:
        return {"index": 0, **body, "logprobs": None, "finish_reason": finish_reason, "matched_stop": None}


class TGIEncoder(StreamEncoder):
    """TGI: `data:` without a space, role on every chunk, no role chunk and no usage."""

    _data = b"data:"

    def _new_id(self) -> str:
        return ""

    def opening(self) -> bytes:
        return b""

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        if self._chat:
            return {
                "object": "chat.completion.chunk",
                "id": self._id,
                "created": self._created,
                "model": self._model,
                "system_fingerprint": _TGI_FINGERPRINT,
                "choices": choices,
            }
        return {
            "id": self._id,
            "object": "text_completion",
            "created": self._created,
            "choices": choices,
            "model": self._model,
            "system_fingerprint": _TGI_FINGERPRINT,
        }

    def _token_choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        if self._chat:
            delta = {"role": "assistant", "content": text}
            return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def closing(self, summary: StreamSummary) -> bytes:
        return self._done()


class LlamaCppEncoder(StreamEncoder):
    """llama.cpp's llama-server: its key order; finish, usage and timings on a final chunk."""

    def _new_id(self) -> str:
        return "chatcmpl-" + uuid.uuid4().hex

    def _chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        if self._chat:
            return {
                "choices": choices,
                "created": self._created,
                "id": self._id,
                "model": self._model,
                "system_fingerprint": _LLAMACPP_FINGERPRINT,
                "object": "chat.completion.chunk",
                **extra,
            }
        # The completions endpoint puts `id` last, after `usage` when there is one.
        chunk = {
            "choices": choices,
            "created": self._created,
            "model": self._model,
            "system_fingerprint": _LLAMACPP_FINGERPRINT,
            "object": "text_completion",
        }
        if "usage" in extra:
            chunk["usage"] = extra.pop("usage")
        return {**chunk, "id": self._id, **extra}

    def _role_choice(self) -> dict[str, Any]:
        return {"finish_reason": None, "index": 0, "delta": {"role": "assistant", "content": None}}

    def _token_choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        if self._chat:
            return {"finish_reason": finish_reason, "index": 0, "delta": {"content": text}}
        return {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}

    def _last_token_finish(self, finish_reason: FinishReason) -> FinishReason | None:
        return None

    def closing(self, summary: StreamSummary) -> bytes:
        if self._chat:
            choice: dict[str, Any] = {"finish_reason": summary.finish_reason, "index": 0, "delta": {}}
        else:
            choice = {"text": "", "index": 0, "logprobs": None, "finish_reason": summary.finish_reason}
        final = self._chunk([choice], usage=self._usage(summary), timings=_llamacpp_timings(summary))
        return self._event(final) + self._done()

    def _counts(self, summary: StreamSummary) -> dict[str, Any]:
        prompt, completion = summary.prompt_tokens, summary.completion_tokens
        return {"completion_tokens": completion, "prompt_tokens": prompt, "total_tokens": prompt + completion}


def _llamacpp_timings(summary: StreamSummary) -> dict[str, Any]:
    """llama.cpp's `timings`; a rate over zero is null, as nlohmann dumps inf and NaN.

    With a prefix cache, `cache_n` counts the prompt tokens reused and `prompt_n` the rest."""
    cached = summary.cached_tokens
    prompt_n, prompt_ms = summary.prompt_tokens - (cached or 0), round(summary.prompt_ms, 3)
    predicted_n, predicted_ms = summary.completion_tokens, round(summary.generation_ms, 3)
    timings: dict[str, Any] = {} if cached is None else {"cache_n": cached}
    return {
        **timings,
        "prompt_n": prompt_n,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": _ratio(prompt_ms, prompt_n),
        "prompt_per_second": _ratio(1e3 * prompt_n, prompt_ms),
        "predicted_n": predicted_n,
        "predicted_ms": predicted_ms,
        "predicted_per_token_ms": _ratio(predicted_ms, predicted_n),
        "predicted_per_second": _ratio(1e3 * predicted_n, predicted_ms),
    }


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator else None


class LiteLLMEncoder(StreamEncoder):
    """A proxy: `\\r\\n` line endings, `: ping` comments, each event written in three pieces."""

    split_writes = True
    _end = b"\r\n\r\n"

    def __init__(
        self,
        endpoint: Endpoint,
        model: str,
        *,
        include_usage: bool,
        response_id: str | None = None,
        created: int | None = None,
        vocabulary: Sequence[str] = VOCABULARY,
        reasoning_tokens: int | None = None,
        reasoning_field: ReasoningField = "reasoning_content",
    ) -> None:
        super().__init__(
            endpoint,
            model,
            include_usage=include_usage,
            response_id=response_id,
            created=created,
            vocabulary=vocabulary,
            reasoning_tokens=reasoning_tokens,
            reasoning_field=reasoning_field,
        )
        when = datetime.datetime.fromtimestamp(self._created, datetime.UTC)
        self._ping = b": ping - " + str(when).encode() + self._end  # as sse-starlette words it

    def opening(self) -> bytes:
        return self._ping + super().opening()

    def token_events(self, tokens: int, finish_reason: FinishReason) -> TokenEvents:
        events = super().token_events(tokens, finish_reason)
        # The table repeats every eighth event; one entry in it is preceded by a ping.
        pinged = len(events.table) // 2
        table = tuple(self._ping + e if m == pinged else e for m, e in enumerate(events.table))
        return TokenEvents(table, events.last, events.event_count, events.tokens_per_event, events.last_tokens)

    def pieces(self, data: bytes) -> tuple[bytes, ...]:
        """Comment events whole; every `data:` event cut in three, inside its line."""
        out: list[bytes] = []
        for body in data.split(self._end)[:-1]:
            event = body + self._end
            if event.startswith(b":"):
                out.append(event)
            else:
                third = len(event) // 3
                out += [event[:third], event[third : 2 * third], event[2 * third :]]
        return tuple(out)


class MultiTokenEncoder(StreamEncoder):
    """Four tokens per event."""

    tokens_per_event = 4


class ReasoningEncoder(StreamEncoder):
    """The first R tokens as `reasoning_content` (or `reasoning`), the rest as `content` (chat)."""

    reasons = True

    def token_events(self, tokens: int, finish_reason: FinishReason) -> TokenEvents:
        if not self._chat:
            return super().token_events(tokens, finish_reason)
        reasoning = reasoning_tokens(tokens, self._reasoning_setting)
        think = {"index": 0, "delta": {self._reasoning_field: _HOLE}, "finish_reason": None}
        think_head, think_tail = self._halves(think)
        head, tail = self._halves(self._token_choice(_HOLE, None))
        words = self._words_json
        size = len(words)
        thinking = tuple(think_head + words[i % size] + think_tail for i in range(size))
        answer = tuple(head + words[i % size] + tail for i in range(size))
        # Not periodic: the table holds every event but the last (which is always content).
        table = tuple(thinking[i % size] if i < reasoning else answer[i % size] for i in range(tokens - 1))
        head, tail = self._halves(self._token_choice(_HOLE, finish_reason))
        last = head + words[(tokens - 1) % size] + tail
        return TokenEvents(table, last, tokens, 1, 1)


def reasoning_tokens(tokens: int, configured: int | None = None) -> int:
    """How many of `tokens` output tokens the `reasoning` style sends as reasoning: the
    configured count, at most all but the last token; half of them when not configured."""
    if configured is None:
        return tokens // 2
    return max(0, min(configured, tokens - 1))


ENCODERS: dict[Style, type[StreamEncoder]] = {
    "openai": StreamEncoder,
    "vllm": VLLMEncoder,
    "sglang": SGLangEncoder,
    "tgi": TGIEncoder,
    "llamacpp": LlamaCppEncoder,
    "litellm": LiteLLMEncoder,
    "multi_token": MultiTokenEncoder,
    "reasoning": ReasoningEncoder,
}
