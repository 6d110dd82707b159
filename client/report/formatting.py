"""How values and runs read in the report: latencies, numbers, times, workloads and loads as
text, and each run's label, colour and CSS group (`RunStyle`)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC
from html import escape

from google.protobuf import timestamp_pb2
from google.protobuf.message import Message

from client import intervals
from client.formats import NA, load_label
from client.report import charts
from client.report.collect import RunReportData
from common import durations
from common.proto.loadtest.v1 import run_pb2


def latency_ms(stats: run_pb2.LatencyStats, attr: str) -> str:
    """One field of a latency summary in ms, or n/a when the summary counted nothing."""
    return f"{getattr(stats, attr):,.1f}" if stats.count else NA


def ci_span(ci: run_pb2.Interval | None, decimals: int = 1) -> str:
    """A confidence interval under its figure in a table cell: `±0.3` (its bounds on hover),
    '' without one."""
    if ci is None:
        return ""
    return (
        f'<br><span class="ci" title="95 % interval {escape(intervals.bounds(ci, decimals))}">'
        f"{escape(intervals.short(ci, decimals))}</span>"
    )


def interval_html(message: Message, field: str, decimals: int = 1) -> str:
    """`ci_span` of `message.field` (unset: '')."""
    return ci_span(intervals.interval_of(message, field), decimals)


def number(v: float, digits: int = 1) -> str:
    """`v` with thousands separators and `digits` decimals."""
    return f"{v:,.{digits}f}"


def utc_time(ts: timestamp_pb2.Timestamp) -> str:
    """A timestamp as `YYYY-MM-DD HH:MM:SS UTC`, n/a when unset."""
    if not (ts.seconds or ts.nanos):
        return NA
    return ts.ToDatetime(tzinfo=UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def length_text(dist: run_pb2.LengthDistribution) -> str:
    """A token-length distribution in a few characters."""
    kind = dist.WhichOneof("distribution")
    if kind == "fixed":
        return str(dist.fixed)
    if kind == "uniform":
        return f"{dist.uniform.min}-{dist.uniform.max}"
    if kind == "normal":
        return f"normal({dist.normal.mean:g}, {dist.normal.std:g})"
    return "default"


def workload_text(spec: run_pb2.RunSpec) -> str:
    """The run's workload in one line: dataset or synthetic lengths."""
    w = spec.workload
    if w.WhichOneof("source") == "conversation":
        c = w.conversation
        return (
            f"conversations of {length_text(c.turns)} turns, input {length_text(c.input_tokens)} tok per turn, "
            f"output {length_text(c.output_tokens)} tok"
        )
    if w.WhichOneof("source") == "trace":
        return f"trace replay ({w.trace.dataset_id}, {w.trace.entry_count} requests, x{w.trace.replay_speed or 1:g})"
    if w.WhichOneof("source") == "dataset":
        name = w.dataset.name or "dataset"
        return (
            f"{name} ({run_pb2.DatasetFormat.Name(w.dataset.format).removeprefix('DATASET_FORMAT_').lower()}, "
            f"{w.dataset.entry_count} entries)"
        )
    syn = w.synthetic
    text = f"synthetic, input {length_text(syn.input_tokens)} tok, output {length_text(syn.output_tokens)} tok"
    if syn.shared_prefix_tokens:
        text += f", shared prefix {syn.shared_prefix_tokens} tok"
    return text


def stage_text(stage: run_pb2.Stage) -> str:
    """A stage of the spec: its load and its limits."""
    load = f"{stage.request_rate:g} req/s" if stage.WhichOneof("load") == "request_rate" else f"c={stage.concurrency}"
    limits = []
    if stage.HasField("duration"):
        limits.append(f"{durations.seconds(stage.duration):g}s")
    if stage.requests:
        limits.append(f"{stage.requests} req")
    return f"{load} ({', '.join(limits)})" if limits else load


def stage_cell(stage: run_pb2.StageResult) -> str:
    """The stage's number, its name when it is not just the load, and a saturation mark."""
    text = str(stage.index)
    if stage.name and stage.name != load_label(stage):
        text += f" {escape(stage.name)}"
    if stage.saturated:
        text += ' <span title="load generator saturated">⚠</span>'
    if stage.target_saturated:
        text += ' <span title="the target did not keep up">⚠</span>'
    return text


def short_load(stage: run_pb2.StageResult) -> str:
    """A stage's load in a few characters (`2/s`, `c=8`)."""
    return f"{stage.request_rate:g}/s" if stage.request_rate else f"c={stage.concurrency}"


@dataclass(frozen=True)
class RunStyle:
    """How one run is drawn: its label, its colour and the CSS class of its elements."""

    label: str
    color: str
    group: str


def run_styles(runs: Sequence[RunReportData]) -> list[RunStyle]:
    """One style per run, in order; a display name shared by several runs gets their ids."""
    names = [r.run.spec.display_name for r in runs]
    styles = []
    for i, r in enumerate(runs):
        name = r.run.spec.display_name
        label = f"{name} ({r.run.id})" if name and names.count(name) > 1 else (name or r.run.id)
        styles.append(RunStyle(label, charts.PALETTE[i % len(charts.PALETTE)], f"run-{i}"))
    return styles
