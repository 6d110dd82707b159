"""`llm-loadtest report`: one self-contained HTML file describing one run, or several runs
overlaid (one colour per run).

The file needs no network: inline CSS, SVG charts drawn in Python (client/charts.py) and a
few lines of inline JavaScript that only toggle runs from the legends. It shows the summary
per stage; latency against output throughput across stages (the curve used to pick an
operating point); per-stage TTFT and TPOT distributions computed from ExportRunSamples; the
per-second timeline of throughput, TTFT and errors; the SLOs, checks and verdict; load
generator saturation and, beside it, whether the target kept up; and a per-agent table.
Every user-supplied string is HTML-escaped.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from html import escape
from pathlib import Path

import grpc
import numpy as np
from google.protobuf import duration_pb2, timestamp_pb2

from client import charts, render
from client.charts import Band, Marker, Series
from client.formats import NA, iter_checks, load_label, success_percent, verdict_name
from client.report_server import server_section, server_timeline_charts
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

HISTOGRAM_BINS = 30  # across the narrowest run's spread
HISTOGRAM_MAX_BINS = 240
HISTOGRAM_UPPER_QUANTILE = 0.995  # a few outliers must not squash the whole distribution


# --- data -----------------------------------------------------------------------------------


@dataclass
class StageSamples:
    """Per-request values of one stage's OK requests, in ms."""

    ttft_ms: list[float] = field(default_factory=list)
    tpot_ms: list[float] = field(default_factory=list)


class SampleDigest:
    """The columns of exported samples the report draws, kept per stage (the samples
    themselves are not kept: a long run has millions)."""

    def __init__(self) -> None:
        self.stages: dict[int, StageSamples] = {}
        self.count = 0

    def add(self, sample: run_service_pb2.ExportedSample) -> None:
        self.count += 1
        if sample.status != run_pb2.REQUEST_STATUS_OK or sample.warmup:
            return
        stage = self.stages.setdefault(sample.stage_index, StageSamples())
        if sample.ttft_ms > 0:
            stage.ttft_ms.append(sample.ttft_ms)
            # TPOT per docs/metrics.md: (last_token - first_token) / (output_tokens - 1).
            if sample.output_tokens > 1 and sample.e2e_ms >= sample.ttft_ms:
                stage.tpot_ms.append((sample.e2e_ms - sample.ttft_ms) / (sample.output_tokens - 1))


@dataclass
class RunReportData:
    """Everything the report shows of one run."""

    run: run_pb2.Run
    result: run_pb2.RunResult
    samples: SampleDigest | None = None  # None: samples not fetched or not available
    samples_note: str = ""


async def collect(client: ControllerClient, run_id: str, with_samples: bool = True) -> RunReportData:
    run = await client.get_run(run_id)
    result = await client.get_result(run_id)
    data = RunReportData(run, result)
    if not with_samples:
        data.samples_note = "samples not fetched (--no-samples)"
        return data
    digest = SampleDigest()
    try:
        async for sample in client.export_samples(run_id, page_size=5000):
            digest.add(sample)
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
        data.samples_note = "the controller cannot export samples (ExportRunSamples: UNIMPLEMENTED)"
        return data
    data.samples = digest
    return data


# --- formatting helpers -----------------------------------------------------------------------


def _ms(stats: run_pb2.LatencyStats, attr: str) -> str:
    return f"{getattr(stats, attr):,.1f}" if stats.count else NA


def _num(v: float, digits: int = 1) -> str:
    return f"{v:,.{digits}f}"


def _duration_ms(d: duration_pb2.Duration) -> float:
    return d.ToNanoseconds() / 1e6


def _time(ts: timestamp_pb2.Timestamp) -> str:
    if not (ts.seconds or ts.nanos):
        return NA
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _length(dist: run_pb2.LengthDistribution) -> str:
    kind = dist.WhichOneof("distribution")
    if kind == "fixed":
        return str(dist.fixed)
    if kind == "uniform":
        return f"{dist.uniform.min}-{dist.uniform.max}"
    if kind == "normal":
        return f"normal({dist.normal.mean:g}, {dist.normal.std:g})"
    return "default"


