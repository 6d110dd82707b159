"""The report's chart sections: latency against output throughput across stages (the curve
used to pick an operating point), the per-second timeline of throughput, TTFT and errors (with
the model server's charts beside it), and per-stage TTFT and TPOT distributions drawn from the
exported samples."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape

import numpy as np

from client import formats
from client import intervals as ci_text
from client.intervals import interval_of
from client.report import charts
from client.report.charts import Band, ErrorBar, Level, Marker, Series
from client.report.collect import RunReportData, StageLatencies
from client.report.formatting import RunStyle, short_load
from client.report.server_sections import server_timeline_charts
from common import durations, search_outcome
from common.proto.loadtest.v1 import run_pb2

HISTOGRAM_BINS = 30  # across the narrowest run's spread
HISTOGRAM_MAX_BINS = 240
HISTOGRAM_UPPER_QUANTILE = 0.995  # a few outliers must not squash the whole distribution


def _error_bar(ci: run_pb2.Interval | None) -> ErrorBar | None:
    return None if ci is None else ErrorBar(ci.low, ci.high, ci.low_open, ci.high_open)


@dataclass
class _StagePoints:
    """One chart line's points, a point per stage, with what goes with each."""

    points: list[tuple[float, float]] = field(default_factory=list)
    loads: list[str] = field(default_factory=list)
    tips: list[str] = field(default_factory=list)
    y_errors: list[ErrorBar | None] = field(default_factory=list)
    x_errors: list[ErrorBar | None] = field(default_factory=list)


def _stage_points(
    stages: Sequence[run_pb2.StageResult], metric: str, attr: str, label: str, run: RunStyle
) -> _StagePoints:
    """(output tok/s, latency) per stage that measured the metric, with the stages' loads,
    tooltips and the two figures' confidence intervals (error bars)."""
    out = _StagePoints()
    for s in stages:
        stats: run_pb2.LatencyStats = getattr(s, metric)
        if not s.requests_ok or not stats.count:
            continue
        value = float(getattr(stats, attr))
        ci = interval_of(stats, attr.replace("_ms", "_ci"))
        rate_ci = interval_of(s, "output_token_throughput_ci")
        out.points.append((s.output_token_throughput, value))
        out.loads.append(short_load(s))
        shown = f" {ci_text.bounds(ci)}" if ci is not None else ""
        rate_shown = f" {ci_text.bounds(rate_ci)}" if rate_ci is not None else ""
        out.tips.append(
            f"{run.label} · {short_load(s)} · {label} {value:.1f} ms{shown} at "
            f"{s.output_token_throughput:.0f} tok/s{rate_shown}"
        )
        out.y_errors.append(_error_bar(ci))
        out.x_errors.append(_error_bar(rate_ci))
    return out


# Probes of a capacity search, coloured by how they were judged.
OUTCOME_COLORS = {
    run_pb2.PROBE_OUTCOME_PASS: ("pass", "#59a14f"),
    run_pb2.PROBE_OUTCOME_FAIL: ("fail", "#e15759"),
    run_pb2.PROBE_OUTCOME_INCONCLUSIVE: ("inconclusive", "#9c9c9c"),
}
CAPACITY_COLOR = "#116329"


def _probe_series(data: RunReportData, style: RunStyle, metric: str, several: bool) -> list[Series]:
    """A search's probes on one latency-vs-throughput chart: per outcome, p50 (circles) and p99
    (squares, labelled with the load), points alone since probes run in search order."""
    capacity = data.result.capacity
    out: list[Series] = []
    for outcome, (word, color) in OUTCOME_COLORS.items():
        for percentile, marker in (("p50", "circle"), ("p99", "square")):
            points, loads, tips = [], [], []
            for i, p in enumerate(capacity.probes):
                value = float(getattr(p, f"{metric}_{percentile}_ms"))
                if p.outcome != outcome or not p.requests or not value:
                    continue
                load = formats.search_load(capacity.variable, p.load)
                points.append((p.output_token_throughput, value))
                loads.append(load if percentile == "p99" else "")
                tips.append(
                    f"{style.label} · probe {i} · {load} · {word} · good {p.good_percent:.1f} % · "
                    f"{metric.upper()} {percentile} {value:.1f} ms at {p.output_token_throughput:.0f} tok/s"
                )
            if not points:  # no legend entry for an outcome no probe had
                continue
            label = f"{word} · {metric.upper()} {percentile}"
            out.append(
                Series(
                    f"{style.label} · {label}" if several else label,
                    points,
                    color,
                    style.group,
                    marker=marker,
                    point_labels=loads,
                    tooltips=tips,
                    line=False,
                )
            )
    return out


