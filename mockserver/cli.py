"""`llm-loadtest mock-server`: command-line flags and the serve-until-signalled entry point.

The `llm-loadtest` parser owns the subcommand; it calls `add_arguments` on its subparser and
`run` with the parsed namespace.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable

from mockserver.config import MockConfig
from mockserver.server import MockServer
from mockserver.styles import CONNECTION_STYLES, REASONING_FIELDS, STYLES
from mockserver.tokens import load_token_model


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the mock server's flags to `parser`."""
    defaults = MockConfig()
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="TCP port; 0 picks a free one (default: %(default)s)")
    parser.add_argument(
        "--ttft-ms",
        type=float,
        default=defaults.ttft_ms,
        help="time to first token in ms, from the request being read (with --max-running: from "
        "taking a slot) (default: %(default)s)",
    )
    parser.add_argument(
        "--itl-ms",
        type=float,
        default=defaults.itl_ms,
        help="inter-token latency in ms (default: %(default)s)",
    )
    parser.add_argument(
        "--output-tokens",
        type=int,
        default=defaults.output_tokens,
        help="natural output length in tokens, where the model emits EOS; max_tokens caps it "
        "and ignore_eos with max_tokens overrides it (default: %(default)s)",
    )
    parser.add_argument(
        "--jitter-ms",
        type=float,
        default=defaults.jitter_ms,
        help="uniform +/- jitter in ms added to every delay, never below 0 (default: %(default)s)",
    )
    parser.add_argument(
        "--error-rate",
        type=float,
        default=defaults.error_rate,
        help="fraction of completion requests answered with HTTP 500 (default: %(default)s)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        default=defaults.seed,
        help="seed of the error and jitter draws (default: %(default)s)",
    )
    parser.add_argument(
        "--model",
        default=defaults.model,
        help="model id reported by /v1/models and in responses (default: %(default)s)",
    )
    parser.add_argument(
        "--style",
        choices=STYLES,
        default=defaults.style,
        help="which server's streaming to imitate: its chunk shapes, usage placement, framing "
        "and tokens per event (default: %(default)s)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="processes serving the same port (SO_REUSEPORT), for more streams than one core "
        "paces; /stats then sums all workers (default: %(default)s)",
    )
    parser.add_argument(
        "--under-report-usage",
        type=float,
        default=defaults.under_report_usage,
        help="fraction by which reported completion_tokens fall short of the tokens sent; "
        "/stats counts what was sent (default: %(default)s)",
    )
    parser.add_argument(
        "--max-running",
        type=int,
        default=defaults.max_running,
        help="at most this many requests generate at once (a server's batch slots); the rest "
        "wait in arrival order and their wait counts in TTFT; 0: no limit (default: %(default)s)",
    )
    parser.add_argument(
        "--itl-per-running-ms",
        type=float,
        default=defaults.itl_per_running_ms,
        help="added to the inter-token latency per request generating when a gap starts (this one "
        "included, per worker): ITL = itl-ms + this x running (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-ms-per-1k-tokens",
        type=float,
        default=defaults.prefill_ms_per_1k_tokens,
        help="added to the TTFT: ms per 1000 prompt tokens as usage.prompt_tokens counts them (default: %(default)s)",
    )
    parser.add_argument(
        "--connections",
        choices=CONNECTION_STYLES,
        default=defaults.connections,
        help="what the server does with kept-alive API connections: keep_alive; close_after_response "
        "(as llama-server: advertises keep-alive, closes after every response); close_idle (closes "
        "connections idle for more than 0.1 s, drops the request that meets one) (default: %(default)s)",
    )
    parser.add_argument(
        "--tokenizer",
        default=defaults.tokenizer,
        metavar="PATH",
        help="a tokenizer.json or a model directory holding one: prompt tokens are counted with it and "
        "the output words are one token each for it (default: whitespace-separated words)",
    )
    parser.add_argument(
        "--bos-tokens",
        type=int,
        default=defaults.bos_tokens,
        help="tokens added at the start of every prompt given as text (chat and text completions, "
        "not token-id prompts) (default: %(default)s)",
    )
    parser.add_argument(
        "--chat-template-tokens",
        type=int,
        default=defaults.chat_template_tokens,
        help="tokens the chat template adds around each message and once more for the generation "
        "prompt: chat prompt_tokens = messages' tokens + bos + this x (messages + 1) (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix-cache",
        action="store_true",
        help="model a prefix cache: cached prompt tokens cost no prefill time, are reported as "
        "usage.prompt_tokens_details.cached_tokens and counted on /metrics",
    )
    parser.add_argument(
        "--prefix-cache-block-tokens",
        type=int,
        default=defaults.prefix_cache_block_tokens,
        help="tokens per prefix-cache block; only whole blocks of a shared prefix hit (default: %(default)s)",
    )
    parser.add_argument(
        "--prefix-cache-blocks",
        type=int,
        default=defaults.prefix_cache_blocks,
        help="blocks the prefix cache holds, least recently used evicted first (default: %(default)s)",
    )
    parser.add_argument(
        "--reasoning-tokens",
        type=int,
        default=defaults.reasoning_tokens,
        help="with --style reasoning: output tokens sent as reasoning, at most all but the last "
        "(default: half of them)",
    )
    parser.add_argument(
        "--reasoning-field",
        choices=REASONING_FIELDS,
        default=defaults.reasoning_field,
        help="with --style reasoning: the delta field of the reasoning text (default: %(default)s)",
    )
    parser.add_argument(
        "--malformed-metrics",
        action="store_true",
        help="serve a broken /metrics page (to test scrapers' error handling)",
    )