def _workload(spec: run_pb2.RunSpec) -> str:
    w = spec.workload
    if w.WhichOneof("source") == "dataset":
        name = w.dataset.name or "dataset"
        return f"{name} ({run_pb2.DatasetFormat.Name(w.dataset.format).removeprefix('DATASET_FORMAT_').lower()}, " \
               f"{w.dataset.entry_count} entries)"  # fmt: skip
    syn = w.synthetic
    text = f"synthetic, input {_length(syn.input_tokens)} tok, output {_length(syn.output_tokens)} tok"
    if syn.shared_prefix_tokens:
        text += f", shared prefix {syn.shared_prefix_tokens} tok"
    return text


def _stage_text(stage: run_pb2.Stage) -> str:
    load = f"{stage.request_rate:g} req/s" if stage.WhichOneof("load") == "request_rate" else f"c={stage.concurrency}"
    limits = []
    if stage.HasField("duration"):
        limits.append(f"{stage.duration.ToNanoseconds() / 1e9:g}s")
    if stage.requests:
        limits.append(f"{stage.requests} req")
    return f"{load} ({', '.join(limits)})" if limits else load


def _stage_cell(stage: run_pb2.StageResult) -> str:
    """The stage's number, its name when it is not just the load, and a saturation mark."""
    text = str(stage.index)
    if stage.name and stage.name != load_label(stage):
        text += f" {escape(stage.name)}"
    if stage.saturated:
        text += ' <span title="load generator saturated">⚠</span>'
    if stage.target_saturated:
        text += ' <span title="the target did not keep up">⚠</span>'
    return text


def _short_load(stage: run_pb2.StageResult) -> str:
    return f"{stage.request_rate:g}/s" if stage.request_rate else f"c={stage.concurrency}"


@dataclass(frozen=True)
class _RunStyle:
    label: str
    color: str
    group: str


def _styles(runs: Sequence[RunReportData]) -> list[_RunStyle]:
    names = [r.run.spec.display_name for r in runs]
    styles = []
    for i, r in enumerate(runs):
        name = r.run.spec.display_name
        label = f"{name} ({r.run.id})" if name and names.count(name) > 1 else (name or r.run.id)
        styles.append(_RunStyle(label, charts.PALETTE[i % len(charts.PALETTE)], f"run-{i}"))
    return styles


# --- sections -----------------------------------------------------------------------------------


def _header(runs: Sequence[RunReportData], styles: Sequence[_RunStyle], generated: datetime) -> str:
    cards = []
    for data, style in zip(runs, styles, strict=True):
        run, result = data.run, data.result
        spec = run.spec
        verdict = verdict_name(result.verdict)
        stages = ", ".join(_stage_text(s) for s in spec.stages) or NA
        labels = " ".join(f'<span class="label">{escape(k)}={escape(v)}</span>' for k, v in sorted(spec.labels.items()))
        samples = (f"{data.samples.count:,} samples exported" if data.samples is not None
                   else escape(data.samples_note or "samples not available"))  # fmt: skip
        api = "completions" if spec.target.api_kind == run_pb2.API_KIND_COMPLETIONS else "chat"
        rows = [
            ("Run id", f"<code>{escape(run.id)}</code>"),
            ("Model", escape(spec.target.model)),
            ("Target", f"<code>{escape(spec.target.base_url)}</code> ({api})"),
            ("Workload", escape(_workload(spec))),
            ("Stages", escape(stages)),
            ("Agents", str(spec.placement.agents or 1)),
            ("Started", escape(_time(run.start_time))),
            ("Ended", escape(_time(run.end_time))),
            ("Data", samples),
        ]
        if run.state_reason:
            rows.insert(1, ("Reason", escape(run.state_reason)))
        body = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
        cards.append(
            f'<div class="run-card {style.group}-card" style="border-top-color:{style.color}">'
            f'<div class="run-title"><span class="swatch" style="background:{style.color}"></span>'
            f"<strong>{escape(style.label)}</strong>"
            f'<span class="state state-{escape(render.state_name(run.state).lower())}">'
            f"{escape(render.state_name(run.state))}</span>"
            f'<span class="badge verdict-{verdict.lower()}">verdict {escape(verdict)}</span></div>'
            f'<table class="kv">{body}</table>{f"<div class=labels>{labels}</div>" if labels else ""}</div>'
        )
    title = "LLM load test report" + (f" — {len(runs)} runs compared" if len(runs) > 1 else "")
    return (
        f"<header><h1>{escape(title)}</h1>"
        f'<p class="sub">Generated {escape(generated.strftime("%Y-%m-%d %H:%M:%S UTC"))} by llm-loadtest. '
        "Latencies in milliseconds; definitions as in <code>docs/metrics.md</code> (TTFT = first token - sent, "
        "TPOT per token excluding the first, ITL per streamed event, E2E = last token - sent).</p>"
        f'<div class="run-cards">{"".join(cards)}</div></header>'
    )


