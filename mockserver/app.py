"""The mock OpenAI-compatible HTTP API: routes, token pacing and the counters behind `/stats`.

Routes:

* `GET /v1/models`: the configured model.
* `POST /v1/chat/completions`, `POST /v1/completions`: streamed (SSE) or not.
* `GET /stats`, `POST /stats/reset`: what the server saw, for tests to reconcile against.
* `GET /stats/emission`: when the mock really wrote its tokens (`mockserver.emission`).
* `GET /health`: 200 while serving (as vLLM).
* `GET /metrics`: Prometheus text with vLLM's metric names, the prompt-token and prefix-cache
  metrics in the style's server's names (`mockserver.metrics`).

Timing is measured from the moment the request body has been read or, with `max_running`
slots, from the moment the request took a slot (`t0`): the first token is emitted at
`t0 + ttft + prefill` (prefill: `prefill_ms_per_1k_tokens` x prompt tokens / 1000, only the
tokens not found in the prefix cache when it is on: `mockserver.prefix_cache`), each next
one `itl + itl_per_running x R` after the previous token's deadline or, if that token went
out late, after it actually went out (each delay with its own jitter) — so no gap is ever
shorter than the model's, as in a real decode loop. R, the number of requests generating
(`MockStats.generating`: holding a slot, this one included), is read when the gap starts,
right after the previous token was written; a request that starts or ends during a gap
changes the gaps after it, not that one. Tokens are never early and typically within a
millisecond late (see `mockserver.pacing`). All streams of an app share one
`DeadlineScheduler`, which writes each due token straight to its connection; a handler task
only sets its stream up and closes it. A non-streamed response is sent at the deadline of
its last token (its gaps read R as a stream's do).

The configured connection style (`MockConfig.connections`) applies to the `/v1` routes only
(the test endpoints always keep connections alive): `_connection_middleware` closes
connections after each response or drops requests that arrive on long-idle ones.

The configured style (`mockserver.styles`) decides the bytes of a stream and how many tokens
one event carries; with several tokens per event, each event is one decode step of that many
inter-token latencies. Usage reports `completion_tokens` less the configured under-report;
`/stats` counts the tokens actually written.

Prompts are counted, and output words chosen, by a `mockserver.tokens.TokenModel`:
whitespace words, or the configured tokenizer, plus the configured template overhead.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NamedTuple

from aiohttp import web

from mockserver.config import MockConfig
from mockserver.emission import EmissionStats
from mockserver.generation import (
    VOCABULARY,
    BadRequestError,
    CompletionRequest,
    Endpoint,
    LatencyModel,
    OutputPlan,
    parse_request,
    plan_output,
    reported_tokens,
)
from mockserver.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from mockserver.metrics import MALFORMED_PAGE, ServerCounters
from mockserver.metrics import render as render_metrics
from mockserver.pacing import DeadlineScheduler, now, sleep_until
from mockserver.prefix_cache import PrefixCache, block_hashes
from mockserver.styles import (
    ADVERTISED_KEEP_ALIVE,
    CLOSE_AFTER_RESPONSE_DELAY_S,
    ENCODERS,
    IDLE_CLOSE_S,
    ConnectionStyle,
    StreamEncoder,
    StreamSummary,
    TokenEvents,
    reasoning_tokens,
)
from mockserver.tokens import TokenModel, load_token_model
from mockserver.wire import error_body, full_response, models_body

# Long-context prompts run to megabytes of JSON; aiohttp's default limit is 1 MiB.
_MAX_BODY_BYTES = 64 * 1024 * 1024
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
_JSON = "application/json"


class MockStats:
    """What the server has seen since it started or since the last reset.

    Every completion request counts once in `requests_total` and `by_endpoint`, and, once it
    has finished, in exactly one of `requests_ok`, `requests_failed` (injected 500s and 400s)
    and `requests_cancelled` (the client went away); until then it counts in `running`. So
    `requests_total == requests_ok + requests_failed + requests_cancelled + running` for
    counters reset while the server was idle. `waiting` (a gauge, within `running`) counts the
    requests queued for one of `max_running` slots, `generating` (a gauge, within `running`,
    not in `/stats`) those holding one — without a limit, every request past validation and
    the error draw until its response is written; it is the R of `itl_per_running_ms` and
    `vllm:num_requests_running`.

    `prompt_tokens_total` counts the prompts of requests that started generating (the ok and
    the cancelled ones), `cached_tokens_total` the part of them found in the prefix cache
    (0 without one); `output_tokens_total` the tokens actually written to clients.
    """

    def __init__(self) -> None:
        self.running = 0
        self.waiting = 0
        self.generating = 0
        self.server = ServerCounters()
        self.output_tokens_total = self.prompt_tokens_total = self.cached_tokens_total = 0
        self.emission = EmissionStats()
        self.reset()

    def reset(self) -> None:
        """Zero the counters. The gauges (`running`, `waiting`, `generating`) are kept."""
        # The /metrics counters are monotonic: they keep what is zeroed here.
        self.server.prompt_tokens_before_reset += self.prompt_tokens_total
        self.server.generation_tokens_before_reset += self.output_tokens_total
        self.requests_total = 0
        self.requests_ok = 0
        self.requests_failed = 0
        self.requests_cancelled = 0
        self.output_tokens_total = 0
        self.prompt_tokens_total = 0
        self.cached_tokens_total = 0
        self.by_endpoint: dict[Endpoint, int] = {"chat": 0, "completions": 0}
        self.emission.reset()

    def as_dict(self) -> dict[str, Any]:
        """The `/stats` JSON object."""
        return {
            "requests_total": self.requests_total,
            "requests_ok": self.requests_ok,
            "requests_failed": self.requests_failed,
            "requests_cancelled": self.requests_cancelled,
            "output_tokens_total": self.output_tokens_total,
            "prompt_tokens_total": self.prompt_tokens_total,
            "cached_tokens_total": self.cached_tokens_total,
            "running": self.running,
            "waiting": self.waiting,
            "by_endpoint": dict(self.by_endpoint),
        }


STATS_KEY = web.AppKey("mockserver_stats", MockStats)
CONFIG_KEY = web.AppKey("mockserver_config", MockConfig)


def create_app(config: MockConfig) -> web.Application:
    """An aiohttp application serving the mock model described by `config`."""
    middlewares = [] if config.connections == "keep_alive" else [_connection_middleware(config.connections)]
    app = web.Application(client_max_size=_MAX_BODY_BYTES, middlewares=middlewares)
    stats = MockStats()
    app[STATS_KEY] = stats
    app[CONFIG_KEY] = config
    scheduler = DeadlineScheduler()
    routes = _CompletionRoutes(config, stats, scheduler)
    models = models_body(config.model)

    async def list_models(_: web.Request) -> web.Response:
        return web.Response(body=models, content_type=_JSON)

    async def get_stats(_: web.Request) -> web.Response:
        return web.json_response(stats.as_dict())

    async def get_emission(_: web.Request) -> web.Response:
        return web.json_response(stats.emission.as_dict())

    async def reset_stats(_: web.Request) -> web.Response:
        stats.reset()
        return web.json_response(stats.as_dict())

    async def health(_: web.Request) -> web.Response:
        return web.Response()

    async def metrics(_: web.Request) -> web.Response:
        if config.malformed_metrics:
            return web.Response(text=MALFORMED_PAGE, headers={"Content-Type": METRICS_CONTENT_TYPE})
        server = stats.server
        text = render_metrics(
            config.model,
            server,
            stats.generating,
            waiting=stats.waiting,
            prompt_tokens=server.prompt_tokens_before_reset + stats.prompt_tokens_total,
            generation_tokens=server.generation_tokens_before_reset + stats.output_tokens_total,
            style=config.style,
            prefix_cache=routes.prefix_cache,
        )
        return web.Response(text=text, headers={"Content-Type": METRICS_CONTENT_TYPE})

    app.router.add_get("/v1/models", list_models)
    app.router.add_post("/v1/chat/completions", routes.chat)
    app.router.add_post("/v1/completions", routes.completions)
    app.router.add_get("/stats", get_stats)
    app.router.add_post("/stats/reset", reset_stats)
    app.router.add_get("/stats/emission", get_emission)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)

    async def stop_pacing(_: web.Application) -> None:
        scheduler.close()

    app.on_cleanup.append(stop_pacing)
    if config.connections != "keep_alive":
        app.on_response_prepare.append(_advertise_keep_alive)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _connection_middleware(style: ConnectionStyle) -> Any:
    """The middleware of a connection style other than `keep_alive` (see `mockserver.styles`)."""
    # When the last response on each connection ended (weak: a closed connection leaves).
    idle_since: weakref.WeakKeyDictionary[asyncio.BaseTransport, float] = weakref.WeakKeyDictionary()

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        transport = request.transport
        if transport is None or not request.path.startswith("/v1/"):
            return await handler(request)
        if style == "close_idle":
            ended = idle_since.get(transport)
            if ended is not None and now() - ended > IDLE_CLOSE_S:
                # The server closed this idle connection as the request crossed the close:
                # the request is never read, and the unread bytes make the kernel reset.
                transport.abort()
                return web.Response(status=499)  # never reaches the client
        if style == "close_after_response":
            # This request is the connection's last: aiohttp handles no further request on
            # it (one the client sends after the response is never seen) and closes it when
            # this handler returns, a moment after the response has gone out, as
            # llama-server's connections close.
            request.protocol.close()
            response = await handler(request)
            if not response.prepared:
                await response.prepare(request)
                await response.write_eof()
            await asyncio.sleep(CLOSE_AFTER_RESPONSE_DELAY_S)
            return response
        response = await handler(request)
        if style == "close_idle":
            idle_since[transport] = now()
        return response

    return middleware


async def _advertise_keep_alive(_: web.Request, response: web.StreamResponse) -> None:
    response.headers["Keep-Alive"] = ADVERTISED_KEEP_ALIVE


class _CompletionRoutes:
    """The two completion endpoints: validate, maybe fail, then pace out the tokens."""

    def __init__(self, config: MockConfig, stats: MockStats, scheduler: DeadlineScheduler):
        self._config = config
        self._stats = stats
        self._scheduler = scheduler
        # The batch slots (None: unlimited). asyncio's semaphore wakes waiters in FIFO order.
        self._slots = asyncio.Semaphore(config.max_running) if config.max_running else None
        # Separate generators: how many requests fail must not depend on how many jitter
        # draws concurrent streams happened to make in between.
        self._error_rng = random.Random(config.seed)
        self._encoder = ENCODERS[config.style]
        # With several tokens per event, the gap between events is one step of that many tokens.
        self._tokens_per_event = self._encoder.tokens_per_event
        if config.tokenizer:
            self._tokens = load_token_model(
                config.tokenizer, bos_tokens=config.bos_tokens, chat_template_tokens=config.chat_template_tokens
            )
        else:
            self._tokens = TokenModel(
                default_vocabulary=VOCABULARY,
                bos_tokens=config.bos_tokens,
                chat_template_tokens=config.chat_template_tokens,
            )
        self.prefix_cache = (
            PrefixCache(config.prefix_cache_block_tokens, config.prefix_cache_blocks) if config.prefix_cache else None
        )
        self._latency = LatencyModel(
            config.ttft_ms,
            config.itl_ms * self._tokens_per_event,
            config.jitter_ms,
            random.Random(f"jitter/{config.seed}"),
            itl_per_running_ms=config.itl_per_running_ms * self._tokens_per_event,
            prefill_ms_per_1k_tokens=config.prefill_ms_per_1k_tokens,
        )

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "chat")

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._handle(request, "completions")

    async def _handle(self, request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
        stats = self._stats
        stats.requests_total += 1
        stats.by_endpoint[endpoint] += 1
        stats.running += 1
        try:
            try:
                body = await request.read()
            except ConnectionError:
                stats.requests_cancelled += 1
                return web.Response(status=499)  # never reaches the client: it has gone
            t0 = now()
            try:
                parsed = parse_request(endpoint, body, self._tokens, render=self.prefix_cache is not None)
            except BadRequestError as exc:
                stats.requests_failed += 1
                return _error_response(400, exc.message, "invalid_request_error", exc.param)
            # Drawn for every valid request, so the sequence of failures depends only on the
            # seed and the order requests arrive in.
            if self._error_rng.random() < self._config.error_rate:
                stats.requests_failed += 1
                return _error_response(500, "mock injected error", "server_error")
            async with self._slot() as queued:
                if queued:
                    t0 = now()  # a real server's TTFT includes the wait: timing starts here
                plan = plan_output(parsed, self._config.output_tokens)
                stats.prompt_tokens_total += parsed.prompt_tokens
                cache = self._look_up(parsed)
                kv_tokens = parsed.prompt_tokens + plan.tokens
                stats.server.kv_tokens += kv_tokens
                try:
                    if parsed.stream:
                        return await self._stream(request, parsed, plan, t0, cache)
                    return await self._respond(request, parsed, plan, t0, cache)
                finally:
                    stats.server.kv_tokens -= kv_tokens
        except asyncio.CancelledError:
            # The server cancels the handler when the client disconnects (or at shutdown).
            stats.requests_cancelled += 1
            raise
        finally:
            stats.running -= 1

    def _look_up(self, parsed: CompletionRequest) -> _CacheLookup | None:
        """Look the prompt up in the prefix cache and cache its blocks (None: no cache)."""
        cache = self.prefix_cache
        if cache is None or parsed.prompt_items is None:
            return None
        hashes = block_hashes(parsed.prompt_items, cache.block_tokens)
        cached = cache.lookup(hashes, parsed.prompt_tokens)
        cache.insert(hashes)
        self._stats.cached_tokens_total += cached
        return _CacheLookup(cached, hashes)

    def _cache_output(self, parsed: CompletionRequest, plan: OutputPlan, lookup: _CacheLookup | None) -> None:
        """Cache the full blocks of prompt + output of a finished generation."""
        cache = self.prefix_cache
        if cache is None or lookup is None or parsed.prompt_items is None:
            return
        items = [*parsed.prompt_items, *self._tokens.output_items(0, plan.tokens)]
        done = len(lookup.hashes)
        parent = lookup.hashes[-1] if done else 0
        cache.insert(block_hashes(items, cache.block_tokens, start_block=done, parent=parent))

    def _reasoning(self, parsed: CompletionRequest, plan: OutputPlan) -> int | None:
        """Output tokens sent as reasoning (None: not a reasoning answer)."""
        if not self._encoder.reasons or parsed.endpoint != "chat":
            return None
        return reasoning_tokens(plan.tokens, self._config.reasoning_tokens)

    def _new_encoder(self, parsed: CompletionRequest) -> StreamEncoder:
        config = self._config
        return self._encoder(
            parsed.endpoint,
            config.model,
            include_usage=parsed.include_usage,
            vocabulary=self._tokens.vocabulary,
            reasoning_tokens=config.reasoning_tokens,
            reasoning_field=config.reasoning_field,
        )

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[bool]:
        """Hold one of the `max_running` slots (waiting for it first) and count as generating
        meanwhile; yields whether there are slots at all."""
        slots, stats = self._slots, self._stats
        if slots is not None:
            stats.waiting += 1
            try:
                await slots.acquire()
            finally:
                stats.waiting -= 1
        stats.generating += 1
        try:
            yield slots is not None
        finally:
            stats.generating -= 1
            if slots is not None:
                slots.release()

    async def _stream(
        self,
        request: web.Request,
        parsed: CompletionRequest,
        plan: OutputPlan,
        t0: float,
        lookup: _CacheLookup | None,
    ) -> web.StreamResponse:
        stats = self._stats
        encoder = self._new_encoder(parsed)
        response = web.StreamResponse(headers=_SSE_HEADERS)
        try:
            await response.prepare(request)
            opening = encoder.opening()
            if opening:
                await response.write(opening)
        except ConnectionError:
            stats.requests_cancelled += 1
            return response
        transport = request.transport
        if transport is None or transport.is_closing():
            stats.requests_cancelled += 1
            return response

        frame = _chunk if response.headers.get("Transfer-Encoding") == "chunked" else bytes
        events = encoder.token_events(plan.tokens, plan.finish_reason)
        finished: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        cached = lookup.cached if lookup is not None else None
        first_deadline = t0 + self._latency.ttft(parsed.prompt_tokens - (cached or 0))
        stream: _TokenStream
        if encoder.split_writes:
            stream = _SplitTokenStream(
                transport,
                events,
                tuple(tuple(frame(p) for p in encoder.pieces(e)) for e in events.table),
                tuple(frame(p) for p in encoder.pieces(events.last)),
                first_deadline,
                self._latency,
                stats,
                finished,
            )
        else:
            stream = _TokenStream(
                transport,
                events,
                tuple(frame(e) for e in events.table),
                frame(events.last),
                first_deadline,
                self._latency,
                stats,
                finished,
            )
        self._scheduler.schedule(stream.deadline, stream)
        try:
            completed = await finished
        finally:
            finished.cancel()  # when the handler itself is cancelled: the stream stops
        if completed:
            # Generation is over: counted (as vLLM does) before the closing events go out.
            stats.server.finished[plan.finish_reason] += 1
            self._cache_output(parsed, plan, lookup)
        try:
            if completed:
                summary = StreamSummary(
                    prompt_tokens=parsed.prompt_tokens,
                    completion_tokens=reported_tokens(plan.tokens, self._config.under_report_usage),
                    finish_reason=plan.finish_reason,
                    prompt_ms=(first_deadline - t0) * 1000.0,
                    generation_ms=(stream.deadline - first_deadline) * 1000.0,
                    cached_tokens=cached,
                    reasoning_tokens=self._reasoning(parsed, plan),
                )
                *pieces, tail = encoder.pieces(encoder.closing(summary))
                for piece in pieces:
                    await response.write(piece)
                    await asyncio.sleep(0)  # let the piece go out on its own
                await response.write_eof(tail)
        except ConnectionError:
            completed = False
        if completed:
            stats.requests_ok += 1
        else:
            stats.requests_cancelled += 1
        return response

    async def _respond(
        self,
        request: web.Request,
        parsed: CompletionRequest,
        plan: OutputPlan,
        t0: float,
        lookup: _CacheLookup | None,
    ) -> web.Response:
        steps = -(-plan.tokens // self._tokens_per_event)
        latency = self._latency
        cached = lookup.cached if lookup is not None else None
        uncached = parsed.prompt_tokens - (cached or 0)
        if latency.depends_on_running:
            # Step by step, so that each gap reads R when it starts, as a stream's does.
            deadline = t0 + latency.ttft(uncached)
            await sleep_until(deadline)
            for _ in range(steps - 1):
                deadline = max(deadline, now()) + latency.itl(self._stats.generating)
                await sleep_until(deadline)
        else:
            await sleep_until(t0 + latency.generation_time(steps, uncached))
        transport = request.transport
        if transport is None or transport.is_closing():
            self._stats.requests_cancelled += 1
            return web.Response(status=499)  # never reaches the client: it has gone
        body = full_response(
            parsed.endpoint,
            self._config.model,
            plan.tokens,
            plan.finish_reason,
            parsed.prompt_tokens,
            reported_tokens=reported_tokens(plan.tokens, self._config.under_report_usage),
            reasoning_tokens=self._reasoning(parsed, plan),
            reasoning_field=self._config.reasoning_field,
            cached_tokens=cached,
            vocabulary=self._tokens.vocabulary,
        )
        self._stats.requests_ok += 1
        self._stats.output_tokens_total += plan.tokens
        self._stats.server.finished[plan.finish_reason] += 1
        self._cache_output(parsed, plan, lookup)
        return web.Response(body=body, content_type=_JSON)


class _CacheLookup(NamedTuple):
    """A request's prefix-cache lookup: its cached tokens and its prompt's block hashes."""

    cached: int
    hashes: list[int]


def _error_response(status: int, message: str, error_type: str, param: str | None = None) -> web.Response:
    return web.Response(status=status, body=error_body(message, error_type, status, param), content_type=_JSON)


class _TokenStream:
    """A streamed response in flight: at each deadline, the scheduler has it write one event.

    Token events go straight to the transport, pre-rendered and pre-framed: this is the hot
    path, and aiohttp's writer would only add overhead for a few hundred uncompressed bytes.
    The headers, the opening and the closing events go through aiohttp, so its framing
    state stays consistent. There is no backpressure: a client that stops reading has the
    rest of its response buffered, which is bounded by the response's length.

    `deadline` is the deadline of the latest event. `finished` becomes True after the last
    event and False if the client went away; the handler cancels it when it is itself
    cancelled, and the stream then stops.
    """

    __slots__ = (
        "_emitted",
        "_events",
        "_finished",
        "_last_event",
        "_last_index",
        "_last_tokens",
        "_last_write",
        "_latency",
        "_per_event",
        "_stats",
        "_transport",
        "deadline",
    )

    def __init__(
        self,
        transport: asyncio.Transport,
        plan: TokenEvents,
        events: tuple[bytes, ...],
        last_event: bytes,
        first_deadline: float,
        latency: LatencyModel,
        stats: MockStats,
        finished: asyncio.Future[bool],
    ) -> None:
        self._transport = transport
        self._events = events
        self._last_event = last_event
        self._last_index = plan.event_count - 1
        self._per_event = plan.tokens_per_event
        self._last_tokens = plan.last_tokens
        self._latency = latency
        self._stats = stats
        self._finished = finished
        self._emitted = 0
        self._last_write = 0.0
        self.deadline = first_deadline

    def fire(self) -> float | None:
        if self._finished.done():  # the handler was cancelled
            return None
        if self._transport.is_closing():
            self._finished.set_result(False)
            return None
        index = self._emitted
        self._emitted = index + 1
        self._record_emission(index)
        if index == self._last_index:
            self._transport.write(self._last_event)
            self._stats.output_tokens_total += self._last_tokens
            self._finished.set_result(True)
            return None
        self._transport.write(self._events[index % len(self._events)])
        self._stats.output_tokens_total += self._per_event
        return self._next_deadline()

    def _record_emission(self, index: int) -> None:
        # The mock's own timing, to judge a client's measurements against (`/stats/emission`).
        t = now()
        if index:
            self._stats.emission.record_gap(t - self._last_write)
        else:
            self._stats.emission.record_first(t - self.deadline)
        self._last_write = t

    def _next_deadline(self) -> float:
        # Like a real decode loop, a late event delays the ones after it: the next gap is
        # never shorter than the inter-token latency (a stream never "catches up" with a burst).
        self.deadline = max(self.deadline, now()) + self._latency.itl(self._stats.generating)
        return self.deadline


class _SplitTokenStream(_TokenStream):
    """A `_TokenStream` writing each event in pieces, one piece per scheduler pass.

    Each pass ends with the event loop polling for I/O, so a client on the other end sees
    the pieces in separate reads, as behind a proxy that re-chunks the bytes it forwards.
    An event's tokens count once its last piece is written.
    """

    __slots__ = ("_last_pieces", "_piece", "_pieces")

    def __init__(
        self,
        transport: asyncio.Transport,
        plan: TokenEvents,
        pieces: tuple[tuple[bytes, ...], ...],
        last_pieces: tuple[bytes, ...],
        first_deadline: float,
        latency: LatencyModel,
        stats: MockStats,
        finished: asyncio.Future[bool],
    ) -> None:
        super().__init__(transport, plan, (), b"", first_deadline, latency, stats, finished)
        self._pieces = pieces
        self._last_pieces = last_pieces
        self._piece = 0

    def fire(self) -> float | None:
        if self._finished.done():
            return None
        if self._transport.is_closing():
            self._finished.set_result(False)
            return None
        index = self._emitted
        last = index == self._last_index
        pieces = self._last_pieces if last else self._pieces[index % len(self._pieces)]
        self._transport.write(pieces[self._piece])
        self._piece += 1
        if self._piece < len(pieces):
            return now()  # later than this pass began, so the scheduler's next pass
        self._piece = 0
        self._emitted = index + 1
        self._record_emission(index)
        if last:
            self._stats.output_tokens_total += self._last_tokens
            self._finished.set_result(True)
            return None
        self._stats.output_tokens_total += self._per_event
        return self._next_deadline()


def _chunk(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk of a chunked body."""
    return b"%x\r\n%b\r\n" % (len(data), data)
