"""The complete HTML document: the sections in reading order, with the assets inlined."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from html import escape

from client.report.assets import CSS, SCRIPT, toggle_css
from client.report.chart_sections import distributions_section, latency_throughput_section, timeline_section
from client.report.collect import RunReportData
from client.report.formatting import run_styles
from client.report.history_section import history_section
from client.report.sections import (
    agents_section,
    capacity_section,
    checks_section,
    header_section,
    health_section,
    summary_section,
)
from client.report.server_sections import server_section
from client.report.workload_sections import conversations_section, prefix_cache_section, reasoning_section


def build_report(runs: Sequence[RunReportData], generated: datetime | None = None) -> str:
    """The complete HTML document."""
    generated = generated or datetime.now(UTC)
    styles = run_styles(runs)
    title = "llm-loadtest report: " + ", ".join(s.label for s in styles)
    body = (
        header_section(runs, styles, generated.astimezone(UTC))
        + capacity_section(runs, styles)
        + summary_section(runs, styles)
        + reasoning_section(runs, styles)
        + conversations_section(runs, styles)
        + prefix_cache_section(runs, styles)
        + latency_throughput_section(runs, styles)
        + timeline_section(runs, styles)
        + server_section([d.result for d in runs], styles)
        + distributions_section(runs, styles)
        + history_section(runs, styles)
        + checks_section(runs, styles)
        + health_section(runs, styles)
        + agents_section(runs, styles)
    )
    return (
        "<!DOCTYPE html>\n"
        '<html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"<title>{escape(title)}</title><style>{CSS}{toggle_css(styles)}</style></head>"
        f"<body><main>{body}"
        "<footer>llm-loadtest · self-contained report: no network needed to view it</footer>"
        f"</main><script>{SCRIPT}</script></body></html>\n"
    )
