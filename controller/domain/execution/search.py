"""The capacity search as pure functions (docs/capacity.md, "How the search works"):
judging each probe from what its stage measured (`judge_probes`), and planning the next
probe or the stop from the probes so far (`plan_next`).

Nothing here does I/O or reads a clock: the executor calls it between probes to decide what
to run, and the result computation replays it over the stored stages, so a stored result
and a recomputed one tell the same story.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from common.durations import seconds
from common.proto.loadtest.v1 import run_pb2
from common.search_outcome import DEFAULT_SEARCH_TOLERANCE_PERCENT
from common.stats import proportion_interval

# A probe where more than this share of requests failed: the target errors rather than slows
# down, and a higher load would only fail faster.
TARGET_ERRORS_FRACTION = 0.5
# While every probe passes, the load grows by this factor until one fails (or max is reached).
GROWTH = 2.0
# Interpolated loads are kept within this share of the bracket from either end, so that
# every probe shrinks the bracket by at least this much even when the curve is far from linear.
CLAMP = 0.25

DEFAULT_GOODPUT_TARGET_PERCENT = 95.0
DEFAULT_PROBE_S = 30
DEFAULT_MIN_REQUESTS = 100
DEFAULT_MAX_PROBES = 16
DEFAULT_MIN = 1.0
DEFAULT_MAX = {run_pb2.SEARCH_VARIABLE_CONCURRENCY: 1024.0, run_pb2.SEARCH_VARIABLE_RATE: 1000.0}

CONCURRENCY = run_pb2.SEARCH_VARIABLE_CONCURRENCY
RATE = run_pb2.SEARCH_VARIABLE_RATE


class Verdict(enum.Enum):
    """How one probe (with its repeat, if any) was judged."""

    PASS = "pass"
    FAIL = "fail"
    # Too few requests, or the target within the interval: repeat at the same load.
    UNDECIDED = "undecided"
    # Proves nothing: the generator was saturated or the probe ended early.
    INCONCLUSIVE = "inconclusive"


PROBE_OUTCOME = {
    Verdict.PASS: run_pb2.PROBE_OUTCOME_PASS,
    Verdict.FAIL: run_pb2.PROBE_OUTCOME_FAIL,
    Verdict.UNDECIDED: run_pb2.PROBE_OUTCOME_INCONCLUSIVE,
    Verdict.INCONCLUSIVE: run_pb2.PROBE_OUTCOME_INCONCLUSIVE,
}


def apply_search_defaults(search: run_pb2.SearchSpec) -> None:
    """Fill in the defaults the proto comments state (the one place they are applied)."""
    if not search.HasField("goodput_target_percent"):
        search.goodput_target_percent = DEFAULT_GOODPUT_TARGET_PERCENT
    if not search.min:
        search.min = DEFAULT_MIN
    if not search.max:
        search.max = DEFAULT_MAX.get(search.variable, DEFAULT_MAX[CONCURRENCY])
    if not search.HasField("tolerance_percent"):
        search.tolerance_percent = DEFAULT_SEARCH_TOLERANCE_PERCENT
    if not search.HasField("probe_duration"):
        search.probe_duration.FromSeconds(DEFAULT_PROBE_S)
    if not search.HasField("probe_warmup"):
        search.probe_warmup.FromNanoseconds(int(seconds(search.probe_duration) * 1e9) // 6)
    if not search.min_requests:
        search.min_requests = DEFAULT_MIN_REQUESTS
    if not search.max_probes:
        search.max_probes = DEFAULT_MAX_PROBES


@dataclass(frozen=True)
class SearchSettings:
    """A defaulted SearchSpec in plain numbers (fractions, not percent)."""

    variable: int
    target: float
    min_load: float
    max_load: float
    tolerance: float
    min_requests: int
    max_probes: int

    @classmethod
    def of(cls, search: run_pb2.SearchSpec, carried: int = 0) -> SearchSettings:
        """The settings of a search; `carried` probes of a resumed run do not use up `max_probes`."""
        s = run_pb2.SearchSpec()
        s.CopyFrom(search)
        apply_search_defaults(s)
        return cls(
            s.variable,
            s.goodput_target_percent / 100.0,
            s.min,
            s.max,
            s.tolerance_percent / 100.0,
            s.min_requests,
            s.max_probes + carried,
        )

    @property
    def integer(self) -> bool:
        return self.variable == CONCURRENCY


def probe_stage(search: run_pb2.SearchSpec, load: float, index: int) -> run_pb2.Stage:
    """The stage a probe runs as: `probe_duration` long, its first `probe_warmup` not counted."""
    stage = run_pb2.Stage()
    if search.variable == CONCURRENCY:
        stage.concurrency = round(load)
        stage.name = f"probe {index}: concurrency={round(load)}"
    else:
        stage.request_rate = load
        stage.arrival = search.arrival or run_pb2.ARRIVAL_PROCESS_POISSON
        stage.name = f"probe {index}: rate={load:.4g}/s"
    stage.duration.CopyFrom(search.probe_duration)
    stage.warmup_duration.CopyFrom(search.probe_warmup)
    return stage


def stage_load(stage: run_pb2.Stage) -> float:
    """A probe stage's load level (concurrency or rate)."""
    return float(stage.concurrency) if stage.WhichOneof("load") == "concurrency" else stage.request_rate


