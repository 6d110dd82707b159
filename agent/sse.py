"""Parsing of OpenAI-compatible response bodies into a `RequestSample`.

`StreamParser` consumes a server-sent-events body incrementally, one network read at a time,
each read stamped with the `perf_counter_ns()` reading taken when its bytes arrived; it never
does I/O, so tests feed it byte chunks directly. `parse_json_body` handles the non-streaming
answer. Definitions follow METRICS.md:

* `first_byte`: the first body bytes.
* a *text-carrying event* is a `data:` event with a non-empty delta `content`,
  `reasoning_content` or `reasoning` (chat) or `text` (completions). The first chat chunk
  that only announces the role (content null or "") is not one.
* an *answer event* carries `content` (chat) or `text` (completions); a *reasoning event*
  carries `reasoning_content` (DeepSeek, older vLLM) or `reasoning` (newer vLLM, OpenRouter)
  and no `content` (a delta with both counts as an answer event: no server sends one, and
  looking for reasoning only where `content` is empty keeps the answer path at one lookup).
* `first_token` / `last_token`: the first / last text-carrying event; every gap between
  consecutive ones is an ITL value. `first_reasoning` / `first_answer`: the first reasoning /
  answer event (`first_token` is the earlier of the two: TTFT is unchanged by reasoning).
* `done`: the `[DONE]` event, or the end of the stream when the server sent a
  `finish_reason` but no `[DONE]`; a stream with neither is a protocol error.
* usage: from any event with a non-null `usage` object (the final chunk usually has
  `choices: []`); with none, output tokens = number of text-carrying events (estimated).
  Reasoning tokens: `usage.completion_tokens_details.reasoning_tokens` when given, else the
  number of reasoning events; cached prompt tokens: `usage.prompt_tokens_details.cached_tokens`
  (`cached_reported` says the server gave it). Both are capped at output / prompt tokens.
* answer text: when `sample.answer_chunks` is a list, every answer event's text is appended
  to it (reasoning is not: a conversation's next turn carries the answer only).

Each `data:` line is taken as one event (OpenAI-compatible servers put each JSON chunk on
one line; multi-line `data:` events are not used by them). An event is stamped with the
read that completed its line, since that is when the whole event had arrived. Only `data:`
lines whose payload starts with `{` are JSON-decoded (with orjson, faster than `json` here:
BENCHMARKS.md, section 1): keep-alive comments, `event:`/`id:` fields and blank lines cost
one slice comparison each. (Recognising plain token chunks from their bytes instead of decoding them
was measured too: the handful of `bytes.count` scans it takes cost more than orjson's
decode of a ~150-byte chunk.)
"""

from __future__ import annotations

import json
from typing import Any

import orjson

from agent.sample import MAX_ERROR_CHARS, RequestSample
from common.proto.loadtest.v1 import run_pb2

_PROTOCOL = run_pb2.REQUEST_STATUS_PROTOCOL
_OK = run_pb2.REQUEST_STATUS_OK

# A line longer than this without a newline is not SSE from a model server; refusing it
# bounds the memory one misbehaving response can take.
MAX_LINE_BYTES = 1 << 20

_loads = orjson.loads
_DecodeError = orjson.JSONDecodeError  # a ValueError; also raised for invalid UTF-8


def error_message(error: Any) -> str:
    """A short description of an OpenAI-style `error` value (object or string)."""
    if isinstance(error, dict):
        message = error.get("message")
        text = message if isinstance(message, str) and message else json.dumps(error)
    else:
        text = str(error)
    return text[:MAX_ERROR_CHARS]


def _apply_usage(sample: RequestSample, usage: Any) -> bool:
    """Token counts from a `usage` object; True if it gave the reasoning tokens."""
    prompt = usage.get("prompt_tokens")
    completion = usage.get("completion_tokens")
    if isinstance(completion, int) and completion >= 0:
        sample.output_tokens = completion
        sample.usage_from_server = True
    if isinstance(prompt, int) and prompt >= 0:
        sample.prompt_tokens = prompt
    prompt_details = usage.get("prompt_tokens_details")
    if isinstance(prompt_details, dict):
        cached = prompt_details.get("cached_tokens")
        if isinstance(cached, int) and not isinstance(cached, bool) and cached >= 0:
            sample.cached_prompt_tokens = cached
            sample.cached_reported = True
    details = usage.get("completion_tokens_details")
    if isinstance(details, dict):
        reasoning = details.get("reasoning_tokens")
        if isinstance(reasoning, int) and not isinstance(reasoning, bool) and reasoning >= 0:
            sample.reasoning_tokens = reasoning
            return True
    return False


