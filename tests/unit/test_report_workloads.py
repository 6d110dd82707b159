"""The report's sections for reasoning models, conversations and the prefix cache, built from
hand-made results: present only when a run has their figures (a plain run's report is
unchanged), with the figures of the result in their tables, TTFT by turn drawn, and the token
accounting note in the summary."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html import unescape

import numpy as np
import pytest

from client.report.collect import RunReportData, SampleDigest
from client.report.formatting import RunStyle, run_styles
from client.report.page import build_report
from client.report.workload_sections import conversations_section, prefix_cache_section, reasoning_section
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

pytestmark = pytest.mark.timeout(30)
SECTIONS = ("reasoning", "conversations", "prefix-cache")


def latency(p50: float, count: int = 200) -> run_pb2.LatencyStats:
    st = run_pb2.LatencyStats(count=count, mean_ms=p50, p50_ms=p50, p90_ms=p50 * 1.4, p99_ms=p50 * 1.9, max_ms=p50 * 2)
    st.p50_ci.CopyFrom(run_pb2.Interval(low=p50 * 0.97, high=p50 * 1.03))
    return st


def plain_stage(index: int = 0) -> run_pb2.StageResult:
    return run_pb2.StageResult(
        index=index,
        name=f"concurrency={4 * (index + 1)}",
        concurrency=4 * (index + 1),
        requests_ok=200,
        request_throughput=10.0,
        output_token_throughput=640.0,
        prompt_tokens=200 * 64,
        output_tokens=200 * 64,
        ttft=latency(50.0),
        ttfo=latency(50.0),  # TTFO is TTFT when nothing reasons
        tpot=latency(12.0),
        itl=latency(12.0),
        e2e=latency(800.0),
    )


def reasoning_stage(index: int = 0) -> run_pb2.StageResult:
    s = plain_stage(index)
    s.ttfr.CopyFrom(latency(61.5))
    s.ttfo.CopyFrom(latency(2750.25))
    s.reasoning_tokens = 200 * 180
    s.mean_reasoning_tokens = 180.0
    s.mean_answer_tokens = 44.5
    return s


def conversation_stage(index: int = 0, ttfts: tuple[float, ...] = (320.0, 95.5, 88.25)) -> run_pb2.StageResult:
    s = plain_stage(index)
    s.sessions_completed = 66
    s.session_duration.CopyFrom(latency(12_345.0, 66))
    s.cached_prompt_tokens = 9_876
    s.prefix_cache_hit_percent = 64.25
    for t, ttft in enumerate(ttfts, start=1):
        s.turns.add(
            turn=t,
            requests_ok=67,
            requests_failed=1 if t == 3 else 0,
            ttft=latency(ttft, 67),
            tpot=latency(12.0 + t, 67),
            e2e=latency(700.0 + t, 67),
            mean_input_tokens=300.0 * t,
            prefix_cache_hit_percent=0.0 if t == 1 else 80.0 + t,
        )
    return s


def run_data(run_id: str, *stages: run_pb2.StageResult, note: str = "", samples: bool = True) -> RunReportData:
    run = run_pb2.Run(id=run_id, state=run_pb2.RUN_STATE_SUCCEEDED)
    run.spec.target.model = "m"
    result = run_pb2.RunResult(run_id=run_id, state=run_pb2.RUN_STATE_SUCCEEDED, stages=list(stages))
    if note:
        result.tokens.note = note
        result.tokens.exact = True
    digest = SampleDigest()
    rng = np.random.default_rng(3)
    for s in stages:
        for _ in range(150):
            ttft = float(rng.gamma(8.0, s.ttft.p50_ms / 8.0))
            reasoned = bool(s.ttfr.count)
            digest.add(
                run_service_pb2.ExportedSample(
                    stage_index=s.index,
                    ttft_ms=ttft,
                    e2e_ms=ttft + 500,
                    output_tokens=64,
                    status=run_pb2.REQUEST_STATUS_OK,
                    first_reasoning_ms=ttft if reasoned else 0.0,
                    first_answer_ms=float(rng.gamma(8.0, s.ttfo.p50_ms / 8.0)) if reasoned else ttft,
                )
            )
    return RunReportData(run, result, digest if samples else None, "" if samples else "samples not fetched")


def _styles(n: int) -> list[RunStyle]:
    return run_styles([run_data(f"run_{i}", plain_stage()) for i in range(n)])


def report(*runs: RunReportData) -> str:
    return build_report(list(runs), datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))


def section(html: str, name: str) -> str:
    found = re.search(rf'<section id="{name}".*?</section>', html, re.DOTALL)
    assert found is not None, name
    return found.group(0)


def cells(row_html: str) -> list[str]:
    return [unescape(re.sub(r"<[^>]+>", " ", c)).split()[0] for c in re.findall(r"<td[^>]*>(.*?)</td>", row_html)]


def test_a_plain_run_has_none_of_the_sections_and_no_token_note() -> None:
    html = report(run_data("run_plain", plain_stage(0), plain_stage(1)))
    for name in SECTIONS:
        assert f'data-section="{name}"' not in html
    assert "data-tokens" not in html and 'data-chart="ttft-by-turn"' not in html


def test_reasoning_shows_ttfr_ttfo_and_the_token_split_per_stage() -> None:
    s = reasoning_stage(1)
    html = report(run_data("run_r", plain_stage(0), s))
    part = section(html, "reasoning")
    rows = re.findall(r'<tr data-stage="(\d+)">(.*?)</tr>', part, re.DOTALL)
    assert [i for i, _ in rows] == ["1"]  # the plain stage has no row
    values = cells(rows[0][1])
    assert values[2:] == [
        f"{s.ttfr.p50_ms:,.1f}",
        f"{s.ttfr.p99_ms:,.1f}",
        f"{s.ttfo.p50_ms:,.1f}",
        f"{s.ttfo.p99_ms:,.1f}",
        f"{s.ttft.p50_ms:,.1f}",
        f"{s.mean_reasoning_tokens:,.1f}",
        f"{s.mean_answer_tokens:,.1f}",
        f"{s.reasoning_tokens:,}",
    ]
    # The distributions are drawn from the samples, with the stage's percentiles marked.
    for chart in ("ttfr-distribution", "ttfo-distribution"):
        figure = re.search(rf'<figure class="chart" data-chart="{chart}" data-stage="1".*?</figure>', part, re.DOTALL)
        assert figure is not None and "<path" in figure.group(0) and "150 requests" in figure.group(0)
    assert f"p50 {s.ttfo.p50_ms:.1f}" in part


def test_reasoning_distributions_say_why_without_samples() -> None:
    part = reasoning_section([run_data("run_r", reasoning_stage(0), samples=False)], _styles(1))
    assert 'data-chart="ttfr-distribution"' in part and "samples not fetched" in part


def test_conversations_show_each_turn_the_sessions_and_ttft_by_turn() -> None:
    s = conversation_stage(0)
    html = report(run_data("run_c", s, plain_stage(1)))
    part = section(html, "conversations")
    rows = re.findall(r'<tr data-turn="(\d+)">(.*?)</tr>', part, re.DOTALL)
    assert [int(t) for t, _ in rows] == [t.turn for t in s.turns]
    for (_, row), t in zip(rows, s.turns, strict=True):
        values = cells(row)
        assert values[:4] == [str(t.turn), str(t.requests_ok), str(t.requests_failed), f"{t.ttft.p50_ms:,.1f}"]
        assert values[-2:] == [f"{t.mean_input_tokens:,.1f}", f"{t.prefix_cache_hit_percent:.1f}%"]
    assert f"{s.sessions_completed:,} sessions completed" in part
    assert f"p50 {s.session_duration.p50_ms / 1000:,.2f} s" in part
    chart = re.search(r'<figure class="chart" data-chart="ttft-by-turn".*?</figure>', part, re.DOTALL)
    assert chart is not None and "<path" in chart.group(0)
    assert "TTFT by turn shows what the prefix cache buys" in chart.group(0)
    # One point per turn, its tooltip naming the turn's TTFT p50.
    for t in s.turns:
        assert f"turn {t.turn} · TTFT p50 {t.ttft.p50_ms:.1f} ms" in unescape(chart.group(0))
    hits = re.search(r'<figure class="chart" data-chart="cache-hit-by-turn".*?</figure>', part, re.DOTALL)
    assert hits is not None and "<path" in hits.group(0)


def test_several_runs_overlay_ttft_by_turn() -> None:
    a, b = conversation_stage(0), conversation_stage(0, (300.0, 290.0, 310.0))
    part = conversations_section([run_data("run_a", a), run_data("run_b", b)], _styles(2))
    chart = re.search(r'<figure class="chart" data-chart="ttft-by-turn".*?</figure>', part, re.DOTALL)
    assert chart is not None
    text = unescape(chart.group(0))
    assert "run_0 · stage 0 · TTFT p50" in text and "run_1 · stage 0 · TTFT p50" in text
    assert "turn 2 · TTFT p50 95.5 ms" in text and "turn 2 · TTFT p50 290.0 ms" in text


def test_the_prefix_cache_shows_the_client_beside_the_server() -> None:
    c = conversation_stage(0)
    server_only = plain_stage(1)
    server_only.server_metrics.prefix_cache_hit_percent = 71.5
    server_only.server_metrics.prefix_cache_source = "vllm:prefix_cache_hits_total / vllm:prefix_cache_queries_total"
    zero = plain_stage(2)
    zero.prefix_cache_hit_percent = 0.0  # reported 0 cached tokens, no server view: no row
    part = prefix_cache_section([run_data("run_p", c, server_only, zero)], _styles(1))
    rows = dict(re.findall(r'<tr data-stage="(\d+)">(.*?)</tr>', part, re.DOTALL))
    assert sorted(rows) == ["0", "1"]
    assert cells(rows["0"])[2:6] == [f"{c.prompt_tokens:,}", f"{c.cached_prompt_tokens:,}", "64.2%", "\u2013"]
    assert cells(rows["1"])[4:6] == ["\u2013", "71.5%"]
    assert "vllm:prefix_cache_hits_total" in rows["1"]


def test_the_token_accounting_note_is_in_the_summary() -> None:
    note = "input 512 reaches the model as 519 tokens (+7 template) <exact>"
    html = report(run_data("run_t", plain_stage(0), note=note))
    summary = section(html, "summary")
    assert 'data-tokens="exact"' in summary
    assert "519 tokens (+7 template) &lt;exact&gt;" in summary  # escaped
