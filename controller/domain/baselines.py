"""Series in domain terms: the baseline of each series (set, read, list, delete, resolved for a
comparison) and a series' history, one metric over its runs.

A series is the name runs share in `RunSpec.series`; its baseline is a SUCCEEDED run (or a
group of repeats) that later runs are compared with. The baseline need not be a run of the
series (a run made before the series was named can be its baseline). The history reads every
run's figure from its stored result (controller/domain/results/provider.py, through `Runs`),
so it costs one stored-row read per finished run, never a second query of the samples.

Nothing here knows about gRPC; the servicer packs these records (controller/servicers/convert.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from common.codes import RunState
from common.proto.loadtest.v1 import run_pb2
from controller.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from controller.domain.results.compare import METRICS_BY_NAME, Metric, load_label
from controller.domain.runs import Runs, is_group_id, state_name
from controller.domain.spec import parse_spec, series_name_problem
from controller.store import repository as repo
from controller.store.baselines import BaselineRecord
from controller.store.interface import SeriesStore

DEFAULT_METRIC = "ttft_p99_ms"
DEFAULT_HISTORY_LIMIT = 50
MAX_HISTORY_LIMIT = 1000


@dataclass(frozen=True)
class HistoryPoint:
    """One run of a series in its history."""

    run_id: str
    created_at: int  # ns
    label_value: str
    value: float | None  # None: the run did not succeed, or has no such stage or figure
    ci: run_pb2.Interval | None
    state: int
    baseline: bool
    stage_index: int


@dataclass(frozen=True)
class SeriesHistory:
    name: str
    metric: str
    load: str  # "" when every run's first stage was taken
    points: list[HistoryPoint]  # oldest first
    baseline: BaselineRecord | None
    confidence_percent: float  # of the intervals (0 when no point has one)


def _check_name(name: str, field: str = "name") -> None:
    problem = "required" if not name else series_name_problem(name)
    if problem:
        raise InvalidArgument([FieldViolation(field, problem)])


def _metric(name: str) -> Metric:
    metric = METRICS_BY_NAME.get(name or DEFAULT_METRIC)
    if metric is None:
        known = ", ".join(METRICS_BY_NAME)
        raise InvalidArgument([FieldViolation("metric", f"unknown metric {name[:64]!r}; one of {known}")])
    return metric


def _stage(result: run_pb2.RunResult, load: str) -> run_pb2.StageResult | None:
    """The stage the history reads: the first whose load is `load`, or the first stage."""
    if not load:
        return result.stages[0] if result.stages else None
    return next((s for s in result.stages if load_label(s) == load), None)


def _figure(metric: Metric, stage: run_pb2.StageResult) -> tuple[float | None, run_pb2.Interval | None]:
    """The metric's value and interval in the stage; no value when the stage has no request the
    figure is made of (a latency of no successful request is no latency)."""
    counted = stage.requests_ok + (stage.requests_failed if metric.name == "error_rate" else 0)
    if counted == 0:
        return None, None
    if metric.present is not None and not metric.present(stage):
        return None, None  # a figure of reasoning or the prefix cache in a run without it
    return metric.value(stage), metric.interval(stage)


class Baselines:
    """The baselines of series and their histories."""

    def __init__(self, store: SeriesStore, runs: Runs) -> None:
        self._store = store
        self._runs = runs

    async def set_baseline(self, name: str, run_id: str, key_id: str) -> BaselineRecord:
        """Make `run_id` the baseline of `name`, replacing the one it had."""
        _check_name(name)
        if not run_id:
            raise InvalidArgument([FieldViolation("run_id", "required")])
        if is_group_id(run_id):
            await self._check_group(run_id)
        else:
            record = await self._runs.get(run_id)
            if record.state != RunState.SUCCEEDED:
                raise FailedPrecondition(
                    f"run {run_id} is {state_name(record.state)}: only a SUCCEEDED run can be a baseline"
                )
        baseline = BaselineRecord(name, run_id, time.time_ns(), key_id)
        await self._store.set_baseline(baseline)
        return baseline

    async def _check_group(self, group_id: str) -> None:
        """A group may be a baseline when at least one of its runs SUCCEEDED and none is still
        pending or running (SetBaselineRequest.run_id)."""
        records, _ = await self._runs.group(group_id)  # NotFound for an unknown group
        if any(not r.is_final for r in records):
            raise FailedPrecondition(f"group {group_id} is still running: a baseline must be finished")
        if all(r.state != RunState.SUCCEEDED for r in records):
            raise FailedPrecondition(f"group {group_id} has no SUCCEEDED run: it cannot be a baseline")

    async def get_baseline(self, name: str) -> BaselineRecord:
        _check_name(name)
        baseline = await self._store.get_baseline(name)
        if baseline is None:
            raise NotFound(f"no baseline for series {name!r}")
        return baseline

    async def list_baselines(self) -> list[BaselineRecord]:
        return await self._store.list_baselines()

    async def delete_baseline(self, name: str) -> None:
        _check_name(name)
        if not await self._store.delete_baseline(name):
            raise NotFound(f"no baseline for series {name!r}")

    async def resolve(self, name: str) -> str:
        """The run (or group) id a comparison with the baseline of `name` compares with."""
        _check_name(name, "baseline_name")
        return (await self.get_baseline(name)).run_id

    async def history(self, name: str, metric_name: str, label: str, load: str, limit: int) -> SeriesHistory:
        """The metric over the series' `limit` most recent runs, oldest first. The baseline is
        among the points even when it is older than those (or of no series)."""
        _check_name(name)
        metric = _metric(metric_name)
        if limit > MAX_HISTORY_LIMIT:
            raise InvalidArgument([FieldViolation("limit", f"at most {MAX_HISTORY_LIMIT}")])
        records = await self._store.series_runs(name, limit or DEFAULT_HISTORY_LIMIT)
        baseline = await self._store.get_baseline(name)
        if baseline is not None and all(_point_id(r) != baseline.run_id for r in records):
            records.extend(await self._baseline_runs(baseline.run_id))
        # One point per run, and one per group of repeats (its figures over its runs).
        subjects: dict[str, list[repo.RunRecord]] = {}
        for record in sorted(records, key=lambda r: (r.created_at, r.pk)):
            subjects.setdefault(_point_id(record), []).append(record)
        points: list[HistoryPoint] = []
        confidence = 0.0
        for point_id, members in subjects.items():
            point, level = await self._point(point_id, members, metric, label, load, baseline)
            points.append(point)
            confidence = confidence or level
        return SeriesHistory(name, metric.name, load, points, baseline, confidence)

    async def _baseline_runs(self, run_id: str) -> list[repo.RunRecord]:
        """The baseline's run to add to a history it is not part of."""
        try:
            if is_group_id(run_id):
                return (await self._runs.group(run_id))[0]
            return [await self._runs.get(run_id)]
        except NotFound:  # deleted since the baseline was read (its baseline went with it)
            return []

    async def _point(
        self,
        point_id: str,
        members: list[repo.RunRecord],
        metric: Metric,
        label: str,
        load: str,
        baseline: BaselineRecord | None,
    ) -> tuple[HistoryPoint, float]:
        """The point of one run, or of a group (`members` its runs of the history, oldest first),
        and the confidence level of its interval (0 without one)."""
        first = members[0]
        label_value = parse_spec(first).labels.get(label, "") if label else ""
        value: float | None = None
        ci: run_pb2.Interval | None = None
        stage_index = 0
        level = 0.0
        succeeded = any(r.state == RunState.SUCCEEDED for r in members)
        state = RunState.SUCCEEDED if succeeded else first.state
        if succeeded:
            if is_group_id(point_id):
                result = await self._runs.group_result(point_id)
            else:
                _, result = await self._runs.result(point_id)
            stage = _stage(result, load)
            if stage is not None:
                value, ci = _figure(metric, stage)
                stage_index = stage.index
                level = result.confidence_percent if ci is not None else 0.0
        is_baseline = baseline is not None and baseline.run_id == point_id
        point = HistoryPoint(point_id, first.created_at, label_value, value, ci, state, is_baseline, stage_index)
        return point, level


def _point_id(record: repo.RunRecord) -> str:
    """The id a run's figures appear under in a history: its group's, or its own."""
    return record.group_id or record.run_id
