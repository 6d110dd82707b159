"""Defaults of RunSpec fields that the controller and the agents both apply (the values the
protos' comments state), so that the two sides cannot disagree about them."""

from __future__ import annotations

from typing import Final

from common.durations import positive_seconds_or
from common.proto.loadtest.v1 import run_pb2

# Target.request_timeout and Target.unreachable_timeout when unset.
DEFAULT_REQUEST_TIMEOUT_S: Final = 300.0
DEFAULT_UNREACHABLE_TIMEOUT_S: Final = 10.0
# ServerMetricsSpec.scrape_interval when unset, and the shortest one allowed.
DEFAULT_SCRAPE_INTERVAL_S: Final = 1.0
MIN_SCRAPE_INTERVAL_S: Final = 0.1


def request_timeout_s(target: run_pb2.Target) -> float:
    """The target's per-request timeout in seconds (DEFAULT_REQUEST_TIMEOUT_S unless positive)."""
    return positive_seconds_or(target.request_timeout, DEFAULT_REQUEST_TIMEOUT_S)


def unreachable_timeout_s(target: run_pb2.Target) -> float:
    """How long the target may refuse connections before the stage fails, in seconds
    (DEFAULT_UNREACHABLE_TIMEOUT_S unless positive)."""
    return positive_seconds_or(target.unreachable_timeout, DEFAULT_UNREACHABLE_TIMEOUT_S)
