"""What a completion request asks of the mock model, and what the model answers.

Pure logic, no HTTP: parsing an OpenAI-style request body, counting prompt tokens, deciding
the output length and finish reason, the output vocabulary, and the latency draws. The HTTP
layer (`mockserver.app`) only sequences these in time.

Without a tokenizer, token counts are approximations a test can reproduce without one:

* Prompt tokens are the number of whitespace-separated words in the prompt: the text of every
  chat message (string content, or the `text` of every `{"type": "text"}` part; other parts
  such as images count nothing), or the completions `prompt` (a string, a list of strings
  counted together, or a list of token ids counted one each). Every message counts, whatever
  its role: a multi-turn body (system, user, assistant, user, ...) is counted over its whole
  history.
* Every output token is one word of `VOCABULARY`, each with a leading space, so the output
  text of n tokens has exactly n words (and is n tokens for common BPE tokenizers).

With a `TokenModel` (`mockserver.tokens`) the same texts are counted with a tokenizer, the
configured template overhead is added, and the output words are one token each for it.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from mockserver.tokens import TokenModel

Endpoint = Literal["chat", "completions"]
FinishReason = Literal["stop", "length"]

VOCABULARY: tuple[str, ...] = (" the", " of", " and", " to", " in", " a", " is", " that")
WHITESPACE = TokenModel(default_vocabulary=VOCABULARY)


class BadRequestError(ValueError):
    """The request body is not a valid completion request (answered with HTTP 400)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True)
class CompletionRequest:
    """The parts of a completion request the mock model acts on."""

    endpoint: Endpoint
    prompt_tokens: int
    stream: bool
    include_usage: bool
    max_tokens: int | None
    min_tokens: int
    ignore_eos: bool
    # The prompt as the prefix cache sees it (`TokenModel`), when asked for.
    prompt_items: tuple[Hashable, ...] | None = None


@dataclass(frozen=True)
class OutputPlan:
    """How many tokens the model will emit and why it stops."""

    tokens: int
    finish_reason: FinishReason


