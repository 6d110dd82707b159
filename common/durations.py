"""Durations: human text such as `10s`, `500ms`, `2m`, `1h30m` parsed to seconds, and protobuf
`Duration`s read as seconds or milliseconds.

A Duration field that is not set reads as zero (proto3), so `seconds(message.field)` is 0.0 for
an unset field; `seconds_if_set` tells the two apart where zero is a value of its own.
"""

from __future__ import annotations

import re

from google.protobuf import duration_pb2
from google.protobuf.message import Message

_UNIT_S = {"ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_PART = re.compile(r"(\d+(?:\.\d+)?)(ns|us|ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Seconds in `text`; a bare number means seconds. Raises ValueError when malformed."""
    s = text.strip().lower()
    try:
        return float(s)
    except ValueError:
        pass
    pos, total = 0, 0.0
    for m in _PART.finditer(s):
        if m.start() != pos:
            break
        total += float(m.group(1)) * _UNIT_S[m.group(2)]
        pos = m.end()
    if pos != len(s) or not s:
        raise ValueError(f"invalid duration {text!r} (use e.g. 10s, 500ms, 2m)")
    return total


def seconds(d: duration_pb2.Duration) -> float:
    """`d` in seconds."""
    # One division of the exact nanosecond count (rather than seconds + nanos / 1e9): the
    # nearest float to the duration.
    return d.ToNanoseconds() / 1e9


def millis(d: duration_pb2.Duration) -> float:
    """`d` in milliseconds."""
    return d.ToNanoseconds() / 1e6


def positive_seconds_or(d: duration_pb2.Duration, default: float) -> float:
    """`d` in seconds when it is positive; `default` when it is zero (or unset) or negative."""
    value = seconds(d)
    return value if value > 0 else default


def seconds_if_set(message: Message, field: str) -> float | None:
    """The Duration field `field` of `message` in seconds; None when the field is not set."""
    return seconds(getattr(message, field)) if message.HasField(field) else None


def millis_if_set(message: Message, field: str) -> float | None:
    """The Duration field `field` of `message` in milliseconds; None when the field is not set."""
    return millis(getattr(message, field)) if message.HasField(field) else None
