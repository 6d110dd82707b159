"""The mock's serving model computed (`mockserver.capacity`): the formulas, the capacities, and
a discrete-event simulation of the model that they must agree with.

The simulation follows the mock's rules one event at a time: FIFO slots, the first token T0
after taking a slot, each gap `itl + per_running x R` with R read right after the token
before it, the slot released at the last token. It knows nothing of the formulas.
"""

from __future__ import annotations

import heapq
import itertools
import math
import random
import statistics
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest

from client.cli import _parser
from client.envconfig import apply_env_defaults
from mockserver.capacity import (
    ClosedLoopState,
    Objectives,
    Workload,
    closed_loop,
    closed_loop_verdict,
    concurrency_capacity,
    open_loop,
    open_loop_misses,
    rate_capacity,
    share_within_objectives,
)
from mockserver.config import MockConfig
from mockserver.generation import LatencyModel

pytestmark = pytest.mark.timeout(60)

# The worked example of docs/capacity.md.
EXAMPLE = MockConfig(ttft_ms=50, prefill_ms_per_1k_tokens=100, itl_ms=5, itl_per_running_ms=2, max_running=16)
EXAMPLE_WORKLOAD = Workload(prompt_tokens=500, output_tokens=64)


# --- a simulation of the model ----------------------------------------------------------------


@dataclass
class _Request:
    arrival: float
    client: int = -1
    first: float = 0.0
    last: float = 0.0
    written: int = 0


@dataclass
class _Simulation:
    """The mock's serving model, event by event (ms); no network, no lateness, jitter 0."""

    t0: float
    itl: float
    per_running: float
    slots: int
    tokens: int
    generating: int = 0
    queue: deque[_Request] = field(default_factory=deque)
    done: list[_Request] = field(default_factory=list)
    _events: list[tuple[float, int, str, _Request]] = field(default_factory=list)
    _order: Iterator[int] = field(default_factory=itertools.count)

    @classmethod
    def of(cls, config: MockConfig, workload: Workload) -> _Simulation:
        t0 = config.ttft_ms + config.prefill_ms_per_1k_tokens * workload.prompt_tokens / 1000
        return cls(t0, config.itl_ms, config.itl_per_running_ms, config.max_running, workload.output_tokens)

    def _push(self, at: float, kind: str, request: _Request) -> None:
        heapq.heappush(self._events, (at, next(self._order), kind, request))

    def _start(self, now: float, request: _Request) -> None:
        self.generating += 1
        self._push(now + self.t0, "token", request)

    def _arrive(self, now: float, request: _Request) -> None:
        if self.slots and self.generating >= self.slots:
            self.queue.append(request)
        else:
            self._start(now, request)

    def closed_loop(self, clients: int, until_ms: float, stagger_ms: float = 0.0) -> list[_Request]:
        for c in range(clients):
            self._push(c * stagger_ms, "arrival", _Request(c * stagger_ms, client=c))
        return self._run(until_ms, resend=True)

    def evenly_spaced(self, rate: float, until_ms: float, senders: int = 1) -> list[_Request]:
        spacing = senders * 1000.0 / rate
        for j in range(int(until_ms / spacing) + 1):
            for _ in range(senders):
                self._push(j * spacing, "arrival", _Request(j * spacing))
        return self._run(math.inf, resend=False)

    def _run(self, until_ms: float, *, resend: bool) -> list[_Request]:
        while self._events:
            now, _, kind, request = heapq.heappop(self._events)
            if now > until_ms:
                break
            if kind == "arrival":
                self._arrive(now, request)
                continue
            request.written += 1
            if request.written == 1:
                request.first = now
            if request.written < self.tokens:
                # R is read right after the token before the gap was written.
                self._push(now + self.itl + self.per_running * self.generating, "token", request)
                continue
            request.last = now
            self.generating -= 1
            self.done.append(request)
            if self.queue:
                self._start(now, self.queue.popleft())
            if resend:
                self._arrive(now, _Request(now, client=request.client))
        return self.done