def _search_lines(data: RunReportData, style: RunStyle, metric: str, several: bool) -> tuple[list[Marker], list[Level]]:
    """The capacity (a vertical line at its throughput) and the run's SLO on `metric`."""
    prefix = f"{style.label} · " if several else ""
    markers: list[Marker] = []
    capacity = data.result.capacity
    if search_outcome.capacity_measured(capacity):
        load = formats.search_load(capacity.variable, capacity.highest_passing)
        markers.append(
            Marker(
                capacity.output_token_throughput,
                f"{prefix}capacity {load}",
                style.color if several else CAPACITY_COLOR,
                style.group,
                dashed=False,
            )
        )
    levels: list[Level] = []
    slo = data.run.spec.slo
    if slo.HasField(metric):  # type: ignore[arg-type]
        ms = durations.millis(getattr(slo, metric))
        levels.append(Level(ms, f"{prefix}SLO {metric.upper()} {ms:g} ms", group=style.group))
    return markers, levels


def latency_throughput_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    ttft: list[Series] = []
    tpot: list[Series] = []
    extras: dict[str, tuple[list[Marker], list[Level]]] = {"ttft": ([], []), "tpot": ([], [])}
    # (metric, percentile, label, dashed, marker, label the points with the stage's load)
    lines = (
        (ttft, "ttft", "p50_ms", "TTFT p50", False, "circle", False),
        (ttft, "ttft", "p99_ms", "TTFT p99", True, "square", True),
        (tpot, "tpot", "p50_ms", "TPOT p50", False, "circle", True),
        (tpot, "tpot", "p99_ms", "TPOT p99", True, "square", False),
    )
    several = len(runs) > 1
    for data, st in zip(runs, styles, strict=True):
        if data.result.HasField("capacity"):
            for target, metric in ((ttft, "ttft"), (tpot, "tpot")):
                target.extend(_probe_series(data, st, metric, several))
                markers, levels = _search_lines(data, st, metric, several)
                extras[metric][0].extend(markers)
                extras[metric][1].extend(levels)
            continue
        for target, metric, attr, label, dashed, marker, labelled in lines:
            p = _stage_points(data.result.stages, metric, attr, label, st)
            name = f"{st.label} · {label}" if several else label
            target.append(
                Series(
                    name,
                    p.points,
                    st.color,
                    st.group,
                    dashed,
                    marker,
                    p.loads if labelled else (),
                    p.tips,
                    y_errors=p.y_errors,
                    x_errors=p.x_errors,
                )
            )
    caption = (
        "One point per stage (labelled with its load), with its 95 % confidence intervals as error bars "
        "(a dashed stub without a cap: that side is not bounded, too few requests). Pick the operating "
        "point where throughput still rises and the latency you care about is still inside its objective."
    )
    if any(d.result.HasField("capacity") for d in runs):
        caption = (
            "Stages: one point per stage (labelled with its load). Capacity searches: one point per probe "
            "(circles p50, squares p99 labelled with the load), green passed, red failed, grey "
            "inconclusive; the dotted line is the SLO, the solid vertical line the capacity (the highest "
            "passing probe's throughput)."
        )
    return (
        '<section id="latency-throughput"><h2>Latency vs throughput</h2><div class="charts">'
        + charts.xy_chart(
            "ttft-vs-throughput",
            "TTFT vs output throughput",
            ttft,
            "output tokens/s",
            "TTFT (ms)",
            markers=extras["ttft"][0],
            levels=extras["ttft"][1],
            caption=caption,
            empty_note="no stage completed a streamed request",
        )
        + charts.xy_chart(
            "tpot-vs-throughput",
            "TPOT vs output throughput",
            tpot,
            "output tokens/s",
            "TPOT (ms)",
            markers=extras["tpot"][0],
            levels=extras["tpot"][1],
            caption=caption,
            empty_note="no stage completed a request with more than one token",
        )
        + "</div></section>"
    )


def _stage_offsets(result: run_pb2.RunResult) -> list[float]:
    """Seconds from the run's first stage to each stage's start, stages placed back to back."""
    offsets, t = [], 0.0
    for s in result.stages:
        offsets.append(t)
        last = max((b.second for b in s.time_series), default=-1)
        t += max(float(math.ceil(s.duration_s)), float(last + 1), 1.0)
    offsets.append(t)
    return offsets