@dataclass(frozen=True)
class ProbeMeasurement:
    """What one probe's stage measured, as far as the judgement needs it."""

    load: float
    agents: int
    requests: int  # counted (warmup excluded), failed ones included
    good: int  # of those, the ones that met every SLO
    failed: int
    saturated: bool = False
    saturation_reason: str = ""
    # False when the probe ended early (cancelled, agents lost, still running): it proves nothing.
    complete: bool = True
    incomplete_reason: str = ""


@dataclass(frozen=True)
class ProbeJudgement:
    """One probe as judged; a repeat's figures are over both probes together."""

    load: float
    agents: int
    verdict: Verdict
    requests: int
    good: int
    good_fraction: float
    low: float  # the 95 % Wilson interval of good_fraction
    high: float
    confident: bool
    repeat: bool
    reason: str
    saturated: bool = False
    target_errors: bool = False
    # An undecided probe whose repeat decided it: the repeat carries the judgement.
    superseded: bool = False


def wilson_interval(good: int, n: int) -> tuple[float, float]:
    """The 95 % Wilson score interval of a good fraction; (0, 1) with no trials."""
    return proportion_interval(good, n) or (0.0, 1.0)


def judge_probes(settings: SearchSettings, probes: Sequence[ProbeMeasurement]) -> list[ProbeJudgement]:
    """Every probe judged, in order. A probe too short or within noise of the target is
    UNDECIDED until its repeat (the next probe, at the same load) is judged on both together;
    if both together are still within noise, the point estimate decides and `confident` is false."""
    out: list[ProbeJudgement] = []
    for m in probes:
        prev = out[-1] if out else None
        pair = prev is not None and prev.verdict is Verdict.UNDECIDED and prev.load == m.load
        judged = _judge(settings, m, prev if pair else None)
        if pair and prev is not None and judged.verdict in (Verdict.PASS, Verdict.FAIL):
            out[-1] = dataclasses.replace(
                prev,
                verdict=judged.verdict,
                superseded=True,
                reason=f"{prev.reason}; decided with its repeat: {judged.verdict.value}",
            )
        out.append(judged)
    return out