@dataclass
class _Measured:
    ttft: list[float]
    tpot: list[float]
    e2e: list[float]
    rate: float  # completions per second in the window


def _measure(done: list[_Request], tokens: int, start_ms: float, end_ms: float) -> _Measured:
    window = [r for r in done if r.arrival >= start_ms and r.last <= end_ms]
    assert len(window) >= 20, "too few requests in the window to compare"
    completed = [r for r in done if start_ms <= r.last <= end_ms]
    return _Measured(
        ttft=[r.first - r.arrival for r in window],
        tpot=[(r.last - r.first) / (tokens - 1) for r in window],
        e2e=[r.last - r.arrival for r in window],
        rate=len(completed) / (end_ms - start_ms) * 1000.0,
    )


# --- closed loop -------------------------------------------------------------------------------


def test_the_worked_example() -> None:
    at8 = closed_loop(EXAMPLE, EXAMPLE_WORKLOAD, 8)
    assert (at8.itl_ms, at8.tpot_ms, at8.ttft_max_ms, at8.service_ms) == (21.0, 21.0, 100.0, 1423.0)
    assert at8.request_rate == pytest.approx(8 / 1.423)
    assert at8.output_token_rate == pytest.approx(8 / 1.423 * 64)
    at17 = closed_loop(EXAMPLE, EXAMPLE_WORKLOAD, 17)
    assert (at17.running, at17.waiting, at17.tpot_ms, at17.service_ms) == (16, 1, 37.0, 2431.0)
    assert (at17.ttft_min_ms, at17.ttft_max_ms) == (100.0, 2531.0)
    assert at17.ttft_mean_ms == pytest.approx(100 + 2431 / 16)
    assert not at17.wait_is_exact
    at32 = closed_loop(EXAMPLE, EXAMPLE_WORKLOAD, 32)
    assert at32.wait_is_exact and at32.ttft_min_ms == at32.ttft_max_ms == 2531.0

    by_tpot = concurrency_capacity(EXAMPLE, EXAMPLE_WORKLOAD, Objectives(tpot_ms=22))
    assert (by_tpot.highest_passing, by_tpot.lowest_failing, by_tpot.limits, by_tpot.exact) == (8, 9, ("tpot",), True)
    assert by_tpot.state == at8
    by_ttft = concurrency_capacity(EXAMPLE, EXAMPLE_WORKLOAD, Objectives(ttft_ms=600))
    assert (by_ttft.highest_passing, by_ttft.lowest_failing, by_ttft.exact) == (16, 20, False)
    low, high = share_within_objectives(at17, Objectives(ttft_ms=600))
    assert low == pytest.approx(1 - 151.9375 / 500) and high == 1.0
    assert closed_loop_verdict(closed_loop(EXAMPLE, EXAMPLE_WORKLOAD, 19), Objectives(ttft_ms=600))[0] == "depends"
    assert closed_loop_verdict(closed_loop(EXAMPLE, EXAMPLE_WORKLOAD, 20), Objectives(ttft_ms=600)) == (
        "fail",
        ("ttft",),
    )

    assert rate_capacity(EXAMPLE, EXAMPLE_WORKLOAD, Objectives(tpot_ms=22)).rate == pytest.approx(5.733, abs=5e-4)
    two = rate_capacity(EXAMPLE, EXAMPLE_WORKLOAD, Objectives(tpot_ms=22), senders=2)
    assert two.rate == pytest.approx(5.766, abs=5e-4)
    by_slots = rate_capacity(EXAMPLE, EXAMPLE_WORKLOAD, Objectives(ttft_ms=600))
    assert by_slots.rate == pytest.approx(16 / 2.431, rel=1e-8)
    assert by_slots.limits == ("throughput",)


