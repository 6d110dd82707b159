"""Authentication, authorization, rate limits, audit and request ids: one grpc.aio interceptor.

Every RPC the controller serves has one row in `METHOD_RULES`: the roles allowed and the
kind of call. A method without a row is refused (PERMISSION_DENIED) whatever the caller
presents, so adding an RPC without deciding who may call it cannot open it up.

Kinds:

* `PUBLIC`: anyone, always (health checks: load balancers and probes carry no keys).
* `READ`: public by default (as the original API); with `require_auth_for_reads`, only the
  roles listed. Read-rate limited.
* `WRITE`: mutating; only the roles listed; write-rate limited; audited whatever the outcome.
* `ADMIN_READ`: never public (key listing, the audit log; a dataset's content for agents);
  read-rate limited.
* `STREAM`: AgentService.Connect; not rate limited; the stream is ended (UNAUTHENTICATED)
  within seconds when its key is revoked or expires.

Refused calls (UNAUTHENTICATED, PERMISSION_DENIED, of any kind) are limited per client
address (its IP, without the port): past the refusal bucket they get RESOURCE_EXHAUSTED
(see controller/domain/access/ratelimit.py), and they are audited and logged aggregated, one row
per address, key id, method and outcome per minute (controller/domain/access/audit.py).

Keys come from `x-api-key` or `authorization: Bearer ...` metadata (see
controller/domain/access/keys.py). Only key ids reach logs and audit rows. A controller with no
key at all runs open: every call in the table is allowed, limits and audit still apply.

Refusals are raised inside a wrapper of the same streaming kind as the refused method (a
unary abort handler on the bidi Connect would leave the client waiting until its
deadline). A request that cannot be parsed gets INVALID_ARGUMENT (grpc itself would answer
UNKNOWN). Every call gets a request id (from `x-request-id`, or generated) bound into
structlog's context and sent back in the initial metadata.
"""

from __future__ import annotations

import asyncio
import enum
import inspect
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from common.grpc_options import API_KEY_ENV, API_KEY_METADATA, REQUEST_ID_METADATA
from controller.domain.access.audit import AuditEntry, AuditLog
from controller.domain.access.keys import InvalidCredentials, KeyStore, Principal, Role, key_id_of
from controller.domain.access.ratelimit import RateLimiter

log = structlog.get_logger(__name__)

# Says where a CLI user puts the key (the flag and its variable) and what other clients send.
MISSING_KEY_MESSAGE = (
    f"missing API key: pass --api-key or set {API_KEY_ENV} (other clients: {API_KEY_METADATA} metadata)"
)


class Kind(enum.Enum):
    """How a method is authorized, limited and audited (see the module docstring)."""

    PUBLIC = "public"
    READ = "read"
    WRITE = "write"
    ADMIN_READ = "admin_read"
    STREAM = "stream"


@dataclass(frozen=True)
class MethodRule:
    """Who may call one method, and what kind of call it is."""

    roles: frozenset[Role]
    kind: Kind


_ADMIN = frozenset({Role.ADMIN})
_READERS = frozenset({Role.ADMIN, Role.READER})
_EVERYONE = frozenset(Role)
_RUN = "/loadtest.v1.RunService/"
_KEYS = "/loadtest.v1.KeyService/"
_HEALTH = "/grpc.health.v1.Health/"
_DATASETS = "/loadtest.v1.DatasetService/"

