"""Output formats on hand-built messages: Markdown table, vLLM bench-serve JSON, sample
CSV/JSONL, the comparison table."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import AsyncIterator

import pytest
from rich.console import Console

from client import formats
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

pytestmark = pytest.mark.timeout(30)


def stats(base: float) -> run_pb2.LatencyStats:
    return run_pb2.LatencyStats(
        count=10,
        mean_ms=base + 1,
        std_ms=base / 10,
        min_ms=base / 2,
        max_ms=base * 3,
        p50_ms=base,
        p90_ms=base + 2,
        p95_ms=base + 3,
        p99_ms=base + 4,
        p999_ms=base + 5,
    )


def make() -> tuple[run_pb2.Run, run_pb2.RunResult]:
    run = run_pb2.Run(id="run_01x", state=run_pb2.RUN_STATE_SUCCEEDED)
    run.spec.display_name = "nightly | main"
    run.spec.target.model = "llama-3-8b"
    run.spec.target.api_kind = run_pb2.API_KIND_CHAT
    run.end_time.FromSeconds(1_700_000_000)
    run.spec.stages.add(concurrency=4)
    open_loop = run.spec.stages.add(
        request_rate=2.5, max_concurrency=16, arrival=run_pb2.ARRIVAL_PROCESS_GAMMA, burstiness=0.5
    )
    del open_loop  # the spec is what vllm-json reads
    result = run_pb2.RunResult(run_id="run_01x", state=run_pb2.RUN_STATE_SUCCEEDED)
    result.stages.add(
        index=0,
        name="concurrency=4",
        concurrency=4,
        requests_ok=98,
        requests_failed=2,
        duration_s=10.0,
        request_throughput=9.8,
        output_token_throughput=1254.4,
        total_token_throughput=1881.6,
        peak_output_token_throughput=1400.0,
        achieved_concurrency=3.9,
        prompt_tokens=6272,
        output_tokens=12544,
        ttft=stats(50),
        tpot=stats(10),
        itl=stats(11),
        e2e=stats(1300),
        queue_delay=stats(0.1),
        e2e_including_queue=stats(1300.1),
    )
    result.stages[0].errors["http_5xx"] = 2
    second = result.stages.add(
        index=1,
        name="rate=2.5/s",
        request_rate=2.5,
        requests_ok=25,
        duration_s=10.0,
        request_throughput=2.5,
        output_token_throughput=320.0,
        total_token_throughput=480.0,
        peak_output_token_throughput=352.0,
        achieved_concurrency=3.3,
        prompt_tokens=1600,
        output_tokens=3200,
        ttft=stats(40),
        tpot=stats(9),
        itl=stats(9.5),
        e2e=stats(1200),
        queue_delay=stats(2.0),
        e2e_including_queue=stats(1202),
    )
    second.goodput = 2.25
    second.good_fraction = 0.9
    for c in (
        run_pb2.CheckResult(expression="p99(ttft) < 50ms", stage_index=0, passed=False, measured=54, threshold=50),
        run_pb2.CheckResult(expression="p99(ttft) < 50ms", stage_index=1, passed=True, measured=44, threshold=50),
    ):
        result.checks.append(c)
    result.verdict = run_pb2.VERDICT_FAIL
    return run, result


def table_rows(markdown: str) -> list[list[str]]:
    rows = [line for line in markdown.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in row.strip("|").split(" | ")] for row in rows]


def test_markdown_table_columns_and_values() -> None:
    run, result = make()
    md = formats.markdown(result, run)
    rows = table_rows(md)
    header, first, second = rows[0], rows[1], rows[2]
    assert header == list(formats.MARKDOWN_COLUMNS)
    row = dict(zip(header, first, strict=True))
    assert row["Stage"] == "0" and row["Load"] == "concurrency=4"  # the name only when it says more
    assert row["Requests"] == "100" and row["Failed"] == "2" and row["Success %"] == "98.0"
    assert (row["TTFT avg"], row["TTFT p50"], row["TTFT p95"], row["TTFT p99"]) == ("51.0", "50.0", "53.0", "54.0")
    assert (row["TPOT p50"], row["TPOT p99"]) == ("10.0", "14.0")
    assert (row["E2E avg"], row["E2E p50"], row["E2E p95"], row["E2E p99"]) == ("1301.0", "1300.0", "1303.0", "1304.0")
    assert row["req/s"] == "9.80" and row["out tok/s"] == "1254.4"
    assert dict(zip(header, second, strict=True))["Load"] == "rate=2.5/s"
    # Verdict and checks follow the table; user text cannot break the table.
    assert "**Verdict: FAIL**" in md
    check_rows = [r for r in rows if r[0].startswith("`p99(ttft)")]
    assert [r[-1] for r in check_rows] == ["❌ fail", "✅ pass"]
    assert check_rows[0][0] == "`p99(ttft) < 50ms`"  # code spans show text literally: no entities
    result.stages[1].name = "peak <b>|</b>"
    assert table_rows(formats.markdown(result, run))[2][0] == "1: peak &lt;b&gt;\\|&lt;/b&gt;"
    assert "nightly \\| main" in md
    assert formats.markdown(run_pb2.RunResult(run_id="r")).count("\n| ") == 1  # header only, no verdict
    assert "Verdict" not in formats.markdown(run_pb2.RunResult(run_id="r", verdict=run_pb2.VERDICT_NONE))


def test_markdown_warns_about_saturation() -> None:
    run, result = make()
    result.stages[1].saturated = True
    result.stages[1].saturation_reason = "event-loop lag 80 ms"
    assert "> ⚠️ stage 1 (rate=2.5/s): the load generator was saturated — event-loop lag 80 ms" in formats.markdown(
        result, run
    )


VLLM_KEYS = {
    "date",
    "endpoint_type",
    "backend",
    "label",
    "model_id",
    "tokenizer_id",
    "num_prompts",
    "request_rate",
    "burstiness",
    "max_concurrency",
    "duration",
    "completed",
    "failed",
    "total_input_tokens",
    "total_output_tokens",
    "request_throughput",
    "request_goodput",
    "output_throughput",
    "total_token_throughput",
    "max_output_tokens_per_s",
    "max_concurrent_requests",
    "rtfx",
    *(
        f"{agg}_{m}_ms"
        for m in ("ttft", "tpot", "itl", "e2el")
        for agg in ("mean", "median", "std", "p90", "p95", "p99", "p99.9")
    ),
    "run_id",
    "stage_index",
    "stage_name",  # as vLLM's --metadata adds keys
}


def test_vllm_json_keys_and_values() -> None:
    run, result = make()
    closed, opened = formats.vllm_results(run, result)
    assert set(closed) == VLLM_KEYS
    assert closed["mean_ttft_ms"] == result.stages[0].ttft.mean_ms == 51.0
    assert closed["median_ttft_ms"] == 50.0 and closed["std_ttft_ms"] == 5.0 and closed["p99_ttft_ms"] == 54.0
    assert closed["p90_ttft_ms"] == 52.0 and closed["p99.9_ttft_ms"] == 55.0
    assert (closed["mean_tpot_ms"], closed["median_tpot_ms"], closed["p99_tpot_ms"]) == (11.0, 10.0, 14.0)
    assert (closed["mean_itl_ms"], closed["median_itl_ms"], closed["p99_itl_ms"]) == (12.0, 11.0, 15.0)
    assert (closed["mean_e2el_ms"], closed["median_e2el_ms"], closed["p99_e2el_ms"]) == (1301.0, 1300.0, 1304.0)
    assert closed["completed"] == 98 and closed["failed"] == 2 and closed["num_prompts"] == 100
    assert closed["duration"] == 10.0
    assert closed["total_input_tokens"] == 6272 and closed["total_output_tokens"] == 12544
    assert closed["request_throughput"] == 9.8
    assert closed["output_throughput"] == 1254.4 and closed["total_token_throughput"] == 1881.6
    assert closed["max_output_tokens_per_s"] == 1400.0
    assert closed["max_concurrent_requests"] == 3.9
    assert closed["request_goodput"] is None  # no SLOs on this stage
    # Closed loop at concurrency 4 is vLLM's --request-rate inf --max-concurrency 4.
    assert closed["request_rate"] == "inf" and closed["max_concurrency"] == 4 and closed["burstiness"] == 1.0
    assert closed["backend"] == closed["endpoint_type"] == "openai-chat"
    assert closed["model_id"] == "llama-3-8b" and closed["label"] == "nightly | main"
    assert len(closed["date"]) == 15 and closed["date"][8] == "-"
    # Open loop with a cap: rate, cap, gamma shape, goodput, and vLLM's client-queue keys.
    assert opened["request_rate"] == 2.5 and opened["max_concurrency"] == 16 and opened["burstiness"] == 0.5
    assert opened["request_goodput"] == 2.25
    assert opened["mean_client_queue_time_ms"] == 3.0
    assert opened["p99_e2el_including_client_queue_ms"] == 1206.0
    assert set(opened) - VLLM_KEYS == {
        f"{agg}_{m}_ms"
        for m in ("client_queue_time", "e2el_including_client_queue")
        for agg in ("mean", "median", "std", "p90", "p95", "p99", "p99.9")
    }
    json.dumps([closed, opened], allow_nan=False)  # strict JSON
    # Intervals go beside their figures as `<key>_ci` (null for a side the data cannot bound).
    stage = result.stages[0]
    stage.ttft.p99_ci.CopyFrom(run_pb2.Interval(low=53.0, high=54.0, high_open=True))
    stage.ttft.p50_ci.CopyFrom(run_pb2.Interval(low=49.5, high=50.5))
    stage.request_throughput_ci.CopyFrom(run_pb2.Interval(low=9.5, high=10.1))
    with_ci = formats.vllm_stage_result(run, stage)
    assert set(with_ci) - VLLM_KEYS == {"p99_ttft_ms_ci", "median_ttft_ms_ci", "request_throughput_ci"}
    assert with_ci["p99_ttft_ms_ci"] == [53.0, None] and with_ci["median_ttft_ms_ci"] == [49.5, 50.5]
    assert with_ci["request_throughput_ci"] == [9.5, 10.1]
    json.dumps(with_ci, allow_nan=False)
    run.spec.target.api_kind = run_pb2.API_KIND_COMPLETIONS
    assert formats.vllm_stage_result(run, result.stages[0])["backend"] == "openai"
    assert formats.vllm_file_name("run_01x", 1) == "run_01x_stage1.json"


async def _samples(items: list[run_service_pb2.ExportedSample]) -> AsyncIterator[run_service_pb2.ExportedSample]:
    for item in items:
        yield item


SAMPLES = [
    run_service_pb2.ExportedSample(
        stage_index=0,
        agent_name="a1",
        sent_unix_ns=1_700_000_000_123_456_789,
        queue_delay_ms=0.25,
        first_byte_ms=40.5,
        ttft_ms=41.0,
        e2e_ms=360.0,
        done_ms=361.5,
        prompt_tokens=64,
        output_tokens=32,
        status=run_pb2.REQUEST_STATUS_OK,
        usage_reported=True,
        itl_count=31,
        first_reasoning_ms=12.5,
        first_answer_ms=200.25,
        reasoning_tokens=20,
        cached_prompt_tokens=48,
        cached_reported=True,
        session_id=7,
        turn_index=3,
        last_turn=True,
    ),
    run_service_pb2.ExportedSample(
        stage_index=1,
        agent_name='a2, "quoted"',
        sent_unix_ns=1_700_000_001_000_000_000,
        status=run_pb2.REQUEST_STATUS_HTTP_5XX,
        error="HTTP 503: overloaded\nretry later",
    ),
]


async def test_csv_header_and_rows() -> None:
    out = io.StringIO()
    assert await formats.write_samples(_samples(SAMPLES), out, "csv") == 2
    rows = list(csv.reader(io.StringIO(out.getvalue())))
    assert rows[0] == [f.name for f in run_service_pb2.ExportedSample.DESCRIPTOR.fields]
    assert rows[0][:3] == ["stage_index", "agent_name", "sent_unix_ns"] and rows[0][14:16] == ["error", "agent_session"]
    # Reasoning, prefix cache and conversation columns follow (schema version 1, added fields).
    assert rows[0][16:] == [
        "first_reasoning_ms",
        "first_answer_ms",
        "reasoning_tokens",
        "cached_prompt_tokens",
        "cached_reported",
        "session_id",
        "turn_index",
        "last_turn",
    ]
    first = dict(zip(rows[0], rows[1], strict=True))
    assert first["status"] == "ok" and first["sent_unix_ns"] == "1700000000123456789"
    assert first["ttft_ms"] == "41.0" and first["output_tokens"] == "32" and first["usage_reported"] == "true"
    assert first["first_reasoning_ms"] == "12.5" and first["first_answer_ms"] == "200.25"
    assert first["reasoning_tokens"] == "20" and first["cached_prompt_tokens"] == "48"
    assert (first["cached_reported"], first["session_id"], first["turn_index"], first["last_turn"]) == (
        "true",
        "7",
        "3",
        "true",
    )
    second = dict(zip(rows[0], rows[2], strict=True))
    assert second["status"] == "http_5xx" and second["agent_name"] == 'a2, "quoted"'
    assert second["error"] == "HTTP 503: overloaded\nretry later" and second["warmup"] == "false"
    assert len(rows) == 3


async def test_jsonl_rows() -> None:
    out = io.StringIO()
    assert await formats.write_samples(_samples(SAMPLES), out, "jsonl") == 2
    lines = out.getvalue().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0])
    assert list(first) == [f.name for f in run_service_pb2.ExportedSample.DESCRIPTOR.fields]
    assert first["sent_unix_ns"] == 1_700_000_000_123_456_789  # a number, not a string
    assert first["status"] == "ok" and first["usage_reported"] is True and first["e2e_ms"] == 360.0
    assert first["session_id"] == 7 and first["last_turn"] is True and first["first_answer_ms"] == 200.25
    second = json.loads(lines[1])
    assert (second["first_reasoning_ms"], second["turn_index"], second["cached_reported"]) == (0.0, 0, False)
    assert second["status"] == "http_5xx"
    with pytest.raises(ValueError, match="unknown sample format"):
        await formats.write_samples(_samples([]), io.StringIO(), "xml")


def comparison(regressed: bool) -> run_service_pb2.CompareRunsResponse:
    ok, worse = run_service_pb2.COMPARE_OUTCOME_NO_REGRESSION, run_service_pb2.COMPARE_OUTCOME_REGRESSED
    outcome = worse if regressed else ok
    response = run_service_pb2.CompareRunsResponse(baseline_run_id="run_base", confidence_percent=95, outcome=outcome)
    c = response.comparisons.add(run_id="run_new", regressed=regressed, outcome=outcome)
    stage = c.stages.add(load="concurrency=8", baseline_stage_index=1, stage_index=1, outcome=outcome)
    stage.metrics.add(
        metric="ttft_p99_ms",
        baseline=100.0,
        value=130.0,
        delta=30.0,
        delta_percent=30.0,
        regressed=regressed,
        outcome=outcome,
        delta_ci=run_pb2.Interval(low=20.0, high=40.0),
        p_value=0.0001,
        p_adjusted=0.0004,
    )
    stage.metrics.add(
        metric="output_token_throughput",
        baseline=2000.0,
        value=2050.0,
        delta=50.0,
        delta_percent=2.5,
        outcome=ok,
        delta_ci=run_pb2.Interval(low=-10.0, high=110.0),
        p_value=0.1,
        p_adjusted=0.2,
    )
    stage.metrics.add(metric="itl_p50_ms", baseline=10.0, value=10.1, delta=0.1, delta_percent=1.0, outcome=ok)
    stage.metrics.add(
        metric="error_rate",
        baseline=0.0,
        value=0.02,
        delta=0.02,
        delta_percent=0.0,
        regressed=regressed,
        outcome=outcome,
        delta_ci=run_pb2.Interval(low=0.01, high=0.03),
    )
    return response


def render_tables(response: run_service_pb2.CompareRunsResponse, all_metrics: bool = False) -> str:
    console = Console(file=io.StringIO(), width=200, no_color=True)
    for table in formats.comparison_tables(response, all_metrics):
        console.print(table)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(out, str)
    return out


def test_comparison_table_marks_regressions() -> None:
    text = render_tables(comparison(True))
    assert "run_new vs baseline run_base — REGRESSED (95 % confidence)" in text
    ttft = next(line for line in text.splitlines() if "ttft_p99_ms" in line)
    assert "concurrency=8" in ttft and "100.0" in ttft and "130.0" in ttft and "+30.0% [+20.0, +40.0]" in ttft
    assert "<0.001" in ttft and "▲ regressed" in ttft
    tput = next(line for line in text.splitlines() if "output_token_throughput" in line)
    assert (
        "+2.5% [-0.5, +5.5]" in tput and "0.2" in tput and "regressed" not in tput and tput.rstrip("│ ").endswith("ok")
    )
    assert "itl_p50_ms" not in text  # not a key metric and no more than ok
    err = next(line for line in text.splitlines() if "error_rate" in line)
    # Regressed, so shown although not a key metric; its change in percentage points.
    assert "2.00%" in err and "+2.00 pt [+1.00, +3.00]" in err and "▲ regressed" in err
    assert "itl_p50_ms" in render_tables(comparison(True), all_metrics=True)
    assert formats.any_regressed(comparison(True))
    assert not formats.any_regressed(comparison(False))
    assert "no regression" in render_tables(comparison(False))
