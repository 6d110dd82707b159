"""Per-caller token buckets: mutating RPCs and reads are limited per key, separately, and
refused calls per client address.

Each caller (a key id, or the peer's address for calls without a key) has its own bucket per
class of call, so one busy key cannot starve another, and a reader polling hard cannot use
up the writes of an admin. A refused call learns how long until a token is available
(sent back as `google.rpc.RetryInfo`).

Refusals (UNAUTHENTICATED, PERMISSION_DENIED) take a token of their own bucket per client
address (the IP, without the port): a client that keeps presenting a wrong, unknown or
revoked key, or keeps calling what its role may not, is answered RESOURCE_EXHAUSTED once
its bucket is empty, whatever the key. Calls that are allowed never touch this bucket, so
a flood of bad calls from an address does not lock out a valid key used from it.

Defaults (see docs/security.md): writes 20/s with bursts of 100; reads 200/s with bursts
of 400; refusals 1/s with bursts of 20 per address. Streams count once, when they open;
AgentService.Connect and health checks are not limited (a refused Connect is a refusal).

Memory is bounded: each class tracks at most MAX_TRACKED callers. Beyond that, idle (full)
buckets are dropped first, then the least recently used ones (which start full again if
they come back: a flood from more addresses than that gets a burst per address, no more).
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_WRITE_RATE = 20.0
DEFAULT_WRITE_BURST = 100.0
DEFAULT_READ_RATE = 200.0
DEFAULT_READ_BURST = 400.0
DEFAULT_REFUSAL_RATE = 1.0
DEFAULT_REFUSAL_BURST = 20.0
MAX_TRACKED = 10_000  # callers per class of call


@dataclass(frozen=True)
class RateLimits:
    """Token-bucket parameters: tokens per second and bucket size, for writes, reads and
    refusals."""

    write_rate: float = DEFAULT_WRITE_RATE
    write_burst: float = DEFAULT_WRITE_BURST
    read_rate: float = DEFAULT_READ_RATE
    read_burst: float = DEFAULT_READ_BURST
    refusal_rate: float = DEFAULT_REFUSAL_RATE
    refusal_burst: float = DEFAULT_REFUSAL_BURST

    def __post_init__(self) -> None:
        for name in ("write_rate", "write_burst", "read_rate", "read_burst", "refusal_rate", "refusal_burst"):
            value = getattr(self, name)
            if not value > 0:  # also rejects NaN
                raise ValueError(f"{name} must be positive, got {value!r}")


class TokenBuckets:
    """Buckets of one class of call, one per caller, at most `max_tracked` of them."""

    def __init__(
        self, rate: float, burst: float, clock: Callable[[], float] = time.monotonic, max_tracked: int = MAX_TRACKED
    ) -> None:
        self._rate = rate
        self._burst = burst
        self._clock = clock
        self._max_tracked = max_tracked
        # caller -> (tokens, at), least recently used first.
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._buckets)

    def take(self, caller: str) -> float:
        """Take one token: 0.0 when granted, else the seconds until one is available."""
        now = self._clock()
        tokens, at = self._buckets.pop(caller, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        granted = tokens >= 1.0
        self._buckets[caller] = (tokens - 1.0 if granted else tokens, now)
        if len(self._buckets) > self._max_tracked:
            self._prune(now)
        return 0.0 if granted else (1.0 - tokens) / self._rate

    def _prune(self, now: float) -> None:
        full = [c for c, (t, at) in self._buckets.items() if t + (now - at) * self._rate >= self._burst]
        for caller in full:
            del self._buckets[caller]
        # Down to 90 %: the scan above runs once per max_tracked/10 new callers, not per call.
        while len(self._buckets) > self._max_tracked * 9 // 10:
            self._buckets.popitem(last=False)


class RateLimiter:
    """Write and read buckets per caller, refusal buckets per client address."""

    def __init__(self, limits: RateLimits | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits or RateLimits()
        self._writes = TokenBuckets(self.limits.write_rate, self.limits.write_burst, clock)
        self._reads = TokenBuckets(self.limits.read_rate, self.limits.read_burst, clock)
        self._refusals = TokenBuckets(self.limits.refusal_rate, self.limits.refusal_burst, clock)

    def take(self, caller: str, write: bool) -> float:
        """0.0 when the call may proceed, else seconds to wait before retrying."""
        return (self._writes if write else self._reads).take(caller)

    def take_refusal(self, address: str) -> float:
        """0.0 when a refusal may be answered as such, else seconds until the address's next
        refusal is (until then its refused calls get RESOURCE_EXHAUSTED)."""
        return self._refusals.take(address)
