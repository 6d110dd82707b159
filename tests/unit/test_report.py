"""The HTML report built from hand-made results: every chart is present (drawn, or a
"no data" note), user strings are escaped, several runs are overlaid."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from html.parser import HTMLParser

import numpy as np
import pytest

from client.report import charts
from client.report.collect import RunReportData, SampleDigest
from client.report.page import build_report
from common.codes import RequestStatus
from common.metrics import SampleColumns, compute_stage_metrics
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

pytestmark = pytest.mark.timeout(30)

CHARTS = (
    "ttft-vs-throughput",
    "tpot-vs-throughput",
    "timeline-throughput",
    "timeline-ttft",
    "timeline-errors",
    "ttft-distribution",
    "tpot-distribution",
)


def latency(p50: float, spread: float = 0.3, count: int = 100) -> run_pb2.LatencyStats:
    return run_pb2.LatencyStats(
        count=count,
        mean_ms=p50 * 1.05,
        std_ms=p50 * spread / 2,
        min_ms=p50 * 0.7,
        max_ms=p50 * (1 + 2 * spread),
        p50_ms=p50,
        p90_ms=p50 * (1 + spread * 0.6),
        p95_ms=p50 * (1 + spread * 0.8),
        p99_ms=p50 * (1 + spread),
        p999_ms=p50 * (1 + 1.5 * spread),
    )


def make_stage(
    index: int, concurrency: int, ttft_p50: float, tok_s: float, seconds: int = 5, errors_at: int | None = None
) -> run_pb2.StageResult:
    ok = int(tok_s * seconds / 32)
    failed = 2 if errors_at is not None else 0
    stage = run_pb2.StageResult(
        index=index,
        name=f"concurrency={concurrency}",
        concurrency=concurrency,
        requests_ok=ok,
        requests_failed=failed,
        duration_s=seconds - 0.2,
        request_throughput=ok / seconds,
        output_token_throughput=tok_s,
        total_token_throughput=tok_s * 3,
        peak_output_token_throughput=tok_s * 1.2,
        achieved_concurrency=concurrency * 0.97,
        prompt_tokens=ok * 64,
        output_tokens=ok * 32,
        ttft=latency(ttft_p50),
        tpot=latency(10 + concurrency * 0.2, 0.1),
        itl=latency(10 + concurrency * 0.2, 0.15),
        e2e=latency(ttft_p50 + 32 * 11),
        queue_delay=latency(0.2),
        e2e_including_queue=latency(ttft_p50 + 32 * 11),
        max_event_loop_lag_ms=3.5,
    )
    if errors_at is not None:
        stage.errors["http_5xx"] = failed
    for sec in range(seconds):
        stage.time_series.add(
            second=sec,
            completed=ok // seconds,
            errors=failed if sec == errors_at else 0,
            output_tokens=tok_s * (0.9 + 0.05 * (sec % 3)),
            ttft_p50_ms=ttft_p50 * (1 + 0.03 * sec),
            ttft_p99_ms=ttft_p50 * 1.3,
        )
    template = run_pb2.StageResult()
    template.CopyFrom(stage)
    del template.time_series[:]
    for agent in ("agent-a", "agent-b"):
        row = stage.agents.add()
        row.CopyFrom(template)
        row.agent_name = agent
        row.requests_ok = ok // 2
    return stage


def make_run(run_id: str, name: str, scale: float = 1.0, slo: bool = True) -> tuple[run_pb2.Run, run_pb2.RunResult]:
    run = run_pb2.Run(id=run_id, state=run_pb2.RUN_STATE_SUCCEEDED)
    run.spec.display_name = name
    run.spec.target.base_url = "http://127.0.0.1:8000/v1"
    run.spec.target.model = "mock-model"
    run.spec.workload.synthetic.input_tokens.fixed = 64
    run.spec.workload.synthetic.output_tokens.fixed = 32
    run.spec.labels["team"] = "serving"
    run.create_time.FromSeconds(1_700_000_000)
    run.start_time.FromSeconds(1_700_000_001)
    run.end_time.FromSeconds(1_700_000_020)
    result = run_pb2.RunResult(run_id=run_id, state=run_pb2.RUN_STATE_SUCCEEDED)
    for i, (c, ttft, tok) in enumerate(((1, 50, 300), (8, 60, 2000), (32, 140, 5000))):
        stage = run.spec.stages.add(concurrency=c)
        stage.duration.FromSeconds(5)
        result.stages.append(make_stage(i, c, ttft * scale, tok / scale, errors_at=2 if i == 2 else None))
    if slo:
        run.spec.slo.ttft.FromMilliseconds(100)
        run.spec.checks.add(expression="p99(ttft) < 100ms")
        for s in result.stages:
            s.goodput = s.request_throughput * 0.9
            s.good_fraction = 0.9
            check = run_pb2.CheckResult(
                expression="p99(ttft) < 100ms",
                stage_index=s.index,
                passed=s.ttft.p99_ms < 100,
                measured=s.ttft.p99_ms,
                threshold=100,
                message=f"p99(ttft) = {s.ttft.p99_ms:.4g} ms, want < 100 ms",
            )
            s.checks.append(check)
            result.checks.append(check)
        result.verdict = run_pb2.VERDICT_FAIL
    else:
        result.verdict = run_pb2.VERDICT_NONE
    return run, result


def make_samples(result: run_pb2.RunResult, seed: int = 1) -> SampleDigest:
    rng = np.random.default_rng(seed)
    digest = SampleDigest()
    for s in result.stages:
        for _ in range(200):
            ttft = float(rng.gamma(8.0, s.ttft.p50_ms / 8.0))
            tpot = float(rng.normal(s.tpot.p50_ms, 0.5))
            digest.add(
                run_service_pb2.ExportedSample(
                    stage_index=s.index,
                    ttft_ms=ttft,
                    e2e_ms=ttft + 31 * tpot,
                    output_tokens=32,
                    status=run_pb2.REQUEST_STATUS_OK,
                    usage_reported=True,
                )
            )
        digest.add(run_service_pb2.ExportedSample(stage_index=s.index, status=run_pb2.REQUEST_STATUS_HTTP_5XX))
    return digest


def report_for(*runs: tuple[run_pb2.Run, run_pb2.RunResult], samples: bool = True) -> str:
    data = [
        RunReportData(
            run,
            result,
            make_samples(result) if samples else None,
            "" if samples else "the controller cannot export samples",
        )
        for run, result in runs
    ]
    return build_report(data, datetime(2024, 1, 2, 3, 4, 5, tzinfo=UTC))


class _Charts(HTMLParser):
    """Collects, per data-chart element, whether it holds drawn SVG shapes or a no-data note."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: list[dict[str, object]] = []
        self._stack: list[dict[str, object] | None] = []
        self.scripts: list[str] = []
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "script":
            self._in_script = True
        if "data-chart" in a:
            chart: dict[str, object] = {
                "name": a["data-chart"],
                "empty": a.get("data-empty") == "true",
                "shapes": 0,
                "stage": a.get("data-stage"),
            }
            self.charts.append(chart)
            self._stack.append(chart)
            return
        if tag in ("path", "rect", "circle") and self._stack and self._stack[-1] is not None:
            current = self._stack[-1]
            current["shapes"] = int(str(current["shapes"])) + 1
        if tag == "figure":
            self._stack.append(None)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False
        if tag == "figure" and self._stack:
            self._stack.pop()

    def handle_data(self, data: str) -> None:
        if self._in_script:
            self.scripts.append(data)