def parse_request(
    endpoint: Endpoint, body: bytes, tokens: TokenModel = WHITESPACE, *, render: bool = False
) -> CompletionRequest:
    """Parse and validate a request body. Raises BadRequestError when it is unusable.

    Prompt tokens are counted by `tokens`; with `render`, `prompt_items` holds the prompt as
    the prefix cache sees it (its length is `prompt_tokens`).
    """
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BadRequestError(f"request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise BadRequestError("request body must be a JSON object")

    items: list[Hashable] | None
    if endpoint == "chat":
        messages = _chat_texts(data.get("messages"))
        if render:
            items = _render_chat(tokens, messages)
            prompt_tokens = len(items)
        else:
            items = None
            prompt_tokens = tokens.count_texts([t for _, texts in messages for t in texts])
            prompt_tokens += tokens.chat_overhead(len(messages))
    else:
        prompt_tokens, items = _completion_prompt(tokens, data.get("prompt"), render)

    n = data.get("n")
    if n is not None and n != 1:
        raise BadRequestError("the mock server only supports n=1", "n")
    # max_completion_tokens is OpenAI's newer name for max_tokens and wins when both are set.
    max_tokens = _optional_int(data, "max_completion_tokens", minimum=1)
    if max_tokens is None:
        max_tokens = _optional_int(data, "max_tokens", minimum=1)
    stream = _optional_bool(data, "stream")
    stream_options = data.get("stream_options")
    if stream_options is not None and not isinstance(stream_options, dict):
        raise BadRequestError("stream_options must be an object", "stream_options")
    return CompletionRequest(
        endpoint=endpoint,
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=stream and _optional_bool(stream_options or {}, "include_usage"),
        max_tokens=max_tokens,
        min_tokens=_optional_int(data, "min_tokens", minimum=0) or 0,
        ignore_eos=_optional_bool(data, "ignore_eos"),
        prompt_items=tuple(items) if items is not None else None,
    )


def plan_output(request: CompletionRequest, natural_tokens: int) -> OutputPlan:
    """Output length and finish reason for a model that emits EOS after `natural_tokens`.

    `max_tokens` cuts the output short (finish "length"); `ignore_eos` makes it run to exactly
    `max_tokens`; `min_tokens` (a vLLM extension) suppresses EOS until that many tokens, but
    never past `max_tokens`. When the limit and EOS coincide the limit is hit first.
    """
    limit = request.max_tokens
    if limit is None:
        tokens = natural_tokens
    elif request.ignore_eos:
        tokens = limit
    else:
        tokens = min(limit, natural_tokens)
    tokens = max(tokens, request.min_tokens)
    if limit is not None:
        tokens = min(tokens, limit)
    return OutputPlan(tokens, "length" if tokens == limit else "stop")


def output_text(tokens: int, start: int = 0, vocabulary: Sequence[str] = VOCABULARY) -> str:
    """The text of output tokens `start` to `start + tokens` (token i is `vocabulary[i % len]`)."""
    size = len(vocabulary)
    return "".join(vocabulary[i % size] for i in range(start, start + tokens))


def reported_tokens(emitted: int, under_report: float) -> int:
    """The completion count a server that under-reports by the fraction `under_report` gives.

    Rounded down, so any fraction > 0 of a long enough output is visible; the tiny epsilon
    keeps e.g. 10 * (1 - 0.3) = 6.9999... from losing a token to floating point.
    """
    if under_report == 0.0:
        return emitted
    return max(0, math.floor(emitted * (1.0 - under_report) + 1e-9))


class LatencyModel:
    """Draws the delays before the first token and between tokens, in seconds.

    The TTFT grows with the prompt (`prefill_ms_per_1k_tokens`) and each gap between tokens
    with the number of requests generating at once (`itl_per_running_ms`); jitter is drawn
    once per delay, around the sum.
    """

    def __init__(
        self,
        ttft_ms: float,
        itl_ms: float,
        jitter_ms: float,
        rng: random.Random,
        *,
        itl_per_running_ms: float = 0.0,
        prefill_ms_per_1k_tokens: float = 0.0,
    ):
        self._ttft = ttft_ms / 1000.0
        self._itl = itl_ms / 1000.0
        self._jitter = jitter_ms / 1000.0
        self._itl_per_running = itl_per_running_ms / 1000.0
        self._prefill_per_token = prefill_ms_per_1k_tokens / 1_000_000.0
        self._rng = rng

    @property
    def depends_on_running(self) -> bool:
        """Whether a gap between tokens depends on how many requests are generating."""
        return self._itl_per_running != 0.0

    def ttft(self, prompt_tokens: int = 0) -> float:
        """Delay from the request being read (or taking a slot) to the first token."""
        return self._draw(self._ttft + self._prefill_per_token * prompt_tokens)

    def itl(self, running: int = 0) -> float:
        """Delay from one token to the next while `running` requests generate."""
        return self._draw(self._itl + self._itl_per_running * running)

    def generation_time(self, tokens: int, prompt_tokens: int = 0, running: int = 0) -> float:
        """Time to produce `tokens` tokens: TTFT plus `tokens - 1` inter-token gaps, with
        `running` requests generating throughout."""
        return self.ttft(prompt_tokens) + sum(self.itl(running) for _ in range(tokens - 1))

    def _draw(self, base: float) -> float:
        if self._jitter == 0.0:
            return base
        return max(0.0, base + self._rng.uniform(-self._jitter, self._jitter))


def _chat_texts(messages: Any) -> list[tuple[str, list[str]]]:
    """Each message's role and text parts, validated."""
    if not isinstance(messages, list) or not messages:
        raise BadRequestError("messages must be a non-empty list", "messages")
    out: list[tuple[str, list[str]]] = []
    for message in messages:
        if not isinstance(message, dict):
            raise BadRequestError("every message must be an object", "messages")
        role = message.get("role")
        role = role if isinstance(role, str) else "user"
        content = message.get("content")
        texts: list[str] = []
        if content is None:  # e.g. an assistant message that only carries tool calls
            pass
        elif isinstance(content, str):
            texts.append(content)
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, dict):
                    raise BadRequestError("every content part must be an object", "messages")
                text = part.get("text")
                if part.get("type") == "text" and isinstance(text, str):
                    texts.append(text)
        else:
            raise BadRequestError("message content must be a string or a list", "messages")
        out.append((role, texts))
    return out


def _render_chat(tokens: TokenModel, messages: list[tuple[str, list[str]]]) -> list[Hashable]:
    """BOS, then each message's header and text, then the generation prompt (an assistant header)."""
    items = tokens.bos_items()
    for role, texts in messages:
        items += tokens.header_items(role)
        for text in texts:
            items += tokens.text_items(text)
    items += tokens.header_items("assistant")
    return items


def _completion_prompt(tokens: TokenModel, prompt: Any, render: bool) -> tuple[int, list[Hashable] | None]:
    if isinstance(prompt, str):
        prompt = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return len(prompt), list(prompt) if render else None  # token ids: no BOS added
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        if not render:
            return tokens.bos_tokens + tokens.count_texts(prompt), None
        items = tokens.bos_items()
        for text in prompt:
            items += tokens.text_items(text)
        return len(items), items
    raise BadRequestError("prompt must be a string, a non-empty list of strings or a list of token ids", "prompt")


def _optional_int(data: dict[str, Any], key: str, *, minimum: int) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise BadRequestError(f"{key} must be an integer >= {minimum}, got {value!r}", key)
    return value


def _optional_bool(data: dict[str, Any], key: str) -> bool:
    value = data.get(key)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise BadRequestError(f"{key} must be a boolean, got {value!r}", key)
    return value