def _summary(runs: Sequence[RunReportData], styles: Sequence[_RunStyle]) -> str:
    with_goodput = any(s.HasField("goodput") for r in runs for s in r.result.stages)
    heads = ["Stage", "Load", "Requests", "Failed", "Success", "req/s", "out tok/s", "peak tok/s", "conc.",
             "TTFT p50", "TTFT p99", "TPOT p50", "TPOT p99", "ITL p50", "ITL p99", "E2E p50", "E2E p99"]  # fmt: skip
    if with_goodput:
        heads += ["goodput", "good %"]
    parts = ['<section id="summary"><h2>Summary per stage</h2>']
    for data, style in zip(runs, styles, strict=True):
        if len(runs) > 1:
            parts.append(f'<h3 class="run-heading"><span class="swatch" style="background:{style.color}"></span>'
                         f"{escape(style.label)}</h3>")  # fmt: skip
        if not data.result.stages:
            parts.append('<p class="note">No stage produced a result.</p>')
            continue
        rows = []
        for s in data.result.stages:
            ok = success_percent(s)
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items()))
            failed = f'<span title="{escape(errors)}">{s.requests_failed}</span>' if errors else str(s.requests_failed)
            cells = [
                f'<td class="l">{_stage_cell(s)}</td>',
                f"<td>{escape(_short_load(s))}</td>",
                f"<td>{s.requests_ok + s.requests_failed:,}</td>",
                f'<td class="{"bad" if s.requests_failed else ""}">{failed}</td>',
                f"<td>{f'{ok:.1f}%' if ok is not None else NA}</td>",
                f"<td>{_num(s.request_throughput, 2)}</td>",
                f"<td>{_num(s.output_token_throughput)}</td>",
                f"<td>{_num(s.peak_output_token_throughput, 0)}</td>",
                f"<td>{_num(s.achieved_concurrency)}</td>",
            ]
            for stats in (s.ttft, s.tpot, s.itl, s.e2e):
                cells += [f"<td>{_ms(stats, 'p50_ms')}</td>", f"<td>{_ms(stats, 'p99_ms')}</td>"]
            if with_goodput:
                cells += [
                    f"<td>{_num(s.goodput, 2) if s.HasField('goodput') else NA}</td>",
                    f"<td>{f'{s.good_fraction * 100:.1f}%' if s.HasField('good_fraction') else NA}</td>",
                ]
            rows.append(f"<tr>{''.join(cells)}</tr>")
        head = "".join(f'<th class="{"l" if h == "Stage" else ""}">{h}</th>' for h in heads)
        parts.append(f'<div class="table-wrap"><table class="data"><thead><tr>{head}</tr></thead>'
                     f"<tbody>{''.join(rows)}</tbody></table></div>")  # fmt: skip
    parts.append('<p class="note">Latencies in ms. conc. = achieved (mean) concurrency; peak tok/s = the largest '
                 "1-second bucket. Hover a failure count for the error kinds.</p></section>")  # fmt: skip
    return "".join(parts)


def _stage_points(
    stages: Sequence[run_pb2.StageResult], metric: str, attr: str, label: str, run: _RunStyle
) -> tuple[list[tuple[float, float]], list[str], list[str]]:
    """(output tok/s, latency) per stage that measured the metric, the stages' loads, tooltips."""
    points, loads, tips = [], [], []
    for s in stages:
        stats: run_pb2.LatencyStats = getattr(s, metric)
        if not s.requests_ok or not stats.count:
            continue
        value = float(getattr(stats, attr))
        points.append((s.output_token_throughput, value))
        loads.append(_short_load(s))
        tips.append(f"{run.label} · {_short_load(s)} · {label} {value:.1f} ms at {s.output_token_throughput:.0f} tok/s")
    return points, loads, tips


