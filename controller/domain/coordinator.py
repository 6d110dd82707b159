"""Run execution: which agents run which run, stage by stage.

A dispatcher starts pending runs in creation order as soon as enough agents are free.
Each running run has one task that walks its stages: it splits the stage across its
agents (concurrency and request count into integers that sum to the total), sends each
agent an Assign, and waits until every assignment reported its final state *and* every
batch it announced is committed. An agent that disconnects keeps its assignment for
`lost_grace_s`; if it reconnects in time (its Hello lists the assignment) it is rebound,
otherwise the assignment counts as lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import structlog
from google.protobuf import json_format

from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.agents import AgentHealthReport, AgentRegistry, AgentSession
from controller.domain.checks import parse_check
from controller.domain.datasets import entries_from_json
from controller.domain.ingest import IngestTarget, columns_of
from controller.domain.live import WINDOW_S, LiveWindow, RunHub
from controller.store import repository as repo
from controller.store.database import Database

log = structlog.get_logger(__name__)

ASSIGNMENT_LOST = -1  # in-memory final state of an assignment whose agent never came back
CANCEL_GRACE_S = 20.0
ABORT_CHECK_EVERY_S = 1.0
STAGE_SLACK_S = 30.0


def split_integer(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers that differ by at most one and sum to total."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def stage_shares(stage: run_pb2.Stage, agents: int) -> list[run_pb2.Stage | None]:
    """Each agent's part of a stage (None: nothing for that agent to do).

    Concurrency, request counts, warmup counts and the concurrency cap split into integers
    that sum to the total; a rate splits into equal shares, each agent drawing its own
    seeded arrival process. A cap smaller than the number of agents gives each agent a
    cap of 1 (at most `agents` in flight instead of the cap).
    """
    requests = split_integer(stage.requests, agents)
    warmups = split_integer(stage.warmup_requests, agents)
    caps = split_integer(stage.max_concurrency, agents)
    open_loop = stage.WhichOneof("load") == "request_rate"
    levels = [0] * agents if open_loop else split_integer(stage.concurrency, agents)
    shares: list[run_pb2.Stage | None] = []
    for i in range(agents):
        if (not open_loop and levels[i] == 0) or (stage.requests and requests[i] == 0):
            shares.append(None)
            continue
        share = run_pb2.Stage()
        share.CopyFrom(stage)
        if open_loop:
            share.request_rate = stage.request_rate / agents
            if stage.max_concurrency:
                share.max_concurrency = max(1, caps[i])
        else:
            share.concurrency = levels[i]
        share.requests = requests[i]
        share.warmup_requests = warmups[i]
        shares.append(share)
    return shares


def derive_seed(seed: int, stage_idx: int, agent_idx: int) -> int:
    """An independent, reproducible seed for one agent's share of one stage."""
    digest = hashlib.sha256(f"{seed}:{stage_idx}:{agent_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1 or 1


def _duration_s(d: object) -> float:
    return float(getattr(d, "seconds", 0)) + float(getattr(d, "nanos", 0)) / 1e9


@dataclass(eq=False)
class AgentSlot:
    """A place in a run for one agent; the session changes when the agent reconnects."""

    session: AgentSession | None


@dataclass(eq=False)
class ActiveAssignment:
    assignment_id: str
    pk: int
    execution: RunExecution
    stage_idx: int
    slot: AgentSlot
    final_state: int = 0
    message: str = ""
    batch_count: int | None = None
    requests_sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    lost_timer: asyncio.Task[None] | None = None
    max_loop_lag_ms: float = 0.0
    max_cpu_percent: float = 0.0


@dataclass(eq=False)
class RunExecution:
    record: repo.RunRecord
    spec: run_pb2.RunSpec
    api_key: str
    slots: list[AgentSlot]
    live: LiveWindow = field(default_factory=LiveWindow)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str = ""
    task: asyncio.Task[None] | None = None
    dataset: list[run_pb2.DatasetEntry] = field(default_factory=list)
    abort_reason: str = ""

    @property
    def run_id(self) -> str:
        return self.record.run_id


class AckTracker:
    """Highest batch_seq committed without gaps, per assignment (for cumulative acks)."""

    def __init__(self) -> None:
        self._through: dict[str, int] = {}
        self._ahead: dict[str, set[int]] = {}

    def commit(self, assignment_id: str, seq: int) -> int:
        through = self._through.get(assignment_id, 0)
        ahead = self._ahead.setdefault(assignment_id, set())
        if seq > through:
            ahead.add(seq)
        while through + 1 in ahead:
            through += 1
            ahead.discard(through)
        self._through[assignment_id] = through
        return through

    def through(self, assignment_id: str) -> int:
        return self._through.get(assignment_id, 0)

    def forget(self, assignment_id: str) -> None:
        self._through.pop(assignment_id, None)
        self._ahead.pop(assignment_id, None)


class RunCoordinator:
    """Schedules runs onto agents and tracks their assignments."""

    def __init__(self, db: Database, hub: RunHub, *, lost_grace_s: float = 10.0) -> None:
        self._db = db
        self._hub = hub
        self.lost_grace_s = lost_grace_s
        self._wake = asyncio.Event()
        self.registry = AgentRegistry(on_change=self._wake.set)
        self.executions: dict[str, RunExecution] = {}
        self.assignments: dict[str, ActiveAssignment] = {}
        self.acks = AckTracker()
        self._pending: list[str] = []
        self._dispatcher: asyncio.Task[None] | None = None
        self._stopped = False

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        interrupted = await self._db.write(
            repo.interrupt_running, "the controller stopped while the run was running", time.time_ns()
        )
        for run_id in interrupted:
            log.warning("run_interrupted", run_id=run_id)
        self._pending = await self._db.read(repo.pending_run_ids)
        self._dispatcher = asyncio.create_task(self._dispatch_loop(), name="dispatcher")
        self._wake.set()

    async def stop(self) -> None:
        """Stop scheduling; running runs become INTERRUPTED."""
        self._stopped = True
        if self._dispatcher is not None:
            self._dispatcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._dispatcher
        tasks = [ex.task for ex in self.executions.values() if ex.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for run_id in await self._db.write(
            repo.interrupt_running, "the controller stopped while the run was running", time.time_ns()
        ):
            log.warning("run_interrupted", run_id=run_id)
            self._hub.notify(run_id)

    def enqueue(self, run_id: str) -> None:
        self._pending.append(run_id)
        self._wake.set()

    def withdraw(self, run_id: str) -> bool:
        """Remove a run that has not started yet; False if it is not pending here."""
        if run_id in self._pending:
            self._pending.remove(run_id)
            return True
        return False

    def request_cancel(self, run_id: str, reason: str) -> RunExecution | None:
        ex = self.executions.get(run_id)
        if ex is not None and not ex.cancelled.is_set():
            ex.cancel_reason = reason
            ex.cancelled.set()
        return ex

    # --- dispatch ------------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                run_id = self._pending[0]
                record = await self._db.read(repo.get_run, run_id)
                if record is None or record.state != repo.PENDING:
                    self._pending.pop(0)
                    continue
                spec = json_format.Parse(record.spec_json, run_pb2.RunSpec())
                needed = max(1, spec.placement.agents)
                free = self.registry.free()
                if len(free) < needed:
                    break  # strict FIFO: later runs wait behind the first one
                self._pending.pop(0)
                chosen = free[:needed]
                api_key = await self._db.read(repo.get_run_secret, record.pk)
                ex = RunExecution(record, spec, api_key, [AgentSlot(s) for s in chosen])
                if spec.workload.HasField("dataset"):
                    ex.dataset = entries_from_json(await self._db.read(repo.get_run_dataset, record.pk))
                for s in chosen:
                    s.run_id = run_id
                self.executions[run_id] = ex
                ex.task = asyncio.create_task(self._execute(ex), name=f"run-{run_id}")

    # --- execution -----------------------------------------------------------------------

    async def _execute(self, ex: RunExecution) -> None:
        run = ex.record
        state, reason = repo.SUCCEEDED, ""
        try:
            await self._db.write(repo.update_run, run.pk, state=repo.RUNNING, started_at=time.time_ns())
            names = ", ".join(s.session.name for s in ex.slots if s.session is not None)
            await self.add_event(ex.run_id, run.pk, "run_started", f"agents: {names}")
            log.info("run_started", run_id=ex.run_id, agents=len(ex.slots))
            for idx, stage in enumerate(ex.spec.stages):
                if ex.cancelled.is_set():
                    break
                ok, why = await self._run_stage(ex, idx, stage)
                if not ok:
                    state, reason = repo.FAILED, why
                    break
            if ex.abort_reason:
                state, reason = repo.FAILED, ex.abort_reason
            elif ex.cancelled.is_set() and state == repo.SUCCEEDED:
                state, reason = repo.CANCELLED, ex.cancel_reason
            elif state == repo.SUCCEEDED:
                n_ok, n_failed, error = await self._db.read(repo.failure_summary, run.pk)
                if n_failed and not n_ok:
                    # A run that measured nothing but errors must not look like a result.
                    state, reason = repo.FAILED, f"every request failed ({n_failed}); e.g. {error[:300]}"
        except asyncio.CancelledError:
            self._release(ex)
            raise  # controller shutdown: stop() marks the run INTERRUPTED
        except Exception as exc:
            log.exception("run_crashed", run_id=ex.run_id)
            state, reason = repo.FAILED, f"internal error: {type(exc).__name__}"
        self._release(ex)
        await self._db.write(repo.finish_run, run.pk, state, reason, time.time_ns())
        kind = {repo.SUCCEEDED: "run_succeeded", repo.FAILED: "run_failed"}.get(state, "run_cancelled")
        await self.add_event(ex.run_id, run.pk, kind, reason)
        log.info(kind, run_id=ex.run_id, reason=reason)
        self.executions.pop(ex.run_id, None)
        self._hub.notify(ex.run_id)

    def _release(self, ex: RunExecution) -> None:
        for slot in ex.slots:
            if slot.session is not None and slot.session.run_id == ex.run_id:
                self.registry.release(slot.session)

    def _fill_slots(self, ex: RunExecution) -> list[AgentSlot]:
        """Slots with a live session; an empty slot takes a free agent if there is one."""
        for slot in ex.slots:
            if slot.session is None or slot.session.closed:
                slot.session = None
                free = self.registry.free()
                if free:
                    slot.session = free[0]
                    free[0].run_id = ex.run_id
        return [s for s in ex.slots if s.session is not None]

    async def _run_stage(self, ex: RunExecution, idx: int, stage: run_pb2.Stage) -> tuple[bool, str]:
        run = ex.record
        slots = self._fill_slots(ex)
        if not slots:
            return False, f"stage {idx}: no agent left to run it (agents lost)"
        planned_s = _duration_s(stage.duration)
        ex.live.start_stage(idx, planned_s, stage.requests)
        now = time.time_ns()
        await self._db.write(repo.update_run, run.pk, current_stage=idx)
        await self._db.write(repo.set_stage_time, run.pk, idx, started_at=now)
        await self.add_event(ex.run_id, run.pk, "stage_started", f"stage {idx}: {stage.name}")
        log.info("stage_started", run_id=ex.run_id, stage=idx, name=stage.name)

        active: list[ActiveAssignment] = []
        for agent_idx, (slot, share) in enumerate(zip(slots, stage_shares(stage, len(slots)), strict=True)):
            if share is None:
                continue
            session = slot.session
            assert session is not None
            assignment_id = f"asg_{uuid.uuid4().hex[:16]}"
            pk = await self._db.write(
                repo.insert_assignment, assignment_id, run.pk, idx, session.session_id,
                session.name, share.concurrency or share.max_concurrency, share.requests,
                agent_service_pb2.ASSIGNMENT_STATE_RUNNING, time.time_ns(),
            )  # fmt: skip
            a = ActiveAssignment(assignment_id, pk, ex, idx, slot)
            self.assignments[assignment_id] = a
            active.append(a)
            session.assignment_id = assignment_id
            workload = run_pb2.Workload()
            workload.CopyFrom(ex.spec.workload)
            workload.seed = derive_seed(ex.spec.workload.seed, idx, agent_idx)
            target = run_pb2.Target()
            target.CopyFrom(ex.spec.target)
            target.api_key = ex.api_key
            session.send(
                agent_service_pb2.ConnectResponse(
                    assign=agent_service_pb2.Assign(
                        assignment_id=assignment_id, run_id=ex.run_id, stage_index=idx,
                        target=target, workload=workload, stage=share, dataset_entries=ex.dataset,
                    )
                )
            )  # fmt: skip

        deadline = None
        if planned_s > 0:
            deadline = planned_s + _duration_s(ex.spec.target.request_timeout) + STAGE_SLACK_S
        all_done: asyncio.Future[Any] = asyncio.ensure_future(
            asyncio.gather(*(a.done.wait() for a in active))
        )
        cancelled: asyncio.Future[Any] = asyncio.ensure_future(ex.cancelled.wait())
        abort_checks = [parse_check(c.expression, True) for c in ex.spec.checks if c.abort_on_fail]
        stage_deadline = None if deadline is None else time.monotonic() + deadline
        try:
            while not (all_done.done() or cancelled.done()):
                left = None if stage_deadline is None else stage_deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                step = min(ABORT_CHECK_EVERY_S, left) if abort_checks and left is not None else (
                    ABORT_CHECK_EVERY_S if abort_checks else left
                )  # fmt: skip
                await asyncio.wait([all_done, cancelled], timeout=step, return_when=asyncio.FIRST_COMPLETED)
                failure = ex.live.failed_check(abort_checks) if abort_checks else None
                if failure and not ex.cancelled.is_set():
                    ex.abort_reason = f"aborted in stage {idx}: check failed over the last {WINDOW_S:g} s: {failure}"
                    log.warning("run_aborted", run_id=ex.run_id, reason=ex.abort_reason)
                    await self.add_event(ex.run_id, run.pk, "check_failed", ex.abort_reason)
                    ex.cancel_reason = ex.abort_reason
                    ex.cancelled.set()
            if not all_done.done():
                why = ex.cancel_reason if ex.cancelled.is_set() else "stage overran its deadline"
                for a in active:
                    if not a.done.is_set() and a.slot.session is not None:
                        a.slot.session.send(
                            agent_service_pb2.ConnectResponse(
                                cancel=agent_service_pb2.Cancel(assignment_id=a.assignment_id, reason=why)
                            )
                        )
                await asyncio.wait({all_done}, timeout=CANCEL_GRACE_S)
        finally:
            cancelled.cancel()
            all_done.cancel()
            for a in active:
                if not a.done.is_set():
                    a.final_state = ASSIGNMENT_LOST
                    a.message = "no final report from the agent"
                if a.lost_timer is not None:
                    a.lost_timer.cancel()
                self.assignments.pop(a.assignment_id, None)
                if a.slot.session is not None and a.slot.session.assignment_id == a.assignment_id:
                    a.slot.session.assignment_id = ""
            await self._db.write(repo.set_stage_time, run.pk, idx, ended_at=time.time_ns())

        for a in active:
            await self._db.write(repo.record_assignment_health, a.pk, a.max_loop_lag_ms, a.max_cpu_percent)
            if a.final_state in (ASSIGNMENT_LOST, agent_service_pb2.ASSIGNMENT_STATE_FAILED):
                await self._db.write(repo.update_assignment, a.pk, state=a.final_state, message=a.message,
                                     ended_at=time.time_ns())  # fmt: skip
        failed = [a for a in active if a.final_state == agent_service_pb2.ASSIGNMENT_STATE_FAILED]
        lost = [a for a in active if a.final_state == ASSIGNMENT_LOST]
        if active and len(failed) + len(lost) == len(active):
            detail = (failed or lost)[0].message
            return False, f"stage {idx}: every agent failed or was lost ({detail})"
        return True, ""

    # --- agent stream events (called by the AgentService servicer) ------------------------

    async def agent_connected(self, session: AgentSession, active_assignment_ids: list[str]) -> None:
        await self._db.write(
            repo.record_agent_connected, session.session_id, session.name, session.labels,
            session.version, session.connected_at_ns,
        )  # fmt: skip
        log.info("agent_connected", session_id=session.session_id, agent=session.name)
        for assignment_id in active_assignment_ids:
            a = self.assignments.get(assignment_id)
            if a is None or a.done.is_set() or a.execution.cancelled.is_set():
                session.send(
                    agent_service_pb2.ConnectResponse(
                        cancel=agent_service_pb2.Cancel(
                            assignment_id=assignment_id, reason="assignment is no longer active"
                        )
                    )
                )
                continue
            old = a.slot.session
            if old is not None and old is not session:
                old.run_id = old.assignment_id = ""
            a.slot.session = session
            session.run_id = a.execution.run_id
            session.assignment_id = assignment_id
            if a.lost_timer is not None:
                a.lost_timer.cancel()
                a.lost_timer = None
            await self.add_event(a.execution.run_id, a.execution.record.pk, "agent_rejoined",
                                 f"{session.name} resumed {assignment_id}")  # fmt: skip
        self.registry.add(session)

    async def agent_disconnected(self, session: AgentSession) -> None:
        self.registry.remove(session)
        if self._stopped:
            return  # shutting down: the store may already be closed
        await self._db.write(repo.record_agent_disconnected, session.session_id, time.time_ns())
        log.info("agent_disconnected", session_id=session.session_id, agent=session.name)
        a = self.assignments.get(session.assignment_id) if session.assignment_id else None
        if a is not None and a.slot.session is session and not a.done.is_set():
            a.slot.session = None
            a.lost_timer = asyncio.create_task(self._lose_after_grace(a))
            await self.add_event(a.execution.run_id, a.execution.record.pk, "agent_disconnected",
                                 f"{session.name} disconnected during {a.assignment_id}")  # fmt: skip
        elif session.run_id and (ex := self.executions.get(session.run_id)) is not None:
            for slot in ex.slots:
                if slot.session is session:
                    slot.session = None

    async def _lose_after_grace(self, a: ActiveAssignment) -> None:
        await asyncio.sleep(self.lost_grace_s)
        if a.slot.session is None and not a.done.is_set():
            a.final_state = ASSIGNMENT_LOST
            a.message = f"agent did not reconnect within {self.lost_grace_s:g} s"
            log.warning("agent_lost", run_id=a.execution.run_id, assignment_id=a.assignment_id)
            await self.add_event(a.execution.run_id, a.execution.record.pk, "agent_lost", a.message)
            a.done.set()

    async def assignment_update(self, session: AgentSession, update: agent_service_pb2.AssignmentUpdate) -> None:
        final = (
            agent_service_pb2.ASSIGNMENT_STATE_COMPLETED,
            agent_service_pb2.ASSIGNMENT_STATE_FAILED,
            agent_service_pb2.ASSIGNMENT_STATE_CANCELLED,
        )
        a = self.assignments.get(update.assignment_id)
        if a is not None:
            a.requests_sent = update.requests_sent
            if update.state in final and not a.final_state:
                a.final_state = update.state
                a.message = update.message[:1000]
                a.batch_count = update.batch_count
                await self._db.write(
                    repo.update_assignment, a.pk, state=update.state, message=a.message,
                    batch_count=update.batch_count, requests_sent=update.requests_sent, ended_at=time.time_ns(),
                )  # fmt: skip
                if update.state == agent_service_pb2.ASSIGNMENT_STATE_FAILED:
                    log.warning("assignment_failed", assignment_id=a.assignment_id, message=a.message)
                self._check_done(a)
        if update.state in final:
            # Acknowledge the final report (with the commit position): an agent forgets a
            # finished assignment once every batch and the report itself are acked.
            session.send(
                agent_service_pb2.ConnectResponse(
                    ack=agent_service_pb2.Ack(
                        assignment_id=update.assignment_id, batch_seq=self.acks.through(update.assignment_id)
                    )
                )
            )

    def heartbeat(self, session: AgentSession, health: AgentHealthReport) -> None:
        """Record an agent's health; the worst figures of an assignment go into its result."""
        self.registry.heartbeat(session, health)
        a = self.assignments.get(session.assignment_id) if session.assignment_id else None
        if a is not None:
            a.max_loop_lag_ms = max(a.max_loop_lag_ms, health.event_loop_lag_ms)
            a.max_cpu_percent = max(a.max_cpu_percent, health.cpu_percent)

    def _check_done(self, a: ActiveAssignment) -> None:
        if a.final_state and a.batch_count is not None and self.acks.through(a.assignment_id) >= a.batch_count:
            a.done.set()

    # --- ingest support ------------------------------------------------------------------

    async def resolve_batch(self, assignment_id: str) -> IngestTarget | None:
        """Where a batch belongs: in memory for live assignments, else from the database."""
        a = self.assignments.get(assignment_id)
        if a is not None:
            ex = a.execution
            return IngestTarget(a.pk, ex.record.pk, ex.run_id, a.stage_idx)
        found = await self._db.read(repo.lookup_assignment, assignment_id)
        return IngestTarget(*found) if found is not None else None

    def batch_committed(
        self, session: AgentSession, target: IngestTarget, assignment_id: str, batch_seq: int,
        outcome: repo.IngestOutcome, stored: repo.BatchIngest,
    ) -> None:  # fmt: skip
        through = self.acks.commit(assignment_id, batch_seq)
        session.send(
            agent_service_pb2.ConnectResponse(
                ack=agent_service_pb2.Ack(assignment_id=assignment_id, batch_seq=through)
            )
        )
        a = self.assignments.get(assignment_id)
        if a is not None:
            if outcome.new:
                a.execution.live.add(outcome.ok, outcome.failed, outcome.output_tokens, columns_of(stored))
            self._check_done(a)
        self._hub.notify(target.run_id)

    # --- events --------------------------------------------------------------------------

    async def add_event(self, run_id: str, run_pk: int, kind: str, message: str) -> None:
        await self._db.write(repo.add_event, run_pk, kind, message, time.time_ns())
        self._hub.notify(run_id)