def parse(html: str) -> _Charts:
    parser = _Charts()
    parser.feed(html)
    return parser


def test_single_run_report_draws_every_chart() -> None:
    html = report_for(make_run("run_1", "baseline"))
    charts = parse(html).charts
    names = {str(c["name"]) for c in charts}
    assert names == set(CHARTS)
    assert all(not c["empty"] and int(str(c["shapes"])) > 0 for c in charts), charts
    # One TTFT and one TPOT distribution per stage.
    assert sorted(str(c["stage"]) for c in charts if c["name"] == "ttft-distribution") == ["0", "1", "2"]
    assert sorted(str(c["stage"]) for c in charts if c["name"] == "tpot-distribution") == ["0", "1", "2"]
    # Self-contained: nothing loaded from anywhere.
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html)
    assert "<link" not in html


def test_report_shows_checks_verdict_saturation_and_agents() -> None:
    run, result = make_run("run_1", "baseline")
    result.stages[2].saturated = True
    result.stages[2].saturation_reason = "event-loop lag 120 ms > 50 ms"
    html = report_for((run, result))
    assert 'data-verdict="FAIL"' in html
    assert "p99(ttft) &lt; 100ms" in html  # the expression, escaped
    assert html.count('<tr class="fail">') == 1 and html.count('<tr class="pass">') == 2
    assert "event-loop lag 120 ms &gt; 50 ms" in html
    assert html.count("agent-a") == 3 and html.count("agent-b") == 3
    assert "ttft ≤ 100 ms" in html  # the SLO
    assert "goodput" in html