def _cap_counts(sample: RequestSample) -> None:
    """Reasoning tokens are part of the output, cached prompt tokens part of the prompt: a
    server (or an estimate) saying otherwise is capped, so the sample stays possible."""
    sample.reasoning_tokens = min(sample.reasoning_tokens, sample.output_tokens)
    sample.cached_prompt_tokens = min(sample.cached_prompt_tokens, sample.prompt_tokens)


class StreamParser:
    """Incremental SSE parser writing timings, usage and outcome into one sample.

    Call `feed(chunk, arrival_ns)` for every read and `finish(eof_ns)` at the end of the
    body. After a protocol error or `[DONE]` further input is ignored (`closed` is true),
    so the caller may stop reading early.

    `feed` runs for every network read inside the connection's `data_received` (see
    `agent.stream`), tens of thousands of times a second: the common case (whole
    `data: {...}` lines, one chunk each) is inlined in `feed` and costs one `split`, one
    orjson decode and a handful of dict lookups per event.
    """

    __slots__ = (
        "_chat",
        "_chunks",
        "_finished",
        "_reasoning_events",
        "_reasoning_reported",
        "_sample",
        "_tail",
        "_text_events",
        "closed",
        "done",
    )

    def __init__(self, sample: RequestSample, *, chat: bool) -> None:
        self._sample = sample
        self._chat = chat
        self._chunks = sample.answer_chunks
        self._tail = b""
        self._text_events = 0
        self._reasoning_events = 0
        self._reasoning_reported = False
        self._finished = False
        # True once `[DONE]` or a protocol error was seen: further input is ignored.
        self.closed = False
        # True once the response completed normally (`[DONE]` seen).
        self.done = False

    @property
    def text_events(self) -> int:
        """Number of text-carrying events so far."""
        return self._text_events

    def feed(self, data: bytes, now_ns: int) -> None:
        """Consume one read of the body that arrived at `now_ns`."""
        sample = self._sample
        if not sample.first_byte_ns:
            sample.first_byte_ns = now_ns
        if self.closed:
            return
        if self._tail:
            data = self._tail + data
        lines = data.split(b"\n")
        self._tail = tail = lines.pop()
        for line in lines:
            if line[:7] == b"data: {":
                # The common case, inlined: one JSON chunk on one line.
                try:
                    event = _loads(line[6:])
                except _DecodeError:
                    self._protocol_error(f"malformed JSON in SSE event: {line[6:66]!r}", now_ns)
                    return
                try:
                    if self._event(event, now_ns):
                        return
                except (AttributeError, TypeError):
                    self._protocol_error(f"unexpected SSE event shape: {line[6:66]!r}", now_ns)
                    return
            elif line[:5] == b"data:":
                self._data_line(line, now_ns)
                if self.closed:
                    return
        if len(tail) > MAX_LINE_BYTES:
            self._protocol_error(f"SSE line longer than {MAX_LINE_BYTES} bytes", now_ns)

    def finish(self, now_ns: int) -> None:
        """The body ended at `now_ns`: settle the outcome and the token counts."""
        if not self.closed and self._tail:
            # A last line without its newline still counts: the body ended, so it is whole.
            tail, self._tail = self._tail, b""
            if tail.startswith(b"data:"):
                self._data_line(tail, now_ns)
        sample = self._sample
        if not self.closed:
            if self._finished:
                sample.done_ns = now_ns
                sample.status = _OK
            else:
                self._protocol_error("stream ended without [DONE] or finish_reason", now_ns)
        self.settle_tokens()

    def settle_tokens(self) -> None:
        """Without server usage, estimate output tokens as the number of text events (and
        reasoning tokens as the number of reasoning events, unless usage gave them)."""
        sample = self._sample
        if not sample.usage_from_server:
            sample.output_tokens = self._text_events
        if not self._reasoning_reported:
            sample.reasoning_tokens = self._reasoning_events
        _cap_counts(sample)

    def _data_line(self, line: bytes, now_ns: int) -> None:
        """Any `data:` line: `[DONE]`, JSON without the space after the colon, or junk."""
        payload = line[5:].strip()
        if payload == b"[DONE]":
            self._sample.done_ns = now_ns
            self._sample.status = _OK
            self.done = True
            self.closed = True
            return
        if not payload.startswith(b"{"):
            if payload:
                self._protocol_error(f"unexpected SSE data: {payload[:60]!r}", now_ns)
            return
        try:
            event = _loads(payload)
        except _DecodeError:
            self._protocol_error(f"malformed JSON in SSE event: {payload[:60]!r}", now_ns)
            return
        try:
            self._event(event, now_ns)
        except (AttributeError, TypeError):
            self._protocol_error(f"unexpected SSE event shape: {payload[:60]!r}", now_ns)

    def _event(self, event: Any, now_ns: int) -> bool:
        """Apply one decoded event; True if it closed the stream (an error event)."""
        get = event.get
        error = get("error")
        if error is not None:
            self._protocol_error(f"error event: {error_message(error)}", now_ns)
            return True
        choices = get("choices")
        if choices:
            answer = reasoning = False
            for choice in choices:
                if self._chat:
                    delta = choice.get("delta")
                    if delta:
                        content = delta.get("content")
                        if content:
                            answer = True
                            if self._chunks is not None:
                                self._chunks.append(content)
                        elif delta.get("reasoning_content") or delta.get("reasoning"):
                            reasoning = True
                else:
                    content = choice.get("text")
                    if content:
                        answer = True
                        if self._chunks is not None:
                            self._chunks.append(content)
                if choice.get("finish_reason"):
                    self._finished = True
            if answer or reasoning:
                sample = self._sample
                if sample.first_token_ns:
                    sample.itl_ns.append(now_ns - sample.last_token_ns)
                else:
                    sample.first_token_ns = now_ns
                sample.last_token_ns = now_ns
                self._text_events += 1
                if not answer:
                    self._reasoning_events += 1
                    if not sample.first_reasoning_ns:
                        sample.first_reasoning_ns = now_ns
                elif not sample.first_answer_ns:
                    sample.first_answer_ns = now_ns
        usage = get("usage")
        if usage and _apply_usage(self._sample, usage):
            self._reasoning_reported = True
        return False

    def _protocol_error(self, message: str, now_ns: int) -> None:
        # A failed response ends where the failure was seen: that is its `done`.
        sample = self._sample
        sample.fail(_PROTOCOL, message)
        if not sample.done_ns:
            sample.done_ns = now_ns
        self.closed = True


