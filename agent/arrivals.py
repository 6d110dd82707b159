"""Open-loop arrival times: when each request of a `request_rate` stage is due.

`ArrivalSchedule` is pure computation (no clock, no I/O): from a rate, an arrival process
and a seed it produces the offsets from the stage start, in nanoseconds, at which requests
are due. The dispatcher in `agent.scheduler` only sleeps until each offset.

* Gaps between arrivals are drawn from `numpy.random.Generator(PCG64(seed))`: constant
  (`1/R` each), Poisson (exponential with mean `1/R`) or gamma (shape `k = burstiness`,
  scale `1/(R k)`: mean `1/R`, coefficient of variation `1/sqrt(k)`). The first request is
  due at the stage start, each later one one gap after its predecessor.
* Ramp: the rate rises linearly from 0 to R over `ramp_s`, so the expected number of
  arrivals by time t is `Λ(t) = R t² / (2T)` for t < T and `R (t - T/2)` after. The gaps
  are drawn at the full rate R ("operational time" τ) and every arrival is moved to the
  real time where `Λ(t) = R τ`, i.e. `t = sqrt(2 T τ)` for τ < T/2 and `t = τ + T/2`
  after. Any process keeps its shape; only the clock under it is stretched at the start.
* Arrivals stop at `duration_s` and/or after `max_requests`, whichever comes first.

Gaps are drawn in blocks of `BLOCK` whatever the stopping rule, so the n-th arrival of a
seed is the same whether the stage is limited by time or by count, and memory stays bounded
however long the stage: `blocks()` computes one block ahead of the dispatcher (for a stage
of fewer than `BLOCK` requests that is all of them, up front).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeAlias

import numpy as np
import numpy.typing as npt

from common.proto.loadtest.v1 import run_pb2

ArrivalProcess: TypeAlias = run_pb2.ArrivalProcess.ValueType
OffsetsNs: TypeAlias = npt.NDArray[np.int64]

BLOCK = 16_384

PROCESS_NAMES: dict[ArrivalProcess, str] = {
    run_pb2.ARRIVAL_PROCESS_UNSPECIFIED: "poisson",
    run_pb2.ARRIVAL_PROCESS_POISSON: "poisson",
    run_pb2.ARRIVAL_PROCESS_CONSTANT: "constant",
    run_pb2.ARRIVAL_PROCESS_GAMMA: "gamma",
}


@dataclass(frozen=True, slots=True)
class ArrivalSchedule:
    """The due times of an open-loop stage (offsets from its start)."""

    rate: float
    process: ArrivalProcess = run_pb2.ARRIVAL_PROCESS_POISSON
    burstiness: float = 1.0
    seed: int = 0
    duration_s: float | None = None
    max_requests: int = 0
    ramp_s: float = 0.0

    def __post_init__(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"request rate must be > 0, got {self.rate!r}")
        if self.process not in PROCESS_NAMES:
            raise ValueError(f"unknown arrival process {self.process!r}")
        if self.process == run_pb2.ARRIVAL_PROCESS_GAMMA and not (
            math.isfinite(self.burstiness) and self.burstiness > 0
        ):
            raise ValueError(f"gamma arrivals need burstiness > 0, got {self.burstiness!r}")
        if self.duration_s is None and self.max_requests <= 0:
            raise ValueError("an arrival schedule needs a duration or a request count")
        if self.ramp_s < 0:
            raise ValueError("ramp must not be negative")

    @property
    def process_name(self) -> str:
        """`poisson`, `constant` or `gamma`."""
        return PROCESS_NAMES[self.process]

    def blocks(self) -> Iterator[OffsetsNs]:
        """Due times in ns from the stage start, ascending, one block at a time."""
        rng = np.random.Generator(np.random.PCG64(self.seed))
        deadline_ns = None if self.duration_s is None else int(self.duration_s * 1e9)
        remaining = self.max_requests or None
        tau = 0.0  # operational time of the next arrival, at the full rate
        while remaining is None or remaining > 0:
            gaps = self._gaps(rng)
            # Arrival i of the block is due at tau + (sum of the gaps before it).
            taus = np.empty(BLOCK)
            taus[0] = tau
            np.cumsum(gaps[:-1], out=taus[1:])
            taus[1:] += tau
            tau = float(taus[-1] + gaps[-1])
            offsets = np.rint(self._real_time(taus) * 1e9).astype(np.int64)
            if deadline_ns is not None:
                within = int(np.searchsorted(offsets, deadline_ns, side="left"))
                if within < BLOCK:
                    offsets = offsets[:within]
            if remaining is not None:
                offsets = offsets[:remaining]
                remaining -= len(offsets)
            if len(offsets):
                yield offsets
            if len(offsets) < BLOCK:
                return

    def offsets_ns(self) -> OffsetsNs:
        """Every due time of the stage at once (for tests and small stages)."""
        parts = list(self.blocks())
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def _gaps(self, rng: np.random.Generator) -> npt.NDArray[np.float64]:
        mean = 1.0 / self.rate
        if self.process == run_pb2.ARRIVAL_PROCESS_CONSTANT:
            return np.full(BLOCK, mean)
        if self.process == run_pb2.ARRIVAL_PROCESS_GAMMA:
            k = self.burstiness
            return rng.gamma(shape=k, scale=mean / k, size=BLOCK)
        return rng.exponential(scale=mean, size=BLOCK)

    def _real_time(self, taus: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        """Map operational time (full rate from 0) to stage time under the linear ramp."""
        ramp = self.ramp_s
        if ramp <= 0:
            return taus
        return np.where(taus < ramp / 2, np.sqrt(2.0 * ramp * np.minimum(taus, ramp / 2)), taus + ramp / 2)
