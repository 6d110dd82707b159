"""The back-off on refused connections, the dead-target rule and the stall watch (pure logic)."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.reachability import RefusalBackoff, TargetReachability
from agent.stalls import StallWatch

pytestmark = pytest.mark.timeout(30)

S = 1_000_000_000


async def test_refusals_back_off_one_probe_at_a_time_doubling_to_the_cap() -> None:
    dead: list[str] = []
    reach = TargetReachability(60.0, dead.append, RefusalBackoff(initial_s=0.02, max_s=0.08))
    assert not reach.refusing and await reach.wait_turn() is False  # reachable: no wait
    # The first refusal, and others already on their way, start one 20 ms wait.
    for _ in range(3):
        reach.outcome(True, "refused", probe=False)
    gaps = []
    last = time.perf_counter()
    for _ in range(4):
        assert await reach.wait_turn() is True  # the probe
        now = time.perf_counter()
        gaps.append(now - last)
        last = now
        reach.outcome(True, "refused", probe=True)
    # 20 ms, then 40, 80 and 80 (the cap): each at least that long.
    for gap, least in zip(gaps, (0.02, 0.04, 0.08, 0.08), strict=True):
        assert gap >= least * 0.9, gaps
    assert not dead


async def test_only_one_request_probes_and_a_connection_releases_everyone() -> None:
    reach = TargetReachability(60.0, lambda _: None, RefusalBackoff(initial_s=0.01, max_s=0.01))
    reach.outcome(True, "refused", probe=False)
    turns = [asyncio.create_task(reach.wait_turn()) for _ in range(5)]
    done, waiting = await asyncio.wait(turns, timeout=2.0, return_when=asyncio.FIRST_COMPLETED)
    assert [t.result() for t in done] == [True] and len(waiting) == 4  # the others wait for its outcome
    reach.outcome(False, "", probe=True)  # the probe got a connection
    rest = await asyncio.wait_for(asyncio.gather(*waiting), 2.0)
    assert rest == [False] * 4 and not reach.refusing


async def test_refusing_longer_than_the_limit_declares_the_target_dead_once() -> None:
    dead: list[str] = []
    reach = TargetReachability(0.05, dead.append, RefusalBackoff(initial_s=0.01, max_s=0.02))
    reach.outcome(True, "ClientConnectorError: refused", probe=False)
    deadline = time.monotonic() + 5.0
    while len(dead) < 1 and time.monotonic() < deadline:
        assert await reach.wait_turn()
        reach.outcome(True, "ClientConnectorError: refused", probe=True)
    reach.outcome(True, "ClientConnectorError: refused", probe=False)
    assert len(dead) == 1
    assert dead[0].startswith("the target refused connections for 0.")
    assert "unreachable_timeout 0.05 s" in dead[0] and dead[0].endswith("ClientConnectorError: refused")


def test_a_connection_in_between_restarts_the_clock() -> None:
    dead: list[str] = []
    reach = TargetReachability(0.0, dead.append)
    reach.outcome(False, "", probe=False)
    assert not dead and not reach.refusing
    reach.outcome(True, "refused", probe=False)  # limit 0: the first refusal is already too long
    assert len(dead) == 1


def test_stall_watch_reports_quiet_stretches_with_requests_in_flight() -> None:
    watch = StallWatch(window_end_ns=60 * S, threshold_s=5.0)
    watch.observe(4 * S, activity_ns=1 * S, in_flight=8)  # 3 s quiet: not yet
    watch.observe(7 * S, activity_ns=1 * S, in_flight=8)  # 6 s: a stall since 1 s
    watch.observe(12 * S, activity_ns=12 * S, in_flight=8)  # activity again
    watch.observe(30 * S, activity_ns=20 * S, in_flight=0)  # quiet, but nothing in flight
    stalls = watch.finish(31 * S)
    assert [(s.start_ns, s.end_ns, s.in_flight) for s in stalls] == [(1 * S, 12 * S, 8)]


def test_stall_watch_ends_a_stall_at_the_sending_window() -> None:
    watch = StallWatch(window_end_ns=20 * S, threshold_s=5.0)
    watch.observe(10 * S, activity_ns=4 * S, in_flight=2)
    stalls = watch.finish(50 * S)  # in-flight requests drained long after the window
    assert [(s.start_ns, s.end_ns) for s in stalls] == [(4 * S, 20 * S)]
    assert stalls[0].length_s == 16.0
    late = StallWatch(window_end_ns=20 * S, threshold_s=5.0)
    late.observe(30 * S, activity_ns=21 * S, in_flight=2)  # quiet only after the window: no stall
    assert late.finish(40 * S) == []