def _latency_vs_throughput(runs: Sequence[RunReportData], styles: Sequence[_RunStyle]) -> str:
    ttft: list[Series] = []
    tpot: list[Series] = []
    # (metric, percentile, label, dashed, marker, label the points with the stage's load)
    lines = (
        (ttft, "ttft", "p50_ms", "TTFT p50", False, "circle", False),
        (ttft, "ttft", "p99_ms", "TTFT p99", True, "square", True),
        (tpot, "tpot", "p50_ms", "TPOT p50", False, "circle", True),
        (tpot, "tpot", "p99_ms", "TPOT p99", True, "square", False),
    )
    for data, st in zip(runs, styles, strict=True):
        for target, metric, attr, label, dashed, marker, labelled in lines:
            points, loads, tips = _stage_points(data.result.stages, metric, attr, label, st)
            name = f"{st.label} · {label}" if len(runs) > 1 else label
            target.append(Series(name, points, st.color, st.group, dashed, marker, loads if labelled else (), tips))
    caption = ("One point per stage (labelled with its load). Pick the operating point where throughput "
               "still rises and the latency you care about is still inside its objective.")  # fmt: skip
    return (
        '<section id="latency-throughput"><h2>Latency vs throughput</h2><div class="charts">'
        + charts.xy_chart("ttft-vs-throughput", "TTFT vs output throughput", ttft, "output tokens/s", "TTFT (ms)",
                          caption=caption, empty_note="no stage completed a streamed request")
        + charts.xy_chart("tpot-vs-throughput", "TPOT vs output throughput", tpot, "output tokens/s", "TPOT (ms)",
                          caption=caption, empty_note="no stage completed a request with more than one token")
        + "</div></section>"
    )  # fmt: skip


def _stage_offsets(result: run_pb2.RunResult) -> list[float]:
    """Seconds from the run's first stage to each stage's start, stages placed back to back."""
    offsets, t = [], 0.0
    for s in result.stages:
        offsets.append(t)
        last = max((b.second for b in s.time_series), default=-1)
        t += max(float(math.ceil(s.duration_s)), float(last + 1), 1.0)
    offsets.append(t)
    return offsets


def _timeline(runs: Sequence[RunReportData], styles: Sequence[_RunStyle]) -> str:
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
            throughput.append(Series(f"{prefix}output tok/s", tok, st.color, st.group, marker="none", step=True,
                                     fill=len(runs) == 1))  # fmt: skip
            errors.append(Series(f"{prefix}errors/s", err, st.color, st.group, marker="none", step=True, fill=True))
        if p50:
            ttft.append(Series(f"{prefix}TTFT p50", p50, st.color, st.group, marker="none"))
            ttft.append(Series(f"{prefix}TTFT p99", p99, st.color, st.group, dashed=True, marker="none"))
    bands: list[Band] = []
    if runs:
        first = runs[0].result
        offsets = _stage_offsets(first)
        bands = [Band(offsets[i], offsets[i + 1], f"{s.index} · {_short_load(s)}", i % 2 == 1)
                 for i, s in enumerate(first.stages)]  # fmt: skip
    caption = "Per 1-second bucket of each stage, stages placed back to back (bands: the first run's stages)."
    note = "the result has no per-second time series"
    # The server's charts sit under the client's (two columns): requests under throughput, KV under TTFT.
    server_requests, server_kv, server_tokens = server_timeline_charts(
        [d.result for d in runs], styles, [_stage_offsets(d.result) for d in runs], bands
    )
    return (
        '<section id="timeline"><h2>Timeline</h2><div class="charts">'
        + charts.xy_chart("timeline-throughput", "Output tokens per second", throughput, "seconds", "tokens/s",
                          bands=bands, caption=caption, empty_note=note)
        + charts.xy_chart("timeline-ttft", "TTFT p50 / p99 of requests completing each second", ttft, "seconds",
                          "TTFT (ms)", bands=bands, caption=caption, empty_note=note)
        + server_requests + server_kv
        + charts.xy_chart("timeline-errors", f"Errors per second ({total_errors:,} in total)", errors, "seconds",
                          "errors/s", bands=bands, caption=caption, empty_note=note)
        + server_tokens
        + "</div></section>"
    )  # fmt: skip


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
    name: str, stage_index: int, title: str, metric: str, runs: Sequence[RunReportData],
    styles: Sequence[_RunStyle], markers_from: str, marker_prefix: str, caption: str,
) -> str:  # fmt: skip
    attrs = {"data-stage": str(stage_index)}
    columns: list[tuple[_RunStyle, list[float], run_pb2.StageResult | None]] = []
    for data, st in zip(runs, styles, strict=True):
        stage = next((s for s in data.result.stages if s.index == stage_index), None)
        if data.samples is None:
            continue
        values = getattr(data.samples.stages.get(stage_index, StageSamples()), metric)
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
        caption += (f" {above:,} value{'s are' if above > 1 else ' is'} above {hi:,.1f} ms, counted in the "
                    "last bin.")  # fmt: skip
    return charts.xy_chart(name, title, series, "ms", "% of requests", markers=markers, x_from_zero=False,
                           caption=caption, attrs=attrs)  # fmt: skip


