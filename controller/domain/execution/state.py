"""The in-memory state of run execution: a run executing here (`RunExecution`), its agent
slots, the stage in progress (`StageRun`) and each assignment (`ActiveAssignment`), whose
life is one explicit `AssignmentPhase`; `ActiveRuns` finds them by id.

An assignment's phases (transitions are methods; any other move raises IllegalTransition):

    PLANNED --sent--> STARTING --started--> RUNNING
       |                 |                     |
       +------stop-------+---------stop--------+--> STOPPING
                         |                     |       |
                         +------report---------+-------+--> REPORTED --all batches committed--> DONE

    and from every phase before DONE: --lost--> LOST

The agent's disconnect is not a phase: it can happen in any of them, and a rejoin within
the grace continues where the assignment was (its slot gets the new session).
"""

from __future__ import annotations

import asyncio
import enum
import hashlib
from dataclasses import dataclass, field

from common.codes import AssignmentState
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.execution.agents import AgentSession
from controller.domain.results.live import LiveWindow
from controller.store import repository as repo

ASSIGNMENT_LOST = AssignmentState.LOST  # final state of an assignment whose agent was lost
FINAL_REPORTS = (
    AssignmentState.COMPLETED,
    AssignmentState.FAILED,
    AssignmentState.CANCELLED,
)


def token_sha256(token: str) -> str:
    """What is kept of a resume token (the agent proves an assignment with the token itself)."""
    return hashlib.sha256(token.encode()).hexdigest()


class AssignmentPhase(enum.Enum):
    PLANNED = "planned"  # the Assign is prepared, not sent (a stage's Assigns go out together)
    STARTING = "starting"  # the Assign is sent; the agent has not reported its start yet
    RUNNING = "running"  # the agent reported its start
    STOPPING = "stopping"  # the controller sent a Cancel before the final report
    REPORTED = "reported"  # the final report is in; some batches it announced are not committed
    DONE = "done"  # the final report and every batch it announced are committed
    LOST = "lost"  # the agent was lost, or the stage ended without the final report


_P = AssignmentPhase
_NEXT: dict[AssignmentPhase, frozenset[AssignmentPhase]] = {
    _P.PLANNED: frozenset({_P.STARTING, _P.STOPPING, _P.LOST}),
    _P.STARTING: frozenset({_P.RUNNING, _P.STOPPING, _P.REPORTED, _P.LOST}),
    _P.RUNNING: frozenset({_P.STOPPING, _P.REPORTED, _P.LOST}),
    _P.STOPPING: frozenset({_P.REPORTED, _P.LOST}),
    _P.REPORTED: frozenset({_P.DONE, _P.LOST}),
    _P.DONE: frozenset(),
    _P.LOST: frozenset(),
}
# The phases in which the agent's final report is still expected.
_AWAITING_REPORT = frozenset({_P.STARTING, _P.RUNNING, _P.STOPPING})


class IllegalTransition(Exception):
    """An assignment was asked to move to a phase it cannot reach from its current one."""


@dataclass(eq=False)
class AgentSlot:
    """A place in a run for one agent; the session changes when the agent reconnects."""

    session: AgentSession | None


@dataclass(eq=False)
class StageRun:
    """One stage in progress: its assignments (initial and takeovers) and its clock."""

    idx: int
    stage: run_pb2.Stage
    start_ns: int  # planned start, controller clock
    end_ns: int | None  # planned end (stages with a duration), controller clock
    active: list[ActiveAssignment] = field(default_factory=list)
    # Set whenever an assignment of the stage is added, done or lost (the stage waits on it).
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    takeovers: int = 0

    @property
    def all_done(self) -> bool:
        return all(a.done for a in self.active)


