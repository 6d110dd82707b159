"""The bytes the mock server sends that every server style shares: JSON bodies and helpers.

The streamed events differ between the servers the mock imitates and are rendered by
`mockserver.styles`; non-streamed answers, errors and the model list are the same for all.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Sequence
from typing import Any

from mockserver.generation import VOCABULARY, Endpoint, FinishReason, output_text

OBJECT_CHUNK = {"chat": "chat.completion.chunk", "completions": "text_completion"}
OBJECT_FULL = {"chat": "chat.completion", "completions": "text_completion"}
ID_PREFIX = {"chat": "chatcmpl-", "completions": "cmpl-"}


def dumps(obj: Any) -> bytes:
    """Compact JSON, as servers send it."""
    return json.dumps(obj, separators=(",", ":")).encode()


def usage_counts(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """An OpenAI `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def with_details(usage: dict[str, Any], cached_tokens: int | None, reasoning_tokens: int | None) -> dict[str, Any]:
    """`usage` with `prompt_tokens_details.cached_tokens` and
    `completion_tokens_details.reasoning_tokens` where known (None: left out)."""
    if cached_tokens is not None:
        usage["prompt_tokens_details"] = {"cached_tokens": cached_tokens}
    if reasoning_tokens is not None:
        usage["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
    return usage


def error_body(message: str, error_type: str, code: int, param: str | None = None) -> bytes:
    """An OpenAI-style error body."""
    return dumps({"error": {"message": message, "type": error_type, "param": param, "code": code}})


def full_response(
    endpoint: Endpoint,
    model: str,
    tokens: int,
    finish_reason: FinishReason,
    prompt_tokens: int,
    *,
    reported_tokens: int | None = None,
    reasoning_tokens: int | None = None,
    reasoning_field: str = "reasoning_content",
    cached_tokens: int | None = None,
    vocabulary: Sequence[str] = VOCABULARY,
) -> bytes:
    """The JSON body of a non-streamed response of `tokens` tokens.

    `reported_tokens` is the completion count put in `usage` (default: `tokens`); the first
    `reasoning_tokens` tokens of a chat answer go to `message.reasoning_content` (or the
    `reasoning_field` named), as reasoning parsers (vLLM, SGLang) return them, and are
    reported as `usage.completion_tokens_details.reasoning_tokens` (None: not a reasoning
    answer). `cached_tokens` (None: no prefix cache) goes to
    `usage.prompt_tokens_details.cached_tokens`.
    """
    choice: dict[str, Any]
    reasoning = reasoning_tokens or 0
    if endpoint == "chat":
        message: dict[str, Any] = {
            "role": "assistant",
            "content": output_text(tokens - reasoning, start=reasoning, vocabulary=vocabulary),
        }
        if reasoning:
            message[reasoning_field] = output_text(reasoning, vocabulary=vocabulary)
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}
    else:
        reasoning_tokens = None
        text = output_text(tokens, vocabulary=vocabulary)
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}
    completion_tokens = tokens if reported_tokens is None else reported_tokens
    return dumps(
        {
            "id": ID_PREFIX[endpoint] + uuid.uuid4().hex,
            "object": OBJECT_FULL[endpoint],
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
            "usage": with_details(usage_counts(prompt_tokens, completion_tokens), cached_tokens, reasoning_tokens),
        }
    )


def models_body(model: str) -> bytes:
    """The `/v1/models` listing with the one configured model."""
    return dumps(
        {
            "object": "list",
            "data": [{"id": model, "object": "model", "created": 0, "owned_by": "llm-loadtest"}],
        }
    )
