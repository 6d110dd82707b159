"""When the mock actually wrote its tokens: histograms of its own emission timing.

The mock is the ground truth of accuracy benchmarks, but it is a process on a busy machine
too: a token due at a deadline goes out a little after it. A client's measured inter-token
latency can only be judged against what the server really emitted, so the mock keeps, per
server (per worker), two histograms of `now()` readings taken right before each event's
`write`:

* `itl`: the gap between consecutive text events of one stream (the mock's own ITL);
* `ttft_late`: how long after its deadline the first event of a stream went out.

Bins are 20 µs wide up to 200 ms (the last bin also holds everything longer), so recording
costs one multiplication and one list increment on the hot path. Served as JSON at
`GET /stats/emission` and zeroed with the other counters by `POST /stats/reset`.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence
from typing import Any

BIN_S = 20e-6
BINS = 10_000  # 200 ms of 20 µs bins
_PER_S = 1.0 / BIN_S
_LAST = BINS - 1
QUANTILES = (50.0, 90.0, 99.0, 99.9)


class EmissionStats:
    """Histograms of the mock's emission gaps and first-token lateness."""

    __slots__ = ("itl", "ttft_late")

    def __init__(self) -> None:
        self.itl = [0] * BINS
        self.ttft_late = [0] * BINS

    def reset(self) -> None:
        """Zero both histograms."""
        self.itl[:] = [0] * BINS
        self.ttft_late[:] = [0] * BINS

    def record_gap(self, seconds: float) -> None:
        """One stream wrote its next event `seconds` after its previous one."""
        i = int(seconds * _PER_S)
        self.itl[i if i < BINS else _LAST] += 1

    def record_first(self, late_s: float) -> None:
        """One stream wrote its first event `late_s` after that event's deadline."""
        i = int(late_s * _PER_S) if late_s > 0 else 0
        self.ttft_late[i if i < BINS else _LAST] += 1

    def as_dict(self) -> dict[str, Any]:
        """The `/stats/emission` JSON object: count, mean and quantiles in ms of each histogram."""
        return {"bin_ms": BIN_S * 1000.0, "itl": summarize(self.itl), "ttft_late": summarize(self.ttft_late)}


def summarize(bins: Sequence[int]) -> dict[str, float]:
    """Count, mean, max and quantiles (ms, at bin upper edges) of one histogram."""
    count = sum(bins)
    out: dict[str, float] = {"count": float(count)}
    if not count:
        return out
    out["mean_ms"] = round(sum((i + 0.5) * n for i, n in enumerate(bins) if n) * BIN_S * 1000.0 / count, 4)
    cumulative = list(itertools.accumulate(bins))
    for q in QUANTILES:
        rank = q / 100.0 * count
        index = bisect.bisect_left(cumulative, rank)
        out[f"p{q:g}_ms"] = round((index + 1) * BIN_S * 1000.0, 3)
    out["max_ms"] = round((max(i for i, n in enumerate(bins) if n) + 1) * BIN_S * 1000.0, 3)
    return out
