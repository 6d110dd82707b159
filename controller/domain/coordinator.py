"""Run execution: which agents run which run, stage by stage, and what happens when one
of them is lost.

Placement: a dispatcher starts pending runs in creation order as soon as enough free
agents match the run's `placement` (a count and a label selector). A run that cannot be
placed within `placement.wait_timeout` (default `DEFAULT_WAIT_TIMEOUT_S`) fails with a
reason naming what was missing.

Preflight: before the first stage, unless the spec skips it, every agent of the run checks the
target (controller/domain/preflight.py); a failed check fails the run before any load.

Stages: each running run has one task that walks its stages. It splits a stage across its
agents (`stage_shares`), sends each agent an Assign carrying the same start time in the
controller's clock plus that agent's estimated clock offset (so the agents start together,
`START_LEAD_S` after the Assigns go out), and waits until every assignment reported its
final state *and* every batch it announced is committed.

Agent loss (see docs/fleet.md): agents heartbeat every `heartbeat_interval_s`. An agent
whose stream is open but silent for `MISSED_HEARTBEATS` intervals is lost (its stream is
closed, so it rejoins with a new session); an agent whose stream ended without a Goodbye
is lost unless it reconnects and resumes its assignment within `disconnect_grace_s`
(default: one heartbeat interval). A lost agent's assignment ends as LOST, with the
requests it announced but never reported counted as lost, and the run's `on_agent_loss`
policy applies: REDISTRIBUTE gives the rest of the lost share (remaining time or requests)
to the run's other agents as takeover assignments, CONTINUE flags the stage as run with
reduced load, FAIL fails the run. Every loss, takeover and rejoin is a run event.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import secrets
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import structlog

from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.agents import AgentHealthReport, AgentRegistry, AgentSession
from controller.domain.checks import parse_check
from controller.domain.datasets import entries_from_json
from controller.domain.ingest import IngestTarget
from controller.domain.live import WINDOW_S, LiveWindow, RunHub
from controller.domain.preflight import WARNING_EVENT, PreflightAnswers, check_run_target
from controller.domain.results import parse_spec
from controller.domain.secrets import restore_secrets
from controller.domain.server_metrics import plan_scrapes
from controller.store import repository as repo
from controller.store.database import Database

log = structlog.get_logger(__name__)

ASSIGNMENT_LOST = repo.ASSIGNMENT_LOST_STATE  # final state of an assignment whose agent was lost
CANCEL_GRACE_S = 20.0
ABORT_CHECK_EVERY_S = 1.0
STAGE_SLACK_S = 30.0
# An agent is lost after this many heartbeat intervals without a heartbeat; its lease (how
# long it keeps firing without hearing from us) is as long.
MISSED_HEARTBEATS = 3
# Stage starts are set this far ahead so that every Assign arrives (and closed loops open
# their connections) before the common start time.
START_LEAD_S = 0.75
START_LEAD_PER_AGENT_S = 0.025
MAX_START_LEAD_S = 3.0
TAKEOVER_LEAD_S = 0.05
# Less than this left of a stage: a lost share is not worth handing over.
MIN_TAKEOVER_S = 0.25
DEFAULT_WAIT_TIMEOUT_S = 300.0
# A Hello may claim at most this many assignments (an agent holds its running ones and at
# most 256 finished ones waiting for acks: agent/session.py MAX_RETAINED_FINISHED).
MAX_RESUME_CLAIMS = 1024
INTERRUPT_REASON = "the controller stopped while the run was running"

_FINAL = (
    agent_service_pb2.ASSIGNMENT_STATE_COMPLETED,
    agent_service_pb2.ASSIGNMENT_STATE_FAILED,
    agent_service_pb2.ASSIGNMENT_STATE_CANCELLED,
)


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


class AssignmentRefused(Exception):
    """A session reported for, or tried to resume, an assignment it was not given."""

    def __init__(self, assignment_id: str, run_id: str, message: str) -> None:
        super().__init__(message)
        self.assignment_id = assignment_id
        self.run_id = run_id
        self.message = message


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def derive_seed(seed: int, stage_idx: int, agent_idx: int) -> int:
    """An independent, reproducible seed for one agent's share of one stage."""
    digest = hashlib.sha256(f"{seed}:{stage_idx}:{agent_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1 or 1


def _duration_s(d: object) -> float:
    return float(getattr(d, "seconds", 0)) + float(getattr(d, "nanos", 0)) / 1e9


def selector_text(selector: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


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
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    takeovers: int = 0


@dataclass(eq=False)
class ActiveAssignment:
    assignment_id: str
    pk: int
    execution: RunExecution
    stage_idx: int
    slot: AgentSlot
    share: run_pb2.Stage = field(default_factory=run_pb2.Stage)
    stage_run: StageRun | None = None
    agent_name: str = ""
    final_state: int = 0
    message: str = ""
    batch_count: int | None = None
    requests_sent: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)
    lost_timer: asyncio.Task[None] | None = None
    max_loop_lag_ms: float = 0.0
    max_cpu_percent: float = 0.0
    started: bool = False
    # The Assign, until it is sent (stage starts send all of a stage's Assigns together).
    assign_message: agent_service_pb2.ConnectResponse | None = None
    takeover: bool = False
    cancel_sent: bool = False
    # SHA-256 of the resume token sent in the Assign (the agent proves the assignment with it).
    resume_token_sha256: str = ""
    created_ns: int = 0
    clock_offset_ns: int = 0  # the agent's estimated offset when the Assign went out


@dataclass(eq=False)
class RunExecution:
    record: repo.RunRecord
    spec: run_pb2.RunSpec
    secret: str  # the target's credentials, stored apart from the spec (controller/domain/secrets.py)
    slots: list[AgentSlot]
    live: LiveWindow = field(default_factory=LiveWindow)
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    cancel_reason: str = ""
    task: asyncio.Task[None] | None = None
    dataset: list[run_pb2.DatasetEntry] = field(default_factory=list)
    abort_reason: str = ""
    interrupted: bool = False
    stage: StageRun | None = None
    lost_names: set[str] = field(default_factory=set)

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def policy(self) -> int:
        return self.spec.placement.on_agent_loss or run_pb2.AGENT_LOSS_POLICY_REDISTRIBUTE


class AckTracker:
    """Highest batch_seq committed without gaps, per assignment (for cumulative acks)."""

    def __init__(self) -> None:
        self._through: dict[str, int] = {}
        self._ahead: dict[str, set[int]] = {}

    def commit(self, assignment_id: str, seq: int) -> int:
        # The first batch this process sees of an assignment starts right after what the
        # agent has had acked (by us or a previous controller process): agents replay
        # every unacked batch in order, and drop batches only once they are acked.
        through = self._through.get(assignment_id, seq - 1)
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

    def __init__(
        self,
        db: Database,
        hub: RunHub,
        *,
        heartbeat_interval_s: float = 1.0,
        lost_grace_s: float | None = None,
        on_run_final: Callable[[str], None] | None = None,
    ) -> None:
        self._db = db
        self._hub = hub
        # Called with the run id once a run's final state is committed (its result is then
        # computed and stored: controller/domain/run_results.py).
        self._on_run_final = on_run_final or (lambda _run_id: None)
        self.heartbeat_interval_s = heartbeat_interval_s
        self.lost_after_s = heartbeat_interval_s * MISSED_HEARTBEATS
        self.lease_s = self.lost_after_s
        self.disconnect_grace_s = lost_grace_s if lost_grace_s is not None else heartbeat_interval_s
        self._wake = asyncio.Event()
        self.registry = AgentRegistry(on_change=self._wake.set)
        self.executions: dict[str, RunExecution] = {}
        self.assignments: dict[str, ActiveAssignment] = {}
        self.acks = AckTracker()
        self.preflights = PreflightAnswers()
        self._pending: list[str] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    # --- lifecycle -----------------------------------------------------------------------

    async def start(self) -> None:
        interrupted = await self._db.write(repo.interrupt_running, INTERRUPT_REASON, time.time_ns())
        for run_id in interrupted:
            log.warning("run_interrupted", run_id=run_id)
            self._on_run_final(run_id)
        self._pending = await self._db.read(repo.pending_run_ids)
        self._tasks = [
            asyncio.create_task(self._dispatch_loop(), name="dispatcher"),
            asyncio.create_task(self._watchdog_loop(), name="agent-watchdog"),
        ]
        self._wake.set()

    async def stop(self, timeout_s: float = 5.0) -> None:
        """Stop scheduling; running runs are stopped on their agents (bounded by
        `timeout_s`, so their samples get committed) and become INTERRUPTED."""
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        running = [ex for ex in self.executions.values() if ex.task is not None]
        for ex in running:
            ex.interrupted = True
            self.request_cancel(ex.run_id, "the controller is shutting down")
        tasks = [ex.task for ex in running if ex.task is not None]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=timeout_s)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late)
        for run_id in await self._db.write(repo.interrupt_running, INTERRUPT_REASON, time.time_ns()):
            log.warning("run_interrupted", run_id=run_id)
            self._on_run_final(run_id)
            self._hub.notify(run_id)

    def close_sessions(self, reason: str) -> None:
        """End every agent stream (after flushing what is queued for it)."""
        for session in self.registry.all():
            session.close(reason)

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
            # Woken by agents coming and going and by new runs; the timeout lets
            # placement timeouts fire while nothing else happens.
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that
            # arrives together with the wake-up, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._wake.wait()
            self._wake.clear()
            await self._dispatch_once()

    async def _dispatch_once(self) -> None:
        blocked = False
        for run_id in list(self._pending):
            record = await self._db.read(repo.get_run, run_id)
            if record is None or record.state != repo.PENDING:
                self._pending.remove(run_id)
                continue
            spec = parse_spec(record)
            placement = spec.placement
            needed = max(1, placement.agents)
            selector = dict(placement.selector)
            free = self.registry.free(selector)
            if blocked or len(free) < needed:
                # Strict FIFO: later runs wait behind the first one that cannot start.
                blocked = True
                await self._fail_if_waited_too_long(record, placement, needed, selector)
                continue
            self._pending.remove(run_id)
            chosen = free[:needed]
            secret = await self._db.read(repo.get_run_secret, record.pk)
            ex = RunExecution(record, spec, secret, [AgentSlot(s) for s in chosen])
            if spec.workload.HasField("dataset"):
                ex.dataset = entries_from_json(await self._db.read(repo.get_run_dataset, record.pk))
            for s in chosen:
                s.run_id = run_id
            self.executions[run_id] = ex
            ex.task = asyncio.create_task(self._execute(ex), name=f"run-{run_id}")

    async def _fail_if_waited_too_long(
        self, record: repo.RunRecord, placement: run_pb2.Placement, needed: int, selector: dict[str, str]
    ) -> None:
        timeout_s = _duration_s(placement.wait_timeout) if placement.HasField("wait_timeout") else 0.0
        timeout_s = timeout_s or DEFAULT_WAIT_TIMEOUT_S
        waited_s = (time.time_ns() - record.created_at) / 1e9
        if waited_s < timeout_s:
            return
        matching = self.registry.matching(selector)
        free = [s for s in matching if s.free]
        what = f"agents matching {selector_text(selector)}" if selector else "agents"
        reason = (
            f"placement: needed {needed} {what}, but after waiting {timeout_s:g} s only {len(matching)} "
            f"{'were' if len(matching) != 1 else 'was'} connected ({len(free)} free)"
        )
        self._pending.remove(record.run_id)
        await self.add_event(record.run_id, record.pk, "run_failed", reason)
        await self._db.write(repo.finish_run, record.pk, repo.FAILED, reason, time.time_ns())
        self._on_run_final(record.run_id)
        self._hub.notify(record.run_id)
        log.warning("run_failed", run_id=record.run_id, reason=reason)

    # --- execution -----------------------------------------------------------------------

    async def _execute(self, ex: RunExecution) -> None:
        run = ex.record
        state, reason = repo.SUCCEEDED, ""
        try:
            await self._db.write(repo.update_run, run.pk, state=repo.RUNNING, started_at=time.time_ns())
            names = ", ".join(s.session.name for s in ex.slots if s.session is not None)
            await self.add_event(ex.run_id, run.pk, "run_started", f"agents: {names}")
            log.info("run_started", run_id=ex.run_id, agents=len(ex.slots))
            preflight_failure = "" if ex.spec.skip_preflight else await self._preflight(ex)
            if preflight_failure:
                state, reason = repo.FAILED, preflight_failure
            for idx, stage in enumerate(ex.spec.stages):
                if ex.cancelled.is_set() or preflight_failure:
                    break
                ok, why = await self._run_stage(ex, idx, stage)
                if not ok:
                    state, reason = repo.FAILED, why
                    break
            if ex.interrupted:
                state, reason = repo.INTERRUPTED, INTERRUPT_REASON
            elif ex.abort_reason:
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
            self.executions.pop(ex.run_id, None)
            raise  # controller shutdown: stop() marks the run INTERRUPTED
        except Exception as exc:
            log.exception("run_crashed", run_id=ex.run_id)
            state, reason = repo.FAILED, f"internal error: {type(exc).__name__}"
        self._release(ex)
        kind = {
            repo.SUCCEEDED: "run_succeeded", repo.FAILED: "run_failed", repo.INTERRUPTED: "run_interrupted"
        }.get(state, "run_cancelled")  # fmt: skip
        # The event first: a watcher that sees the final state must also see its event.
        await self.add_event(ex.run_id, run.pk, kind, reason)
        await self._db.write(repo.finish_run, run.pk, state, reason, time.time_ns())
        log.info(kind, run_id=ex.run_id, reason=reason)
        self.executions.pop(ex.run_id, None)
        self._on_run_final(ex.run_id)
        self._hub.notify(ex.run_id)

    async def _preflight(self, ex: RunExecution) -> str:
        """Every agent of the run checks the target; the reason it failed, or "" to go ahead.
        Warnings (a server answering as another model) become run events."""
        sessions = [slot.session for slot in ex.slots if slot.session is not None]
        target = run_pb2.Target()
        target.CopyFrom(ex.spec.target)
        restore_secrets(target, ex.secret)
        verdict = await check_run_target(sessions, ex.run_id, target, ex.spec.workload, self.preflights, ex.cancelled)
        for warning in verdict.warnings:
            await self.add_event(ex.run_id, ex.record.pk, WARNING_EVENT, warning)
        if verdict.ok and not ex.cancelled.is_set():
            await self.add_event(ex.run_id, ex.record.pk, "preflight_passed",
                                 f"the target answered the check of {len(sessions)} agent(s)")  # fmt: skip
        return verdict.reason

    def preflight_result(self, session: AgentSession, result: agent_service_pb2.PreflightResult) -> None:
        """An agent's answer to a Preflight."""
        self.preflights.answered(session.session_id, result)

    def _release(self, ex: RunExecution) -> None:
        for slot in ex.slots:
            if slot.session is not None and slot.session.run_id == ex.run_id:
                self.registry.release(slot.session)

    def _fill_slots(self, ex: RunExecution) -> list[AgentSlot]:
        """Slots with a live session; an empty slot takes a free matching agent if there is one."""
        selector = dict(ex.spec.placement.selector)
        for slot in ex.slots:
            if slot.session is None or slot.session.closed or slot.session.close_reason:
                slot.session = None
                free = self.registry.free(selector)
                if free:
                    slot.session = free[0]
                    free[0].run_id = ex.run_id
        return [s for s in ex.slots if s.session is not None]

    async def _assign(
        self,
        ex: RunExecution,
        st: StageRun,
        slot: AgentSlot,
        share: run_pb2.Stage,
        seed_idx: int,
        *,
        takeover: bool,
        server_metrics: run_pb2.ServerMetricsSpec | None = None,
    ) -> ActiveAssignment:
        session = slot.session
        assert session is not None
        assignment_id = f"asg_{uuid.uuid4().hex[:16]}"
        # The assignment id is no secret (ListAgents shows it); the token is, and only its
        # hash is kept, so a reconnecting agent proves it was given the assignment.
        resume_token = secrets.token_urlsafe(24)
        created_ns = time.time_ns()
        pk = await self._db.write(
            repo.insert_assignment, assignment_id, ex.record.pk, st.idx, session.session_id,
            session.name, share.concurrency or share.max_concurrency, share.requests,
            agent_service_pb2.ASSIGNMENT_STATE_RUNNING, created_ns, token_sha256(resume_token),
        )  # fmt: skip
        a = ActiveAssignment(
            assignment_id, pk, ex, st.idx, slot, share=share, stage_run=st, agent_name=session.name, takeover=takeover,
            resume_token_sha256=token_sha256(resume_token), created_ns=created_ns,
        )  # fmt: skip
        self.assignments[assignment_id] = a
        session.owned.add(assignment_id)
        st.active.append(a)
        st.changed.set()
        if not session.assignment_id:
            session.assignment_id = assignment_id
        workload = run_pb2.Workload()
        workload.CopyFrom(ex.spec.workload)
        workload.seed = derive_seed(ex.spec.workload.seed, st.idx, seed_idx)
        target = run_pb2.Target()
        target.CopyFrom(ex.spec.target)
        restore_secrets(target, ex.secret)
        a.assign_message = agent_service_pb2.ConnectResponse(
            assign=agent_service_pb2.Assign(
                assignment_id=assignment_id, run_id=ex.run_id, stage_index=st.idx,
                target=target, workload=workload, stage=share, dataset_entries=ex.dataset,
                takeover=takeover, server_metrics=server_metrics, resume_token=resume_token,
            )
        )  # fmt: skip
        if takeover:
            await self._send_assigns([a], time.time_ns() + int(TAKEOVER_LEAD_S * 1e9))
        return a

    async def _send_assigns(self, assignments: list[ActiveAssignment], start_ns: int) -> None:
        """Send prepared Assigns with a common start time (controller clock), each with its
        agent's current clock offset; then record the plan."""
        for a in assignments:
            session = a.slot.session
            if session is None or a.assign_message is None:
                continue
            assign = a.assign_message.assign
            assign.start_unix_ns, assign.clock_offset_ns = start_ns, session.clock.offset_ns
            a.clock_offset_ns = session.clock.offset_ns
            session.send(a.assign_message)
            a.assign_message = None
        for a in assignments:
            await self._db.write(repo.update_assignment, a.pk, planned_start_ns=start_ns, takeover=int(a.takeover),
                                 clock_offset_ns=a.slot.session.clock.offset_ns if a.slot.session else 0)  # fmt: skip

    async def _run_stage(self, ex: RunExecution, idx: int, stage: run_pb2.Stage) -> tuple[bool, str]:
        run = ex.record
        slots = self._fill_slots(ex)
        if not slots:
            return False, f"stage {idx}: no agent left to run it (agents lost)"
        planned_s = _duration_s(stage.duration)
        ex.live.start_stage(idx, planned_s, stage.requests)
        st = StageRun(idx, stage, time.time_ns(), None)
        ex.stage = st
        await self._db.write(repo.update_run, run.pk, current_stage=idx)

        shares = stage_shares(stage, len(slots))
        scrapers = plan_scrapes(ex.spec.server_metrics, [share is not None for share in shares])
        for agent_idx, (slot, share) in enumerate(zip(slots, shares, strict=True)):
            if share is not None:
                await self._assign(ex, st, slot, share, agent_idx, takeover=False, server_metrics=scrapers[agent_idx])
        # Prepared first, sent together: several agents start at one common time, far enough
        # ahead for every Assign to arrive and every agent to prepare; one agent starts at once.
        lead_s = min(START_LEAD_S + START_LEAD_PER_AGENT_S * len(slots), MAX_START_LEAD_S) if len(slots) > 1 else 0.0
        st.start_ns = time.time_ns() + int(lead_s * 1e9)
        st.end_ns = st.start_ns + int(planned_s * 1e9) if planned_s > 0 else None
        await self._send_assigns(list(st.active), st.start_ns)
        await self._db.write(repo.set_stage_time, run.pk, idx, started_at=st.start_ns)
        await self.add_event(ex.run_id, run.pk, "stage_started", f"stage {idx}: {stage.name}")
        log.info("stage_started", run_id=ex.run_id, stage=idx, name=stage.name, agents=len(slots), lead_s=lead_s)

        deadline = None
        if planned_s > 0:
            deadline = MAX_START_LEAD_S + planned_s + _duration_s(ex.spec.target.request_timeout) + STAGE_SLACK_S
        abort_checks = [parse_check(c.expression, True) for c in ex.spec.checks if c.abort_on_fail]
        stage_deadline = None if deadline is None else time.monotonic() + deadline
        cancelled: asyncio.Future[bool] = asyncio.ensure_future(ex.cancelled.wait())
        try:
            while not all(a.done.is_set() for a in st.active) and not cancelled.done():
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
                    ex.abort_reason = f"aborted in stage {idx}: check failed over the last {WINDOW_S:g} s: {failure}"
                    log.warning("run_aborted", run_id=ex.run_id, reason=ex.abort_reason)
                    await self.add_event(ex.run_id, run.pk, "check_failed", ex.abort_reason)
                    ex.cancel_reason = ex.abort_reason
                    ex.cancelled.set()
            if not all(a.done.is_set() for a in st.active):
                why = ex.cancel_reason if ex.cancelled.is_set() else "stage overran its deadline"
                for a in st.active:
                    a.cancel_sent = True
                    if not a.done.is_set() and a.slot.session is not None:
                        a.slot.session.send(
                            agent_service_pb2.ConnectResponse(
                                cancel=agent_service_pb2.Cancel(assignment_id=a.assignment_id, reason=why)
                            )
                        )
                grace_end = time.monotonic() + CANCEL_GRACE_S
                while not all(a.done.is_set() for a in st.active) and time.monotonic() < grace_end:
                    st.changed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(st.changed.wait(), timeout=0.5)
        finally:
            cancelled.cancel()
            ex.stage = None
            for a in st.active:
                if not a.done.is_set():
                    a.final_state = ASSIGNMENT_LOST
                    a.message = "no final report from the agent"
                if a.lost_timer is not None:
                    a.lost_timer.cancel()
                self.assignments.pop(a.assignment_id, None)
                if a.slot.session is not None and a.slot.session.assignment_id == a.assignment_id:
                    a.slot.session.assignment_id = ""
            await self._db.write(repo.set_stage_time, run.pk, idx, ended_at=time.time_ns())

        for a in st.active:
            await self._db.write(repo.record_assignment_health, a.pk, a.max_loop_lag_ms, a.max_cpu_percent)
            if a.final_state in (ASSIGNMENT_LOST, agent_service_pb2.ASSIGNMENT_STATE_FAILED):
                await self._db.write(repo.update_assignment, a.pk, state=a.final_state, message=a.message,
                                     requests_sent=a.requests_sent, ended_at=time.time_ns())  # fmt: skip
        failed = [a for a in st.active if a.final_state == agent_service_pb2.ASSIGNMENT_STATE_FAILED]
        lost = [a for a in st.active if a.final_state == ASSIGNMENT_LOST]
        if st.active and len(failed) + len(lost) == len(st.active):
            detail = (failed or lost)[0].message
            return False, f"stage {idx}: every agent failed or was lost ({detail})"
        return True, ""

    # --- agent loss ----------------------------------------------------------------------

    async def _watchdog_loop(self) -> None:
        """Declare agents lost after MISSED_HEARTBEATS silent heartbeat intervals."""
        while True:
            await asyncio.sleep(self.heartbeat_interval_s / 4)
            now = time.monotonic()
            for session in self.registry.all():
                silent_s = now - session.last_heartbeat_mono
                if session.close_reason or session.departing or silent_s <= self.lost_after_s:
                    continue
                reason = f"{session.name} missed {MISSED_HEARTBEATS} heartbeats (silent for {silent_s:.1f} s)"
                log.warning("agent_lost", session_id=session.session_id, agent=session.name, reason=reason)
                # Closing the stream makes a frozen agent rejoin with a new session later.
                session.close(reason)
                self.registry.remove(session)
                await self._session_gone(session, reason)

    async def _session_gone(self, session: AgentSession, reason: str) -> None:
        """The session is lost for good: its assignments are lost, its slot freed."""
        for a in [a for a in self.assignments.values() if a.slot.session is session]:
            a.slot.session = None
            if not a.done.is_set():
                await self._lose(a, reason)
        if session.run_id and (ex := self.executions.get(session.run_id)) is not None:
            for slot in ex.slots:
                if slot.session is session:
                    slot.session = None

    async def _lose_after_grace(self, a: ActiveAssignment, name: str) -> None:
        await asyncio.sleep(self.disconnect_grace_s)
        if a.slot.session is None and not a.done.is_set():
            a.lost_timer = None
            await self._lose(a, f"{name} disconnected and did not resume within {self.disconnect_grace_s:g} s")

    async def _lose(self, a: ActiveAssignment, reason: str) -> None:
        """Mark an assignment LOST and apply the run's `on_agent_loss` policy."""
        if a.done.is_set():
            return
        ex, run = a.execution, a.execution.record
        a.final_state, a.message = ASSIGNMENT_LOST, reason[:1000]
        a.done.set()
        if a.stage_run is not None:
            a.stage_run.changed.set()
        ex.lost_names.add(a.agent_name)
        await self._db.write(repo.update_assignment, a.pk, state=ASSIGNMENT_LOST, message=a.message,
                             requests_sent=a.requests_sent, ended_at=time.time_ns())  # fmt: skip
        await self.add_event(ex.run_id, run.pk, "agent_lost",
                             f"stage {a.stage_idx}: {reason}; assignment {a.assignment_id} had announced "
                             f"{a.requests_sent} requests")  # fmt: skip
        log.warning("assignment_lost", run_id=ex.run_id, assignment_id=a.assignment_id, reason=reason)
        await self._apply_loss_policy(a, reason)

    async def _apply_loss_policy(self, a: ActiveAssignment, reason: str) -> None:
        """An assignment ended early (agent lost or gone): FAIL, CONTINUE or REDISTRIBUTE."""
        ex = a.execution
        if ex.cancelled.is_set():
            return
        policy = ex.policy
        if policy == run_pb2.AGENT_LOSS_POLICY_FAIL:
            ex.abort_reason = f"stage {a.stage_idx}: agent lost ({reason}) and on_agent_loss is FAIL"
            ex.cancel_reason = ex.abort_reason
            ex.cancelled.set()
            return
        st = a.stage_run
        if st is None or ex.stage is not st:
            return
        if policy == run_pb2.AGENT_LOSS_POLICY_CONTINUE:
            await self._reduce_load(ex, st, f"{a.agent_name} lost; on_agent_loss is CONTINUE")
            return
        await self._redistribute(ex, st, a)

    async def _reduce_load(self, ex: RunExecution, st: StageRun, reason: str) -> None:
        await self._db.write(repo.set_stage_reduced_load, ex.record.pk, st.idx, reason)
        await self.add_event(ex.run_id, ex.record.pk, "reduced_load", f"stage {st.idx}: {reason}")

    def _remaining_share(self, st: StageRun, a: ActiveAssignment) -> run_pb2.Stage | None:
        """What is left of a lost assignment's share: the rest of the stage's time and/or
        the requests it had not announced; None if nothing worth handing over is left."""
        rest = run_pb2.Stage()
        rest.CopyFrom(a.share)
        rest.ClearField("warmup_duration")
        rest.ClearField("ramp")
        rest.warmup_requests = 0
        now = time.time_ns() + int(TAKEOVER_LEAD_S * 1e9)
        if st.end_ns is not None:
            left_s = (st.end_ns - max(now, st.start_ns)) / 1e9
            if left_s < MIN_TAKEOVER_S:
                return None
            rest.duration.FromNanoseconds(int(left_s * 1e9))
        if a.share.requests:
            left = a.share.requests - a.requests_sent
            if left <= 0:
                return None
            rest.requests = left
        return rest

    async def _redistribute(self, ex: RunExecution, st: StageRun, lost: ActiveAssignment) -> None:
        rest = self._remaining_share(st, lost)
        if rest is None:
            return
        takers = [
            slot for slot in ex.slots
            if slot.session is not None and not slot.session.close_reason and slot.session is not lost.slot.session
        ]  # fmt: skip
        if not takers:
            await self._reduce_load(ex, st, f"{lost.agent_name} lost and no agent left to take over its share")
            return
        names: list[str] = []
        for slot, share in zip(takers, stage_shares(rest, len(takers)), strict=True):
            if share is None:
                continue
            st.takeovers += 1
            a = await self._assign(ex, st, slot, share, 1000 * st.takeovers + len(names), takeover=True)
            names.append(f"{a.agent_name} ({_load_text(share)})")
        await self.add_event(ex.run_id, ex.record.pk, "takeover",
                             f"stage {st.idx}: the share of {lost.agent_name} ({_load_text(rest)}) "
                             f"goes to {', '.join(names)}")  # fmt: skip
        log.info("takeover", run_id=ex.run_id, stage=st.idx, lost=lost.agent_name, takers=len(names))

    # --- agent stream events (called by the AgentService servicer) ------------------------

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
                    assignment_id, run_id,
                    f"assignment {assignment_id[:64]} was not given to this agent (missing or wrong resume token)",
                )  # fmt: skip
            proven.add(assignment_id)
        return proven

    async def _token_of(self, assignment_id: str) -> tuple[str, str] | None:
        """(resume token hash, run id) of an assignment, live or stored; None if unknown."""
        a = self.assignments.get(assignment_id)
        if a is not None:
            return a.resume_token_sha256, a.execution.run_id
        found = await self._db.read(repo.lookup_assignment, assignment_id)
        return (found.resume_token_sha256, found.run_id) if found is not None else None

    async def run_of_assignment(self, assignment_id: str) -> str | None:
        """The run an assignment belongs to (live or stored); None if there is no such assignment."""
        found = await self._token_of(assignment_id)
        return found[1] if found is not None else None

    async def agent_connected(self, session: AgentSession, active_assignment_ids: list[str]) -> None:
        await self._db.write(
            repo.record_agent_connected, session.session_id, session.name, session.labels,
            session.version, session.connected_at_ns,
        )  # fmt: skip
        log.info("agent_connected", session_id=session.session_id, agent=session.name)
        for assignment_id in active_assignment_ids:
            a = self.assignments.get(assignment_id)
            if a is None or a.done.is_set() or a.execution.cancelled.is_set() or assignment_id not in session.owned:
                # Stale (lost, finished, or from before a controller restart): drop it.
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
                old.owned.discard(assignment_id)
            a.slot.session = session
            session.run_id = a.execution.run_id
            session.assignment_id = assignment_id
            if a.lost_timer is not None:
                a.lost_timer.cancel()
                a.lost_timer = None
            await self.add_event(a.execution.run_id, a.execution.record.pk, "agent_rejoined",
                                 f"{session.name} resumed {assignment_id}")  # fmt: skip
        for ex in list(self.executions.values()):  # add_event awaits: runs may start or end meanwhile
            if session.name in ex.lost_names and session.run_id != ex.run_id:
                ex.lost_names.discard(session.name)
                await self.add_event(ex.run_id, ex.record.pk, "agent_rejoined",
                                     f"{session.name} rejoined with new session {session.session_id} "
                                     "(its lost share stays with the others)")  # fmt: skip
        self.registry.add(session)

    async def agent_disconnected(self, session: AgentSession) -> None:
        was_registered = self.registry.get(session.session_id) is session
        self.registry.remove(session)
        if self._stopped:
            return  # shutting down: the store may already be closed
        await self._db.write(repo.record_agent_disconnected, session.session_id, time.time_ns())
        log.info("agent_disconnected", session_id=session.session_id, agent=session.name,
                 goodbye=session.departing)  # fmt: skip
        if not was_registered and session.close_reason:
            return  # already declared lost by the watchdog
        for a in [a for a in self.assignments.values() if a.slot.session is session]:
            a.slot.session = None
            if not a.done.is_set():
                a.lost_timer = asyncio.create_task(self._lose_after_grace(a, session.name))
                await self.add_event(a.execution.run_id, a.execution.record.pk, "agent_disconnected",
                                     f"{session.name} disconnected during {a.assignment_id}")  # fmt: skip
        if session.run_id and (ex := self.executions.get(session.run_id)) is not None:
            for slot in ex.slots:
                if slot.session is session:
                    slot.session = None

    async def assignment_update(self, session: AgentSession, update: agent_service_pb2.AssignmentUpdate) -> None:
        a = self.assignments.get(update.assignment_id)
        if a is not None:
            a.requests_sent = max(a.requests_sent, update.requests_sent)
            if update.start_unix_ns and not a.started:
                a.started = True
                started_ns = update.start_unix_ns + session.clock.offset_ns
                await self._db.write(repo.update_assignment, a.pk, started_ns=started_ns,
                                     clock_offset_ns=session.clock.offset_ns)  # fmt: skip
            if update.state in _FINAL and not a.final_state:
                a.final_state = update.state
                a.message = update.message[:1000]
                a.batch_count = update.batch_count
                a.requests_sent = update.requests_sent
                await self._db.write(
                    repo.update_assignment, a.pk, state=update.state, message=a.message,
                    batch_count=update.batch_count, requests_sent=update.requests_sent, ended_at=time.time_ns(),
                )  # fmt: skip
                if update.state == agent_service_pb2.ASSIGNMENT_STATE_FAILED:
                    log.warning("assignment_failed", assignment_id=a.assignment_id, message=a.message)
                await self._record_stalls(a, update)
                self._check_done(a)
                ex = a.execution
                departed = update.state == agent_service_pb2.ASSIGNMENT_STATE_CANCELLED and not a.cancel_sent
                if departed and not ex.cancelled.is_set() and ex.stage is a.stage_run:
                    # The agent stopped on its own (SIGTERM): its share is gone like a lost one's.
                    reason = f"{a.agent_name} stopped its assignment early ({a.message or 'cancelled'})"
                    await self.add_event(ex.run_id, ex.record.pk, "agent_left", f"stage {a.stage_idx}: {reason}")
                    await self._apply_loss_policy(a, reason)
        if update.state in _FINAL:
            # Acknowledge the final report (with the commit position): an agent forgets a
            # finished assignment once every batch and the report itself are acked.
            session.send(
                agent_service_pb2.ConnectResponse(
                    ack=agent_service_pb2.Ack(
                        assignment_id=update.assignment_id, batch_seq=self.acks.through(update.assignment_id)
                    )
                )
            )

    async def _record_stalls(self, a: ActiveAssignment, update: agent_service_pb2.AssignmentUpdate) -> None:
        """Each stall an agent reports with its final update becomes a run event."""
        ex = a.execution
        for stall in update.stalls:
            await self.add_event(ex.run_id, ex.record.pk, "stall", stall_text(a.stage_idx, a.agent_name, stall))

    def heartbeat(self, session: AgentSession, health: AgentHealthReport) -> None:
        """Record an agent's health; the worst figures of an assignment go into its result."""
        self.registry.heartbeat(session, health)
        for a in self.assignments.values():
            if a.slot.session is session:
                a.max_loop_lag_ms = max(a.max_loop_lag_ms, health.event_loop_lag_ms)
                a.max_cpu_percent = max(a.max_cpu_percent, health.cpu_percent)

    def _check_done(self, a: ActiveAssignment) -> None:
        if a.final_state and a.batch_count is not None and self.acks.through(a.assignment_id) >= a.batch_count:
            a.done.set()
            if a.stage_run is not None:
                a.stage_run.changed.set()

    # --- ingest support ------------------------------------------------------------------

    async def resolve_batch(self, assignment_id: str) -> IngestTarget | None:
        """Where a batch belongs, and the window of its samples: in memory for live
        assignments, else from the database (the caller checked the session owns it)."""
        a = self.assignments.get(assignment_id)
        if a is not None:
            ex = a.execution
            return IngestTarget(a.pk, ex.record.pk, ex.run_id, a.stage_idx, a.created_ns, None, a.clock_offset_ns)
        found = await self._db.read(repo.lookup_assignment, assignment_id)
        if found is None:
            return None
        return IngestTarget(found.pk, found.run_pk, found.run_id, found.stage_idx, found.created_at, found.ended_at,
                            found.clock_offset_ns)  # fmt: skip

    async def batch_refused(self, session: AgentSession, assignment_id: str, reason: str) -> None:
        """An owned assignment's agent sent a batch that cannot be stored: the batch is
        dropped, the run says so, and a live assignment counts as lost (its agent is not
        trusted to report it; the run's on_agent_loss policy applies)."""
        a = self.assignments.get(assignment_id)
        if a is None:
            return
        ex = a.execution
        await self.add_event(ex.run_id, ex.record.pk, "batch_refused", f"{session.name}: {reason}"[:1000])
        await self._lose(a, f"{session.name} sent a sample batch that was refused")

    def batch_committed(
        self, session: AgentSession, target: IngestTarget, assignment_id: str, batch_seq: int,
        outcome: repo.IngestOutcome, stored: repo.BatchIngest,
    ) -> None:  # fmt: skip
        through = self.acks.commit(assignment_id, batch_seq)
        session.send(
            agent_service_pb2.ConnectResponse(ack=agent_service_pb2.Ack(assignment_id=assignment_id, batch_seq=through))
        )
        a = self.assignments.get(assignment_id)
        if a is not None:
            if outcome.new:
                a.execution.live.add(outcome.ok, outcome.failed, outcome.output_tokens, stored.metric_columns)
            self._check_done(a)
        self._hub.notify(target.run_id)

    # --- events --------------------------------------------------------------------------

    async def add_event(self, run_id: str, run_pk: int, kind: str, message: str) -> None:
        await self._db.write(repo.add_event, run_pk, kind, message, time.time_ns())
        self._hub.notify(run_id)


def stall_text(stage_idx: int, agent_name: str, stall: agent_service_pb2.Stall) -> str:
    """`stage 0: agent-1: no request could be sent for 11.2 s (...)`."""
    return (
        f"stage {stage_idx}: {agent_name}: no request could be sent for {_duration_s(stall.length):.1f} s "
        f"(from {_duration_s(stall.start_offset):.1f} s into the stage; {stall.in_flight} request(s) in flight "
        "and no response data)"
    )


def _load_text(stage: run_pb2.Stage) -> str:
    parts = []
    if stage.WhichOneof("load") == "request_rate":
        parts.append(f"{stage.request_rate:g} req/s")
    else:
        parts.append(f"concurrency {stage.concurrency}")
    if stage.HasField("duration"):
        parts.append(f"{_duration_s(stage.duration):.1f} s")
    if stage.requests:
        parts.append(f"{stage.requests} requests")
    return ", ".join(parts)
