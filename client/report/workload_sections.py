"""The report's sections for production-like workloads, each shown only when some run has its
figures: reasoning models (time to first reasoning and first answer token, the reasoning /
answer token split, their distributions), conversations (the figures by turn, TTFT by turn —
what the prefix cache buys —, sessions) and the prefix cache (the client's hit rate beside the
server's). Definitions: docs/metrics.md."""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

from client.formats import NA, has_prefix_cache, has_reasoning
from client.intervals import interval_of
from client.report import charts
from client.report.chart_sections import _distribution_chart, _error_bar
from client.report.charts import ErrorBar, Series
from client.report.collect import RunReportData
from client.report.formatting import RunStyle, interval_html, latency_ms, number, short_load, stage_cell
from common.proto.loadtest.v1 import run_pb2


def _run_heading(style: RunStyle, several: bool) -> str:
    if not several:
        return ""
    return (
        f'<h3 class="run-heading"><span class="swatch" style="background:{style.color}"></span>'
        f"{escape(style.label)}</h3>"
    )


def _table(heads: Sequence[str], rows: Sequence[str], left: Sequence[str] = ("Stage",), attrs: str = "") -> str:
    head = "".join(f'<th class="{"l" if h in left else ""}">{h}</th>' for h in heads)
    return (
        f'<div class="table-wrap"><table class="data"{attrs}><thead><tr>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table></div>"
    )


def _latency_cells(stats: run_pb2.LatencyStats) -> list[str]:
    return [f"<td>{latency_ms(stats, p + '_ms')}{interval_html(stats, p + '_ci')}</td>" for p in ("p50", "p99")]


def _percent(value: float | None) -> str:
    return NA if value is None else f"{value:.1f}%"


def _client_hit(m: run_pb2.StageResult | run_pb2.TurnResult) -> float | None:
    return m.prefix_cache_hit_percent if m.HasField("prefix_cache_hit_percent") else None


def _server_hit(s: run_pb2.StageResult) -> float | None:
    sm = s.server_metrics
    return sm.prefix_cache_hit_percent if sm.HasField("prefix_cache_hit_percent") else None


# --- reasoning ------------------------------------------------------------------------------


def reasoning_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    """Per reasoning stage: TTFR and TTFO p50/p99 (TTFT beside them), the mean reasoning and
    answer tokens, and the distributions of TTFR and TTFO from the exported samples."""
    if not any(has_reasoning(s) for d in runs for s in d.result.stages):
        return ""
    several = len(runs) > 1
    parts = ['<section id="reasoning" data-section="reasoning"><h2>Reasoning</h2>']
    heads = [
        "Stage",
        "Load",
        "TTFR p50",
        "TTFR p99",
        "TTFO p50",
        "TTFO p99",
        "TTFT p50",
        "reasoning tok",
        "answer tok",
        "reasoning tokens",
    ]
    for data, style in zip(runs, styles, strict=True):
        stages = [s for s in data.result.stages if has_reasoning(s)]
        if not stages:
            continue
        parts.append(_run_heading(style, several))
        rows = [
            f'<tr data-stage="{s.index}"><td class="l">{stage_cell(s)}</td><td>{escape(short_load(s))}</td>'
            + "".join(_latency_cells(s.ttfr))
            + "".join(_latency_cells(s.ttfo))
            + f"<td>{latency_ms(s.ttft, 'p50_ms')}</td>"
            f"<td>{number(s.mean_reasoning_tokens)}</td><td>{number(s.mean_answer_tokens)}</td>"
            f"<td>{s.reasoning_tokens:,}</td></tr>"
            for s in stages
        ]
        parts.append(_table(heads, rows, attrs=' data-table="reasoning"'))
    parts.append(
        '<p class="note">TTFR: time from sent to the first event carrying reasoning text; TTFO: to the first '
        "event carrying answer text (TTFT is the first of either). reasoning tok / answer tok: mean tokens per "
        "request (reasoning tokens count in the output tokens). Latencies in ms.</p>"
    )
    indices = sorted({s.index for d in runs for s in d.result.stages if has_reasoning(s)})
    for index in indices:
        parts.append(f'<h3 class="stage-heading">Stage {index}</h3><div class="charts">')
        for name, title, metric, field in (
            ("ttfr-distribution", "TTFR distribution", "ttfr_ms", "ttfr"),
            ("ttfo-distribution", "TTFO distribution", "ttfo_ms", "ttfo"),
        ):
            parts.append(
                _distribution_chart(
                    name,
                    index,
                    title,
                    metric,
                    runs,
                    styles,
                    field,
                    "",
                    f"Share of the requests that reasoned by {title.split()[0]}, from the exported samples; "
                    "lines: the stage's p50 and p99.",
                )
            )
        parts.append("</div>")
    parts.append("</section>")
    return "".join(parts)


