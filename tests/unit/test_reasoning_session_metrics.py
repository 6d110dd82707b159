"""Reasoning, prefix-cache and conversation figures of `compute_stage_metrics`, from sample
tables built by hand (docs/metrics.md: "Reasoning models", "Prefix cache", "Conversations")."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from common.codes import RequestStatus, SampleFlag
from common.metrics import SampleColumns, compute_stage_metrics
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(60)

MS = 1_000_000
T0 = 1_700_000_000 * 10**9
USAGE = int(SampleFlag.USAGE_FROM_SERVER)
CACHED = int(SampleFlag.CACHED_REPORTED)
LAST = int(SampleFlag.LAST_TURN)
WARMUP = int(SampleFlag.WARMUP)
OK = int(RequestStatus.OK)
FAILED = int(RequestStatus.HTTP_5XX)


@dataclass
class Row:
    sent: float = 0.0  # ms after T0
    first: float = 10.0  # offsets from sent, ms (0: none)
    last: float = 20.0
    done: float = 21.0
    prompt: int = 100
    output: int = 11
    status: int = OK
    flags: int = USAGE
    reasoning_at: float = 0.0
    answer_at: float = 0.0
    reasoning: int = 0
    cached: int = 0
    session: int = 0
    turn: int = 0
    group: int = 0


def table(*rows: Row) -> SampleColumns:
    def col(values: list[float], scale: float = 1) -> np.ndarray:
        return np.array([round(v * scale) for v in values], dtype=np.int64)

    return SampleColumns(
        sent_unix_ns=T0 + col([r.sent for r in rows], MS),
        queue_delay_ns=col([0 for _ in rows]),
        first_token_ns=col([r.first for r in rows], MS),
        last_token_ns=col([r.last for r in rows], MS),
        done_ns=col([r.done for r in rows], MS),
        prompt_tokens=col([r.prompt for r in rows]),
        output_tokens=col([r.output for r in rows]),
        status=col([r.status for r in rows]),
        flags=col([r.flags for r in rows]),
        itl_count=col([0 for _ in rows]),
        itl_ns=np.zeros(0, dtype=np.int64),
        first_reasoning_ns=col([r.reasoning_at for r in rows], MS),
        first_answer_ns=col([r.answer_at for r in rows], MS),
        reasoning_tokens=col([r.reasoning for r in rows]),
        cached_prompt_tokens=col([r.cached for r in rows]),
        session_id=col([r.session for r in rows]),
        turn_index=col([r.turn for r in rows]),
        session_group=col([r.group for r in rows]),
    )


def test_ttfr_ttfo_and_reasoning_tokens() -> None:
    m = compute_stage_metrics(
        table(
            Row(first=10, reasoning_at=10, answer_at=50, reasoning=40, output=60),
            Row(first=20, reasoning_at=20, answer_at=90, reasoning=70, output=80),
            # A model that did not reason this time: TTFO is its TTFT.
            Row(first=30, answer_at=30, output=10),
            # Reasoning only (cut by max_tokens before answering): a TTFR, no TTFO.
            Row(first=40, reasoning_at=40, reasoning=50, output=50),
            # Failed: none of its figures count.
            Row(first=5, reasoning_at=5, answer_at=6, reasoning=1, output=2, status=FAILED),
            # Warmup: left out.
            Row(first=1, reasoning_at=1, answer_at=2, reasoning=1, output=2, flags=USAGE | WARMUP),
        )
    )
    assert m.ttft.count == 4
    assert m.ttfr.count == 3 and m.ttfr.mean == pytest.approx((10 + 20 + 40) / 3)
    assert m.ttfo.count == 3 and sorted([m.ttfo.min, m.ttfo.p50, m.ttfo.max]) == [30, 50, 90]
    assert m.ttfr.p50_ci is not None  # the same summary machinery as TTFT
    assert m.reasoning_tokens == 40 + 70 + 50
    assert m.mean_reasoning_tokens == pytest.approx(160 / 4)
    assert m.mean_answer_tokens == pytest.approx((60 + 80 + 10 + 50 - 160) / 4)


def test_ttfo_of_samples_without_the_answer_column_falls_back_to_ttft_when_nothing_reasoned() -> None:
    # An older agent sends neither column: TTFO = TTFT, TTFR absent.
    m = compute_stage_metrics(table(Row(first=10), Row(first=30)))
    assert (m.ttfo.count, m.ttfr.count) == (2, 0) and m.ttfo.mean == pytest.approx(20.0)
    # ...but a request that reasoned and never answered has no TTFO.
    m = compute_stage_metrics(table(Row(first=10, reasoning_at=10, reasoning=5)))
    assert m.ttfo.count == 0


def test_client_prefix_cache_hit_percent_counts_only_reporting_requests() -> None:
    m = compute_stage_metrics(
        table(
            Row(prompt=100, cached=80, flags=USAGE | CACHED),
            Row(prompt=300, cached=0, flags=USAGE | CACHED),  # reported: nothing cached
            Row(prompt=1000),  # did not report: left out of both sums
            Row(prompt=50, cached=50, flags=USAGE | CACHED, status=FAILED),  # failed: left out
        )
    )
    assert m.cached_prompt_tokens == 80
    assert m.prefix_cache_hit_percent == pytest.approx(100 * 80 / 400)
    none = compute_stage_metrics(table(Row(prompt=100), Row(prompt=200)))
    assert none.prefix_cache_hit_percent is None and none.cached_prompt_tokens == 0


def test_turns_grouped_by_index() -> None:
    rows = [
        Row(session=1, turn=1, first=100, prompt=100, flags=USAGE | CACHED, cached=0),
        Row(session=1, turn=2, first=20, prompt=300, flags=USAGE | CACHED, cached=200),
        Row(session=2, turn=1, first=120, prompt=100, flags=USAGE | CACHED, cached=0),
        Row(session=2, turn=2, first=40, prompt=500, flags=USAGE | CACHED, cached=400),
        Row(session=2, turn=3, status=FAILED),
        Row(first=7),  # not a conversation: in the stage's figures only
    ]
    m = compute_stage_metrics(table(*rows))
    assert [t.turn for t in m.turns] == [1, 2, 3]
    one, two, three = m.turns
    assert (one.requests_ok, one.requests_failed, two.requests_ok, three.requests_ok, three.requests_failed) == (
        2,
        0,
        2,
        0,
        1,
    )
    assert one.ttft.mean == pytest.approx(110) and two.ttft.mean == pytest.approx(30)
    assert one.mean_input_tokens == 100 and two.mean_input_tokens == 400
    assert one.prefix_cache_hit_percent == 0.0
    assert two.prefix_cache_hit_percent == pytest.approx(100 * 600 / 800)
    assert three.prefix_cache_hit_percent is None and three.ttft.count == 0
    assert one.e2e.count == 2 and one.tpot.count == 2
    assert m.ttft.count == 5


def test_sessions_completed_and_their_duration() -> None:
    rows = [
        # Session (0, 1): 3 turns, all OK, last flagged: complete, 0 -> 2000 + 21 ms.
        Row(sent=0, session=1, turn=1),
        Row(sent=1000, session=1, turn=2),
        Row(sent=2000, session=1, turn=3, flags=USAGE | LAST),
        # Session (0, 2): its second turn failed: not complete.
        Row(sent=0, session=2, turn=1),
        Row(sent=500, session=2, turn=2, status=FAILED, flags=USAGE | LAST),
        # Session (0, 3): no last turn seen (the stage ended first): not complete.
        Row(sent=0, session=3, turn=1),
        # Session (0, 4): last turn 3 but turn 1 is not in the stage: not complete.
        Row(sent=0, session=4, turn=2),
        Row(sent=10, session=4, turn=3, flags=USAGE | LAST),
        # Session id 1 again, from another assignment (group 9): a session of its own,
        # complete, one turn, 21 ms.
        Row(sent=5, session=1, turn=1, flags=USAGE | LAST, group=9),
    ]
    m = compute_stage_metrics(table(*rows))
    assert m.sessions_completed == 2
    assert m.session_duration.count == 2
    assert sorted([m.session_duration.min, m.session_duration.max]) == [pytest.approx(21), pytest.approx(2021)]
    # Keyed by session id alone, the two sessions 1 would merge into one incomplete one.
    merged = compute_stage_metrics(table(*[Row(**{**vars(r), "group": 0}) for r in rows]))
    assert merged.sessions_completed == 0


def test_sessions_survive_the_per_agent_split_and_concat() -> None:
    rows = [Row(sent=i * 10, session=1 + i // 2, turn=1 + i % 2, flags=USAGE | (LAST * (i % 2))) for i in range(6)]
    cols = table(*rows)
    assert compute_stage_metrics(cols).sessions_completed == 3
    both = SampleColumns.concat([cols, cols.select(np.arange(6) < 2)])
    # The copy of session 1 (same group) duplicates its turns: no longer a complete session.
    assert compute_stage_metrics(both).sessions_completed == 2


def test_checks_on_ttfo_ttfr_and_session_duration() -> None:
    from controller.domain.results.checks import CheckSyntaxError, parse_check

    m = compute_stage_metrics(
        table(
            Row(first=10, reasoning_at=10, answer_at=400, reasoning=40, output=60),
            Row(first=20, reasoning_at=20, answer_at=600, reasoning=40, output=60),
        )
    )
    passed, measured, _ = parse_check("max(ttfo) < 500ms").evaluate(m)
    assert not passed and measured == pytest.approx(600)
    assert parse_check("p50(ttfr) < 50ms").evaluate(m)[0]
    # No conversation in the stage: a session-duration check cannot pass.
    assert not parse_check("p99(session_duration) < 10s").evaluate(m)[0]
    with pytest.raises(CheckSyntaxError, match="ttfo"):
        parse_check("p99(ttfx) < 1s")


def test_a_trace_replay_that_sends_late_flags_the_generator_as_an_open_loop_does() -> None:
    """Send lag (queue delay) above the limit marks an uncapped open loop, and a trace replay
    (which sends at the trace's times) saturated; a closed loop's queue delay never does."""
    from controller.domain.results.compute import SATURATION_SEND_LAG_P99_MS, _saturation

    cols = table(*[Row(sent=i * 10.0) for i in range(200)])
    cols.queue_delay_ns[:] = round(2 * SATURATION_SEND_LAG_P99_MS * MS)
    m = compute_stage_metrics(cols)
    for load in (run_pb2.Stage(trace_replay=True), run_pb2.Stage(request_rate=50)):
        saturated, reason = _saturation(load, m, 0.0, 0.0)
        assert saturated and "send lag" in reason, load
    assert _saturation(run_pb2.Stage(concurrency=4), m, 0.0, 0.0) == (False, "")
    assert _saturation(run_pb2.Stage(trace_replay=True, max_concurrency=8), m, 0.0, 0.0) == (False, "")
