"""ExportedSample from a stored export row: the reasoning, prefix-cache and conversation
columns (fields 200-) from the columns after the agent session, the flags' bits 3 and 4."""

from __future__ import annotations

import pytest

from common.codes import SampleFlag
from common.proto.loadtest.v1 import run_pb2
from controller.servicers import convert
from controller.store import columnar

pytestmark = pytest.mark.timeout(10)

CACHED_REPORTED, LAST_TURN = 1 << 3, 1 << 4


def row(flags: int, *extra: int) -> tuple[object, ...]:
    # cursor, stage, agent, sent, queue, first_byte, first_token, last_token, done, prompt,
    # output, status, flags, itl_count, error, session, then EXPORT_EXTRA_COLUMNS
    return (
        9,
        1,
        "a1",
        1_700_000_000_000_000_000,
        0,
        30_000_000,
        450_000_000,
        900_000_000,
        901_000_000,
        64,
        80,
        int(run_pb2.REQUEST_STATUS_OK),
        flags,
        79,
        "",
        "ses-1",
        *extra,
    )


def test_the_new_columns_are_exported_in_ms_with_the_flag_bits() -> None:
    assert len(columnar.EXPORT_EXTRA_COLUMNS) == 6
    flags = int(SampleFlag.USAGE_FROM_SERVER) | CACHED_REPORTED | LAST_TURN
    s = convert.exported_sample(row(flags, 40_000_000, 450_000_000, 60, 48, 12, 3))
    assert (s.first_reasoning_ms, s.first_answer_ms, s.ttft_ms) == (40.0, 450.0, 450.0)
    assert (s.reasoning_tokens, s.cached_prompt_tokens, s.session_id, s.turn_index) == (60, 48, 12, 3)
    assert s.cached_reported and s.last_turn and s.usage_reported and not s.warmup
    assert (s.prompt_tokens, s.output_tokens, s.agent_session) == (64, 80, "ses-1")


def test_a_row_without_them_reads_as_zeros_and_bits_stay_apart() -> None:
    s = convert.exported_sample(row(CACHED_REPORTED))
    assert (s.first_reasoning_ms, s.first_answer_ms, s.reasoning_tokens, s.session_id, s.turn_index) == (0, 0, 0, 0, 0)
    assert s.cached_reported and not s.last_turn and not s.usage_reported
    last = convert.exported_sample(row(LAST_TURN, 0, 0, 0, 0, 5, 2))
    assert last.last_turn and not last.cached_reported and (last.session_id, last.turn_index) == (5, 2)
