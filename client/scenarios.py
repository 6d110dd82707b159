"""Named load scenarios, as load-testing teams use them: each expands to a list of stages
relative to a peak load (`--peak-concurrency N` or `--peak-rate R`)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScenarioStage:
    """One stage: a fraction of the peak held for a time, optionally ramped into."""

    fraction: float
    duration_s: float
    ramp_s: float = 0.0
    requests: int = 0


@dataclass(frozen=True)
class Scenario:
    name: str
    description: str
    stages: tuple[ScenarioStage, ...]


SCENARIOS: dict[str, Scenario] = {
    s.name: s
    for s in (
        Scenario(
            "smoke",
            "10 requests at the lowest load: does the target answer at all, and correctly",
            (ScenarioStage(0.0, 60.0, requests=10),),
        ),
        Scenario(
            "load",
            "ramp to the peak over 30 s, then hold it for 5 min: the expected production load",
            (ScenarioStage(1.0, 330.0, ramp_s=30.0),),
        ),
        Scenario(
            "stress",
            "step past the peak, 2 min each at 25 %, 50 %, 100 %, 150 % and 200 %: where it breaks",
            tuple(ScenarioStage(f, 120.0) for f in (0.25, 0.5, 1.0, 1.5, 2.0)),
        ),
        Scenario(
            "spike",
            "baseline 10 % for 1 min, a sudden jump to the peak for 1 min, back to 10 % for 1 min",
            (ScenarioStage(0.1, 60.0), ScenarioStage(1.0, 60.0), ScenarioStage(0.1, 60.0)),
        ),
        Scenario(
            "soak",
            "80 % of the peak for 1 h: leaks, slow degradation, cache growth",
            (ScenarioStage(0.8, 3600.0, ramp_s=60.0),),
        ),
    )
}


def scale(peak: float, fraction: float, integer: bool) -> float:
    """The load of a stage at `fraction` of `peak`; at least 1 for concurrency."""
    value = peak * fraction
    return max(1, round(value)) if integer else max(value, 0.1)


def describe(scenario: Scenario, peak_concurrency: int | None = None) -> str:
    parts = []
    for st in scenario.stages:
        level = f"{st.fraction:.0%} of peak" if st.fraction else "minimum load"
        if peak_concurrency is not None:
            level = f"concurrency {scale(peak_concurrency, st.fraction, True):g}"
        stop = f"{st.requests} requests" if st.requests else f"{st.duration_s:g}s"
        ramp = f", ramp {st.ramp_s:g}s" if st.ramp_s else ""
        parts.append(f"{level} for {stop}{ramp}")
    return " → ".join(parts)