def _distributions(runs: Sequence[RunReportData], styles: Sequence[_RunStyle]) -> str:
    indices = sorted({s.index for r in runs for s in r.result.stages})
    parts = ['<section id="distributions"><h2>Distributions per stage</h2>']
    if not indices:
        parts.append('<div class="charts">')
        parts.append(charts.empty_chart("ttft-distribution", "TTFT distribution", "the run has no stage results"))
        parts.append(charts.empty_chart("tpot-distribution", "TPOT distribution", "the run has no stage results"))
        parts.append("</div>")
    for index in indices:
        loads = sorted({_short_load(s) for r in runs for s in r.result.stages if s.index == index})
        names = sorted({s.name for r in runs for s in r.result.stages if s.index == index and s.name})
        heading = f"Stage {index}" + (f" — {names[0]}" if len(names) == 1 else f" — {', '.join(loads)}")
        parts.append(f'<h3 class="stage-heading">{escape(heading)}</h3><div class="charts">')
        parts.append(_distribution_chart(
            "ttft-distribution", index, "TTFT distribution", "ttft_ms", runs, styles, "ttft", "",
            "Share of OK streamed requests by TTFT, from the exported samples; lines: the stage's p50 and p99.",
        ))  # fmt: skip
        parts.append(_distribution_chart(
            "tpot-distribution", index, "TPOT per request (ITL percentiles marked)", "tpot_ms", runs, styles, "itl",
            "ITL ",
            "TPOT per request = (last token - first token) / (output tokens - 1), from the exported samples "
            "(the export carries only each request's count of inter-token gaps, not the gaps). Lines: the "
            "stage's pooled ITL p50 and p99 from the result; ITL is per streamed event, so it exceeds TPOT "
            "when a server sends several tokens per event.",
        ))  # fmt: skip
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


def _slo_text(slo: run_pb2.Slo) -> str:
    parts = [f"{name} ≤ {_duration_ms(getattr(slo, name)):g} ms" for name in ("ttft", "tpot", "e2e")
             if slo.HasField(name)]  # fmt: skip
    return ", ".join(parts)


def _checks(runs: Sequence[RunReportData], styles: Sequence[_RunStyle]) -> str:
    parts = ['<section id="checks" data-section="checks"><h2>SLOs, checks and verdict</h2>']
    for data, st in zip(runs, styles, strict=True):
        verdict = verdict_name(data.result.verdict)
        slo = _slo_text(data.run.spec.slo)
        parts.append(
            f'<div class="verdict-line"><span class="swatch" style="background:{st.color}"></span>'
            f"<strong>{escape(st.label)}</strong>"
            f'<span class="badge big verdict-{verdict.lower()}" data-verdict="{escape(verdict)}">'
            f"{escape(verdict)}</span>"
            f'<span class="note">{"SLO: " + escape(slo) if slo else "no SLO set"}</span></div>'
        )
        checks = iter_checks(data.result)
        if not checks:
            parts.append('<p class="note">The run has no checks.</p>')
            continue
        stages = {s.index: s for s in data.result.stages}
        rows = []
        for c in sorted(checks, key=lambda c: (c.stage_index, c.expression)):
            stage = stages.get(c.stage_index)
            where = f"{c.stage_index}: {_short_load(stage)}" if stage is not None else str(c.stage_index)
            rows.append(
                f'<tr class="{"pass" if c.passed else "fail"}"><td class="l"><code>{escape(c.expression)}</code></td>'
                f'<td class="l">{escape(where)}</td><td>{c.measured:,.4g}</td><td>{c.threshold:,.4g}</td>'
                f'<td class="l result">{"✔ pass" if c.passed else "✘ fail"}</td>'
                f'<td class="l">{escape(c.message)}</td></tr>'
            )
        parts.append(
            '<div class="table-wrap"><table class="data checks"><thead><tr><th class="l">Check</th>'
            '<th class="l">Stage</th><th>Measured</th><th>Threshold</th><th class="l">Result</th>'
            f'<th class="l">Detail</th></tr></thead><tbody>{"".join(rows)}</tbody></table></div>'
        )
    parts.append("</section>")
    return "".join(parts)


