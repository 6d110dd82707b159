"""Packing domain values into API messages (and nothing else)."""

from __future__ import annotations

from google.protobuf import json_format, timestamp_pb2

from common.metrics import LatencySummary, StageMetrics
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from controller.domain.agents import AgentSession
from controller.domain.compare import RunComparison
from controller.domain.live import LiveSnapshot
from controller.domain.results import CheckOutcome, RunOutcome, StageOutcome
from controller.domain.server_metrics import ServerStageOutcome
from controller.store.repository import EventRecord, RunRecord


def timestamp(ns: int | None) -> timestamp_pb2.Timestamp | None:
    if not ns:
        return None
    ts = timestamp_pb2.Timestamp()
    ts.FromNanoseconds(ns)
    return ts


def run_message(record: RunRecord) -> run_pb2.Run:
    run = run_pb2.Run(
        id=record.run_id,
        state=record.state,  # type: ignore[arg-type]
        state_reason=record.state_reason,
        current_stage=record.current_stage,
        progress=run_pb2.RunProgress(
            requests_ok=record.requests_ok,
            requests_failed=record.requests_failed,
            output_tokens=record.output_tokens,
        ),
    )
    if record.spec_pb:  # binary since migration 7 (ListRuns: ~1 us a run instead of ~110 us)
        run.spec.MergeFromString(record.spec_pb)
    else:
        json_format.Parse(record.spec_json, run.spec)
    run.spec.target.api_key = ""  # never stored in spec_json; cleared again on principle
    # Seconds and nanos set directly: Timestamp.FromNanoseconds is pure Python and was a third
    # of a ListRuns page's cost. Times are positive (ns since the epoch), as `timestamp` assumes.
    for ts, ns in ((run.create_time, record.created_at), (run.start_time, record.started_at),
                   (run.end_time, record.ended_at)):  # fmt: skip
        if ns:
            ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)
    return run


def latency_message(s: LatencySummary) -> run_pb2.LatencyStats:
    return run_pb2.LatencyStats(
        count=s.count, mean_ms=s.mean, std_ms=s.std, min_ms=s.min, max_ms=s.max,
        p50_ms=s.p50, p90_ms=s.p90, p95_ms=s.p95, p99_ms=s.p99, p999_ms=s.p999,
    )  # fmt: skip


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
                second=b.second, completed=b.completed, errors=b.errors, output_tokens=b.output_tokens,
                ttft_p50_ms=b.ttft_p50_ms, ttft_p99_ms=b.ttft_p99_ms,
            )
            for b in m.time_series
        ],
    )  # fmt: skip
    if m.goodput is not None:
        out.goodput = m.goodput
    if m.good_fraction is not None:
        out.good_fraction = m.good_fraction
    return out


def check_message(c: CheckOutcome) -> run_pb2.CheckResult:
    return run_pb2.CheckResult(
        expression=c.expression, stage_index=c.stage_index, passed=c.passed,
        measured=c.measured, threshold=c.threshold, message=c.message,
    )  # fmt: skip


def stage_message(s: StageOutcome) -> run_pb2.StageResult:
    out = _stage_fields(s.metrics)
    out.index, out.name, out.concurrency, out.request_rate = s.index, s.name, s.concurrency, s.request_rate
    out.saturated, out.saturation_reason = s.saturated, s.saturation_reason
    out.max_event_loop_lag_ms = s.max_loop_lag_ms
    out.mean_requested_input_tokens = s.mean_requested_input_tokens
    out.mean_input_tokens = s.mean_input_tokens
    out.mean_requested_output_tokens = s.mean_requested_output_tokens
    out.mean_output_tokens = s.mean_output_tokens
    fleet = s.fleet
    if fleet is not None:
        out.start_skew_ms, out.requests_lost, out.agents_lost = (
            fleet.start_skew_ms, fleet.requests_lost, fleet.agents_lost)
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
                endpoint=x.endpoint, name=x.name, kind=x.kind, role=x.role,  # type: ignore[arg-type]
                points=[run_pb2.ServerMetricPoint(second=sec, value=v) for sec, v in x.points],
            )
            for x in m.series
        ],
        cross_checks=[
            run_pb2.ServerCrossCheck(
                quantity=c.quantity, server_metrics=c.server_metrics, client_value=c.client_value,
                server_value=c.server_value, difference_percent=c.difference_percent,
                tolerance_percent=c.tolerance_percent, mismatch=c.mismatch, window_complete=c.window_complete,
                message=c.message,
            )
            for c in m.cross_checks
        ],
        errors=[
            run_pb2.ServerScrapeError(endpoint=e.endpoint, message=e.message, count=e.count,
                                      first_time=timestamp(e.first_ns), last_time=timestamp(e.last_ns))
            for e in m.errors
        ],
        scrapes_ok=m.scrapes_ok, scrapes_failed=m.scrapes_failed, series_truncated=m.series_truncated,
    )  # fmt: skip


