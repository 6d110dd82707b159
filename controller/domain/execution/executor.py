"""One run from its placement to its final state: RUNNING, the preflight check (unless the
spec skips it), its stages in order, then the final state and its reason.

Each running run has one task doing this (`RunExecutor.execute`). A capacity search plans
its stages as it goes (`capacity.CapacitySearch`) instead of running the spec's. The final state is
SUCCEEDED unless a stage failed the run, a check or the loss policy aborted it (FAILED), it
was cancelled (CANCELLED), or the controller stopped under it (INTERRUPTED); a run that
measured nothing but errors is FAILED. Its event is stored before its state, so that a
watcher that sees the final state also sees why.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from common.codes import RunState
from common.proto.loadtest.v1 import run_pb2
from controller.domain.access.secrets import restore_secrets
from controller.domain.execution.capacity import CapacitySearch
from controller.domain.execution.events import RunEvents
from controller.domain.execution.placement import Placement
from controller.domain.execution.preflight import (
    TOKENS_EVENT,
    WARNING_EVENT,
    PreflightAnswers,
    check_run_target,
    tokens_event_message,
)
from controller.domain.execution.stages import StageRunner
from controller.domain.execution.state import ActiveRuns, RunExecution
from controller.store.interface import Store

log = structlog.get_logger(__name__)

INTERRUPT_REASON = "the controller stopped while the run was running"
_FINAL_EVENT = {
    RunState.SUCCEEDED: "run_succeeded",
    RunState.FAILED: "run_failed",
    RunState.INTERRUPTED: "run_interrupted",
}


class RunExecutor:
    """Walks a placed run through its preflight check and stages."""

    def __init__(
        self,
        store: Store,
        active: ActiveRuns,
        placement: Placement,
        stages: StageRunner,
        events: RunEvents,
        preflights: PreflightAnswers,
    ) -> None:
        self._store = store
        self._active = active
        self._placement = placement
        self._stages = stages
        self._events = events
        self._preflights = preflights
        self._search = CapacitySearch(store, placement, stages, events)

    async def execute(self, ex: RunExecution) -> None:
        run = ex.record
        state, reason = RunState.SUCCEEDED, ""
        try:
            await self._store.update_run(run.pk, state=RunState.RUNNING, started_at=time.time_ns())
            names = ", ".join(s.session.name for s in ex.slots if s.session is not None)
            await self._events.add(ex.run_id, run.pk, "run_started", f"agents: {names}")
            log.info("run_started", run_id=ex.run_id, agents=len(ex.slots))
            preflight_failure = "" if ex.spec.skip_preflight else await self._preflight(ex)
            if preflight_failure:
                state, reason = RunState.FAILED, preflight_failure
            if ex.spec.HasField("search") and not preflight_failure and not ex.cancelled.is_set():
                ok, why = await self._search.run(ex)
                if not ok:
                    state, reason = RunState.FAILED, why
            for idx, stage in enumerate(ex.spec.stages):
                if ex.cancelled.is_set() or preflight_failure or ex.spec.HasField("search"):
                    break
                ok, why = await self._stages.run_stage(ex, idx, stage)
                if not ok:
                    state, reason = RunState.FAILED, why
                    break
            if ex.interrupted:
                state, reason = RunState.INTERRUPTED, INTERRUPT_REASON
            elif ex.abort_reason:
                state, reason = RunState.FAILED, ex.abort_reason
            elif ex.cancelled.is_set() and state == RunState.SUCCEEDED:
                state, reason = RunState.CANCELLED, ex.cancel_reason
            elif state == RunState.SUCCEEDED:
                n_ok, n_failed, error = await self._store.failure_summary(run.pk)
                if n_failed and not n_ok:
                    # A run that measured nothing but errors must not look like a result.
                    state, reason = RunState.FAILED, f"every request failed ({n_failed}); e.g. {error[:300]}"
        except asyncio.CancelledError:
            self._placement.release(ex)
            self._active.remove_run(ex.run_id)
            raise  # controller shutdown: stop() marks the run INTERRUPTED
        except Exception as exc:
            log.exception("run_crashed", run_id=ex.run_id)
            state, reason = RunState.FAILED, f"internal error: {type(exc).__name__}"
        self._placement.release(ex)
        kind = _FINAL_EVENT.get(state, "run_cancelled")
        # The event first: a watcher that sees the final state must also see its event.
        await self._events.add(ex.run_id, run.pk, kind, reason)
        await self._store.finish_run(run.pk, state, reason, time.time_ns())
        log.info(kind, run_id=ex.run_id, reason=reason)
        self._active.remove_run(ex.run_id)
        self._events.final(ex.run_id)
        self._events.changed(ex.run_id)
        self._placement.wake()  # the next repeat of its group may start now (its agents are free already)

    async def _preflight(self, ex: RunExecution) -> str:
        """Every agent of the run checks the target; the reason it failed, or "" to go ahead.
        Warnings (a server answering as another model) become run events."""
        sessions = [slot.session for slot in ex.slots if slot.session is not None]
        target = run_pb2.Target()
        target.CopyFrom(ex.spec.target)
        restore_secrets(target, ex.secret)
        verdict = await check_run_target(sessions, ex.run_id, target, ex.spec.workload, self._preflights, ex.cancelled)
        for warning in verdict.warnings:
            await self._events.add(ex.run_id, ex.record.pk, WARNING_EVENT, warning)
        if verdict.usage_prompt_tokens and verdict.counted_prompt_tokens:
            message = tokens_event_message(verdict.usage_prompt_tokens, verdict.counted_prompt_tokens)
            await self._events.add(ex.run_id, ex.record.pk, TOKENS_EVENT, message)
        if verdict.ok and not ex.cancelled.is_set():
            await self._events.add(
                ex.run_id,
                ex.record.pk,
                "preflight_passed",
                f"the target answered the check of {len(sessions)} agent(s)",
            )
        return verdict.reason
