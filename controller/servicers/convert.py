"""Packing domain values into API messages (and nothing else). A run's result is packed in the
domain (controller/domain/results/message.py): it is stored as that message."""

from __future__ import annotations

from typing import Final

from common.codes import SampleFlag
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from controller.domain.baselines import SeriesHistory
from controller.domain.execution.agents import AgentSession
from controller.domain.results.compare import CapacityDelta, Comparison, MetricDelta
from controller.domain.results.live import LiveSnapshot
from controller.domain.results.message import timestamp
from controller.domain.spec import MAX_NAME_CHARS, MAX_STORED_SPEC_BYTES, parse_spec
from controller.store.baselines import BaselineRecord
from controller.store.repository import EventRecord, RunRecord, listed_bytes


def run_message(record: RunRecord) -> run_pb2.Run:
    return fill_run(run_pb2.Run(), record)


def fill_run(run: run_pb2.Run, record: RunRecord) -> run_pb2.Run:
    """Set `run` (empty; e.g. `response.runs.add()`, which saves copying a built Run into the
    response: half of a ListRuns page's conversion) from the stored record."""
    run.id = record.run_id
    run.state = record.state  # type: ignore[assignment]
    run.state_reason = record.state_reason
    run.current_stage = record.current_stage
    run.progress.requests_ok = record.requests_ok
    run.progress.requests_failed = record.requests_failed
    run.progress.output_tokens = record.output_tokens
    if record.group_id:
        run.group_id, run.repeat_index = record.group_id, record.repeat_index
    parse_spec(record, into=run.spec)
    run.spec.target.api_key = ""  # never stored in spec_json; cleared again on principle
    # Seconds and nanos set directly: Timestamp.FromNanoseconds is pure Python and was a third
    # of a ListRuns page's cost. Times are positive (ns since the epoch), as `timestamp` assumes.
    for ts, ns in (
        (run.create_time, record.created_at),
        (run.start_time, record.started_at),
        (run.end_time, record.ended_at),
    ):
        if ns:
            ts.seconds, ts.nanos = divmod(ns, 1_000_000_000)
    return run


def group_message(records: list[RunRecord]) -> run_pb2.RunGroup:
    """A new group (CreateRun's answer): its id and runs; none is counted yet."""
    return run_pb2.RunGroup(id=records[0].group_id, run_ids=[r.run_id for r in records])


def list_response(records: list[RunRecord], next_page_token: str) -> run_service_pb2.ListRunsResponse:
    """A ListRuns page. A run stored before specs had a size limit, with a spec above it, is
    listed without its labels (or, if still too big, with only its name and model): one such
    run must not make every page that holds it too big to send. GetRun shows it in full."""
    response = run_service_pb2.ListRunsResponse(next_page_token=next_page_token)
    for record in records:
        run = fill_run(response.runs.add(), record)
        if listed_bytes(record) > MAX_STORED_SPEC_BYTES:
            run.spec.ClearField("labels")
            if run.spec.ByteSize() > MAX_STORED_SPEC_BYTES:
                kept = run_pb2.RunSpec(display_name=run.spec.display_name[:MAX_NAME_CHARS])
                kept.target.model = run.spec.target.model[:MAX_NAME_CHARS]
                run.spec.CopyFrom(kept)
    return response


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
# Plain ints: `IntFlag` arithmetic costs ~20x int's, and an export tests these for every sample.
_USAGE_FROM_SERVER: Final = int(SampleFlag.USAGE_FROM_SERVER)
_WARMUP: Final = int(SampleFlag.WARMUP)
# SampleBatch.flags bits 3 and 4 (common.codes.SampleFlag.CACHED_REPORTED / LAST_TURN).
_CACHED_REPORTED: Final = 1 << 3
_LAST_TURN: Final = 1 << 4


