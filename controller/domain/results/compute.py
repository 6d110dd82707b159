"""Run results computed from the stored samples: per stage, per agent, SLO goodput, checks
and the run's verdict, whether the load generator itself was saturated, whether the target
kept up (`controller.domain.results.target_saturation`), and the warnings a reader should see
(requests retried on fresh connections, the preflight's run events).

Runs inside one snapshot of the store (`SampleStore.read_snapshot`; over SQLite, on a
read-pool thread): pure numpy over one read of the samples per stage.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import structlog

from common.codes import AssignmentState, RequestStatus, RunState, SampleFlag
from common.durations import millis_if_set
from common.metrics import SampleColumns, Slo, StageMetrics, compute_stage_metrics, counted_mask
from common.proto.loadtest.v1 import run_pb2
from common.search_outcome import capacity_number
from controller.domain.execution.preflight import TOKENS_EVENT as PREFLIGHT_TOKENS_EVENT
from controller.domain.execution.preflight import WARNING_EVENT as PREFLIGHT_WARNING_EVENT
from controller.domain.execution.preflight import token_accounting
from controller.domain.execution.search import (
    ProbeJudgement,
    ProbeMeasurement,
    SearchSettings,
    SearchStop,
    bracket,
    judge_probes,
    plan_next,
    stage_load,
)
from controller.domain.results import sample_limits as limits
from controller.domain.results.checks import ParsedCheck, parse_check
from controller.domain.results.server_metrics import ServerStageOutcome, stage_server_metrics
from controller.domain.results.stage_split import stage_and_agent_metrics
from controller.domain.results.target_saturation import NOT_SATURATED, TargetSaturation, target_saturation
from controller.domain.spec import parse_spec
from controller.store import repository as repo
from controller.store.interface import SnapshotReads

# A load generator whose event loop ran this late, or whose open-loop requests went out this
# late (p99 of sent - scheduled, no concurrency cap), measured itself as much as the target.
SATURATION_LOOP_LAG_MS = 50.0
SATURATION_SEND_LAG_P99_MS = 50.0
SATURATION_CPU_PERCENT = 95.0
# A stage where at least this fraction of requests met a kept-alive connection the server had
# closed gets a warning: such a server closes its connections after (most) responses.
RETRIED_WARNING_FRACTION = 0.1
# How many earlier runs a resumed search's probes are looked up through (each resumes the next).
MAX_RESUME_CHAIN = 16

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class CheckOutcome:
    expression: str
    stage_index: int
    passed: bool
    measured: float
    threshold: float
    message: str
    run_level: bool = False


@dataclass(frozen=True)
class StageOutcome:
    index: int
    name: str
    concurrency: int
    request_rate: float
    metrics: StageMetrics
    agents: list[tuple[str, StageMetrics]]
    checks: list[CheckOutcome]
    saturated: bool = False
    saturation_reason: str = ""
    max_loop_lag_ms: float = 0.0
    mean_requested_input_tokens: float = 0.0
    mean_input_tokens: float = 0.0
    mean_requested_output_tokens: float = 0.0
    mean_output_tokens: float = 0.0
    fleet: StageFleet | None = None
    server_metrics: ServerStageOutcome | None = None
    target: TargetSaturation = NOT_SATURATED
    samples_ignored: int = 0
    samples_ignored_reason: str = ""
    requests_retried: int = 0


@dataclass(frozen=True)
class StageFleet:
    """How the agents of a stage fared: start skew, losses, per-agent sessions and starts."""

    start_skew_ms: float = 0.0
    requests_lost: int = 0
    agents_lost: int = 0
    reduced_load_reason: str = ""
    agent_sessions: dict[str, str] = field(default_factory=dict)
    agent_start_offset_ms: dict[str, float] = field(default_factory=dict)


def stage_fleet(reads: SnapshotReads, run_pk: int, stage_idx: int) -> StageFleet:
    """Start skew over the stage's initial assignments (controller clock) and the requests
    that lost agents sent but never reported (replayed late batches reduce the count)."""
    rows = reads.stage_assignments(run_pk, stage_idx)
    starts = [r.started_ns for r in rows if not r.takeover and r.started_ns]
    skew_ms = (max(starts) - min(starts)) / 1e6 if len(starts) > 1 else 0.0
    lost = [r for r in rows if r.state == AssignmentState.LOST]
    sessions: dict[str, list[str]] = {}
    offsets: dict[str, float] = {}
    for r in rows:
        names = sessions.setdefault(r.agent_name, [])
        if r.agent_session not in names:
            names.append(r.agent_session)
        if not r.takeover and r.started_ns and r.planned_start_ns and r.agent_name not in offsets:
            offsets[r.agent_name] = (r.started_ns - r.planned_start_ns) / 1e6
    return StageFleet(
        start_skew_ms=skew_ms,
        requests_lost=sum(max(0, r.requests_sent - r.stored_samples) for r in lost),
        agents_lost=len({r.agent_session for r in lost}),
        reduced_load_reason=reads.stage_reduced_load_reason(run_pk, stage_idx),
        agent_sessions={k: ",".join(v) for k, v in sessions.items()},
        agent_start_offset_ms=offsets,
    )


@dataclass(frozen=True)
class RunOutcome:
    stages: list[StageOutcome]
    checks: list[CheckOutcome]
    verdict: int
    # Every counted sample of every stage together (None when the run has no samples).
    overall: StageMetrics | None = None
    warnings: list[str] = field(default_factory=list)
    capacity: CapacityOutcome | None = None
    tokens: run_pb2.TokenAccounting | None = None


def slo_of(spec: run_pb2.RunSpec) -> Slo | None:
    if not spec.HasField("slo"):
        return None
    s = spec.slo
    slo = Slo(ttft_ms=millis_if_set(s, "ttft"), tpot_ms=millis_if_set(s, "tpot"), e2e_ms=millis_if_set(s, "e2e"))
    return slo if any(v is not None for v in (slo.ttft_ms, slo.tpot_ms, slo.e2e_ms)) else None


def _mean_known(values: np.ndarray) -> float:
    known = values[values > 0]
    return float(known.mean()) if known.size else 0.0


def _saturation(stage: run_pb2.Stage, m: StageMetrics, lag_ms: float, cpu: float) -> tuple[bool, str]:
    reasons = []
    if lag_ms > SATURATION_LOOP_LAG_MS:
        reasons.append(f"agent event-loop lag reached {lag_ms:.0f} ms (> {SATURATION_LOOP_LAG_MS:g} ms)")
    if cpu > SATURATION_CPU_PERCENT:
        reasons.append(f"agent CPU reached {cpu:.0f}% of a core (> {SATURATION_CPU_PERCENT:g}%)")
    # A trace replay sends at the trace's times, uncapped: as an open loop does.
    open_uncapped = stage.WhichOneof("load") in ("request_rate", "trace_replay") and not stage.max_concurrency
    if open_uncapped and m.queue_delay.p99 > SATURATION_SEND_LAG_P99_MS:
        reasons.append(
            f"p99 send lag {m.queue_delay.p99:.0f} ms (> {SATURATION_SEND_LAG_P99_MS:g} ms) with no concurrency cap"
        )
    return bool(reasons), "; ".join(reasons)


def admissible_samples(data: repo.StageSamples, now_ns: int) -> tuple[repo.StageSamples, int, str]:
    """The stage's samples without those outside controller/domain/results/sample_limits.py, how many
    were left out and why. Ingest refuses such samples; stored ones come from older versions,
    and left in, one of them can make the per-second series as long as it likes."""
    cols = data.columns
    if not len(cols):
        return data, 0, ""
    slack = limits.SLACK_NS
    # Each assignment's window in its agent's clock: from its creation to its end (else the
    # stage's, else now), widened by the slack, as ingest checks it.
    lo = np.array([start - slack - offset for start, _, offset in data.windows], dtype=np.int64)
    hi = np.array(
        [
            (end if end is not None else data.stage_ended_at or now_ns) + slack - offset
            for _, end, offset in data.windows
        ],
        dtype=np.int64,
    )
    columns = {name: getattr(cols, name) for name in repo.SAMPLE_COLUMNS if hasattr(cols, name)}
    columns |= {
        "first_byte_ns": data.first_byte_ns,
        "requested_input_tokens": data.requested_input_tokens,
        "requested_output_tokens": data.requested_output_tokens,
    }
    bad = np.zeros(len(cols), dtype=np.bool_)
    rules: list[str] = []
    for rule, broken in limits.violations(columns, cols.itl_ns, lo[data.assignment], hi[data.assignment]):
        rules.append(f"{rule} ({int(broken.sum())})")
        bad |= broken
    ignored = int(bad.sum())
    if not ignored:
        return data, 0, ""
    keep = ~bad
    kept = dataclasses.replace(
        data,
        columns=cols.select(keep),
        agent=data.agent[keep],
        assignment=data.assignment[keep],
        requested_input_tokens=data.requested_input_tokens[keep],
        requested_output_tokens=data.requested_output_tokens[keep],
        first_byte_ns=data.first_byte_ns[keep],
    )
    return (
        kept,
        ignored,
        f"{ignored} stored samples are impossible for this stage and were left out: " + "; ".join(rules),
    )


def compute_stage_outcome(
    reads: SnapshotReads, run_pk: int, spec: run_pb2.RunSpec, idx: int, slo: Slo | None, checks: list[ParsedCheck]
) -> tuple[StageOutcome, SampleColumns]:
    """One stage's outcome from its stored samples (and those samples' columns)."""
    stage = spec.stages[idx] if idx < len(spec.stages) else run_pb2.Stage()
    data, ignored, ignored_reason = admissible_samples(reads.load_stage_samples(run_pk, idx), time.time_ns())
    if ignored:
        log.warning("stored_samples_ignored", run_pk=run_pk, stage=idx, samples=ignored, reason=ignored_reason)
    cols = data.columns
    metrics, agents = stage_and_agent_metrics(data, slo)
    outcomes = []
    for check in checks:
        if check.run_level:
            continue
        passed, measured, message = check.evaluate(metrics)
        outcomes.append(CheckOutcome(check.expression, idx, passed, measured, check.threshold, message))
    saturated, why = _saturation(stage, metrics, data.max_loop_lag_ms, data.max_cpu_percent)
    counted = counted_mask(cols.flags)
    ok = counted & (cols.status == RequestStatus.OK)
    server = stage_server_metrics(reads, run_pk, idx, spec.server_metrics, cols)
    retried = int(np.count_nonzero(counted & ((cols.flags & SampleFlag.RETRIED) != 0)))
    outcome = StageOutcome(
        index=idx,
        name=stage.name,
        concurrency=stage.concurrency,
        request_rate=stage.request_rate,
        metrics=metrics,
        agents=agents,
        checks=outcomes,
        saturated=saturated,
        saturation_reason=why,
        max_loop_lag_ms=data.max_loop_lag_ms,
        mean_requested_input_tokens=_mean_known(data.requested_input_tokens[counted]),
        mean_input_tokens=_mean_known(cols.prompt_tokens[ok]),
        mean_requested_output_tokens=_mean_known(data.requested_output_tokens[counted]),
        mean_output_tokens=float(cols.output_tokens[ok].mean()) if ok.any() else 0.0,
        fleet=stage_fleet(reads, run_pk, idx),
        server_metrics=server,
        target=target_saturation(stage, metrics, cols, server),
        samples_ignored=ignored,
        samples_ignored_reason=ignored_reason,
        requests_retried=retried,
    )
    return outcome, cols


def compute_run_result(reads: SnapshotReads, run_pk: int, spec: run_pb2.RunSpec, state: int) -> RunOutcome:
    slo = slo_of(spec)
    checks = [parse_check(c.expression, c.abort_on_fail) for c in spec.checks]
    stages: list[StageOutcome] = []
    every_stage: list[SampleColumns] = []
    for idx in reads.stage_indexes_with_samples(run_pk):
        outcome, cols = compute_stage_outcome(reads, run_pk, spec, idx, slo, checks)
        stages.append(outcome)
        every_stage.append(cols)
    capacity = None
    if spec.HasField("search"):
        carried = carried_probes(reads, spec.search.resume_from_run_id) if spec.search.resume_from_run_id else []
        capacity = capacity_outcome(spec, state, stages, carried)
    all_checks = [c for s in stages for c in s.checks]
    for check in checks:
        if check.run_level:
            # The same number `runs compare` and the CLI use: none when the generator saturated.
            value = capacity_number(capacity.highest_passing, capacity.stop_reason) if capacity is not None else None
            passed, measured, message = check.evaluate_value(value)
            all_checks.append(CheckOutcome(check.expression, 0, passed, measured, check.threshold, message, True))
    if not checks:
        verdict = run_pb2.VERDICT_NONE
    elif all(c.passed for c in all_checks) and all_checks and state == RunState.SUCCEEDED:
        verdict = run_pb2.VERDICT_PASS
    else:
        verdict = run_pb2.VERDICT_FAIL
    overall = None
    if every_stage:
        overall = (
            stages[0].metrics
            if len(every_stage) == 1
            else compute_stage_metrics(SampleColumns.concat(every_stage), slo)
        )
    token_events = [e.message for e in reads.list_events(run_pk) if e.kind == PREFLIGHT_TOKENS_EVENT]
    tokens = token_accounting(spec, token_events)
    return RunOutcome(stages, all_checks, verdict, overall, run_warnings(reads, run_pk, stages), capacity, tokens)


@dataclass(frozen=True)
class ProbeRow:
    """One probe as the result shows it: its stage (-1: carried over) and its judgement."""

    stage_index: int
    judgement: ProbeJudgement
    metrics: StageMetrics | None


@dataclass(frozen=True)
class CapacityOutcome:
    variable: int
    goodput_target_percent: float
    highest_passing: float | None
    lowest_failing: float | None
    stop_reason: int
    stop_message: str
    probes: list[ProbeRow]
    request_throughput: float = 0.0
    output_token_throughput: float = 0.0
    cost_per_million_output_tokens_usd: float | None = None
    confident: bool = False


@dataclass(frozen=True)
class StoredProbe:
    """A probe of an earlier run, with what the judgement and the result need of it."""

    measurement: ProbeMeasurement
    metrics: StageMetrics | None


def probe_measurement(
    spec: run_pb2.RunSpec, idx: int, stage: StageOutcome | None, complete: bool, why: str = ""
) -> ProbeMeasurement:
    """What the judgement needs of one probe's stage (None: the stage stored no samples)."""
    load = stage_load(spec.stages[idx]) if idx < len(spec.stages) else 0.0
    if stage is None:
        return ProbeMeasurement(load, 1, 0, 0, 0, complete=complete, incomplete_reason=why)
    m = stage.metrics
    n = m.requests_ok + m.requests_failed
    reduced = stage.fleet.reduced_load_reason if stage.fleet is not None else ""
    return ProbeMeasurement(
        load,
        max(1, len(stage.agents)),
        n,
        round((m.good_fraction or 0.0) * n),
        m.requests_failed,
        stage.saturated,
        stage.saturation_reason,
        complete and not reduced,
        why or reduced,
    )