def test_report_shows_target_saturation_next_to_the_generators() -> None:
    run, result = make_run("run_1", "baseline")
    html = report_for((run, result))
    assert "data-target-saturated" not in html
    for s in result.stages:
        s.concurrency, s.request_rate = 0, 2.0
    result.stages[1].target_saturated = True
    result.stages[1].target_saturation_reason = "the target did not keep up at rate 2/s: achieved 0.69/s (<x>)"
    html = report_for((run, result))
    health = html[html.index('data-section="saturation"') :]
    health = health[: health.index("</section>")]
    assert 'data-target-saturated="1"' in health
    assert "the target did not keep up at rate 2/s: achieved 0.69/s (&lt;x&gt;)" in health
    assert "The target kept up with every open-loop stage" not in health
    assert health.count("⚠ no") == 1  # the table's column, for stage 1 only
    result.stages[1].target_saturated = False
    assert "The target kept up with every open-loop stage" in report_for((run, result))


def test_user_strings_are_escaped() -> None:
    run, result = make_run("run_1", "<script>alert(1)</script>")
    run.spec.labels["<img src=x onerror=alert(2)>"] = '"><script>alert(3)</script>'
    run.spec.target.model = "<b>model</b>"
    run.state_reason = "<iframe>"
    result.stages[0].name = "</svg><script>alert(4)</script>"
    result.stages[0].agents[0].agent_name = "<script>alert(5)</script>"
    result.checks[0].message = "<script>alert(6)</script>"
    html = report_for((run, result))
    parser = parse(html)
    # The only script is the report's own legend toggle.
    assert len(re.findall(r"<script\b", html)) == 1
    assert "alert" not in "".join(parser.scripts)
    assert "<img" not in html and "<iframe" not in html and "<b>model" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    # Escaping did not break the document: every chart is still found and drawn.
    assert {str(c["name"]) for c in parser.charts} == set(CHARTS)


def test_several_runs_are_overlaid_with_one_color_each() -> None:
    html = report_for(make_run("run_a", "before"), make_run("run_b", "after", scale=1.3))
    charts = parse(html).charts
    assert all(not c["empty"] for c in charts)
    for group in ("run-0", "run-1"):
        assert f'data-toggle="{group}"' in html
        assert f'class="series {group}"' in html
    ttft_chart = html[html.index('data-chart="ttft-vs-throughput"') : html.index('data-chart="tpot-vs-throughput"')]
    assert "before · TTFT p99" in ttft_chart and "after · TTFT p99" in ttft_chart
    assert "#4e79a7" in ttft_chart and "#f28e2b" in ttft_chart


def test_missing_data_gives_notes_not_errors() -> None:
    run, result = make_run("run_1", "x", slo=False)
    for s in result.stages:
        del s.time_series[:]
    html = report_for((run, result), samples=False)
    charts = {(str(c["name"]), c["stage"]): c for c in parse(html).charts}
    for name in ("timeline-throughput", "timeline-ttft", "timeline-errors", "ttft-distribution", "tpot-distribution"):
        hits = [c for (n, _), c in charts.items() if n == name]
        assert hits and all(c["empty"] for c in hits), name
    assert "cannot export samples" in html
    assert "The run has no checks." in html
    assert not charts[("ttft-vs-throughput", None)]["empty"]

    empty = build_report([RunReportData(run_pb2.Run(id="run_e"), run_pb2.RunResult(run_id="run_e"))])
    parsed = parse(empty).charts
    assert {str(c["name"]) for c in parsed} == set(CHARTS)
    assert all(c["empty"] for c in parsed)