def exported_sample(row: tuple[object, ...]) -> run_service_pb2.ExportedSample:
    """A row of repository.export_page as the versioned export message."""
    (
        _,
        stage,
        agent,
        sent,
        queue,
        first_byte,
        first_token,
        last_token,
        done,
        prompt,
        output,
        status,
        flags,
        itl_count,
        error,
        agent_session,
        *extra,
    ) = row
    flags_i = int(flags)  # type: ignore[call-overload]
    # The columns after the session (columnar.EXPORT_EXTRA_COLUMNS); a row without them reads as 0s.
    first_reasoning, first_answer, reasoning, cached, session_id, turn = (*extra, 0, 0, 0, 0, 0, 0)[:6]

    def ms(ns: object) -> float:
        return int(ns) / 1e6  # type: ignore[call-overload, no-any-return]

    return run_service_pb2.ExportedSample(
        stage_index=int(stage),  # type: ignore[call-overload]
        agent_name=str(agent),
        sent_unix_ns=int(sent),  # type: ignore[call-overload]
        queue_delay_ms=ms(queue),
        first_byte_ms=ms(first_byte),
        ttft_ms=ms(first_token),
        e2e_ms=ms(last_token or done),
        done_ms=ms(done),
        prompt_tokens=int(prompt),  # type: ignore[call-overload]
        output_tokens=int(output),  # type: ignore[call-overload]
        status=int(status),  # type: ignore[call-overload]
        usage_reported=bool(flags_i & _USAGE_FROM_SERVER),
        warmup=bool(flags_i & _WARMUP),
        itl_count=int(itl_count),  # type: ignore[call-overload]
        error=str(error),
        agent_session=str(agent_session),
        first_reasoning_ms=ms(first_reasoning),
        first_answer_ms=ms(first_answer),
        reasoning_tokens=int(reasoning),  # type: ignore[call-overload]
        cached_prompt_tokens=int(cached),  # type: ignore[call-overload]
        cached_reported=bool(flags_i & _CACHED_REPORTED),
        session_id=int(session_id),  # type: ignore[call-overload]
        turn_index=int(turn),  # type: ignore[call-overload]
        last_turn=bool(flags_i & _LAST_TURN),
    )


def compare_message(comparison: Comparison) -> run_service_pb2.CompareRunsResponse:
    return run_service_pb2.CompareRunsResponse(
        baseline_run_id=comparison.baseline_run_id,
        confidence_percent=comparison.confidence_percent,
        outcome=comparison.outcome,  # type: ignore[arg-type]
        comparisons=[
            run_service_pb2.RunComparison(
                run_id=c.run_id,
                regressed=c.regressed,
                outcome=c.outcome,  # type: ignore[arg-type]
                stages=[
                    run_service_pb2.StageComparison(
                        load=s.load,
                        baseline_stage_index=s.baseline_stage_index,
                        stage_index=s.stage_index,
                        metrics=[_metric_delta(m) for m in s.metrics],
                        outcome=s.outcome,  # type: ignore[arg-type]
                    )
                    for s in c.stages
                ],
                capacity=_capacity_comparison(c.capacity),
            )
            for c in comparison.runs
        ],
    )


def _metric_delta(m: MetricDelta) -> run_service_pb2.MetricDelta:
    return run_service_pb2.MetricDelta(
        metric=m.metric,
        baseline=m.baseline,
        value=m.value,
        delta=m.delta,
        delta_percent=m.delta_percent,
        regressed=m.regressed,
        delta_ci=run_pb2.Interval(low=m.delta_ci[0], high=m.delta_ci[1]) if m.delta_ci is not None else None,
        p_value=m.p_value,
        p_adjusted=m.p_adjusted,
        outcome=m.outcome,  # type: ignore[arg-type]
        requests_needed=m.requests_needed,
        repeats_needed=m.repeats_needed,
        note=m.note,
    )


def _capacity_comparison(delta: CapacityDelta | None) -> run_service_pb2.CapacityComparison | None:
    if delta is None:
        return None
    return run_service_pb2.CapacityComparison(
        variable=delta.variable,  # type: ignore[arg-type]
        baseline=delta.baseline,
        value=delta.value,
        delta_percent=delta.delta_percent,
        regressed=delta.regressed,
        note=delta.note,
        outcome=delta.outcome,  # type: ignore[arg-type]
    )


def baseline_message(record: BaselineRecord) -> run_service_pb2.Baseline:
    return run_service_pb2.Baseline(
        name=record.name,
        run_id=record.run_id,
        set_time=timestamp(record.set_at_ns),
        set_by_key_id=record.set_by_key_id,
    )


def history_message(history: SeriesHistory) -> run_service_pb2.GetSeriesHistoryResponse:
    response = run_service_pb2.GetSeriesHistoryResponse(
        name=history.name,
        metric=history.metric,
        load=history.load,
        confidence_percent=history.confidence_percent,
    )
    if history.baseline is not None:
        response.baseline.CopyFrom(baseline_message(history.baseline))
    for p in history.points:
        point = response.points.add(
            run_id=p.run_id,
            create_time=timestamp(p.created_at),
            label_value=p.label_value,
            state=p.state,
            baseline=p.baseline,
            stage_index=p.stage_index,
        )
        if p.value is not None:
            point.value = p.value
        if p.ci is not None:
            point.ci.CopyFrom(p.ci)
    return response
