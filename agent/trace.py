"""Trace replay: a recorded trace's requests sent at their own times, split between agents.

A stage whose load is `trace_replay` replays the workload's trace (`Workload.trace`, an
uploaded Mooncake or Azure trace parsed by `common.datasets.parse_trace`). The trace's
requests are ordered by timestamp (ties keep the file's order) and numbered from 0; request
i is due `(timestamp_ms[i] - timestamp_ms[0]) / replay_speed` after the stage start.

Split (`share_entries`): an agent sends the requests i >= `share_index` with
`(i - share_index) % share_count == 0` of its Assign. A stage's first Assigns have
`share_index` < `share_count` = the number of agents (that is `i % share_count ==
share_index`), so the agents' shares are disjoint and their union is the trace. A takeover
of a lost share (a, c) that had sent s requests gives taker m of M the share
(a + c (s + m), c M): exactly the lost share's requests from its (s+1)-th on, at the trace's
times (its Assign's start time is the stage's original start, so the times stay the trace's).
A stage's `requests` (split over the agents like any stage's) keeps each share's first
requests: together the trace's first `requests`. Its `duration` ends the replay: no request
due at or after it is sent (one due before it but more than `END_GRACE_S` late is recorded
as not sent, as in an open loop).

Every request's scheduled time is its trace time, so its queue delay (sent - scheduled) is
how far the replay fell behind the trace.

Prompts (`TracePrompts`): a Mooncake request's `hash_ids` are blocks of `block_tokens`
tokens, block h's text drawn from a fixed seed and h (the same on every agent and in every
run: equal ids are equal text, so the trace's prefix sharing reaches the server); the last
block is cut so the prompt is `input_length` tokens, and a prompt longer than its blocks
ends in random text. An Azure request (no hash ids) is random text that starts with the
request's number, unique in the trace. With the model's tokenizer the text is made of its
single-token pieces and is exactly `input_length` tokens; without one, of `WORDS`
(approximately one token each). `max_tokens` is the request's `output_length` (at least 1).
"""

from __future__ import annotations

import asyncio
import functools
import random
import time
from collections import OrderedDict
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from agent.datasets import DatasetFetchError
from agent.prompts import VERIFY_PROMPTS, WORDS, Prompt, TokenPieces, request_marker, token_pieces
from agent.scheduler import END_GRACE_S, Abandon, UnsupportedStageError, Warmup
from agent.tokens import DatasetSource, fetch_dataset
from common.datasets import TraceRequest, parse_trace
from common.durations import seconds
from common.proto.loadtest.v1 import run_pb2
from common.tokenizer import Tokenizer

DEFAULT_BLOCK_TOKENS = 512
DEFAULT_REPLAY_SPEED = 1.0
# Block texts kept (a block of 512 tokens is a list of 512 strings shared between prompts).
BLOCK_CACHE = 4096
_BLOCK_SEED = "llm-loadtest trace block"
MARKER_WIDTH = 4

TraceSendOne = Callable[[int, bool, Prompt], Coroutine[Any, Any, None]]
"""Sends one trace request scheduled at `scheduled_ns`, flagged warmup or not, with its prompt."""


class TraceEntry(Protocol):
    """One request of a trace (`common.datasets.TraceRequest`)."""

    @property
    def timestamp_ms(self) -> float: ...
    @property
    def input_length(self) -> int: ...
    @property
    def output_length(self) -> int: ...
    @property
    def hash_ids(self) -> tuple[int, ...]: ...


def trace_format(data: bytes) -> run_pb2.DatasetFormat.ValueType:
    """The format of trace bytes: Mooncake JSONL (lines of JSON objects) or Azure CSV."""
    head = data.lstrip()[:1]
    return run_pb2.DATASET_FORMAT_MOONCAKE_TRACE if head == b"{" else run_pb2.DATASET_FORMAT_AZURE_TRACE


def load_trace(data: bytes) -> list[TraceRequest]:
    """The trace's requests (`common.datasets.parse_trace`; DatasetError, a ValueError naming
    the line and the field, for a bad trace)."""
    return parse_trace(trace_format(data), data)


_PARSED: OrderedDict[str, list[TraceRequest]] = OrderedDict()
# Parsed traces kept (a run's stages and its preflight use the same one).
KEEP_TRACES = 2


