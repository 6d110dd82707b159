"""Whether the target kept up with an open-loop stage (target saturation).

A closed-loop stage adapts its load to the server, so only open-loop stages (`request_rate`)
are judged. Three tests, any of which flags the stage:

1. **Rate.** The requests that completed ok fall short of the requested rate beyond Poisson
   noise: with `expected = rate x planned counted duration` (less what a ramp misses), flagged when
   `expected - ok > 3 x sqrt(expected)`. A concurrency cap that held arrivals back past the
   stage's end, or requests failing under load, show here.
2. **Overrun.** The stage ran (first counted send to last completion, `duration_s`) longer than
   its planned counted duration plus a drain allowance: `DRAIN_S` + 2 x (the smallest TTFT +
   the 90th percentile of a request's generation time, E2E - TTFT). A server that queues
   requests it cannot serve makes the last ones wait: their TTFT grows, their generation does
   not, so queueing cannot widen its own allowance. A stage bounded by a request count has no
   planned duration; it is judged against `requests / rate`, plus 3 x sqrt(requests) / rate
   for the spread of Poisson arrivals.
3. **Waiting requests rising** (when the server's metrics were scraped): the mean of a
   waiting-requests gauge (`waiting_requests` role of the mapping table) over the last quarter
   of the planned counted duration exceeds its mean over the first quarter by at least
   `WAITING_RISE` requests (the series has one point per second; a quarter spans at least one).

The reason reads "the target did not keep up at rate 2/s: achieved 0.69/s (…)", achieved being
the stage's request throughput (requests ok per second of the stage's measured duration).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from common.durations import seconds
from common.metrics import SampleColumns, StageMetrics, counted_ok_mask
from common.proto.loadtest.v1 import run_pb2
from controller.domain.results.server_metrics import ServerStageOutcome

DRAIN_S = 10.0
DRAIN_FACTOR = 2.0
GENERATION_PERCENTILE = 90.0
POISSON_SIGMAS = 3.0
WAITING_RISE = 2.0


@dataclass(frozen=True)
class TargetSaturation:
    saturated: bool
    reason: str


NOT_SATURATED = TargetSaturation(False, "")


def planned_window(stage: run_pb2.Stage) -> tuple[float, float, bool] | None:
    """(counted duration in s, expected counted requests, duration came from the spec) of an
    open-loop stage; None for a closed-loop one or one without a duration or request budget."""
    if stage.WhichOneof("load") != "request_rate" or stage.request_rate <= 0:
        return None
    rate = stage.request_rate
    spans: list[tuple[float, bool]] = []
    if stage.HasField("duration") and seconds(stage.duration) > 0:
        spans.append((seconds(stage.duration), True))
    if stage.requests:
        spans.append((stage.requests / rate, False))
    if not spans:
        return None
    total, from_duration = min(spans)
    warm = 0.0
    if stage.HasField("warmup_duration"):
        warm = seconds(stage.warmup_duration)
    if stage.warmup_requests:
        warm = max(warm, stage.warmup_requests / rate)
    counted = max(total - warm, 0.0)
    ramp = seconds(stage.ramp) if stage.HasField("ramp") else 0.0
    # The rate rises linearly from 0 over the ramp: the counted part of the ramp, from `warm`
    # to `ramp`, misses (ramp - warm)^2 / (2 ramp) seconds' worth of arrivals.
    missing = (min(ramp, total) - warm) ** 2 / (2 * ramp) if ramp > warm else 0.0
    return counted, max(rate * (counted - missing), 0.0), from_duration


def _drain_allowance(cols: SampleColumns) -> float:
    """DRAIN_S + DRAIN_FACTOR x (smallest TTFT + p90 generation time) of the ok requests."""
    ok = counted_ok_mask(cols.status, cols.flags)
    if not ok.any():
        return DRAIN_S
    first = cols.first_token_ns[ok]
    end = np.where(cols.last_token_ns[ok] > 0, cols.last_token_ns[ok], cols.done_ns[ok])
    has_first = first > 0
    ttft_min = float(first[has_first].min()) / 1e9 if has_first.any() else 0.0
    generation = np.where(has_first, end - first, end).astype(np.float64) / 1e9
    return DRAIN_S + DRAIN_FACTOR * (ttft_min + float(np.percentile(generation, GENERATION_PERCENTILE)))


def _waiting_rise(server: ServerStageOutcome | None, counted_s: float) -> str:
    if server is None or counted_s <= 0:
        return ""
    for s in server.series:
        if s.role != "waiting_requests":
            continue
        # Points are whole seconds: each quarter covers at least one of them.
        early = [v for sec, v in s.points if sec < math.ceil(counted_s / 4)]
        late = [v for sec, v in s.points if math.floor(3 * counted_s / 4) <= sec < math.ceil(counted_s)]
        if not early or not late:
            continue
        before, after = sum(early) / len(early), sum(late) / len(late)
        if after - before >= WAITING_RISE:
            return f"the server's {s.name} rose from {before:.1f} to {after:.1f} over the stage"
    return ""


def target_saturation(
    stage: run_pb2.Stage, m: StageMetrics, cols: SampleColumns, server: ServerStageOutcome | None
) -> TargetSaturation:
    """Whether the target kept up with the stage's requested rate, and why not."""
    window = planned_window(stage)
    if window is None or m.requests_ok + m.requests_failed == 0:
        return NOT_SATURATED
    counted_s, expected, from_duration = window
    reasons = []
    if expected - m.requests_ok > POISSON_SIGMAS * math.sqrt(expected):
        reasons.append(
            f"{m.requests_ok} requests ok of {expected:.0f} expected, more than {POISSON_SIGMAS:g} sigma "
            f"({math.sqrt(expected):.1f}) short"
        )
    allowance = _drain_allowance(cols)
    if not from_duration:
        allowance += POISSON_SIGMAS * math.sqrt(stage.requests) / stage.request_rate
    if m.duration_s > counted_s + allowance:
        reasons.append(
            f"the stage ran {m.duration_s:.1f} s for a planned {counted_s:.1f} s, "
            f"{m.duration_s - counted_s:.1f} s over (drain allowance {allowance:.1f} s)"
        )
    waiting = _waiting_rise(server, counted_s)
    if waiting:
        reasons.append(waiting)
    if not reasons:
        return NOT_SATURATED
    return TargetSaturation(
        True,
        f"the target did not keep up at rate {stage.request_rate:g}/s: achieved {m.request_throughput:.2f}/s ("
        + "; ".join(reasons)
        + ")",
    )
