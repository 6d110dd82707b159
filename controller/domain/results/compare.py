"""Comparing runs with a baseline: stages matched by load level, and per metric the difference
with its confidence interval, a p-value adjusted over the whole comparison (Holm), and an
outcome that knows noise — regressed, improved, no regression, or inconclusive with how much
data would decide (the test: difference.py; docs/metrics.md, "Comparing runs"). For capacity
searches, the capacities (a drop beyond the tolerance is a regression when both searches are
confident).

Works on the results as the API returns them (loadtest.v1.RunResult), so comparing finished
runs reads their stored results (controller/domain/results/provider.py) instead of recomputing
them; a group's result (`RunResult.group`) compares the same way, its intervals then counting
runs, not requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from common.proto.loadtest.v1 import run_pb2
from common.search_outcome import capacity_value, variable_name
from common.stats import DEFAULT_CONFIDENCE_PERCENT, MIN_RATE_SECONDS
from controller.domain.results.difference import (
    Decision,
    Difference,
    Estimate,
    Outcome,
    decide,
    difference,
    holm,
    standard_error,
    values_to_bound_quantile,
    worst,
)
from controller.domain.results.message import interval_field

DEFAULT_TOLERANCE_PERCENT = 10.0
# The note of a metric without an interval (`Metric.judged` False).
NOT_JUDGED = "shown, not judged (results carry no interval of it)"


def _error_rate(s: run_pb2.StageResult) -> float:
    if s.error_rate or s.HasField("error_rate_ci"):
        return s.error_rate  # a group's is the mean over its runs, as its interval
    return s.requests_failed / max(1, s.requests_ok + s.requests_failed)  # a result from before the field


def _latency(metric: str, p: str, present: Callable[[run_pb2.StageResult], bool] | None = None) -> Metric:
    """`ttft`, `p99` -> ttft_p99_ms read from `stage.ttft.p99_ms` with `stage.ttft.p99_ci`."""
    return Metric(
        f"{metric}_{p}_ms",
        lambda s: float(getattr(getattr(s, metric), f"{p}_ms")),
        lambda s: interval_field(getattr(s, metric), f"{p}_ci"),
        True,
        values=lambda s: int(getattr(s, metric).count),
        quantile=int(p.removeprefix("p")) / 100,
        present=present,
    )


def _reasons(s: run_pb2.StageResult) -> bool:
    """The stage saw reasoning (without, TTFO is TTFT and TTFR does not exist)."""
    return bool(s.ttfr.count or s.reasoning_tokens)


def _reports_cache(s: run_pb2.StageResult) -> bool:
    return s.HasField("prefix_cache_hit_percent")


@dataclass(frozen=True)
class Metric:
    """One compared figure of a stage: how to read it and its interval, and which way is worse."""

    name: str
    value: Callable[[run_pb2.StageResult], float]
    interval: Callable[[run_pb2.StageResult], run_pb2.Interval | None]
    worse_up: bool  # True when higher is worse (latency, errors)
    # A latency's number of values (a stage where neither side has any compares nothing).
    values: Callable[[run_pb2.StageResult], int] | None = None
    quantile: float | None = None  # a percentile's quantile, 0.99 for p99
    per_second: bool = False  # a rate: its interval comes from the stage's whole seconds
    highest: float | None = None  # the largest value the figure can take (a fraction: 1); None: unbounded
    # When set, the metric is compared only where both stages have it (reasoning, the prefix
    # cache): a run without it adds nothing to the comparison, not even to the Holm family.
    present: Callable[[run_pb2.StageResult], bool] | None = None
    # False: the figure has no interval to read its noise from; shown with its change, not judged.
    judged: bool = True

    def worst_change(self, baseline: float) -> float | None:
        """The largest change for the worse the figure's range allows from `baseline` (to 0
        for a throughput, to `highest` for the error rate); None when it is unbounded."""
        if not self.worse_up:
            return baseline
        return None if self.highest is None else self.highest - baseline


METRICS: tuple[Metric, ...] = (
    _latency("ttft", "p50"),
    _latency("ttft", "p99"),
    _latency("tpot", "p50"),
    _latency("tpot", "p99"),
    _latency("itl", "p50"),
    _latency("e2e", "p50"),
    _latency("e2e", "p99"),
    Metric("error_rate", _error_rate, lambda s: interval_field(s, "error_rate_ci"), True, highest=1.0),
    Metric(
        "request_throughput",
        lambda s: s.request_throughput,
        lambda s: interval_field(s, "request_throughput_ci"),
        False,
        per_second=True,
    ),
    Metric(
        "output_token_throughput",
        lambda s: s.output_token_throughput,
        lambda s: interval_field(s, "output_token_throughput_ci"),
        False,
        per_second=True,
    ),
    # Reasoning models: compared only when both stages reasoned (docs/metrics.md, "Comparing runs").
    _latency("ttfr", "p50", _reasons),
    _latency("ttfr", "p99", _reasons),
    _latency("ttfo", "p50", _reasons),
    _latency("ttfo", "p99", _reasons),
    # The client's prefix-cache hit rate, percent; lower is worse. Results carry no interval
    # of it, so its change is shown and not judged.
    Metric(
        "prefix_cache_hit_percent",
        lambda s: s.prefix_cache_hit_percent,
        lambda s: None,
        False,
        highest=100.0,
        present=_reports_cache,
        judged=False,
    ),
)
METRICS_BY_NAME: dict[str, Metric] = {m.name: m for m in METRICS}


@dataclass(frozen=True)
class MetricDelta:
    metric: str
    baseline: float
    value: float
    delta: float
    delta_percent: float
    outcome: Outcome = Outcome.NO_REGRESSION
    delta_ci: tuple[float, float] | None = None  # unset when the metric could not be judged
    p_value: float = 1.0  # 1 when not judged (no evidence of a difference)
    p_adjusted: float = 1.0
    requests_needed: int = 0
    repeats_needed: int = 0
    note: str = ""

    @property
    def regressed(self) -> bool:
        return self.outcome == Outcome.REGRESSED


@dataclass(frozen=True)
class StageComparison:
    load: str
    baseline_stage_index: int
    stage_index: int
    metrics: list[MetricDelta]

    @property
    def outcome(self) -> Outcome:
        return worst(m.outcome for m in self.metrics)


@dataclass(frozen=True)
class CapacityDelta:
    """A run's capacity against the baseline's (either absent when it measured none)."""

    variable: int
    baseline: float | None
    value: float | None
    delta_percent: float
    outcome: Outcome  # UNSPECIFIED when not compared
    note: str  # why they were not compared; empty when they were

    @property
    def regressed(self) -> bool:
        return self.outcome == Outcome.REGRESSED


@dataclass(frozen=True)
class RunComparison:
    run_id: str
    stages: list[StageComparison]
    capacity: CapacityDelta | None = None  # when the baseline or this run is a capacity search

    @property
    def outcome(self) -> Outcome:
        """The worst of the stages' and the capacity's; UNSPECIFIED when nothing was compared."""
        capacity = [self.capacity.outcome] if self.capacity is not None else []
        return worst([*(s.outcome for s in self.stages), *capacity])

    @property
    def regressed(self) -> bool:
        return self.outcome == Outcome.REGRESSED


@dataclass(frozen=True)
class Comparison:
    """A CompareRuns answer: every run against the baseline, at one confidence level."""

    baseline_run_id: str
    confidence_percent: float
    runs: list[RunComparison] = field(default_factory=list)

    @property
    def outcome(self) -> Outcome:
        return worst(c.outcome for c in self.runs)


def load_label(s: run_pb2.StageResult) -> str:
    return f"rate={s.request_rate:g}/s" if s.request_rate else f"concurrency={s.concurrency}"


def _searched(result: run_pb2.RunResult) -> str:
    return "a capacity search" if result.HasField("capacity") else "no capacity search"


def compare_capacities(
    baseline: run_pb2.RunResult, other: run_pb2.RunResult, tolerance_percent: float
) -> CapacityDelta | None:
    """The capacity of `other` against the baseline's; None when neither is a capacity search.
    A capacity that dropped by more than `tolerance_percent` is a regression when both searches
    are confident (their boundary probes decided at 95 %), inconclusive otherwise; capacities
    that cannot be compared (one run is no search, different variables, none measured) say why."""
    base_cap, cap = baseline.capacity, other.capacity
    if not baseline.HasField("capacity") and not other.HasField("capacity"):
        return None
    variable = base_cap.variable or cap.variable
    base = capacity_value(base_cap) if baseline.HasField("capacity") else None
    value = capacity_value(cap) if other.HasField("capacity") else None
    note = ""
    if baseline.HasField("capacity") != other.HasField("capacity"):
        note = (
            f"the baseline {baseline.run_id} is {_searched(baseline)}, {other.run_id} is {_searched(other)}: "
            "capacities not compared"
        )
    elif base_cap.variable != cap.variable:
        note = (
            f"the baseline searched {variable_name(base_cap.variable)}, {other.run_id} "
            f"{variable_name(cap.variable)}: capacities not compared"
        )
    elif base is None or value is None:
        which = [r.run_id for r, v in ((baseline, base), (other, value)) if v is None]
        note = f"no capacity measured by {' and '.join(which)}: capacities not compared"
    if note:
        return CapacityDelta(variable, base, value, 0.0, Outcome.UNSPECIFIED, note)
    assert base is not None and value is not None
    if not base:  # nothing passed in the baseline: no drop is possible
        return CapacityDelta(variable, base, value, 0.0, Outcome.NO_REGRESSION, "")
    pct = (value - base) / base * 100
    outcome = Outcome.NO_REGRESSION
    if pct < -tolerance_percent:
        outcome = Outcome.REGRESSED if base_cap.confident and cap.confident else Outcome.INCONCLUSIVE
    return CapacityDelta(variable, base, value, pct, outcome, "")


@dataclass(frozen=True)
class _Side:
    """One result's stage, as a side of a metric comparison."""

    result: run_pb2.RunResult
    stage: run_pb2.StageResult

    @property
    def level(self) -> float:
        return self.result.confidence_percent or DEFAULT_CONFIDENCE_PERCENT

    @property
    def is_group(self) -> bool:
        return self.result.HasField("group")

    @property
    def requests(self) -> int:
        return int(self.stage.requests_ok + self.stage.requests_failed)

    def estimate(self, value: float, interval: run_pb2.Interval, repeats: bool) -> Estimate:
        se = standard_error(interval, self.level)
        if repeats:  # a group's interval narrows with runs; a single run's does not
            return Estimate(value, se, int(self.stage.repeats), scales=self.is_group)
        return Estimate(value, se, self.requests)


