"""The limits of one stored sample: what values an agent can report at all.

One definition for two places: ingest refuses a batch holding any sample outside them
(controller/domain/results/ingest.py), and results leave out stored samples outside them
(controller/domain/results/compute.py: data stored before ingest checked them), so that no stored
value can make a result's per-second series, or anything else sized by a span of time,
grow without bound. docs/security.md ("Agent stream integrity") lists every limit.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np
import numpy.typing as npt

from controller.domain.spec import MAX_REQUEST_TIMEOUT_S

IntArray = npt.NDArray[np.int64]
BoolArray = npt.NDArray[np.bool_]

MAX_BATCH_SEQ = 2**63 - 1  # the largest SQLite integer
# `sent` (agent clock, corrected by the agent's estimated offset) must lie inside the
# assignment's window, from its Assign to its end (or now), widened by this much on each
# side for clock error.
SENT_SLACK_S = 300
# Every offset from `sent` (first byte, tokens, done) and every inter-token gap: at most the
# longest request timeout a spec may set (controller/domain/spec.py) plus the slack.
MAX_SAMPLE_OFFSET_S = MAX_REQUEST_TIMEOUT_S + SENT_SLACK_S
# Prompt, output and requested token counts and inter-token gaps of one sample.
MAX_SAMPLE_TOKENS = 10_000_000
# Status codes and flags are small enums and bit sets; anything larger is not from an agent.
MAX_STATUS = 255
MAX_FLAGS = 255
NS_PER_S = 1_000_000_000
SLACK_NS = SENT_SLACK_S * NS_PER_S
MAX_OFFSET_NS = MAX_SAMPLE_OFFSET_S * NS_PER_S

# A conversation's turn index.
MAX_TURN_INDEX = 1_000_000

_TOKENS = (
    "prompt_tokens",
    "output_tokens",
    "itl_count",
    "requested_input_tokens",
    "requested_output_tokens",
    "reasoning_tokens",
    "cached_prompt_tokens",
)
_OFFSETS = ("first_byte_ns", "first_token_ns", "last_token_ns", "done_ns", "first_reasoning_ns", "first_answer_ns")
# Upper bound of every column but `sent` (0 is the lower bound of each).
BOUNDS: Mapping[str, int] = {
    **dict.fromkeys(_OFFSETS, MAX_OFFSET_NS),
    **dict.fromkeys(_TOKENS, MAX_SAMPLE_TOKENS),
    "status": MAX_STATUS,
    "flags": MAX_FLAGS,
    "turn_index": MAX_TURN_INDEX,
    # Any id an agent numbers its sessions with (uint64 on the wire; beyond int64 is refused).
    "session_id": 2**63 - 1,
    # Bounded by the window (the schedule lies in it); this keeps `sent - queue_delay` in int64.
    "queue_delay_ns": 2**62,
}


def violations(
    col: Mapping[str, IntArray], itl: IntArray, lo: int | IntArray, hi: int | IntArray
) -> Iterator[tuple[str, BoolArray]]:
    """(rule, which samples break it) for every rule some sample breaks.

    `col` holds int64 columns by name (`itl_count` must add up to len(`itl`)); `lo`/`hi`
    bound `sent_unix_ns` in the agent's clock (scalars, or one per sample), slack included.
    """
    # Masks are built only for rules that some sample breaks: a batch that passes costs a
    # few reductions per column (ingest runs this on the event loop for every batch).
    for name, high in BOUNDS.items():
        values = col.get(name)
        # Seen as uint64, a negative value is larger than any bound: one reduction checks both ends.
        if values is not None and values.size and int(values.view(np.uint64).max()) > high:
            yield f"{name} outside [0, {high}]", values.view(np.uint64) > high
    sent = col["sent_unix_ns"]
    if not sent.size:
        return
    outside = (sent < lo) | (sent > hi)
    if outside.any():
        yield f"sent_unix_ns outside the assignment's window ({SENT_SLACK_S} s of slack on each side)", outside
    queue = col["queue_delay_ns"]
    if int(queue.max()) > 0:
        early = sent - np.clip(queue, 0, BOUNDS["queue_delay_ns"]) < lo
        if early.any():
            yield "queue_delay_ns puts the request's schedule before the assignment's window", early
    first, last = col["first_token_ns"], col["last_token_ns"]
    disordered = (last < first) & (last > 0)
    if disordered.any():
        yield "last_token_ns before first_token_ns", disordered
    yield from _part_violations(col, first)
    counts = col["itl_count"]
    if not itl.size or (counts < 0).any() or int(counts.sum()) != itl.size:
        return  # no gaps, or counts that are wrong already (reported above or by the caller)
    # Gaps lie between a sample's first and last token: each within bounds, and together no
    # longer than the sample (in float64: summed in int64, many long gaps could wrap around).
    owners = np.flatnonzero(counts > 0)
    starts = (np.cumsum(counts) - counts)[owners]
    if int(itl.view(np.uint64).max()) > MAX_OFFSET_NS:
        bad_gap = np.zeros(len(sent), dtype=np.bool_)
        bad_gap[owners] = np.add.reduceat((itl.view(np.uint64) > MAX_OFFSET_NS).astype(np.int64), starts) > 0
        yield f"itl_ns outside [0, {MAX_OFFSET_NS}]", bad_gap
    span = np.maximum(np.maximum(first, last), col["done_ns"])[owners]
    too_long = np.add.reduceat(itl, starts, dtype=np.float64) > span
    if too_long.any():
        long = np.zeros(len(sent), dtype=np.bool_)
        long[owners] = too_long
        yield "inter-token gaps adding up to more than the sample's duration", long


def _part_violations(col: Mapping[str, IntArray], first: IntArray) -> Iterator[tuple[str, BoolArray]]:
    """Reasoning and prefix-cache columns (absent ones are all 0 and break nothing): parts
    no larger than their wholes, and the first reasoning / answer event among the text
    events (not before the first one, not after the response's end)."""
    done = col["done_ns"]
    for name in ("first_reasoning_ns", "first_answer_ns"):
        values = col.get(name)
        if values is None or not values.size or not int(values.max()) > 0:
            continue
        present = values > 0
        early = present & ((first == 0) | (values < first))
        if early.any():
            yield f"{name} before first_token_ns (the first event carrying text)", early
        late = present & (done > 0) & (values > done)
        if late.any():
            yield f"{name} after done_ns", late
    for part, whole in (("reasoning_tokens", "output_tokens"), ("cached_prompt_tokens", "prompt_tokens")):
        values = col.get(part)
        if values is None or not values.size or not int(values.max()) > 0:
            continue
        larger = values > col[whole]
        if larger.any():
            yield f"{part} larger than {whole}", larger