def run_probes(spec: run_pb2.RunSpec, state: int, stages: list[StageOutcome]) -> list[StoredProbe]:
    """The run's probes from its stages. The last one of a run that is still running, or that
    did not succeed, ended early (it proves nothing)."""
    by_index = {s.index: s for s in stages}
    ended_early = state != RunState.SUCCEEDED
    out = []
    why = "the run is still running" if state == RunState.RUNNING else f"the run ended {_state_word(state)}"
    for idx in range(len(spec.stages)):
        cut_short = ended_early and idx == len(spec.stages) - 1
        stage = by_index.get(idx)
        measurement = probe_measurement(spec, idx, stage, not cut_short, why if cut_short else "")
        out.append(StoredProbe(measurement, stage.metrics if stage is not None else None))
    return out


def carried_probes(reads: SnapshotReads, run_id: str, depth: int = 0) -> list[StoredProbe]:
    """The probes of the run a search resumes (its own carried ones first), from stored samples."""
    record = reads.get_run(run_id)
    if record is None or depth > MAX_RESUME_CHAIN:
        return []
    spec = parse_spec(record)
    if not spec.HasField("search"):
        return []
    earlier = carried_probes(reads, spec.search.resume_from_run_id, depth + 1) if spec.search.resume_from_run_id else []
    slo = slo_of(spec)
    indexes = reads.stage_indexes_with_samples(record.pk)
    stages = [compute_stage_outcome(reads, record.pk, spec, idx, slo, [])[0] for idx in indexes]
    return earlier + run_probes(spec, record.state, stages)


