"""What agents report on their streams, as the AgentService servicer hands it in: assignment
updates (start, final state, stalls), heartbeats and clock samples, preflight answers, and
sample batches committed or refused; and the acks that go back.

An assignment is done once its final report is in *and* the ack position covers every batch
the report announced (`AckTracker`), so a stage never ends with samples still on their way.
A final report is acked with the commit position; an agent forgets a finished assignment
once that ack and every batch's are in. An agent that cancels its assignment without being
asked (SIGTERM) has left: its share is handled like a lost one's.
"""

from __future__ import annotations

import time

import structlog

from common.codes import AssignmentState
from common.proto.loadtest.v1 import agent_service_pb2
from controller.domain.execution.acks import AckTracker
from controller.domain.execution.agents import AgentHealthReport, AgentRegistry, AgentSession
from controller.domain.execution.events import RunEvents
from controller.domain.execution.loss import AgentLoss
from controller.domain.execution.planning import stall_text
from controller.domain.execution.preflight import PreflightAnswers
from controller.domain.execution.state import FINAL_REPORTS, ActiveAssignment, ActiveRuns, AssignmentPhase
from controller.domain.execution.takeover import LossPolicy
from controller.domain.results.ingest import IngestTarget
from controller.store import repository as repo
from controller.store.interface import Store

log = structlog.get_logger(__name__)


class AgentReports:
    """Applies what agents report to the assignments and runs in progress."""

    def __init__(
        self,
        store: Store,
        agents: AgentRegistry,
        active: ActiveRuns,
        events: RunEvents,
        loss: AgentLoss,
        policy: LossPolicy,
        acks: AckTracker,
        preflights: PreflightAnswers,
    ) -> None:
        self._store = store
        self._agents = agents
        self._active = active
        self._events = events
        self._loss = loss
        self._policy = policy
        self._acks = acks
        self._preflights = preflights

    async def assignment_update(self, session: AgentSession, update: agent_service_pb2.AssignmentUpdate) -> None:
        a = self._active.assignment(update.assignment_id)
        state = int(update.state)
        if a is not None:
            a.requests_sent = max(a.requests_sent, update.requests_sent)
            started_ns = update.start_unix_ns + session.clock.offset_ns
            if update.start_unix_ns and a.start_reported(started_ns):
                await self._store.update_assignment(
                    a.pk, started_ns=started_ns, clock_offset_ns=session.clock.offset_ns
                )
            if state in FINAL_REPORTS and a.awaiting_report:
                await self._final_report(a, update)
        if state in FINAL_REPORTS:
            # Acknowledge the final report (with the commit position): an agent forgets a
            # finished assignment once every batch and the report itself are acked.
            session.send(
                agent_service_pb2.ConnectResponse(
                    ack=agent_service_pb2.Ack(
                        assignment_id=update.assignment_id, batch_seq=self._acks.through(update.assignment_id)
                    )
                )
            )

    async def _final_report(self, a: ActiveAssignment, update: agent_service_pb2.AssignmentUpdate) -> None:
        asked_to_stop = a.phase is AssignmentPhase.STOPPING
        a.report(update.state, update.message, update.batch_count, update.requests_sent)
        await self._store.update_assignment(
            a.pk,
            state=update.state,
            message=a.message,
            batch_count=update.batch_count,
            requests_sent=update.requests_sent,
            ended_at=time.time_ns(),
        )
        if int(update.state) == AssignmentState.FAILED:
            log.warning("assignment_failed", assignment_id=a.assignment_id, message=a.message)
        for stall in update.stalls:
            await self._events.add(
                a.execution.run_id, a.execution.record.pk, "stall", stall_text(a.stage_idx, a.agent_name, stall)
            )
        self._finish_if_committed(a)
        ex = a.execution
        departed = int(update.state) == AssignmentState.CANCELLED and not asked_to_stop
        if departed and not ex.cancelled.is_set() and ex.stage is a.stage_run:
            # The agent stopped on its own (SIGTERM): its share is gone like a lost one's.
            reason = f"{a.agent_name} stopped its assignment early ({a.message or 'cancelled'})"
            await self._events.add(ex.run_id, ex.record.pk, "agent_left", f"stage {a.stage_idx}: {reason}")
            await self._policy.apply(a, reason)

    def heartbeat(self, session: AgentSession, health: AgentHealthReport) -> None:
        """Record an agent's health; the worst figures of an assignment go into its result."""
        self._agents.heartbeat(session, health)
        for a in self._active.assignments_of(session):
            a.max_loop_lag_ms = max(a.max_loop_lag_ms, health.event_loop_lag_ms)
            a.max_cpu_percent = max(a.max_cpu_percent, health.cpu_percent)

    def clock_sample(self, session: AgentSession, t1: int, t2: int, t3: int, t4: int) -> None:
        """A completed clock exchange (four time stamps, as in NTP: `ClockEstimate`)."""
        self._agents.clock_sample(session, t1, t2, t3, t4)

    def preflight_result(self, session: AgentSession, result: agent_service_pb2.PreflightResult) -> None:
        """An agent's answer to a Preflight."""
        self._preflights.answered(session.session_id, result)

    async def resolve_batch(self, assignment_id: str) -> IngestTarget | None:
        """Where a batch belongs, and the window of its samples: in memory for live
        assignments, else from the database (the caller checked the session owns it)."""
        a = self._active.assignment(assignment_id)
        if a is not None:
            ex = a.execution
            return IngestTarget(a.pk, ex.record.pk, ex.run_id, a.stage_idx, a.created_ns, None, a.clock_offset_ns)
        found = await self._store.lookup_assignment(assignment_id)
        if found is None:
            return None
        return IngestTarget(
            found.pk,
            found.run_pk,
            found.run_id,
            found.stage_idx,
            found.created_at,
            found.ended_at,
            found.clock_offset_ns,
        )

    async def batch_refused(self, session: AgentSession, assignment_id: str, reason: str) -> None:
        """An owned assignment's agent sent a batch that cannot be stored: the batch is
        dropped, the run says so, and a live assignment counts as lost (its agent is not
        trusted to report it; the run's on_agent_loss policy applies)."""
        a = self._active.assignment(assignment_id)
        if a is None:
            return
        ex = a.execution
        await self._events.add(ex.run_id, ex.record.pk, "batch_refused", f"{session.name}: {reason}"[:1000])
        await self._loss.lose(a, f"{session.name} sent a sample batch that was refused")

    def batch_committed(
        self,
        session: AgentSession,
        target: IngestTarget,
        assignment_id: str,
        batch_seq: int,
        outcome: repo.IngestOutcome,
        stored: repo.BatchIngest,
    ) -> None:
        through = self._acks.commit(assignment_id, batch_seq)
        session.send(
            agent_service_pb2.ConnectResponse(ack=agent_service_pb2.Ack(assignment_id=assignment_id, batch_seq=through))
        )
        a = self._active.assignment(assignment_id)
        if a is not None:
            if outcome.new:
                a.execution.live.add(outcome.ok, outcome.failed, outcome.output_tokens, stored.metric_columns)
            self._finish_if_committed(a)
        self._events.changed(target.run_id)

    def _finish_if_committed(self, a: ActiveAssignment) -> None:
        if (
            a.phase is AssignmentPhase.REPORTED
            and a.batch_count is not None
            and self._acks.through(a.assignment_id) >= a.batch_count
        ):
            a.finish()
