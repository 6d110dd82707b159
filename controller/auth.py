"""Per-call authentication and request ids, as one grpc.aio server interceptor.

With an API key configured (`LLM_LOADTEST_API_KEY`), mutating RunService methods and
AgentService.Connect need it in `x-api-key` (or `authorization: Bearer ...`) metadata;
reads stay public. A refusal is returned as a handler *of the same streaming kind* as
the refused method: a unary abort handler on the bidi Connect would leave the client
waiting until its deadline instead of failing at once.

Every call gets a request id (from `x-request-id` metadata, or generated) bound into
structlog's context and sent back in the initial metadata.
"""

from __future__ import annotations

import hashlib
import hmac
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import structlog

from common.grpc_options import API_KEY_METADATA, REQUEST_ID_METADATA

log = structlog.get_logger(__name__)

# Methods that need the key when one is configured. Anything else is a read.
PROTECTED_METHODS = frozenset(
    {
        "/loadtest.v1.RunService/CreateRun",
        "/loadtest.v1.RunService/CancelRun",
        "/loadtest.v1.RunService/DeleteRun",
        "/loadtest.v1.AgentService/Connect",
    }
)


def _metadata_key(metadata: tuple[tuple[str, str | bytes], ...]) -> str | None:
    for key, value in metadata:
        text = value.decode() if isinstance(value, bytes) else value
        if key == API_KEY_METADATA:
            return text
        if key == "authorization" and text.lower().startswith("bearer "):
            return text[7:].strip()
    return None


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, api_key: str | None) -> None:
        # Compare digests: constant time, and the key itself is not kept around.
        self._digest = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        metadata = tuple(details.invocation_metadata or ())
        request_id = next(
            (str(v) for k, v in metadata if k == REQUEST_ID_METADATA and v), None
        ) or uuid.uuid4().hex
        handler = await continuation(details)
        if handler is None:
            return handler
        method = details.method
        if self._digest is not None and method in PROTECTED_METHODS:
            presented = _metadata_key(metadata)
            if presented is None:
                return self._refuse(handler, method, request_id, "missing API key (x-api-key metadata)")
            digest = hashlib.sha256(presented.encode()).digest()
            if not hmac.compare_digest(digest, self._digest):
                return self._refuse(handler, method, request_id, "invalid API key")
        return _with_request_id(handler, method, request_id)

    def _refuse(
        self, handler: grpc.RpcMethodHandler, method: str, request_id: str, why: str
    ) -> grpc.RpcMethodHandler:
        log.warning("auth_denied", method=method, request_id=request_id, reason=why)

        async def abort(context: grpc.aio.ServicerContext) -> None:
            await context.send_initial_metadata(((REQUEST_ID_METADATA, request_id),))
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, why)

        return _same_kind(handler, abort)


def _same_kind(
    handler: grpc.RpcMethodHandler, abort: Callable[[grpc.aio.ServicerContext], Awaitable[None]]
) -> grpc.RpcMethodHandler:
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    if handler.request_streaming and handler.response_streaming:

        async def stream_stream(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await abort(context)
            yield  # pragma: no cover - makes this an async generator

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)
    if handler.request_streaming:

        async def stream_unary(_: Any, context: grpc.aio.ServicerContext) -> Any:
            await abort(context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
    if handler.response_streaming:

        async def unary_stream(_: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await abort(context)
            yield  # pragma: no cover

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)

    async def unary_unary(_: Any, context: grpc.aio.ServicerContext) -> Any:
        await abort(context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)


def _with_request_id(handler: grpc.RpcMethodHandler, method: str, request_id: str) -> grpc.RpcMethodHandler:
    """Wrap a handler so the call runs with its request id bound and echoed back."""
    deserializer, serializer = handler.request_deserializer, handler.response_serializer
    meta = ((REQUEST_ID_METADATA, request_id),)

    async def begin(context: grpc.aio.ServicerContext) -> None:
        structlog.contextvars.bind_contextvars(request_id=request_id, method=method)
        await context.send_initial_metadata(meta)

    if handler.request_streaming and handler.response_streaming:
        inner_ss = handler.stream_stream

        async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await begin(context)
            async for item in inner_ss(requests, context):
                yield item

        return grpc.stream_stream_rpc_method_handler(stream_stream, deserializer, serializer)
    if handler.response_streaming:
        inner_us = handler.unary_stream

        async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            await begin(context)
            async for item in inner_us(request, context):
                yield item

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserializer, serializer)
    if handler.request_streaming:
        inner_su = handler.stream_unary

        async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
            await begin(context)
            return await inner_su(requests, context)

        return grpc.stream_unary_rpc_method_handler(stream_unary, deserializer, serializer)
    inner_uu = handler.unary_unary

    async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
        await begin(context)
        return await inner_uu(request, context)

    return grpc.unary_unary_rpc_method_handler(unary_unary, deserializer, serializer)
