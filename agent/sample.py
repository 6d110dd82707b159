"""One request's measurements, as the client records them and the batcher ships them.

A `RequestSample` is shared by the three load-path layers: the scheduler creates it (the
`scheduled` time), the client fills it in (`sent`, byte and token arrival times, usage,
outcome) and the batcher turns it into columns. All times are absolute readings of
`time.perf_counter_ns()` on this process (0 = did not happen); only the batcher converts
them, to wall-clock `sent` plus offsets, using one `ClockAnchor`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TypeAlias

from common.proto.loadtest.v1 import run_pb2

RequestStatus: TypeAlias = run_pb2.RequestStatus.ValueType

MAX_ERROR_CHARS = 200


@dataclass(slots=True)
class RequestSample:
    """Measurements of one request (perf_counter_ns readings, 0 = absent).

    `itl_ns` holds the gaps between consecutive text-carrying events, so it has one entry
    fewer than there were such events (none when there was at most one). `done_ns` is set
    for every outcome: a failed or cancelled request is done when its failure was seen.
    `retried`: the request was sent again on a fresh connection because the pooled one it
    first went out on turned out closed by the server (its times are the second send's).
    `connect_failed`: no connection to the target could be opened (refused, unreachable).
    Reasoning models: `first_reasoning_ns` / `first_answer_ns` are the first events carrying
    reasoning / answer text (`first_token_ns` is the first of either); `reasoning_tokens` is
    part of `output_tokens`. `cached_prompt_tokens` is the usage's prefix-cache count, valid
    when `cached_reported`. Conversations: `session_id` (from 1, unique in the assignment)
    and `turn_index` (from 1); `last_turn` marks a session's final turn. `answer_chunks`:
    when a list (conversations set it before sending), the parser appends every piece of
    answer text to it (not reasoning), so the next turn can carry the server's own reply.
    """

    scheduled_ns: int = 0
    sent_ns: int = 0
    first_byte_ns: int = 0
    first_token_ns: int = 0
    last_token_ns: int = 0
    done_ns: int = 0
    prompt_tokens: int = 0
    output_tokens: int = 0
    requested_input_tokens: int = 0
    requested_output_tokens: int = 0
    usage_from_server: bool = False
    warmup: bool = False
    retried: bool = False
    connect_failed: bool = False
    first_reasoning_ns: int = 0
    first_answer_ns: int = 0
    reasoning_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_reported: bool = False
    session_id: int = 0
    turn_index: int = 0
    last_turn: bool = False
    answer_chunks: list[str] | None = None
    status: RequestStatus = run_pb2.REQUEST_STATUS_UNSPECIFIED
    error: str = ""
    itl_ns: list[int] = field(default_factory=list)

    def fail(self, status: RequestStatus, error: str) -> None:
        """Record an error outcome; the first error wins, later ones are consequences."""
        if self.status in (run_pb2.REQUEST_STATUS_UNSPECIFIED, run_pb2.REQUEST_STATUS_OK):
            self.status = status
            self.error = error[:MAX_ERROR_CHARS]


@dataclass(frozen=True, slots=True)
class ClockAnchor:
    """A simultaneous (wall clock, monotonic clock) reading.

    Converting every monotonic time through one anchor keeps the relative times exact
    (wall-clock steps from NTP never distort a latency) while still giving the controller
    a wall-clock `sent` it can align across agents.
    """

    unix_ns: int
    perf_ns: int

    @classmethod
    def capture(cls) -> ClockAnchor:
        """Read both clocks now."""
        return cls(unix_ns=time.time_ns(), perf_ns=time.perf_counter_ns())

    def to_unix_ns(self, perf_ns: int) -> int:
        """The wall-clock time of a `perf_counter_ns()` reading."""
        return self.unix_ns + (perf_ns - self.perf_ns)


# Taken once at import, i.e. at process start: immutable, so it is a constant rather than
# shared mutable state, and every batch of this process uses the same mapping.
PROCESS_CLOCK_ANCHOR = ClockAnchor.capture()
