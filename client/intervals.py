"""How confidence intervals (loadtest.v1.Interval) are written in tables, Markdown and the
report: `±h` (half the interval's width) where space is short, `[low, high]` where it is not.

An open side (docs/metrics.md, "Confidence intervals": too few values to bound the figure
on that side) is never written as a bound: `[2790, ≥3120]` says the interval's top is at
least the largest value seen, and the short form gives the bounded side only, `≥2790`
("at least 2790"). Both sides open is `?`. A figure without an interval gets no text.
"""

from __future__ import annotations

from google.protobuf.message import Message

from common.proto.loadtest.v1 import run_pb2

OPEN_HIGH = "≥"
OPEN_LOW = "≤"
UNBOUNDED = "?"
# One line for the notes under a table.
LEGEND = (
    f"±: half the {{level:g}} % interval; {OPEN_HIGH}x / {OPEN_LOW}x: bounded on one side only, "
    f"{UNBOUNDED}: not at all (too few requests)"
)
WIDE_LEGEND = (
    f"[low, high]: the {{level:g}} % interval; {OPEN_HIGH} / {OPEN_LOW} before a bound: an open side "
    "(too few requests), the bound is at least that far out"
)


def interval_of(message: Message, field: str) -> run_pb2.Interval | None:
    """`message.field` when set; an unset interval means too little data for one."""
    interval: run_pb2.Interval = getattr(message, field)
    return interval if message.HasField(field) else None


def percent(ci: run_pb2.Interval | None) -> run_pb2.Interval | None:
    """A fraction's interval in percent."""
    if ci is None:
        return None
    return run_pb2.Interval(low=100 * ci.low, high=100 * ci.high, low_open=ci.low_open, high_open=ci.high_open)


def number(value: float, decimals: int = 1) -> str:
    """A bound as the figures it belongs to are written: decimals below 1000, none above."""
    return f"{value:.{decimals}f}" if abs(value) < 1000 else f"{value:.0f}"


def _half(value: float) -> str:
    """About two significant figures, no exponent: 1234, 35, 4.9, 0.012, 0."""
    if value >= 10:
        return f"{value:.0f}"
    if value >= 1:
        return f"{value:.1f}"
    return f"{value:.2g}" if value > 0 else "0"


def short(ci: run_pb2.Interval | None, decimals: int = 1) -> str:
    """`±12.5`, `≥2790` (no upper bound), `≤3.1` (no lower bound), `?`, or '' without one."""
    if ci is None:
        return ""
    if ci.low_open and ci.high_open:
        return UNBOUNDED
    if ci.high_open:
        return OPEN_HIGH + number(ci.low, decimals)
    if ci.low_open:
        return OPEN_LOW + number(ci.high, decimals)
    return "±" + _half((ci.high - ci.low) / 2)


def inline(value_text: str, ci: run_pb2.Interval | None, decimals: int = 1) -> str:
    """A figure and its interval on one line: `32.5 ±2.2`, `54.1 (≥46.3)`, `54.1 (?)`."""
    shown = short(ci, decimals)
    if not shown:
        return value_text
    return f"{value_text} {shown}" if shown.startswith("±") else f"{value_text} ({shown})"


def bounds(ci: run_pb2.Interval | None, decimals: int = 1) -> str:
    """`[2710, 2890]`, with open sides marked: `[2790, ≥3120]`; '' without an interval."""
    if ci is None:
        return ""
    low = (OPEN_LOW if ci.low_open else "") + number(ci.low, decimals)
    high = (OPEN_HIGH if ci.high_open else "") + number(ci.high, decimals)
    return f"[{low}, {high}]"


def level(result: run_pb2.RunResult) -> float:
    """The level of the result's intervals (results stored before intervals carry none: 95)."""
    return result.confidence_percent or 95.0
