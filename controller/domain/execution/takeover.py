"""What a run does when one of its assignments ends early (its agent was lost, or stopped on
its own): the run's `on_agent_loss` policy.

FAIL fails the run. CONTINUE flags the stage as run with reduced load. REDISTRIBUTE (the
default) gives the rest of the lost share (`remaining_share`: the stage's remaining time or
the requests not announced) to the run's other agents as takeover assignments, split like a
stage; with no other agent left it is reduced load. A trace replay share's rest is the
requests of its share it had not announced, at the trace's times (`trace_takeover_shares`).
Each is a run event. A cancelled run, or a loss from a stage that is already over, changes
nothing.
"""

from __future__ import annotations

import time

import structlog

from common.proto.loadtest.v1 import run_pb2
from controller.domain.execution.events import RunEvents
from controller.domain.execution.planning import (
    load_text,
    remaining_share,
    stage_shares,
    takeover_seed_index,
    trace_takeover_shares,
)
from controller.domain.execution.stages import StageRunner
from controller.domain.execution.state import ActiveAssignment, RunExecution, StageRun
from controller.store.interface import Store

log = structlog.get_logger(__name__)


class LossPolicy:
    """Applies a run's `on_agent_loss` to an assignment that ended early."""

    def __init__(self, store: Store, stages: StageRunner, events: RunEvents) -> None:
        self._store = store
        self._stages = stages
        self._events = events

    async def apply(self, a: ActiveAssignment, reason: str) -> None:
        """An assignment ended early (agent lost or gone): FAIL, CONTINUE or REDISTRIBUTE."""
        ex = a.execution
        if ex.cancelled.is_set():
            return
        policy = ex.policy
        if policy == run_pb2.AGENT_LOSS_POLICY_FAIL:
            ex.abort(f"stage {a.stage_idx}: agent lost ({reason}) and on_agent_loss is FAIL")
            return
        st = a.stage_run
        if ex.stage is not st:
            return
        if policy == run_pb2.AGENT_LOSS_POLICY_CONTINUE:
            await self.reduce_load(ex, st, f"{a.agent_name} lost; on_agent_loss is CONTINUE")
            return
        await self._redistribute(ex, st, a)

    async def reduce_load(self, ex: RunExecution, st: StageRun, reason: str) -> None:
        await self._store.set_stage_reduced_load(ex.record.pk, st.idx, reason)
        await self._events.add(ex.run_id, ex.record.pk, "reduced_load", f"stage {st.idx}: {reason}")

    async def _redistribute(self, ex: RunExecution, st: StageRun, lost: ActiveAssignment) -> None:
        if lost.share.WhichOneof("load") == "trace_replay":
            await self._redistribute_trace(ex, st, lost)
            return
        rest = remaining_share(lost.share, lost.requests_sent, st.start_ns, st.end_ns, time.time_ns())
        if rest is None:
            return
        takers = [
            slot
            for slot in ex.slots
            if slot.session is not None and not slot.session.close_reason and slot.session is not lost.slot.session
        ]
        if not takers:
            await self.reduce_load(ex, st, f"{lost.agent_name} lost and no agent left to take over its share")
            return
        names: list[str] = []
        for slot, share in zip(takers, stage_shares(rest, len(takers)), strict=True):
            if share is None:
                continue
            st.takeovers += 1
            seed_idx = takeover_seed_index(st.takeovers, len(names))
            a = await self._stages.assign(ex, st, slot, share, seed_idx, takeover=True)
            names.append(f"{a.agent_name} ({load_text(share)})")
        await self._events.add(
            ex.run_id,
            ex.record.pk,
            "takeover",
            f"stage {st.idx}: the share of {lost.agent_name} ({load_text(rest)}) goes to {', '.join(names)}",
        )
        log.info("takeover", run_id=ex.run_id, stage=st.idx, lost=lost.agent_name, takers=len(names))

    async def _redistribute_trace(self, ex: RunExecution, st: StageRun, lost: ActiveAssignment) -> None:
        """A lost trace replay share: the requests it had not announced go to the other
        agents round-robin, at the trace's own times (`trace_takeover_shares`)."""
        takers = [
            slot
            for slot in ex.slots
            if slot.session is not None and not slot.session.close_reason and slot.session is not lost.slot.session
        ]
        if not takers:
            await self.reduce_load(ex, st, f"{lost.agent_name} lost and no agent left to take over its share")
            return
        parts = trace_takeover_shares(
            lost.share, lost.share_index, lost.share_count, lost.requests_sent, len(takers), st.end_ns, time.time_ns()
        )
        names: list[str] = []
        for slot, part in zip(takers, parts, strict=True):
            if part is None:
                continue
            share, index, count = part
            st.takeovers += 1
            seed_idx = takeover_seed_index(st.takeovers, len(names))
            a = await self._stages.assign(ex, st, slot, share, seed_idx, takeover=True, trace_share=(index, count))
            names.append(f"{a.agent_name} (trace requests {index}, {index + count}, ...)")
        if not names:
            return
        await self._events.add(
            ex.run_id,
            ex.record.pk,
            "takeover",
            f"stage {st.idx}: the trace requests of {lost.agent_name} not sent after its first "
            f"{lost.requests_sent} go to {', '.join(names)}",
        )
        log.info("takeover", run_id=ex.run_id, stage=st.idx, lost=lost.agent_name, takers=len(names))