def timeline_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    throughput: list[Series] = []
    ttft: list[Series] = []
    errors: list[Series] = []
    total_errors = 0
    for data, st in zip(runs, styles, strict=True):
        offsets = _stage_offsets(data.result)
        tok: list[tuple[float, float]] = []
        err: list[tuple[float, float]] = []
        p50: list[tuple[float, float]] = []
        p99: list[tuple[float, float]] = []
        for s, offset in zip(data.result.stages, offsets, strict=False):
            if not s.time_series:
                continue
            by_second = {b.second: b for b in s.time_series}
            for sec in range(max(by_second) + 1):
                b = by_second.get(sec)
                x = offset + sec
                tok.append((x, b.output_tokens if b else 0.0))
                err.append((x, float(b.errors) if b else 0.0))
                total_errors += b.errors if b else 0
                if b is not None and b.completed and b.ttft_p50_ms > 0:
                    p50.append((x + 0.5, b.ttft_p50_ms))
                    p99.append((x + 0.5, b.ttft_p99_ms))
            end = offset + max(by_second) + 1
            tok.append((end, tok[-1][1]))
            err.append((end, err[-1][1]))
        prefix = f"{st.label} · " if len(runs) > 1 else ""
        if tok:
            throughput.append(
                Series(f"{prefix}output tok/s", tok, st.color, st.group, marker="none", step=True, fill=len(runs) == 1)
            )
            errors.append(Series(f"{prefix}errors/s", err, st.color, st.group, marker="none", step=True, fill=True))
        if p50:
            ttft.append(Series(f"{prefix}TTFT p50", p50, st.color, st.group, marker="none"))
            ttft.append(Series(f"{prefix}TTFT p99", p99, st.color, st.group, dashed=True, marker="none"))
    bands: list[Band] = []
    if runs:
        first = runs[0].result
        offsets = _stage_offsets(first)
        bands = [
            Band(offsets[i], offsets[i + 1], f"{s.index} · {short_load(s)}", i % 2 == 1)
            for i, s in enumerate(first.stages)
        ]
    caption = "Per 1-second bucket of each stage, stages placed back to back (bands: the first run's stages)."
    note = "the result has no per-second time series"
    # The server's charts sit under the client's (two columns): requests under throughput, KV under TTFT.
    server_requests, server_kv, server_tokens = server_timeline_charts(
        [d.result for d in runs], styles, [_stage_offsets(d.result) for d in runs], bands
    )
    return (
        '<section id="timeline"><h2>Timeline</h2><div class="charts">'
        + charts.xy_chart(
            "timeline-throughput",
            "Output tokens per second",
            throughput,
            "seconds",
            "tokens/s",
            bands=bands,
            caption=caption,
            empty_note=note,
        )
        + charts.xy_chart(
            "timeline-ttft",
            "TTFT p50 / p99 of requests completing each second",
            ttft,
            "seconds",
            "TTFT (ms)",
            bands=bands,
            caption=caption,
            empty_note=note,
        )
        + server_requests
        + server_kv
        + charts.xy_chart(
            "timeline-errors",
            f"Errors per second ({total_errors:,} in total)",
            errors,
            "seconds",
            "errors/s",
            bands=bands,
            caption=caption,
            empty_note=note,
        )
        + server_tokens
        + "</div></section>"
    )


def _histogram_series(values: Sequence[Sequence[float]]) -> tuple[np.ndarray, list[np.ndarray], float, int]:
    """Shared bin edges for several value sets, percent of each set per bin, the upper
    bound, and how many values lie above it (counted in the last bin).

    The bin width follows the narrowest set's spread, so that two runs far apart on the axis
    still each show their shape instead of one or two bars."""
    arrays = [np.asarray(v, dtype=float) for v in values if len(v)]
    combined = np.concatenate(arrays)
    lo = float(combined.min())
    hi = float(np.quantile(combined, HISTOGRAM_UPPER_QUANTILE))
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    spreads = [float(np.quantile(a, HISTOGRAM_UPPER_QUANTILE) - a.min()) for a in arrays]
    narrowest = min((sp for sp in spreads if sp > 0), default=hi - lo)
    width = max(narrowest / HISTOGRAM_BINS, (hi - lo) / HISTOGRAM_MAX_BINS)
    edges = np.linspace(lo, hi, max(1, min(HISTOGRAM_MAX_BINS, math.ceil((hi - lo) / width))) + 1)
    shares = []
    for arr in arrays:
        counts, _ = np.histogram(np.clip(arr, lo, hi), bins=edges)
        shares.append(counts * 100.0 / max(1, len(arr)))
    return edges, shares, hi, int((combined > hi).sum())