def capacity_outcome(
    spec: run_pb2.RunSpec, state: int, stages: list[StageOutcome], carried: list[StoredProbe]
) -> CapacityOutcome:
    """The search's outcome, replaying the judgement and the planner over its probes."""
    settings = SearchSettings.of(spec.search, len(carried))
    own = run_probes(spec, state, stages)
    probes = carried + own
    judged = judge_probes(settings, [p.measurement for p in probes])
    indexes = [-1] * len(carried) + list(range(len(own)))
    rows = [ProbeRow(i, j, p.metrics) for i, j, p in zip(indexes, judged, probes, strict=True)]
    b = bracket(judged)
    reason: int
    if state == RunState.RUNNING:
        reason, message = run_pb2.SEARCH_STOP_REASON_UNSPECIFIED, "the search is running"
    else:
        last_agents = judged[-1].agents if judged else 1
        step = plan_next(settings, judged, agents=last_agents, available_agents=last_agents)
        if isinstance(step, SearchStop):
            reason, message = step.reason, step.message
        else:
            reason = run_pb2.SEARCH_STOP_REASON_RUN_ENDED
            message = f"the run ended {_state_word(state)} before the search did"
    hp, lf = b.highest_passing, b.lowest_failing
    throughput = tokens = 0.0
    if hp is not None:
        at = [r for r in rows if r.judgement.load == hp.load and r.metrics is not None]
        if at:
            metrics = at[-1].metrics
            assert metrics is not None
            throughput, tokens = metrics.request_throughput, metrics.output_token_throughput
    cost = None
    if spec.search.HasField("cost_per_hour_usd") and tokens > 0:
        cost = spec.search.cost_per_hour_usd / (tokens * 3600) * 1e6
    confident = all(j.confident for j in (hp, lf) if j is not None) and (hp is not None or lf is not None)
    return CapacityOutcome(
        settings.variable,
        settings.target * 100,
        hp.load if hp else None,
        lf.load if lf else None,
        reason,
        message,
        rows,
        throughput,
        tokens,
        cost,
        confident,
    )


def _state_word(state: int) -> str:
    return run_pb2.RunState.Name(state).removeprefix("RUN_STATE_").lower()  # type: ignore[arg-type]


def run_warnings(reads: SnapshotReads, run_pk: int, stages: list[StageOutcome]) -> list[str]:
    """The result's warnings: stages whose server closed kept-alive connections under many of
    their requests, then the preflight's warnings (run events)."""
    warnings = []
    for s in stages:
        total = s.metrics.requests_ok + s.metrics.requests_failed
        if total and s.requests_retried >= RETRIED_WARNING_FRACTION * total:
            warnings.append(
                f"stage {s.index}: the server had closed the kept-alive connection of {s.requests_retried} of "
                f"{total} requests ({s.requests_retried / total:.0%}) before they were answered; they were sent "
                "again on fresh connections (a server that closes connections after responding while advertising "
                "keep-alive, as llama-server does: every request may pay for a new connection)"
            )
    warnings += [e.message for e in reads.list_events(run_pk) if e.kind == PREFLIGHT_WARNING_EVENT]
    return warnings
