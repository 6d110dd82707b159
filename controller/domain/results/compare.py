"""Comparing runs with a baseline: stages matched by load level, per-metric deltas, and
a regression flag where a run got worse than the tolerance; for capacity searches, the
capacities (a drop beyond the tolerance is a regression).

Works on the results as the API returns them (loadtest.v1.RunResult), so comparing finished
runs reads their stored results (controller/domain/results/provider.py) instead of recomputing them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from google.protobuf.message import Message

from common.proto.loadtest.v1 import run_pb2
from common.search_outcome import capacity_value, variable_name

DEFAULT_TOLERANCE_PERCENT = 10.0


def _error_rate(s: run_pb2.StageResult) -> float:
    return s.requests_failed / max(1, s.requests_ok + s.requests_failed)


def _optional(message: Message, field: str) -> run_pb2.Interval | None:
    """`message.field` when set (an unset interval means "too little data for one")."""
    interval: run_pb2.Interval = getattr(message, field)
    return interval if message.HasField(field) else None


def _latency(metric: str, p: str) -> Metric:
    """`ttft`, `p99` -> ttft_p99_ms read from `stage.ttft.p99_ms` with `stage.ttft.p99_ci`."""
    return Metric(
        f"{metric}_{p}_ms",
        lambda s: float(getattr(getattr(s, metric), f"{p}_ms")),
        lambda s: _optional(getattr(s, metric), f"{p}_ci"),
        True,
    )


@dataclass(frozen=True)
class Metric:
    """One compared figure of a stage: how to read it and its interval, and which way is worse."""

    name: str
    value: Callable[[run_pb2.StageResult], float]
    interval: Callable[[run_pb2.StageResult], run_pb2.Interval | None]
    worse_up: bool  # True when higher is worse (latency, errors)


METRICS: tuple[Metric, ...] = (
    _latency("ttft", "p50"),
    _latency("ttft", "p99"),
    _latency("tpot", "p50"),
    _latency("tpot", "p99"),
    _latency("itl", "p50"),
    _latency("e2e", "p50"),
    _latency("e2e", "p99"),
    Metric("error_rate", _error_rate, lambda s: _optional(s, "error_rate_ci"), True),
    Metric(
        "request_throughput", lambda s: s.request_throughput, lambda s: _optional(s, "request_throughput_ci"), False
    ),
    Metric(
        "output_token_throughput",
        lambda s: s.output_token_throughput,
        lambda s: _optional(s, "output_token_throughput_ci"),
        False,
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
    regressed: bool


@dataclass(frozen=True)
class StageComparison:
    load: str
    baseline_stage_index: int
    stage_index: int
    metrics: list[MetricDelta]


@dataclass(frozen=True)
class CapacityDelta:
    """A run's capacity against the baseline's (either absent when it measured none)."""

    variable: int
    baseline: float | None
    value: float | None
    delta_percent: float
    regressed: bool
    note: str  # why they were not compared; empty when they were


@dataclass(frozen=True)
class RunComparison:
    run_id: str
    stages: list[StageComparison]
    capacity: CapacityDelta | None = None  # when the baseline or this run is a capacity search

    @property
    def regressed(self) -> bool:
        capacity = self.capacity is not None and self.capacity.regressed
        return capacity or any(m.regressed for s in self.stages for m in s.metrics)


def load_label(s: run_pb2.StageResult) -> str:
    return f"rate={s.request_rate:g}/s" if s.request_rate else f"concurrency={s.concurrency}"


def _delta(name: str, base: float, value: float, worse_up: bool, tolerance: float) -> MetricDelta:
    delta = value - base
    pct = delta / base * 100 if base else 0.0
    worse = pct > tolerance if worse_up else pct < -tolerance
    if not base and name == "error_rate":
        worse = value > 0  # errors where there were none is a regression whatever the percent
    return MetricDelta(name, base, value, delta, pct, worse)


def _searched(result: run_pb2.RunResult) -> str:
    return "a capacity search" if result.HasField("capacity") else "no capacity search"


def compare_capacities(
    baseline: run_pb2.RunResult, other: run_pb2.RunResult, tolerance_percent: float
) -> CapacityDelta | None:
    """The capacity of `other` against the baseline's; None when neither is a capacity search.
    A capacity that dropped by more than `tolerance_percent` is a regression; capacities that
    cannot be compared (one run is no search, different variables, none measured) say why."""
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
        return CapacityDelta(variable, base, value, 0.0, False, note)
    assert base is not None and value is not None
    if not base:  # nothing passed in the baseline: no drop is possible
        return CapacityDelta(variable, base, value, 0.0, False, "")
    pct = (value - base) / base * 100
    return CapacityDelta(variable, base, value, pct, pct < -tolerance_percent, "")


def compare_runs(
    baseline: run_pb2.RunResult, others: list[run_pb2.RunResult], tolerance_percent: float
) -> list[RunComparison]:
    base_by_load: dict[str, run_pb2.StageResult] = {}
    for s in baseline.stages:
        base_by_load.setdefault(load_label(s), s)
    out = []
    for result in others:
        capacity = compare_capacities(baseline, result, tolerance_percent)
        if baseline.HasField("capacity") and result.HasField("capacity"):
            # Probe loads follow earlier outcomes and the probes above the capacity are
            # overloaded by design: two searches compare by capacity alone.
            out.append(RunComparison(result.run_id, [], capacity))
            continue
        stages = []
        for s in result.stages:
            b = base_by_load.get(load_label(s))
            if b is None:
                continue  # no stage at this load level in the baseline
            metrics = [_delta(m.name, m.value(b), m.value(s), m.worse_up, tolerance_percent) for m in METRICS]
            stages.append(StageComparison(load_label(s), b.index, s.index, metrics))
        out.append(RunComparison(result.run_id, stages, capacity))
    return out
