"""The result of a group of repeats (CreateRunRequest.repeat): the runs' stored results merged
into one RunResult whose figures carry the variation between the runs.

Pure: from each run's state and (when it SUCCEEDED) its stored result to the group's result,
nothing read or written. Only SUCCEEDED runs are counted; the rules are in docs/metrics.md,
"Groups of repeats":

* stages are matched by index; counts (requests, tokens, errors by kind, lost and retried
  requests, ignored samples) are summed;
* every figure that has an interval (each latency's mean and percentiles, the three
  throughputs, goodput, good fraction, error rate) is the mean over the runs, its interval
  mean +- max(t(N-1) * s / sqrt(N), z * sqrt(mean(se_i^2) / N)): s the sample standard
  deviation of the runs' values, se_i = (high_i - low_i) / (2 z) each run's standard error
  read off its own interval. The first term is Student's interval of the spread between runs
  (it has its level whatever that spread is); the second the runs' own intervals combined (a
  mean of N independent figures each as uncertain as its interval says): three runs that
  happen to agree closely do not make an interval narrower than their own measurements
  allow. One counted run: its own figures and intervals;
* the other figures: min of the minima, max of the maxima and peaks, the pooled standard
  deviation of a latency, the mean of durations, concurrencies and token means; a flag
  (saturated, reduced load, target saturated, estimated tokens) is set when any run's is;
* reasoning, prefix-cache and conversation figures: reasoning and cached tokens and
  completed sessions summed, TTFR, TTFO and session duration merged as the other latencies
  (when some run has them), the client's prefix-cache hit rate the mean over the runs that
  measured one, turns matched by index and merged the same way; the server's hit rate is
  not merged (a group's result has no server metrics);
* checks are judged on the group's figures (a count check on the mean count per run, as
  its threshold was written for one run); the verdict as for a run: PASS when every check
  held and the group SUCCEEDED (every repeat did).
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from common.codes import RunState
from common.proto.loadtest.v1 import run_pb2
from common.stats import DEFAULT_CONFIDENCE_PERCENT, t_value, z_value
from controller.domain.results.checks import LATENCIES, OPTIONAL_LATENCIES, ParsedCheck, parse_check
from controller.domain.results.message import interval_field

_AGGREGATES = ("mean", "p50", "p90", "p95", "p99", "p999")  # the latency figures with an interval
_RATES = ("request_throughput", "output_token_throughput", "total_token_throughput")
_SUMS = (
    "requests_ok",
    "requests_failed",
    "prompt_tokens",
    "output_tokens",
    "requests_lost",
    "agents_lost",
    "samples_ignored",
    "requests_retried",
    "reasoning_tokens",
    "cached_prompt_tokens",
    "sessions_completed",
)
_MEANS = (
    "duration_s",
    "achieved_concurrency",
    "mean_requested_input_tokens",
    "mean_input_tokens",
    "mean_requested_output_tokens",
    "mean_output_tokens",
    "mean_reasoning_tokens",
    "mean_answer_tokens",
)
# Latencies a run may not have (no reasoning, no conversation): set only when some run has them.
_OPTIONAL_LATENCIES = OPTIONAL_LATENCIES
_MAXIMA = ("peak_output_token_throughput", "max_event_loop_lag_ms", "start_skew_ms")
# (flag, its reason): set when any run's is, the reasons each named by its run
_FLAGS = (
    ("saturated", "saturation_reason"),
    ("reduced_load", "reduced_load_reason"),
    ("target_saturated", "target_saturation_reason"),
)
_UNFINISHED = (RunState.PENDING, RunState.RUNNING)


@dataclass(frozen=True)
class GroupMember:
    """One run of a group as the merge sees it."""

    run_id: str
    repeat_index: int
    state: int
    state_reason: str
    result: run_pb2.RunResult | None  # its result when it SUCCEEDED (only those are counted)


def group_state(members: Sequence[GroupMember]) -> int:
    """PENDING while no repeat started, RUNNING while any is still to end; then SUCCEEDED when
    every repeat did, else the state of the first that did not (a cancelled group is CANCELLED,
    one with a failed repeat FAILED)."""
    states = [m.state for m in members]
    if any(s in _UNFINISHED for s in states):
        return RunState.PENDING if all(s == RunState.PENDING for s in states) else RunState.RUNNING
    return next((s for s in states if s != RunState.SUCCEEDED), RunState.SUCCEEDED)


def combine(
    values: Sequence[float],
    intervals: Sequence[run_pb2.Interval | None],
    confidence_percent: float,
    upper: float = math.inf,
) -> tuple[float, run_pb2.Interval | None]:
    """The mean of one figure over the runs and its interval (the module's rule); `intervals`
    are the runs' own (None where a run has none). Bounds are kept within [0, upper]."""
    n = len(values)
    mean = math.fsum(values) / n
    if n == 1:
        own = intervals[0]
        if own is None:
            return mean, None
        copy = run_pb2.Interval()
        copy.CopyFrom(own)
        return mean, copy
    between = t_value(confidence_percent, n - 1) * statistics.stdev(values) / math.sqrt(n)
    z = z_value(confidence_percent)
    own_se = [(iv.high - iv.low) / (2 * z) for iv in intervals if iv is not None]
    combined = z * math.sqrt(math.fsum(se * se for se in own_se) / len(own_se) / n) if own_se else 0.0
    half = max(between, combined)
    return mean, run_pb2.Interval(
        low=max(0.0, mean - half),
        high=min(upper, mean + half),
        # A run whose data cannot bound its figure (a tail percentile of few values) leaves
        # the group's figure unbounded on that side too: the runs' values are not bounds.
        low_open=any(iv.low_open for iv in intervals if iv is not None),
        high_open=any(iv.high_open for iv in intervals if iv is not None),
    )


def _set_figure(
    out: run_pb2.LatencyStats | run_pb2.StageResult,
    field: str,
    interval_field: str,
    values: Sequence[float],
    intervals: Sequence[run_pb2.Interval | None],
    confidence_percent: float,
    upper: float = math.inf,
) -> None:
    if not values:
        return
    value, interval = combine(values, intervals, confidence_percent, upper)
    setattr(out, field, value)
    if interval is not None:
        getattr(out, interval_field).CopyFrom(interval)


def merge_latency(stats: Sequence[run_pb2.LatencyStats], confidence_percent: float) -> run_pb2.LatencyStats:
    """One latency over the runs that measured it (count > 0)."""
    have = [s for s in stats if s.count]
    out = run_pb2.LatencyStats()
    if not have:
        return out
    out.count = sum(s.count for s in have)
    out.min_ms = min(s.min_ms for s in have)
    out.max_ms = max(s.max_ms for s in have)
    # The standard deviation of all the runs' values pooled (about their overall mean).
    grand = math.fsum(s.count * s.mean_ms for s in have) / out.count
    spread = math.fsum(s.count * (s.std_ms**2 + (s.mean_ms - grand) ** 2) for s in have)
    out.std_ms = math.sqrt(spread / out.count)
    for agg in _AGGREGATES:
        values = [getattr(s, f"{agg}_ms") for s in have]
        intervals = [interval_field(s, f"{agg}_ci") for s in have]
        _set_figure(out, f"{agg}_ms", f"{agg}_ci", values, intervals, confidence_percent)
    return out


def _error_rate(stage: run_pb2.StageResult) -> float | None:
    total = stage.requests_ok + stage.requests_failed
    return stage.requests_failed / total if total else None


def merge_stages(parts: Sequence[tuple[str, run_pb2.StageResult]], confidence_percent: float) -> run_pb2.StageResult:
    """One stage (or the run-wide figures) over the runs that have it: (run id, its stage)."""
    stages = [stage for _, stage in parts]
    first = stages[0]
    out = run_pb2.StageResult(
        index=first.index,
        name=first.name,
        concurrency=first.concurrency,
        request_rate=first.request_rate,
        repeats=len(stages),
    )
    for field in _SUMS:
        setattr(out, field, sum(getattr(s, field) for s in stages))
    errors: Counter[str] = Counter()
    for s in stages:
        errors.update(dict(s.errors))
    out.errors.update(errors)
    for field in _MEANS:
        setattr(out, field, math.fsum(getattr(s, field) for s in stages) / len(stages))
    for field in _MAXIMA:
        setattr(out, field, max(getattr(s, field) for s in stages))
    out.output_tokens_estimated = any(s.output_tokens_estimated for s in stages)
    for flag, reason in _FLAGS:
        flagged = [(run_id, getattr(s, reason)) for run_id, s in parts if getattr(s, flag)]
        setattr(out, flag, bool(flagged))
        setattr(out, reason, "; ".join(f"{run_id}: {why}" for run_id, why in flagged))
    out.samples_ignored_reason = "; ".join(
        f"{run_id}: {s.samples_ignored_reason}" for run_id, s in parts if s.samples_ignored_reason
    )
    for name in LATENCIES:
        getattr(out, name).CopyFrom(merge_latency([getattr(s, name) for s in stages], confidence_percent))
    for field in _RATES:
        values = [getattr(s, field) for s in stages]
        _set_figure(
            out, field, f"{field}_ci", values, [interval_field(s, f"{field}_ci") for s in stages], confidence_percent
        )
    for field, upper in (("goodput", math.inf), ("good_fraction", 1.0)):
        have = [s for s in stages if s.HasField(field)]  # type: ignore[arg-type]
        values = [getattr(s, field) for s in have]
        _set_figure(
            out,
            field,
            f"{field}_ci",
            values,
            [interval_field(s, f"{field}_ci") for s in have],
            confidence_percent,
            upper,
        )
    for name in _OPTIONAL_LATENCIES:
        measured = [getattr(s, name) for s in stages if s.HasField(name)]  # type: ignore[arg-type]
        if any(m.count for m in measured):
            getattr(out, name).CopyFrom(merge_latency(measured, confidence_percent))
    _mean_if_any(out, stages)
    _merge_turns(out, stages, confidence_percent)
    rated = [(rate, s) for s in stages if (rate := _error_rate(s)) is not None]
    _set_figure(
        out,
        "error_rate",
        "error_rate_ci",
        [rate for rate, _ in rated],
        [interval_field(s, "error_rate_ci") for _, s in rated],
        confidence_percent,
        1.0,
    )
    return out


def _mean_if_any(
    out: run_pb2.StageResult | run_pb2.TurnResult, parts: Sequence[run_pb2.StageResult | run_pb2.TurnResult]
) -> None:
    """The client's prefix-cache hit rate: the mean over the runs that measured one."""
    have = [p.prefix_cache_hit_percent for p in parts if p.HasField("prefix_cache_hit_percent")]
    if have:
        out.prefix_cache_hit_percent = math.fsum(have) / len(have)


def _merge_turns(out: run_pb2.StageResult, stages: Sequence[run_pb2.StageResult], confidence_percent: float) -> None:
    """Per turn index, over the runs that have it: counts summed, latencies merged as the
    stage's, mean input tokens and hit rate the mean over those runs."""
    for turn in sorted({t.turn for s in stages for t in s.turns}):
        rows = [t for s in stages for t in s.turns if t.turn == turn]
        merged = out.turns.add(
            turn=turn,
            requests_ok=sum(t.requests_ok for t in rows),
            requests_failed=sum(t.requests_failed for t in rows),
            mean_input_tokens=math.fsum(t.mean_input_tokens for t in rows) / len(rows),
        )
        for name in ("ttft", "tpot", "e2e"):
            getattr(merged, name).CopyFrom(merge_latency([getattr(t, name) for t in rows], confidence_percent))
        _mean_if_any(merged, rows)


def _measure(check: ParsedCheck, stage: run_pb2.StageResult) -> float | None:
    """A check's metric on a group's stage, in the check's unit (ParsedCheck.measure on the
    message): counts as the mean per run."""
    if "." in check.metric:
        name, agg = check.metric.split(".")
        latency: run_pb2.LatencyStats = getattr(stage, name)
        return float(getattr(latency, f"{agg}_ms")) if latency.count else None
    value: float | None
    if check.metric == "error_rate":
        value = stage.error_rate if stage.requests_ok + stage.requests_failed else None
    elif check.metric in ("goodput", "good_fraction"):
        value = getattr(stage, check.metric) if stage.HasField(check.metric) else None  # type: ignore[arg-type]
    elif check.metric in ("requests_ok", "requests_failed"):
        value = getattr(stage, check.metric) / max(1, stage.repeats)
    else:
        field = {"output_throughput": "output_token_throughput", "total_throughput": "total_token_throughput"}
        value = getattr(stage, field.get(check.metric, check.metric))
    if value is None:
        return None
    return float(value) * 100 if check.percent else float(value)


def _judge(out: run_pb2.RunResult, state: int, checks: Sequence[ParsedCheck]) -> None:
    def add(check: ParsedCheck, stage_index: int, value: float | None, run_level: bool) -> run_pb2.CheckResult:
        passed, measured, message = check.evaluate_value(value)
        result = run_pb2.CheckResult(
            expression=check.expression,
            stage_index=stage_index,
            passed=passed,
            measured=measured,
            threshold=check.threshold,
            message=message,
            run_level=run_level,
        )
        out.checks.append(result)
        return result

    for stage in out.stages:
        for check in checks:
            if not check.run_level:
                stage.checks.append(add(check, stage.index, _measure(check, stage), False))
    for check in checks:
        if check.run_level:
            add(check, 0, None, True)  # `capacity`: a group is never a capacity search
    if not checks:
        out.verdict = run_pb2.VERDICT_NONE
    elif out.checks and all(c.passed for c in out.checks) and state == RunState.SUCCEEDED:
        out.verdict = run_pb2.VERDICT_PASS
    else:
        out.verdict = run_pb2.VERDICT_FAIL


def _state_name(state: int) -> str:
    return run_pb2.RunState.Name(state).removeprefix("RUN_STATE_")  # type: ignore[arg-type]


def _warnings(members: Sequence[GroupMember], counted: Sequence[GroupMember], out: run_pb2.RunResult) -> list[str]:
    warnings: list[str] = []
    for m in members:
        if m.result is not None and m.state == RunState.SUCCEEDED:
            warnings.extend(f"{m.run_id}: {w}" for w in m.result.warnings)
        elif m.state in _UNFINISHED:
            warnings.append(f"repeat {m.repeat_index} ({m.run_id}) is {_state_name(m.state)}: not counted yet")
        else:
            why = f" ({m.state_reason})" if m.state_reason else ""
            warnings.append(f"repeat {m.repeat_index} ({m.run_id}) ended {_state_name(m.state)}{why}: not counted")
    for stage in out.stages:
        if stage.repeats < len(counted):
            warnings.append(f"stage {stage.index} ran in {stage.repeats} of the {len(counted)} counted runs")
    if len(counted) == 1 and len(members) > 1:
        warnings.append("one run counted: its figures and intervals hold no variation between runs")
    return warnings


def group_result(
    group_id: str,
    members: Sequence[GroupMember],
    checks: Sequence[tuple[str, bool]] = (),
    parse: Callable[[str, bool], ParsedCheck] = parse_check,
) -> run_pb2.RunResult:
    """The group's RunResult (`run_id` the group's id, `group` set) from its runs in repeat
    order; `checks` are the spec's (expression, abort_on_fail)."""
    counted = [m for m in members if m.state == RunState.SUCCEEDED and m.result is not None]
    level = next(
        (m.result.confidence_percent for m in counted if m.result is not None and m.result.confidence_percent),
        DEFAULT_CONFIDENCE_PERCENT,
    )
    state = group_state(members)
    out = run_pb2.RunResult(run_id=group_id, state=state, confidence_percent=level)  # type: ignore[arg-type]
    out.group.id = group_id
    out.group.run_ids.extend(m.run_id for m in members)
    out.group.counted_run_ids.extend(m.run_id for m in counted)
    results = [(m.run_id, m.result) for m in counted if m.result is not None]
    for index in sorted({s.index for _, r in results for s in r.stages}):
        parts = [(run_id, s) for run_id, r in results for s in r.stages if s.index == index]
        out.stages.append(merge_stages(parts, level))
    overall = [(run_id, r.overall) for run_id, r in results if r.HasField("overall")]
    if overall:
        out.overall.CopyFrom(merge_stages(overall, level))
        out.overall.name = "run"
    _judge(out, state, [parse(expression, abort) for expression, abort in checks])
    out.warnings.extend(_warnings(members, counted, out))
    return out
