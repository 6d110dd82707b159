"""What a capacity search's outcome (`RunResult.capacity`) says about the server: whether it
measured a capacity, and the capacity as one number to compare and gate on. The client prints
it, the controller compares it; both read it here so that they cannot disagree."""

from __future__ import annotations

from typing import Final

from common.proto.loadtest.v1 import run_pb2

# SearchSpec.tolerance_percent when unset (the proto's comment).
DEFAULT_SEARCH_TOLERANCE_PERCENT: Final = 5.0
# Stop reasons after which the highest passing load is the server's capacity (a lower bound
# after MAX_PASSED and MAX_PROBES). After GENERATOR_SATURATED the limit may be the load
# generator's, and after RUN_ENDED the search was cut short: no capacity then.
CAPACITY_STOP_REASONS: Final = frozenset(
    {
        run_pb2.SEARCH_STOP_REASON_CONVERGED,
        run_pb2.SEARCH_STOP_REASON_MAX_PASSED,
        run_pb2.SEARCH_STOP_REASON_MAX_PROBES,
    }
)


def capacity_measured(capacity: run_pb2.CapacityResult) -> bool:
    """True when the search found a capacity: a passing load, and a stop that makes it the
    server's limit (not the load generator's, not an early end)."""
    return capacity.HasField("highest_passing") and capacity.stop_reason in CAPACITY_STOP_REASONS


def capacity_value(capacity: run_pb2.CapacityResult) -> float | None:
    """`capacity_number` of a CapacityResult."""
    highest = capacity.highest_passing if capacity.HasField("highest_passing") else None
    return capacity_number(highest, capacity.stop_reason)


def capacity_number(highest_passing: float | None, stop_reason: int) -> float | None:
    """The capacity as a number: the highest passing load after a stop that measured one; 0
    when even the lowest load failed; after target errors the highest passing load (0 when
    none passed: the server fails, a capacity of its own making); None when nothing was
    measured (the generator saturated, the run ended, the search reported nothing)."""
    if highest_passing is not None and stop_reason in CAPACITY_STOP_REASONS:
        return highest_passing
    if stop_reason == run_pb2.SEARCH_STOP_REASON_MIN_FAILED:
        return 0.0
    if stop_reason == run_pb2.SEARCH_STOP_REASON_TARGET_ERRORS:
        return highest_passing if highest_passing is not None else 0.0
    return None


def variable_name(variable: int) -> str:
    """`concurrency` or `rate` (`unspecified` when not set)."""
    return run_pb2.SearchVariable.Name(variable).removeprefix("SEARCH_VARIABLE_").lower()  # type: ignore[arg-type]
