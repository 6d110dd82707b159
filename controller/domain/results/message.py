"""A run's result as the API message: the computed `RunOutcome` packed as loadtest.v1.RunResult.

It is domain code, not the servicers' packing, because that message is what a final run keeps
in SQLite (controller/domain/results/provider.py): what GetRunResult, WatchRun and CompareRuns
read is the same message, computed once.
"""

from __future__ import annotations

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from common.metrics import LatencySummary, StageMetrics
from common.proto.loadtest.v1 import run_pb2
from common.stats import DEFAULT_CONFIDENCE_PERCENT, Interval
from controller.domain.execution.search import PROBE_OUTCOME
from controller.domain.results.compute import CapacityOutcome, CheckOutcome, ProbeRow, RunOutcome, StageOutcome
from controller.domain.results.server_metrics import ServerStageOutcome


def timestamp(ns: int | None) -> timestamp_pb2.Timestamp | None:
    """A Timestamp for ns since the epoch; None for 0 (unset)."""
    if not ns:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def interval_field(message: Message, field: str) -> run_pb2.Interval | None:
    """`message.field` when set: an unset Interval means too little data for one."""
    interval: run_pb2.Interval = getattr(message, field)
    return interval if message.HasField(field) else None


def interval_message(interval: Interval | None) -> run_pb2.Interval | None:
    """The Interval message; None (the field stays unset) where there was too little data."""
    if interval is None:
        return None
    return run_pb2.Interval(
        low=interval.low, high=interval.high, low_open=interval.low_open, high_open=interval.high_open
    )


def latency_message(s: LatencySummary) -> run_pb2.LatencyStats:
    return run_pb2.LatencyStats(
        count=s.count,
        mean_ms=s.mean,
        std_ms=s.std,
        min_ms=s.min,
        max_ms=s.max,
        p50_ms=s.p50,
        p90_ms=s.p90,
        p95_ms=s.p95,
        p99_ms=s.p99,
        p999_ms=s.p999,
        mean_ci=interval_message(s.mean_ci),
        p50_ci=interval_message(s.p50_ci),
        p90_ci=interval_message(s.p90_ci),
        p95_ci=interval_message(s.p95_ci),
        p99_ci=interval_message(s.p99_ci),
        p999_ci=interval_message(s.p999_ci),
    )


def _stage_fields(m: StageMetrics) -> run_pb2.StageResult:
    out = run_pb2.StageResult(
        requests_ok=m.requests_ok,
        requests_failed=m.requests_failed,
        errors=m.errors,
        duration_s=m.duration_s,
        request_throughput=m.request_throughput,
        output_token_throughput=m.output_token_throughput,
        total_token_throughput=m.total_token_throughput,
        peak_output_token_throughput=m.peak_output_token_throughput,
        achieved_concurrency=m.achieved_concurrency,
        prompt_tokens=m.prompt_tokens,
        output_tokens=m.output_tokens,
        output_tokens_estimated=m.output_tokens_estimated,
        ttft=latency_message(m.ttft),
        tpot=latency_message(m.tpot),
        itl=latency_message(m.itl),
        e2e=latency_message(m.e2e),
        queue_delay=latency_message(m.queue_delay),
        e2e_including_queue=latency_message(m.e2e_including_queue),
        time_series=[
            run_pb2.TimeBucket(
                second=b.second,
                completed=b.completed,
                errors=b.errors,
                output_tokens=b.output_tokens,
                ttft_p50_ms=b.ttft_p50_ms,
                ttft_p99_ms=b.ttft_p99_ms,
            )
            for b in m.time_series
        ],
        request_throughput_ci=interval_message(m.request_throughput_ci),
        output_token_throughput_ci=interval_message(m.output_token_throughput_ci),
        total_token_throughput_ci=interval_message(m.total_token_throughput_ci),
        goodput_ci=interval_message(m.goodput_ci),
        good_fraction_ci=interval_message(m.good_fraction_ci),
        error_rate=m.error_rate,
        error_rate_ci=interval_message(m.error_rate_ci),
    )
    if m.goodput is not None:
        out.goodput = m.goodput
    if m.good_fraction is not None:
        out.good_fraction = m.good_fraction
    _reasoning_and_conversation_fields(out, m)
    return out


