"""A capacity search's stages: planned one probe at a time while the run runs.

Each probe is appended to the run's stored spec (so every reader sees it as a stage) and run
by `StageRunner` like any stage, on the run's agents, which stay connected and warm between
probes. After each, its stage's outcome is computed from the stored samples
(controller/domain/results/compute.py) and the pure search (`search.py`) judges it and plans the
next probe or the stop. The result replays the same judgement over the stored stages.
"""

from __future__ import annotations

import structlog

from common.metrics import Slo
from common.proto.loadtest.v1 import run_pb2
from controller.domain.execution.events import RunEvents
from controller.domain.execution.placement import Placement
from controller.domain.execution.search import (
    ProbeMeasurement,
    SearchSettings,
    SearchStop,
    judge_probes,
    plan_next,
    probe_stage,
)
from controller.domain.execution.stages import StageRunner
from controller.domain.execution.state import RunExecution
from controller.domain.results.compute import (
    StageOutcome,
    carried_probes,
    compute_stage_outcome,
    probe_measurement,
    slo_of,
)
from controller.domain.spec import spec_json
from controller.store.interface import SnapshotReads, Store

log = structlog.get_logger(__name__)

SEARCH_STOPPED_EVENT = "search_stopped"
PROBE_PLANNED_EVENT = "probe_planned"


class CapacitySearch:
    """Runs a search run's probes until the search stops or the run does."""

    def __init__(self, store: Store, placement: Placement, stages: StageRunner, events: RunEvents) -> None:
        self._store = store
        self._placement = placement
        self._stages = stages
        self._events = events

    async def run(self, ex: RunExecution) -> tuple[bool, str]:
        """Probe until the search stops; (False, why) if a probe's stage failed the run."""
        search = ex.spec.search
        carried = []
        if search.resume_from_run_id:
            carried = await self._store.read_snapshot(carried_probes, search.resume_from_run_id)
        measurements: list[ProbeMeasurement] = [p.measurement for p in carried]
        settings = SearchSettings.of(search, len(carried))
        slo = slo_of(ex.spec)
        while not ex.cancelled.is_set():
            slots = self._placement.fill_slots(ex)
            available = len(slots) + self._placement.spare_agents(ex)
            step = plan_next(
                settings, judge_probes(settings, measurements), agents=len(slots), available_agents=available
            )
            if isinstance(step, SearchStop):
                await self._events.add(ex.run_id, ex.record.pk, SEARCH_STOPPED_EVENT, step.message)
                log.info("search_stopped", run_id=ex.run_id, reason=step.reason, message=step.message)
                return True, ""
            if step.agents > len(slots):
                self._placement.add_slots(ex, step.agents - len(slots))
            idx = len(ex.spec.stages)
            stage = probe_stage(search, step.load, idx)
            ex.spec.stages.append(stage)
            spec_pb = ex.spec.SerializeToString(deterministic=True)
            await self._store.append_stage(ex.record.pk, idx, stage.name, spec_json(ex.spec), spec_pb)
            await self._events.add(ex.run_id, ex.record.pk, PROBE_PLANNED_EVENT, f"stage {idx}: {step.why}")
            ok, why = await self._stages.run_stage(ex, idx, stage)
            if not ok:
                return False, why
            if ex.cancelled.is_set():
                break
            # As the result's replay sees it: a stage that stored no sample has no outcome.
            outcome = await self._store.read_snapshot(_stage_outcome, ex.record.pk, ex.spec, idx, slo)
            measurements.append(probe_measurement(ex.spec, idx, outcome, True))
        return True, ""


def _stage_outcome(
    reads: SnapshotReads, run_pk: int, spec: run_pb2.RunSpec, idx: int, slo: Slo | None
) -> StageOutcome | None:
    """The probe's stage outcome as the result's replay sees it: none for a stage that stored
    no sample."""
    if idx not in reads.stage_indexes_with_samples(run_pk):
        return None
    return compute_stage_outcome(reads, run_pk, spec, idx, slo, [])[0]
