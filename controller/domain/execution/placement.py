"""Placement: the queue of runs waiting for agents, and which agents each run gets.

A dispatcher starts pending runs in creation order (strict FIFO: later runs wait behind the
first one that cannot start) as soon as enough free agents match the run's `placement` (a
count and a label selector). A run that cannot be placed within `placement.wait_timeout`
(default `DEFAULT_WAIT_TIMEOUT_S`) fails with a reason naming what was missing. A repeat of a
group (CreateRunRequest.repeat) waits until every earlier repeat of its group is final, and
later runs wait behind it; its wait_timeout counts from when the last of them ended. Between
stages, a slot whose agent is gone takes another free matching agent (`fill_slots`).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import structlog

from common.codes import RunState
from common.proto.loadtest.v1 import run_pb2
from controller.domain.datasets import entries_from_json
from controller.domain.execution.agents import AgentRegistry
from controller.domain.execution.events import RunEvents
from controller.domain.execution.planning import placement_failure, placement_wait_s
from controller.domain.execution.state import ActiveRuns, AgentSlot, RunExecution
from controller.domain.spec import parse_spec
from controller.store import repository as repo
from controller.store.interface import Store

log = structlog.get_logger(__name__)

# With nothing to wake the dispatcher, it still looks this often (placement timeouts).
IDLE_CHECK_S = 1.0


class Placement:
    """Pending runs, in order, and the agents they are placed on."""

    def __init__(
        self,
        store: Store,
        agents: AgentRegistry,
        active: ActiveRuns,
        events: RunEvents,
        on_placed: Callable[[RunExecution], None],
    ) -> None:
        self._store = store
        self._agents = agents
        self._active = active
        self._events = events
        # Called with a run that got its agents (and is now active): it starts executing.
        self._on_placed = on_placed
        self._pending: list[str] = []
        self._wake = asyncio.Event()

    async def load_pending(self) -> None:
        """Take the stored pending runs as the queue (at startup)."""
        self._pending = await self._store.pending_run_ids()

    def wake(self) -> None:
        """Something changed (a run, an agent): look at the queue again."""
        self._wake.set()

    def enqueue(self, run_id: str) -> None:
        self._pending.append(run_id)
        self._wake.set()

    def withdraw(self, run_id: str) -> bool:
        """Remove a run that has not started yet; False if it is not pending here."""
        if run_id in self._pending:
            self._pending.remove(run_id)
            return True
        return False

    async def dispatch_forever(self) -> None:
        while True:
            # Woken by agents coming and going and by new runs; the timeout lets
            # placement timeouts fire while nothing else happens.
            # asyncio.timeout, not wait_for: on 3.11 wait_for loses a cancellation that
            # arrives together with the wake-up, and stop() would wait forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(IDLE_CHECK_S):
                    await self._wake.wait()
            self._wake.clear()
            await self._dispatch_once()

    async def _dispatch_once(self) -> None:
        blocked = False
        waiting_groups: set[str] = set()  # groups with a repeat still pending ahead in the queue
        for run_id in list(self._pending):
            record = await self._store.get_run(run_id)
            if record is None or record.state != RunState.PENDING:
                self._pending.remove(run_id)
                continue
            waiting_since = None if record.group_id in waiting_groups else await self._turn_of(record)
            if record.group_id:
                waiting_groups.add(record.group_id)
            if waiting_since is None:
                blocked = True  # its group's earlier repeat is not final; later runs wait behind it
                continue
            spec = parse_spec(record)
            placement = spec.placement
            needed = max(1, placement.agents)
            selector = dict(placement.selector)
            free = self._agents.free(selector)
            if blocked or len(free) < needed:
                # Strict FIFO: later runs wait behind the first one that cannot start.
                blocked = True
                await self._fail_if_waited_too_long(record, waiting_since, placement, needed, selector)
                continue
            self._pending.remove(run_id)
            chosen = free[:needed]
            secret = await self._store.get_run_secret(record.pk)
            ex = RunExecution(record, spec, secret, [AgentSlot(s) for s in chosen])
            if spec.workload.HasField("dataset"):
                ex.dataset = entries_from_json(await self._store.get_run_dataset(record.pk))
            for s in chosen:
                s.run_id = run_id
            self._active.add_run(ex)
            self._on_placed(ex)

    async def _turn_of(self, record: repo.RunRecord) -> int | None:
        """When the run's wait for agents began: at its creation, or for a repeat of a group
        when the last earlier repeat ended; None while an earlier repeat is not final yet."""
        if not record.group_id or record.repeat_index == 0:
            return record.created_at
        earlier = [r for r in await self._store.list_group(record.group_id) if r.repeat_index < record.repeat_index]
        if any(not r.is_final for r in earlier):
            return None
        return max([record.created_at, *(r.ended_at or 0 for r in earlier)])

    async def _fail_if_waited_too_long(
        self,
        record: repo.RunRecord,
        waiting_since: int,
        placement: run_pb2.Placement,
        needed: int,
        selector: dict[str, str],
    ) -> None:
        timeout_s = placement_wait_s(placement)
        waited_s = (time.time_ns() - waiting_since) / 1e9
        if waited_s < timeout_s:
            return
        matching = self._agents.matching(selector)
        free = [s for s in matching if s.free]
        reason = placement_failure(needed, selector, timeout_s, len(matching), len(free))
        self._pending.remove(record.run_id)
        await self._events.add(record.run_id, record.pk, "run_failed", reason)
        await self._store.finish_run(record.pk, RunState.FAILED, reason, time.time_ns())
        self._events.final(record.run_id)
        self._events.changed(record.run_id)
        log.warning("run_failed", run_id=record.run_id, reason=reason)

    def fill_slots(self, ex: RunExecution) -> list[AgentSlot]:
        """Slots with a live session; an empty slot takes a free matching agent if there is one."""
        selector = dict(ex.spec.placement.selector)
        for slot in ex.slots:
            if slot.session is None or slot.session.closed or slot.session.close_reason:
                slot.session = None
                free = self._agents.free(selector)
                if free:
                    slot.session = free[0]
                    free[0].run_id = ex.run_id
        return [s for s in ex.slots if s.session is not None]

    def spare_agents(self, ex: RunExecution) -> int:
        """Free agents matching the run's selector: more a capacity search may take."""
        return len(self._agents.free(dict(ex.spec.placement.selector)))

    def add_slots(self, ex: RunExecution, n: int) -> int:
        """Give the run up to `n` more free matching agents (a capacity search whose generator
        was saturated); how many it got. They stay the run's until it ends."""
        free = self._agents.free(dict(ex.spec.placement.selector))[:n]
        for session in free:
            session.run_id = ex.run_id
            ex.slots.append(AgentSlot(session))
        return len(free)

    def release(self, ex: RunExecution) -> None:
        """The run's agents are free again."""
        for slot in ex.slots:
            if slot.session is not None and slot.session.run_id == ex.run_id:
                self._agents.release(slot.session)
