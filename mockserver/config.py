"""Configuration of the mock model: latencies, batch slots, output length, failure rate, style.

The mock server is the ground truth for accuracy tests, so every number here is something a
test can assert a measurement against; invalid values are refused up front rather than
producing a server whose behaviour no longer matches its configuration.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mockserver.prefix_cache import DEFAULT_BLOCK_TOKENS, DEFAULT_CAPACITY_BLOCKS
from mockserver.styles import CONNECTION_STYLES, REASONING_FIELDS, STYLES, ConnectionStyle, ReasoningField, Style


@dataclass(frozen=True)
class MockConfig:
    """How the mock model behaves.

    Attributes:
        ttft_ms: Time to first token, from the moment the request body has been read (or,
            with `max_running`, a slot taken), before `prefill_ms_per_1k_tokens` is added.
        itl_ms: Inter-token latency: the gap between consecutive tokens, before
            `itl_per_running_ms` is added.
        output_tokens: The model's natural output length, where it would emit EOS.
        jitter_ms: Each delay (TTFT and every ITL) gets a uniform offset in
            [-jitter_ms, +jitter_ms], clamped so that no delay is negative.
        error_rate: Fraction of completion requests answered with HTTP 500.
        seed: Seeds the error and jitter draws, so a run is reproducible.
        model: The model id reported by `/v1/models` and in every response.
        style: Which real server's streaming the mock imitates (see `mockserver.styles`).
        under_report_usage: Fraction by which the reported `completion_tokens` falls short
            of the tokens actually sent (rounded down), to check that a client notices;
            `/stats` always counts what was sent.
        malformed_metrics: Serve a broken `/metrics` page (for testing scrapers).
        max_running: At most this many completion requests generate at once, like a real
            server's batch slots (llama.cpp's `-np`); the rest wait in arrival order, and
            their wait counts in their TTFT (`t0` is when a slot was taken) and in the
            `vllm:num_requests_waiting` gauge. 0: no limit (the default).
        connections: What the server does with kept-alive connections of the `/v1` API
            (see `mockserver.styles`): `keep_alive`, `close_after_response` (llama-server)
            or `close_idle`.
        itl_per_running_ms: Each gap between tokens is `itl_ms + itl_per_running_ms x R`,
            where R is the number of requests generating (holding a slot) when the gap's
            first token is written, this request included: a batch that decodes slower the
            fuller it is. The capacity model is `mockserver.capacity`.
        prefill_ms_per_1k_tokens: Added to the TTFT: this many ms per 1000 prompt tokens
            (the `usage.prompt_tokens` count) not found in the prefix cache, as a prefill
            that grows with the prompt.
        tokenizer: A `tokenizer.json` or a model directory holding one ("": none): prompts
            are counted with it and the output words are one token each for it
            (`mockserver.tokens`); without one a token is a whitespace-separated word.
        bos_tokens: Tokens added at the start of every prompt given as text (chat and text
            completions; not a completions prompt of token ids).
        chat_template_tokens: Tokens the chat template adds around each message and once
            more for the generation prompt: a chat request's prompt_tokens are its
            messages' tokens + `bos_tokens` + this x (messages + 1).
        prefix_cache: Model a prefix cache (`mockserver.prefix_cache`): cached prompt
            tokens cost no prefill time and are reported as
            `usage.prompt_tokens_details.cached_tokens`.
        prefix_cache_block_tokens: Tokens per cache block (vLLM's default: 16).
        prefix_cache_blocks: Blocks the cache holds, least recently used evicted first.
        reasoning_tokens: With style `reasoning`, the output tokens sent as reasoning (at
            most all but the last); None: half of them, rounded down.
        reasoning_field: With style `reasoning`, the delta (and message) field of the
            reasoning text: `reasoning_content` (vLLM, SGLang, DeepSeek) or `reasoning`
            (newer vLLM, OpenRouter).
    """

    ttft_ms: float = 50.0
    itl_ms: float = 10.0
    output_tokens: int = 64
    jitter_ms: float = 0.0
    error_rate: float = 0.0
    seed: int = 0
    model: str = "mock"
    style: Style = "openai"
    under_report_usage: float = 0.0
    malformed_metrics: bool = False
    max_running: int = 0
    connections: ConnectionStyle = "keep_alive"
    itl_per_running_ms: float = 0.0
    prefill_ms_per_1k_tokens: float = 0.0
    tokenizer: str = ""
    bos_tokens: int = 0
    chat_template_tokens: int = 0
    prefix_cache: bool = False
    prefix_cache_block_tokens: int = DEFAULT_BLOCK_TOKENS
    prefix_cache_blocks: int = DEFAULT_CAPACITY_BLOCKS
    reasoning_tokens: int | None = None
    reasoning_field: ReasoningField = "reasoning_content"

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "itl_ms", "jitter_ms", "itl_per_running_ms", "prefill_ms_per_1k_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(self.output_tokens, bool) or not isinstance(self.output_tokens, int):
            raise ValueError(f"output_tokens must be an integer, got {self.output_tokens!r}")
        if self.output_tokens < 1:
            raise ValueError(f"output_tokens must be >= 1, got {self.output_tokens}")
        if isinstance(self.error_rate, bool) or not isinstance(self.error_rate, int | float):
            raise ValueError(f"error_rate must be a number, got {self.error_rate!r}")
        if not 0.0 <= self.error_rate <= 1.0:  # also refuses NaN
            raise ValueError(f"error_rate must be between 0 and 1, got {self.error_rate!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.model, str) or not self.model.strip():
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")
        if self.style not in STYLES:
            raise ValueError(f"style must be one of {', '.join(STYLES)}, got {self.style!r}")
        if isinstance(self.max_running, bool) or not isinstance(self.max_running, int) or self.max_running < 0:
            raise ValueError(f"max_running must be an integer >= 0, got {self.max_running!r}")
        if self.connections not in CONNECTION_STYLES:
            raise ValueError(f"connections must be one of {', '.join(CONNECTION_STYLES)}, got {self.connections!r}")
        under = self.under_report_usage
        if isinstance(under, bool) or not isinstance(under, int | float) or not 0.0 <= under <= 1.0:
            raise ValueError(f"under_report_usage must be between 0 and 1, got {under!r}")
        if not isinstance(self.tokenizer, str):
            raise ValueError(f"tokenizer must be a path, got {self.tokenizer!r}")
        for name, minimum in (
            ("bos_tokens", 0),
            ("chat_template_tokens", 0),
            ("prefix_cache_block_tokens", 1),
            ("prefix_cache_blocks", 1),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not isinstance(self.prefix_cache, bool):
            raise ValueError(f"prefix_cache must be a boolean, got {self.prefix_cache!r}")
        reasoning = self.reasoning_tokens
        if reasoning is not None:
            if isinstance(reasoning, bool) or not isinstance(reasoning, int) or reasoning < 0:
                raise ValueError(f"reasoning_tokens must be an integer >= 0, got {reasoning!r}")
            if self.style != "reasoning":
                raise ValueError(f"reasoning_tokens needs style reasoning, got style {self.style!r}")
        if self.reasoning_field not in REASONING_FIELDS:
            raise ValueError(
                f"reasoning_field must be one of {', '.join(REASONING_FIELDS)}, got {self.reasoning_field!r}"
            )
