"""The capacity search's pure parts: the probe judgement (Wilson interval, repeats, saturation,
target errors) and the planner, driven against synthetic monotone goodput curves."""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import pytest

from common.proto.loadtest.v1 import run_pb2
from controller.domain.execution.search import (
    CONCURRENCY,
    RATE,
    NextProbe,
    ProbeMeasurement,
    SearchSettings,
    SearchStop,
    Verdict,
    apply_search_defaults,
    bracket,
    judge_probes,
    plan_next,
    probe_stage,
)

pytestmark = pytest.mark.timeout(60)


def settings(variable: int = CONCURRENCY, **kw: float) -> SearchSettings:
    base = dict(target=0.95, min_load=1.0, max_load=1024.0, tolerance=0.05, min_requests=100, max_probes=16)
    base.update(kw)
    return SearchSettings(
        variable,
        base["target"],
        base["min_load"],
        base["max_load"],
        base["tolerance"],
        int(base["min_requests"]),
        int(base["max_probes"]),
    )


def logistic(capacity: float, width: float, target: float = 0.95) -> Callable[[float], float]:
    """A monotone goodput curve that crosses `target` exactly at `capacity`."""
    midpoint = capacity - width * math.log(1 / target - 1)

    def good(load: float) -> float:
        return 1 / (1 + math.exp((load - midpoint) / width))

    return good


def search(
    s: SearchSettings,
    curve: Callable[[float], float],
    requests: Callable[[float], int] = lambda _load: 400,
    rng: random.Random | None = None,
    saturate_above: float = math.inf,
    agents: int = 1,
    available: int = 1,
    per_agent_limit: float = math.inf,
) -> tuple[list[ProbeMeasurement], SearchStop]:
    probes: list[ProbeMeasurement] = []
    for _ in range(100):
        step = plan_next(s, judge_probes(s, probes), agents=agents, available_agents=available)
        if isinstance(step, SearchStop):
            return probes, step
        assert s.min_load <= step.load <= s.max_load
        if s.integer:
            assert step.load == round(step.load)
        n = requests(step.load)
        p = curve(step.load)
        good = sum(rng.random() < p for _ in range(n)) if rng else round(n * p)
        saturated = step.load > saturate_above or step.load / step.agents > per_agent_limit
        probes.append(ProbeMeasurement(step.load, step.agents, n, good, 0, saturated, "cpu" if saturated else ""))
    raise AssertionError("the search never stopped")


@pytest.mark.parametrize("capacity", [3.0, 7.0, 40.0, 300.0, 1000.0])
def test_concurrency_search_brackets_an_exact_curve(capacity: float) -> None:
    # Doubling from 1 to 1024 takes 11 probes of its own.
    s = settings(max_probes=20)
    probes, stop = search(s, logistic(capacity, width=max(capacity / 20, 0.2)))
    b = bracket(judge_probes(s, probes))
    assert stop.reason == run_pb2.SEARCH_STOP_REASON_CONVERGED, stop.message
    assert b.highest_passing is not None and b.lowest_failing is not None
    assert b.highest_passing.load <= capacity < b.lowest_failing.load
    assert b.lowest_failing.load - b.highest_passing.load <= max(1, 0.05 * b.highest_passing.load)
    assert len(probes) <= 20


@pytest.mark.parametrize("capacity", [0.7, 12.5, 95.0, 640.0])
def test_rate_search_brackets_an_exact_curve_in_log_space(capacity: float) -> None:
    s = settings(RATE, min_load=0.5, max_load=1000.0, max_probes=20)
    probes, stop = search(s, logistic(capacity, width=capacity / 15))
    b = bracket(judge_probes(s, probes))
    assert stop.reason == run_pb2.SEARCH_STOP_REASON_CONVERGED, stop.message
    assert b.highest_passing is not None and b.lowest_failing is not None
    assert b.highest_passing.load <= capacity < b.lowest_failing.load <= b.highest_passing.load * 1.05
    assert len(probes) <= 20