# --- conversations --------------------------------------------------------------------------


def _turn_series(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> tuple[list[Series], list[Series]]:
    """TTFT p50 (solid) and p99 (dashed) by turn, and the client's cache hit % by turn, one
    line per conversation stage (coloured by run when several runs, by stage otherwise)."""
    several = len(runs) > 1
    ttft: list[Series] = []
    hits: list[Series] = []
    k = 0
    for data, style in zip(runs, styles, strict=True):
        for s in data.result.stages:
            if not s.turns:
                continue
            color = style.color if several else charts.PALETTE[k % len(charts.PALETTE)]
            k += 1
            name = f"{style.label} · stage {s.index}" if several else f"stage {s.index} ({short_load(s)})"
            for p, dashed, marker in (("p50", False, "circle"), ("p99", True, "square")):
                turns = [t for t in s.turns if t.ttft.count]
                points = [(float(t.turn), float(getattr(t.ttft, f"{p}_ms"))) for t in turns]
                errors: list[ErrorBar | None] = [_error_bar(interval_of(t.ttft, f"{p}_ci")) for t in turns]
                tips = [
                    f"{name} · turn {t.turn} · TTFT {p} {getattr(t.ttft, f'{p}_ms'):.1f} ms · "
                    f"{t.mean_input_tokens:.0f} prompt tokens"
                    + (f" · cache {_percent(_client_hit(t))}" if _client_hit(t) is not None else "")
                    for t in turns
                ]
                ttft.append(
                    Series(f"{name} · TTFT {p}", points, color, style.group, dashed, marker, (), tips, y_errors=errors)
                )
            cached = [(float(t.turn), h) for t in s.turns if (h := _client_hit(t)) is not None]
            if cached:
                hits.append(Series(f"{name} · cache hit %", cached, color, style.group))
    return ttft, hits


def conversations_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    """Per conversation stage: its figures by turn, completed sessions and their duration, and
    TTFT by turn (with the client's prefix-cache hit rate by turn where the server reported it)."""
    if not any(s.turns for d in runs for s in d.result.stages):
        return ""
    several = len(runs) > 1
    parts = ['<section id="conversations" data-section="conversations"><h2>Conversations</h2>']
    heads = [
        "Turn",
        "OK",
        "Failed",
        "TTFT p50",
        "TTFT p99",
        "TPOT p50",
        "E2E p50",
        "E2E p99",
        "prompt tok",
        "cache hit",
    ]
    for data, style in zip(runs, styles, strict=True):
        stages = [s for s in data.result.stages if s.turns]
        if not stages:
            continue
        parts.append(_run_heading(style, several))
        for s in stages:
            d = s.session_duration
            duration = (
                f", session duration p50 {d.p50_ms / 1000:,.2f} s, p99 {d.p99_ms / 1000:,.2f} s" if d.count else ""
            )
            parts.append(
                f'<p class="note" data-sessions="{s.index}"><strong>Stage {stage_cell(s)} ({escape(short_load(s))})'
                f"</strong>: {s.sessions_completed:,} sessions completed{duration}.</p>"
            )
            rows = [
                f'<tr data-turn="{t.turn}"><td class="l">{t.turn}</td><td>{t.requests_ok:,}</td>'
                f'<td class="{"bad" if t.requests_failed else ""}">{t.requests_failed:,}</td>'
                + "".join(_latency_cells(t.ttft))
                + f"<td>{latency_ms(t.tpot, 'p50_ms')}</td>"
                + "".join(_latency_cells(t.e2e))
                + f"<td>{number(t.mean_input_tokens)}</td><td>{_percent(_client_hit(t))}</td></tr>"
                for t in s.turns
            ]
            parts.append(_table(heads, rows, left=("Turn",), attrs=f' data-table="turns" data-stage="{s.index}"'))
    ttft, hits = _turn_series(runs, styles)
    parts.append('<div class="charts">')
    parts.append(
        charts.xy_chart(
            "ttft-by-turn",
            "TTFT by turn",
            ttft,
            "turn",
            "TTFT (ms)",
            x_from_zero=False,
            caption="TTFT by turn shows what the prefix cache buys: each turn's prompt carries the whole history, "
            "so without a cache TTFT grows with the turn; with one, the history is served from the cache. Solid "
            "p50, dashed p99, with their 95 % intervals.",
            empty_note="no turn completed a streamed request",
        )
    )
    parts.append(
        charts.xy_chart(
            "cache-hit-by-turn",
            "Prefix-cache hit % by turn (client)",
            hits,
            "turn",
            "% of prompt tokens cached",
            x_from_zero=False,
            caption="Cached prompt tokens the server's usage reported, of the turn's prompt tokens.",
            empty_note="the server reported no cached prompt tokens (usage prompt_tokens_details.cached_tokens)",
        )
    )
    parts.append("</div></section>")
    return "".join(parts)


# --- prefix cache -----------------------------------------------------------------------------


def prefix_cache_section(runs: Sequence[RunReportData], styles: Sequence[RunStyle]) -> str:
    """Per stage with a prefix-cache view: the client's hit rate (usage cached tokens over
    prompt tokens) beside the server's (its own counters)."""
    if not any(has_prefix_cache(s) for d in runs for s in d.result.stages):
        return ""
    several = len(runs) > 1
    parts = ['<section id="prefix-cache" data-section="prefix-cache"><h2>Prefix cache</h2>']
    heads = ["Stage", "Load", "prompt tokens", "cached tokens", "client hit", "server hit", "server counters"]
    for data, style in zip(runs, styles, strict=True):
        stages = [s for s in data.result.stages if has_prefix_cache(s)]
        if not stages:
            continue
        parts.append(_run_heading(style, several))
        rows = [
            f'<tr data-stage="{s.index}"><td class="l">{stage_cell(s)}</td><td>{escape(short_load(s))}</td>'
            f"<td>{s.prompt_tokens:,}</td><td>{s.cached_prompt_tokens:,}</td>"
            f"<td>{_percent(_client_hit(s))}</td><td>{_percent(_server_hit(s))}</td>"
            f'<td class="l">{_source(s.server_metrics.prefix_cache_source)}</td></tr>'
            for s in stages
        ]
        parts.append(_table(heads, rows, left=("Stage", "server counters"), attrs=' data-table="prefix-cache"'))
    parts.append(
        '<p class="note">client hit: cached prompt tokens the server reported in its usage '
        "(<code>prompt_tokens_details.cached_tokens</code>) over the prompt tokens of those requests. server hit: "
        "hits over queries of the server's own prefix-cache counters over the stage (<code>--server-metrics</code>; "
        "vLLM, SGLang, llama.cpp where exposed). The two count differently (the server counts every request it "
        "served, in its own blocks), so they agree only roughly.</p></section>"
    )
    return "".join(parts)


def _source(source: str) -> str:
    return f"<code>{escape(source)}</code>" if source else NA


def token_note_html(result: run_pb2.RunResult) -> str:
    """The run's TokenAccounting note as a paragraph ('' when the result has none)."""
    t = result.tokens
    if not t.note:
        return ""
    exact = "exact" if t.exact else "approximate"
    return f'<p class="note" data-tokens="{exact}">Token counts ({exact}): {escape(t.note)}</p>'