def _health(runs: Sequence[RunReportData], styles: Sequence[_RunStyle]) -> str:
    parts = ['<section id="saturation" data-section="saturation"><h2>Load generator and target health</h2>']
    any_saturated = False
    for data, st in zip(runs, styles, strict=True):
        prefix = f"{escape(st.label)}, " if len(runs) > 1 else ""
        for s in data.result.stages:
            rows = [(s, "")] + [(a, a.agent_name) for a in s.agents if a.saturated]
            for row, agent in rows:
                if not row.saturated:
                    continue
                any_saturated = True
                who = f" (agent {escape(agent)})" if agent else ""
                parts.append(
                    f'<div class="warn">⚠ {prefix}stage {s.index} ({escape(_short_load(s))}){who}: the load '
                    f"generator was saturated — {escape(row.saturation_reason or 'no reason given')}. "
                    "Latencies measured in this stage are suspect.</div>"
                )
    if not any_saturated:
        parts.append('<p class="ok-note">✔ No stage was marked saturated: the agents kept up with the load.</p>')
    parts.append(_target_health(runs, styles))
    lags = [(st, s) for data, st in zip(runs, styles, strict=True) for s in data.result.stages]
    several = len(runs) > 1
    if lags:
        cells = "".join(
            f"<tr>{_run_cell(st, several)}<td class=\"l\">{s.index}: {escape(_short_load(s))}</td>"
            f"<td>{s.max_event_loop_lag_ms:,.1f}</td><td>{_ms(s.queue_delay, 'p99_ms')}</td>"
            f"<td>{'yes' if s.saturated else 'no'}</td><td>{_target_cell(s)}</td></tr>"
            for st, s in lags
        )
        parts.append(
            f'<div class="table-wrap"><table class="data"><thead><tr>{_run_head(several)}<th class="l">Stage</th>'
            "<th>max event-loop lag (ms)</th><th>queue delay p99 (ms)</th><th>saturated</th>"
            "<th>target kept up</th></tr></thead>"
            f"<tbody>{cells}</tbody></table></div>"
        )
    parts.append("</section>")
    return "".join(parts)


def _target_health(runs: Sequence[RunReportData], styles: Sequence[_RunStyle]) -> str:
    """The target's side of the same question: did it keep up with each open-loop stage?"""
    parts = ['<h3 id="target-saturation">Target</h3>']
    flagged = False
    for data, st in zip(runs, styles, strict=True):
        prefix = f"{escape(st.label)}, " if len(runs) > 1 else ""
        for s in data.result.stages:
            if s.target_saturated:
                flagged = True
                parts.append(
                    f'<div class="warn" data-target-saturated="{s.index}">⚠ {prefix}stage {s.index} '
                    f"({escape(_short_load(s))}): {escape(s.target_saturation_reason)}. Its latencies measure "
                    "the server's queue.</div>"
                )
    open_loop = any(s.request_rate for data in runs for s in data.result.stages)
    if not flagged:
        parts.append(
            '<p class="ok-note">✔ The target kept up with every open-loop stage.</p>'
            if open_loop
            else '<p class="note">No open-loop stage: a closed loop adapts to the target, so it is not judged.</p>'
        )
    return "".join(parts)


def _target_cell(s: run_pb2.StageResult) -> str:
    if not s.request_rate:
        return "—"
    return "⚠ no" if s.target_saturated else "yes"


def _run_head(several: bool) -> str:
    return '<th class="l">Run</th>' if several else ""


def _run_cell(style: _RunStyle, several: bool) -> str:
    if not several:
        return ""
    return f'<td class="l"><span class="swatch" style="background:{style.color}"></span> {escape(style.label)}</td>'


