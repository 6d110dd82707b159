"""Packing domain values into API messages (and nothing else)."""

from __future__ import annotations

from google.protobuf import json_format, timestamp_pb2

from common.metrics import LatencySummary
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from controller.domain.agents import AgentSession
from controller.domain.live import LiveSnapshot
from controller.domain.runs import StageOutcome
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
    json_format.Parse(record.spec_json, run.spec)
    run.spec.target.api_key = ""  # never stored in spec_json; cleared again on principle
    for name, ns in (("create_time", record.created_at), ("start_time", record.started_at),
                     ("end_time", record.ended_at)):  # fmt: skip
        ts = timestamp(ns)
        if ts is not None:
            getattr(run, name).CopyFrom(ts)
    return run


def latency_message(s: LatencySummary) -> run_pb2.LatencyStats:
    return run_pb2.LatencyStats(
        count=s.count, mean_ms=s.mean, std_ms=s.std, min_ms=s.min, max_ms=s.max,
        p50_ms=s.p50, p90_ms=s.p90, p95_ms=s.p95, p99_ms=s.p99, p999_ms=s.p999,
    )  # fmt: skip


def stage_message(s: StageOutcome) -> run_pb2.StageResult:
    m = s.metrics
    return run_pb2.StageResult(
        index=s.index,
        name=s.name,
        concurrency=s.concurrency,
        request_rate=s.request_rate,
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
    )


def result_message(record: RunRecord, stages: list[StageOutcome]) -> run_pb2.RunResult:
    return run_pb2.RunResult(
        run_id=record.run_id,
        state=record.state,  # type: ignore[arg-type]
        stages=[stage_message(s) for s in stages],
    )


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
    )