async def fetch_trace(source: DatasetSource | None, dataset_id: str) -> list[TraceRequest]:
    """The requests of the uploaded trace `dataset_id`, fetched and parsed once for the
    preflight check and every stage of a run (DatasetFetchError when it cannot be had
    or parsed: the message names the line and the field)."""
    entries = _PARSED.get(dataset_id)
    if entries is not None:
        _PARSED.move_to_end(dataset_id)
        return entries
    data = await fetch_dataset(source, dataset_id, "trace")
    try:
        entries = await asyncio.to_thread(load_trace, data)
    except ValueError as exc:
        raise DatasetFetchError(f"trace {dataset_id}: {exc}") from None
    _PARSED[dataset_id] = entries
    while len(_PARSED) > KEEP_TRACES:
        _PARSED.popitem(last=False)
    return entries


def ordered(entries: Sequence[TraceEntry]) -> list[TraceEntry]:
    """The trace's requests by timestamp; equal timestamps keep their order."""
    return sorted(entries, key=lambda e: e.timestamp_ms)


def share_entries(count: int, share_index: int, share_count: int) -> range:
    """Indices of the trace requests of the share (`share_index`, `share_count`)."""
    return range(share_index, count, max(share_count, 1))


def takeover_share(share_index: int, share_count: int, sent: int, taker: int, takers: int) -> tuple[int, int]:
    """The share (index, count) of taker `taker` of `takers` of a lost share that had sent
    `sent` of its requests: the lost share's requests after those, round-robin."""
    count = max(share_count, 1)
    return share_index + count * (sent + taker), count * takers


def offsets_ns(entries: Sequence[TraceEntry], replay_speed: float) -> list[int]:
    """Due time of each (ordered) request from the stage start, ns."""
    if not entries:
        return []
    first = entries[0].timestamp_ms
    speed = replay_speed or DEFAULT_REPLAY_SPEED
    return [round((e.timestamp_ms - first) / speed * 1e6) for e in entries]


class TracePrompts:
    """The prompt of each trace request (see the module docstring)."""

    def __init__(self, block_tokens: int, seed: int, tokenizer: Tokenizer | None = None) -> None:
        self.block_tokens = block_tokens or DEFAULT_BLOCK_TOKENS
        self._seed = seed
        self._pieces: TokenPieces | None = token_pieces(tokenizer) if tokenizer is not None else None
        self._block = functools.lru_cache(maxsize=BLOCK_CACHE)(self._make_block)
        self._trusted = 0

    def _units(self, rng: random.Random, n: int) -> list[str]:
        if self._pieces is not None:
            return self._pieces.draw(rng, n)
        return [" " + w for w in rng.choices(WORDS, k=n)] if n > 0 else []

    def _make_block(self, hash_id: int) -> tuple[str, ...]:
        return tuple(self._units(random.Random(f"{_BLOCK_SEED}:{hash_id}"), self.block_tokens))

    def block(self, hash_id: int) -> tuple[str, ...]:
        """Block `hash_id`'s text, as `block_tokens` units (one token each)."""
        return self._block(hash_id)

    def _marker(self, number: int, width: int) -> list[str]:
        if self._pieces is not None:
            return self._pieces.marker(number, width)
        return [" " + w for w in request_marker(number, width)]

    def prompt(self, index: int, entry: TraceEntry) -> Prompt:
        """The prompt of request `index` of the trace."""
        length = max(int(entry.input_length), 1)
        units: list[str] = []
        for h in entry.hash_ids:
            if len(units) >= length:
                break
            units += self.block(h)[: length - len(units)]
        rng = random.Random(f"{self._seed}:{index}")
        if len(units) < length:
            rest = length - len(units)
            tail = self._marker(index, min(MARKER_WIDTH, rest)) if not entry.hash_ids else []
            units += tail + self._units(rng, rest - len(tail))
        # The units of a block start with a space; a prompt's first one keeps it (the count
        # of " word" is what the pieces were chosen by).
        max_tokens = max(int(entry.output_length), 1)
        pieces = self._pieces
        if pieces is None or self._trusted >= VERIFY_PROMPTS:
            return Prompt(text="".join(units), max_tokens=max_tokens, input_tokens=length)
        # As PromptGenerator: the first prompts are encoded to verify the construction (a
        # tokenizer that merges across pieces has every prompt corrected at its end).
        text, count = pieces.fit(units, length, rng)
        self._trusted = -(1 << 62) if pieces.corrected else self._trusted + 1
        return Prompt(text=text, max_tokens=max_tokens, input_tokens=count)