def _agents(runs: Sequence[RunReportData], styles: Sequence[_RunStyle]) -> str:
    parts = ['<section id="agents" data-section="agents"><h2>Per agent</h2>']
    rows = []
    for data, st in zip(runs, styles, strict=True):
        for s in data.result.stages:
            for a in s.agents:
                rows.append(
                    f"<tr>{_run_cell(st, len(runs) > 1)}"
                    f'<td class="l">{s.index}: {escape(_short_load(s))}</td>'
                    f'<td class="l">{escape(a.agent_name)}</td><td>{a.requests_ok:,}</td>'
                    f'<td class="{"bad" if a.requests_failed else ""}">{a.requests_failed:,}</td>'
                    f"<td>{_num(a.request_throughput, 2)}</td><td>{_num(a.output_token_throughput)}</td>"
                    f"<td>{_ms(a.ttft, 'p50_ms')}</td><td>{_ms(a.ttft, 'p99_ms')}</td><td>{_ms(a.tpot, 'p50_ms')}</td>"
                    f"<td>{_ms(a.e2e, 'p99_ms')}</td><td>{'⚠ yes' if a.saturated else 'no'}</td></tr>"
                )
    if rows:
        parts.append(
            f'<div class="table-wrap"><table class="data"><thead><tr>{_run_head(len(runs) > 1)}<th class="l">Stage</th>'
            '<th class="l">Agent</th><th>OK</th><th>Failed</th><th>req/s</th><th>out tok/s</th><th>TTFT p50</th>'
            "<th>TTFT p99</th><th>TPOT p50</th><th>E2E p99</th><th>saturated</th></tr></thead>"
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )
    else:
        parts.append('<p class="note">No per-agent rows: they appear when a stage ran on more than one agent.</p>')
    parts.append("</section>")
    return "".join(parts)


# --- page -----------------------------------------------------------------------------------

_CSS = """
:root{--fg:#1f2328;--muted:#59636e;--line:#e4e7eb;--bg:#f5f6f8;--card:#fff}
*{box-sizing:border-box}
body{margin:0;background:var(--bg);color:var(--fg);
  font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif}
main{max-width:1400px;margin:0 auto;padding:24px 20px 40px}
h1{font-size:24px;margin:0 0 4px}h2{font-size:18px;margin:0 0 12px}h3{font-size:14px;margin:0 0 6px}
.sub,.note{color:var(--muted);font-size:12.5px}
code{font:12px ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;background:#f0f2f5;padding:1px 4px;
  border-radius:4px;word-break:break-all}
section{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:16px 20px;margin:0 0 18px}
.run-cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(380px,100%),1fr));gap:14px;margin:14px 0 18px}
.run-card{background:var(--card);border:1px solid var(--line);border-top:4px solid;border-radius:10px;
  padding:12px 16px}
.run-title{display:flex;align-items:center;gap:8px;flex-wrap:wrap;margin-bottom:6px;font-size:15px}
.swatch{display:inline-block;width:12px;height:12px;border-radius:3px;flex:none}
.kv{border-collapse:collapse;font-size:13px}.kv th{color:var(--muted);font-weight:500;text-align:left;
  padding:2px 14px 2px 0;vertical-align:top;white-space:nowrap}.kv td{padding:2px 0}
.label{display:inline-block;background:#eef1f5;border-radius:10px;padding:0 8px;margin:6px 4px 0 0;font-size:12px}
.state,.badge{font-size:11.5px;font-weight:600;border-radius:10px;padding:1px 9px;background:#eef0f3;color:#444}
.state-succeeded{background:#dafbe1;color:#116329}.state-failed,.state-interrupted{background:#ffebe9;color:#a40e26}
.state-cancelled{background:#fff8c5;color:#7d4e00}
.verdict-pass{background:#dafbe1;color:#116329}.verdict-fail{background:#ffebe9;color:#a40e26}
.badge.big{font-size:13px;padding:2px 12px}
.verdict-line{display:flex;align-items:center;gap:10px;margin:6px 0 10px;flex-wrap:wrap}
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(min(440px,100%),1fr));gap:14px;margin-bottom:8px}
figure.chart{margin:0;border:1px solid #edf0f3;border-radius:8px;padding:10px 12px 8px;min-width:0}
figure.chart > svg{display:block;width:100%;height:auto}
figcaption{color:var(--muted);font-size:12px;margin-top:4px}
.no-data{display:flex;align-items:center;justify-content:center;min-height:180px;color:var(--muted);
  background:repeating-linear-gradient(45deg,#fafbfc,#fafbfc 8px,#f3f5f7 8px,#f3f5f7 16px);border-radius:6px;
  font-size:13px;text-align:center;padding:12px}
svg text{font-size:11px;fill:#59636e}svg .axis-label{font-size:12px;fill:#3d444d}
svg .grid{stroke:#eceff2}svg .axis,svg .tick-mark{stroke:#a3aab2}
svg .line{fill:none;stroke-width:2;stroke-linejoin:round}svg .area{opacity:.16}
svg .band{fill:#f2f4f7}svg .band-label{font-size:10.5px;fill:#8a929b}
svg .marker line{stroke-width:1.5}svg .marker-label{font-size:10.5px}
svg .point-label{font-size:10.5px;fill:#3d444d}
.legend{display:flex;flex-wrap:wrap;gap:4px 14px;font-size:12px;color:#3d444d;margin-top:4px}
.legend-item{display:inline-flex;align-items:center;gap:5px;white-space:nowrap}.legend-item[data-toggle]{cursor:pointer}
.legend-item svg{display:inline-block;flex:none}
.table-wrap{overflow-x:auto;margin-bottom:10px}
table.data{border-collapse:collapse;width:100%;font-size:12.5px;font-variant-numeric:tabular-nums}
table.data th{font-weight:600;color:#3d444d;background:#f6f8fa;white-space:nowrap}
table.data th,table.data td{padding:5px 7px;border-bottom:1px solid #eef0f3;text-align:right}
table.data .l{text-align:left}table.data tbody tr:hover{background:#fafbfc}
td.bad{color:#a40e26;font-weight:600}
.checks tr.pass .result{color:#116329;font-weight:600}.checks tr.fail .result{color:#a40e26;font-weight:600}
.checks tr.fail{background:#fff5f5}
.warn{background:#fff8c5;border:1px solid #e9c46a;border-radius:6px;padding:8px 12px;margin:0 0 8px}
.ok-note{color:#116329}
.run-heading,.stage-heading{display:flex;align-items:center;gap:8px;margin:14px 0 8px}
footer{color:var(--muted);font-size:12px;text-align:center}
@media print{body{background:#fff}section{break-inside:avoid}}
"""

