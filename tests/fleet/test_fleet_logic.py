"""Pure fleet logic: clock offset estimate, placement flags and validation, lease, shares."""

from __future__ import annotations

import pytest

from agent.assignment import Lease
from client import spec_builder
from common.proto.loadtest.v1 import run_pb2
from controller.domain.errors import InvalidArgument
from controller.domain.execution.agents import AgentSession, ClockEstimate
from controller.domain.execution.planning import stage_shares
from controller.domain.spec import validate_and_default

MS = 1_000_000


def test_clock_estimate_keeps_the_exchange_with_the_smallest_round_trip() -> None:
    clock = ClockEstimate()
    # Agent 5 ms behind the controller; symmetric 1 ms legs: offset +5 ms, rtt 2 ms.
    assert clock.add(100 * MS, 106 * MS, 106 * MS, 102 * MS)
    assert (clock.offset_ns, clock.rtt_ns) == (5 * MS, 2 * MS)
    # A slower, asymmetric exchange (rtt 20 ms) would be off by 9 ms: ignored.
    assert not clock.add(200 * MS, 224 * MS, 224 * MS, 220 * MS)
    assert clock.offset_ns == 5 * MS
    # A quicker one replaces it.
    assert clock.add(300 * MS, 305 * MS + MS // 2, 305 * MS + MS // 2, 301 * MS)
    assert clock.rtt_ns == MS and clock.offset_ns == 5 * MS
    assert not clock.add(0, 1, 2, 3)  # incomplete
    assert clock.samples == 3


def test_selector_matches_every_pair() -> None:
    session = AgentSession("s", "a", {"zone": "a", "gpu": "h100"}, "v", 0)
    assert session.matches({}) and session.matches({"zone": "a"}) and session.matches({"zone": "a", "gpu": "h100"})
    assert not session.matches({"zone": "b"}) and not session.matches({"rack": "1"})


def test_run_flags_build_the_placement() -> None:
    args = spec_builder.spec_parser().parse_args(
        [
            "--target",
            "http://x/v1",
            "--model",
            "m",
            "--concurrency",
            "4",
            "--agents",
            "3",
            "--agent-selector",
            "zone=a,gpu=h100",
            "--agent-wait",
            "90s",
            "--on-agent-loss",
            "continue",
        ]
    )
    placement = spec_builder.build_spec(args).placement
    assert placement.agents == 3 and dict(placement.selector) == {"zone": "a", "gpu": "h100"}
    assert placement.wait_timeout.seconds == 90
    assert placement.on_agent_loss == run_pb2.AGENT_LOSS_POLICY_CONTINUE
    with pytest.raises(SystemExit):
        spec_builder.spec_parser().parse_args(["--target", "t", "--agent-selector", "zone"])


def _spec() -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(target=run_pb2.Target(base_url="http://127.0.0.1:1/v1", model="m"))
    spec.stages.add(concurrency=1, requests=1)
    return spec


def test_placement_validation_and_defaults() -> None:
    valid = validate_and_default(_spec())
    assert valid.placement.on_agent_loss == run_pb2.AGENT_LOSS_POLICY_REDISTRIBUTE
    bad = _spec()
    bad.placement.selector[""] = "x"
    bad.placement.wait_timeout.seconds = -1
    with pytest.raises(InvalidArgument) as info:
        validate_and_default(bad)
    fields = {v.field for v in info.value.violations}
    assert fields == {"spec.placement.selector['']", "spec.placement.wait_timeout"}


def test_shares_split_exactly() -> None:
    closed = [s.concurrency for s in stage_shares(run_pb2.Stage(concurrency=32), 3) if s]
    assert closed == [11, 11, 10]
    rates = [s.request_rate for s in stage_shares(run_pb2.Stage(request_rate=40.0, requests=101), 4) if s]
    assert rates == [10.0] * 4
    counts = [s.requests for s in stage_shares(run_pb2.Stage(request_rate=40.0, requests=101), 4) if s]
    assert counts == [26, 25, 25, 25]


def test_lease_expires_without_renewal() -> None:
    assert Lease().valid()  # no lease granted: never expires
    lease = Lease(0.0)
    assert not lease.valid()
    lease.configure(60.0)
    lease.renew()
    assert lease.valid()
