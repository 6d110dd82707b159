"""controller/domain/results/groups.py with known numbers: a group's figures are the means over
its SUCCEEDED runs, their intervals t(N-1) * s / sqrt(N) around them, never narrower than the
runs' own intervals combined; counts summed; checks judged on the group's figures."""

from __future__ import annotations

import math

import pytest

from common.codes import RunState
from common.proto.loadtest.v1 import run_pb2
from common.stats import t_value, z_value
from controller.domain.results.groups import GroupMember, combine, group_result, group_state

pytestmark = pytest.mark.timeout(30)

T2_95 = 4.302653  # Student t, 2 degrees of freedom, two-sided 95 % (tables)
Z95 = 1.959964


def interval(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> run_pb2.Interval:
    return run_pb2.Interval(low=low, high=high, low_open=low_open, high_open=high_open)


def stage(
    index: int = 0,
    *,
    p99: float = 10.0,
    p99_ci: run_pb2.Interval | None = None,
    ok: int = 100,
    failed: int = 0,
    throughput: float = 5.0,
    **fields: object,
) -> run_pb2.StageResult:
    s = run_pb2.StageResult(
        index=index, name=f"s{index}", requests_ok=ok, requests_failed=failed, request_throughput=throughput
    )
    s.ttft.count = ok
    s.ttft.p99_ms = p99
    s.ttft.mean_ms = p99 / 2
    if p99_ci is not None:
        s.ttft.p99_ci.CopyFrom(p99_ci)
    for name, value in fields.items():
        if isinstance(value, run_pb2.Interval):
            getattr(s, name).CopyFrom(value)
        elif isinstance(value, dict):
            getattr(s, name).update(value)
        else:
            setattr(s, name, value)
    return s


def member(
    i: int, stages: list[run_pb2.StageResult], state: int = RunState.SUCCEEDED, warnings: tuple[str, ...] = ()
) -> GroupMember:
    result = run_pb2.RunResult(
        run_id=f"run_{i}", state=state, stages=stages, warnings=warnings, confidence_percent=95.0
    )  # type: ignore[arg-type]
    return GroupMember(f"run_{i}", i, state, "" if state == RunState.SUCCEEDED else "it broke", result)


def test_the_tabulated_constants_are_the_ones_the_module_uses() -> None:
    assert t_value(95, 2) == pytest.approx(T2_95, abs=1e-5)
    assert z_value(95) == pytest.approx(Z95, abs=1e-5)


def test_three_runs_p99_10_12_14_make_12_with_the_t_interval_of_their_spread() -> None:
    narrow = [interval(v - 0.1, v + 0.1) for v in (10, 12, 14)]  # own intervals far narrower than the spread
    members = [member(i, [stage(p99=v, p99_ci=narrow[i])]) for i, v in enumerate((10.0, 12.0, 14.0))]
    result = group_result("grp_x", members)
    p99 = result.stages[0].ttft
    half = T2_95 * 2.0 / math.sqrt(3)  # s of 10, 12, 14 is 2
    assert p99.p99_ms == pytest.approx(12.0)
    assert (p99.p99_ci.low, p99.p99_ci.high) == (pytest.approx(12 - half, abs=1e-4), pytest.approx(12 + half, abs=1e-4))
    assert not p99.p99_ci.low_open and not p99.p99_ci.high_open
    assert result.stages[0].repeats == 3
    assert (result.run_id, result.group.id, result.confidence_percent) == ("grp_x", "grp_x", 95.0)
    assert list(result.group.run_ids) == list(result.group.counted_run_ids) == ["run_0", "run_1", "run_2"]


def test_runs_that_agree_get_no_narrower_interval_than_their_own_allow() -> None:
    # Three identical p99s: no spread, but each run's own interval is [10, 14].
    members = [member(i, [stage(p99=12.0, p99_ci=interval(10.0, 14.0))]) for i in range(3)]
    p99 = group_result("grp_x", members).stages[0].ttft
    se_each = 4.0 / (2 * Z95)
    half = Z95 * math.sqrt(se_each**2 / 3)  # the runs' own intervals combined: z * sqrt(mean(se_i^2) / N)
    assert p99.p99_ms == pytest.approx(12.0)
    assert p99.p99_ci.high - p99.p99_ci.low == pytest.approx(2 * half, rel=1e-6)
    # Wider spread than the floor: the spread decides.
    value, spread = combine([10.0, 12.0, 14.0], [interval(11.9, 12.1)] * 3, 95.0)
    assert spread is not None and spread.high - 12.0 == pytest.approx(T2_95 * 2 / math.sqrt(3), abs=1e-4)
    # Runs without intervals: only the spread.
    value, bare = combine([1.0, 3.0], [None, None], 95.0)
    assert value == 2.0 and bare is not None
    assert bare.high - value == pytest.approx(t_value(95, 1) * math.sqrt(2) / math.sqrt(2))


def test_one_counted_run_gives_its_own_figures_and_intervals() -> None:
    own = interval(9.0, 13.5, high_open=True)
    members = [
        member(0, [stage(p99=11.0, p99_ci=own)]),
        member(1, [stage(p99=50.0)], state=RunState.FAILED),
        GroupMember("run_2", 2, RunState.CANCELLED, "group cancelled", None),
    ]
    result = group_result("grp_x", members)
    p99 = result.stages[0].ttft
    assert p99.p99_ms == 11.0 and p99.p99_ci == own
    assert list(result.group.counted_run_ids) == ["run_0"]
    assert result.stages[0].requests_ok == 100  # the failed run's requests are not counted
    assert result.state == RunState.FAILED  # the first repeat that did not succeed
    assert any(w.startswith("repeat 1 (run_1) ended FAILED (it broke): not counted") for w in result.warnings)
    assert any("repeat 2 (run_2) ended CANCELLED (group cancelled)" in w for w in result.warnings)
    assert any("one run counted" in w for w in result.warnings)


def test_counts_are_summed_and_stages_matched_by_index() -> None:
    a = [
        stage(0, ok=90, failed=10, prompt_tokens=900, output_tokens=1800, errors={"timeout": 6, "http_5xx": 4}),
        stage(1, ok=50),
    ]
    b = [stage(0, ok=80, failed=20, prompt_tokens=800, output_tokens=1600, errors={"timeout": 20})]
    result = group_result("grp_x", [member(0, a, warnings=("the server closed connections",)), member(1, b)])
    first, second = result.stages
    assert (first.requests_ok, first.requests_failed) == (170, 30)
    assert (first.prompt_tokens, first.output_tokens) == (1700, 3400)
    assert dict(first.errors) == {"timeout": 26, "http_5xx": 4}
    assert first.ttft.count == 170
    assert first.error_rate == pytest.approx((0.1 + 0.2) / 2)  # the mean of the runs' rates
    assert (second.index, second.repeats, second.requests_ok) == (1, 1, 50)
    assert "stage 1 ran in 1 of the 2 counted runs" in result.warnings
    assert "run_0: the server closed connections" in result.warnings
    assert result.state == RunState.SUCCEEDED and result.verdict == run_pb2.VERDICT_NONE


def test_other_figures_min_max_pooled_std_and_flags() -> None:
    a, b = stage(max_event_loop_lag_ms=3.0, duration_s=10.0), stage(max_event_loop_lag_ms=7.0, duration_s=12.0)
    # Run a's TTFTs were {1, 3} (mean 2, std 1), run b's {5, 7} (mean 6, std 1): pooled, {1, 3, 5, 7}.
    for s, (mean, low, high) in ((a, (2.0, 1.0, 3.0)), (b, (6.0, 5.0, 7.0))):
        s.ttft.count, s.ttft.mean_ms, s.ttft.std_ms, s.ttft.min_ms, s.ttft.max_ms = 2, mean, 1.0, low, high
    b.saturated, b.saturation_reason = True, "loop lag 70 ms"
    merged = group_result("grp_x", [member(0, [a]), member(1, [b])]).stages[0]
    assert merged.ttft.std_ms == pytest.approx(math.sqrt(5.0))
    assert (merged.ttft.min_ms, merged.ttft.max_ms, merged.ttft.mean_ms) == (1.0, 7.0, 4.0)
    assert (merged.max_event_loop_lag_ms, merged.duration_s) == (7.0, 11.0)
    assert merged.saturated and merged.saturation_reason == "run_1: loop lag 70 ms"


def test_open_sides_carry_over_and_fractions_stay_in_bounds() -> None:
    members = [
        member(0, [stage(p99=10.0, p99_ci=interval(9.0, 10.0, high_open=True), ok=1, failed=99)]),
        member(1, [stage(p99=11.0, p99_ci=interval(10.0, 11.0), ok=99, failed=1)]),
    ]
    merged = group_result("grp_x", members).stages[0]
    assert merged.ttft.p99_ci.high_open and not merged.ttft.p99_ci.low_open
    assert merged.error_rate == pytest.approx(0.5)
    assert merged.error_rate_ci.low == 0.0 and merged.error_rate_ci.high == 1.0  # t(1) is 12.7: clamped


def test_checks_are_judged_on_the_group_figures() -> None:
    members = [member(i, [stage(p99=v, ok=100, failed=2)]) for i, v in enumerate((10.0, 12.0, 14.0))]
    checks = [("p99(ttft) < 13ms", False), ("requests_failed <= 2", False), ("request_throughput > 6", False)]
    result = group_result("grp_x", members, checks)
    by_expression = {c.expression: c for c in result.checks}
    assert by_expression["p99(ttft) < 13ms"].passed and by_expression["p99(ttft) < 13ms"].measured == 12.0
    assert by_expression["requests_failed <= 2"].passed  # the mean per run, not the sum (6)
    assert not by_expression["request_throughput > 6"].passed
    assert result.verdict == run_pb2.VERDICT_FAIL
    assert [c.expression for c in result.stages[0].checks] == [e for e, _ in checks]
    passing = group_result("grp_x", members, checks[:2])
    assert passing.verdict == run_pb2.VERDICT_PASS
    # A repeat that did not succeed makes the group not SUCCEEDED: no PASS, as for a run.
    failed = group_result("grp_x", [*members, member(3, [], state=RunState.FAILED)], checks[:2])
    assert failed.state == RunState.FAILED and failed.verdict == run_pb2.VERDICT_FAIL


def test_the_group_state_follows_its_repeats() -> None:
    def of(*states: int) -> int:
        return group_state([GroupMember(f"run_{i}", i, s, "", None) for i, s in enumerate(states)])

    assert of(RunState.PENDING, RunState.PENDING) == RunState.PENDING
    assert of(RunState.SUCCEEDED, RunState.PENDING) == RunState.RUNNING
    assert of(RunState.FAILED, RunState.RUNNING) == RunState.RUNNING
    assert of(RunState.SUCCEEDED, RunState.SUCCEEDED) == RunState.SUCCEEDED
    assert of(RunState.SUCCEEDED, RunState.CANCELLED, RunState.CANCELLED) == RunState.CANCELLED
    assert of(RunState.SUCCEEDED, RunState.FAILED, RunState.CANCELLED) == RunState.FAILED


def test_a_group_with_nothing_counted_has_no_stages() -> None:
    result = group_result("grp_x", [GroupMember("run_0", 0, RunState.RUNNING, "", None)])
    assert (result.state, len(result.stages), result.HasField("overall")) == (RunState.RUNNING, 0, False)
    assert result.warnings == ["repeat 0 (run_0) is RUNNING: not counted yet"]


def test_reasoning_cache_and_conversation_figures_are_merged() -> None:
    def with_extras(ttfr_mean: float, hit: float | None, turn2_ok: int) -> run_pb2.StageResult:
        s = stage(reasoning_tokens=100, cached_prompt_tokens=50, sessions_completed=4, mean_reasoning_tokens=10.0)
        s.ttfr.count, s.ttfr.mean_ms = 10, ttfr_mean
        s.session_duration.count, s.session_duration.mean_ms = 4, 1000.0
        if hit is not None:
            s.prefix_cache_hit_percent = hit
        for turn, ok in ((1, 5), (2, turn2_ok)):
            row = s.turns.add(turn=turn, requests_ok=ok, mean_input_tokens=100.0 * turn)
            row.ttft.count, row.ttft.mean_ms = ok, 10.0 * turn
        return s

    result = group_result(
        "grp_x",
        [member(0, [with_extras(20.0, 40.0, 3)]), member(1, [with_extras(40.0, None, 5)]), member(2, [stage()])],
    )
    merged = result.stages[0]
    assert (merged.reasoning_tokens, merged.cached_prompt_tokens, merged.sessions_completed) == (200, 100, 8)
    assert merged.mean_reasoning_tokens == pytest.approx(20 / 3)
    assert merged.ttfr.count == 20 and merged.ttfr.mean_ms == pytest.approx(30.0)
    assert merged.session_duration.count == 8
    assert not merged.HasField("ttfo")  # no run had one
    assert merged.prefix_cache_hit_percent == pytest.approx(40.0)  # the one run that measured it
    assert [(t.turn, t.requests_ok) for t in merged.turns] == [(1, 10), (2, 8)]
    assert merged.turns[1].ttft.count == 8 and merged.turns[1].mean_input_tokens == pytest.approx(200.0)
    plain = group_result("grp_y", [member(0, [stage()]), member(1, [stage()])]).stages[0]
    assert not plain.HasField("prefix_cache_hit_percent") and not plain.turns
