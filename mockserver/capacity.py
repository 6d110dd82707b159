"""The mock model's capacity, computed: the ground truth a capacity search is tested against.

Pure arithmetic on a `MockConfig` and a `Workload`, no I/O; docs/capacity.md ("Ground truth:
the mock's capacity") derives every formula with a worked example. For one mock process
(with `--workers W` each worker has its own slots and its own R: this is one worker) and
jitter 0:

* T0 = `ttft_ms` + `prefill_ms_per_1k_tokens` x prompt tokens / 1000, from taking a slot;
* ITL(R) = `itl_ms` + `itl_per_running_ms` x R per token, R = requests holding a slot, read
  as each gap starts;
* a request of N output tokens holds its slot for S = T0 + (N - 1) x mean ITL.

`closed_loop` / `concurrency_capacity`: C clients, each sending its next request when its
last one ends. With C <= M = `max_running` (or no limit) R = C for every token: TTFT = T0,
TPOT = ITL(C), E2E = S. Above, R = M and each request first waits for the next C - M
completions: between floor((C-M)/M) x S and ceil((C-M)/M) x S depending on how the slots'
completions are phased, (C/M - 1) x S on average, so the capacity may only be bracketed.

`open_loop` / `rate_capacity`: evenly spaced arrivals (the agents' `constant` process; from
one agent, or several in step), where every request sees the same R over its decode, so the
model is exact: S solves S = T0 + (N - 1) x mean gap(S) over the step function R(t) that the
arrival lattice gives; requests would queue once more than M overlap. Poisson arrivals are
not modelled (docs/capacity.md says why).

A load passes when the share of requests meeting every objective is at least the goodput
target. Public names: `Workload`, `Objectives`, `closed_loop` -> `ClosedLoopState`,
`closed_loop_verdict`, `share_within_objectives`, `concurrency_capacity` ->
`ConcurrencyCapacity`, `open_loop` -> `OpenLoopState`, `open_loop_misses`, `rate_capacity` ->
`RateCapacity`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from mockserver.config import MockConfig
from mockserver.styles import ENCODERS

Verdict = Literal["pass", "fail", "depends"]

# Objectives are met by values equal to them: a float sum such as 5 + 2 x 8 must not fail 21.
_TIE_MS = 1e-9
# Loads beyond these count as unbounded (the model's latencies stop growing with load).
_UNBOUNDED_CONCURRENCY = 1 << 40
_UNBOUNDED_RATE = 1e12
# A slot time (ms) the batch's slowdown has run away to, and the most bursts overlapping one
# request that are counted one by one.
_RUNAWAY_MS = 1e12
_MAX_SEGMENTS = 2000


@dataclass(frozen=True)
class Workload:
    """What every request asks of the mock, as the mock counts it.

    Attributes:
        prompt_tokens: The prompt's length as the mock counts it (whitespace-separated
            words, or its tokenizer's tokens, with the template overhead; what it reports
            as `usage.prompt_tokens`).
        output_tokens: Tokens generated per request (`max_tokens` with `ignore_eos`, or the
            mock's `--output-tokens`).
    """

    prompt_tokens: int
    output_tokens: int

    def __post_init__(self) -> None:
        if isinstance(self.prompt_tokens, bool) or not isinstance(self.prompt_tokens, int) or self.prompt_tokens < 0:
            raise ValueError(f"prompt_tokens must be an integer >= 0, got {self.prompt_tokens!r}")
        if isinstance(self.output_tokens, bool) or not isinstance(self.output_tokens, int) or self.output_tokens < 1:
            raise ValueError(f"output_tokens must be an integer >= 1, got {self.output_tokens!r}")


@dataclass(frozen=True)
class Objectives:
    """Per-request objectives in ms (None: not set) and the share of requests that must meet
    all of them for a load to pass (TPOT as the controller defines it: (last token - first
    token) / (output tokens - 1); a one-token request meets any TPOT objective)."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    goodput_target: float = 0.95

    def __post_init__(self) -> None:
        for name in ("ttft_ms", "tpot_ms", "e2e_ms"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int | float) or not math.isfinite(value) or value < 0):
                raise ValueError(f"{name} must be a finite number >= 0 or None, got {value!r}")
        target = self.goodput_target
        if isinstance(target, bool) or not isinstance(target, int | float) or not 0.0 < target <= 1.0:
            raise ValueError(f"goodput_target must be in (0, 1], got {target!r}")