# The one table of who may call what. Tests enumerate every method of every served
# service from the descriptors and fail on any method missing here.
METHOD_RULES: dict[str, MethodRule] = {
    _RUN + "CreateRun": MethodRule(_ADMIN, Kind.WRITE),
    _RUN + "CancelRun": MethodRule(_ADMIN, Kind.WRITE),
    _RUN + "DeleteRun": MethodRule(_ADMIN, Kind.WRITE),
    _RUN + "GetRun": MethodRule(_READERS, Kind.READ),
    _RUN + "ListRuns": MethodRule(_READERS, Kind.READ),
    _RUN + "WatchRun": MethodRule(_READERS, Kind.READ),
    _RUN + "GetRunResult": MethodRule(_READERS, Kind.READ),
    _RUN + "ListAgents": MethodRule(_READERS, Kind.READ),
    _RUN + "ExportRunSamples": MethodRule(_READERS, Kind.READ),
    _RUN + "CompareRuns": MethodRule(_READERS, Kind.READ),
    _RUN + "GetGroupResult": MethodRule(_READERS, Kind.READ),
    _RUN + "SetBaseline": MethodRule(_ADMIN, Kind.WRITE),
    _RUN + "DeleteBaseline": MethodRule(_ADMIN, Kind.WRITE),
    _RUN + "GetBaseline": MethodRule(_READERS, Kind.READ),
    _RUN + "ListBaselines": MethodRule(_READERS, Kind.READ),
    _RUN + "GetSeriesHistory": MethodRule(_READERS, Kind.READ),
    # Admin keys may connect agents too: the bootstrap LLM_LOADTEST_API_KEY has always
    # served both (backward compatible); dedicated agent keys are the better practice.
    "/loadtest.v1.AgentService/Connect": MethodRule(frozenset({Role.AGENT, Role.ADMIN}), Kind.STREAM),
    # Datasets' content goes to agents only (and admins), never public even with open reads.
    "/loadtest.v1.AgentService/FetchDataset": MethodRule(frozenset({Role.AGENT, Role.ADMIN}), Kind.ADMIN_READ),
    _DATASETS + "UploadDataset": MethodRule(_ADMIN, Kind.WRITE),
    _DATASETS + "DeleteDataset": MethodRule(_ADMIN, Kind.WRITE),
    _DATASETS + "GetDataset": MethodRule(_READERS, Kind.READ),
    _DATASETS + "ListDatasets": MethodRule(_READERS, Kind.READ),
    _KEYS + "CreateKey": MethodRule(_ADMIN, Kind.WRITE),
    _KEYS + "RevokeKey": MethodRule(_ADMIN, Kind.WRITE),
    _KEYS + "ListKeys": MethodRule(_ADMIN, Kind.ADMIN_READ),
    _KEYS + "ListAuditEvents": MethodRule(_ADMIN, Kind.ADMIN_READ),
    _HEALTH + "Check": MethodRule(_EVERYONE, Kind.PUBLIC),
    _HEALTH + "List": MethodRule(_EVERYONE, Kind.PUBLIC),
    _HEALTH + "Watch": MethodRule(_EVERYONE, Kind.PUBLIC),
    # The schema is no secret, but closed reads close it too.
    "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo": MethodRule(_READERS, Kind.READ),
}


def presented_key(metadata: tuple[tuple[str, str | bytes], ...]) -> str | None:
    """The API key in call metadata (`x-api-key`, or `authorization: Bearer ...`)."""
    for key, value in metadata:
        text = value.decode(errors="replace") if isinstance(value, bytes) else value
        if key == API_KEY_METADATA:
            return text
        if key == "authorization" and text[:7].lower() == "bearer ":
            return text[7:].strip()
    return None


def peer_host(peer: str) -> str:
    """`ipv4:127.0.0.1:5341` -> `ipv4:127.0.0.1` (the caller, without its port)."""
    return peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer


class _Refused(Exception):
    """A refusal; `key_id` is what its audit row names (empty when no key was examined)."""

    def __init__(self, code: grpc.StatusCode, message: str, retry_after_s: float = 0.0, key_id: str = "") -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after_s = retry_after_s
        self.key_id = key_id


class _Malformed:
    """Stands in for a request message that did not parse."""

    def __init__(self, error: str) -> None:
        self.error = error


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Applies METHOD_RULES, rate limits and audit to every call; attaches request ids."""

    def __init__(
        self,
        keys: KeyStore,
        audit: AuditLog,
        *,
        require_auth_for_reads: bool = False,
        limiter: RateLimiter | None = None,
    ) -> None:
        self.keys = keys
        self.audit = audit
        self.require_auth_for_reads = require_auth_for_reads
        self.limiter = limiter or RateLimiter()

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = tuple(details.invocation_metadata or ())
        request_id = next((str(v) for k, v in metadata if k == REQUEST_ID_METADATA and v), None) or uuid.uuid4().hex
        handler = await continuation(details)
        if handler is None:
            return handler
        call = _Call(self, details.method, presented_key(metadata), request_id[:128])
        return _wrap(handler, call)

    async def decide(self, method: str, token: str | None, peer: str) -> Principal:
        """The caller's principal if the call may proceed, else _Refused."""
        rule = METHOD_RULES.get(method)
        try:
            principal = await self._authorize(method, rule, token)
        except _Refused as refused:
            # Refusals are limited per client address, whatever key they present (a wrong
            # key per call must not buy a new bucket); allowed calls never wait here.
            wait = self.limiter.take_refusal(peer_host(peer))
            if wait > 0:
                limits = self.limiter.limits
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"too many refused calls from this address ({limits.refusal_rate:g}/s, bursts of "
                    f"{limits.refusal_burst:g}); this one: {refused.message}; retry in {wait:.2f} s",
                    wait,
                ) from None
            raise
        assert rule is not None  # _authorize refuses methods without a rule
        if rule.kind in (Kind.READ, Kind.WRITE, Kind.ADMIN_READ):
            # Public calls are limited by peer: an unverified key id in metadata could name
            # someone else's bucket.
            caller = principal.key_id or f"peer:{peer_host(peer)}"
            wait = self.limiter.take(caller, write=rule.kind is Kind.WRITE)
            if wait > 0:
                raise _Refused(
                    grpc.StatusCode.RESOURCE_EXHAUSTED,
                    f"rate limit of {caller if principal.key_id else 'this caller'} exceeded; retry in {wait:.2f} s",
                    wait,
                    principal.key_id,
                )
        return principal

    async def _authorize(self, method: str, rule: MethodRule | None, token: str | None) -> Principal:
        if rule is None:
            raise _Refused(grpc.StatusCode.PERMISSION_DENIED, f"method {method} is not allowed for anyone")
        public = rule.kind is Kind.PUBLIC or (rule.kind is Kind.READ and not self.require_auth_for_reads)
        if public or not await self.keys.auth_enabled():
            return Principal("", Role.ADMIN)
        if token is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, MISSING_KEY_MESSAGE)
        try:
            principal = await self.keys.authenticate(token)
        except InvalidCredentials as exc:
            # The id a wrong key claims: unverified, but what an admin wants to see.
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, str(exc), key_id=key_id_of(token)) from None
        if principal.role not in rule.roles:
            allowed = ", ".join(sorted(r.value for r in rule.roles))
            raise _Refused(
                grpc.StatusCode.PERMISSION_DENIED,
                f"a {principal.role.value} key may not call {method} (needs {allowed})",
                key_id=principal.key_id,
            )
        return principal