@pytest.mark.parametrize("seed", range(20))
def test_noisy_curves_converge_near_the_true_capacity(seed: int) -> None:
    rng = random.Random(seed)
    capacity = rng.uniform(5, 500)
    s = settings(RATE, min_load=1.0, max_load=2000.0, max_probes=20)
    probes, stop = search(s, logistic(capacity, width=capacity / 10), rng=rng)
    b = bracket(judge_probes(s, probes))
    assert stop.reason == run_pb2.SEARCH_STOP_REASON_CONVERGED, stop.message
    assert b.highest_passing is not None and b.lowest_failing is not None
    # Binomial noise of 400 requests moves the crossing by a few percent at most on this curve.
    assert b.highest_passing.load <= capacity * 1.15
    assert b.lowest_failing.load >= capacity * 0.85


def test_a_probe_within_noise_is_repeated_and_judged_on_both() -> None:
    s = settings()
    first = ProbeMeasurement(8, 1, 100, 95, 0)  # 95 % of 100: the target is inside the interval
    [j] = judge_probes(s, [first])
    assert j.verdict is Verdict.UNDECIDED
    step = plan_next(s, [j], agents=1, available_agents=1)
    assert isinstance(step, NextProbe) and step.load == 8 and step.repeat
    again = ProbeMeasurement(8, 1, 100, 100, 0)
    j1, j2 = judge_probes(s, [first, again])
    assert j2.repeat and j2.requests == 200 and j2.good == 195
    assert j1.superseded and j1.verdict is j2.verdict
    # 195 of 200 is still within noise of 95 %: the point estimate decides, not confidently.
    assert j2.verdict is Verdict.PASS and not j2.confident
    decided = ProbeMeasurement(8, 1, 1000, 1000, 0)
    _, j3 = judge_probes(s, [first, decided])
    assert j3.verdict is Verdict.PASS and j3.confident


def test_too_few_requests_are_repeated() -> None:
    s = settings(min_requests=50)
    [j] = judge_probes(s, [ProbeMeasurement(4, 1, 20, 20, 0)])
    assert j.verdict is Verdict.UNDECIDED and "fewer than 50" in j.reason


def test_saturated_probe_uses_spare_agents_then_stops_saturated() -> None:
    s = settings(RATE, min_load=100, max_load=10_000)
    # The server would take 5000/s; one agent sends at most 300/s.
    probes, stop = search(s, logistic(5000, 200), agents=1, available=3, per_agent_limit=300)
    judged = judge_probes(s, probes)
    assert stop.reason == run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED, stop.message
    assert any(j.saturated and j.verdict is Verdict.INCONCLUSIVE for j in judged)
    assert max(p.agents for p in probes) == 3  # the spare agents were used
    # Saturated at one load on 1, 2, then 3 agents: a limit, not a single stall; no repeat on 3.
    assert [(p.load, p.agents) for p in probes[-3:]] == [(probes[-1].load, n) for n in (1, 2, 3)]
    b = bracket(judged)
    # The generator's limit (3 x 300/s) is never reported as a failure.
    assert b.lowest_failing is None
    assert b.highest_passing is not None and b.highest_passing.load <= 900


def test_target_errors_stop_the_search() -> None:
    s = settings()
    probes = [ProbeMeasurement(1, 1, 200, 200, 0), ProbeMeasurement(2, 1, 200, 20, 180)]
    judged = judge_probes(s, probes)
    assert judged[1].target_errors and judged[1].verdict is Verdict.FAIL
    stop = plan_next(s, judged, agents=1, available_agents=1)
    assert isinstance(stop, SearchStop) and stop.reason == run_pb2.SEARCH_STOP_REASON_TARGET_ERRORS


def test_max_passed_min_failed_and_max_probes() -> None:
    s = settings(max_load=16)
    _, stop = search(s, lambda _load: 1.0)
    assert stop.reason == run_pb2.SEARCH_STOP_REASON_MAX_PASSED
    _, stop = search(s, lambda _load: 0.0)
    assert stop.reason == run_pb2.SEARCH_STOP_REASON_MIN_FAILED
    probes, stop = search(settings(max_probes=4), logistic(300, 10))
    assert stop.reason == run_pb2.SEARCH_STOP_REASON_MAX_PROBES and len(probes) == 4
    assert "at least concurrency 8" in stop.message


def test_an_incomplete_probe_is_repeated() -> None:
    s = settings()
    probes = [ProbeMeasurement(1, 1, 500, 500, 0), ProbeMeasurement(2, 1, 30, 30, 0, complete=False)]
    judged = judge_probes(s, probes)
    assert judged[1].verdict is Verdict.INCONCLUSIVE
    step = plan_next(s, judged, agents=1, available_agents=1)
    assert isinstance(step, NextProbe) and step.load == 2


