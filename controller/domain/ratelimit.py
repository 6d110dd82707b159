"""Per-caller token buckets: mutating RPCs and reads are limited per key, separately.

Each caller (a key id, or the peer's host for calls without a key) has its own bucket per
class of call, so one busy key cannot starve another, and a reader polling hard cannot use
up the writes of an admin. A refused call learns how long until a token is available
(sent back as `google.rpc.RetryInfo`).

Defaults (see docs/security.md): writes 20/s with bursts of 100; reads 200/s with bursts
of 400. Streams count once, when they open; AgentService.Connect and health checks are not
limited.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_WRITE_RATE = 20.0
DEFAULT_WRITE_BURST = 100.0
DEFAULT_READ_RATE = 200.0
DEFAULT_READ_BURST = 400.0
MAX_TRACKED = 10_000  # callers; beyond this, idle (full) buckets are dropped


@dataclass(frozen=True)
class RateLimits:
    """Token-bucket parameters: tokens per second and bucket size, for writes and reads."""

    write_rate: float = DEFAULT_WRITE_RATE
    write_burst: float = DEFAULT_WRITE_BURST
    read_rate: float = DEFAULT_READ_RATE
    read_burst: float = DEFAULT_READ_BURST

    def __post_init__(self) -> None:
        for name in ("write_rate", "write_burst", "read_rate", "read_burst"):
            value = getattr(self, name)
            if not value > 0:  # also rejects NaN
                raise ValueError(f"{name} must be positive, got {value!r}")


class TokenBuckets:
    """Buckets of one class of call, one per caller."""

    def __init__(self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (tokens, at)

    def take(self, caller: str) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        now = self._clock()
        tokens, at = self._buckets.get(caller, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        if tokens >= 1.0:
            self._buckets[caller] = (tokens - 1.0, now)
            if len(self._buckets) > MAX_TRACKED:
                self._prune(now)
            return 0.0
        self._buckets[caller] = (tokens, now)
        return (1.0 - tokens) / self._rate

    def _prune(self, now: float) -> None:
        full = [c for c, (t, at) in self._buckets.items() if t + (now - at) * self._rate >= self._burst]
        for caller in full:
            del self._buckets[caller]


class RateLimiter:
    """Write and read buckets per caller."""

    def __init__(self, limits: RateLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or RateLimits()
        self._writes = TokenBuckets(self.limits.write_rate, self.limits.write_burst, clock)
        self._reads = TokenBuckets(self.limits.read_rate, self.limits.read_burst, clock)

    def take(self, caller: str, write: bool) -> float:
        """0.0 when the call may proceed, else seconds to wait before retrying."""
        return (self._writes if write else self._reads).take(caller)