@dataclass(frozen=True)
class _Row:
    """A metric of a matched stage before the family's p-values are adjusted: judged (with
    its difference) or not (with why, and the data that would let it be)."""

    metric: Metric
    base: _Side
    other: _Side
    estimates: tuple[Estimate, Estimate] | None
    diff: Difference | None
    note: str = ""
    requests_needed: int = 0
    repeats_needed: int = 0


def _unbounded(metric: Metric, side: _Side, interval: run_pb2.Interval) -> tuple[str, int]:
    """Why an open interval cannot be used, and about how many requests would close it."""
    ends = " or ".join(e for e, is_open in (("below", interval.low_open), ("above", interval.high_open)) if is_open)
    run = side.result.run_id
    if metric.quantile is None or metric.values is None:
        return f"{run}: its interval is open {ends} at {side.level:g} %", 0
    values, requests = metric.values(side.stage), side.requests
    runs = side.stage.repeats if side.is_group and side.stage.repeats > 1 else 1
    # A group's side is open where a run's was: each run needs the values, not the group.
    values, requests = values // runs, requests // runs
    needed_values = values_to_bound_quantile(metric.quantile, side.level)
    # Values per request (ITL has many per request; TTFT one per OK request).
    needed = needed_values if not values else -(-needed_values * max(1, requests) // values)
    if runs > 1:
        return (
            f"{run}: each run's ~{values} values cannot bound it {ends} at {side.level:g} % "
            f"(about {needed} requests per run would)",
            needed,
        )
    return f"{run}: {values} values cannot bound it {ends} at {side.level:g} % (about {needed} requests would)", needed


def _missing(metric: Metric, side: _Side) -> tuple[str, int]:
    """Why a side has no interval, and about how many requests would give it one."""
    run, stage = side.result.run_id, side.stage
    if not side.result.confidence_percent:
        return f"{run}: its result has no intervals (computed before they existed)", 0
    if metric.per_second and stage.duration_s < MIN_RATE_SECONDS:
        # A rate's interval needs that many whole seconds: as many seconds of requests.
        per_second = side.requests / stage.duration_s if stage.duration_s > 0 else 0.0
        return (
            f"{run}: no interval (a rate needs {MIN_RATE_SECONDS} s of the stage, it ran {stage.duration_s:.1f} s)",
            math.ceil(MIN_RATE_SECONDS * per_second),
        )
    needed = values_to_bound_quantile(metric.quantile, side.level) if metric.quantile is not None else 0
    return f"{run}: no interval (too little data)", needed


def _row(metric: Metric, base: _Side, other: _Side, repeats: bool) -> _Row | None:
    """The metric on both sides; None when neither has a value of it (e.g. TPOT of one-token
    answers): there is nothing to compare."""
    if metric.values is not None and metric.values(base.stage) == 0 and metric.values(other.stage) == 0:
        return None
    if metric.present is not None and not (metric.present(base.stage) and metric.present(other.stage)):
        return None
    if not metric.judged:
        return _Row(metric, base, other, None, None, NOT_JUDGED)
    notes: list[str] = []
    requests_needed = repeats_needed = 0
    estimates: list[Estimate] = []
    for side in (base, other):
        value = metric.value(side.stage)
        interval = metric.interval(side.stage)
        if interval is None:
            note, needed = _missing(metric, side)
            if side.is_group and side.stage.repeats < 2:
                repeats_needed, needed = 2, 0
                note = f"{side.result.run_id}: no interval (a group needs 2 counted runs for one)"
        elif interval.low_open or interval.high_open:
            note, needed = _unbounded(metric, side, interval)
        else:
            estimates.append(side.estimate(value, interval, repeats))
            continue
        notes.append(note)
        requests_needed = max(requests_needed, needed)
    if notes:
        return _Row(metric, base, other, None, None, "; ".join(notes), requests_needed, repeats_needed)
    b, o = estimates
    return _Row(metric, base, other, (b, o), difference(b, o))


_IMPOSSIBLE = "a change for the worse beyond the tolerance is outside the figure's range"


def _tolerance(metric: Metric, baseline: float, tolerance_percent: float) -> float:
    """The tolerance in the metric's unit: percent of the baseline, except for the error rate,
    where it counts percentage points (a baseline of 0 % has no percent; a rise of t points
    loses t % of the requests, as a t % drop of request throughput does)."""
    if metric.name == "error_rate":
        return tolerance_percent / 100.0
    return abs(baseline) * tolerance_percent / 100.0


def _delta(
    row: _Row, p_adjusted: float, tolerance_percent: float, confidence_percent: float, family_size: int
) -> MetricDelta:
    base, value = row.metric.value(row.base.stage), row.metric.value(row.other.stage)
    delta = value - base
    pct = delta / base * 100 if base else 0.0
    tolerance = _tolerance(row.metric, base, tolerance_percent)
    worst = row.metric.worst_change(base)
    # A regression beyond the tolerance that the figure's range excludes (a throughput below 0,
    # an error rate above 100 %) is ruled out whatever the noise.
    impossible = worst is not None and worst <= tolerance
    if not row.metric.judged:
        return MetricDelta(row.metric.name, base, value, delta, pct, Outcome.UNSPECIFIED, note=row.note)
    if row.diff is None or row.estimates is None:
        if impossible:
            return MetricDelta(row.metric.name, base, value, delta, pct, Outcome.NO_REGRESSION, note=_IMPOSSIBLE)
        return MetricDelta(
            row.metric.name,
            base,
            value,
            delta,
            pct,
            Outcome.INCONCLUSIVE,
            note=row.note,
            requests_needed=row.requests_needed,
            repeats_needed=row.repeats_needed,
        )
    decision: Decision = decide(
        row.diff, p_adjusted, row.metric.worse_up, tolerance, confidence_percent, family_size, row.estimates
    )
    if impossible and decision.outcome == Outcome.INCONCLUSIVE:
        decision = Decision(Outcome.NO_REGRESSION, 0, _IMPOSSIBLE)
    repeats = row.base.is_group or row.other.is_group
    return MetricDelta(
        row.metric.name,
        base,
        value,
        delta,
        pct,
        decision.outcome,
        row.diff.interval(confidence_percent),
        row.diff.p_value,
        p_adjusted,
        requests_needed=0 if repeats else decision.needed,
        repeats_needed=decision.needed if repeats else 0,
        note=decision.note,
    )


def _compare_stages(
    baseline: run_pb2.RunResult,
    result: run_pb2.RunResult,
    metrics: Sequence[Metric],
    tolerance_percent: float,
    confidence_percent: float,
) -> list[StageComparison]:
    """Every stage of `result` with a baseline stage at its load; the p-values of all their
    judged metrics are adjusted together (one family per compared run)."""
    base_by_load: dict[str, run_pb2.StageResult] = {}
    for s in baseline.stages:
        base_by_load.setdefault(load_label(s), s)
    repeats = baseline.HasField("group") or result.HasField("group")
    matched: list[tuple[run_pb2.StageResult, run_pb2.StageResult, list[_Row]]] = []
    for s in result.stages:
        b = base_by_load.get(load_label(s))
        if b is None:
            continue  # no stage at this load level in the baseline
        rows = [r for m in metrics if (r := _row(m, _Side(baseline, b), _Side(result, s), repeats)) is not None]
        matched.append((b, s, rows))
    family = [r.diff.p_value for _, _, rows in matched for r in rows if r.diff is not None]
    adjusted = iter(holm(family))  # consumed in the same order
    return [
        StageComparison(
            load_label(s),
            b.index,
            s.index,
            [
                _delta(
                    r, next(adjusted) if r.diff is not None else 1.0, tolerance_percent, confidence_percent, len(family)
                )
                for r in rows
            ],
        )
        for b, s, rows in matched
    ]


def compare_runs(
    baseline: run_pb2.RunResult,
    others: list[run_pb2.RunResult],
    tolerance_percent: float,
    confidence_percent: float = DEFAULT_CONFIDENCE_PERCENT,
    metrics: Sequence[Metric] = METRICS,
) -> list[RunComparison]:
    """Each of `others` against the baseline at `confidence_percent`: the chance that a run
    without a real change is reported as regressed is at most 100 - confidence_percent."""
    out = []
    for result in others:
        capacity = compare_capacities(baseline, result, tolerance_percent)
        if baseline.HasField("capacity") and result.HasField("capacity"):
            # Probe loads follow earlier outcomes and the probes above the capacity are
            # overloaded by design: two searches compare by capacity alone.
            out.append(RunComparison(result.run_id, [], capacity))
            continue
        stages = _compare_stages(baseline, result, metrics, tolerance_percent, confidence_percent)
        out.append(RunComparison(result.run_id, stages, capacity))
    return out
