"""The codes of the API in Python: run and assignment states, request statuses, sample flags.

Each class is bound to a loadtest.v1 enum the way temporalio binds `RetryState` to its API:
every member's value is the generated proto value, so a code compared in Python, stored in
SQLite (runs.state, assignments.state, the status and flags columns of a sample batch) and
sent on the wire is one number with one name. Members exist for the values the code uses;
the `_UNSPECIFIED` zeros are not states anything is ever in.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final

from common.proto.loadtest.v1 import agent_service_pb2, run_pb2


class RunState(IntEnum):
    """loadtest.v1.RunState: where a run is in its lifecycle."""

    PENDING = int(run_pb2.RUN_STATE_PENDING)
    RUNNING = int(run_pb2.RUN_STATE_RUNNING)
    SUCCEEDED = int(run_pb2.RUN_STATE_SUCCEEDED)
    FAILED = int(run_pb2.RUN_STATE_FAILED)
    CANCELLED = int(run_pb2.RUN_STATE_CANCELLED)
    INTERRUPTED = int(run_pb2.RUN_STATE_INTERRUPTED)


# A run in one of these never changes state again. A set of ints, as states read from the store
# or the wire are.
FINAL_RUN_STATES: Final[frozenset[int]] = frozenset(
    {RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED, RunState.INTERRUPTED}
)


class AssignmentState(IntEnum):
    """loadtest.v1.AssignmentState: an assignment's state as its agent reports it, or LOST."""

    RUNNING = int(agent_service_pb2.ASSIGNMENT_STATE_RUNNING)
    COMPLETED = int(agent_service_pb2.ASSIGNMENT_STATE_COMPLETED)
    FAILED = int(agent_service_pb2.ASSIGNMENT_STATE_FAILED)
    CANCELLED = int(agent_service_pb2.ASSIGNMENT_STATE_CANCELLED)
    # Set by the controller only, never accepted from an agent: the agent running it was lost.
    LOST = int(agent_service_pb2.ASSIGNMENT_STATE_LOST)


class RequestStatus(IntEnum):
    """loadtest.v1.RequestStatus: the outcome of one request (a sample's `status`)."""

    OK = int(run_pb2.REQUEST_STATUS_OK)
    HTTP_4XX = int(run_pb2.REQUEST_STATUS_HTTP_4XX)
    HTTP_5XX = int(run_pb2.REQUEST_STATUS_HTTP_5XX)
    TIMEOUT = int(run_pb2.REQUEST_STATUS_TIMEOUT)
    CONNECTION = int(run_pb2.REQUEST_STATUS_CONNECTION)
    PROTOCOL = int(run_pb2.REQUEST_STATUS_PROTOCOL)
    CANCELLED = int(run_pb2.REQUEST_STATUS_CANCELLED)


class SampleFlag(IntFlag):
    """The bits of a sample's `flags` (loadtest.v1.SampleBatch.flags; the proto has no enum for
    them, so its comment on that field and this class are the definition)."""

    # Bit 0: token counts came from the server's `usage`, not from counting events.
    USAGE_FROM_SERVER = 1 << 0
    # Bit 1: a warmup request, excluded from every metric.
    WARMUP = 1 << 1
    # Bit 2: sent again on a fresh connection (the kept-alive one it first went out on had been
    # closed by the server before anything of the response arrived); its times are the second send's.
    RETRIED = 1 << 2
    # Bit 3: the server's usage reported the prompt's cached tokens (`cached_prompt_tokens`
    # is a count, not "unknown").
    CACHED_REPORTED = 1 << 3
    # Bit 4: the last turn of its conversation (a session is complete when this turn and
    # every earlier one succeeded).
    LAST_TURN = 1 << 4
