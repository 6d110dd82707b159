"""Pass/fail checks on stage metrics, k6-style: `p99(ttft) < 500ms`, `error_rate < 1%`,
`output_throughput > 1000`, `p90(ttfo) < 5s` (reasoning models).

A check is parsed at CreateRun (a malformed one is INVALID_ARGUMENT then, not a failure at
the end of a long run) and evaluated on every stage's metrics; a run-level metric
(`capacity`, the highest passing load of a capacity search) is evaluated once per run.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable
from dataclasses import dataclass

from common.metrics import LatencySummary, StageMetrics

LATENCIES = ("ttft", "tpot", "itl", "e2e", "queue_delay", "e2e_including_queue")
# Latencies a stage may not have (no reasoning, no conversation): a check on one that the stage
# did not measure fails, as any check of an unmeasurable value does.
OPTIONAL_LATENCIES = ("ttfr", "ttfo", "session_duration")
CHECKED_LATENCIES = LATENCIES + OPTIONAL_LATENCIES
AGGREGATES = ("mean", "std", "min", "max", "p50", "p90", "p95", "p99", "p999")
SCALARS = (
    "error_rate",
    "request_throughput",
    "output_throughput",
    "total_throughput",
    "goodput",
    "good_fraction",
    "achieved_concurrency",
    "requests_ok",
    "requests_failed",
)
# Metrics of the whole run rather than of a stage: evaluated once, with the run's value.
RUN_METRICS = ("capacity",)
_FRACTIONS = frozenset({"error_rate", "good_fraction"})
_OPS: dict[str, Callable[[float, float], bool]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_EXPR = re.compile(
    r"^\s*(?:(?P<agg>[a-z0-9]+)\((?P<lat>[a-z0-9_]+)\)|(?P<scalar>[a-z_]+))\s*"
    r"(?P<op><=|>=|<|>)\s*(?P<num>[0-9]+(?:\.[0-9]+)?)\s*(?P<unit>ms|s|%)?\s*$"
)


class CheckSyntaxError(ValueError):
    """The expression is not a check we understand."""


@dataclass(frozen=True)
class ParsedCheck:
    expression: str
    metric: str  # e.g. "ttft.p99" or "error_rate"
    op: str
    threshold: float  # in the metric's display unit: ms for latencies, % for fractions with %
    percent: bool  # threshold written in percent
    abort_on_fail: bool = False

    @property
    def run_level(self) -> bool:
        """Evaluated once per run (`evaluate_value`), not on each stage."""
        return self.metric in RUN_METRICS

    def measure(self, m: StageMetrics) -> float | None:
        """The metric's value in the threshold's unit (None when not measurable)."""
        if self.run_level:
            return None
        if "." in self.metric:
            name, agg = self.metric.split(".")
            summary: LatencySummary = getattr(m, name)
            return float(getattr(summary, agg)) if summary.count else None
        total = m.requests_ok + m.requests_failed
        value: float | None
        if self.metric == "error_rate":
            value = m.requests_failed / total if total else None
        elif self.metric == "output_throughput":
            value = m.output_token_throughput
        elif self.metric == "total_throughput":
            value = m.total_token_throughput
        else:
            value = getattr(m, self.metric)
        if value is None:
            return None
        return float(value) * 100 if self.percent else float(value)

    def evaluate(self, m: StageMetrics) -> tuple[bool, float, str]:
        """(passed, measured, message). An unmeasurable metric fails."""
        return self.evaluate_value(self.measure(m))

    def evaluate_value(self, value: float | None) -> tuple[bool, float, str]:
        """(passed, measured, message) for the metric's value; None (not measured) fails."""
        unit = "%" if self.percent else (" ms" if "." in self.metric else "")
        want = f"want {self.op} {self.threshold:g}{unit}"
        if value is None:
            return False, 0.0, f"{self._label()} not measured, {want}"
        passed = _OPS[self.op](value, self.threshold)
        return passed, value, f"{self._label()} = {value:.4g}{unit}, {want}"

    def _label(self) -> str:
        if "." in self.metric:
            name, agg = self.metric.split(".")
            return f"{agg}({name})"
        return self.metric


def parse_check(expression: str, abort_on_fail: bool = False) -> ParsedCheck:
    m = _EXPR.match(expression.lower())
    if m is None:
        raise CheckSyntaxError("expected e.g. 'p99(ttft) < 500ms', 'error_rate < 1%' or 'output_throughput > 1000'")
    threshold = float(m["num"])
    unit = m["unit"]
    if m["lat"]:
        agg, lat = m["agg"], m["lat"]
        if lat not in CHECKED_LATENCIES:
            raise CheckSyntaxError(f"unknown latency {lat!r}; one of {', '.join(CHECKED_LATENCIES)}")
        if agg not in AGGREGATES:
            raise CheckSyntaxError(f"unknown aggregate {agg!r}; one of {', '.join(AGGREGATES)}")
        if unit == "%":
            raise CheckSyntaxError("a latency threshold takes ms or s, not %")
        return ParsedCheck(
            expression, f"{lat}.{agg}", m["op"], threshold * 1000 if unit == "s" else threshold, False, abort_on_fail
        )
    scalar = m["scalar"]
    if scalar not in SCALARS and scalar not in RUN_METRICS:
        names = ", ".join((*SCALARS, *RUN_METRICS))
        raise CheckSyntaxError(f"unknown metric {scalar!r}; one of {names} or agg(latency)")
    if unit in ("ms", "s"):
        raise CheckSyntaxError(f"{scalar} is not a latency; drop the unit {unit!r}")
    if unit == "%" and scalar not in _FRACTIONS:
        raise CheckSyntaxError(f"% applies to error_rate and good_fraction, not {scalar}")
    percent = unit == "%"
    if scalar in _FRACTIONS and not percent and threshold > 1:
        raise CheckSyntaxError(f"{scalar} is a fraction: write it as 0.01 or 1%")
    return ParsedCheck(expression, scalar, m["op"], threshold, percent, abort_on_fail)
