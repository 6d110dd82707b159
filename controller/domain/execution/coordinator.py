"""`RunCoordinator`: the one entry point of run execution, for the servicers, `Runs` and the
controller process.

It owns the shared state (the agent registry, the runs and assignments in progress, the ack
positions, the outstanding preflight checks) and composes one part per job over it, each
given only what it needs: `Placement` (queue and agents), `RunExecutor` (a run's task),
`StageRunner` (one stage), `AgentLoss` with `LossPolicy` (loss, rejoin, takeover) and
`AgentReports` (what arrives on agent streams). Its own code is the lifecycle: `start` runs
the dispatcher and the heartbeat watchdog, `stop` interrupts what is running.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping

import structlog

from common.proto.loadtest.v1 import agent_service_pb2
from controller.domain.execution.acks import AckTracker
from controller.domain.execution.agents import AgentHealthReport, AgentRegistry, AgentSession
from controller.domain.execution.events import RunEvents
from controller.domain.execution.executor import INTERRUPT_REASON, RunExecutor
from controller.domain.execution.loss import AgentLoss
from controller.domain.execution.placement import Placement
from controller.domain.execution.preflight import PreflightAnswers
from controller.domain.execution.reports import AgentReports
from controller.domain.execution.stages import StageRunner
from controller.domain.execution.state import ActiveRuns, RunExecution
from controller.domain.execution.takeover import LossPolicy
from controller.domain.results.ingest import IngestTarget
from controller.domain.results.live import LiveSnapshot, RunHub
from controller.store import repository as repo
from controller.store.interface import Store

log = structlog.get_logger(__name__)


class RunCoordinator:
    """Schedules runs onto agents and tracks their assignments."""

    def __init__(
        self,
        store: Store,
        hub: RunHub,
        *,
        heartbeat_interval_s: float = 1.0,
        lost_grace_s: float | None = None,
        on_run_final: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._events = RunEvents(store, hub, on_run_final or (lambda _run_id: None))
        self._agents = AgentRegistry(on_change=self._agents_changed)
        self._active = ActiveRuns()
        acks, preflights = AckTracker(), PreflightAnswers()
        self._placement = Placement(store, self._agents, self._active, self._events, on_placed=self._start_run)
        stages = StageRunner(store, self._active, self._placement, self._events)
        self._executor = RunExecutor(store, self._active, self._placement, stages, self._events, preflights)
        policy = LossPolicy(store, stages, self._events)
        self._loss = AgentLoss(
            store,
            self._agents,
            self._active,
            self._events,
            policy,
            heartbeat_interval_s=heartbeat_interval_s,
            disconnect_grace_s=lost_grace_s if lost_grace_s is not None else heartbeat_interval_s,
        )
        self._reports = AgentReports(
            store, self._agents, self._active, self._events, self._loss, policy, acks, preflights
        )
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    @property
    def lease_s(self) -> float:
        """How long an agent keeps firing without hearing from the controller (its Welcome says)."""
        return self._loss.lost_after_s

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        """Runs left RUNNING by a previous process become INTERRUPTED; stored pending runs
        queue up; the dispatcher and the heartbeat watchdog start."""
        for run_id in await self._store.interrupt_running(INTERRUPT_REASON, time.time_ns()):
            log.warning("run_interrupted", run_id=run_id)
            self._events.final(run_id)
        await self._placement.load_pending()
        self._tasks = [
            asyncio.create_task(self._placement.dispatch_forever(), name="dispatcher"),
            asyncio.create_task(self._loss.watch_heartbeats(), name="agent-watchdog"),
        ]
        self._placement.wake()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop scheduling; running runs are stopped on their agents (bounded by
        `timeout_s`, so their samples get committed) and become INTERRUPTED."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [ex for ex in self._active.runs() if ex.task is not None]
        for ex in running:
            ex.interrupt("the controller is shutting down")
        tasks = [ex.task for ex in running if ex.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for run_id in await self._store.interrupt_running(INTERRUPT_REASON, time.time_ns()):
            log.warning("run_interrupted", run_id=run_id)
            self._events.final(run_id)
            self._events.changed(run_id)

    def close_sessions(self, reason: str) -> None:
        """End every agent stream (after flushing what is queued for it)."""
        for session in self._agents.all():
            session.close(reason)

    def _agents_changed(self) -> None:
        self._placement.wake()  # an agent came, went or became ready: a pending run may fit now

    def _start_run(self, ex: RunExecution) -> None:
        ex.task = asyncio.create_task(self._executor.execute(ex), name=f"run-{ex.run_id}")

    # --- runs (for Runs) -----------------------------------------------------------------

    def enqueue(self, run_id: str) -> None:
        """A new pending run: placed once enough matching agents are free."""
        self._placement.enqueue(run_id)

    def withdraw(self, run_id: str) -> bool:
        """Remove a run that has not started yet; False if it is not pending here."""
        return self._placement.withdraw(run_id)

    async def cancel_running(self, run_id: str, reason: str, *, wait_s: float) -> None:
        """Stop a run executing here, waiting (at most `wait_s`) until its agents stopped and
        its final state is stored; nothing if it is not executing here."""
        ex = self._active.run(run_id)
        if ex is None:
            return
        ex.request_cancel(reason)
        if ex.task is not None:
            await asyncio.wait({ex.task}, timeout=wait_s)

    def running_run_ids(self) -> set[str]:
        """The runs executing in this process."""
        return self._active.run_ids()

    def live_snapshot(self, run_id: str) -> LiveSnapshot | None:
        """The live window of a run executing here; None if it is not."""
        ex = self._active.run(run_id)
        return ex.live.snapshot() if ex is not None else None

    def agents(self) -> list[AgentSession]:
        """The connected agents, oldest first."""
        return self._agents.all()

    async def add_event(self, run_id: str, run_pk: int, kind: str, message: str) -> None:
        await self._events.add(run_id, run_pk, kind, message)

    # --- agent streams (for the AgentService servicer) -----------------------------------

    async def prove_resume(self, active_assignment_ids: list[str], resume_tokens: Mapping[str, str]) -> set[str]:
        """The assignments a connecting agent proved it was given; raises AssignmentRefused
        (controller/domain/execution/loss.py) for a claim it cannot prove."""
        return await self._loss.prove_resume(active_assignment_ids, resume_tokens)

    async def run_of_assignment(self, assignment_id: str) -> str | None:
        """The run an assignment belongs to (live or stored); None if there is no such assignment."""
        return await self._loss.run_of_assignment(assignment_id)

    async def agent_connected(self, session: AgentSession, active_assignment_ids: list[str]) -> None:
        await self._loss.connected(session, active_assignment_ids)

    async def agent_disconnected(self, session: AgentSession) -> None:
        await self._loss.disconnected(session, shutting_down=self._stopped)

    def heartbeat(self, session: AgentSession, health: AgentHealthReport) -> None:
        self._reports.heartbeat(session, health)

    def clock_sample(self, session: AgentSession, t1: int, t2: int, t3: int, t4: int) -> None:
        self._reports.clock_sample(session, t1, t2, t3, t4)

    async def assignment_update(self, session: AgentSession, update: agent_service_pb2.AssignmentUpdate) -> None:
        await self._reports.assignment_update(session, update)

    def preflight_result(self, session: AgentSession, result: agent_service_pb2.PreflightResult) -> None:
        self._reports.preflight_result(session, result)

    async def resolve_batch(self, assignment_id: str) -> IngestTarget | None:
        return await self._reports.resolve_batch(assignment_id)

    async def batch_refused(self, session: AgentSession, assignment_id: str, reason: str) -> None:
        await self._reports.batch_refused(session, assignment_id, reason)

    def batch_committed(
        self,
        session: AgentSession,
        target: IngestTarget,
        assignment_id: str,
        batch_seq: int,
        outcome: repo.IngestOutcome,
        stored: repo.BatchIngest,
    ) -> None:
        self._reports.batch_committed(session, target, assignment_id, batch_seq, outcome, stored)
