"""What `run` and `runs result` print for a capacity search, from CapacityResult messages built
by hand: the one-line outcome for every stop reason, the probe table at 80 to 120 columns,
and the JSON."""

from __future__ import annotations

import argparse
import io
import json
import re

import pytest
from rich.console import Console

from client import exitcodes, formats, render
from client.commands import print_result
from common import search_outcome
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

pytestmark = pytest.mark.timeout(10)
C, R = run_pb2.SEARCH_VARIABLE_CONCURRENCY, run_pb2.SEARCH_VARIABLE_RATE
PASS, FAIL, INCONCLUSIVE = run_pb2.PROBE_OUTCOME_PASS, run_pb2.PROBE_OUTCOME_FAIL, run_pb2.PROBE_OUTCOME_INCONCLUSIVE


def probe(index: int, load: float, outcome: int, good: float, **fields: object) -> run_pb2.CapacityProbe:
    return run_pb2.CapacityProbe(
        stage_index=index,
        load=load,
        outcome=outcome,
        requests=123456,
        good_percent=good,  # type: ignore[arg-type]
        good_percent_low=max(0.0, good - 2.3),
        good_percent_high=min(100.0, good + 1.6),
        ttft_p50_ms=1234.5,
        ttft_p99_ms=9876.5,
        tpot_p50_ms=45.25,
        tpot_p99_ms=1234.9,
        e2e_p99_ms=99999.1,
        request_throughput=2637.8,
        output_token_throughput=263780.0,
        reason="good 97.2 % >= target 95 %",
        **fields,  # type: ignore[arg-type]
    )


def converged(**fields: object) -> run_pb2.CapacityResult:
    values: dict[str, object] = dict(
        variable=C,
        goodput_target_percent=95,
        highest_passing=24,
        lowest_failing=26,
        stop_reason=run_pb2.SEARCH_STOP_REASON_CONVERGED,
        stop_message="24 passed, 26 failed: 8.3 % apart",
        probes=[
            probe(0, 1, PASS, 100),
            probe(1, 1024, FAIL, 3.2),
            probe(2, 32, INCONCLUSIVE, 80),
            probe(3, 24, PASS, 97.2, repeat=True),
            probe(4, 26, FAIL, 91.0),
        ],
        request_throughput=512.34,
        output_token_throughput=8120.4,
        cost_per_million_output_tokens_usd=0.4123,
        confident=True,
    )
    values.update(fields)
    return run_pb2.CapacityResult(**values)  # type: ignore[arg-type]


def search_result(capacity: run_pb2.CapacityResult, verdict: int = run_pb2.VERDICT_NONE) -> run_pb2.RunResult:
    return run_pb2.RunResult(
        run_id="run_0123456789abcdef0123", state=run_pb2.RUN_STATE_SUCCEEDED, capacity=capacity, verdict=verdict
    )  # type: ignore[arg-type]


def line(stop: int, search: run_pb2.SearchSpec | None = None, **fields: object) -> str:
    capacity = converged(stop_reason=stop, **fields)
    for name in ("highest_passing", "lowest_failing"):
        if fields.get(name, 0) is None:
            capacity.ClearField(name)  # type: ignore[arg-type]
    return formats.capacity_line(capacity, search)


def test_a_converged_search_gives_the_capacity_throughput_cost_and_tolerance() -> None:
    assert formats.capacity_line(converged()) == (
        "capacity: concurrency 24 (highest passing; 26 failed) · 512.3 req/s · 8,120 tok/s · "
        "$0.41 per 1M output tokens · converged within 5 %"
    )
    search = run_pb2.SearchSpec(tolerance_percent=2.5)
    assert formats.capacity_line(converged(), search).endswith("converged within 2.5 %")
    assert "per 1M" not in formats.capacity_line(converged(cost_per_million_output_tokens_usd=None))
    assert formats.capacity_line(converged(confident=False)).endswith("converged within 5 % · boundary within noise")


