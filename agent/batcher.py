"""Where samples go: columnar `SampleBatch` messages, kept until the controller acks them.

`SampleBatcher` serves one assignment. `add()` appends a sample to the pending columns and
never blocks, so a request that is being cancelled can still record itself. Pending samples
are sealed into a batch every `flush_interval_s` (by `run()`), when `max_batch_samples` are
pending, or on `flush()`. Every sealed batch gets the next `batch_seq` (1, 2, 3, ...), is
handed to `emit` (the session's outbound queue, or nowhere while disconnected) and is kept
until a cumulative ack covers it; `unacked()` returns the kept batches for replay after a
reconnect.

Memory is bounded by backpressure, not by dropping data: while the unacked batches exceed
`max_unacked_batches` or `max_unacked_samples`, `wait_writable()` blocks, and the load path
awaits it before each request, so an agent cut off from its controller slows down instead
of growing without bound.

Column encoding (see `SampleBatch` in agent_service.proto): `sent_unix_ns` is wall clock via
one `ClockAnchor`; every other time is an offset from `sent` in ns, 0 meaning absent (a
present time equal to `sent` is stored as 1 ns so that it stays present). The reasoning,
prefix-cache and conversation columns (`first_reasoning_ns` ... `turn_index`) go out empty
when every value of the batch is 0, which keeps the batches of plain workloads as small as
before.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from typing import Final

from agent.sample import PROCESS_CLOCK_ANCHOR, ClockAnchor, RequestSample
from common.codes import SampleFlag
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2

SampleBatch = agent_service_pb2.SampleBatch

# The flag bits as plain ints: `IntFlag` arithmetic costs ~25x int's, and it runs for every request.
_USAGE_FROM_SERVER: Final = int(SampleFlag.USAGE_FROM_SERVER)
_WARMUP: Final = int(SampleFlag.WARMUP)
_RETRIED: Final = int(SampleFlag.RETRIED)
_CACHED_REPORTED: Final = int(SampleFlag.CACHED_REPORTED)
_LAST_TURN: Final = int(SampleFlag.LAST_TURN)

DEFAULT_FLUSH_INTERVAL_S = 0.1
DEFAULT_MAX_BATCH_SAMPLES = 512
DEFAULT_MAX_UNACKED_BATCHES = 2000
# Batches hold up to 512 samples, so the batch limit alone would allow ~1M samples (and
# their inter-token gaps) in memory; this caps the worst case at a few hundred MB.
DEFAULT_MAX_UNACKED_SAMPLES = 250_000

_UINT32_MAX = 0xFFFF_FFFF


# The columns sent empty when every value in the batch is 0 (agent_service.proto).
_OPTIONAL_COLUMNS: Final = (
    "first_reasoning_ns",
    "first_answer_ns",
    "reasoning_tokens",
    "cached_prompt_tokens",
    "session_id",
    "turn_index",
)


def _offset(t: int, sent: int) -> int:
    return max(t - sent, 1) if t else 0


class SampleBatcher:
    """Turns one assignment's samples into acked, replayable `SampleBatch` messages."""

    def __init__(
        self,
        assignment_id: str,
        emit: Callable[[agent_service_pb2.SampleBatch], None],
        *,
        anchor: ClockAnchor = PROCESS_CLOCK_ANCHOR,
        flush_interval_s: float = DEFAULT_FLUSH_INTERVAL_S,
        max_batch_samples: int = DEFAULT_MAX_BATCH_SAMPLES,
        max_unacked_batches: int = DEFAULT_MAX_UNACKED_BATCHES,
        max_unacked_samples: int = DEFAULT_MAX_UNACKED_SAMPLES,
    ) -> None:
        self._assignment_id = assignment_id
        self._emit = emit
        self._anchor = anchor
        self._flush_interval_s = flush_interval_s
        self._max_batch_samples = max_batch_samples
        self._max_unacked_batches = max_unacked_batches
        self._max_unacked_samples = max_unacked_samples

        self._seq = 0
        self._acked_seq = 0
        self._unacked: deque[agent_service_pb2.SampleBatch] = deque()
        self._unacked_samples = 0
        self._samples_total = 0
        self._writable = asyncio.Event()
        self._writable.set()
        self._reset_columns()

    def _reset_columns(self) -> None:
        self._sent_unix_ns: list[int] = []
        self._queue_delay_ns: list[int] = []
        self._first_byte_ns: list[int] = []
        self._first_token_ns: list[int] = []
        self._last_token_ns: list[int] = []
        self._done_ns: list[int] = []
        self._prompt_tokens: list[int] = []
        self._output_tokens: list[int] = []
        self._requested_input_tokens: list[int] = []
        self._requested_output_tokens: list[int] = []
        self._status: list[run_pb2.RequestStatus.ValueType] = []
        self._flags: list[int] = []
        self._itl_count: list[int] = []
        self._itl_ns: list[int] = []
        self._error: list[str] = []
        # Reasoning and conversation columns: most batches have none of them, and a column
        # with no non-zero value goes out empty (`_nonzero` says which have one).
        self._first_reasoning_ns: list[int] = []
        self._first_answer_ns: list[int] = []
        self._reasoning_tokens: list[int] = []
        self._cached_prompt_tokens: list[int] = []
        self._session_id: list[int] = []
        self._turn_index: list[int] = []
        self._nonzero = False
        self._server_scrapes: list[agent_service_pb2.ServerScrape] = []

    @property
    def assignment_id(self) -> str:
        """The assignment every batch belongs to."""
        return self._assignment_id

    @property
    def batch_count(self) -> int:
        """Batches sealed so far (the highest batch_seq)."""
        return self._seq

    @property
    def acked_seq(self) -> int:
        """Highest batch_seq acked by the controller."""
        return self._acked_seq

    @property
    def pending_samples(self) -> int:
        """Samples added but not yet sealed into a batch."""
        return len(self._status)

    @property
    def samples_total(self) -> int:
        """Samples added since creation."""
        return self._samples_total

    @property
    def unacked_batches(self) -> int:
        """Sealed batches not yet acked."""
        return len(self._unacked)

    @property
    def all_acked(self) -> bool:
        """Nothing pending and every sealed batch acked."""
        return not self._status and not self._server_scrapes and not self._unacked

    def add(self, sample: RequestSample) -> None:
        """Append one sample; seals a batch when `max_batch_samples` are pending."""
        sent = sample.sent_ns or sample.scheduled_ns
        self._sent_unix_ns.append(self._anchor.to_unix_ns(sent))
        self._queue_delay_ns.append(max(sent - sample.scheduled_ns, 0))
        self._first_byte_ns.append(_offset(sample.first_byte_ns, sent))
        self._first_token_ns.append(_offset(sample.first_token_ns, sent))
        self._last_token_ns.append(_offset(sample.last_token_ns, sent))
        self._done_ns.append(_offset(sample.done_ns, sent))
        self._prompt_tokens.append(min(sample.prompt_tokens, _UINT32_MAX))
        self._output_tokens.append(min(sample.output_tokens, _UINT32_MAX))
        self._requested_input_tokens.append(min(sample.requested_input_tokens, _UINT32_MAX))
        self._requested_output_tokens.append(min(sample.requested_output_tokens, _UINT32_MAX))
        self._status.append(sample.status)
        self._flags.append(
            (_USAGE_FROM_SERVER if sample.usage_from_server else 0)
            | (_WARMUP if sample.warmup else 0)
            | (_RETRIED if sample.retried else 0)
            | (_CACHED_REPORTED if sample.cached_reported else 0)
            | (_LAST_TURN if sample.last_turn else 0)
        )
        first_reasoning = _offset(sample.first_reasoning_ns, sent)
        first_answer = _offset(sample.first_answer_ns, sent)
        self._first_reasoning_ns.append(first_reasoning)
        self._first_answer_ns.append(first_answer)
        self._reasoning_tokens.append(min(sample.reasoning_tokens, _UINT32_MAX))
        self._cached_prompt_tokens.append(min(sample.cached_prompt_tokens, _UINT32_MAX))
        self._session_id.append(sample.session_id)
        self._turn_index.append(min(sample.turn_index, _UINT32_MAX))
        if not self._nonzero and (
            first_reasoning
            or first_answer
            or sample.reasoning_tokens
            or sample.cached_prompt_tokens
            or sample.session_id
            or sample.turn_index
        ):
            self._nonzero = True
        self._itl_count.append(len(sample.itl_ns))
        self._itl_ns.extend(sample.itl_ns)
        self._error.append(sample.error)
        self._samples_total += 1
        if len(self._status) >= self._max_batch_samples:
            self.flush()

    def add_server_scrape(self, scrape: agent_service_pb2.ServerScrape) -> None:
        """Append one scrape of the model server's metrics; it goes out with the next batch."""
        self._server_scrapes.append(scrape)

    def flush(self) -> agent_service_pb2.SampleBatch | None:
        """Seal the pending samples into a batch and emit it; None when nothing is pending."""
        if not self._status and not self._server_scrapes:
            return None
        self._seq += 1
        batch = SampleBatch(
            assignment_id=self._assignment_id,
            batch_seq=self._seq,
            sent_unix_ns=self._sent_unix_ns,
            queue_delay_ns=self._queue_delay_ns,
            first_byte_ns=self._first_byte_ns,
            first_token_ns=self._first_token_ns,
            last_token_ns=self._last_token_ns,
            done_ns=self._done_ns,
            prompt_tokens=self._prompt_tokens,
            output_tokens=self._output_tokens,
            requested_input_tokens=self._requested_input_tokens,
            requested_output_tokens=self._requested_output_tokens,
            status=self._status,
            flags=self._flags,
            itl_count=self._itl_count,
            itl_ns=self._itl_ns,
            error=self._error,
            server_scrapes=self._server_scrapes,
        )
        if self._nonzero:
            for name in _OPTIONAL_COLUMNS:
                values = getattr(self, "_" + name)
                if any(values):
                    getattr(batch, name).extend(values)
        self._unacked.append(batch)
        self._unacked_samples += len(self._status)
        self._reset_columns()
        self._update_writable()
        self._emit(batch)
        return batch

    def ack(self, batch_seq: int) -> None:
        """Release every batch with batch_seq <= `batch_seq` (acks are cumulative)."""
        if batch_seq <= self._acked_seq:
            return
        self._acked_seq = min(batch_seq, self._seq)
        unacked = self._unacked
        while unacked and unacked[0].batch_seq <= batch_seq:
            self._unacked_samples -= len(unacked.popleft().status)
        self._update_writable()

    def unacked(self) -> list[agent_service_pb2.SampleBatch]:
        """Sealed batches not yet acked, in batch_seq order (for replay)."""
        return list(self._unacked)

    async def wait_writable(self) -> None:
        """Return when the unacked backlog is within its limits (backpressure)."""
        while not self._writable.is_set():
            await self._writable.wait()

    async def run(self) -> None:
        """Seal pending samples every `flush_interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self._flush_interval_s)
            self.flush()

    def _update_writable(self) -> None:
        if len(self._unacked) >= self._max_unacked_batches or self._unacked_samples >= self._max_unacked_samples:
            self._writable.clear()
        else:
            self._writable.set()