def _reasoning_and_conversation_fields(out: run_pb2.StageResult, m: StageMetrics) -> None:
    """TTFR/TTFO, reasoning and cached tokens, per-turn rows and sessions (left at their
    defaults when the stage had none: an unset latency means no request had one)."""
    if m.ttfr.count:
        out.ttfr.CopyFrom(latency_message(m.ttfr))
    if m.ttfo.count:
        out.ttfo.CopyFrom(latency_message(m.ttfo))
    out.reasoning_tokens = m.reasoning_tokens
    out.mean_reasoning_tokens = m.mean_reasoning_tokens
    out.mean_answer_tokens = m.mean_answer_tokens
    out.cached_prompt_tokens = m.cached_prompt_tokens
    if m.prefix_cache_hit_percent is not None:
        out.prefix_cache_hit_percent = m.prefix_cache_hit_percent
    for t in m.turns:
        row = out.turns.add(
            turn=t.turn,
            requests_ok=t.requests_ok,
            requests_failed=t.requests_failed,
            ttft=latency_message(t.ttft),
            tpot=latency_message(t.tpot),
            e2e=latency_message(t.e2e),
            mean_input_tokens=t.mean_input_tokens,
        )
        if t.prefix_cache_hit_percent is not None:
            row.prefix_cache_hit_percent = t.prefix_cache_hit_percent
    out.sessions_completed = m.sessions_completed
    if m.session_duration.count:
        out.session_duration.CopyFrom(latency_message(m.session_duration))


def check_message(c: CheckOutcome) -> run_pb2.CheckResult:
    return run_pb2.CheckResult(
        expression=c.expression,
        stage_index=c.stage_index,
        passed=c.passed,
        measured=c.measured,
        threshold=c.threshold,
        message=c.message,
        run_level=c.run_level,
    )


def stage_message(s: StageOutcome) -> run_pb2.StageResult:
    out = _stage_fields(s.metrics)
    out.index, out.name, out.concurrency, out.request_rate = s.index, s.name, s.concurrency, s.request_rate
    out.saturated, out.saturation_reason = s.saturated, s.saturation_reason
    out.target_saturated, out.target_saturation_reason = s.target.saturated, s.target.reason
    out.max_event_loop_lag_ms = s.max_loop_lag_ms
    out.mean_requested_input_tokens = s.mean_requested_input_tokens
    out.mean_input_tokens = s.mean_input_tokens
    out.mean_requested_output_tokens = s.mean_requested_output_tokens
    out.mean_output_tokens = s.mean_output_tokens
    out.samples_ignored, out.samples_ignored_reason = s.samples_ignored, s.samples_ignored_reason
    out.requests_retried = s.requests_retried
    fleet = s.fleet
    if fleet is not None:
        out.start_skew_ms, out.requests_lost = fleet.start_skew_ms, fleet.requests_lost
        out.agents_lost = fleet.agents_lost
        out.reduced_load, out.reduced_load_reason = bool(fleet.reduced_load_reason), fleet.reduced_load_reason
    for name, m in s.agents:
        row = _stage_fields(m)
        row.index, row.name, row.agent_name = s.index, s.name, name
        if fleet is not None:
            row.agent_sessions = fleet.agent_sessions.get(name, "")
            row.start_offset_ms = fleet.agent_start_offset_ms.get(name, 0.0)
        del row.time_series[:]
        out.agents.append(row)
    out.checks.extend(check_message(c) for c in s.checks)
    if s.server_metrics is not None:
        out.server_metrics.CopyFrom(server_metrics_message(s.server_metrics))
    return out


