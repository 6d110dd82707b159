"""The bytes the mock server sends: OpenAI-compatible SSE events and JSON bodies.

Streaming is the hot path (hundreds of streams, tens of thousands of events a second), so a
`StreamEncoder` renders the few distinct events of one response once, when the response
starts; emitting a token is then a lookup, not a JSON dump.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from mockserver.generation import VOCABULARY, Endpoint, FinishReason, output_text

DONE_EVENT = b"data: [DONE]\n\n"

_OBJECT_CHUNK = {"chat": "chat.completion.chunk", "completions": "text_completion"}
_OBJECT_FULL = {"chat": "chat.completion", "completions": "text_completion"}
_ID_PREFIX = {"chat": "chatcmpl-", "completions": "cmpl-"}
# Token events are rendered once per response with a placeholder string for the token.
_HOLE = "\x00"
_HOLE_JSON = json.dumps(_HOLE).encode()
_VOCABULARY_JSON = tuple(json.dumps(word).encode() for word in VOCABULARY)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """An OpenAI `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def error_body(message: str, error_type: str, code: int, param: str | None = None) -> bytes:
    """An OpenAI-style error body."""
    return _dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


class StreamEncoder:
    """Renders the SSE events of one streamed response.

    Chat streams open with a role event whose content is empty (as OpenAI and vLLM do); it
    carries no token. Every token event carries one word of `VOCABULARY` (token i the word
    `i % len(VOCABULARY)`); the last one also carries the finish reason. The closing events
    follow: the usage event (when asked for) and `[DONE]`.
    """

    def __init__(self, endpoint: Endpoint, model: str) -> None:
        self._endpoint = endpoint
        self._header: dict[str, Any] = {
            "id": _ID_PREFIX[endpoint] + uuid.uuid4().hex,
            "object": _OBJECT_CHUNK[endpoint],
            "created": int(time.time()),
            "model": model,
        }

    def role_event(self) -> bytes:
        """The opening chat event: role assistant, empty content, no token."""
        choice = {"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
        return self._event([choice])

    def token_events(self) -> tuple[bytes, ...]:
        """The event of token i of an unfinished output is `token_events()[i % len(...)]`."""
        head, tail = self._token_event_halves(None)
        return tuple(head + word + tail for word in _VOCABULARY_JSON)

    def last_token_event(self, index: int, finish_reason: FinishReason) -> bytes:
        """The event carrying the last token, `index` (0-based), and the finish reason."""
        head, tail = self._token_event_halves(finish_reason)
        return head + _VOCABULARY_JSON[index % len(_VOCABULARY_JSON)] + tail

    def _token_event_halves(self, finish_reason: FinishReason | None) -> tuple[bytes, bytes]:
        """A token event rendered once, split where the token's JSON string goes."""
        event = self._event([self._choice(_HOLE, finish_reason)])
        # The hole is the last string in the event: only the finish reason follows it.
        head, _, tail = event.rpartition(_HOLE_JSON)
        return head, tail

    def closing_events(self, usage: dict[str, int] | None) -> bytes:
        """The usage event if `usage` is given, then `[DONE]`."""
        if usage is None:
            return DONE_EVENT
        return self._event([], usage) + DONE_EVENT

    def _choice(self, text: str, finish_reason: FinishReason | None) -> dict[str, Any]:
        if self._endpoint == "chat":
            return {"index": 0, "delta": {"content": text}, "finish_reason": finish_reason}
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def _event(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        payload: dict[str, Any] = {**self._header, "choices": choices}
        if usage is not None:
            payload["usage"] = usage
        return b"data: " + _dumps(payload) + b"\n\n"


def full_response(
    endpoint: Endpoint,
    model: str,
    tokens: int,
    finish_reason: FinishReason,
    prompt_tokens: int,
) -> bytes:
    """The JSON body of a non-streamed response of `tokens` tokens."""
    text = output_text(tokens)
    choice: dict[str, Any]
    if endpoint == "chat":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": text},
            "logprobs": None,
            "finish_reason": finish_reason,
        }
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    return _dumps(
        {
            "id": _ID_PREFIX[endpoint] + uuid.uuid4().hex,
            "object": _OBJECT_FULL[endpoint],
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": usage_counts(prompt_tokens, tokens),
        }
    )


def models_body(model: str) -> bytes:
    """The `/v1/models` listing with the one configured model."""
    return _dumps(
        {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "llm-loadtest"}],
        }
    )
