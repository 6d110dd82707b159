"""An assignment's phases (controller/domain/execution/state.py) and cumulative acks
(controller/domain/execution/acks.py), without a coordinator."""

from __future__ import annotations

import pytest

from common.codes import RunState
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.execution.acks import AckTracker
from controller.domain.execution.state import (
    ASSIGNMENT_LOST,
    ActiveAssignment,
    AgentSlot,
    AssignmentPhase,
    IllegalTransition,
    RunExecution,
    StageRun,
)
from controller.store import repository as repo

pytestmark = pytest.mark.timeout(10)

P = AssignmentPhase
COMPLETED = agent_service_pb2.ASSIGNMENT_STATE_COMPLETED
CANCELLED = agent_service_pb2.ASSIGNMENT_STATE_CANCELLED


def make_assignment() -> ActiveAssignment:
    record = repo.RunRecord(1, "run_x", "", "m", RunState.RUNNING, "", "{}", 0, None, None, 0, 0, 0, 0)
    ex = RunExecution(record, run_pb2.RunSpec(), "", [AgentSlot(None)])
    st = StageRun(0, run_pb2.Stage(concurrency=1), 0, None)
    assign = agent_service_pb2.ConnectResponse(assign=agent_service_pb2.Assign(assignment_id="asg_1"))
    a = ActiveAssignment(
        "asg_1", 7, ex, 0, ex.slots[0], run_pb2.Stage(concurrency=1), st, "agent-1", assign, False, "hash", 0
    )
    st.active.append(a)
    return a


def test_the_ordinary_life_of_an_assignment() -> None:
    a = make_assignment()
    assert (a.phase, a.final_state, a.done, a.awaiting_report) == (P.PLANNED, 0, False, False)
    message = a.take_assign()
    assert message.assign.assignment_id == "asg_1" and a.assign_message is None
    assert (a.phase, a.awaiting_report) == (P.STARTING, True)
    assert a.start_reported(123)
    assert (a.phase, a.started_ns) == (P.RUNNING, 123)
    a.report(COMPLETED, "ok", batch_count=3, requests_sent=40)
    assert (a.phase, a.final_state, a.batch_count, a.requests_sent) == (P.REPORTED, COMPLETED, 3, 40)
    assert not a.done and not a.awaiting_report
    a.stage_run.changed.clear()
    a.finish()
    assert (a.phase, a.done, a.final_state) == (P.DONE, True, COMPLETED)
    assert a.stage_run.changed.is_set()  # the stage waiting on its assignments wakes up
    assert a.stage_run.all_done


def test_a_stop_then_a_cancelled_report() -> None:
    a = make_assignment()
    a.take_assign()
    a.stop()
    assert (a.phase, a.awaiting_report) == (P.STOPPING, True)
    a.report(CANCELLED, "", batch_count=0, requests_sent=2)
    assert a.phase is P.REPORTED


def test_lost_from_every_phase_before_done_and_then_final() -> None:
    for steps in ([], ["take"], ["take", "start"], ["take", "stop"], ["take", "report"]):
        a = make_assignment()
        for step in steps:
            {
                "take": a.take_assign,
                "start": lambda a=a: a.start_reported(1),
                "stop": a.stop,
                "report": lambda a=a: a.report(COMPLETED, "", 1, 1),
            }[step]()
        a.stage_run.changed.clear()
        a.mark_lost("gone " * 300)
        assert (a.phase, a.final_state, a.done) == (P.LOST, ASSIGNMENT_LOST, True), steps
        assert len(a.message) == 1000
        assert a.stage_run.changed.is_set()
        for illegal in (a.finish, a.stop, a.take_assign, lambda a=a: a.mark_lost("again")):
            with pytest.raises(IllegalTransition):
                illegal()


@pytest.mark.parametrize(
    ("steps", "illegal"),
    [
        ([], "finish"),  # nothing reported yet
        ([], "report"),  # the Assign was never sent: no genuine report can exist
        (["take"], "take"),  # an Assign goes out once
        (["take"], "finish"),
        (["take", "report"], "report"),  # one final report
        (["take", "report"], "stop"),  # nothing left to stop
        (["take", "stop"], "stop"),
        (["take", "report", "finish"], "report"),
    ],
)
def test_illegal_transitions_are_refused(steps: list[str], illegal: str) -> None:
    a = make_assignment()
    actions = {
        "take": a.take_assign,
        "stop": a.stop,
        "finish": a.finish,
        "report": lambda: a.report(COMPLETED, "", 0, 0),
    }
    for step in steps:
        actions[step]()
    before = a.phase
    with pytest.raises(IllegalTransition):
        actions[illegal]()
    assert a.phase is before


def test_a_report_must_carry_a_final_state() -> None:
    a = make_assignment()
    a.take_assign()
    with pytest.raises(IllegalTransition):
        a.report(agent_service_pb2.ASSIGNMENT_STATE_RUNNING, "", 0, 0)
    assert a.phase is P.STARTING


def test_the_start_is_recorded_once_in_any_phase() -> None:
    a = make_assignment()
    a.take_assign()
    a.mark_lost("gone")
    assert a.start_reported(5)  # a late start report of a lost assignment still dates its samples
    assert (a.phase, a.started_ns) == (P.LOST, 5)
    assert not a.start_reported(9)
    assert a.started_ns == 5


# --- AckTracker --------------------------------------------------------------------------


def test_acks_are_cumulative_in_order() -> None:
    acks = AckTracker()
    assert acks.through("a") == 0
    assert [acks.commit("a", seq) for seq in (1, 2, 3)] == [1, 2, 3]
    assert acks.through("a") == 3


def test_an_ack_does_not_pass_a_gap() -> None:
    acks = AckTracker()
    assert acks.commit("a", 1) == 1
    assert acks.commit("a", 3) == 1  # 2 is missing: 3 waits
    assert acks.commit("a", 5) == 1
    assert acks.commit("a", 2) == 3  # the gap closes: through 3, 5 still waits for 4
    assert acks.commit("a", 4) == 5
    assert acks.through("a") == 5


def test_duplicates_and_replays_change_nothing() -> None:
    acks = AckTracker()
    for seq in (1, 2):
        acks.commit("a", seq)
    assert acks.commit("a", 2) == 2
    assert acks.commit("a", 1) == 2
    assert acks.commit("a", 4) == 2
    assert acks.commit("a", 4) == 2
    assert acks.commit("a", 3) == 4


def test_the_first_batch_seen_continues_what_was_acked_before() -> None:
    # After a controller restart an agent replays from its first unacked batch (here 6).
    acks = AckTracker()
    assert acks.commit("a", 6) == 6
    assert acks.commit("a", 8) == 6
    assert acks.commit("a", 7) == 8


def test_assignments_are_tracked_apart_and_forgotten() -> None:
    acks = AckTracker()
    acks.commit("a", 1)
    acks.commit("b", 1)
    acks.commit("b", 2)
    assert (acks.through("a"), acks.through("b")) == (1, 2)
    acks.forget("b")
    assert (acks.through("a"), acks.through("b")) == (1, 0)
