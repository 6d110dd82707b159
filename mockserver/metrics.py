"""The mock's `/metrics` page: Prometheus text exposition with vLLM's metric names.

The counters say what the mock really did, whatever its usage chunks claim: with
`under_report_usage` the usage falls short of the tokens written, `generation_tokens_total`
does not, so a load tester's cross-check between its own counts and the server's must flag it.

| metric | kind | meaning in the mock |
|---|---|---|
| `vllm:num_requests_running` | gauge | requests generating now (holding a slot; the R of `itl_per_running_ms`) |
| `vllm:num_requests_waiting` | gauge | requests queued for a slot (`max_running`; 0 without a limit) |
| `vllm:kv_cache_usage_perc` | gauge | simulated: prompt + planned output tokens of running requests |
|  |  | over `KV_CACHE_CAPACITY_TOKENS`, a fraction in 0..1 as in vLLM |
| `vllm:prompt_tokens_total` | counter | prompt tokens of requests that started generating |
| `vllm:generation_tokens_total` | counter | tokens written to clients |
| `vllm:request_success_total{finished_reason}` | counter | requests whose last token was generated |

The prompt-token counter and the prefix-cache metrics (`mock-server --prefix-cache`,
`mockserver.prefix_cache`) follow the server the style imitates:

* vLLM names (every style but `sglang` and `llamacpp`): `vllm:prefix_cache_queries_total`
  (counter: prompt tokens looked up in the cache; vLLM v1 counts tokens) and
  `vllm:prefix_cache_hits_total` (counter: of those, the tokens found cached: the sum of
  the responses' `cached_tokens`).
* `sglang`: `sglang:cache_hit_rate` (gauge: cached / prompt tokens of the latest request;
  SGLang's is the rate of its latest prefill batch, and each request is one here).
* `llamacpp`: `llamacpp:prompt_tokens_total` (counter: prompt tokens evaluated, the cached
  ones excluded; it replaces `vllm:prompt_tokens_total`) and
  `llamacpp:prompt_tokens_cached_total` (counter: prompt tokens reused from the cache; 0
  without `--prefix-cache`), as llama-server counts them.

Without `--prefix-cache` the vLLM and SGLang cache metrics are absent. The other metrics keep
vLLM's names in every style.

A request counts as a success before its response's closing events go out, as vLLM counts a
request when the engine finishes it (a client that saw the end can never be ahead of it).

Counters never go down: `/stats/reset` zeroes `/stats` but not these (Prometheus counters only
reset when the process restarts). With `malformed_metrics` the page is deliberately broken, so
tests can check that a scraper reports it rather than failing.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from mockserver.prefix_cache import PrefixCache

KV_CACHE_CAPACITY_TOKENS = 262_144

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

MALFORMED_PAGE = (
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{model_name="mock" 3\n'
    "this is not exposition text\n"
)


@dataclass
class ServerCounters:
    """What `/metrics` adds to `/stats`: counters that survive `/stats/reset`, and KV use."""

    # Tokens counted in `/stats` before its last reset (the counters add the live ones).
    prompt_tokens_before_reset: int = 0
    generation_tokens_before_reset: int = 0
    finished: Counter[str] = field(default_factory=Counter)  # by finish reason
    kv_tokens: int = 0  # prompt + planned output tokens of running requests


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def render(
    model: str,
    counters: ServerCounters,
    running: int,
    prompt_tokens: int,
    generation_tokens: int,
    waiting: int = 0,
    *,
    style: str = "openai",
    prefix_cache: PrefixCache | None = None,
) -> str:
    """The exposition text of the current state (token counts since the server started)."""
    label = f'model_name="{_escape(model)}"'
    kv = min(counters.kv_tokens / KV_CACHE_CAPACITY_TOKENS, 1.0)
    lines = [
        "# HELP vllm:num_requests_running Number of requests in model execution batches.",
        "# TYPE vllm:num_requests_running gauge",
        f"vllm:num_requests_running{{{label}}} {running}",
        "# HELP vllm:num_requests_waiting Number of requests waiting to be processed.",
        "# TYPE vllm:num_requests_waiting gauge",
        f"vllm:num_requests_waiting{{{label}}} {waiting}",
        "# HELP vllm:kv_cache_usage_perc KV-cache usage. 1 means 100 percent usage.",
        "# TYPE vllm:kv_cache_usage_perc gauge",
        f"vllm:kv_cache_usage_perc{{{label}}} {kv!r}",
        *_prompt_counters(label, prompt_tokens, style, prefix_cache),
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.",
        "# TYPE vllm:generation_tokens_total counter",
        f"vllm:generation_tokens_total{{{label}}} {float(generation_tokens)!r}",
        "# HELP vllm:request_success_total Count of successfully processed requests.",
        "# TYPE vllm:request_success_total counter",
    ]
    for reason in ("length", "stop"):
        lines.append(
            f'vllm:request_success_total{{finished_reason="{reason}",{label}}} {float(counters.finished[reason])!r}'
        )
    return "\n".join(lines) + "\n"


def _prompt_counters(label: str, prompt_tokens: int, style: str, cache: PrefixCache | None) -> list[str]:
    """The prompt-token counter and the prefix-cache metrics, as the style's server names them."""
    if style == "llamacpp":  # llama-server: no labels; cached prompt tokens counted apart
        cached = cache.hit_tokens if cache is not None else 0
        return [
            "# HELP llamacpp:prompt_tokens_total Number of prompt tokens processed, excluding cached tokens",
            "# TYPE llamacpp:prompt_tokens_total counter",
            f"llamacpp:prompt_tokens_total {prompt_tokens - cached}",
            "# HELP llamacpp:prompt_tokens_cached_total Number of prompt tokens reused from the cache",
            "# TYPE llamacpp:prompt_tokens_cached_total counter",
            f"llamacpp:prompt_tokens_cached_total {cached}",
        ]
    lines = [
        "# HELP vllm:prompt_tokens_total Number of prefill tokens processed.",
        "# TYPE vllm:prompt_tokens_total counter",
        f"vllm:prompt_tokens_total{{{label}}} {float(prompt_tokens)!r}",
    ]
    if cache is None:
        return lines
    if style == "sglang":
        return [
            *lines,
            "# HELP sglang:cache_hit_rate The prefix cache hit rate.",
            "# TYPE sglang:cache_hit_rate gauge",
            f"sglang:cache_hit_rate{{{label}}} {cache.last_hit_rate!r}",
        ]
    return [
        *lines,
        "# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.",
        "# TYPE vllm:prefix_cache_queries_total counter",
        f"vllm:prefix_cache_queries_total{{{label}}} {float(cache.queried_tokens)!r}",
        "# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.",
        "# TYPE vllm:prefix_cache_hits_total counter",
        f"vllm:prefix_cache_hits_total{{{label}}} {float(cache.hit_tokens)!r}",
    ]
