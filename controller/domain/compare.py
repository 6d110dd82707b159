"""Comparing runs with a baseline: stages matched by load level, per-metric deltas, and
a regression flag where a run got worse than the tolerance."""

from __future__ import annotations

from dataclasses import dataclass

from controller.domain.results import RunOutcome, StageOutcome

DEFAULT_TOLERANCE_PERCENT = 10.0

# (name, how to read it from a stage, True when higher is worse)
METRICS = (
    ("ttft_p50_ms", lambda s: s.metrics.ttft.p50, True),
    ("ttft_p99_ms", lambda s: s.metrics.ttft.p99, True),
    ("tpot_p50_ms", lambda s: s.metrics.tpot.p50, True),
    ("tpot_p99_ms", lambda s: s.metrics.tpot.p99, True),
    ("itl_p50_ms", lambda s: s.metrics.itl.p50, True),
    ("e2e_p50_ms", lambda s: s.metrics.e2e.p50, True),
    ("e2e_p99_ms", lambda s: s.metrics.e2e.p99, True),
    ("error_rate", lambda s: s.metrics.requests_failed / max(1, s.metrics.requests_ok + s.metrics.requests_failed),
     True),
    ("request_throughput", lambda s: s.metrics.request_throughput, False),
    ("output_token_throughput", lambda s: s.metrics.output_token_throughput, False),
)


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
class RunComparison:
    run_id: str
    stages: list[StageComparison]

    @property
    def regressed(self) -> bool:
        return any(m.regressed for s in self.stages for m in s.metrics)


def load_label(s: StageOutcome) -> str:
    return f"rate={s.request_rate:g}/s" if s.request_rate else f"concurrency={s.concurrency}"


def _delta(name: str, base: float, value: float, worse_up: bool, tolerance: float) -> MetricDelta:
    delta = value - base
    pct = delta / base * 100 if base else 0.0
    worse = pct > tolerance if worse_up else pct < -tolerance
    if not base and name == "error_rate":
        worse = value > 0  # errors where there were none is a regression whatever the percent
    return MetricDelta(name, base, value, delta, pct, worse)


def compare_runs(
    baseline: RunOutcome, others: list[tuple[str, RunOutcome]], tolerance_percent: float
) -> list[RunComparison]:
    base_by_load: dict[str, StageOutcome] = {}
    for s in baseline.stages:
        base_by_load.setdefault(load_label(s), s)
    out = []
    for run_id, outcome in others:
        stages = []
        for s in outcome.stages:
            b = base_by_load.get(load_label(s))
            if b is None:
                continue  # no stage at this load level in the baseline
            metrics = [_delta(name, get(b), get(s), worse_up, tolerance_percent) for name, get, worse_up in METRICS]
            stages.append(StageComparison(load_label(s), b.index, s.index, metrics))
        out.append(RunComparison(run_id, stages))
    return out