def server_metrics_message(m: ServerStageOutcome) -> run_pb2.ServerMetricsResult:
    return run_pb2.ServerMetricsResult(
        series=[
            run_pb2.ServerMetricSeries(
                endpoint=x.endpoint,
                name=x.name,
                kind=x.kind,  # type: ignore[arg-type]
                role=x.role,
                points=[run_pb2.ServerMetricPoint(second=sec, value=v) for sec, v in x.points],
            )
            for x in m.series
        ],
        cross_checks=[
            run_pb2.ServerCrossCheck(
                quantity=c.quantity,
                server_metrics=c.server_metrics,
                client_value=c.client_value,
                server_value=c.server_value,
                difference_percent=c.difference_percent,
                tolerance_percent=c.tolerance_percent,
                mismatch=c.mismatch,
                window_complete=c.window_complete,
                message=c.message,
            )
            for c in m.cross_checks
        ],
        errors=[
            run_pb2.ServerScrapeError(
                endpoint=e.endpoint,
                message=e.message,
                count=e.count,
                first_time=timestamp(e.first_ns),
                last_time=timestamp(e.last_ns),
            )
            for e in m.errors
        ],
        scrapes_ok=m.scrapes_ok,
        scrapes_failed=m.scrapes_failed,
        series_truncated=m.series_truncated,
        prefix_cache_hit_percent=m.prefix_cache_hit_percent,
        prefix_cache_source=m.prefix_cache_source,
    )


def result_message(run_id: str, state: int, outcome: RunOutcome) -> run_pb2.RunResult:
    out = run_pb2.RunResult(
        run_id=run_id,
        state=state,  # type: ignore[arg-type]
        stages=[stage_message(s) for s in outcome.stages],
        verdict=outcome.verdict,  # type: ignore[arg-type]
        checks=[check_message(c) for c in outcome.checks],
        warnings=outcome.warnings,
        # common/metrics.py computes every interval at the default level.
        confidence_percent=DEFAULT_CONFIDENCE_PERCENT,
    )
    if outcome.capacity is not None:
        out.capacity.CopyFrom(capacity_message(outcome.capacity))
    if outcome.tokens is not None:
        out.tokens.CopyFrom(outcome.tokens)
    if outcome.overall is not None:
        overall = _stage_fields(outcome.overall)
        overall.name = "run"
        del overall.time_series[:]
        out.overall.CopyFrom(overall)
    return out


def probe_message(row: ProbeRow) -> run_pb2.CapacityProbe:
    j, m = row.judgement, row.metrics
    out = run_pb2.CapacityProbe(
        stage_index=row.stage_index,
        load=j.load,
        outcome=PROBE_OUTCOME[j.verdict],
        requests=j.requests,
        good_percent=j.good_fraction * 100,
        good_percent_low=j.low * 100,
        good_percent_high=j.high * 100,
        reason=j.reason,
        repeat=j.repeat,
    )
    if m is not None:
        out.ttft_p50_ms, out.ttft_p99_ms = m.ttft.p50, m.ttft.p99
        out.tpot_p50_ms, out.tpot_p99_ms = m.tpot.p50, m.tpot.p99
        out.e2e_p99_ms = m.e2e.p99
        out.request_throughput, out.output_token_throughput = m.request_throughput, m.output_token_throughput
    return out


def capacity_message(c: CapacityOutcome) -> run_pb2.CapacityResult:
    out = run_pb2.CapacityResult(
        variable=c.variable,  # type: ignore[arg-type]
        goodput_target_percent=c.goodput_target_percent,
        stop_reason=c.stop_reason,  # type: ignore[arg-type]
        stop_message=c.stop_message,
        probes=[probe_message(p) for p in c.probes],
        request_throughput=c.request_throughput,
        output_token_throughput=c.output_token_throughput,
        confident=c.confident,
    )
    if c.highest_passing is not None:
        out.highest_passing = c.highest_passing
    if c.lowest_failing is not None:
        out.lowest_failing = c.lowest_failing
    if c.cost_per_million_output_tokens_usd is not None:
        out.cost_per_million_output_tokens_usd = c.cost_per_million_output_tokens_usd
    return out
