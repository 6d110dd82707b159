"""Agent loss: noticing that an agent is gone, and taking it back when it returns.

Agents heartbeat every `heartbeat_interval_s`. An agent whose stream is open but silent for
`MISSED_HEARTBEATS` intervals is lost (its stream is closed, so it rejoins with a new
session); an agent whose stream ended without a Goodbye is lost unless it reconnects and
resumes its assignment within `disconnect_grace_s`. A lost agent's assignment ends LOST,
with the requests it announced but never reported counted as lost, and the run's loss policy
applies (controller/domain/execution/takeover.py). Every loss and rejoin is a run event.

A reconnecting agent claims its assignments in Hello and proves each with the resume token
its Assign carried (`prove_resume`); a proven assignment that is still live continues on the
new session, any other is cancelled on the agent.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Mapping

import structlog

from common.proto.loadtest.v1 import agent_service_pb2
from controller.domain.execution.agents import AgentRegistry, AgentSession
from controller.domain.execution.events import RunEvents
from controller.domain.execution.state import ASSIGNMENT_LOST, ActiveAssignment, ActiveRuns, token_sha256
from controller.domain.execution.takeover import LossPolicy
from controller.store.interface import Store

log = structlog.get_logger(__name__)

# An agent is lost after this many heartbeat intervals without a heartbeat; its lease (how
# long it keeps firing without hearing from us) is as long.
MISSED_HEARTBEATS = 3
# A Hello may claim at most this many assignments (an agent holds its running ones and at
# most 256 finished ones waiting for acks: agent/controller_link.py MAX_RETAINED_FINISHED).
MAX_RESUME_CLAIMS = 1024


class AssignmentRefused(Exception):
    """A session reported for, or tried to resume, an assignment it was not given."""

    def __init__(self, assignment_id: str, run_id: str, message: str) -> None:
        super().__init__(message)
        self.assignment_id = assignment_id
        self.run_id = run_id
        self.message = message


class AgentLoss:
    """Declares agents lost (silence, disconnects past the grace) and resumes rejoining ones."""

    def __init__(
        self,
        store: Store,
        agents: AgentRegistry,
        active: ActiveRuns,
        events: RunEvents,
        policy: LossPolicy,
        *,
        heartbeat_interval_s: float,
        disconnect_grace_s: float,
    ) -> None:
        self._store = store
        self._agents = agents
        self._active = active
        self._events = events
        self._policy = policy
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lost_after_s = heartbeat_interval_s * MISSED_HEARTBEATS
        self.disconnect_grace_s = disconnect_grace_s

    # --- noticing a loss -----------------------------------------------------------------

    async def watch_heartbeats(self) -> None:
        """Declare agents lost after MISSED_HEARTBEATS silent heartbeat intervals."""
        while True:
            await asyncio.sleep(self.heartbeat_interval_s / 4)
            now = time.monotonic()
            for session in self._agents.all():
                silent_s = now - session.last_heartbeat_mono
                if session.close_reason or session.departing or silent_s <= self.lost_after_s:
                    continue
                reason = f"{session.name} missed {MISSED_HEARTBEATS} heartbeats (silent for {silent_s:.1f} s)"
                log.warning("agent_lost", session_id=session.session_id, agent=session.name, reason=reason)
                # Closing the stream makes a frozen agent rejoin with a new session later.
                session.close(reason)
                self._agents.remove(session)
                await self._session_gone(session, reason)

    async def disconnected(self, session: AgentSession, *, shutting_down: bool) -> None:
        """The agent's stream ended: its live assignments wait `disconnect_grace_s` for it."""
        was_registered = self._agents.get(session.session_id) is session
        self._agents.remove(session)
        if shutting_down:
            return  # the store may already be closed
        await self._store.record_agent_disconnected(session.session_id, time.time_ns())
        log.info("agent_disconnected", session_id=session.session_id, agent=session.name, goodbye=session.departing)
        if not was_registered and session.close_reason:
            return  # already declared lost by the watchdog
        for a in self._active.assignments_of(session):
            a.slot.session = None
            if not a.done:
                a.grace_timer = asyncio.create_task(self._lose_after_grace(a, session.name))
                await self._events.add(
                    a.execution.run_id,
                    a.execution.record.pk,
                    "agent_disconnected",
                    f"{session.name} disconnected during {a.assignment_id}",
                )
        self._free_slots(session)

    async def _session_gone(self, session: AgentSession, reason: str) -> None:
        """The session is lost for good: its assignments are lost, its slot freed."""
        for a in self._active.assignments_of(session):
            a.slot.session = None
            if not a.done:
                await self.lose(a, reason)
        self._free_slots(session)

    def _free_slots(self, session: AgentSession) -> None:
        if session.run_id and (ex := self._active.run(session.run_id)) is not None:
            for slot in ex.slots:
                if slot.session is session:
                    slot.session = None

    async def _lose_after_grace(self, a: ActiveAssignment, name: str) -> None:
        await asyncio.sleep(self.disconnect_grace_s)
        if a.slot.session is None and not a.done:
            a.grace_timer = None
            await self.lose(a, f"{name} disconnected and did not resume within {self.disconnect_grace_s:g} s")

    async def lose(self, a: ActiveAssignment, reason: str) -> None:
        """Mark an assignment LOST and apply the run's `on_agent_loss` policy."""
        if a.done:
            return
        ex, run = a.execution, a.execution.record
        a.mark_lost(reason)
        ex.lost_names.add(a.agent_name)
        await self._store.update_assignment(
            a.pk, state=ASSIGNMENT_LOST, message=a.message, requests_sent=a.requests_sent, ended_at=time.time_ns()
        )
        await self._events.add(
            ex.run_id,
            run.pk,
            "agent_lost",
            f"stage {a.stage_idx}: {reason}; assignment {a.assignment_id} had announced {a.requests_sent} requests",
        )
        log.warning("assignment_lost", run_id=ex.run_id, assignment_id=a.assignment_id, reason=reason)
        await self._policy.apply(a, reason)

    # --- an agent coming back ------------------------------------------------------------

    async def prove_resume(self, active_assignment_ids: list[str], resume_tokens: Mapping[str, str]) -> set[str]:
        """The assignments a connecting agent proved it was given (each claimed one that
        exists, with its resume token); raises AssignmentRefused for a claim it cannot prove
        (e.g. another agent's assignment id, as ListAgents shows them)."""
        claimed = [*dict.fromkeys([*active_assignment_ids, *resume_tokens])]
        if len(claimed) > MAX_RESUME_CLAIMS:
            raise AssignmentRefused("", "", f"Hello claims {len(claimed)} assignments (at most {MAX_RESUME_CLAIMS})")
        proven: set[str] = set()
        for assignment_id in claimed:
            found = await self._token_of(assignment_id)
            if found is None:
                continue  # unknown (e.g. its run was deleted): nothing to take over
            expected, run_id = found
            token = resume_tokens.get(assignment_id, "")
            if not expected or not hmac.compare_digest(token_sha256(token), expected):
                raise AssignmentRefused(
                    assignment_id,
                    run_id,
                    f"assignment {assignment_id[:64]} was not given to this agent (missing or wrong resume token)",
                )
            proven.add(assignment_id)
        return proven

    async def _token_of(self, assignment_id: str) -> tuple[str, str] | None:
        """(resume token hash, run id) of an assignment, live or stored; None if unknown."""
        a = self._active.assignment(assignment_id)
        if a is not None:
            return a.resume_token_sha256, a.execution.run_id
        found = await self._store.lookup_assignment(assignment_id)
        return (found.resume_token_sha256, found.run_id) if found is not None else None

    async def run_of_assignment(self, assignment_id: str) -> str | None:
        """The run an assignment belongs to (live or stored); None if there is no such assignment."""
        found = await self._token_of(assignment_id)
        return found[1] if found is not None else None

    async def connected(self, session: AgentSession, active_assignment_ids: list[str]) -> None:
        """A (re)connected agent: its proven live assignments resume on this session, the
        rest are cancelled on the agent; then it may be placed."""
        await self._store.record_agent_connected(
            session.session_id,
            session.name,
            session.labels,
            session.version,
            session.connected_at_ns,
        )
        log.info("agent_connected", session_id=session.session_id, agent=session.name)
        for assignment_id in active_assignment_ids:
            a = self._active.assignment(assignment_id)
            if a is None or a.done or a.execution.cancelled.is_set() or assignment_id not in session.owned:
                # Stale (lost, finished, or from before a controller restart): drop it.
                session.send(
                    agent_service_pb2.ConnectResponse(
                        cancel=agent_service_pb2.Cancel(
                            assignment_id=assignment_id, reason="assignment is no longer active"
                        )
                    )
                )
                continue
            await self._resume(session, a)
        for ex in self._active.runs():  # add_event awaits: runs may start or end meanwhile
            if session.name in ex.lost_names and session.run_id != ex.run_id:
                ex.lost_names.discard(session.name)
                await self._events.add(
                    ex.run_id,
                    ex.record.pk,
                    "agent_rejoined",
                    f"{session.name} rejoined with new session {session.session_id} "
                    "(its lost share stays with the others)",
                )
        self._agents.add(session)

    async def _resume(self, session: AgentSession, a: ActiveAssignment) -> None:
        """A live assignment continues on the agent's new session (its grace ends)."""
        old = a.slot.session
        if old is not None and old is not session:
            old.run_id = old.assignment_id = ""
            old.owned.discard(a.assignment_id)
        a.slot.session = session
        session.run_id = a.execution.run_id
        session.assignment_id = a.assignment_id
        if a.grace_timer is not None:
            a.grace_timer.cancel()
            a.grace_timer = None
        await self._events.add(
            a.execution.run_id, a.execution.record.pk, "agent_rejoined", f"{session.name} resumed {a.assignment_id}"
        )
