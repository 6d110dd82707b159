"""ControllerLink without a network: backoff, messages it builds, how it answers the controller."""

from __future__ import annotations

import asyncio
import random
import time

import pytest

from agent.controller_link import ControllerLink, ReconnectBackoff
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2

pytestmark = pytest.mark.timeout(60)

ConnectResponse = agent_service_pb2.ConnectResponse


def make_session() -> tuple[ControllerLink, list[agent_service_pb2.ConnectRequest], asyncio.Event]:
    stop = asyncio.Event()
    session = ControllerLink("127.0.0.1:1", name="n", labels={"zone": "a"}, api_key="k", stop=stop)
    sent: list[agent_service_pb2.ConnectRequest] = []
    session.send = sent.append  # type: ignore[method-assign,assignment]
    return session, sent, stop


def test_backoff_doubles_to_the_cap_with_jitter() -> None:
    backoff = ReconnectBackoff(initial_s=0.2, max_s=5.0, jitter=0.2)
    rng = random.Random(1)
    for attempt, base in [(0, 0.2), (1, 0.4), (2, 0.8), (3, 1.6), (4, 3.2), (5, 5.0), (50, 5.0)]:
        delays = [backoff.delay_s(attempt, rng) for _ in range(50)]
        assert all(base * 0.8 <= d <= base * 1.2 for d in delays)
        assert len(set(delays)) > 1  # jittered: agents do not reconnect in lockstep


async def test_hello_and_heartbeat_contents() -> None:
    session, _, _ = make_session()
    hello = session.hello().hello
    assert (hello.name, dict(hello.labels)) == ("n", {"zone": "a"})
    assert hello.version
    assert list(hello.active_assignment_ids) == []
    beat = session.heartbeat().heartbeat
    assert abs(beat.agent_time.ToNanoseconds() - time.time_ns()) < 5e9
    assert beat.health.in_flight == 0
    assert beat.health.cpu_percent >= 0


async def test_cancel_of_an_unknown_assignment_reports_cancelled() -> None:
    session, sent, _ = make_session()
    session.handle_response(ConnectResponse(cancel=agent_service_pb2.Cancel(assignment_id="nope", reason="x")))
    assert len(sent) == 1
    update = sent[0].assignment_update
    assert (update.assignment_id, update.state, update.batch_count) == (
        "nope",
        agent_service_pb2.ASSIGNMENT_STATE_CANCELLED,
        0,
    )


async def test_ack_of_an_unknown_assignment_is_ignored() -> None:
    session, sent, _ = make_session()
    session.handle_response(ConnectResponse(ack=agent_service_pb2.Ack(assignment_id="x", batch_seq=3)))
    assert sent == []


async def test_assign_while_stopping_is_refused() -> None:
    session, sent, stop = make_session()
    stop.set()
    session.handle_response(ConnectResponse(assign=agent_service_pb2.Assign(assignment_id="a")))
    assert sent[0].assignment_update.state == agent_service_pb2.ASSIGNMENT_STATE_FAILED
    assert session.assignments == {}


async def test_failed_assignment_then_duplicate_assign_and_final_ack() -> None:
    session, sent, _ = make_session()
    assign = agent_service_pb2.Assign(
        assignment_id="a",
        target=run_pb2.Target(base_url="ftp://nowhere", model="m"),
        stage=run_pb2.Stage(concurrency=1, requests=1),
    )
    session.handle_response(ConnectResponse(assign=assign))
    runner = session.assignments["a"]
    assert runner.task is not None
    await asyncio.wait_for(runner.task, 10)
    states = [m.assignment_update.state for m in sent]
    assert states == [
        agent_service_pb2.ASSIGNMENT_STATE_RUNNING,
        agent_service_pb2.ASSIGNMENT_STATE_FAILED,
    ]
    assert list(session.hello().hello.active_assignment_ids) == []  # finished: not active

    # A repeated Assign is answered with where it stands, not run twice.
    session.handle_response(ConnectResponse(assign=assign))
    assert sent[-1].assignment_update == runner.final_update
    assert session.assignments["a"] is runner

    # The replay carries the final update until the controller acks after it.
    assert [m.WhichOneof("body") for m in runner.replay_messages()] == ["assignment_update"]
    session.handle_response(ConnectResponse(ack=agent_service_pb2.Ack(assignment_id="a")))
    assert "a" not in session.assignments