def result_message(record: RunRecord, outcome: RunOutcome) -> run_pb2.RunResult:
    out = run_pb2.RunResult(
        run_id=record.run_id,
        state=record.state,  # type: ignore[arg-type]
        stages=[stage_message(s) for s in outcome.stages],
        verdict=outcome.verdict,  # type: ignore[arg-type]
        checks=[check_message(c) for c in outcome.checks],
    )
    if outcome.overall is not None:
        overall = _stage_fields(outcome.overall)
        overall.name = "run"
        del overall.time_series[:]
        out.overall.CopyFrom(overall)
    return out


def live_message(s: LiveSnapshot) -> run_service_pb2.LiveStats:
    return run_service_pb2.LiveStats(
        window_s=s.window_s,
        request_throughput=s.request_throughput,
        output_token_throughput=s.output_token_throughput,
        ttft_p50_ms=s.ttft_p50_ms,
        ttft_p99_ms=s.ttft_p99_ms,
        stage_elapsed_s=s.stage_elapsed_s,
        stage_planned_s=s.stage_planned_s,
        stage_requests_done=s.stage_requests_done,
        stage_requests_planned=s.stage_requests_planned,
    )


def event_message(e: EventRecord) -> run_service_pb2.RunEvent:
    return run_service_pb2.RunEvent(time=timestamp(e.time_ns), kind=e.kind, message=e.message)


def agent_message(s: AgentSession) -> run_pb2.Agent:
    return run_pb2.Agent(
        session_id=s.session_id,
        name=s.name,
        labels=s.labels,
        version=s.version,
        connect_time=timestamp(s.connected_at_ns),
        last_heartbeat_time=timestamp(s.last_heartbeat_ns),
        health=run_pb2.AgentHealth(
            event_loop_lag_ms=s.health.event_loop_lag_ms,
            cpu_percent=s.health.cpu_percent,
            in_flight=s.health.in_flight,
        ),
        run_id=s.run_id,
        assignment_id=s.assignment_id,
        clock_offset_ms=s.clock.offset_ns / 1e6,
        clock_rtt_ms=s.clock.rtt_ns / 1e6 if s.clock.rtt_ns is not None else 0.0,
    )


EXPORT_SCHEMA_VERSION = 1
_USAGE_FLAG, _WARMUP_FLAG = 1, 2


def exported_sample(row: tuple[object, ...]) -> run_service_pb2.ExportedSample:
    """A row of repository.export_page as the versioned export message."""
    (_, stage, agent, sent, queue, first_byte, first_token, last_token, done, prompt, output, status, flags,
     itl_count, error, agent_session) = row  # fmt: skip
    flags_i = int(flags)  # type: ignore[call-overload]

    def ms(ns: object) -> float:
        return int(ns) / 1e6  # type: ignore[call-overload, no-any-return]

    return run_service_pb2.ExportedSample(
        stage_index=int(stage), agent_name=str(agent), sent_unix_ns=int(sent),  # type: ignore[call-overload]
        queue_delay_ms=ms(queue), first_byte_ms=ms(first_byte), ttft_ms=ms(first_token),
        e2e_ms=ms(last_token or done), done_ms=ms(done), prompt_tokens=int(prompt),  # type: ignore[call-overload]
        output_tokens=int(output), status=int(status),  # type: ignore[call-overload]
        usage_reported=bool(flags_i & _USAGE_FLAG), warmup=bool(flags_i & _WARMUP_FLAG),
        itl_count=int(itl_count), error=str(error), agent_session=str(agent_session),  # type: ignore[call-overload]
    )  # fmt: skip


def compare_message(baseline: str, comparisons: list[RunComparison]) -> run_service_pb2.CompareRunsResponse:
    return run_service_pb2.CompareRunsResponse(
        baseline_run_id=baseline,
        comparisons=[
            run_service_pb2.RunComparison(
                run_id=c.run_id,
                regressed=c.regressed,
                stages=[
                    run_service_pb2.StageComparison(
                        load=s.load, baseline_stage_index=s.baseline_stage_index, stage_index=s.stage_index,
                        metrics=[
                            run_service_pb2.MetricDelta(
                                metric=m.metric, baseline=m.baseline, value=m.value, delta=m.delta,
                                delta_percent=m.delta_percent, regressed=m.regressed,
                            )
                            for m in s.metrics
                        ],
                    )
                    for s in c.stages
                ],
            )
            for c in comparisons
        ],
    )  # fmt: skip