def parse_json_body(sample: RequestSample, body: bytes, *, chat: bool) -> None:
    """Fill outcome and usage from a non-streaming JSON answer.

    There are no token events, so `first_token`/`last_token` (and `first_reasoning` /
    `first_answer`) stay absent. Without server usage the output count is estimated as the
    number of words of the answer (reasoning included), which is what the word-per-token
    prompts make comparable; reasoning tokens likewise as the words of the reasoning, unless
    usage gives `completion_tokens_details.reasoning_tokens`. The answer text goes to
    `sample.answer_chunks` when that is a list.
    """
    try:
        answer = json.loads(body)
        if not isinstance(answer, dict):
            raise TypeError("not an object")
        error = answer.get("error")
        if error is not None:
            sample.fail(_PROTOCOL, f"error response: {error_message(error)}")
            return
        choices = answer.get("choices")
        if not isinstance(choices, list) or not choices:
            sample.fail(_PROTOCOL, "response has no choices")
            return
        words = reasoning_words = 0
        chunks = sample.answer_chunks
        for choice in choices:
            if chat:
                # Reasoning and answer are both generated text; newer vLLM sends the
                # reasoning as `reasoning` (and may repeat it as `reasoning_content`).
                message = choice.get("message") or {}
                content = message.get("content")
                thought = message.get("reasoning_content") or message.get("reasoning")
            else:
                content, thought = choice.get("text"), None
            if content:
                words += len(str(content).split())
                if chunks is not None:
                    chunks.append(str(content))
            if thought:
                reasoning_words += len(str(thought).split())
        usage = answer.get("usage")
        reported = bool(usage) and _apply_usage(sample, usage)
        if not sample.usage_from_server:
            sample.output_tokens = words + reasoning_words
        if not reported:
            sample.reasoning_tokens = reasoning_words
        _cap_counts(sample)
    except (ValueError, TypeError, AttributeError) as exc:
        sample.fail(_PROTOCOL, f"malformed JSON response: {exc}")
        return
    sample.status = _OK