def test_a_rate_search_names_its_loads_per_second() -> None:
    text = formats.capacity_line(converged(variable=R, highest_passing=12.5, lowest_failing=13.0))
    assert text.startswith("capacity: rate 12.5 req/s (highest passing; 13/s failed)")


@pytest.mark.parametrize(
    ("stop", "fields", "expected"),
    [
        (
            run_pb2.SEARCH_STOP_REASON_MAX_PASSED,
            {"highest_passing": 1024, "lowest_failing": None},
            r"^capacity: at least concurrency 1024 \(highest passing\) · 512.3 req/s .* raise --search-max$",
        ),
        (
            run_pb2.SEARCH_STOP_REASON_MAX_PROBES,
            {},
            r"^capacity: concurrency 24 \(highest passing; 26 failed\) .* not converged: --max-probes reached after "
            r"5 probes$",
        ),
        (
            run_pb2.SEARCH_STOP_REASON_MIN_FAILED,
            {"highest_passing": None, "lowest_failing": 1},
            r"^capacity below concurrency 1: even the lowest load probed missed the goodput target",
        ),
        (
            run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED,
            {"lowest_failing": None},
            r"^generator saturated: no capacity measured — .*server's limit is unknown \(highest passing so far: "
            r"concurrency 24\); add agents",
        ),
        (
            run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED,
            {"highest_passing": None, "lowest_failing": None},
            r"^generator saturated: no capacity measured — [^(]*; add agents",
        ),
        (
            run_pb2.SEARCH_STOP_REASON_TARGET_ERRORS,
            {"lowest_failing": 32},
            r"^target errors: most requests of a probe at concurrency 32 failed.*\(highest passing so far: "
            r"concurrency 24\)$",
        ),
        (
            run_pb2.SEARCH_STOP_REASON_RUN_ENDED,
            {},
            r"^search ended with the run: no capacity measured \(highest passing concurrency 24, lowest failing "
            r"concurrency 26\); `run --resume RUN_ID` continues it$",
        ),
        (run_pb2.SEARCH_STOP_REASON_UNSPECIFIED, {}, r"^capacity search: no outcome yet"),
    ],
)
def test_every_stop_reason_says_what_it_means(stop: int, fields: dict[str, object], expected: str) -> None:
    text = line(stop, **fields)
    assert re.search(expected, text), text
    assert "\n" not in text


def test_every_stop_reason_has_its_own_wording() -> None:
    reasons = [v for v in run_pb2.SearchStopReason.values() if v != run_pb2.SEARCH_STOP_REASON_UNSPECIFIED]
    lines = {line(r) for r in reasons}
    assert len(lines) == len(reasons)


@pytest.mark.parametrize(
    "stop",
    [
        run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED,
        run_pb2.SEARCH_STOP_REASON_RUN_ENDED,
        run_pb2.SEARCH_STOP_REASON_TARGET_ERRORS,
        run_pb2.SEARCH_STOP_REASON_MIN_FAILED,
    ],
)
def test_no_capacity_is_claimed_when_none_was_measured(stop: int) -> None:
    # The generator's limit, or a search cut short, must never read as the server's capacity.
    assert not line(stop).startswith("capacity: ")
    assert not search_outcome.capacity_measured(converged(stop_reason=stop))


def test_the_capacity_value_gated_and_compared() -> None:
    assert search_outcome.capacity_value(converged()) == 24
    assert search_outcome.capacity_value(converged(stop_reason=run_pb2.SEARCH_STOP_REASON_MAX_PASSED)) == 24
    assert search_outcome.capacity_value(converged(stop_reason=run_pb2.SEARCH_STOP_REASON_MIN_FAILED)) == 0
    assert search_outcome.capacity_value(converged(stop_reason=run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED)) is None
    assert search_outcome.capacity_value(converged(stop_reason=run_pb2.SEARCH_STOP_REASON_RUN_ENDED)) is None
    errors = converged(stop_reason=run_pb2.SEARCH_STOP_REASON_TARGET_ERRORS)
    assert search_outcome.capacity_value(errors) == 24
    errors.ClearField("highest_passing")
    assert search_outcome.capacity_value(errors) == 0