def run(args: argparse.Namespace) -> int:
    """Serve until SIGINT or SIGTERM; 0 on a clean shutdown, 2 on a bad flag value."""
    defaults = MockConfig()
    try:
        config = MockConfig(
            ttft_ms=args.ttft_ms,
            itl_ms=args.itl_ms,
            output_tokens=args.output_tokens,
            jitter_ms=args.jitter_ms,
            error_rate=args.error_rate,
            seed=args.seed,
            model=args.model,
            style=args.style,
            under_report_usage=args.under_report_usage,
            malformed_metrics=args.malformed_metrics,
            max_running=args.max_running,
            connections=getattr(args, "connections", "keep_alive"),
            itl_per_running_ms=getattr(args, "itl_per_running_ms", 0.0),
            prefill_ms_per_1k_tokens=getattr(args, "prefill_ms_per_1k_tokens", 0.0),
            tokenizer=getattr(args, "tokenizer", ""),
            bos_tokens=getattr(args, "bos_tokens", 0),
            chat_template_tokens=getattr(args, "chat_template_tokens", 0),
            prefix_cache=getattr(args, "prefix_cache", False),
            prefix_cache_block_tokens=getattr(args, "prefix_cache_block_tokens", defaults.prefix_cache_block_tokens),
            prefix_cache_blocks=getattr(args, "prefix_cache_blocks", defaults.prefix_cache_blocks),
            reasoning_tokens=getattr(args, "reasoning_tokens", None),
            reasoning_field=getattr(args, "reasoning_field", "reasoning_content"),
        )
        if config.tokenizer:
            load_token_model(config.tokenizer)  # refused here rather than in every worker
    except ValueError as exc:
        print(f"mock-server: error: {exc}", file=sys.stderr)
        return 2
    workers = getattr(args, "workers", 1)
    if workers < 1:
        print(f"mock-server: error: --workers must be >= 1, got {workers}", file=sys.stderr)
        return 2
    if workers > 1:
        from mockserver.workers import serve_workers  # numpy and multiprocessing only when needed

        return serve_workers(config, args.host, args.port, workers)
    with asyncio.Runner(loop_factory=_uvloop_factory()) as runner:
        return runner.run(_serve(config, args.host, args.port))


async def _serve(config: MockConfig, host: str, port: int) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    server = MockServer(config)
    try:
        try:
            await server.start(host, port)
        except OSError as exc:
            print(f"mock-server: error: cannot listen on {host}:{port}: {exc}", file=sys.stderr)
            return 1
        url_host = f"[{host}]" if ":" in host else host
        print(f"mock server listening on http://{url_host}:{server.port}/v1", flush=True)
        await stop.wait()
    finally:
        await server.close()
        for sig in signals:
            loop.remove_signal_handler(sig)
    return 0


def _uvloop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor when uvloop is installed, else None (the default loop)."""
    with contextlib.suppress(ImportError):
        import uvloop

        return uvloop.new_event_loop
    return None