@dataclass(eq=False)
class ActiveAssignment:
    """One agent's share of one stage, from its Assign to its end (see AssignmentPhase)."""

    assignment_id: str
    pk: int
    execution: RunExecution
    stage_idx: int
    slot: AgentSlot
    share: run_pb2.Stage
    stage_run: StageRun
    agent_name: str
    # The Assign, kept until it is sent (stage starts send all of a stage's Assigns together).
    assign_message: agent_service_pb2.ConnectResponse | None
    takeover: bool
    # SHA-256 of the resume token sent in the Assign (the agent proves the assignment with it).
    resume_token_sha256: str
    created_ns: int
    phase: AssignmentPhase = AssignmentPhase.PLANNED
    # The agent's final report: its state (0 until it arrives), message and batch count.
    reported_state: int = 0
    message: str = ""
    batch_count: int | None = None
    requests_sent: int = 0
    # When the agent reported it started (controller clock); recorded once, in any phase.
    started_ns: int | None = None
    clock_offset_ns: int = 0  # the agent's estimated offset when the Assign went out
    # Runs while the agent is disconnected: it loses the assignment unless it resumes first.
    grace_timer: asyncio.Task[None] | None = None
    max_loop_lag_ms: float = 0.0
    max_cpu_percent: float = 0.0
    # Trace replay: which of the trace's requests the share has (agent.trace.share_entries).
    share_index: int = 0
    share_count: int = 0

    @property
    def done(self) -> bool:
        """Nothing more is expected of the agent for this assignment."""
        return self.phase in (AssignmentPhase.DONE, AssignmentPhase.LOST)

    @property
    def awaiting_report(self) -> bool:
        """The Assign went out and the agent's final report has not arrived."""
        return self.phase in _AWAITING_REPORT

    @property
    def final_state(self) -> int:
        """The stored state: the reported one, ASSIGNMENT_LOST, or 0 while neither is known."""
        return ASSIGNMENT_LOST if self.phase is AssignmentPhase.LOST else self.reported_state

    def _move(self, to: AssignmentPhase) -> None:
        if to not in _NEXT[self.phase]:
            raise IllegalTransition(f"assignment {self.assignment_id}: {self.phase.value} -> {to.value}")
        self.phase = to

    def take_assign(self) -> agent_service_pb2.ConnectResponse:
        """The prepared Assign, to be sent now: PLANNED -> STARTING."""
        self._move(AssignmentPhase.STARTING)
        message, self.assign_message = self.assign_message, None
        assert message is not None  # set from creation until PLANNED ends
        return message

    def start_reported(self, started_ns: int) -> bool:
        """The agent reported its start (STARTING -> RUNNING); False if a start was already
        recorded. The time is recorded in any phase: a late start report still dates the
        agent's samples."""
        if self.started_ns is not None:
            return False
        self.started_ns = started_ns
        if self.phase is AssignmentPhase.STARTING:
            self._move(AssignmentPhase.RUNNING)
        return True

    def stop(self) -> None:
        """The controller sent (or would send, were the agent connected) a Cancel."""
        self._move(AssignmentPhase.STOPPING)

    def report(self, state: int, message: str, batch_count: int, requests_sent: int) -> None:
        """The agent's final report: -> REPORTED (DONE once its batches are committed)."""
        if state not in FINAL_REPORTS:
            raise IllegalTransition(f"assignment {self.assignment_id}: {state} is not a final state")
        self._move(AssignmentPhase.REPORTED)
        self.reported_state, self.message = state, message[:1000]
        self.batch_count, self.requests_sent = batch_count, requests_sent

    def finish(self) -> None:
        """Every batch the final report announced is committed: REPORTED -> DONE."""
        self._move(AssignmentPhase.DONE)
        self.stage_run.changed.set()

    def mark_lost(self, message: str) -> None:
        """The agent is lost, or gave no final report in time: -> LOST."""
        self._move(AssignmentPhase.LOST)
        self.message = message[:1000]
        self.stage_run.changed.set()


@dataclass(eq=False)
class RunExecution:
    """A run executing in this process: its spec, its agents, and how it is to end."""

    record: repo.RunRecord
    spec: run_pb2.RunSpec
    secret: str  # the target's credentials, stored apart from the spec (controller/domain/access/secrets.py)
    slots: list[AgentSlot]
    live: LiveWindow = field(default_factory=LiveWindow)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str = ""
    task: asyncio.Task[None] | None = None
    dataset: list[run_pb2.DatasetEntry] = field(default_factory=list)
    # Set when the run must fail (a check or the loss policy), not merely stop.
    abort_reason: str = ""
    # Set when the controller stops under it: the run ends INTERRUPTED.
    interrupted: bool = False
    stage: StageRun | None = None
    # Agents of this run that were lost; one that rejoins with a new session is named in an event.
    lost_names: set[str] = field(default_factory=set)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def policy(self) -> int:
        return self.spec.placement.on_agent_loss or run_pb2.AGENT_LOSS_POLICY_REDISTRIBUTE

    def request_cancel(self, reason: str) -> None:
        """Stop the run after its current stage's agents stopped (the first reason stays)."""
        if not self.cancelled.is_set():
            self.cancel_reason = reason
            self.cancelled.set()

    def abort(self, reason: str) -> None:
        """Stop the run and fail it with `reason`."""
        self.abort_reason = reason
        self.cancel_reason = reason
        self.cancelled.set()

    def interrupt(self, reason: str) -> None:
        """Stop the run because the controller stops; it ends INTERRUPTED."""
        self.interrupted = True
        self.request_cancel(reason)


class ActiveRuns:
    """The runs executing in this process and their assignments in progress, by id."""

    def __init__(self) -> None:
        self._runs: dict[str, RunExecution] = {}
        self._assignments: dict[str, ActiveAssignment] = {}

    def add_run(self, ex: RunExecution) -> None:
        self._runs[ex.run_id] = ex

    def remove_run(self, run_id: str) -> None:
        self._runs.pop(run_id, None)

    def run(self, run_id: str) -> RunExecution | None:
        return self._runs.get(run_id)

    def runs(self) -> list[RunExecution]:
        """A copy: callers await while they walk it, and runs start and end meanwhile."""
        return list(self._runs.values())

    def run_ids(self) -> set[str]:
        return set(self._runs)

    def add_assignment(self, a: ActiveAssignment) -> None:
        self._assignments[a.assignment_id] = a

    def remove_assignment(self, assignment_id: str) -> None:
        self._assignments.pop(assignment_id, None)

    def assignment(self, assignment_id: str) -> ActiveAssignment | None:
        return self._assignments.get(assignment_id)

    def assignments_of(self, session: AgentSession) -> list[ActiveAssignment]:
        """The assignments whose slot holds `session` now (a copy, in the order they were given)."""
        return [a for a in self._assignments.values() if a.slot.session is session]
