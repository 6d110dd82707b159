"""Ingest of the reasoning, prefix-cache and conversation columns (SampleBatch 200-205):
empty or one entry per sample, within the limits of docs/security.md ("Agent stream
integrity"), stored in SAMPLE_COLUMNS order."""

from __future__ import annotations

import time

import pytest

from controller.domain.results import sample_limits as limits
from controller.domain.results.ingest import IngestTarget, MalformedBatch, to_ingest
from controller.store import columnar
from tests.security.hostile import forged_batch

pytestmark = pytest.mark.timeout(60)


def target() -> tuple[IngestTarget, int]:
    """An assignment that started 10 s ago, and now: read when the test runs (forged batches
    are sent now, and the window of an assignment is checked)."""
    now = time.time_ns()
    return IngestTarget(1, 1, "run_x", 0, now - 10**10, None, 0), now


COL = columnar.COL


def test_empty_columns_are_zeros_and_full_ones_are_stored() -> None:
    assignment, now = target()
    plain = to_ingest(assignment, forged_batch("a", 1, 3), now)
    for name in ("first_reasoning_ns", "first_answer_ns", "reasoning_tokens", "cached_prompt_tokens"):
        assert plain.columns[COL[name]].tolist() == [0, 0, 0], name
    batch = forged_batch(
        "a",
        1,
        2,
        first_reasoning_ns=[10_000_000, 0],
        first_answer_ns=[15_000_000, 10_000_000],
        reasoning_tokens=[40, 0],
        cached_prompt_tokens=[64, 0],
        session_id=[2**63 - 1, 3],
        turn_index=[1, 2],
        flags=[1 | 8, 1 | 16],
    )
    stored = to_ingest(assignment, batch, now).columns
    assert stored[COL["first_reasoning_ns"]].tolist() == [10_000_000, 0]
    assert stored[COL["first_answer_ns"]].tolist() == [15_000_000, 10_000_000]
    assert stored[COL["reasoning_tokens"]].tolist() == [40, 0]
    assert stored[COL["cached_prompt_tokens"]].tolist() == [64, 0]
    assert stored[COL["session_id"]].tolist() == [2**63 - 1, 3]
    assert stored[COL["turn_index"]].tolist() == [1, 2]
    assert stored[COL["flags"]].tolist() == [9, 17]


@pytest.mark.parametrize(
    ("what", "columns"),
    [
        ("session_id has 1", {"session_id": [1]}),
        ("first_answer_ns has 3", {"first_answer_ns": [1, 2, 3]}),
        ("reasoning_tokens larger than output_tokens", {"reasoning_tokens": [100_001, 0]}),
        ("cached_prompt_tokens larger than prompt_tokens", {"cached_prompt_tokens": [0, 65]}),
        ("first_reasoning_ns before first_token_ns", {"first_reasoning_ns": [5_000_000, 0]}),
        ("first_answer_ns before first_token_ns", {"first_answer_ns": [0, 1], "first_token_ns": [10, 0]}),
        ("first_answer_ns after done_ns", {"first_answer_ns": [0, 21_000_001]}),
        ("first_reasoning_ns outside", {"first_reasoning_ns": [2**64 - 1, 0]}),
        ("session_id outside", {"session_id": [2**63, 0]}),
        ("turn_index outside", {"turn_index": [limits.MAX_TURN_INDEX + 1, 0]}),
        ("cached_prompt_tokens outside", {"cached_prompt_tokens": [limits.MAX_SAMPLE_TOKENS + 1, 0]}),
    ],
)
def test_impossible_values_are_refused(what: str, columns: dict[str, list[int]]) -> None:
    with pytest.raises(MalformedBatch, match=what):
        assignment, now = target()
        to_ingest(assignment, forged_batch("a", 1, 2, **columns), now)  # type: ignore[arg-type]
