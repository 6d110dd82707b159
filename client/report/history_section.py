"""The report's "History of <series>" section: for a run of a series, one metric (the series
history's default, TTFT p99 of each run's first stage) over the series' runs, with its interval
and the baseline marked (GetSeriesHistory, read by collect.py)."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from client.report import charts
from client.report.charts import Level, Marker, Series
from client.report.collect import RunReportData
from client.report.formatting import RunStyle
from common.proto.loadtest.v1 import run_service_pb2

MIN_POINTS = 2  # a history of one run is no trend


def _valued(history: run_service_pb2.GetSeriesHistoryResponse) -> list[tuple[int, run_service_pb2.HistoryPoint]]:
    """(x, point) of the points with a value; x counts every point from 1, oldest first."""
    return [(i, p) for i, p in enumerate(history.points, start=1) if p.HasField("value")]


def _name(point: run_service_pb2.HistoryPoint) -> str:
    return point.label_value or point.run_id


def _chart(data: RunReportData, style: RunStyle, history: run_service_pb2.GetSeriesHistoryResponse) -> str:
    valued = _valued(history)
    metric = history.metric
    tips = [f"{_name(p)} ({p.run_id}): {metric} {p.value:.4g}" for _, p in valued]
    series = [
        Series(
            metric,
            [(x, p.value) for x, p in valued],
            style.color,
            marker="circle",
            point_labels=[_name(p) if p.label_value else "" for _, p in valued],
            tooltips=tips,
        )
    ]
    bounded = [(x, p) for x, p in valued if p.HasField("ci")]
    if bounded:
        level = f"{history.confidence_percent:g} % interval" if history.confidence_percent else "interval"
        for side in ("low", "high"):
            points = [(x, getattr(p.ci, side)) for x, p in bounded]
            series.append(Series(level, points, "#8a8f98", dashed=True, marker="none"))
    markers: list[Marker] = []
    levels: list[Level] = []
    for x, p in enumerate(history.points, start=1):
        if p.baseline:
            markers.append(Marker(x, f"baseline {_name(p)}", "#a40e26", dashed=False))
            if p.HasField("value"):
                levels.append(Level(p.value, f"baseline {p.value:.4g}"))
        if p.run_id == data.run.id and not p.baseline:
            markers.append(Marker(x, "this run"))
    stage = history.load or "each run's first stage"
    caption = (
        f"{metric} of {stage} over the last {len(history.points)} runs of the series, oldest first "
        "(runs that did not succeed have no point); dashed grey: the interval of each value; red: the "
        "series' baseline."
    )
    return charts.xy_chart(
        f"history-{history.name}",
        f"{metric} over the runs of {history.name}",
        series,
        "run of the series (1 = oldest shown)",
        metric,
        markers=markers,
        levels=levels,
        x_from_zero=False,
        caption=caption,
    )


def history_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    """One chart per series of the runs shown (empty when no run has a history of two points)."""
    parts: list[str] = []
    seen: set[str] = set()
    for data, style in zip(runs, styles, strict=True):
        history = data.history
        if history is None or history.name in seen or len(_valued(history)) < MIN_POINTS:
            continue
        seen.add(history.name)
        parts.append(
            f'<section id="history-{escape(history.name)}"><h2>History of {escape(history.name)}</h2>'
            f'<div class="charts">{_chart(data, style, history)}</div></section>'
        )
    return "".join(parts)