def test_a_pass_above_a_failure_is_ignored() -> None:
    s = settings()
    probes = [
        ProbeMeasurement(10, 1, 500, 500, 0),
        ProbeMeasurement(20, 1, 500, 100, 0),
        ProbeMeasurement(30, 1, 500, 500, 0),
    ]
    b = bracket(judge_probes(s, probes))
    assert b.highest_passing is not None and b.highest_passing.load == 10
    assert b.lowest_failing is not None and b.lowest_failing.load == 20


def test_interpolation_is_clamped_inside_the_bracket() -> None:
    s = settings()
    # Passing barely, failing badly: regula falsi lands next to the pass; the clamp keeps a quarter.
    probes = [ProbeMeasurement(100, 1, 10_000, 9_600, 0), ProbeMeasurement(200, 1, 10_000, 0, 0)]
    step = plan_next(s, judge_probes(s, probes), agents=1, available_agents=1)
    assert isinstance(step, NextProbe) and step.load == 125


def test_defaults_and_probe_stage() -> None:
    spec = run_pb2.SearchSpec(variable=RATE)
    apply_search_defaults(spec)
    assert (spec.goodput_target_percent, spec.min, spec.max, spec.tolerance_percent) == (95, 1, 1000, 5)
    assert spec.probe_duration.seconds == 30 and spec.probe_warmup.seconds == 5
    assert (spec.min_requests, spec.max_probes) == (100, 16)
    stage = probe_stage(spec, 12.5, 3)
    assert stage.request_rate == 12.5 and stage.arrival == run_pb2.ARRIVAL_PROCESS_POISSON
    assert stage.duration.seconds == 30 and stage.warmup_duration.seconds == 5
    spec.arrival = run_pb2.ARRIVAL_PROCESS_CONSTANT
    assert probe_stage(spec, 12.5, 4).arrival == run_pb2.ARRIVAL_PROCESS_CONSTANT
    conc = run_pb2.SearchSpec(variable=CONCURRENCY)
    apply_search_defaults(conc)
    assert conc.max == 1024 and probe_stage(conc, 8, 0).concurrency == 8


def test_one_saturated_probe_is_repeated_before_the_search_gives_up() -> None:
    s = settings()
    first = [ProbeMeasurement(1, 1, 500, 500, 0), ProbeMeasurement(2, 1, 500, 500, 0, saturated=True)]
    step = plan_next(s, judge_probes(s, first), agents=1, available_agents=1)
    assert isinstance(step, NextProbe) and (step.load, step.agents, step.repeat) == (2, 1, True)
    recovered = [*first, ProbeMeasurement(2, 1, 500, 500, 0)]
    step = plan_next(s, judge_probes(s, recovered), agents=1, available_agents=1)
    assert isinstance(step, NextProbe) and step.load == 4
    twice = [*first, ProbeMeasurement(2, 1, 500, 500, 0, saturated=True)]
    stop = plan_next(s, judge_probes(s, twice), agents=1, available_agents=1)
    assert isinstance(stop, SearchStop) and stop.reason == run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED
    assert "at least concurrency 1" in stop.message


def test_more_agents_are_not_asked_for_twice_when_the_probe_could_not_use_them() -> None:
    # Concurrency 1 runs on one agent however many the run has: saturated twice, it stops.
    s = settings()
    probes = [ProbeMeasurement(1, 1, 500, 500, 0, saturated=True)]
    step = plan_next(s, judge_probes(s, probes), agents=2, available_agents=2)
    assert isinstance(step, NextProbe) and step.agents == 2
    probes.append(ProbeMeasurement(1, 1, 500, 500, 0, saturated=True))
    stop = plan_next(s, judge_probes(s, probes), agents=2, available_agents=2)
    assert isinstance(stop, SearchStop) and stop.reason == run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED


def test_a_probe_that_counted_nothing_proves_nothing() -> None:
    s = settings()
    judged = judge_probes(s, [ProbeMeasurement(1, 1, 0, 0, 0), ProbeMeasurement(1, 1, 0, 0, 0)])
    assert [j.verdict for j in judged] == [Verdict.INCONCLUSIVE] * 2
    step = plan_next(s, judged, agents=1, available_agents=1)
    assert isinstance(step, NextProbe) and step.load == 1  # repeated, bounded by max_probes