# Clicking a legend entry hides that run everywhere (several runs overlaid).
_SCRIPT = """
document.addEventListener("click", function (event) {
  var item = event.target.closest ? event.target.closest("[data-toggle]") : null;
  if (!item) { return; }
  document.body.classList.toggle("hide-" + item.getAttribute("data-toggle"));
});
"""


def build_report(runs: Sequence[RunReportData], generated: datetime | None = None) -> str:
    """The complete HTML document."""
    generated = generated or datetime.now(UTC)
    styles = _styles(runs)
    toggles = "".join(
        f".hide-{s.group} .{s.group}{{display:none}}.hide-{s.group} [data-toggle=\"{s.group}\"]{{opacity:.35}}"
        for s in styles
    )
    title = "llm-loadtest report: " + ", ".join(s.label for s in styles)
    body = (
        _header(runs, styles, generated.astimezone(UTC))
        + _summary(runs, styles)
        + _latency_vs_throughput(runs, styles)
        + _timeline(runs, styles)
        + server_section([d.result for d in runs], styles)
        + _distributions(runs, styles)
        + _checks(runs, styles)
        + _health(runs, styles)
        + _agents(runs, styles)
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{_CSS}{toggles}</style></head>"
        f"<body><main>{body}"
        '<footer>llm-loadtest · self-contained report: no network needed to view it</footer>'
        f"</main><script>{_SCRIPT}</script></body></html>\n"
    )


# --- command ------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from client.commands import add_connection_arguments

    add_connection_arguments(parser, read_only=True)
    parser.add_argument("run_ids", nargs="+", metavar="RUN", help="run id(s); several runs are overlaid")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="HTML file to write")
    parser.add_argument("--no-samples", action="store_true",
                        help="skip ExportRunSamples (no per-request distributions; faster for huge runs)")  # fmt: skip


async def cmd_report(args: argparse.Namespace) -> int:
    from client.commands import _errors, failure, open_reader

    try:
        async with open_reader(args) as client:
            runs = [await collect(client, run_id, not args.no_samples) for run_id in args.run_ids]
    except _errors() as exc:
        return failure(exc, args)
    for data in runs:
        if data.samples is None and data.samples_note and not args.no_samples:
            print(f"warning: {data.run.id}: {data.samples_note}; distributions are left empty", file=sys.stderr)
    args.output.write_text(build_report(runs), encoding="utf-8")
    print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) > 1 else ''})", file=sys.stderr)
    return 0

