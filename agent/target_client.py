"""How a request is sent: OpenAI-compatible chat/completions over one shared aiohttp session.

`TargetClient` is created per assignment from its `Target`. `send()` performs one request
and fills in a `RequestSample`; it never raises for anything that happens on the wire:
HTTP errors, timeouts, broken connections and malformed streams become samples with an
error status. The one exception that passes through is `asyncio.CancelledError` (a cancelled
run or stage), after the sample has been marked `cancelled`, because swallowing it would
break the cancellation of the task that awaits us.

Timing: `sent` is stamped just before the request is handed to aiohttp. A streamed body is
parsed inside the connection's `data_received` (`agent.stream`): every network read is
stamped with `perf_counter_ns()` before aiohttp even parses it, and its SSE events are then
parsed on the spot (`agent.sse`), so neither a task wake-up nor JSON decoding inflates a
latency; the request task only waits for the end of the response. Error bodies and
non-streamed answers are read in the task as usual.

Connection reuse: a request whose pooled connection turns out closed by the server before
anything of the response arrived is sent again, once, on a fresh connection, and its sample
is flagged `retried` with the times of the second send. Servers that close a connection
right after a response while advertising keep-alive (llama.cpp's `llama-server`), and idle
timeouts that cross a request, cause exactly this; curl, browsers and Go's net/http retry it
the same way. Only that case is retried: not a fresh connection that fails, not a failure
after any byte of the response arrived, not a timeout: the server may have started those.
A connection that could not be opened at all is recorded as `connect_failed` (the
assignment's back-off and dead-target rule act on it, `agent.reachability`).

Request body: `model`, `messages` (chat) or `prompt` (completions), `max_tokens`, `stream`
and, when streaming, `stream_options.include_usage`; then the target's `extra_body` fields,
which can add parameters but never replace those (`PROTECTED_BODY_KEYS`); then the
workload's output-length controls, which win over `extra_body`: `ignore_eos: true`, and
`min_tokens` equal to `max_tokens` (`pin_min_tokens`). `extra_body` comes as a protobuf
`Struct`, whose numbers are all doubles; integral values are sent as JSON integers (`1`,
not `1.0`), since servers validate fields such as `top_k` as integers.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Mapping, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
import structlog
from google.protobuf import json_format

from agent.sample import MAX_ERROR_CHARS, RequestSample, RequestStatus
from agent.sse import StreamParser, error_message, parse_json_body
from agent.stream import BodySink, StreamingConnector, TimedResponseHandler, TrackedBody
from agent.wire_errors import printable, transport_error
from common.proto.loadtest.v1 import run_pb2
from common.request_body import PROTECTED_BODY_KEYS
from common.spec_defaults import request_timeout_s
from common.version import __version__

# Enough of an error body for the server's message; more would only bloat the samples.
_ERROR_BODY_BYTES = 1024

_REDACTED = "[redacted]"

_DRAIN_AFTER_DONE_S = 1.0

log = structlog.get_logger(__name__)


class TargetConfigError(ValueError):
    """The target cannot be used (bad URL scheme, no model)."""


class TargetClient:
    """Sends completion requests to one target and records what happened.

    Must be created inside a running event loop (aiohttp binds its session to it); close it
    with `close()` or use it as an async context manager.
    """

    def __init__(self, target: run_pb2.Target, *, ignore_eos: bool = False, pin_min_tokens: bool = False) -> None:
        base_url = target.base_url.rstrip("/")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise TargetConfigError("target base_url must be an http:// or https:// URL")
        if not target.model:
            raise TargetConfigError("target model is required")
        self._chat = target.api_kind != run_pb2.API_KIND_COMPLETIONS
        self._url = base_url + ("/chat/completions" if self._chat else "/completions")
        self._model = target.model
        self._stream = target.stream if target.HasField("stream") else True
        self._timeout_s = request_timeout_s(target)
        self._base_url = base_url
        self._ignore_eos = ignore_eos
        self._pin_min_tokens = pin_min_tokens
        self._extra_body = extra_body_fields(target)

        headers: dict[str, str] = {
            "Content-Type": "application/json",
            "User-Agent": f"llm-loadtest/{__version__}",
        }
        headers.update(target.headers)
        if target.api_key:
            headers["Authorization"] = f"Bearer {target.api_key}"
        # Values that must never reach an error string (and so the store or a log), even
        # if a server echoes them back in an error body.
        secrets = [target.api_key, *target.headers.values(), parts.password or ""]
        self._secrets = tuple(s for s in secrets if len(s) >= 4)

        self._headers = headers
        self._ssl = not target.insecure_skip_verify
        self._session = aiohttp.ClientSession(
            # limit=0: the scheduler decides concurrency; a connector cap would add hidden
            # client-side queueing that no sample would show.
            connector=StreamingConnector(limit=0, ttl_dns_cache=300, ssl=self._ssl),
            timeout=aiohttp.ClientTimeout(total=self._timeout_s),
            headers=headers,
        )
        # Retries go out on connections of their own (never a pooled one); made on first use.
        self._fresh_session: aiohttp.ClientSession | None = None

    @property
    def streaming(self) -> bool:
        """Whether responses are requested as SSE streams."""
        return self._stream

    @property
    def session(self) -> aiohttp.ClientSession:
        """The HTTP session (its connection pool), for other requests to the same target."""
        return self._session

    @property
    def base_url(self) -> str:
        """The target's base URL, without a trailing slash."""
        return self._base_url

    @property
    def url(self) -> str:
        """The completion endpoint requests go to."""
        return self._url

    @property
    def model(self) -> str:
        """The `model` sent with every request."""
        return self._model

    @property
    def chat(self) -> bool:
        """True for chat completions, False for completions."""
        return self._chat

    def redact(self, text: str) -> str:
        """`text` with the target's credentials replaced by `[redacted]`."""
        return self._redact(text)

    async def __aenter__(self) -> TargetClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the HTTP session and its connections."""
        await self._session.close()
        if self._fresh_session is not None:
            await self._fresh_session.close()

    def fresh_session(self) -> aiohttp.ClientSession:
        """A session whose every request opens its own connection (closed after it)."""
        if self._fresh_session is None:
            self._fresh_session = aiohttp.ClientSession(
                connector=StreamingConnector(limit=0, force_close=True, ssl=self._ssl),
                timeout=aiohttp.ClientTimeout(total=self._timeout_s),
                headers=self._headers,
            )
        return self._fresh_session

    def encode_body(self, prompt: str, max_tokens: int, messages: Sequence[Mapping[str, str]] | None = None) -> bytes:
        """The JSON request body for one prompt (chat: `messages` instead of the prompt, if given)."""
        body: dict[str, Any] = {"model": self._model, "max_tokens": max_tokens}
        if self._chat:
            body["messages"] = messages if messages else [{"role": "user", "content": prompt}]
        else:
            body["prompt"] = prompt
        body["stream"] = self._stream
        if self._stream:
            body["stream_options"] = {"include_usage": True}
        if self._extra_body:
            body.update(self._extra_body)
        if self._ignore_eos:
            body["ignore_eos"] = True
        if self._pin_min_tokens:
            body["min_tokens"] = max_tokens
        return orjson.dumps(body, default=_json_default)

    async def preconnect(self, connections: int, timeout_s: float = 5.0) -> int:
        """Open up to `connections` keep-alive connections before the load starts.

        Sends that many concurrent `GET {base_url}/models` and reads each answer to the end,
        which leaves its connection in the pool for the first requests of the stage. Any
        failure is ignored (a server without `/models` still leaves the connection open
        when it answers 404). Returns how many requests got an answer.
        """

        async def one() -> bool:
            try:
                async with self._session.get(self._base_url + "/models", allow_redirects=False) as resp:
                    await resp.read()
                    return True
            except (aiohttp.ClientError, OSError, TimeoutError):
                return False

        answered = 0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                results = await asyncio.gather(*(one() for _ in range(connections)))
                answered = sum(results)
        return answered

    async def send(
        self,
        prompt: str,
        max_tokens: int,
        sample: RequestSample | None = None,
        *,
        messages: Sequence[Mapping[str, str]] | None = None,
    ) -> RequestSample:
        """Send one request; return its sample (the one given, filled in, or a new one).

        The caller may pass the sample (with `scheduled_ns` set) so it still holds the
        partial measurements if this coroutine is cancelled. `messages` replaces the prompt
        as the chat messages (ignored for completions).
        """
        if sample is None:
            sample = RequestSample()
        body = self.encode_body(prompt, max_tokens, messages)
        clock = time.perf_counter_ns
        sample.sent_ns = clock()
        if not sample.scheduled_ns:
            sample.scheduled_ns = sample.sent_ns
        if await self._exchange(body, sample, self._session):
            # The pooled connection was already closed by the server: send again, timed anew.
            sample.retried = True
            sample.sent_ns = clock()
            await self._exchange(body, sample, self.fresh_session())
        return sample

    async def _exchange(self, body: bytes, sample: RequestSample, session: aiohttp.ClientSession) -> bool:
        """One attempt at the request, recorded in `sample`; True, with nothing recorded,
        when a pooled connection turned out closed before anything of the response came."""
        parser = StreamParser(sample, chat=self._chat) if self._stream else None
        pooled = session is self._session
        data = TrackedBody(body) if pooled else body
        try:
            async with session.post(self._url, data=data, allow_redirects=False) as resp:
                if resp.status >= 300:
                    await self._record_http_error(resp, sample)
                elif parser is not None:
                    await self._read_stream(resp, parser, sample.sent_ns)
                else:
                    await self._read_json(resp, sample)
        except TimeoutError:
            self._record_error(
                sample,
                parser,
                run_pb2.REQUEST_STATUS_TIMEOUT,
                f"request timed out after {self._timeout_s:g} s",
            )
        except asyncio.CancelledError:
            self._record_error(sample, parser, run_pb2.REQUEST_STATUS_CANCELLED, "cancelled")
            raise
        except (aiohttp.ClientError, OSError) as exc:
            if isinstance(data, TrackedBody) and _closed_before_answer(data, exc, sample.sent_ns):
                return True
            if isinstance(exc, aiohttp.ClientConnectorError):
                sample.connect_failed = True
            # ClientConnectionError, ClientPayloadError (body cut short) and socket errors.
            self._record_error(sample, parser, run_pb2.REQUEST_STATUS_CONNECTION, transport_error(exc))
        except Exception as exc:
            # Anything else aiohttp raises while talking to the server (e.g. a header it
            # refuses to send) is still one failed request, not a reason to stop the load.
            self._record_error(
                sample,
                parser,
                run_pb2.REQUEST_STATUS_CONNECTION,
                f"client error: {transport_error(exc)}",
            )
        return False

    async def _read_stream(self, resp: aiohttp.ClientResponse, parser: StreamParser, sent_ns: int) -> None:
        """Parse an SSE body as it arrives (see `agent.stream`); return when it is over.

        What arrived with the headers is parsed at once, stamped with the read that brought
        it; from then on the connection parses every read inside `data_received` and this
        task only waits for the end. The request timeout counts from `sent`.
        """
        clock = time.perf_counter_ns
        loop = asyncio.get_running_loop()
        connection = resp.connection
        protocol = connection.protocol if connection is not None else None
        timed = protocol if isinstance(protocol, TimedResponseHandler) else None
        sink = BodySink(resp.content, parser, loop)
        sink.start(timed.read_ns if timed is not None and timed.read_ns else clock())
        deadline = loop.time() + self._timeout_s - (clock() - sent_ns) / 1e9
        if timed is None and not sink.woken.done():
            await self._read_stream_in_task(resp, parser)
            return
        # A plain timer rather than `asyncio.timeout`: one handle per request, and it fails
        # the sink's future like any other end of the stream.
        timer = loop.call_at(deadline, sink.fail, TimeoutError())
        try:
            if timed is not None and not sink.woken.done():
                timed.attach(sink)
            await sink.woken  # raises what ended the stream, if it failed
            if parser.done and not sink.eof:
                # The end of the body lets aiohttp pool the connection; a server that keeps
                # it open after [DONE] must not hold the worker until the request timeout.
                sink.rearm(loop)
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_DRAIN_AFTER_DONE_S):
                        await sink.woken
        finally:
            timer.cancel()
            sink.detach()
        parser.finish(clock())

    async def _read_stream_in_task(self, resp: aiohttp.ClientResponse, parser: StreamParser) -> None:
        """The fallback for a connection that is not a `TimedResponseHandler`: read in the task."""
        clock = time.perf_counter_ns
        async for chunk in resp.content.iter_any():
            parser.feed(chunk, clock())
            if parser.closed:
                break  # [DONE] or a protocol error: the rest cannot matter
        if parser.done and not resp.content.is_eof():
            await _drain_after_done(resp)
        parser.finish(clock())

    async def _read_json(self, resp: aiohttp.ClientResponse, sample: RequestSample) -> None:
        clock = time.perf_counter_ns
        chunks: list[bytes] = []
        last_ns = 0
        async for chunk in resp.content.iter_any():
            last_ns = clock()
            if not sample.first_byte_ns:
                sample.first_byte_ns = last_ns
            chunks.append(chunk)
        sample.done_ns = last_ns or clock()
        parse_json_body(sample, b"".join(chunks), chat=self._chat)

    async def _record_http_error(self, resp: aiohttp.ClientResponse, sample: RequestSample) -> None:
        code = resp.status
        status: RequestStatus
        if 400 <= code < 500:
            status = run_pb2.REQUEST_STATUS_HTTP_4XX
        elif code >= 500:
            status = run_pb2.REQUEST_STATUS_HTTP_5XX
        else:  # redirects are not followed: a model endpoint that moved is misconfigured
            status = run_pb2.REQUEST_STATUS_PROTOCOL
        # Status first: if reading the body fails, the HTTP status stays the outcome.
        sample.fail(status, f"HTTP {code}")
        clock = time.perf_counter_ns
        body = bytearray()
        while len(body) < _ERROR_BODY_BYTES:
            chunk = await resp.content.readany()
            if not chunk:
                break
            if not sample.first_byte_ns:
                sample.first_byte_ns = clock()
            body += chunk
        sample.done_ns = clock()
        detail = _error_detail(bytes(body[:_ERROR_BODY_BYTES]))
        if detail:
            sample.error = self._redact(f"HTTP {code}: {detail}")[:MAX_ERROR_CHARS]

    def _record_error(
        self,
        sample: RequestSample,
        parser: StreamParser | None,
        status: RequestStatus,
        message: str,
    ) -> None:
        if parser is not None:
            parser.settle_tokens()
            if parser.done:
                return  # the response was complete; only the trailing read failed
        if not sample.done_ns:
            sample.done_ns = time.perf_counter_ns()
        sample.fail(status, self._redact(message))

    def _redact(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, _REDACTED)
        return text


def _closed_before_answer(body: TrackedBody, exc: BaseException, sent_ns: int) -> bool:
    """Whether a failed request met a pooled connection the server had already closed.

    The connection came from the pool, the failure is the connection's (closed, reset, the
    write failed; not one that could not be opened, not a cut body) and not one byte arrived
    on it since the request was sent: the server closed it without answering, which a
    server working on the request does not do.
    """
    connection = body.connection
    if not body.reused or connection is None or connection.read_ns >= sent_ns:
        return False
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False
    return isinstance(exc, aiohttp.ClientConnectionError | ConnectionError)


async def _drain_after_done(resp: aiohttp.ClientResponse) -> None:
    """Read the end of the body after `[DONE]`, briefly.

    Servers end the body right after `[DONE]`; reading that end lets aiohttp put the
    connection back in the pool (an unfinished body would close it, and the next request
    would pay for a new connection). A server that keeps the body open after `[DONE]`
    must not hold the worker until the request timeout, hence the bound.
    """
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(_DRAIN_AFTER_DONE_S):
            while await resp.content.readany():
                pass


def extra_body_fields(target: run_pb2.Target) -> dict[str, Any]:
    """The target's `extra_body` as JSON values, without the keys llm-loadtest sets itself."""
    if not target.HasField("extra_body"):
        return {}
    fields = {k: _json_numbers(v) for k, v in json_format.MessageToDict(target.extra_body).items()}
    dropped = sorted(fields.keys() & PROTECTED_BODY_KEYS)
    if dropped:
        # The controller refuses these at CreateRun; an older controller may not.
        log.warning("extra_body_keys_ignored", keys=dropped)
    return {k: v for k, v in fields.items() if k not in PROTECTED_BODY_KEYS}


def _json_numbers(value: Any) -> Any:
    """Struct numbers are doubles: send the integral ones as JSON integers."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return int(value)
    if isinstance(value, dict):
        return {k: _json_numbers(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_numbers(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    """What orjson cannot encode itself: other mappings and sequences (e.g. caller's messages)."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def _error_detail(body: bytes) -> str:
    """The server's error message from an error body (JSON `error` if present)."""
    text = body.decode("utf-8", errors="replace").strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            pass
        else:
            if isinstance(parsed, Mapping):
                for key in ("error", "detail", "message"):
                    if parsed.get(key):
                        return error_message(parsed[key])
    return printable(text, MAX_ERROR_CHARS)
