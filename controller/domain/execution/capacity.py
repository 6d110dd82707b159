"""A capacity search's stages: planned one probe at a time while the run runs.

Each probe is appended to the run's stored spec (so every reader sees it as a stage) and run
by `StageRunner` like any stage, on the run's agents, which stay connected and warm between
probes. After each, its stage's outcome is computed from the stored samples
(controller/domain/results.py) and the pure search (`search.py`) judges it and plans the
next probe or the stop. The result replays the same judgement over the stored stages.
"""

from __future__ import annotations

import structlog

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
from controller.domain.results import carried_probes, compute_stage_outcome, probe_measurement, slo_of
from controller.domain.spec import spec_json
from controller.store import repository as repo
from controller.store.database import Database

log = structlog.get_logger(__name__)

SEARCH_STOPPED_EVENT = "search_stopped"
PROBE_PLANNED_EVENT = "probe_planned"


class CapacitySearch:
    """Runs a search run's probes until the search stops or the run does."""

    def __init__(self, db: Database, placement: Placement, stages: StageRunner, events: RunEvents) -> None:
        self._db = db
        self._placement = placement
        self._stages = stages
        self._events = events

    async def run(self, ex: RunExecution) -> tuple[bool, str]:
        """Probe until the search stops; (False, why) if a probe's stage failed the run."""
        search = ex.spec.search
        carried = await self._db.read(carried_probes, search.resume_from_run_id) if search.resume_from_run_id else []
        measurements: list[ProbeMeasurement] = [p.measurement for p in carried]
        settings = SearchSettings.of(search, len(carried))
        slo = slo_of(ex.spec)
        while not ex.cancelled.is_set():
            slots = self._placement.fill_slots(ex)
            available = len(slots) + self._placement.spare_agents(ex)
            step = plan_next(settings, judge_probes(settings, measurements), agents=len(slots),
                             available_agents=available)  # fmt: skip
            if isinstance(step, SearchStop):
                await self._events.add(ex.run_id, ex.record.pk, SEARCH_STOPPED_EVENT, step.message)
                log.info("search_stopped", run_id=ex.run_id, reason=step.reason, message=step.message)
                return True, ""
            if step.agents > len(slots):
                self._placement.add_slots(ex, step.agents - len(slots))
            idx = len(ex.spec.stages)
            stage = probe_stage(search, step.load, idx)
            ex.spec.stages.append(stage)
            await self._db.write(repo.append_stage, ex.record.pk, idx, stage.name, spec_json(ex.spec),
                                 ex.spec.SerializeToString(deterministic=True))  # fmt: skip
            await self._events.add(ex.run_id, ex.record.pk, PROBE_PLANNED_EVENT, f"stage {idx}: {step.why}")
            ok, why = await self._stages.run_stage(ex, idx, stage)
            if not ok:
                return False, why
            if ex.cancelled.is_set():
                break
            # As the result's replay sees it: a stage that stored no sample has no outcome.
            outcome = None
            if idx in await self._db.read(repo.stage_indexes_with_samples, ex.record.pk):
                outcome, _ = await self._db.read(compute_stage_outcome, ex.record.pk, ex.spec, idx, slo, [])
            measurements.append(probe_measurement(ex.spec, idx, outcome, True))
        return True, ""