@pytest.mark.parametrize(
    ("itl", "per_running", "tpot", "slots", "expected"),
    [
        (5, 2, 22, 0, 8),
        (5, 2, 21, 0, 8),  # an objective equal to the TPOT is met
        (5, 2, 20.999, 0, 7),
        (5, 2, 22, 6, None),  # the slots cap R: TPOT never exceeds 17 ms
        (1, 0.5, 50, 0, 98),
        (10, 0, 10, 0, None),  # nothing grows with the load
        (10, 3, 9, 0, 0),  # even one request is too slow
    ],
)
def test_concurrency_capacity_under_a_tpot_objective(
    itl: float, per_running: float, tpot: float, slots: int, expected: int | None
) -> None:
    config = MockConfig(ttft_ms=20, itl_ms=itl, itl_per_running_ms=per_running, max_running=slots)
    capacity = concurrency_capacity(config, Workload(10, 32), Objectives(tpot_ms=tpot))
    assert capacity.highest_passing == expected
    assert capacity.exact
    if expected:
        assert capacity.limits == ("tpot",)
        assert capacity.state is not None and capacity.state.tpot_ms <= tpot < itl + per_running * (expected + 1)


def _configs() -> Iterator[tuple[MockConfig, Workload, Objectives]]:
    rng = random.Random(7)
    for _ in range(60):
        config = MockConfig(
            ttft_ms=rng.choice([0, 10, 80]),
            prefill_ms_per_1k_tokens=rng.choice([0, 40]),
            itl_ms=rng.choice([0, 2, 5]),
            itl_per_running_ms=rng.choice([0, 0.5, 2]),
            max_running=rng.choice([0, 1, 3, 8]),
        )
        workload = Workload(rng.choice([0, 300]), rng.choice([1, 2, 16, 40]))
        objectives = Objectives(
            ttft_ms=rng.choice([None, 30.0, 150.0, 700.0]),
            tpot_ms=rng.choice([None, 8.0, 20.0]),
            e2e_ms=rng.choice([None, 500.0, 2000.0]),
            goodput_target=rng.choice([0.5, 0.9, 0.99, 1.0]),
        )
        yield config, workload, objectives


@pytest.mark.parametrize(("config", "workload", "objectives"), list(_configs()))
def test_concurrency_capacity_is_what_a_scan_of_every_concurrency_finds(
    config: MockConfig, workload: Workload, objectives: Objectives
) -> None:
    capacity = concurrency_capacity(config, workload, objectives)
    highest, lowest_failing = capacity.highest_passing, capacity.lowest_failing
    scan = min((lowest_failing or highest or 0) + 40, 3000)
    for c in range(1, scan + 1):
        verdict, _ = closed_loop_verdict(closed_loop(config, workload, c), objectives)
        if highest is None or c <= highest:
            expected = "pass"
        elif lowest_failing is None or c < lowest_failing:
            expected = "depends"
        else:
            expected = "fail"
        assert verdict == expected, c
    assert capacity.exact == (highest is None or lowest_failing == highest + 1)


@pytest.mark.parametrize(
    ("clients", "slots", "stagger_ms"),
    [(1, 0, 0.0), (6, 0, 0.0), (4, 4, 3.0), (6, 4, 0.0), (6, 4, 37.0), (8, 4, 11.0), (11, 3, 0.0), (11, 3, 29.0)],
)
def test_closed_loop_agrees_with_the_simulation(clients: int, slots: int, stagger_ms: float) -> None:
    config = MockConfig(ttft_ms=30, prefill_ms_per_1k_tokens=50, itl_ms=3, itl_per_running_ms=2, max_running=slots)
    workload = Workload(prompt_tokens=200, output_tokens=16)
    state = closed_loop(config, workload, clients)
    horizon = 120 * state.e2e_max_ms
    done = _Simulation.of(config, workload).closed_loop(clients, horizon, stagger_ms)
    measured = _measure(done, 16, 20 * state.e2e_max_ms, horizon)
    tie = 1e-6
    assert min(measured.tpot) == pytest.approx(state.tpot_ms) and max(measured.tpot) == pytest.approx(state.tpot_ms)
    assert state.ttft_min_ms - tie <= min(measured.ttft) and max(measured.ttft) <= state.ttft_max_ms + tie
    assert statistics.mean(measured.ttft) == pytest.approx(state.ttft_mean_ms, rel=0.02)
    assert state.e2e_min_ms - tie <= min(measured.e2e) and max(measured.e2e) <= state.e2e_max_ms + tie
    assert measured.rate == pytest.approx(state.request_rate, rel=0.03)
    # Whatever the phases, the share within an objective stays within the computed bounds.
    for ttft in (state.ttft_min_ms, state.ttft_mean_ms, (state.ttft_mean_ms + state.ttft_max_ms) / 2):
        objectives = Objectives(ttft_ms=ttft)
        low, high = share_within_objectives(state, objectives)
        share = sum(t <= ttft + tie for t in measured.ttft) / len(measured.ttft)
        assert low - 0.02 <= share <= high + 0.02, (ttft, low, share, high)