@dataclass(frozen=True)
class ClosedLoopState:
    """The steady state of `concurrency` closed-loop clients (times in ms, rates per second).

    Every request has the same ITL, TPOT and slot time; only the queue wait varies: TTFT lies
    in [`ttft_min_ms`, `ttft_max_ms`] with mean
    `ttft_mean_ms`, all three T0 without a queue; E2E likewise.
    """

    concurrency: int
    running: int  # R: requests holding a slot
    waiting: int  # requests queued for a slot
    itl_ms: float  # per token, ITL(R)
    tpot_ms: float
    service_ms: float  # S: how long a request holds its slot
    ttft_min_ms: float
    ttft_mean_ms: float
    ttft_max_ms: float
    e2e_min_ms: float
    e2e_mean_ms: float
    e2e_max_ms: float
    wait_is_exact: bool  # every request waits the same (no queue, or M divides C)
    request_rate: float  # completions per second
    output_token_rate: float


@dataclass(frozen=True)
class ConcurrencyCapacity:
    """The highest concurrency at which the objectives hold, bracketed.

    `highest_passing`: every concurrency up to it passes whatever the phases of the slots
    (0: even one client fails; None: every concurrency passes). `lowest_failing`: the lowest
    concurrency that fails for certain (None: none does). Between them a load passes or fails
    depending on how the queue's completions are phased; `exact` when there is nothing
    between them. `limits`: the objectives (`ttft`, `tpot`, `e2e`) missed, or possibly missed,
    just above `highest_passing`. `state`: the steady state at `highest_passing` (None when it
    is 0 or None).
    """

    highest_passing: int | None
    lowest_failing: int | None
    limits: tuple[str, ...]
    state: ClosedLoopState | None

    @property
    def exact(self) -> bool:
        """Whether the capacity is known to the request: `lowest_failing` is the next one."""
        if self.highest_passing is None:
            return self.lowest_failing is None
        return self.lowest_failing == self.highest_passing + 1


@dataclass(frozen=True)
class OpenLoopState:
    """The steady state under `rate` requests per second, evenly spaced (times in ms).

    `senders` load generators in step (each at `rate / senders`, all starting together) send
    their requests in bursts of `senders` every `senders / rate` seconds. Every request then
    sees the same: `seen_running`, the number generating averaged over its decode (what its
    ITL uses), and `peak_running` at most. `running` is the average over time (`rate` x S).
    `overloaded`: some requests would wait for a slot (`peak_running > max_running`), or,
    without slots, the batch slows down faster than it drains and has no steady state; the
    other fields are then not meaningful.
    """

    rate: float
    senders: int
    overloaded: bool
    running: float
    seen_running: float
    peak_running: float  # an integer, or inf when the batch runs away
    itl_ms: float  # per token, ITL(seen_running)
    tpot_ms: float
    service_ms: float  # S: how long a request holds its slot
    ttft_ms: float  # T0: nobody waits
    e2e_ms: float  # S
    request_rate: float  # served per second (`rate` unless overloaded)
    output_token_rate: float


@dataclass(frozen=True)
class RateCapacity:
    """The highest request rate (per second) at which the objectives hold, to 1e-9 relative.

    `limits`: what fails just above it (`ttft`, `tpot`, `e2e`, or `throughput` when requests
    would start to wait for a slot or the batch has no steady state). `rate` is `math.inf`
    when nothing limits it. `state`: the steady state at `rate` (None when it is 0 or inf).
    """

    rate: float
    senders: int
    limits: tuple[str, ...]
    state: OpenLoopState | None

    @property
    def output_token_rate(self) -> float:
        """Output tokens per second at capacity."""
        return self.state.output_token_rate if self.state is not None else 0.0


@dataclass(frozen=True)
class _Model:
    """A config and workload reduced to the numbers the formulas use (ms)."""

    t0: float  # ttft + prefill
    itl: float  # per token, before the running term
    per_running: float  # per token per running request
    slots: int  # 0: unlimited
    decode_itls: int  # per-token ITLs between the first and the last token: (events - 1) x tokens per event
    tpot_per_itl: float  # TPOT / ITL(R) (1 for one token per event)
    output_tokens: int

    def itl_at(self, running: float) -> float:
        return self.itl + self.per_running * running

    def service(self, running: float) -> float:
        return self.t0 + self.decode_itls * self.itl_at(running)