def _distribution_chart(
    name: str,
    stage_index: int,
    title: str,
    metric: str,
    runs: Sequence[RunReportData],
    styles: Sequence[RunStyle],
    markers_from: str,
    marker_prefix: str,
    caption: str,
) -> str:
    attrs = {"data-stage": str(stage_index)}
    columns: list[tuple[RunStyle, list[float], run_pb2.StageResult | None]] = []
    for data, st in zip(runs, styles, strict=True):
        stage = next((s for s in data.result.stages if s.index == stage_index), None)
        if data.samples is None:
            continue
        values = getattr(data.samples.stages.get(stage_index, StageLatencies()), metric)
        if values:
            columns.append((st, values, stage))
    if not columns:
        why = next((r.samples_note for r in runs if r.samples is None and r.samples_note), "")
        return charts.empty_chart(name, title, why or "no OK streamed request in this stage", attrs)
    edges, shares, hi, above = _histogram_series([v for _, v, _ in columns])
    series, markers, off_chart = [], [], []
    span = float(edges[-1] - edges[0])
    for (st, values, stage), share in zip(columns, shares, strict=True):
        pts = [(float(edges[0]), 0.0)] + [(float(edges[i]), float(share[i])) for i in range(len(share))]
        pts.append((float(edges[-1]), 0.0))
        label = f"{st.label} ({len(values):,} requests)" if len(runs) > 1 else f"{len(values):,} requests"
        series.append(Series(label, pts, st.color, st.group, marker="none", step=True, fill=True))
        stats = getattr(stage, markers_from) if stage is not None else None
        if stats is not None and stats.count:
            for pname, attr in (("p50", "p50_ms"), ("p99", "p99_ms")):
                value = getattr(stats, attr)
                label = f"{marker_prefix}{pname} {value:.1f}"
                # A marker a little outside the bins widens the axis; one far outside would squash them.
                if edges[0] - span <= value <= edges[-1] + span:
                    markers.append(Marker(value, label, st.color, st.group))
                else:
                    off_chart.append(f"{label} ms")
    if off_chart:
        caption += f" Off the chart: {', '.join(off_chart)}."
    if above:
        caption += f" {above:,} value{'s are' if above > 1 else ' is'} above {hi:,.1f} ms, counted in the last bin."
    return charts.xy_chart(
        name, title, series, "ms", "% of requests", markers=markers, x_from_zero=False, caption=caption, attrs=attrs
    )


def distributions_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    indices = sorted({s.index for r in runs for s in r.result.stages})
    parts = ['<section id="distributions"><h2>Distributions per stage</h2>']
    if not indices:
        parts.append('<div class="charts">')
        parts.append(charts.empty_chart("ttft-distribution", "TTFT distribution", "the run has no stage results"))
        parts.append(charts.empty_chart("tpot-distribution", "TPOT distribution", "the run has no stage results"))
        parts.append("</div>")
    for index in indices:
        loads = sorted({short_load(s) for r in runs for s in r.result.stages if s.index == index})
        names = sorted({s.name for r in runs for s in r.result.stages if s.index == index and s.name})
        heading = f"Stage {index}" + (f" — {names[0]}" if len(names) == 1 else f" — {', '.join(loads)}")
        parts.append(f'<h3 class="stage-heading">{escape(heading)}</h3><div class="charts">')
        parts.append(
            _distribution_chart(
                "ttft-distribution",
                index,
                "TTFT distribution",
                "ttft_ms",
                runs,
                styles,
                "ttft",
                "",
                "Share of OK streamed requests by TTFT, from the exported samples; lines: the stage's p50 and p99.",
            )
        )
        parts.append(
            _distribution_chart(
                "tpot-distribution",
                index,
                "TPOT per request (ITL percentiles marked)",
                "tpot_ms",
                runs,
                styles,
                "itl",
                "ITL ",
                "TPOT per request = (last token - first token) / (output tokens - 1), from the exported samples "
                "(the export carries only each request's count of inter-token gaps, not the gaps). Lines: the "
                "stage's pooled ITL p50 and p99 from the result; ITL is per streamed event, so it exceeds TPOT "
                "when a server sends several tokens per event.",
            )
        )
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)
