"""Running one stage of a run on its agents.

The stage is split across the run's agents (`stage_shares`); each agent gets an Assign
carrying the same start time in the controller's clock plus that agent's estimated clock
offset, so the agents start together `start_lead_s` after the Assigns go out. The stage then
waits until every assignment reported its final state *and* every batch it announced is
committed, checking the run's abort checks as it goes. A cancelled run, or a stage past its
deadline, sends every agent still at work a Cancel and waits `CANCEL_GRACE_S` for their last
reports; an assignment with no final report by then ends LOST.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import time
import uuid

import structlog

from common.codes import AssignmentState
from common.durations import seconds
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.access.secrets import restore_secrets
from controller.domain.execution.events import RunEvents
from controller.domain.execution.placement import Placement
from controller.domain.execution.planning import (
    TAKEOVER_LEAD_S,
    derive_seed,
    stage_deadline_s,
    stage_shares,
    start_lead_s,
    trace_share,
)
from controller.domain.execution.state import (
    ASSIGNMENT_LOST,
    ActiveAssignment,
    ActiveRuns,
    AgentSlot,
    AssignmentPhase,
    RunExecution,
    StageRun,
    token_sha256,
)
from controller.domain.results.checks import parse_check
from controller.domain.results.live import WINDOW_S
from controller.domain.results.server_metrics import plan_scrapes
from controller.store.interface import Store

log = structlog.get_logger(__name__)

CANCEL_GRACE_S = 20.0
ABORT_CHECK_EVERY_S = 1.0
# While waiting out CANCEL_GRACE_S, how often the stage looks at its assignments.
CANCEL_POLL_S = 0.5
# A REPORTED assignment is sent the Cancel too but stays REPORTED: only its batches are awaited.
_STOPPABLE = (AssignmentPhase.PLANNED, AssignmentPhase.STARTING, AssignmentPhase.RUNNING)


class StageRunner:
    """Plans, starts, watches and ends one stage at a time of a run."""

    def __init__(self, store: Store, active: ActiveRuns, placement: Placement, events: RunEvents) -> None:
        self._store = store
        self._active = active
        self._placement = placement
        self._events = events

    async def run_stage(self, ex: RunExecution, idx: int, stage: run_pb2.Stage) -> tuple[bool, str]:
        """Run the stage to its end; (False, why) if it failed the run."""
        slots = self._placement.fill_slots(ex)
        if not slots:
            return False, f"stage {idx}: no agent left to run it (agents lost)"
        st = await self._start(ex, idx, stage, slots)
        try:
            await self._wait_until_done(ex, st)
            if not st.all_done:
                await self._stop(ex, st)
        finally:
            await self._close(ex, st)
        return await self._verdict(st)

    async def _start(self, ex: RunExecution, idx: int, stage: run_pb2.Stage, slots: list[AgentSlot]) -> StageRun:
        run = ex.record
        planned_s = seconds(stage.duration)
        ex.live.start_stage(idx, planned_s, stage.requests)
        st = StageRun(idx, stage, time.time_ns(), None)
        ex.stage = st
        await self._store.update_run(run.pk, current_stage=idx)

        shares = stage_shares(stage, len(slots))
        replay = stage.WhichOneof("load") == "trace_replay"
        scrapers = plan_scrapes(ex.spec.server_metrics, [share is not None for share in shares])
        for agent_idx, (slot, share) in enumerate(zip(slots, shares, strict=True)):
            if share is not None:
                await self.assign(
                    ex,
                    st,
                    slot,
                    share,
                    agent_idx,
                    takeover=False,
                    server_metrics=scrapers[agent_idx],
                    trace_share=trace_share(agent_idx, len(slots)) if replay else (0, 0),
                )
        # Prepared first, sent together, so that the agents start at one common time.
        lead_s = start_lead_s(len(slots))
        st.start_ns = time.time_ns() + int(lead_s * 1e9)
        st.end_ns = st.start_ns + int(planned_s * 1e9) if planned_s > 0 else None
        await self._send_assigns(list(st.active), st.start_ns)
        await self._store.set_stage_time(run.pk, idx, started_at=st.start_ns)
        await self._events.add(ex.run_id, run.pk, "stage_started", f"stage {idx}: {stage.name}")
        log.info("stage_started", run_id=ex.run_id, stage=idx, name=stage.name, agents=len(slots), lead_s=lead_s)
        return st

    async def assign(
        self,
        ex: RunExecution,
        st: StageRun,
        slot: AgentSlot,
        share: run_pb2.Stage,
        seed_idx: int,
        *,
        takeover: bool,
        server_metrics: run_pb2.ServerMetricsSpec | None = None,
        trace_share: tuple[int, int] = (0, 0),
    ) -> ActiveAssignment:
        """Give `share` of the stage to the slot's agent. A takeover's Assign goes out at
        once; a stage's first Assigns wait for `_send_assigns` to start them together.
        `trace_share`: a trace replay's (share_index, share_count); a trace takeover starts
        at the stage's own start time (past), so its requests keep the trace's times."""
        session = slot.session
        assert session is not None
        assignment_id = f"asg_{uuid.uuid4().hex[:16]}"
        # The assignment id is no secret (ListAgents shows it); the token is, and only its
        # hash is kept, so a reconnecting agent proves it was given the assignment.
        resume_token = secrets.token_urlsafe(24)
        created_ns = time.time_ns()
        pk = await self._store.insert_assignment(
            assignment_id,
            ex.record.pk,
            st.idx,
            session.session_id,
            session.name,
            share.concurrency or share.max_concurrency,
            share.requests,
            AssignmentState.RUNNING,
            created_ns,
            token_sha256(resume_token),
        )
        workload = run_pb2.Workload()
        workload.CopyFrom(ex.spec.workload)
        workload.seed = derive_seed(ex.spec.workload.seed, st.idx, seed_idx)
        target = run_pb2.Target()
        target.CopyFrom(ex.spec.target)
        restore_secrets(target, ex.secret)
        message = agent_service_pb2.ConnectResponse(
            assign=agent_service_pb2.Assign(
                assignment_id=assignment_id,
                run_id=ex.run_id,
                stage_index=st.idx,
                target=target,
                workload=workload,
                stage=share,
                dataset_entries=ex.dataset,
                takeover=takeover,
                server_metrics=server_metrics,
                resume_token=resume_token,
                share_index=trace_share[0],
                share_count=trace_share[1],
            )
        )
        a = ActiveAssignment(
            assignment_id,
            pk,
            ex,
            st.idx,
            slot,
            share,
            st,
            session.name,
            message,
            takeover,
            token_sha256(resume_token),
            created_ns,
            share_index=trace_share[0],
            share_count=trace_share[1],
        )
        self._active.add_assignment(a)
        session.owned.add(assignment_id)
        st.active.append(a)
        st.changed.set()
        if not session.assignment_id:
            session.assignment_id = assignment_id
        if takeover:
            replay = share.WhichOneof("load") == "trace_replay"
            await self._send_assigns([a], st.start_ns if replay else time.time_ns() + int(TAKEOVER_LEAD_S * 1e9))
        return a

    async def _send_assigns(self, assignments: list[ActiveAssignment], start_ns: int) -> None:
        """Send prepared Assigns with a common start time (controller clock), each with its
        agent's current clock offset; then record the plan."""
        for a in assignments:
            session = a.slot.session
            if session is None or a.phase is not AssignmentPhase.PLANNED:
                continue
            message = a.take_assign()
            message.assign.start_unix_ns, message.assign.clock_offset_ns = start_ns, session.clock.offset_ns
            a.clock_offset_ns = session.clock.offset_ns
            session.send(message)
        for a in assignments:
            await self._store.update_assignment(
                a.pk,
                planned_start_ns=start_ns,
                takeover=int(a.takeover),
                clock_offset_ns=a.slot.session.clock.offset_ns if a.slot.session else 0,
            )

    async def _wait_until_done(self, ex: RunExecution, st: StageRun) -> None:
        """Until every assignment is done, the run is cancelled, an abort check fails (which
        cancels the run) or the stage passes its deadline."""
        deadline = stage_deadline_s(seconds(st.stage.duration), seconds(ex.spec.target.request_timeout))
        abort_checks = [parse_check(c.expression, True) for c in ex.spec.checks if c.abort_on_fail]
        stage_deadline = None if deadline is None else time.monotonic() + deadline
        cancelled: asyncio.Future[bool] = asyncio.ensure_future(ex.cancelled.wait())
        try:
            while not st.all_done and not cancelled.done():
                left = None if stage_deadline is None else stage_deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                st.changed.clear()
                changed: asyncio.Future[bool] = asyncio.ensure_future(st.changed.wait())
                step = ABORT_CHECK_EVERY_S if left is None else min(ABORT_CHECK_EVERY_S, left)
                try:
                    await asyncio.wait([changed, cancelled], timeout=step, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    changed.cancel()
                failure = ex.live.failed_check(abort_checks) if abort_checks else None
                if failure and not ex.cancelled.is_set():
                    reason = f"aborted in stage {st.idx}: check failed over the last {WINDOW_S:g} s: {failure}"
                    log.warning("run_aborted", run_id=ex.run_id, reason=reason)
                    await self._events.add(ex.run_id, ex.record.pk, "check_failed", reason)
                    ex.abort(reason)
        finally:
            cancelled.cancel()

    async def _stop(self, ex: RunExecution, st: StageRun) -> None:
        """Cancel every assignment still at work; wait (bounded) for their last reports."""
        why = ex.cancel_reason if ex.cancelled.is_set() else "stage overran its deadline"
        for a in st.active:
            if a.done:
                continue
            if a.phase in _STOPPABLE:
                a.stop()
            if a.slot.session is not None:
                a.slot.session.send(
                    agent_service_pb2.ConnectResponse(
                        cancel=agent_service_pb2.Cancel(assignment_id=a.assignment_id, reason=why)
                    )
                )
        grace_end = time.monotonic() + CANCEL_GRACE_S
        while not st.all_done and time.monotonic() < grace_end:
            st.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(st.changed.wait(), timeout=CANCEL_POLL_S)

    async def _close(self, ex: RunExecution, st: StageRun) -> None:
        """The stage is over (also when the run task is cancelled): what is not done is lost."""
        ex.stage = None
        for a in st.active:
            if not a.done:
                a.mark_lost("no final report from the agent")
            if a.grace_timer is not None:
                a.grace_timer.cancel()
            self._active.remove_assignment(a.assignment_id)
            if a.slot.session is not None and a.slot.session.assignment_id == a.assignment_id:
                a.slot.session.assignment_id = ""
        await self._store.set_stage_time(ex.record.pk, st.idx, ended_at=time.time_ns())

    async def _verdict(self, st: StageRun) -> tuple[bool, str]:
        """Store each assignment's health and how it ended; the stage fails the run only
        when every assignment failed or was lost."""
        for a in st.active:
            await self._store.record_assignment_health(a.pk, a.max_loop_lag_ms, a.max_cpu_percent)
            if a.final_state in (ASSIGNMENT_LOST, AssignmentState.FAILED):
                await self._store.update_assignment(
                    a.pk, state=a.final_state, message=a.message, requests_sent=a.requests_sent, ended_at=time.time_ns()
                )
        failed = [a for a in st.active if a.final_state == AssignmentState.FAILED]
        lost = [a for a in st.active if a.final_state == ASSIGNMENT_LOST]
        if st.active and len(failed) + len(lost) == len(st.active):
            detail = (failed or lost)[0].message
            return False, f"stage {st.idx}: every agent failed or was lost ({detail})"
        return True, ""