class _Call:
    """The auth state of one call, shared by the wrappers below."""

    def __init__(self, interceptor: AuthInterceptor, method: str, token: str | None, request_id: str) -> None:
        self.i = interceptor
        self.method = method
        self.token = token
        self.request_id = request_id
        rule = METHOD_RULES.get(method)
        self.audited = rule is not None and rule.kind is Kind.WRITE
        self.watched = rule is not None and rule.kind is Kind.STREAM
        self.principal: Principal | None = None

    async def admit(self, context: grpc.aio.ServicerContext, request: Any = None) -> None:
        """Bind the request id, then authorize; on refusal audit, log and abort."""
        structlog.contextvars.bind_contextvars(request_id=self.request_id, method=self.method)
        await context.send_initial_metadata(((REQUEST_ID_METADATA, self.request_id),))
        try:
            principal = self.principal = await self.i.decide(self.method, self.token, context.peer())
        except _Refused as refused:
            first = await self.record(
                context, refused.code.name, refused.key_id, request, None, refused.message, refused=True
            )
            # Logged like the audit log aggregates: a flood of refusals is not a flood of lines.
            (log.warning if first else log.debug)(
                "auth_denied", key_id=refused.key_id, code=refused.code.name, reason=refused.message
            )
            if refused.retry_after_s > 0:
                await context.abort_with_status(_retry_status(refused.message, refused.retry_after_s))
            await context.abort(refused.code, refused.message)
            raise  # not reached: abort raises
        structlog.contextvars.bind_contextvars(key_id=principal.key_id)
        if isinstance(request, _Malformed):
            await self.finish(context, request, None, "INVALID_ARGUMENT")
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)

    async def finish(self, context: grpc.aio.ServicerContext, request: Any, response: Any, outcome: str) -> None:
        if self.audited:
            key_id = self.principal.key_id if self.principal else ""
            await asyncio.shield(self.record(context, outcome, key_id, request, response, ""))

    async def record(
        self,
        context: grpc.aio.ServicerContext,
        outcome: str,
        key_id: str,
        request: Any,
        response: Any,
        detail: str,
        *,
        refused: bool = False,
    ) -> bool:
        """Audit this call: a row of its own, or (a refusal) a count in its address's row of the
        minute. True when a new row was written."""
        run_id, subject = _subject(request, response)
        detail = "; ".join(x for x in (subject, detail) if x)
        try:
            if refused:
                return await self.i.audit.record_refusal(
                    AuditEntry(key_id, self.method, outcome, self.request_id, peer_host(context.peer()), run_id, detail)
                )
            await self.i.audit.record(
                AuditEntry(key_id, self.method, outcome, self.request_id, context.peer(), run_id, detail)
            )
        except Exception:  # the call's own outcome matters more than its audit row
            log.exception("audit_write_failed")
        return True


def _retry_status(message: str, retry_after_s: float) -> grpc.Status:
    delay = duration_pb2.Duration()
    delay.FromNanoseconds(max(int(retry_after_s * 1e9), 1_000_000))
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.RetryInfo(retry_delay=delay))
    return rpc_status.to_status(status_pb2.Status(code=code_pb2.RESOURCE_EXHAUSTED, message=message, details=[detail]))


