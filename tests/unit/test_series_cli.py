"""The CLI's series output from hand-made messages: the history table and its sparkline, the
exit code `run --compare-to` gates on, the report's history chart, and the usage errors said
before any call."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from client import formats, series
from client.cli import main
from client.report.collect import RunReportData
from client.report.page import build_report
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

pytestmark = pytest.mark.timeout(30)
OK, FAILED, USAGE, INCONCLUSIVE = 0, 1, 2, 3


def history(*values: float | None, baseline: int = 1) -> run_service_pb2.GetSeriesHistoryResponse:
    response = run_service_pb2.GetSeriesHistoryResponse(name="svc", metric="ttft_p99_ms", confidence_percent=95)
    response.baseline.run_id = f"run_{baseline}"
    for i, value in enumerate(values):
        point = response.points.add(run_id=f"run_{i}", label_value=f"c{i}", baseline=i == baseline)
        point.create_time.FromSeconds(1_800_000_000 + 60 * i)
        point.state = run_pb2.RUN_STATE_SUCCEEDED if value is not None else run_pb2.RUN_STATE_FAILED
        if value is not None:
            point.value = value
            point.ci.low, point.ci.high = value * 0.9, value * 1.1
    return response


def test_a_sparkline_spans_the_lowest_to_the_highest_value() -> None:
    assert series.sparkline([1.0, 8.0, None, 4.5]) == "▁█ ▅"
    assert series.sparkline([3.0, 3.0]) == "▄▄"  # no spread: mid-height
    assert series.sparkline([None, None]) == "  "
    assert series.sparkline([]) == ""


def test_the_history_table_shows_changes_against_the_baseline() -> None:
    out = io.StringIO()
    console = Console(file=out, width=200, no_color=True)
    series.print_history(history(100.0, 80.0, 120.0, None), "commit", console, out)
    text = out.getvalue()
    rows = {f"c{i}": line for line in text.splitlines() for i in range(4) if f" run_{i} " in line}
    assert "+25.0%" in rows["c0"] and "+50.0%" in rows["c2"] and "+0.0%" in rows["c1"]
    assert "◆ baseline" in rows["c1"] and "baseline" not in rows["c0"]
    assert "[90.0, 110.0]" in rows["c0"] and "FAILED" in text
    assert "commit" in text and "intervals at 95%" in text
    trend = next(line for line in text.splitlines() if line.startswith("trend"))
    assert "▅▁█ " in trend and "80.0 … 120.0" in trend  # 100 is half-way: round(3.5) = 4
    marks = text.splitlines()[-1]
    assert marks.index("^") == trend.index("▁") and marks.endswith("^ baseline")  # under the baseline's bar


def test_a_history_without_runs_or_baseline_says_what_to_do() -> None:
    out = io.StringIO()
    series.print_history(run_service_pb2.GetSeriesHistoryResponse(name="svc"), "", Console(file=out), out)
    assert "run --series svc" in out.getvalue()
    unbased = history(1.0, 2.0, baseline=-1)
    unbased.ClearField("baseline")
    out = io.StringIO()
    series.print_history(unbased, "", Console(file=out, width=200), out)
    assert "runs baseline set svc RUN" in out.getvalue()


@pytest.mark.parametrize(
    ("run", "compared", "expected"),
    [
        (OK, OK, OK),
        (OK, FAILED, FAILED),
        (OK, INCONCLUSIVE, INCONCLUSIVE),
        (INCONCLUSIVE, OK, INCONCLUSIVE),
        (INCONCLUSIVE, FAILED, FAILED),
        (FAILED, INCONCLUSIVE, FAILED),
        (OK, USAGE, USAGE),
        (FAILED, USAGE, USAGE),
        (130, FAILED, 130),
    ],
)
def test_the_worse_exit_code_wins(run: int, compared: int, expected: int) -> None:
    assert series.worse_exit_code(run, compared) == expected
    assert series.worse_exit_code(compared, run) == expected


def test_a_comparison_exit_code_follows_its_outcome() -> None:
    response = run_service_pb2.CompareRunsResponse()
    assert formats.compare_exit_code(response) == OK
    response.outcome = run_service_pb2.COMPARE_OUTCOME_INCONCLUSIVE
    assert formats.compare_exit_code(response) == INCONCLUSIVE
    response.outcome = run_service_pb2.COMPARE_OUTCOME_REGRESSED
    assert formats.compare_exit_code(response) == FAILED
    flagged = run_service_pb2.CompareRunsResponse()
    flagged.comparisons.add(run_id="r", regressed=True)
    assert formats.compare_exit_code(flagged) == FAILED


def report_data(values: list[float | None]) -> RunReportData:
    run = run_pb2.Run(id="run_2")
    run.spec.series = "svc"
    result = run_pb2.RunResult(run_id="run_2")
    return RunReportData(run, result, history=history(*values))


def test_the_report_charts_a_series_history_with_its_baseline() -> None:
    page = build_report([report_data([100.0, 80.0, 120.0])])
    assert "<h2>History of svc</h2>" in page and 'data-chart="history-svc"' in page
    chart = page[page.index('data-chart="history-svc"') :]
    assert "baseline c1" in chart and "this run" in chart and "95 % interval" in chart
    assert chart.count("<circle") >= 3  # one per valued point


def test_the_report_shows_no_history_of_fewer_than_two_values() -> None:
    assert "History of" not in build_report([report_data([100.0, None])])
    assert "History of" not in build_report([RunReportData(run_pb2.Run(id="r"), run_pb2.RunResult(run_id="r"))])


RUN = ["run", "--controller", "127.0.0.1:1", "--target", "http://127.0.0.1:9/v1", "--model", "m"]


def test_compare_to_another_series_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*RUN, "--concurrency", "1", "--series", "a", "--compare-to", "b"]) == USAGE
    assert "--series a and --compare-to b" in capsys.readouterr().err
    assert main([*RUN, "--concurrency", "1", "--compare-to", "b", "--detach"]) == USAGE
    assert "not with --detach" in capsys.readouterr().err


def test_labels_and_series_go_into_the_spec() -> None:
    from client.spec_builder import build_spec, spec_parser

    args = spec_parser().parse_args(
        [
            *("--target", "http://h/v1", "--model", "m", "--concurrency", "1", "--series", "svc"),
            *("--label", "commit=abc", "--label", "image=v1=x", "--label", "empty="),
        ]
    )
    spec = build_spec(args)
    assert spec.series == "svc"
    assert dict(spec.labels) == {"commit": "abc", "image": "v1=x", "empty": ""}
    with pytest.raises(SystemExit):
        spec_parser().parse_args(["--target", "t", "--model", "m", "--label", "novalue"])


def test_the_interval_column_is_left_out_when_no_value_has_one() -> None:
    bare = history(10.0, 20.0)
    for point in bare.points:
        point.ClearField("ci")
    out = io.StringIO()
    series.print_history(bare, "", Console(file=out, width=200, no_color=True), out)
    header = next(line for line in out.getvalue().splitlines() if "created" in line)
    assert "interval" not in header and "vs baseline" in header and "-50.0%" in out.getvalue()
