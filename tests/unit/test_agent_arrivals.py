"""ArrivalSchedule: counts, spacing (coefficient of variation), seeding, ramp and limits."""

from __future__ import annotations

import numpy as np
import pytest

from agent.arrivals import BLOCK, ArrivalSchedule
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(60)

POISSON = run_pb2.ARRIVAL_PROCESS_POISSON
CONSTANT = run_pb2.ARRIVAL_PROCESS_CONSTANT
GAMMA = run_pb2.ARRIVAL_PROCESS_GAMMA
NS = 1e9


def cv(offsets: np.ndarray) -> float:
    gaps = np.diff(offsets)
    return float(gaps.std() / gaps.mean())


def test_poisson_rate_and_spacing() -> None:
    offsets = ArrivalSchedule(rate=50, process=POISSON, seed=1, duration_s=20).offsets_ns()
    assert abs(len(offsets) - 1000) <= 30
    assert 0.9 <= cv(offsets) <= 1.1
    assert np.diff(offsets).mean() == pytest.approx(20 * NS / 1000, rel=0.05)
    assert offsets[0] == 0  # the first request is due at the stage start
    assert offsets[-1] < 20 * NS
    assert (np.diff(offsets) >= 0).all()


def test_poisson_counts_over_many_seeds() -> None:
    # The count of one seed is Poisson (sd ~3 %); its mean over seeds pins the rate.
    counts = [len(ArrivalSchedule(rate=50, seed=s, duration_s=20).offsets_ns()) for s in range(1, 41)]
    assert np.mean(counts) == pytest.approx(1000, rel=0.01)
    assert np.std(counts) == pytest.approx(np.sqrt(1000), rel=0.35)


def test_gamma_burstiness_sets_the_coefficient_of_variation() -> None:
    bursty = ArrivalSchedule(rate=50, process=GAMMA, burstiness=0.25, seed=3, max_requests=20_000).offsets_ns()
    assert 1.8 <= cv(bursty) <= 2.2  # 1 / sqrt(0.25)
    assert np.diff(bursty).mean() == pytest.approx(NS / 50, rel=0.05)
    smooth = ArrivalSchedule(rate=50, process=GAMMA, burstiness=4, seed=3, max_requests=20_000).offsets_ns()
    assert 0.45 <= cv(smooth) <= 0.55  # 1 / sqrt(4)


def test_constant_spacing() -> None:
    offsets = ArrivalSchedule(rate=50, process=CONSTANT, seed=1, duration_s=20).offsets_ns()
    assert cv(offsets) < 0.05
    assert len(offsets) == 1000
    assert offsets[:3].tolist() == [0, 20_000_000, 40_000_000]


@pytest.mark.parametrize("process", [POISSON, GAMMA])
def test_same_seed_same_schedule_other_seed_other_schedule(process: run_pb2.ArrivalProcess.ValueType) -> None:
    def offsets(seed: int) -> np.ndarray:
        return ArrivalSchedule(rate=20, process=process, burstiness=0.5, seed=seed, duration_s=30).offsets_ns()

    assert np.array_equal(offsets(7), offsets(7))
    a, b = offsets(7), offsets(8)
    assert len(a) != len(b) or not np.array_equal(a, b)
    assert not np.array_equal(a[1:100], b[1:100])


def test_the_nth_arrival_does_not_depend_on_the_stopping_rule() -> None:
    by_time = ArrivalSchedule(rate=100, seed=4, duration_s=300).offsets_ns()
    by_count = ArrivalSchedule(rate=100, seed=4, max_requests=len(by_time) - 10).offsets_ns()
    assert len(by_time) > BLOCK  # spans several blocks
    assert np.array_equal(by_time[: len(by_count)], by_count)


def test_request_budget_caps_the_count() -> None:
    assert len(ArrivalSchedule(rate=50, seed=1, duration_s=20, max_requests=300).offsets_ns()) == 300
    assert len(ArrivalSchedule(rate=50, seed=1, max_requests=BLOCK + 5).offsets_ns()) == BLOCK + 5
    # With both limits, whichever comes first: here the duration.
    assert len(ArrivalSchedule(rate=50, process=CONSTANT, duration_s=2, max_requests=10_000).offsets_ns()) == 100


def test_blocks_bound_memory_for_long_stages() -> None:
    schedule = ArrivalSchedule(rate=1000, seed=2, duration_s=3600)
    blocks = schedule.blocks()
    first = next(blocks)
    assert len(first) == BLOCK
    second = next(blocks)
    assert second[0] > first[-1]


@pytest.mark.parametrize("process", [POISSON, CONSTANT, GAMMA])
def test_ramp_rate_rises_linearly(process: run_pb2.ArrivalProcess.ValueType) -> None:
    ramp_s = 40.0
    schedule = ArrivalSchedule(rate=100, process=process, burstiness=2, seed=9, duration_s=60, ramp_s=ramp_s)
    offsets = schedule.offsets_ns()
    in_ramp = int((offsets < ramp_s * NS).sum())
    first_half = int((offsets < ramp_s / 2 * NS).sum())
    assert in_ramp == pytest.approx(100 * ramp_s / 2, rel=0.05)  # Λ(T) = R T / 2
    assert first_half / in_ramp == pytest.approx(0.25, abs=0.03)  # Λ(T/2) = Λ(T) / 4
    after = int((offsets >= ramp_s * NS).sum())
    assert after == pytest.approx(100 * 20, rel=0.05)  # full rate after the ramp


def test_ramp_constant_arrivals_follow_the_integrated_rate() -> None:
    # Arrival i is where Λ(t) = R t^2 / (2 T) reaches i: t = sqrt(2 T i / R).
    offsets = ArrivalSchedule(rate=10, process=CONSTANT, duration_s=10, ramp_s=8).offsets_ns()
    expected = [np.sqrt(2 * 8 * i / 10) for i in range(40)]  # all within the ramp: i / R < T / 2
    assert offsets[:40] / NS == pytest.approx(expected, abs=1e-6)
    assert offsets[40] / NS == pytest.approx(8.0)  # τ = T/2 maps to t = T
    assert offsets[41] / NS == pytest.approx(8.1)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": 0, "duration_s": 1},
        {"rate": float("nan"), "duration_s": 1},
        {"rate": 1},
        {"rate": 1, "duration_s": 1, "process": GAMMA, "burstiness": 0},
        {"rate": 1, "duration_s": 1, "process": 42},
        {"rate": 1, "duration_s": 1, "ramp_s": -1},
    ],
)
def test_invalid_schedules(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError, match=r"."):
        ArrivalSchedule(**kwargs)  # type: ignore[arg-type]