def _judge(settings: SearchSettings, m: ProbeMeasurement, first: ProbeJudgement | None) -> ProbeJudgement:
    target = settings.target
    n, good = m.requests, m.good
    fraction = good / n if n else 0.0
    low, high = wilson_interval(good, n)
    base = ProbeJudgement(
        m.load,
        m.agents,
        Verdict.INCONCLUSIVE,
        n,
        good,
        fraction,
        low,
        high,
        False,
        first is not None,
        "",
        saturated=m.saturated,
    )
    if n and m.failed > TARGET_ERRORS_FRACTION * n:
        why = f"{m.failed} of {n} requests failed: the target errors at this load"
        return dataclasses.replace(base, verdict=Verdict.FAIL, confident=True, target_errors=True, reason=why)
    if m.saturated:
        why = f"the load generator was saturated ({m.saturation_reason or 'it could not send the load'})"
        return dataclasses.replace(base, reason=why)
    if not m.complete:
        return dataclasses.replace(base, reason=f"ended early ({m.incomplete_reason or 'the run ended'})")
    if first is not None:
        n, good = n + first.requests, good + first.good
        fraction = good / n if n else 0.0
        low, high = wilson_interval(good, n)
        base = dataclasses.replace(base, requests=n, good=good, good_fraction=fraction, low=low, high=high)
    if n == 0:
        return dataclasses.replace(base, reason="no request was counted")
    figures = f"{fraction:.1%} good of {n} (95 % CI {low:.1%}-{high:.1%}), target {target:.1%}"
    if n >= settings.min_requests and not low <= target <= high:
        verdict = Verdict.PASS if low > target else Verdict.FAIL
        return dataclasses.replace(base, verdict=verdict, confident=True, reason=figures)
    if first is None:
        why = f"fewer than {settings.min_requests} requests" if n < settings.min_requests else "within noise"
        return dataclasses.replace(base, verdict=Verdict.UNDECIDED, reason=f"{figures}: {why}, repeated")
    verdict = Verdict.PASS if fraction >= target else Verdict.FAIL
    return dataclasses.replace(base, verdict=verdict, reason=f"{figures}: still within noise, point estimate")


@dataclass(frozen=True)
class Bracket:
    """The decided probes' bracket of the capacity."""

    highest_passing: ProbeJudgement | None
    lowest_failing: ProbeJudgement | None


def bracket(judgements: Sequence[ProbeJudgement]) -> Bracket:
    """The lowest failing load, and the highest passing load below it (a pass above a failure
    is noise on a monotone curve, and the lower reading is the safe one)."""
    decided = [j for j in judgements if not j.superseded]
    fails = [j for j in decided if j.verdict is Verdict.FAIL]
    lowest = min(fails, key=lambda j: j.load, default=None)
    passes = [j for j in decided if j.verdict is Verdict.PASS and (lowest is None or j.load < lowest.load)]
    highest = max(passes, key=lambda j: j.load, default=None)
    return Bracket(highest, lowest)


@dataclass(frozen=True)
class NextProbe:
    load: float
    agents: int
    repeat: bool
    why: str


@dataclass(frozen=True)
class SearchStop:
    reason: int  # SearchStopReason
    message: str


