"""What `run` and `runs result|list` print: tables that fit the terminal without cutting a
number, every warning of the result, and a verdict that is INCONCLUSIVE (exit 3) when the
checks were judged on stages whose numbers are suspect."""

from __future__ import annotations

import argparse
import io
import json
import re

import pytest
from rich.console import Console
from rich.table import Table

from client import exitcodes, formats, render
from client.commands import print_result
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(10)


def stats(base: float) -> run_pb2.LatencyStats:
    return run_pb2.LatencyStats(
        count=123456,
        mean_ms=base,
        p50_ms=base,
        p90_ms=base * 1.5,
        p95_ms=base * 1.7,
        p99_ms=base * 2.3,
        p999_ms=base * 2.9,
        max_ms=base * 3,
    )


def stage(index: int, concurrency: int, **fields: object) -> run_pb2.StageResult:
    return run_pb2.StageResult(
        index=index,
        name=f"concurrency={concurrency}",
        concurrency=concurrency,
        requests_ok=123456,
        requests_failed=789,
        request_throughput=2637.8123,
        output_token_throughput=263780.12,
        ttft=stats(1234.5),
        tpot=stats(56.7),
        itl=stats(56.7),
        e2e=stats(98765.4),
        **fields,  # type: ignore[arg-type]
    )


def result(*stages: run_pb2.StageResult, checks: list[run_pb2.CheckResult] | None = None) -> run_pb2.RunResult:
    checks = checks or []
    failed = any(not c.passed for c in checks)
    verdict = (run_pb2.VERDICT_FAIL if failed else run_pb2.VERDICT_PASS) if checks else run_pb2.VERDICT_NONE
    return run_pb2.RunResult(
        run_id="run_0123456789abcdef0123",
        state=run_pb2.RUN_STATE_SUCCEEDED,
        stages=list(stages),
        checks=checks,
        verdict=verdict,
    )


def rendered(table: Table, width: int) -> str:
    out = io.StringIO()
    Console(file=out, width=width, no_color=True).print(table)
    return out.getvalue()


def cells(s: run_pb2.StageResult) -> list[str]:
    # Numbers of 1000 and more are shown without decimals: rounded, never cut.
    return [
        f"{s.requests_ok}/{s.requests_failed}",
        f"{s.request_throughput:.0f}",
        f"{s.output_token_throughput:.0f}",
        f"{s.ttft.p50_ms:.0f}",
        f"{s.ttft.p99_ms:.0f}",
        f"{s.tpot.p50_ms:.1f}",
        f"{s.e2e.p99_ms:.0f}",
    ]


