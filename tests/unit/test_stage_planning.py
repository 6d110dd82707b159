"""Stage planning (controller/domain/execution/planning.py): pure functions, no clock."""

from __future__ import annotations

import pytest

from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.execution.planning import (
    DEFAULT_WAIT_TIMEOUT_S,
    MAX_START_LEAD_S,
    MIN_TAKEOVER_S,
    STAGE_SLACK_S,
    TAKEOVER_LEAD_S,
    derive_seed,
    load_text,
    placement_failure,
    placement_wait_s,
    remaining_share,
    split_integer,
    stage_deadline_s,
    stage_shares,
    stall_text,
    start_lead_s,
    takeover_seed_index,
)

pytestmark = pytest.mark.timeout(10)

S = 1_000_000_000


@pytest.mark.parametrize(("total", "parts"), [(0, 3), (1, 3), (32, 3), (7, 7), (100, 8), (5, 1)])
def test_split_integer_sums_and_differs_by_at_most_one(total: int, parts: int) -> None:
    split = split_integer(total, parts)
    assert len(split) == parts
    assert sum(split) == total
    assert max(split) - min(split) <= 1
    assert split == sorted(split, reverse=True)  # the larger parts come first


def test_derive_seed_is_reproducible_distinct_and_positive() -> None:
    seeds = {derive_seed(42, stage, agent) for stage in range(5) for agent in range(8)}
    assert len(seeds) == 40
    assert all(0 < s < 2**63 for s in seeds)
    assert derive_seed(42, 1, 2) == derive_seed(42, 1, 2)
    assert derive_seed(42, 1, 2) != derive_seed(43, 1, 2)


def test_takeover_seeds_are_apart_from_first_round_ones() -> None:
    first_round = {derive_seed(7, 0, agent) for agent in range(1000)}
    takeovers = {derive_seed(7, 0, takeover_seed_index(t, taker)) for t in range(1, 4) for taker in range(3)}
    assert len(takeovers) == 9
    assert not first_round & takeovers


def test_start_lead_grows_with_the_agents_up_to_a_cap_and_is_zero_for_one() -> None:
    assert start_lead_s(1) == 0.0
    assert start_lead_s(2) == pytest.approx(0.8)
    assert start_lead_s(4) == pytest.approx(0.85)
    assert start_lead_s(32) == pytest.approx(1.55)
    assert start_lead_s(10_000) == MAX_START_LEAD_S


def test_stage_deadline_only_for_stages_with_a_duration() -> None:
    assert stage_deadline_s(0.0, 60.0) is None
    assert stage_deadline_s(10.0, 60.0) == pytest.approx(MAX_START_LEAD_S + 10.0 + 60.0 + STAGE_SLACK_S)


def _timed_share(seconds: float, rate: float = 4.0) -> run_pb2.Stage:
    share = run_pb2.Stage(request_rate=rate, warmup_requests=3)
    share.duration.FromNanoseconds(int(seconds * S))
    share.warmup_duration.FromNanoseconds(2 * S)
    share.ramp.FromNanoseconds(1 * S)
    return share


def test_remaining_share_of_a_timed_stage_is_the_time_left_after_the_takeover_lead() -> None:
    start, end = 100 * S, 110 * S
    rest = remaining_share(_timed_share(10.0), 12, start, end, now_ns=104 * S)
    assert rest is not None
    assert rest.duration.ToNanoseconds() == pytest.approx((6.0 - TAKEOVER_LEAD_S) * S, abs=1)
    assert rest.request_rate == 4.0
    # A takeover joins a stage under way: no warmup, no ramp.
    assert not rest.HasField("warmup_duration") and not rest.HasField("ramp") and rest.warmup_requests == 0


def test_remaining_share_before_the_stage_started_counts_from_its_start() -> None:
    rest = remaining_share(_timed_share(10.0), 0, 100 * S, 110 * S, now_ns=90 * S)
    assert rest is not None
    assert rest.duration.ToNanoseconds() == 10 * S


def test_remaining_share_with_too_little_time_left_is_none() -> None:
    end = 110 * S
    just_enough = end - int((MIN_TAKEOVER_S + TAKEOVER_LEAD_S + 0.01) * S)
    too_late = end - int((MIN_TAKEOVER_S + TAKEOVER_LEAD_S - 0.01) * S)
    assert remaining_share(_timed_share(10.0), 0, 100 * S, end, now_ns=just_enough) is not None
    assert remaining_share(_timed_share(10.0), 0, 100 * S, end, now_ns=too_late) is None


def test_remaining_share_of_a_counted_stage_is_the_requests_not_announced() -> None:
    share = run_pb2.Stage(concurrency=4, requests=30)
    rest = remaining_share(share, 12, 100 * S, None, now_ns=101 * S)
    assert rest is not None
    assert (rest.requests, rest.concurrency) == (18, 4)
    assert not rest.HasField("duration")
    assert remaining_share(share, 30, 100 * S, None, now_ns=101 * S) is None
    assert remaining_share(share, 31, 100 * S, None, now_ns=101 * S) is None


def test_a_remaining_share_splits_over_the_takers_like_a_stage() -> None:
    rest = remaining_share(run_pb2.Stage(concurrency=5, requests=30), 10, 0, None, now_ns=S)
    assert rest is not None
    shares = stage_shares(rest, 2)
    assert [(s.concurrency, s.requests) for s in shares if s is not None] == [(3, 10), (2, 10)]


def test_placement_wait_defaults_when_unset_or_zero() -> None:
    assert placement_wait_s(run_pb2.Placement()) == DEFAULT_WAIT_TIMEOUT_S
    placement = run_pb2.Placement()
    placement.wait_timeout.FromNanoseconds(0)
    assert placement_wait_s(placement) == DEFAULT_WAIT_TIMEOUT_S
    placement.wait_timeout.FromNanoseconds(1_500_000_000)
    assert placement_wait_s(placement) == 1.5


def test_placement_failure_names_what_was_missing() -> None:
    assert placement_failure(4, {"zone": "a", "gpu": "h100"}, 300.0, 2, 1) == (
        "placement: needed 4 agents matching gpu=h100,zone=a, but after waiting 300 s only 2 were connected (1 free)"
    )
    assert placement_failure(2, {}, 1.5, 1, 0) == (
        "placement: needed 2 agents, but after waiting 1.5 s only 1 was connected (0 free)"
    )


def test_load_text() -> None:
    timed = _timed_share(12.5, rate=2.0)
    assert load_text(timed) == "2 req/s, 12.5 s"
    assert load_text(run_pb2.Stage(concurrency=3, requests=40)) == "concurrency 3, 40 requests"


def test_stall_text() -> None:
    stall = agent_service_pb2.Stall(in_flight=2)
    stall.length.FromNanoseconds(11_240_000_000)
    stall.start_offset.FromNanoseconds(3 * S)
    assert stall_text(0, "agent-1", stall) == (
        "stage 0: agent-1: no request could be sent for 11.2 s (from 3.0 s into the stage; 2 request(s) in flight "
        "and no response data)"
    )