def plan_next(
    settings: SearchSettings, judgements: Sequence[ProbeJudgement], *, agents: int, available_agents: int
) -> NextProbe | SearchStop:
    """The next probe (its load and how many agents run it) or why the search stops.

    `agents` is how many agents the run's probes use now, `available_agents` how many it
    could use (its own and the free matching ones): a saturated generator gets more of them.
    """
    fmt = _fmt(settings)
    last = judgements[-1] if judgements else None
    if last is not None and last.target_errors:
        return SearchStop(
            run_pb2.SEARCH_STOP_REASON_TARGET_ERRORS, f"most requests at {fmt(last.load)} failed ({last.reason})"
        )
    b = bracket(judgements)
    hp, lf = b.highest_passing, b.lowest_failing
    if last is not None and last.saturated:
        prev = judgements[-2] if len(judgements) > 1 else None
        again = prev if prev is not None and prev.saturated and prev.load == last.load else None
        # More agents, unless the last probe already asked for them and did not get to use them.
        if available_agents > last.agents and (again is None or again.agents < last.agents):
            more = min(available_agents, max(last.agents + 1, last.agents * 2))
            return NextProbe(
                last.load,
                more,
                True,
                f"the generator was saturated at {fmt(last.load)} on {last.agents} agent(s): repeated on {more}",
            )
        if again is None:
            # Once may be a stall of the generator's own (its first assignment, a pause): twice is its limit.
            return NextProbe(
                last.load,
                last.agents,
                True,
                f"the generator was saturated at {fmt(last.load)} "
                f"on {last.agents} agent(s) and no other agent is free: repeated once",
            )
        known = f"; the capacity is at least {fmt(hp.load)}" if hp is not None else ""
        return SearchStop(
            run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED,
            f"the load generator could not send {fmt(last.load)} with {last.agents} agent(s) "
            f"({last.reason}), so the server's limit cannot be told from the generator's{known}",
        )
    if last is not None and last.verdict is Verdict.UNDECIDED:
        return NextProbe(last.load, last.agents, True, f"{fmt(last.load)} undecided: repeated")
    if lf is not None and lf.load <= settings.min_load:
        why = f"even the minimum {fmt(lf.load)} failed ({lf.reason}): the capacity is below it"
        return SearchStop(run_pb2.SEARCH_STOP_REASON_MIN_FAILED, why)
    if hp is not None and hp.load >= settings.max_load:
        why = f"even the maximum {fmt(hp.load)} passed ({hp.reason}): the capacity is at least that"
        return SearchStop(run_pb2.SEARCH_STOP_REASON_MAX_PASSED, why)
    if hp is not None and lf is not None and converged(settings, hp.load, lf.load):
        return SearchStop(
            run_pb2.SEARCH_STOP_REASON_CONVERGED,
            f"capacity {fmt(hp.load)}: {fmt(hp.load)} passed ({hp.good_fraction:.1%} good), "
            f"{fmt(lf.load)} failed ({lf.good_fraction:.1%} good), within {settings.tolerance:.0%}",
        )
    if len(judgements) >= settings.max_probes:
        known = f"; the capacity is at least {fmt(hp.load)}" if hp is not None else ""
        above = f" and below {fmt(lf.load)}" if lf is not None else ""
        return SearchStop(
            run_pb2.SEARCH_STOP_REASON_MAX_PROBES,
            f"{settings.max_probes} probes ran before the search converged{known}{above}",
        )
    if last is not None and last.verdict is Verdict.INCONCLUSIVE:
        return NextProbe(last.load, last.agents, True, f"{fmt(last.load)} proved nothing ({last.reason}): repeated")
    decided = [j.verdict for j in judgements if j.verdict in (Verdict.PASS, Verdict.FAIL) and not j.superseded]
    # Regula falsi keeps moving one end when the curve bends; after two steps on one side,
    # bisect (the Illinois idea) so that the far end moves too.
    one_sided = len(decided) >= 3 and decided[-1] is decided[-2] and Verdict.FAIL in decided
    load, why = _next_load(settings, hp, lf, bisect=one_sided)
    return NextProbe(load, agents, False, why)


def converged(settings: SearchSettings, passing: float, failing: float) -> bool:
    """The bracket is within the tolerance (for concurrency, also when it is 1 apart)."""
    if settings.integer and failing - passing <= 1:
        return True
    return failing <= passing * (1 + settings.tolerance)


def _next_load(
    settings: SearchSettings, hp: ProbeJudgement | None, lf: ProbeJudgement | None, *, bisect: bool
) -> tuple[float, str]:
    fmt = _fmt(settings)
    lo, hi = settings.min_load, settings.max_load
    if hp is None:
        # Nothing passed yet: the minimum first (a failure above it does not say it fails).
        return lo, f"first probe at the minimum {fmt(lo)}"
    if lf is None:
        load = min(hi, hp.load * GROWTH)
        if settings.integer:
            load = min(hi, math.ceil(load))
        return load, f"{fmt(hp.load)} passed: growing to {fmt(load)}"
    a, b = hp.load, lf.load
    margin_a, margin_b = hp.good_fraction - settings.target, lf.good_fraction - settings.target
    log_space = not settings.integer
    xa, xb = (math.log(a), math.log(b)) if log_space else (a, b)
    if margin_a > margin_b and not bisect:  # regula falsi on the goodput margin
        x = xa + (xb - xa) * margin_a / (margin_a - margin_b)
        how = "interpolated"
    else:
        x = (xa + xb) / 2
        how = "bisected"
    x = min(max(x, xa + CLAMP * (xb - xa)), xb - CLAMP * (xb - xa))
    load = math.exp(x) if log_space else x
    if settings.integer:
        load = float(min(max(round(load), a + 1), b - 1))
    return load, f"bracket {fmt(a)}-{fmt(b)}: {how} to {fmt(load)}"


def _fmt(settings: SearchSettings) -> _LoadFormat:
    return _LoadFormat(settings.integer)


@dataclass(frozen=True)
class _LoadFormat:
    integer: bool

    def __call__(self, load: float) -> str:
        return f"concurrency {round(load)}" if self.integer else f"{load:.4g} req/s"