def rendered(result: run_pb2.RunResult, width: int, wide: bool = False) -> str:
    out = io.StringIO()
    Console(file=out, width=width, no_color=True).print(render.probe_table(result, wide))
    return out.getvalue()


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_probe_table_fits_the_terminal_and_no_number_is_cut(width: int) -> None:
    result = search_result(converged())
    text = rendered(result, width)
    assert max(len(row) for row in text.splitlines()) <= width
    assert "…" not in text
    rows = [row for row in text.splitlines() if re.match(r"^\d+\*? ", row)]
    assert [row.split()[:3] for row in rows] == [
        ["0", "1", "pass"],
        ["1", "1024", "fail"],
        ["2", "32", "inconcl."],
        ["3*", "24", "pass"],
        ["4", "26", "fail"],
    ]
    for cell in ("123456", "97.2 (94-99)", "100.0 (97-100)", "1234/9876", "45.2/1235", "2638"):
        assert cell in text
    for column in render.PROBE_COLUMNS:
        assert column in text
    assert "*: a repeat at the same load" in text and "inconcl.: inconclusive" in text
    assert "stopped: 24 passed, 26 failed: 8.3 % apart" in text


def test_the_wide_probe_table_shows_every_column() -> None:
    text = rendered(search_result(converged()), 250, wide=True)
    for column in render.PROBE_WIDE_COLUMNS:
        assert column in text
    assert "99999" in text and "263780" in text and "good 97.2 % >= target 95 %" in text


def test_a_probe_carried_over_from_a_resumed_run_is_marked() -> None:
    capacity = converged(probes=[probe(-1, 16, PASS, 99.0), probe(0, 24, PASS, 97.0)])
    text = rendered(search_result(capacity), 250, wide=True)
    assert re.search(r"^0\s+earlier\s+16\s+pass", text, re.MULTILINE), text


def args(**flags: object) -> argparse.Namespace:
    return argparse.Namespace(**({"json": False, "wide": False, "allow_suspect": False} | flags))


def run_of(result: run_pb2.RunResult) -> run_pb2.Run:
    run = run_pb2.Run(id=result.run_id, state=result.state)
    run.spec.search.variable = result.capacity.variable
    return run


def test_run_prints_the_probe_table_then_the_capacity_line(capsys: pytest.CaptureFixture[str]) -> None:
    result = search_result(converged())
    code = print_result(args(), run_of(result), result)
    out = capsys.readouterr().out
    assert code == exitcodes.OK
    assert "capacity search" in out and "inconcl." in out
    assert "ok/failed" not in out  # the stage table: its rows are the probes, shown once
    lines = out.splitlines()
    capacity = next(i for i, text in enumerate(lines) if text.startswith("capacity: concurrency 24"))
    assert lines[capacity + 1].startswith("run id: run_0123456789abcdef0123")


def test_the_exit_code_follows_the_verdict(capsys: pytest.CaptureFixture[str]) -> None:
    result = search_result(converged(), verdict=run_pb2.VERDICT_FAIL)
    result.checks.add(expression="capacity >= 32", passed=False, message="24 < 32")
    assert print_result(args(), run_of(result), result) == exitcodes.FAILED
    assert "check FAIL stage 0: capacity >= 32" in capsys.readouterr().out