def test_a_queue_the_slots_divide_makes_every_wait_the_same() -> None:
    config = MockConfig(ttft_ms=10, itl_ms=2, itl_per_running_ms=4, max_running=3)
    state = closed_loop(config, Workload(0, 10), 9)
    assert state.wait_is_exact
    service = 10 + 9 * (2 + 4 * 3)
    assert state.service_ms == service
    assert state.ttft_min_ms == state.ttft_max_ms == 10 + 2 * service
    assert closed_loop_verdict(state, Objectives(ttft_ms=10 + 2 * service)) == ("pass", ())
    assert closed_loop_verdict(state, Objectives(ttft_ms=10 + 2 * service - 1)) == ("fail", ("ttft",))


def test_an_e2e_objective_counts_the_wait_and_the_decode() -> None:
    config = MockConfig(ttft_ms=10, itl_ms=2, itl_per_running_ms=4, max_running=3)
    state = closed_loop(config, Workload(0, 10), 9)  # every request waits 2 S, then holds S
    assert state.e2e_min_ms == state.e2e_max_ms == 3 * state.service_ms
    assert closed_loop_verdict(state, Objectives(e2e_ms=3 * state.service_ms))[0] == "pass"
    assert closed_loop_verdict(state, Objectives(e2e_ms=3 * state.service_ms - 0.5))[0] == "fail"


def test_a_ttft_objective_below_the_prefill_leaves_no_capacity() -> None:
    config = MockConfig(ttft_ms=20, prefill_ms_per_1k_tokens=100, itl_ms=5)
    workload = Workload(prompt_tokens=1000, output_tokens=8)  # T0 = 120 ms
    assert closed_loop(config, workload, 1).ttft_max_ms == 120.0
    nothing = concurrency_capacity(config, workload, Objectives(ttft_ms=119))
    assert (nothing.highest_passing, nothing.lowest_failing, nothing.limits, nothing.state) == (0, 1, ("ttft",), None)
    assert rate_capacity(config, workload, Objectives(ttft_ms=119)).rate == 0.0
    assert concurrency_capacity(config, workload, Objectives(ttft_ms=120)).highest_passing is None


# --- open loop ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ttft", "itl", "per_running", "slots", "tokens", "rate", "senders"),
    [
        (50, 5, 2, 0, 32, 2.0, 1),  # never overlapping: R = 1
        (50, 5, 2, 0, 32, 5.0, 1),
        (50, 5, 2, 0, 32, 8.0, 1),
        (50, 5, 2, 0, 32, 13.0, 1),
        (20, 4, 1.5, 0, 64, 8.0, 1),
        (100, 2, 3, 12, 16, 13.0, 1),
        (30, 3, 1, 0, 24, 20.0, 2),
        (30, 3, 1, 0, 24, 30.0, 3),
    ],
)
def test_open_loop_agrees_with_the_simulation(
    ttft: float, itl: float, per_running: float, slots: int, tokens: int, rate: float, senders: int
) -> None:
    config = MockConfig(ttft_ms=ttft, itl_ms=itl, itl_per_running_ms=per_running, max_running=slots)
    workload = Workload(0, tokens)
    state = open_loop(config, workload, rate, senders=senders)
    assert not state.overloaded
    horizon = max(400 * state.service_ms, 60_000 / rate)
    done = _Simulation.of(config, workload).evenly_spaced(rate, horizon, senders)
    measured = _measure(done, tokens, 0.2 * horizon, 0.9 * horizon)
    assert max(measured.ttft) == pytest.approx(ttft)  # nobody waits
    # Every request sees the same (the simulation counts gaps one by one, the model as a fluid).
    assert max(measured.tpot) - min(measured.tpot) < 0.02 * state.tpot_ms
    assert statistics.mean(measured.tpot) == pytest.approx(state.tpot_ms, rel=0.015)
    assert statistics.mean(measured.e2e) == pytest.approx(state.e2e_ms, rel=0.015)
    assert state.running == pytest.approx(rate * state.service_ms / 1000)
    assert state.peak_running >= state.seen_running >= senders


