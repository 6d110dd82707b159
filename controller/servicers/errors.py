"""The one place that maps domain exceptions to gRPC status codes, with google.rpc details
(`BadRequest` field violations for invalid input)."""

from __future__ import annotations

import functools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import grpc
import structlog
from google.protobuf import any_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from controller.domain.errors import (
    DomainError,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)

log = structlog.get_logger(__name__)

_CODES: dict[type[DomainError], int] = {
    InvalidArgument: code_pb2.INVALID_ARGUMENT,
    NotFound: code_pb2.NOT_FOUND,
    FailedPrecondition: code_pb2.FAILED_PRECONDITION,
    ResourceExhausted: code_pb2.RESOURCE_EXHAUSTED,
}


# The status travels in trailers, which clients start refusing above 8 KiB: bound what one
# error carries (in UTF-8 bytes; the message is percent-encoded and repeated in the
# details), or a request with many bad fields would get a transport error, not its status.
MAX_VIOLATIONS = 8
_MAX_FIELD_BYTES = 96
_MAX_DESCRIPTION_BYTES = 160
_MAX_MESSAGE_BYTES = 600


def _clip(text: str, limit: int) -> str:
    data = text.encode()
    return text if len(data) <= limit else data[: limit - 3].decode(errors="ignore") + "..."


def to_status(exc: DomainError) -> grpc.Status:
    code = next((c for t, c in _CODES.items() if isinstance(exc, t)), code_pb2.INTERNAL)
    status = status_pb2.Status(code=code, message=_clip(str(exc), _MAX_MESSAGE_BYTES))
    if isinstance(exc, InvalidArgument):
        shown = exc.violations[:MAX_VIOLATIONS]
        violations = [
            error_details_pb2.BadRequest.FieldViolation(
                field=_clip(v.field, _MAX_FIELD_BYTES), description=_clip(v.description, _MAX_DESCRIPTION_BYTES)
            )
            for v in shown
        ]
        if len(exc.violations) > len(shown):
            violations.append(
                error_details_pb2.BadRequest.FieldViolation(
                    field="", description=f"and {len(exc.violations) - len(shown)} more violations"
                )
            )
        detail = any_pb2.Any()
        detail.Pack(error_details_pb2.BadRequest(field_violations=violations))
        status.details.append(detail)
    return rpc_status.to_status(status)


F = TypeVar("F", bound=Callable[..., Awaitable[Any]])
G = TypeVar("G", bound=Callable[..., AsyncIterator[Any]])


def unary_errors(fn: F) -> F:
    """Turn DomainError raised by a unary servicer method into its status."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        try:
            return await fn(self, request, context)
        except DomainError as exc:
            await context.abort_with_status(to_status(exc))

    return wrapper  # type: ignore[return-value]


def stream_errors(fn: G) -> G:
    """Same as unary_errors for server-streaming methods."""

    @functools.wraps(fn)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
        try:
            async for item in fn(self, request, context):
                yield item
        except DomainError as exc:
            await context.abort_with_status(to_status(exc))

    return wrapper  # type: ignore[return-value]