@dataclass(frozen=True, slots=True)
class TraceSchedule:
    """This agent's share of a trace replay stage (a `LoadSchedule` with prompts of its own).

    `origin_ns`: a `perf_counter_ns()` time of the stage's trace time 0, when the caller
    knows it (the stage's planned start; earlier than now for a takeover); else `run()`'s
    start.
    """

    entries: Sequence[TraceEntry]
    prompts: TracePrompts
    replay_speed: float = DEFAULT_REPLAY_SPEED
    share_index: int = 0
    share_count: int = 1
    duration_s: float | None = None
    max_requests: int = 0
    warmup: Warmup = field(default_factory=Warmup)
    end_grace_s: float = END_GRACE_S
    origin_ns: int | None = None

    def planned(self) -> list[tuple[int, int]]:
        """(offset_ns from the stage start, trace index) of every request of this share, in order."""
        offsets = offsets_ns(self.entries, self.replay_speed)
        limit_ns = int(self.duration_s * 1e9) if self.duration_s is not None else None
        out: list[tuple[int, int]] = []
        for i in share_entries(len(self.entries), self.share_index, self.share_count):
            if self.max_requests and len(out) >= self.max_requests:
                break
            if limit_ns is not None and offsets[i] >= limit_ns:
                break
            out.append((offsets[i], i))
        return out

    async def run(self, send_one: TraceSendOne, abandon: Abandon) -> None:
        """Send every request of the share at its time; return when all have finished."""
        clock = time.perf_counter_ns
        start_ns = self.origin_ns if self.origin_ns is not None else clock()
        cutoff_ns = start_ns + int((self.duration_s + self.end_grace_s) * 1e9) if self.duration_s is not None else None
        due = self._due(start_ns)
        async with asyncio.TaskGroup() as requests:
            for scheduled, warmup, prompt in due:
                delay_ns = scheduled - clock()
                if delay_ns > 0:
                    await asyncio.sleep(delay_ns / 1e9)
                if cutoff_ns is not None and clock() >= cutoff_ns:
                    abandon(scheduled, warmup)
                    for rest in due:
                        abandon(rest[0], rest[1])
                    break
                requests.create_task(send_one(scheduled, warmup, prompt))

    def _due(self, start_ns: int) -> Iterator[tuple[int, bool, Prompt]]:
        warmup = self.warmup
        for n, (offset_ns, index) in enumerate(self.planned()):
            yield start_ns + offset_ns, warmup.applies(n, offset_ns), self.prompts.prompt(index, self.entries[index])


def trace_schedule(
    stage: run_pb2.Stage,
    trace: run_pb2.Trace,
    entries: Sequence[TraceEntry],
    *,
    seed: int,
    share_index: int = 0,
    share_count: int = 1,
    tokenizer: Tokenizer | None = None,
    origin_ns: int | None = None,
) -> TraceSchedule:
    """The schedule of this agent's share of a `trace_replay` stage."""
    if stage.WhichOneof("load") != "trace_replay":
        raise UnsupportedStageError("not a trace_replay stage")
    if not entries:
        raise UnsupportedStageError("the trace has no requests")
    duration_s = max(seconds(stage.duration), 0.0) if stage.HasField("duration") else 0.0
    return TraceSchedule(
        entries=ordered(entries),
        prompts=TracePrompts(trace.block_tokens or DEFAULT_BLOCK_TOKENS, seed, tokenizer),
        replay_speed=trace.replay_speed or DEFAULT_REPLAY_SPEED,
        share_index=share_index,
        share_count=max(share_count, 1),
        duration_s=duration_s or None,
        max_requests=stage.requests,
        warmup=Warmup(duration_s=max(seconds(stage.warmup_duration), 0.0), requests=stage.warmup_requests),
        origin_ns=origin_ns,
    )