def test_json_carries_the_capacity_and_its_line(capsys: pytest.CaptureFixture[str]) -> None:
    result = search_result(converged())
    print_result(args(json=True), run_of(result), result)
    doc = json.loads(capsys.readouterr().out)
    capacity = doc["capacity"]
    assert capacity["highest_passing"] == 24 and capacity["stop_reason"] == "SEARCH_STOP_REASON_CONVERGED"
    assert capacity["probes"][3]["repeat"] is True and capacity["probes"][0]["requests"] == 123456
    assert doc["cli"]["capacity"].startswith("capacity: concurrency 24")


def test_json_of_a_run_without_a_search_has_no_capacity(capsys: pytest.CaptureFixture[str]) -> None:
    result = run_pb2.RunResult(run_id="run_x", state=run_pb2.RUN_STATE_SUCCEEDED)
    print_result(args(json=True), run_pb2.Run(id="run_x", state=run_pb2.RUN_STATE_SUCCEEDED), result)
    doc = json.loads(capsys.readouterr().out)
    assert "capacity" not in doc and "capacity" not in doc["cli"]


def test_the_progress_line_of_a_search_names_the_probe_and_its_load() -> None:
    update = run_pb2.Run(id="run_x", state=run_pb2.RUN_STATE_RUNNING, current_stage=1)
    update.spec.search.variable = R
    update.spec.stages.add(request_rate=2)
    update.spec.stages.add(request_rate=8.5)
    text = render.progress_line(run_service_pb2.WatchRunResponse(run=update))
    assert "search stage 1 at 8.5/s" in text and " of " not in text


def test_markdown_starts_with_the_capacity_line() -> None:
    text = formats.markdown(search_result(converged()))
    assert (
        text.splitlines()[2] == "**capacity: concurrency 24 (highest passing; 26 failed) · 512.3 req/s · 8,120 "
        "tok/s · $0.41 per 1M output tokens · converged within 5 %**"
    )
    assert "capacity" not in formats.markdown(run_pb2.RunResult(run_id="run_x"))


@pytest.mark.parametrize("width", [80, 120])
def test_a_rate_search_fits_too_with_bisected_rates(width: int) -> None:
    loads = (1.0, 1000.0, 12.3456789, 999.54321, 0.123456)
    capacity = converged(variable=R, probes=[probe(i, load, PASS, 97.0) for i, load in enumerate(loads)])
    text = rendered(search_result(capacity), width)
    assert max(len(row) for row in text.splitlines()) <= width
    for shown in ("1/s", "1000/s", "12.35/s", "999.5/s", "0.1235/s"):
        assert re.search(rf"\s{re.escape(shown)}\s", text), (shown, text)


def test_a_run_level_capacity_check_is_judged_whatever_stage_was_suspect() -> None:
    # A search whose first probe saturated the generator (a suspect stage 0) and then found a
    # capacity: the capacity check is the search's, on no one stage.
    result = run_pb2.RunResult(verdict=run_pb2.VERDICT_PASS)
    result.stages.add(index=0, saturated=True)
    result.stages.add(index=1)
    result.checks.add(expression="capacity >= 2", stage_index=0, passed=True, run_level=True)
    assert formats.honest_verdict(result) == "PASS"
    result.checks[0].passed = False
    result.verdict = run_pb2.VERDICT_FAIL
    assert formats.honest_verdict(result) == "FAIL"
    # A stage check on the suspect stage still makes it inconclusive.
    result.checks[0].passed = True
    result.verdict = run_pb2.VERDICT_PASS
    result.checks.add(expression="p99(ttft) < 1s", stage_index=0, passed=True)
    assert formats.honest_verdict(result) == formats.VERDICT_INCONCLUSIVE


def test_the_capacity_number_is_none_when_the_generator_saturated() -> None:
    saturated = run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED
    assert search_outcome.capacity_number(8.0, saturated) is None
    assert search_outcome.capacity_number(8.0, run_pb2.SEARCH_STOP_REASON_CONVERGED) == 8.0
    assert search_outcome.capacity_number(None, run_pb2.SEARCH_STOP_REASON_MIN_FAILED) == 0.0