def _model(config: MockConfig, workload: Workload) -> _Model:
    if config.jitter_ms:
        raise ValueError("the capacity model assumes jitter_ms = 0")
    if config.prefix_cache:
        raise ValueError("the capacity model assumes no prefix cache (a prompt's prefill would depend on the others)")
    per_event = ENCODERS[config.style].tokens_per_event
    tokens = workload.output_tokens
    decode_itls = (-(-tokens // per_event) - 1) * per_event
    return _Model(
        t0=float(config.ttft_ms) + config.prefill_ms_per_1k_tokens * workload.prompt_tokens / 1000.0,
        itl=float(config.itl_ms),
        per_running=float(config.itl_per_running_ms),
        slots=config.max_running,
        decode_itls=decode_itls,
        # One output token meets any TPOT objective (the controller's rule): TPOT 0.
        tpot_per_itl=0.0 if tokens == 1 else (1.0 if per_event == 1 else decode_itls / (tokens - 1)),
        output_tokens=tokens,
    )


def closed_loop(config: MockConfig, workload: Workload, concurrency: int) -> ClosedLoopState:
    """The steady state of `concurrency` clients, each sending its next request as soon as
    its last one ends (the time between the two taken as 0)."""
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ValueError(f"concurrency must be an integer >= 1, got {concurrency!r}")
    m = _model(config, workload)
    running = min(concurrency, m.slots) if m.slots else concurrency
    itl = m.itl_at(running)
    service = m.service(running)
    queued = concurrency - running
    if queued:
        # Each request waits for the next `queued` completions after its own; the slots
        # complete once each per `service`, in some phase order.
        rounds, rest = divmod(queued, running)
        wait_min = rounds * service
        wait_max = (rounds + (1 if rest else 0)) * service
        wait_mean = queued / running * service
    else:
        wait_min = wait_max = wait_mean = 0.0
    request_rate = running / service * 1000.0 if service > 0 else math.inf
    return ClosedLoopState(
        concurrency=concurrency,
        running=running,
        waiting=queued,
        itl_ms=itl,
        tpot_ms=itl * m.tpot_per_itl,
        service_ms=service,
        ttft_min_ms=m.t0 + wait_min,
        ttft_mean_ms=m.t0 + wait_mean,
        ttft_max_ms=m.t0 + wait_max,
        e2e_min_ms=service + wait_min,
        e2e_mean_ms=service + wait_mean,
        e2e_max_ms=service + wait_max,
        wait_is_exact=wait_min == wait_max,
        request_rate=request_rate,
        output_token_rate=request_rate * workload.output_tokens,
    )


def closed_loop_verdict(state: ClosedLoopState, objectives: Objectives) -> tuple[Verdict, tuple[str, ...]]:
    """Whether a closed-loop load passes (the share of requests meeting every objective is
    at least the goodput target): `pass` or `fail` whatever the phases of the queue's
    completions, or `depends` on them; with the objectives that are (or may be) missed."""
    if _misses(objectives, ttft=0.0, tpot=state.tpot_ms, e2e=0.0):
        return "fail", ("tpot",)  # every request alike
    low, high = share_within_objectives(state, objectives)
    missed = _misses(objectives, ttft=state.ttft_max_ms, tpot=state.tpot_ms, e2e=state.e2e_max_ms)
    if low >= objectives.goodput_target:
        return "pass", ()
    if high < objectives.goodput_target:
        return "fail", missed
    return "depends", missed


def share_within_objectives(state: ClosedLoopState, objectives: Objectives) -> tuple[float, float]:
    """Bounds of the share of requests whose TTFT and E2E meet their objectives, over every
    phase order of the queue's completions (TPOT, the same for all, is not considered).

    Only the queue wait varies: TTFT lies in [lo, hi] with mean mu (exact by Little's law),
    and a request meets both objectives iff its TTFT <= theta = min(ttft objective, e2e
    objective - (S - T0)). With a share p at or below theta, mu >= (1 - p) theta + p lo and
    mu <= p theta + (1 - p) hi, which bound p from below and above.
    """
    decode = state.e2e_min_ms - state.ttft_min_ms  # S - T0, the same for every request
    theta = math.inf
    if objectives.ttft_ms is not None:
        theta = objectives.ttft_ms
    if objectives.e2e_ms is not None:
        theta = min(theta, objectives.e2e_ms - decode)
    theta += _TIE_MS
    low, mean, high = state.ttft_min_ms, state.ttft_mean_ms, state.ttft_max_ms
    if high <= theta:
        return 1.0, 1.0
    if theta < low:
        return 0.0, 0.0
    at_least = max(0.0, 1.0 - (mean - low) / (theta - low)) if theta > low else 0.0
    at_most = min(1.0, (high - mean) / (high - theta))
    return at_least, at_most


def concurrency_capacity(config: MockConfig, workload: Workload, objectives: Objectives) -> ConcurrencyCapacity:
    """The highest concurrency at which `objectives` hold: `highest_passing` and
    `lowest_failing`, both certain, and neighbours unless the boundary lies in the queue."""

    def certain_pass(c: int) -> bool:
        return closed_loop_verdict(closed_loop(config, workload, c), objectives)[0] == "pass"

    def may_pass(c: int) -> bool:
        return closed_loop_verdict(closed_loop(config, workload, c), objectives)[0] != "fail"

    # Both are monotone in the concurrency: latencies and waits only grow with it.
    highest = _highest_true(certain_pass)
    possible = _highest_true(may_pass)
    lowest_failing = None if possible is None else possible + 1
    if highest is None:
        return ConcurrencyCapacity(None, None, (), None)
    _, limits = closed_loop_verdict(closed_loop(config, workload, highest + 1), objectives)
    state = closed_loop(config, workload, highest) if highest else None
    return ConcurrencyCapacity(highest, lowest_failing, limits, state)


def open_loop(config: MockConfig, workload: Workload, rate: float, *, senders: int = 1) -> OpenLoopState:
    """The steady state under `rate` requests per second, evenly spaced, from `senders`
    generators in step (bursts of `senders` requests every `senders / rate` seconds)."""
    if isinstance(rate, bool) or not isinstance(rate, int | float) or not math.isfinite(rate) or rate <= 0:
        raise ValueError(f"rate must be a finite number > 0, got {rate!r}")
    if isinstance(senders, bool) or not isinstance(senders, int) or senders < 1:
        raise ValueError(f"senders must be an integer >= 1, got {senders!r}")
    m = _model(config, workload)
    spacing = senders * 1000.0 / rate  # ms between bursts
    service = _steady_service(m, spacing, senders)
    overloaded = service is None
    if service is None:
        service = m.service(m.slots) if m.slots else math.inf
    # Bursts that started within the last S ms (half-open), each of `senders`.
    peak = senders * max(math.ceil(service / spacing - 1e-12), 1) if math.isfinite(service) else math.inf
    if m.slots and peak > m.slots:
        overloaded = True
    gap = _mean_gap(m, service, spacing, senders) if math.isfinite(service) else math.inf
    served = 0.0 if overloaded else rate
    return OpenLoopState(
        rate=rate,
        senders=senders,
        overloaded=overloaded,
        running=rate * service / 1000.0,
        seen_running=(gap - m.itl) / m.per_running if m.per_running else float(senders),
        peak_running=peak,
        itl_ms=gap,
        tpot_ms=gap * m.tpot_per_itl,
        service_ms=service,
        ttft_ms=m.t0,
        e2e_ms=service,
        request_rate=served,
        output_token_rate=served * workload.output_tokens,
    )


def open_loop_misses(state: OpenLoopState, objectives: Objectives) -> tuple[str, ...]:
    """The objectives an open-loop load misses (every request alike); `throughput` when it
    is overloaded."""
    if state.overloaded:
        return ("throughput",)
    return _misses(objectives, ttft=state.ttft_ms, tpot=state.tpot_ms, e2e=state.e2e_ms)


def rate_capacity(config: MockConfig, workload: Workload, objectives: Objectives, *, senders: int = 1) -> RateCapacity:
    """The highest evenly spaced request rate (per second) at which `objectives` hold
    (bisection on the monotone pass/fail of `open_loop`)."""

    def misses(rate: float) -> tuple[str, ...]:
        return open_loop_misses(open_loop(config, workload, rate, senders=senders), objectives)

    low = 1e-9
    if missed := misses(low):
        return RateCapacity(0.0, senders, missed, None)
    m = _model(config, workload)
    if not m.slots and m.decode_itls and m.per_running and objectives.tpot_ms is None and objectives.e2e_ms is None:
        # TTFT is T0 at any rate: the limit is where the batch runs away (never reached).
        return RateCapacity(1000.0 / (m.decode_itls * m.per_running), senders, ("throughput",), None)
    high = 1.0
    while not misses(high):
        low, high = high, high * 2.0
        if high > _UNBOUNDED_RATE:
            return RateCapacity(math.inf, senders, (), None)
    while high - low > 1e-9 * high:
        middle = (low + high) / 2.0
        if misses(middle):
            high = middle
        else:
            low = middle
    return RateCapacity(low, senders, misses(high), open_loop(config, workload, low, senders=senders))


def _steady_service(m: _Model, spacing: float, burst: int) -> float | None:
    """The slot time S of evenly spaced bursts: the least S = T0 + (N-1) x mean gap(S), or
    None when there is none the slots allow (requests would queue) or the batch runs away."""
    per_ms = burst / spacing
    if m.decode_itls == 0 or m.per_running == 0:
        return m.service(burst)
    if m.decode_itls * m.per_running * per_ms >= 1.0:
        return None  # each arrival adds more decode time to the batch than the spacing drains

    def excess(service: float) -> float:
        return service - m.t0 - m.decode_itls * _mean_gap(m, service, spacing, burst)

    low = m.service(burst)  # nobody else running: the shortest possible
    if excess(low) >= 0.0:
        return low
    if m.slots:
        high = m.service(m.slots)
        if excess(high) < 0.0:
            return None  # more than `max_running` on average: some would wait
    else:
        # The mean-field solution (R = rate x S) is within a few gaps of the lattice's.
        high = 2.0 * low / (1.0 - m.decode_itls * m.per_running * per_ms)
        while excess(high) < 0.0:
            high *= 2.0
            if high > _RUNAWAY_MS:
                return None
    while high - low > 1e-12 * high:
        middle = (low + high) / 2.0
        if excess(middle) < 0.0:
            low = middle
        else:
            high = middle
    return high


def _mean_gap(m: _Model, service: float, spacing: float, burst: int) -> float:
    """The mean gap between tokens (per token, ms) of a request decoding over [T0, S) while
    bursts of `burst` requests start every `spacing` ms and each holds its slot for S.

    R is a step function over the decode; a stretch of length L with R running holds
    L / ITL(R) gaps (each gap reads R when it starts), so the mean gap is
    D / sum(L / ITL(R)), D = S - T0: gaps at a high R are longer, so fewer of them fit.
    """
    decode = service - m.t0
    if decode <= 0.0 or m.per_running == 0.0:
        return m.itl_at(burst)
    per_ms = burst / spacing
    if per_ms * service > _MAX_SEGMENTS:
        return m.itl_at(per_ms * service)  # so many bursts overlap that R is rate x S to 1e-4
    # Where R changes: a burst starts (j x spacing) or ends (j x spacing + S) in the decode.
    starts = [j * spacing for j in range(math.floor(m.t0 / spacing) + 1, math.ceil(service / spacing))]
    ends = [service - j * spacing for j in range(math.ceil(decode / spacing) - 1, 0, -1)]
    edges = sorted([m.t0, *starts, *ends, service])
    gaps = 0.0
    for left, right in itertools.pairwise(edges):
        if right <= left:
            continue
        middle = (left + right) / 2.0
        # Bursts alive at `middle`: those with j x spacing in (middle - S, middle].
        running = burst * (math.floor(middle / spacing) - math.floor((middle - service) / spacing))
        gaps += (right - left) / m.itl_at(running)
    return decode / gaps


def _misses(objectives: Objectives, *, ttft: float, tpot: float, e2e: float) -> tuple[str, ...]:
    missed = []
    for name, value, limit in (
        ("ttft", ttft, objectives.ttft_ms),
        ("tpot", tpot, objectives.tpot_ms),
        ("e2e", e2e, objectives.e2e_ms),
    ):
        if limit is not None and value > limit + _TIE_MS:
            missed.append(name)
    return tuple(missed)


def _highest_true(predicate: Callable[[int], bool]) -> int | None:
    """The highest n >= 1 with `predicate(n)` for a predicate true up to some n and false
    after: 0 when false at 1, None when still true at `_UNBOUNDED_CONCURRENCY`."""
    if not predicate(1):
        return 0
    low, high = 1, 2
    while predicate(high):
        if high >= _UNBOUNDED_CONCURRENCY:
            return None
        low, high = high, high * 2
    while high - low > 1:
        middle = (low + high) // 2
        if predicate(middle):
            low = middle
        else:
            high = middle
    return low