def test_open_loop_overload_with_slots_grows_the_queue() -> None:
    config = MockConfig(ttft_ms=100, itl_ms=2, itl_per_running_ms=3, max_running=12)
    workload = Workload(0, 16)
    limit = rate_capacity(config, workload, Objectives())
    full = 100 + 15 * (2 + 3 * 12)
    assert limit.rate == pytest.approx(12 / full * 1000, rel=1e-8)
    assert limit.limits == ("throughput",)
    above = open_loop(config, workload, limit.rate * 1.01)
    assert above.overloaded and above.request_rate == 0.0
    assert open_loop_misses(above, Objectives()) == ("throughput",)
    done = _Simulation.of(config, workload).evenly_spaced(limit.rate * 1.05, 60_000)
    waits = [r.first - r.arrival - 100 for r in sorted(done, key=lambda r: r.arrival)]
    assert waits[-1] > 1000 > waits[len(waits) // 10]  # the queue grows and grows


def test_without_slots_the_batch_runs_away_at_one_over_n_minus_1_per_running() -> None:
    config = MockConfig(ttft_ms=50, itl_ms=5, itl_per_running_ms=2)
    workload = Workload(0, 32)
    limit = rate_capacity(config, workload, Objectives(ttft_ms=60))
    assert limit.rate == pytest.approx(1000 / (31 * 2))
    assert limit.limits == ("throughput",)
    assert open_loop(config, workload, limit.rate).overloaded
    below = open_loop(config, workload, limit.rate * 0.9)
    assert not below.overloaded and below.service_ms > 5 * open_loop(config, workload, 1.0).service_ms


@pytest.mark.parametrize(("tpot", "slots"), [(22.0, 0), (40.0, 0), (30.0, 64)])
def test_rate_capacity_is_close_to_the_mean_field_closed_forms(tpot: float, slots: int) -> None:
    config = MockConfig(ttft_ms=50, prefill_ms_per_1k_tokens=100, itl_ms=5, itl_per_running_ms=2, max_running=slots)
    workload = Workload(500, 64)
    capacity = rate_capacity(config, workload, Objectives(tpot_ms=tpot))
    running = (tpot - 5) / 2
    assert capacity.rate == pytest.approx(running / (100 + 63 * tpot) * 1000, rel=0.01)
    assert capacity.limits == ("tpot",)
    assert capacity.state is not None and capacity.state.tpot_ms == pytest.approx(tpot)
    assert open_loop_misses(open_loop(config, workload, capacity.rate * 1.001), Objectives(tpot_ms=tpot)) == ("tpot",)
    e2e = 100 + 63 * tpot
    by_e2e = rate_capacity(config, workload, Objectives(e2e_ms=e2e))
    assert by_e2e.rate == pytest.approx((e2e - 100 - 63 * 5) / (63 * 2 * e2e) * 1000, rel=0.01)
    assert by_e2e.limits == ("e2e",)


def test_rate_capacity_of_a_load_nothing_limits_is_infinite() -> None:
    config = MockConfig(ttft_ms=10, itl_ms=5)
    capacity = rate_capacity(config, Workload(0, 8), Objectives(tpot_ms=6))
    assert (capacity.rate, capacity.limits, capacity.state, capacity.output_token_rate) == (math.inf, (), None, 0.0)


# --- styles, one-token requests, validation --------------------------------------------------


def test_several_tokens_per_event_scale_the_gap_and_the_tpot() -> None:
    config = MockConfig(ttft_ms=10, itl_ms=2, itl_per_running_ms=1, style="multi_token")
    state = closed_loop(config, Workload(0, 10), 3)  # events of 4, 4, 2 tokens: 2 steps of 4 ITLs
    assert state.itl_ms == 5.0
    assert state.service_ms == 10 + 8 * 5.0
    assert state.tpot_ms == pytest.approx(8 * 5.0 / 9)


def test_one_output_token_meets_any_tpot_objective() -> None:
    config = MockConfig(ttft_ms=10, itl_ms=50, itl_per_running_ms=5)
    state = closed_loop(config, Workload(0, 1), 40)
    assert (state.tpot_ms, state.service_ms) == (0.0, 10.0)
    assert closed_loop_verdict(state, Objectives(tpot_ms=1)) == ("pass", ())


@pytest.mark.parametrize("name", ["itl_per_running_ms", "prefill_ms_per_1k_tokens"])
@pytest.mark.parametrize("value", [-1.0, math.nan, math.inf, True, "2"])
def test_the_new_flags_refuse_what_is_not_a_finite_number_at_least_0(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        MockConfig(**{name: value})  # type: ignore[arg-type]
    assert getattr(MockConfig(**{name: 0}), name) == 0  # type: ignore[arg-type]


def test_the_model_refuses_what_it_does_not_describe() -> None:
    with pytest.raises(ValueError, match="jitter"):
        closed_loop(MockConfig(jitter_ms=1), Workload(0, 4), 1)
    with pytest.raises(ValueError, match="concurrency"):
        closed_loop(MockConfig(), Workload(0, 4), 0)
    with pytest.raises(ValueError, match="rate"):
        open_loop(MockConfig(), Workload(0, 4), 0.0)
    with pytest.raises(ValueError, match="senders"):
        open_loop(MockConfig(), Workload(0, 4), 1.0, senders=0)
    with pytest.raises(ValueError, match="output_tokens"):
        Workload(0, 0)
    with pytest.raises(ValueError, match="prompt_tokens"):
        Workload(-1, 4)
    with pytest.raises(ValueError, match="goodput_target"):
        Objectives(goodput_target=0.0)
    with pytest.raises(ValueError, match="tpot_ms"):
        Objectives(tpot_ms=math.nan)


def test_the_latency_model_adds_the_prefill_and_the_running_term() -> None:
    model = LatencyModel(50.0, 10.0, 0.0, random.Random(0), itl_per_running_ms=2.0, prefill_ms_per_1k_tokens=40.0)
    assert model.depends_on_running
    assert model.ttft(500) == pytest.approx(0.05 + 0.02)
    assert model.itl(3) == pytest.approx(0.016)
    assert model.generation_time(4, prompt_tokens=1000, running=1) == pytest.approx(0.09 + 3 * 0.012)
    assert not LatencyModel(50.0, 10.0, 0.0, random.Random(0)).depends_on_running


def test_the_flags_and_their_variables() -> None:
    parser, _ = _parser()
    env = {"LLM_LOADTEST_MOCK_ITL_PER_RUNNING_MS": "2.5", "LLM_LOADTEST_MOCK_PREFILL_MS_PER_1K_TOKENS": "40"}
    apply_env_defaults(parser, env)
    args = parser.parse_args(["mock-server"])
    assert (args.itl_per_running_ms, args.prefill_ms_per_1k_tokens) == (2.5, 40.0)
    args = parser.parse_args(["mock-server", "--itl-per-running-ms", "1", "--prefill-ms-per-1k-tokens", "0"])
    assert (args.itl_per_running_ms, args.prefill_ms_per_1k_tokens) == (1.0, 0.0)


def test_states_are_plain_values() -> None:
    # The controller's tests compare a search's probes with these: they must be comparable.
    assert closed_loop(EXAMPLE, EXAMPLE_WORKLOAD, 5) == closed_loop(EXAMPLE, EXAMPLE_WORKLOAD, 5)
    assert isinstance(closed_loop(EXAMPLE, EXAMPLE_WORKLOAD, 5), ClosedLoopState)