def _subject(request: Any, response: Any) -> tuple[str, str]:
    """(run id, detail naming the key or the series) a call concerned, from its request or response."""
    run_id = key = series = dataset = ""
    for message in (request, response):
        if message is None or isinstance(message, _Malformed) or not hasattr(message, "DESCRIPTOR"):
            continue
        fields = message.DESCRIPTOR.fields_by_name
        if "run_id" in fields and not run_id:
            run_id = str(message.run_id)
        if "run" in fields and message.HasField("run") and not run_id:
            run_id = message.run.id
        if "key_id" in fields and not key:
            key = str(message.key_id)
        if "key" in fields and message.HasField("key") and not key:
            key = message.key.id
        if message.DESCRIPTOR.name.endswith("BaselineRequest") and not series:
            series = str(message.name)
        if "dataset_id" in fields and not dataset:
            dataset = str(message.dataset_id)
        if "dataset" in fields and message.DESCRIPTOR.name.endswith("DatasetResponse") and not dataset:
            dataset = message.dataset.id
    if dataset:
        return run_id[:128], f"dataset {dataset[:64]}"
    if series:
        return run_id[:128], f"baseline {series[:64]}"
    return run_id[:128], f"key {key[:64]}" if key else ""


def _outcome(context: grpc.aio.ServicerContext, exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "CANCELLED"
    code = context.code()
    return code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"


def _safe(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def parse(data: bytes) -> Any:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, TypeError) as exc:
            return _Malformed(f"malformed request message: {type(exc).__name__}")

    return parse


async def _checked(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
    async for item in requests:
        if isinstance(item, _Malformed):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, item.error)
        yield item


def _wrap(handler: grpc.RpcMethodHandler, call: _Call) -> grpc.RpcMethodHandler:
    """`handler` behind `call.admit`, of the same streaming kind."""
    deserializer, serializer = _safe(handler.request_deserializer), handler.response_serializer

    if handler.request_streaming and handler.response_streaming:
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await call.admit(context)
            stream = inner_ss(_checked(requests, context), context)
            key_id = call.principal.key_id if call.principal else ""
            if not call.watched or key_id in ("", "bootstrap"):
                async for item in stream:
                    yield item
                return
            with call.i.keys.watch(key_id) as revoked:
                async for item in _until(stream, revoked):
                    yield item
                if revoked.is_set():
                    message = f"API key {key_id} was revoked or has expired; stream ended"
                    log.warning("stream_ended_key_revoked", key_id=key_id)
                    await call.record(context, "UNAUTHENTICATED", key_id, None, None, message)
                    await context.abort(grpc.StatusCode.UNAUTHENTICATED, message)

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)

    if handler.response_streaming and not inspect.isasyncgenfunction(handler.unary_stream):
        # A coroutine that writes its responses with context.write (as the aio health servicer).
        inner_uw = handler.unary_stream

        async def unary_write(request: Any, context: grpc.aio.ServicerContext) -> None:
            await call.admit(context, request)
            await inner_uw(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_write, deserializer, serializer)

    if handler.response_streaming:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await call.admit(context, request)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)

    if handler.request_streaming:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await call.admit(context)
            try:
                response = await inner_su(_checked(requests, context), context)
            except BaseException as exc:
                await call.finish(context, None, None, _outcome(context, exc))
                raise
            await call.finish(context, None, response, "OK")
            return response

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)

    inner_uu = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await call.admit(context, request)
        try:
            response = await inner_uu(request, context)
        except BaseException as exc:
            await call.finish(context, request, None, _outcome(context, exc))
            raise
        await call.finish(context, request, response, "OK")
        return response

    return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)


async def _until(stream: AsyncIterator[Any], stop: asyncio.Event) -> AsyncIterator[Any]:
    """Items of `stream` until it ends or `stop` is set (then the stream is cancelled)."""
    stopped = asyncio.ensure_future(stop.wait())
    item: asyncio.Future[Any] | None = None
    try:
        while True:
            item = asyncio.ensure_future(anext(stream))
            done, _ = await asyncio.wait({item, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if item not in done:
                return
            try:
                value = item.result()
            except StopAsyncIteration:
                return
            yield value
    finally:
        stopped.cancel()
        if item is not None and not item.done():
            # Stopped, or this generator itself cancelled or closed while the stream's next
            # item was pending: that step must be over before the stream can be closed (an
            # aclose of a generator that is still running raises RuntimeError).
            item.cancel()
            await asyncio.gather(item, return_exceptions=True)
        aclose = getattr(stream, "aclose", None)
        if aclose is not None:
            await aclose()
