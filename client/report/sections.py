"""The report's sections of tables and text: the header with one card per run, a capacity
search's outcome and probes, the summary per stage, SLOs, checks and verdict, load generator
and target health, and the per-agent table. Every user-supplied string is HTML-escaped here."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from html import escape

from client import intervals, render
from client.formats import (
    NA,
    OUTCOME_TEXT,
    capacity_line,
    iter_checks,
    search_load,
    success_percent,
    verdict_name,
)
from client.report.collect import RunReportData
from client.report.formatting import (
    RunStyle,
    ci_span,
    interval_html,
    latency_ms,
    number,
    short_load,
    stage_cell,
    stage_text,
    utc_time,
    workload_text,
)
from client.report.workload_sections import token_note_html
from common import durations, search_outcome
from common.proto.loadtest.v1 import run_pb2
from common.search_outcome import variable_name


def header_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle], generated: datetime) -> str:
    cards = []
    for data, style in zip(runs, styles, strict=True):
        run, result = data.run, data.result
        spec = run.spec
        verdict = verdict_name(result.verdict)
        stages = ", ".join(stage_text(s) for s in spec.stages) or NA
        labels = " ".join(f'<span class="label">{escape(k)}={escape(v)}</span>' for k, v in sorted(spec.labels.items()))
        samples = (
            f"{data.samples.count:,} samples exported"
            if data.samples is not None
            else escape(data.samples_note or "samples not available")
        )
        api = "completions" if spec.target.api_kind == run_pb2.API_KIND_COMPLETIONS else "chat"
        rows = [
            ("Run id", f"<code>{escape(run.id)}</code>"),
            ("Model", escape(spec.target.model)),
            ("Target", f"<code>{escape(spec.target.base_url)}</code> ({api})"),
            ("Workload", escape(workload_text(spec))),
            ("Stages", escape(stages)),
            ("Agents", str(spec.placement.agents or 1)),
            ("Started", escape(utc_time(run.start_time))),
            ("Ended", escape(utc_time(run.end_time))),
            ("Data", samples),
        ]
        if run.state_reason:
            rows.insert(1, ("Reason", escape(run.state_reason)))
        if result.HasField("capacity"):
            rows.insert(1, ("Capacity", escape(capacity_line(result.capacity, spec.search))))
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


def _search_settings(search: run_pb2.SearchSpec) -> str:
    """The search's settings as given (the controller's defaults where left out)."""
    parts = [f"by {variable_name(search.variable)}"]
    if search.HasField("goodput_target_percent"):
        parts.append(f"goodput target {search.goodput_target_percent:g} %")
    if search.min or search.max:
        parts.append(
            f"loads {f'{search.min:g}' if search.min else 'default'} to "
            f"{f'{search.max:g}' if search.max else 'default'}"
        )
    if search.HasField("tolerance_percent"):
        parts.append(f"tolerance {search.tolerance_percent:g} %")
    if search.HasField("probe_duration"):
        parts.append(f"probes of {durations.seconds(search.probe_duration):g} s")
    if search.resume_from_run_id:
        parts.append(f"resumed from {search.resume_from_run_id}")
    return ", ".join(parts)


def capacity_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    """Each capacity search's outcome in one line and its probes in the order they ran (nothing
    when no run is a search)."""
    searches = [(d, st) for d, st in zip(runs, styles, strict=True) if d.result.HasField("capacity")]
    if not searches:
        return ""
    parts = ['<section id="capacity" data-section="capacity"><h2>Capacity search</h2>']
    heads = [
        "#",
        "Stage",
        "Load",
        "Outcome",
        "Requests",
        "good %",
        "95 % interval",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "E2E p99",
        "req/s",
        "out tok/s",
        "Why",
    ]
    for data, style in searches:
        capacity = data.result.capacity
        measured = search_outcome.capacity_measured(capacity)
        if len(runs) > 1:
            parts.append(
                f'<h3 class="run-heading"><span class="swatch" style="background:{style.color}"></span>'
                f"{escape(style.label)}</h3>"
            )
        line = escape(capacity_line(capacity, data.run.spec.search))
        parts.append(
            f'<p class="{"ok-note" if measured else "warn"}" data-capacity="{"yes" if measured else "no"}">'
            f"<strong>{line}</strong></p>"
        )
        stopped = f". Stopped: {escape(capacity.stop_message)}" if capacity.stop_message else ""
        parts.append(f'<p class="note">Search {escape(_search_settings(data.run.spec.search))}{stopped}</p>')
        rows = []
        for i, p in enumerate(capacity.probes):
            outcome = OUTCOME_TEXT.get(p.outcome, NA)
            word = {"inconcl.": "inconclusive"}.get(outcome, outcome)
            cells = [
                f'<td class="l">{i}{" (repeat)" if p.repeat else ""}</td>',
                f"<td>{p.stage_index if p.stage_index >= 0 else 'earlier run'}</td>",
                f"<td>{escape(search_load(capacity.variable, p.load))}</td>",
                f'<td class="l result">{escape(word)}</td>',
                f"<td>{p.requests:,}</td>",
                f"<td>{p.good_percent:.1f}%</td>",
                f"<td>{p.good_percent_low:.1f} to {p.good_percent_high:.1f}</td>",
                *(
                    f"<td>{number(v)}</td>"
                    for v in (p.ttft_p50_ms, p.ttft_p99_ms, p.tpot_p50_ms, p.tpot_p99_ms, p.e2e_p99_ms)
                ),
                f"<td>{number(p.request_throughput, 2)}</td>",
                f"<td>{number(p.output_token_throughput)}</td>",
                f'<td class="l">{escape(p.reason)}</td>',
            ]
            kind = {"pass": "pass", "fail": "fail"}.get(word, "inconclusive")
            rows.append(f'<tr class="{kind}" data-probe="{i}">{"".join(cells)}</tr>')
        head = "".join(f'<th class="{"l" if h in ("#", "Outcome", "Why") else ""}">{h}</th>' for h in heads)
        parts.append(
            f'<div class="table-wrap"><table class="data checks probes"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )
    parts.append(
        '<p class="note">A probe passes when the share of its requests meeting every SLO (good %) is at '
        "least the goodput target; the interval is the share's 95 % confidence interval. An inconclusive "
        "probe proves nothing (its load generator was saturated, or it ended early). Latencies in ms, "
        "warmup excluded.</p></section>"
    )
    return "".join(parts)


def summary_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    with_goodput = any(s.HasField("goodput") for r in runs for s in r.result.stages)
    heads = [
        "Stage",
        "Load",
        "Requests",
        "Failed",
        "Success",
        "req/s",
        "out tok/s",
        "peak tok/s",
        "conc.",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "TPOT p99",
        "ITL p50",
        "ITL p99",
        "E2E p50",
        "E2E p99",
    ]
    if with_goodput:
        heads += ["goodput", "good %"]
    parts = ['<section id="summary"><h2>Summary per stage</h2>']
    for data, style in zip(runs, styles, strict=True):
        if len(runs) > 1:
            parts.append(
                f'<h3 class="run-heading"><span class="swatch" style="background:{style.color}"></span>'
                f"{escape(style.label)}</h3>"
            )
        if not data.result.stages:
            parts.append('<p class="note">No stage produced a result.</p>')
            continue
        rows = []
        for s in data.result.stages:
            ok = success_percent(s)
            errors = ", ".join(f"{k}: {v}" for k, v in sorted(s.errors.items()))
            failed = f'<span title="{escape(errors)}">{s.requests_failed}</span>' if errors else str(s.requests_failed)
            cells = [
                f'<td class="l">{stage_cell(s)}</td>',
                f"<td>{escape(short_load(s))}</td>",
                f"<td>{s.requests_ok + s.requests_failed:,}</td>",
                f'<td class="{"bad" if s.requests_failed else ""}">{failed}</td>',
                f"<td>{f'{ok:.1f}%' if ok is not None else NA}</td>",
                f"<td>{number(s.request_throughput, 2)}{interval_html(s, 'request_throughput_ci', 2)}</td>",
                f"<td>{number(s.output_token_throughput)}{interval_html(s, 'output_token_throughput_ci')}</td>",
                f"<td>{number(s.peak_output_token_throughput, 0)}</td>",
                f"<td>{number(s.achieved_concurrency)}</td>",
            ]
            for stats in (s.ttft, s.tpot, s.itl, s.e2e):
                cells += [
                    f"<td>{latency_ms(stats, p + '_ms')}{interval_html(stats, p + '_ci')}</td>" for p in ("p50", "p99")
                ]
            if with_goodput:
                good = intervals.percent(intervals.interval_of(s, "good_fraction_ci"))
                cells += [
                    f"<td>{number(s.goodput, 2) if s.HasField('goodput') else NA}"
                    f"{interval_html(s, 'goodput_ci', 2)}</td>",
                    f"<td>{f'{s.good_fraction * 100:.1f}%' if s.HasField('good_fraction') else NA}{ci_span(good)}</td>",
                ]
            rows.append(f"<tr>{''.join(cells)}</tr>")
        head = "".join(f'<th class="{"l" if h == "Stage" else ""}">{h}</th>' for h in heads)
        parts.append(
            f'<div class="table-wrap"><table class="data"><thead><tr>{head}</tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )
        parts.append(token_note_html(data.result))
    parts.append(
        '<p class="note">Latencies in ms. conc. = achieved (mean) concurrency; peak tok/s = the largest '
        "1-second bucket. Hover a failure count for the error kinds. Under a figure: ± half its 95 % "
        "confidence interval (hover for the interval); ≥x: bounded from below only, ≤x: from above only, "
        "?: not at all (too few requests).</p></section>"
    )
    return "".join(parts)


def _slo_text(slo: run_pb2.Slo) -> str:
    parts = [
        f"{name} ≤ {durations.millis(getattr(slo, name)):g} ms"
        for name in ("ttft", "tpot", "e2e")
        if slo.HasField(name)
    ]
    return ", ".join(parts)


def checks_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
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
            if c.run_level:
                where = "run"
            else:
                where = f"{c.stage_index}: {short_load(stage)}" if stage is not None else str(c.stage_index)
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


def health_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
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
                    f'<div class="warn">⚠ {prefix}stage {s.index} ({escape(short_load(s))}){who}: the load '
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
            f'<tr>{_run_cell(st, several)}<td class="l">{s.index}: {escape(short_load(s))}</td>'
            f"<td>{s.max_event_loop_lag_ms:,.1f}</td><td>{latency_ms(s.queue_delay, 'p99_ms')}</td>"
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


def _target_health(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
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
                    f"({escape(short_load(s))}): {escape(s.target_saturation_reason)}. Its latencies measure "
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


def _run_cell(style: RunStyle, several: bool) -> str:
    if not several:
        return ""
    return f'<td class="l"><span class="swatch" style="background:{style.color}"></span> {escape(style.label)}</td>'


def agents_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    parts = ['<section id="agents" data-section="agents"><h2>Per agent</h2>']
    rows = []
    for data, st in zip(runs, styles, strict=True):
        for s in data.result.stages:
            for a in s.agents:
                rows.append(
                    f"<tr>{_run_cell(st, len(runs) > 1)}"
                    f'<td class="l">{s.index}: {escape(short_load(s))}</td>'
                    f'<td class="l">{escape(a.agent_name)}</td><td>{a.requests_ok:,}</td>'
                    f'<td class="{"bad" if a.requests_failed else ""}">{a.requests_failed:,}</td>'
                    f"<td>{number(a.request_throughput, 2)}</td><td>{number(a.output_token_throughput)}</td>"
                    f"<td>{latency_ms(a.ttft, 'p50_ms')}</td><td>{latency_ms(a.ttft, 'p99_ms')}</td>"
                    f"<td>{latency_ms(a.tpot, 'p50_ms')}</td>"
                    f"<td>{latency_ms(a.e2e, 'p99_ms')}</td><td>{'⚠ yes' if a.saturated else 'no'}</td></tr>"
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
