"""The test behind `runs compare` (docs/metrics.md, "Comparing runs"): one metric's difference
between a baseline and another run, judged against a tolerance and against noise.

Each side's standard error is read off its stored confidence interval, the difference gets a
normal interval and a two-sided p-value, the p-values of one run's comparison are adjusted
together (Holm), and the decision says whether the change is a regression, an improvement,
no regression, or undecided by the data — then with about how much data would decide it.
Pure arithmetic on numbers; compare.py reads them from the results.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import IntEnum

from common.proto.loadtest.v1 import run_pb2
from common.stats import normal_two_sided_p, z_value


class Outcome(IntEnum):
    """What a comparison concluded (the numbers of the API's `CompareOutcome`)."""

    UNSPECIFIED = 0  # nothing was judged
    NO_REGRESSION = 1
    REGRESSED = 2
    INCONCLUSIVE = 3
    IMPROVED = 4


# How bad an outcome is when several are summed up in one: an improvement is no regression.
_SEVERITY = {
    Outcome.UNSPECIFIED: 0,
    Outcome.NO_REGRESSION: 1,
    Outcome.IMPROVED: 1,
    Outcome.INCONCLUSIVE: 2,
    Outcome.REGRESSED: 3,
}


def worst(outcomes: Iterable[Outcome]) -> Outcome:
    """REGRESSED over INCONCLUSIVE over NO_REGRESSION (an IMPROVED counts as no regression);
    UNSPECIFIED when nothing was judged."""
    severity = max((_SEVERITY[o] for o in outcomes), default=0)
    return {0: Outcome.UNSPECIFIED, 1: Outcome.NO_REGRESSION, 2: Outcome.INCONCLUSIVE, 3: Outcome.REGRESSED}[severity]


def standard_error(interval: run_pb2.Interval, confidence_percent: float) -> float:
    """The standard error a normal interval of this width has: (high - low) / (2 z)."""
    return (interval.high - interval.low) / (2.0 * z_value(confidence_percent))


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment, in the order given: the i-th smallest p times (m - i + 1),
    never below the adjusted p before it, at most 1. Rejecting every adjusted p below alpha
    keeps the chance of any false rejection among the m at most alpha, whatever their
    dependence."""
    m = len(p_values)
    adjusted = [1.0] * m
    running = 0.0
    for rank, i in enumerate(sorted(range(m), key=p_values.__getitem__)):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        adjusted[i] = running
    return adjusted


@dataclass(frozen=True)
class Estimate:
    """One side of a comparison: the figure, its standard error, and the amount of data it
    rests on (`n`: requests of the stage, or runs of a group). `scales` is False when more of
    that data would not narrow it (a single run's side while repeats are counted)."""

    value: float
    se: float
    n: int
    scales: bool = True


@dataclass(frozen=True)
class Difference:
    """`other - base` with its standard error and the two-sided p-value of "no difference"."""

    delta: float
    se: float
    p_value: float

    def interval(self, confidence_percent: float) -> tuple[float, float]:
        half = z_value(confidence_percent) * self.se
        return self.delta - half, self.delta + half


def difference(base: Estimate, other: Estimate) -> Difference:
    delta = other.value - base.value
    se = math.hypot(base.se, other.se)
    if se > 0:
        return Difference(delta, se, normal_two_sided_p(delta / se))
    return Difference(delta, se, 1.0 if delta == 0 else 0.0)  # two exact figures: any difference is real


@dataclass(frozen=True)
class Decision:
    outcome: Outcome
    # When INCONCLUSIVE: about how much data (the sides' `n`) each side would need; 0 when
    # no amount would decide it (`note` says why).
    needed: int = 0
    note: str = ""


def decide(
    diff: Difference,
    p_adjusted: float,
    worse_up: bool,
    tolerance: float,
    confidence_percent: float,
    family_size: int,
    sides: Sequence[Estimate],
) -> Decision:
    """Judge one metric's difference. `tolerance` is absolute (in the metric's unit).

    REGRESSED: worse by more than the tolerance and `p_adjusted` below alpha; IMPROVED: better
    by more than the tolerance, the same way. INCONCLUSIVE otherwise when the worse end of the
    difference's interval lies beyond the tolerance (a regression beyond it can be neither
    shown nor ruled out); else NO_REGRESSION.
    """
    alpha = 1.0 - confidence_percent / 100.0
    worse = diff.delta if worse_up else -diff.delta  # > 0: worse
    if worse > tolerance and p_adjusted < alpha:
        return Decision(Outcome.REGRESSED)
    if worse < -tolerance and p_adjusted < alpha:
        return Decision(Outcome.IMPROVED)
    if worse + z_value(confidence_percent) * diff.se <= tolerance:
        return Decision(Outcome.NO_REGRESSION)
    if worse > tolerance:
        # Beyond the tolerance but not told from noise: significant once |d| / se reaches the
        # critical z of the family's first Holm step (alpha / m, the strictest one).
        target = worse / z_value(100.0 * (1.0 - alpha / max(1, family_size)))
    else:
        # Within the tolerance but noise could hide one beyond it: ruled out once the
        # interval's worse end comes inside the tolerance.
        target = (tolerance - worse) / z_value(confidence_percent)
        if target <= 0:
            return Decision(Outcome.INCONCLUSIVE, 0, "the change lies at the tolerance: more data would not decide it")
    needed = data_needed(target, sides)
    if needed:
        return Decision(Outcome.INCONCLUSIVE, needed)
    if any(not s.scales for s in sides):
        return Decision(Outcome.INCONCLUSIVE, 0, "the single run's own noise is too large: repeat it as a group too")
    return Decision(
        Outcome.INCONCLUSIVE, 0, "the change is too close to the tolerance for any practical amount of data"
    )


# An answer beyond this is no answer (and must fit the API's uint64).
_MAX_NEEDED = 10**12


def data_needed(target_se: float, sides: Sequence[Estimate]) -> int:
    """The smallest N at which the difference's standard error falls to `target_se` when each
    scaling side has N of its data instead of its `n` (a standard error shrinks as 1 / sqrt(n):
    se(N)^2 = se^2 n / N) and the other sides stay as they are; 0 when none would."""
    fixed = sum(s.se**2 for s in sides if not s.scales or s.n <= 0)
    scaling = sum(s.se**2 * s.n for s in sides if s.scales and s.n > 0)
    room = target_se**2 - fixed
    if room <= 0 or scaling <= 0:
        return 0
    needed = math.ceil(scaling / room)
    return needed if needed <= _MAX_NEEDED else 0


def values_to_bound_quantile(quantile: float, confidence_percent: float) -> int:
    """The fewest values whose distribution-free interval of the `quantile` (0.99 for p99) has
    both ends at this level: the probability that all n values lie below the quantile (or all
    above), max(q, 1 - q)^n, must be at most half the level's alpha. 368 for p99 at 95 %."""
    alpha = 1.0 - confidence_percent / 100.0
    q = max(quantile, 1.0 - quantile)
    return math.ceil(math.log(alpha / 2.0) / math.log(q))