@pytest.mark.parametrize("width", [80, 100, 120])
def test_the_summary_fits_the_terminal_and_no_number_is_cut(width: int) -> None:
    stages = [stage(0, 1), stage(1, 32), stage(2, 1024)]
    text = rendered(render.result_table(result(*stages)), width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text
    for s in stages:
        for cell in cells(s):
            assert re.search(rf"(^|\s){re.escape(cell)}(\s|$)", text, re.MULTILINE), (cell, text)
    for column in render.RESULT_COLUMNS:
        assert column.split()[0] in text


def test_wide_shows_every_column() -> None:
    text = rendered(render.result_table(result(stage(0, 8)), wide=True), 250)
    for column in render.RESULT_WIDE_COLUMNS:
        assert column in text
    assert "ITL p99" not in rendered(render.result_table(result(stage(0, 8))), 250)


@pytest.mark.parametrize("width", [80, 120])
def test_the_runs_list_fits_the_terminal(width: int) -> None:
    runs = [
        run_pb2.Run(
            id=f"run_{i:020d}",
            state=run_pb2.RUN_STATE_SUCCEEDED,
            spec=run_pb2.RunSpec(display_name="nightly sweep of the 70B deployment"),
            progress=run_pb2.RunProgress(requests_ok=1234567, requests_failed=89),
        )
        for i in range(3)
    ]
    runs[0].create_time.FromSeconds(1_700_000_000)
    text = rendered(render.runs_table(runs), width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text
    for r in runs:
        assert r.id in text and "1234567" in text


def args(**flags: object) -> argparse.Namespace:
    return argparse.Namespace(**({"json": False, "wide": False, "allow_suspect": False} | flags))


def run_of(r: run_pb2.RunResult) -> run_pb2.Run:
    return run_pb2.Run(id=r.run_id, state=r.state, spec=run_pb2.RunSpec(display_name="tour"))


def check(stage_index: int, passed: bool) -> run_pb2.CheckResult:
    return run_pb2.CheckResult(
        expression="p99(ttft) < 500ms",
        stage_index=stage_index,
        passed=passed,
        message="p99(ttft) = 12.3 ms, want < 500 ms",
    )


SATURATED = {"saturated": True, "saturation_reason": "agent event-loop lag 88 ms"}


def test_every_warning_is_printed_under_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    r = result(
        stage(0, 1, **SATURATED, mean_requested_output_tokens=256, mean_output_tokens=64),
        stage(1, 8, output_tokens_estimated=True, agents_lost=1, requests_lost=3),
    )
    r.stages[1].server_metrics.cross_checks.add(mismatch=True, message="generated_tokens: client 100, server 80")
    assert print_result(args(), run_of(r), r) == exitcodes.OK  # no checks: nothing to be inconclusive about
    out = capsys.readouterr().out
    table_end = out.index("run id: run_0123456789abcdef0123 (tour)")
    for warning in (
        "WARNING stage 0: load generator saturated: agent event-loop lag 88 ms",
        "WARNING stage 0: output length 256 → 64 tokens",
        "WARNING stage 1: usage not reported by the server",
        "WARNING stage 1: 1 agent(s) lost with 3 unreported requests",
        "WARNING stage 1: client/server mismatch: generated_tokens: client 100, server 80",
    ):
        assert out.index(warning) > table_end
    assert "TTFT absent" not in out  # every request streamed


def test_checks_on_a_suspect_stage_are_inconclusive(capsys: pytest.CaptureFixture[str]) -> None:
    r = result(stage(0, 1), stage(1, 8, **SATURATED), checks=[check(0, True), check(1, True)])
    assert print_result(args(), run_of(r), r) == exitcodes.INCONCLUSIVE == 3
    out = capsys.readouterr().out
    assert "verdict: INCONCLUSIVE" in out and "--allow-suspect" in out
    assert print_result(args(allow_suspect=True), run_of(r), r) == exitcodes.OK
    assert "verdict: PASS" in capsys.readouterr().out


def test_a_check_failed_on_a_sound_stage_is_still_a_failure(capsys: pytest.CaptureFixture[str]) -> None:
    r = result(stage(0, 1), stage(1, 8, **SATURATED), checks=[check(0, False), check(1, True)])
    assert print_result(args(), run_of(r), r) == exitcodes.FAILED
    assert "verdict: FAIL" in capsys.readouterr().out
    only_suspect = result(stage(0, 1), stage(1, 8, **SATURATED), checks=[check(0, True), check(1, False)])
    assert formats.honest_verdict(only_suspect) == "INCONCLUSIVE"


def test_json_has_numbers_every_field_and_the_verdict_shown(capsys: pytest.CaptureFixture[str]) -> None:
    r = result(stage(0, 1, **SATURATED), checks=[check(0, True)])
    r.stages[0].requests_failed = 0
    assert print_result(args(json=True), run_of(r), r) == exitcodes.INCONCLUSIVE
    printed = json.loads(capsys.readouterr().out)
    s = printed["stages"][0]
    assert s["requests_ok"] == 123456 and s["requests_failed"] == 0 and s["prompt_tokens"] == 0
    assert s["agents"] == [] and s["errors"] == {}
    assert printed["cli"]["verdict"] == "INCONCLUSIVE"
    assert printed["cli"]["warnings"] == formats.result_warnings(r)


def test_a_warnings_field_added_to_the_result_is_printed_without_naming_it() -> None:
    # Simulated with a message type that has such a field: the descriptor is what is read.
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    pool = descriptor_pool.DescriptorPool()
    proto = descriptor_pb2.FileDescriptorProto(name="w.proto", package="w")
    message = proto.message_type.add(name="M")
    message.field.add(
        name="target_warnings",
        number=1,
        type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
        label=descriptor_pb2.FieldDescriptorProto.LABEL_REPEATED,
    )
    pool.Add(proto)
    cls = message_factory.GetMessageClass(pool.FindMessageTypeByName("w.M"))
    assert formats._generic_warnings(cls(target_warnings=["target saturated: 503s"])) == ["target saturated: 503s"]
