"""Domain exceptions. Servicers map them to gRPC status codes in one place
(controller/servicers/errors.py); domain code never imports grpc."""

from __future__ import annotations

from dataclasses import dataclass


class DomainError(Exception):
    """Base of every error the API reports to callers."""


@dataclass(frozen=True)
class FieldViolation:
    """One invalid field: its path in the request (e.g. `spec.stages[0].concurrency`)."""

    field: str
    description: str


class InvalidArgument(DomainError):
    """The request is malformed; `violations` name each offending field."""

    def __init__(self, violations: list[FieldViolation]) -> None:
        self.violations = violations
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))


class NotFound(DomainError):
    """The named resource does not exist."""


class FailedPrecondition(DomainError):
    """The resource is not in a state that allows the operation."""


class ResourceExhausted(DomainError):
    """A limit was reached."""