def test_sample_digest_computes_tpot_per_request() -> None:
    digest = SampleDigest()
    ok = run_pb2.REQUEST_STATUS_OK
    digest.add(run_service_pb2.ExportedSample(stage_index=1, ttft_ms=50, e2e_ms=360, output_tokens=32, status=ok))
    digest.add(run_service_pb2.ExportedSample(stage_index=1, ttft_ms=40, e2e_ms=40, output_tokens=1, status=ok))
    digest.add(run_service_pb2.ExportedSample(stage_index=1, ttft_ms=0, e2e_ms=300, output_tokens=8, status=ok))
    digest.add(run_service_pb2.ExportedSample(stage_index=1, status=run_pb2.REQUEST_STATUS_TIMEOUT))
    digest.add(
        run_service_pb2.ExportedSample(stage_index=1, ttft_ms=9, e2e_ms=20, output_tokens=3, status=ok, warmup=True)
    )
    assert digest.count == 5
    assert digest.stages[1].ttft_ms == [50, 40]
    assert digest.stages[1].tpot_ms == [10.0]  # (360 - 50) / 31


def test_sample_digest_tpot_agrees_with_the_controllers_metrics() -> None:
    # The same requests as the controller stores them (ns) and as the export gives them (ms).
    requests = [(50, 360, 32), (40, 40, 1), (12, 90, 7), (30, 31, 2), (25, 1025, 101)]  # first, last ms; tokens
    ms = 1_000_000
    n = len(requests)
    zeros = np.zeros(n, dtype=np.int64)
    cols = SampleColumns(
        sent_unix_ns=np.arange(n, dtype=np.int64) * 1_000 * ms,
        queue_delay_ns=zeros,
        first_token_ns=[f * ms for f, _, _ in requests],
        last_token_ns=[last * ms for _, last, _ in requests],
        done_ns=[(last + 1) * ms for _, last, _ in requests],
        prompt_tokens=zeros,
        output_tokens=[t for _, _, t in requests],
        status=np.full(n, int(RequestStatus.OK)),
        flags=zeros,
        itl_count=zeros,
        itl_ns=np.zeros(0, dtype=np.int64),
    )
    digest = SampleDigest()
    for first, last, tokens in requests:
        digest.add(
            run_service_pb2.ExportedSample(
                stage_index=0,
                ttft_ms=first,
                e2e_ms=last,
                done_ms=last + 1,
                output_tokens=tokens,
                status=run_pb2.REQUEST_STATUS_OK,
            )
        )
    tpot = digest.stages[0].tpot_ms
    controller = compute_stage_metrics(cols).tpot
    assert len(tpot) == controller.count == 4
    assert min(tpot) == pytest.approx(controller.min) and max(tpot) == pytest.approx(controller.max)
    assert float(np.mean(tpot)) == pytest.approx(controller.mean)


def test_axes_have_round_ticks_with_the_decimals_they_need() -> None:
    axis = charts.nice_axis(0.0, 15.0, from_zero=True, target_ticks=6)
    assert axis.ticks == [0.0, 2.5, 5.0, 7.5, 10.0, 12.5, 15.0]
    assert [charts.tick_text(t, 2.5) for t in axis.ticks[:4]] == ["0.0", "2.5", "5.0", "7.5"]
    assert charts.tick_text(1500.0, 500.0) == "1,500" and charts.tick_text(20000.0, 5000.0) == "20k"
    assert charts.nice_axis(21.3, 24.9, from_zero=False).ticks[0] <= 21.3
    assert charts.nice_axis(5.0, 5.0, from_zero=False).hi > 5.0  # a flat series still gets an axis
    nan = charts.Series("x", [(0.0, float("nan"))], "#000")
    assert 'data-empty="true"' in charts.xy_chart("c", "t", [nan], "x", "y")
