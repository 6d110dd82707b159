"""The server-side view in the HTML report: the model server's own metrics drawn beside the
client timeline (running / waiting requests, KV-cache use, generated tokens per second against
what the client received), and the per-stage cross-check of client-counted against
server-counted tokens and requests, with the scrape failures.

Series come from `StageResult.server_metrics` (per second, second 0 = the stage's first
request, like the client time series) and are placed on the same back-to-back stage axis as
the client timeline. Which metric is "running requests" on which server is the controller's
mapping table: the report only reads each series' `role`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from client.report import charts
from client.report.charts import Band, Series
from client.report.formatting import RunStyle
from common.proto.loadtest.v1 import run_pb2


def has_server_metrics(results: Sequence[run_pb2.RunResult]) -> bool:
    """True when some stage of some run was scraped."""
    return any(s.HasField("server_metrics") for r in results for s in r.stages)


def _role_points(
    result: run_pb2.RunResult, offsets: Sequence[float], role: str, combine: str
) -> list[tuple[float, float]]:
    """One role's points on the run's timeline, endpoints combined by `sum` or `mean`."""
    points: list[tuple[float, float]] = []
    for stage, offset in zip(result.stages, offsets, strict=False):
        by_second: dict[int, list[float]] = defaultdict(list)
        for series in stage.server_metrics.series:
            if series.role == role:
                for p in series.points:
                    by_second[p.second].append(p.value)
        for second in sorted(by_second):
            values = by_second[second]
            value = sum(values) if combine == "sum" else sum(values) / len(values)
            points.append((offset + second + 0.5, value))
    return points


def server_timeline_charts(
    results: Sequence[run_pb2.RunResult],
    styles: Sequence[RunStyle],
    offsets: Sequence[Sequence[float]],
    bands: Sequence[Band],
) -> tuple[str, str, str]:
    """The server charts of the timeline section: running/waiting requests, KV-cache use and
    generated tokens per second (empty strings when no run was scraped)."""
    if not has_server_metrics(results):
        return "", "", ""
    several = len(results) > 1
    requests: list[Series] = []
    kv: list[Series] = []
    tokens: list[Series] = []
    for result, st, off in zip(results, styles, offsets, strict=True):
        prefix = f"{st.label} · " if several else ""
        running = _role_points(result, off, "running_requests", "sum")
        waiting = _role_points(result, off, "waiting_requests", "sum")
        usage = [(x, 100.0 * y) for x, y in _role_points(result, off, "kv_cache_usage", "mean")]
        generated = _role_points(result, off, "generated_tokens", "sum")
        if running:
            requests.append(Series(f"{prefix}running", running, st.color, st.group, marker="none"))
        if waiting:
            requests.append(Series(f"{prefix}waiting", waiting, st.color, st.group, dashed=True, marker="none"))
        if usage:
            kv.append(Series(f"{prefix}KV-cache use", usage, st.color, st.group, marker="none", fill=not several))
        if generated:
            tokens.append(Series(f"{prefix}server: generated tok/s", generated, st.color, st.group, marker="none"))
            client = [
                (o + b.second + 0.5, b.output_tokens)
                for s, o in zip(result.stages, off, strict=False)
                for b in s.time_series
            ]
            tokens.append(
                Series(f"{prefix}client: received tok/s", client, st.color, st.group, dashed=True, marker="none")
            )
    caption = (
        "The model server's own metrics, scraped during each stage (summed over endpoints; KV-cache use "
        "averaged), on the same seconds as the client charts."
    )
    note = "the scraped server exports no such metric (see docs/server-metrics.md)"
    return (
        charts.xy_chart(
            "server-requests",
            "Server: running / waiting requests",
            requests,
            "seconds",
            "requests",
            bands=bands,
            caption=caption,
            empty_note=note,
        ),
        charts.xy_chart(
            "server-kv-cache",
            "Server: KV-cache use",
            kv,
            "seconds",
            "% of KV cache",
            bands=bands,
            caption=caption,
            empty_note=note,
        ),
        charts.xy_chart(
            "server-tokens",
            "Generated tokens per second: server counter vs client",
            tokens,
            "seconds",
            "tokens/s",
            bands=bands,
            caption=caption,
            empty_note=note,
        ),
    )


def _value(v: float) -> str:
    return f"{v:,.0f}" if math.isfinite(v) else "—"


def _percent(v: float) -> str:
    return f"{v:+.1f}%" if math.isfinite(v) else "∞"


def _time(ts: object) -> str:
    ns = ts.ToNanoseconds() if hasattr(ts, "ToNanoseconds") else 0
    return datetime.fromtimestamp(ns / 1e9, UTC).strftime("%H:%M:%S") if ns else ""


def server_section(results: Sequence[run_pb2.RunResult], styles: Sequence[RunStyle], stage_label: str = "") -> str:
    """The cross-check table and the scrape failures (nothing when no run was scraped)."""
    if not has_server_metrics(results):
        return ""
    several = len(results) > 1
    rows: list[str] = []
    failures: list[str] = []
    flagged = False
    for result, st in zip(results, styles, strict=True):
        run_cell = f'<td class="l">{escape(st.label)}</td>' if several else ""
        for stage in result.stages:
            if not stage.HasField("server_metrics"):
                continue
            sm = stage.server_metrics
            name = f"{stage.index}: {stage.name}"
            for c in sm.cross_checks:
                flagged |= c.mismatch
                if c.mismatch:
                    verdict, cls = "⚠ mismatch", "bad"
                elif not c.window_complete:
                    verdict, cls = "not compared (window incomplete)", ""
                else:
                    verdict, cls = "✔ agree", ""
                rows.append(
                    f'<tr class="{"fail" if c.mismatch else "pass"}">{run_cell}<td class="l">{escape(name)}</td>'
                    f'<td class="l">{escape(c.quantity.replace("_", " "))}</td>'
                    f"<td>{_value(c.client_value)}</td><td>{_value(c.server_value)}</td>"
                    f'<td class="l"><code>{escape(", ".join(c.server_metrics))}</code></td>'
                    f"<td>{_percent(c.difference_percent)}</td><td>±{c.tolerance_percent:g}%</td>"
                    f'<td class="l {cls}">{verdict}</td></tr>'
                )
            for e in sm.errors:
                failures.append(
                    f'<tr>{run_cell}<td class="l">{escape(name)}</td>'
                    f'<td class="l"><code>{escape(e.endpoint)}</code></td><td class="l">{escape(e.message)}</td>'
                    f"<td>{e.count:,}</td><td>{_time(e.first_time)} to {_time(e.last_time)}</td></tr>"
                )
    head = '<th class="l">Run</th>' if several else ""
    parts = ['<section id="server-metrics" data-section="server-metrics"><h2>Server-side view</h2>']
    if flagged:
        parts.append(
            '<div class="warn">⚠ Mismatch: the client\'s token or request counts differ from the '
            "server's own counters by more than the tolerance. The server's usage reports (or the "
            "client's counting) cannot be trusted for this stage.</div>"
        )
    if rows:
        parts.append(
            f'<div class="table-wrap"><table class="data checks"><thead><tr>{head}<th class="l">Stage</th>'
            '<th class="l">Quantity</th><th>client</th><th>server</th><th class="l">server counter</th>'
            '<th>difference</th><th>tolerance</th><th class="l">result</th></tr></thead>'
            f"<tbody>{''.join(rows)}</tbody></table></div>"
        )
    else:
        parts.append(
            '<p class="note">No cross-check: the scraped servers export no counter of generated tokens '
            "or finished requests that the mapping table knows (docs/server-metrics.md).</p>"
        )
    if failures:
        parts.append(
            f'<h3>Scrape failures (the run went on)</h3><div class="table-wrap"><table class="data"><thead><tr>'
            f'{head}<th class="l">Stage</th><th class="l">Endpoint</th><th class="l">Error</th><th>scrapes</th>'
            f"<th>when (UTC)</th></tr></thead><tbody>{''.join(failures)}</tbody></table></div>"
        )
    parts.append("</section>")
    return "".join(parts)
