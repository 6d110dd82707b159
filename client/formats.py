"""Output formats of results, samples and comparisons, as pure functions of the API messages.

- `markdown`: a per-stage table (plus verdict, checks, saturation notes) to paste into a PR.
- `vllm-json`: one dict per stage with the keys vLLM's `vllm bench serve --save-result`
  writes, so existing tooling that reads those files reads ours. Mapping choices:
  * percentiles are written as if run with `--percentile-metrics ttft,tpot,itl,e2el
    --metric-percentiles 90,95,99,99.9` (keys `p90_ttft_ms` ... `p99.9_e2el_ms`);
  * a closed-loop stage of concurrency N is vLLM's `--request-rate inf --max-concurrency N`;
    an open-loop stage is `--request-rate R` (`--max-concurrency` only with a cap), with
    `burstiness` 1.0 for Poisson, the gamma shape for gamma and `"inf"` for evenly spaced
    arrivals (vLLM's constant spacing; a string because JSON has no infinity);
  * `max_concurrent_requests` is vLLM's exact peak of requests in flight; results carry no
    peak, so this is our *achieved* (mean) concurrency, a float;
  * `date` is the run's end (or creation) time in local time, `%Y%m%d-%H%M%S` as vLLM;
  * `tokenizer_id` is null (token counts come from the server's usage), `rtfx` is 0.0;
  * `run_id`, `stage_index` and `stage_name` are added the way vLLM's `--metadata KEY=VALUE`
    adds keys, so a file can be traced back to its run.
- `csv` / `jsonl` rows of ExportRunSamples: ExportedSample's fields in declaration order,
  the status as its lowercase name without prefix (`ok`, `http_5xx`).
- the CompareRuns table, one per compared run (its capacities first, for capacity searches),
  and the exit code a comparison gives (`compare_exit_code`).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import AsyncIterable
from datetime import datetime
from typing import Any, TextIO

from google.protobuf.message import Message
from rich.table import Table
from rich.text import Text

from client import exitcodes, intervals
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from common.search_outcome import CAPACITY_STOP_REASONS, DEFAULT_SEARCH_TOLERANCE_PERCENT, variable_name

NA = "\u2013"  # an en dash where a value does not exist
RESULT_FORMATS = ("table", "json", "markdown", "vllm-json")
EXPORT_FORMATS = ("csv", "jsonl")
VLLM_PERCENTILES = (90.0, 95.0, 99.0, 99.9)
# Metrics shown by `runs compare` (any other is shown too when it did not simply pass).
KEY_COMPARE_METRICS = (
    "ttft_p50_ms",
    "ttft_p99_ms",
    "tpot_p50_ms",
    "e2e_p99_ms",
    "output_token_throughput",
    "request_throughput",
    # Only in comparisons of reasoning runs (the controller compares them only then).
    "ttfr_p50_ms",
    "ttfo_p50_ms",
    "ttfo_p99_ms",
)
# Figures that are percentages already: changes shown in points.
_PERCENT_METRICS = ("prefix_cache_hit_percent",)
SAMPLE_FIELDS: tuple[str, ...] = tuple(f.name for f in run_service_pb2.ExportedSample.DESCRIPTOR.fields)


# --- shared helpers ---------------------------------------------------------------------


# How the id of a group of repeats starts (`runs result`, `report` and compare take either).
GROUP_ID_PREFIX = "grp_"


def group_as_run(response: run_service_pb2.GetGroupResultResponse) -> run_pb2.Run:
    """The group as the run `print_result` and the formats show: the group's id and state, the
    first repeat's spec (every repeat's but for its seed)."""
    run = run_pb2.Run(id=response.result.run_id, state=response.result.state)
    if response.runs:
        run.spec.CopyFrom(response.runs[0].spec)
        run.spec.workload.seed = 0  # each repeat has its own
    return run


def load_label(stage: run_pb2.StageResult) -> str:
    """The stage's load level, e.g. `concurrency=8` or `rate=4/s` (CompareRuns' wording)."""
    if stage.request_rate:
        return f"rate={stage.request_rate:g}/s"
    return f"concurrency={stage.concurrency}" if stage.concurrency else "-"


def verdict_name(verdict: int) -> str:
    return run_pb2.Verdict.Name(verdict).removeprefix("VERDICT_")  # type: ignore[arg-type]


def status_name(status: int) -> str:
    return run_pb2.RequestStatus.Name(status).removeprefix("REQUEST_STATUS_").lower()  # type: ignore[arg-type]


def success_percent(stage: run_pb2.StageResult) -> float | None:
    total = stage.requests_ok + stage.requests_failed
    return 100.0 * stage.requests_ok / total if total else None


def stage_spec(run: run_pb2.Run | None, index: int) -> run_pb2.Stage | None:
    if run is None or index >= len(run.spec.stages):
        return None
    return run.spec.stages[index]


# --- capacity search ------------------------------------------------------------------------

OUTCOME_TEXT = {
    run_pb2.PROBE_OUTCOME_PASS: "pass",
    run_pb2.PROBE_OUTCOME_FAIL: "fail",
    run_pb2.PROBE_OUTCOME_INCONCLUSIVE: "inconcl.",
    run_pb2.PROBE_OUTCOME_UNSPECIFIED: NA,
}


def search_load(variable: int, load: float) -> str:
    """A probe's load: `24` (concurrency) or `12.5/s` (rate)."""
    if variable == run_pb2.SEARCH_VARIABLE_RATE:
        # Four significant digits: a bisected rate (12.3456...) must not widen the table.
        return f"{load:.0f}/s" if load >= 1000 else f"{load:.4g}/s"
    return f"{load:.0f}" if load == int(load) else f"{load:g}"


def _search_load_words(variable: int, load: float) -> str:
    """A load in a sentence: `concurrency 24`, `rate 12.5 req/s`."""
    if variable == run_pb2.SEARCH_VARIABLE_RATE:
        return f"rate {search_load(variable, load).removesuffix('/s')} req/s"
    return f"concurrency {search_load(variable, load)}"


def _throughput_words(capacity: run_pb2.CapacityResult) -> list[str]:
    parts = [f"{capacity.request_throughput:,.1f} req/s", f"{capacity.output_token_throughput:,.0f} tok/s"]
    if capacity.HasField("cost_per_million_output_tokens_usd"):
        parts.append(f"${capacity.cost_per_million_output_tokens_usd:,.2f} per 1M output tokens")
    return parts


def capacity_line(capacity: run_pb2.CapacityResult, search: run_pb2.SearchSpec | None = None) -> str:
    """The search's outcome in one line, what its stop reason means included, e.g.
    `capacity: concurrency 24 (highest passing; 26 failed) · 512.3 req/s · 8,120 tok/s ·
    converged within 5 %`. `search` (the run's spec) gives the tolerance and the limits."""
    var = capacity.variable
    passing = capacity.highest_passing if capacity.HasField("highest_passing") else None
    failing = capacity.lowest_failing if capacity.HasField("lowest_failing") else None
    reason = capacity.stop_reason
    so_far = f" (highest passing so far: {_search_load_words(var, passing)})" if passing is not None else ""
    if reason == run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED:
        return (
            "generator saturated: no capacity measured — the load generator could not send more load, so the "
            f"server's limit is unknown{so_far}; add agents or cores and run again"
        )
    if reason == run_pb2.SEARCH_STOP_REASON_TARGET_ERRORS:
        at = f" at {_search_load_words(var, failing)}" if failing is not None else ""
        return f"target errors: most requests of a probe{at} failed, the target errors rather than slows down{so_far}"
    if reason == run_pb2.SEARCH_STOP_REASON_MIN_FAILED:
        low = failing if failing is not None else (search.min if search is not None and search.min else None)
        below = f" below {_search_load_words(var, low)}" if low is not None else " below the search minimum"
        return f"capacity{below}: even the lowest load probed missed the goodput target; lower --search-min"
    if reason == run_pb2.SEARCH_STOP_REASON_RUN_ENDED:
        bracket = [f"highest passing {_search_load_words(var, passing)}"] if passing is not None else []
        bracket += [f"lowest failing {_search_load_words(var, failing)}"] if failing is not None else []
        found = f" ({', '.join(bracket)})" if bracket else ""
        return f"search ended with the run: no capacity measured{found}; `run --resume RUN_ID` continues it"
    if reason not in CAPACITY_STOP_REASONS or passing is None:
        return "capacity search: no outcome yet (the search is still running or reported nothing)"
    head = f"capacity: {'at least ' if reason == run_pb2.SEARCH_STOP_REASON_MAX_PASSED else ''}"
    head += _search_load_words(var, passing)
    head += f" (highest passing; {search_load(var, failing)} failed)" if failing is not None else " (highest passing)"
    parts = [head, *_throughput_words(capacity)]
    if reason == run_pb2.SEARCH_STOP_REASON_CONVERGED:
        tolerance = (
            search.tolerance_percent
            if search is not None and search.HasField("tolerance_percent")
            else (DEFAULT_SEARCH_TOLERANCE_PERCENT)
        )
        parts.append(f"converged within {tolerance:g} %")
        if not capacity.confident:
            parts.append("boundary within noise")
    elif reason == run_pb2.SEARCH_STOP_REASON_MAX_PASSED:
        parts.append("the search maximum passed: raise --search-max")
    else:
        parts.append(f"not converged: --max-probes reached after {len(capacity.probes)} probes")
    return " · ".join(parts)


def _good_interval(p: run_pb2.CapacityProbe) -> str:
    """`97.2 (94-99)`: the good percent and its 95 % interval, widened to whole percents."""
    if not p.requests:
        return NA
    return f"{p.good_percent:.1f} ({math.floor(p.good_percent_low):.0f}-{math.ceil(p.good_percent_high):.0f})"


def _pair(low: float, high: float) -> str:
    if not low and not high:
        return NA
    return f"{_short(low)}/{_short(high)}"


def _short(value: float) -> str:
    return f"{value:.1f}" if abs(value) < 1000 else f"{value:.0f}"


def probe_cells(capacity: run_pb2.CapacityResult) -> list[dict[str, str]]:
    """Every probe as the cells of the probe table (render.probe_table), by column name."""
    rows = []
    for i, p in enumerate(capacity.probes):
        rows.append(
            {
                "#": f"{i}{'*' if p.repeat else ''}",
                "stage": str(p.stage_index) if p.stage_index >= 0 else "earlier",
                "load": search_load(capacity.variable, p.load),
                "outcome": OUTCOME_TEXT.get(p.outcome, NA),
                "repeat": "yes" if p.repeat else "",
                "requests": str(p.requests),
                "good %": _good_interval(p),
                "TTFT p50/p99": _pair(p.ttft_p50_ms, p.ttft_p99_ms),
                "TPOT p50/p99": _pair(p.tpot_p50_ms, p.tpot_p99_ms),
                "TTFT p50": _short(p.ttft_p50_ms),
                "TTFT p99": _short(p.ttft_p99_ms),
                "TPOT p50": _short(p.tpot_p50_ms),
                "TPOT p99": _short(p.tpot_p99_ms),
                "E2E p99": _short(p.e2e_p99_ms),
                "req/s": _short(p.request_throughput) if p.request_throughput < 100 else f"{p.request_throughput:.0f}",
                "out tok/s": f"{p.output_token_throughput:.0f}",
                "reason": p.reason,
            }
        )
    return rows


# --- warnings and the verdict ------------------------------------------------------------

# A requested and an actual mean length further apart than this (relative) are a warning.
LENGTH_WARNING_FRACTION = 0.1
VERDICT_INCONCLUSIVE = "INCONCLUSIVE"


def _generic_warnings(message: Any) -> list[str]:
    """Warnings a result message carries in a field of its own: every repeated field whose
    name ends in `warnings` (text, or messages with a `message` field). Fields added to the
    result later are printed without the CLI knowing their names."""
    lines: list[str] = []
    for field in message.DESCRIPTOR.fields:
        if not field.name.endswith("warnings") or not field.is_repeated:
            continue
        for item in getattr(message, field.name):
            lines.append(item if isinstance(item, str) else str(getattr(item, "message", item)))
    return lines


def _length_warning(kind: str, requested: float, actual: float) -> str | None:
    if not requested or abs(actual - requested) <= LENGTH_WARNING_FRACTION * requested:
        return None
    return f"{kind} length {requested:.0f} → {actual:.0f} tokens (mean requested → actual)"


def stage_warnings(stage: run_pb2.StageResult) -> list[str]:
    """Every warning of one stage: the load generator saturated, the target did not keep up,
    less load than specified, stored samples left out,
    agents lost, lengths far from the requested ones, usage not reported, client/server
    count mismatches, failed scrapes, and any warning field of the message."""
    lines: list[str] = []
    if stage.saturated:
        lines.append(f"load generator saturated: {stage.saturation_reason or 'see the result'}; latencies suspect")
    if stage.target_saturated:
        lines.append(stage.target_saturation_reason)
    if stage.reduced_load:
        lines.append(f"reduced load: {stage.reduced_load_reason}")
    if stage.agents_lost:
        lines.append(f"{stage.agents_lost} agent(s) lost with {stage.requests_lost} unreported requests")
    for kind, requested, actual in (
        ("input", stage.mean_requested_input_tokens, stage.mean_input_tokens),
        ("output", stage.mean_requested_output_tokens, stage.mean_output_tokens),
    ):
        if stage.requests_ok and (line := _length_warning(kind, requested, actual)):
            lines.append(line)
    if stage.output_tokens_estimated:
        lines.append("usage not reported by the server: output token counts are estimates")
    sm = stage.server_metrics
    lines.extend(f"client/server mismatch: {c.message}" for c in sm.cross_checks if c.mismatch)
    if sm.scrapes_failed:
        endpoints = ", ".join(sorted({e.endpoint for e in sm.errors}))
        lines.append(f"{sm.scrapes_failed} server-metrics scrapes failed ({endpoints})")
    if stage.samples_ignored:
        lines.append(stage.samples_ignored_reason)
    lines.extend(_generic_warnings(stage))
    return lines


def result_warnings(result: run_pb2.RunResult) -> list[str]:
    """Every warning of a result, one line each (`stage N: ...` for a stage's)."""
    lines = _generic_warnings(result)
    for s in result.stages:
        lines.extend(f"stage {s.index}: {w}" for w in stage_warnings(s))
    return lines


def suspect_stages(result: run_pb2.RunResult) -> set[int]:
    """Stages whose numbers are flagged as suspect: the load generator was saturated, or the
    stage ran with less load than specified, or agents were lost with their requests."""
    return {s.index for s in result.stages if s.saturated or s.reduced_load or s.agents_lost}


def honest_verdict(result: run_pb2.RunResult, allow_suspect: bool = False) -> str:
    """The verdict as the CLI reports it: a check that failed on a sound stage is a FAIL; else
    any check judged on a suspect stage makes the verdict INCONCLUSIVE (unless allowed)."""
    verdict = verdict_name(result.verdict)
    suspect = set() if allow_suspect else suspect_stages(result)
    if not suspect or verdict not in ("PASS", "FAIL"):
        return verdict
    if verdict == "FAIL" and all(c.passed for c in result.checks):
        return verdict  # the run itself did not succeed
    # A run-level check (on a capacity search's outcome) is judged on no one stage: the search
    # itself never takes a saturated probe for a capacity.
    if any(not c.passed and (c.run_level or c.stage_index not in suspect) for c in result.checks):
        return "FAIL"
    if any(not c.run_level and c.stage_index in suspect for c in result.checks):
        return VERDICT_INCONCLUSIVE
    return verdict


# --- reasoning, prefix cache, conversations ---------------------------------------------------


def has_reasoning(s: run_pb2.StageResult) -> bool:
    """Whether the stage saw reasoning (TTFO alone is TTFT for a model that does not reason)."""
    return bool(s.ttfr.count or s.reasoning_tokens)


def has_prefix_cache(s: run_pb2.StageResult) -> bool:
    """Whether the stage has a prefix-cache view: the server's, or the client's with hits."""
    client = s.HasField("prefix_cache_hit_percent") and s.cached_prompt_tokens > 0
    return client or s.server_metrics.HasField("prefix_cache_hit_percent")


def _md_percent(message: run_pb2.StageResult | run_pb2.TurnResult | run_pb2.ServerMetricsResult) -> str:
    return f"{message.prefix_cache_hit_percent:.1f}" if message.HasField("prefix_cache_hit_percent") else NA


def _md_workload_tables(result: run_pb2.RunResult) -> list[str]:
    """The Markdown tables of reasoning, the prefix cache and conversation turns, each only
    when some stage has its figures; the token accounting note."""
    lines: list[str] = []
    reasoning = [s for s in result.stages if has_reasoning(s)]
    if reasoning:
        lines += ["", "| Stage | TTFR p50 | TTFR p99 | TTFO p50 | TTFO p99 | reasoning tok | answer tok |"]
        lines.append("|:---|---:|---:|---:|---:|---:|---:|")
        for s in reasoning:
            cells = [
                _md_ms(s.ttfr, "p50_ms"),
                _md_ms(s.ttfr, "p99_ms"),
                _md_ms(s.ttfo, "p50_ms"),
                _md_ms(s.ttfo, "p99_ms"),
            ]
            lines.append(
                f"| {_md_stage(s)} | {' | '.join(cells)} | {s.mean_reasoning_tokens:.1f} | {s.mean_answer_tokens:.1f} |"
            )
        lines += ["", "TTFR / TTFO: time to the first reasoning / answer token (ms); tok: mean per request."]
    cached = [s for s in result.stages if has_prefix_cache(s)]
    if cached:
        lines += ["", "| Stage | cached prompt tokens | client hit % | server hit % |", "|:---|---:|---:|---:|"]
        lines += [
            f"| {_md_stage(s)} | {s.cached_prompt_tokens} | {_md_percent(s)} | {_md_percent(s.server_metrics)} |"
            for s in cached
        ]
    for s in result.stages:
        if not s.turns:
            continue
        lines += ["", f"Stage {_md_stage(s)} by turn: {s.sessions_completed} sessions completed"]
        if s.session_duration.count:
            d = s.session_duration
            lines[-1] += f", session duration p50 {d.p50_ms / 1000:.2f} s, p99 {d.p99_ms / 1000:.2f} s"
        lines += [
            "",
            "| Turn | Requests | Failed | TTFT p50 | TTFT p99 | TPOT p50 | E2E p50 | input tok | cache hit % |",
        ]
        lines.append("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        lines += [
            f"| {t.turn} | {t.requests_ok + t.requests_failed} | {t.requests_failed} | {_md_ms(t.ttft, 'p50_ms')} "
            f"| {_md_ms(t.ttft, 'p99_ms')} | {_md_ms(t.tpot, 'p50_ms')} | {_md_ms(t.e2e, 'p50_ms')} "
            f"| {t.mean_input_tokens:.1f} | {_md_percent(t)} |"
            for t in s.turns
        ]
    if result.tokens.note:
        lines += ["", f"Tokens: {_md_text(result.tokens.note)}"]
    return lines


# --- markdown ------------------------------------------------------------------------------


def _md_text(value: str) -> str:
    """User text inside a Markdown table cell: no row breaks, no column breaks, no HTML."""
    return (
        value.replace("\\", "\\\\")
        .replace("|", "\\|")
        .replace("<", "&lt;")
        .replace(">", "&gt;")
        .replace("\r", " ")
        .replace("\n", " ")
    )


def _md_code(value: str) -> str:
    """User text as a code span inside a table cell: shown literally (entities would be too),
    so only the column separator and the span's own delimiter need care."""
    return "`" + value.replace("`", "'").replace("|", "\\|").replace("\r", " ").replace("\n", " ") + "`"


def _md_stage(stage: run_pb2.StageResult) -> str:
    """The stage's index, with its name when the name says more than the load."""
    if stage.name and stage.name != load_label(stage):
        return f"{stage.index}: {_md_text(stage.name)}"
    return str(stage.index)


def _md_ms(stats: run_pb2.LatencyStats, field: str) -> str:
    """`12.3 ±0.4`: the figure (`p50_ms`) with its interval (`p50_ci`) when it has one."""
    if not stats.count:
        return NA
    return intervals.inline(f"{getattr(stats, field):.1f}", intervals.interval_of(stats, field.replace("_ms", "_ci")))


MARKDOWN_COLUMNS = (
    "Stage",
    "Load",
    "Requests",
    "Failed",
    "Success %",
    "TTFT avg",
    "TTFT p50",
    "TTFT p95",
    "TTFT p99",
    "TPOT p50",
    "TPOT p99",
    "E2E avg",
    "E2E p50",
    "E2E p95",
    "E2E p99",
    "req/s",
    "out tok/s",
)


def markdown(result: run_pb2.RunResult, run: run_pb2.Run | None = None) -> str:
    """The result as GitHub-flavoured Markdown: a heading line, the stage table, the verdict
    and checks when the run has checks, and saturation warnings (the generator's and the target's)."""
    lines: list[str] = []
    what = f"group of {len(result.group.run_ids)} repeats" if result.HasField("group") else "run"
    title = f"**llm-loadtest {what} `{result.run_id}`**"
    if run is not None:
        if run.spec.display_name:
            title += f" — {_md_text(run.spec.display_name)}"
        if run.spec.target.model:
            title += f" — model {_md_code(run.spec.target.model)}"
    title += f" — {run_pb2.RunState.Name(result.state).removeprefix('RUN_STATE_')}"
    lines += [title, ""]
    if result.HasField("capacity"):
        search = run.spec.search if run is not None else None
        lines += [f"**{_md_text(capacity_line(result.capacity, search))}**", ""]
    lines.append("| " + " | ".join(MARKDOWN_COLUMNS) + " |")
    lines.append("|" + "|".join(":---" if i < 2 else "---:" for i in range(len(MARKDOWN_COLUMNS))) + "|")
    for s in result.stages:
        ok = success_percent(s)
        row = [
            _md_stage(s),
            load_label(s),
            str(s.requests_ok + s.requests_failed),
            str(s.requests_failed),
            f"{ok:.1f}" if ok is not None else NA,  # the error rate's interval is in the note below
            _md_ms(s.ttft, "mean_ms"),
            _md_ms(s.ttft, "p50_ms"),
            _md_ms(s.ttft, "p95_ms"),
            _md_ms(s.ttft, "p99_ms"),
            _md_ms(s.tpot, "p50_ms"),
            _md_ms(s.tpot, "p99_ms"),
            _md_ms(s.e2e, "mean_ms"),
            _md_ms(s.e2e, "p50_ms"),
            _md_ms(s.e2e, "p95_ms"),
            _md_ms(s.e2e, "p99_ms"),
            intervals.inline(f"{s.request_throughput:.2f}", intervals.interval_of(s, "request_throughput_ci"), 2),
            intervals.inline(
                f"{s.output_token_throughput:.1f}", intervals.interval_of(s, "output_token_throughput_ci")
            ),
        ]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Latencies in ms. TPOT excludes the first token; E2E is `last_token - sent`."]
    if result.confidence_percent:
        level = intervals.level(result)
        lines[-1] += (
            f" ±: half the {level:g} % confidence interval; (≥x): bounded from below only, (≤x): from"
            " above only, (?): not at all (too few requests)."
        )
        failed = [
            f"stage {s.index} {100 * s.error_rate:.2f} % {intervals.bounds(intervals.percent(s.error_rate_ci), 2)}"
            for s in result.stages
            if s.requests_failed and s.HasField("error_rate_ci")
        ]
        if failed:
            lines[-1] += " Error rates: " + ", ".join(failed) + "."
    lines += _md_workload_tables(result)
    checks = iter_checks(result)
    if result.verdict not in (run_pb2.VERDICT_UNSPECIFIED, run_pb2.VERDICT_NONE) or checks:
        lines += ["", f"**Verdict: {verdict_name(result.verdict)}**", ""]
        lines += ["| Check | Stage | Measured | Threshold | Result |", "|:---|---:|---:|---:|:---|"]
        for c in checks:
            lines.append(
                f"| {_md_code(c.expression)} | {'run' if c.run_level else c.stage_index} | {c.measured:.4g} "
                f"| {c.threshold:.4g} | {'✅ pass' if c.passed else '❌ fail'} |"
            )
    saturated = [s for s in result.stages if s.saturated]
    if saturated:
        lines.append("")
        for s in saturated:
            lines.append(
                f"> ⚠️ stage {s.index} ({load_label(s)}): the load generator was saturated — "
                f"{_md_text(s.saturation_reason) or 'see the result'}; its latencies are suspect."
            )
    overloaded = [s for s in result.stages if s.target_saturated]
    if overloaded:
        lines.append("")
        for s in overloaded:
            lines.append(f"> ⚠️ stage {s.index} ({load_label(s)}): {_md_text(s.target_saturation_reason)}.")
    return "\n".join(lines) + "\n"


# --- vLLM bench serve JSON ---------------------------------------------------------------


def _vllm_backend(run: run_pb2.Run) -> str:
    return "openai" if run.spec.target.api_kind == run_pb2.API_KIND_COMPLETIONS else "openai-chat"


def _vllm_date(run: run_pb2.Run) -> str:
    for ts in (run.end_time, run.start_time, run.create_time):
        if ts.seconds or ts.nanos:
            return datetime.fromtimestamp(ts.ToNanoseconds() / 1e9).strftime("%Y%m%d-%H%M%S")
    return datetime.now().strftime("%Y%m%d-%H%M%S")


def _percentile_key(p: float) -> str:
    return str(int(p)) if int(p) == p else str(p)  # as vLLM: 99 -> "99", 99.9 -> "99.9"


def _vllm_interval(out: dict[str, Any], key: str, message: Message, field: str) -> None:
    """`<key>_ci: [low, high]` beside a figure that has an interval (not a vLLM key: readers
    of vLLM's files ignore it); a side the data cannot bound is null."""
    ci = intervals.interval_of(message, field)
    if ci is not None:
        out[f"{key}_ci"] = [None if ci.low_open else ci.low, None if ci.high_open else ci.high]


def _vllm_metric(out: dict[str, Any], name: str, stats: run_pb2.LatencyStats) -> None:
    by_percentile = {90.0: stats.p90_ms, 95.0: stats.p95_ms, 99.0: stats.p99_ms, 99.9: stats.p999_ms}
    ci_field = {90.0: "p90_ci", 95.0: "p95_ci", 99.0: "p99_ci", 99.9: "p999_ci"}
    out[f"mean_{name}_ms"] = stats.mean_ms
    _vllm_interval(out, f"mean_{name}_ms", stats, "mean_ci")
    out[f"median_{name}_ms"] = stats.p50_ms
    _vllm_interval(out, f"median_{name}_ms", stats, "p50_ci")
    out[f"std_{name}_ms"] = stats.std_ms
    for p in VLLM_PERCENTILES:
        out[f"p{_percentile_key(p)}_{name}_ms"] = by_percentile[p]
        _vllm_interval(out, f"p{_percentile_key(p)}_{name}_ms", stats, ci_field[p])


def vllm_stage_result(run: run_pb2.Run, stage: run_pb2.StageResult) -> dict[str, Any]:
    """One stage as the JSON `vllm bench serve --save-result` writes (see the module doc)."""
    spec = stage_spec(run, stage.index)
    request_rate: float | str = stage.request_rate if stage.request_rate else "inf"
    max_concurrency: int | None
    burstiness: float | str = 1.0
    if stage.request_rate:
        max_concurrency = spec.max_concurrency if spec is not None and spec.max_concurrency else None
        if spec is not None and spec.arrival == run_pb2.ARRIVAL_PROCESS_GAMMA and spec.burstiness:
            burstiness = spec.burstiness
        elif spec is not None and spec.arrival == run_pb2.ARRIVAL_PROCESS_CONSTANT:
            burstiness = "inf"
    else:
        max_concurrency = stage.concurrency or None
    backend = _vllm_backend(run)
    out: dict[str, Any] = {
        "date": _vllm_date(run),
        "endpoint_type": backend,
        "backend": backend,
        "label": run.spec.display_name or None,
        "model_id": run.spec.target.model,
        "tokenizer_id": None,
        "num_prompts": stage.requests_ok + stage.requests_failed,
        "run_id": run.id,
        "stage_index": stage.index,
        "stage_name": stage.name,
        "request_rate": request_rate,
        "burstiness": burstiness,
        "max_concurrency": max_concurrency,
        "duration": stage.duration_s,
        "completed": stage.requests_ok,
        "failed": stage.requests_failed,
        "total_input_tokens": stage.prompt_tokens,
        "total_output_tokens": stage.output_tokens,
        "request_throughput": stage.request_throughput,
        "request_goodput": stage.goodput if stage.HasField("goodput") else None,
        "output_throughput": stage.output_token_throughput,
        "total_token_throughput": stage.total_token_throughput,
        "max_output_tokens_per_s": stage.peak_output_token_throughput,
        "max_concurrent_requests": stage.achieved_concurrency,
        "rtfx": 0.0,
    }
    for key, field in (
        ("request_throughput", "request_throughput_ci"),
        ("request_goodput", "goodput_ci"),
        ("output_throughput", "output_token_throughput_ci"),
        ("total_token_throughput", "total_token_throughput_ci"),
    ):
        _vllm_interval(out, key, stage, field)
    for name, stats in (("ttft", stage.ttft), ("tpot", stage.tpot), ("itl", stage.itl), ("e2el", stage.e2e)):
        _vllm_metric(out, name, stats)
    # vLLM reports client-side queueing only with --max-concurrency, and queue-inclusive E2E
    # only when the rate is finite as well: the open-loop stages with a cap.
    if stage.request_rate and max_concurrency is not None:
        _vllm_metric(out, "client_queue_time", stage.queue_delay)
        _vllm_metric(out, "e2el_including_client_queue", stage.e2e_including_queue)
    return out


def vllm_results(run: run_pb2.Run, result: run_pb2.RunResult) -> list[dict[str, Any]]:
    return [vllm_stage_result(run, s) for s in result.stages]


def vllm_file_name(run_id: str, stage_index: int) -> str:
    return f"{run_id}_stage{stage_index}.json"


# --- sample export -----------------------------------------------------------------------


def sample_row(sample: run_service_pb2.ExportedSample) -> dict[str, Any]:
    """One exported sample as plain values, keys in ExportedSample's field order."""
    row: dict[str, Any] = {}
    for name in SAMPLE_FIELDS:
        value = getattr(sample, name)
        row[name] = status_name(value) if name == "status" else value
    return row


def _csv_value(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    return value


async def write_samples(samples: AsyncIterable[run_service_pb2.ExportedSample], out: TextIO, fmt: str) -> int:
    """Writes every sample as CSV (with a header row) or JSON Lines; returns the row count."""
    count = 0
    if fmt == "csv":
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(SAMPLE_FIELDS)
        async for sample in samples:
            writer.writerow([_csv_value(v) for v in sample_row(sample).values()])
            count += 1
    elif fmt == "jsonl":
        async for sample in samples:
            out.write(json.dumps(sample_row(sample), ensure_ascii=False) + "\n")
            count += 1
    else:
        raise ValueError(f"unknown sample format {fmt!r}")
    return count


# --- comparison --------------------------------------------------------------------------


def _value_text(metric: str, value: float) -> str:
    if metric == "error_rate":
        return f"{value * 100:.2f}%"
    if metric in _PERCENT_METRICS:
        return f"{value:.1f}%"
    return f"{value:.1f}" if abs(value) >= 10 else f"{value:.3g}"


def _signed(value: float) -> str:
    return f"{value:+.1f}" if abs(value) >= 10 else f"{value:+.3g}"


def _delta_text(m: run_service_pb2.MetricDelta) -> str:
    """The change with its interval: `+10.2% [+4.1, +16.3]`; the error rate in percentage
    points (its tolerance counts points), a metric whose baseline is 0 in its own unit."""
    if m.metric == "error_rate":
        scale, unit, fmt = 100.0, " pt", (lambda v: f"{v:+.2f}")
    elif m.metric in _PERCENT_METRICS:
        scale, unit, fmt = 1.0, " pt", (lambda v: f"{v:+.1f}")
    elif m.baseline:
        scale, unit, fmt = 100.0 / abs(m.baseline), "%", (lambda v: f"{v:+.1f}")
    else:
        scale, unit, fmt = 1.0, "", _signed
    text = f"{fmt(m.delta * scale)}{unit}"
    if m.HasField("delta_ci"):
        text += f" [{fmt(m.delta_ci.low * scale)}, {fmt(m.delta_ci.high * scale)}]"
    return text


def _p_text(m: run_service_pb2.MetricDelta) -> str:
    if not m.HasField("delta_ci"):
        return NA  # not judged: no test was made
    return f"{m.p_adjusted:.2g}" if m.p_adjusted >= 0.001 else "<0.001"


def _needs(requests: int, repeats: int) -> str:
    if repeats:
        return f" (needs ~{repeats} repeats)"
    return f" (needs ~{requests} requests)" if requests else ""


def outcome_text(outcome: int, requests_needed: int = 0, repeats_needed: int = 0) -> Text:
    """`regressed` / `improved` / `inconclusive (needs ~N requests)` / `ok`, coloured."""
    if outcome == run_service_pb2.COMPARE_OUTCOME_REGRESSED:
        return Text("▲ regressed", style="bold red")
    if outcome == run_service_pb2.COMPARE_OUTCOME_IMPROVED:
        return Text("improved", style="green")
    if outcome == run_service_pb2.COMPARE_OUTCOME_INCONCLUSIVE:
        return Text("inconclusive" + _needs(requests_needed, repeats_needed), style="yellow")
    if outcome == run_service_pb2.COMPARE_OUTCOME_NO_REGRESSION:
        return Text("ok")
    return Text(NA)


def _shown_metrics(stage: run_service_pb2.StageComparison, all_metrics: bool) -> list[run_service_pb2.MetricDelta]:
    """The key metrics, and any other that did not simply pass (regressed, improved, inconclusive)."""
    if all_metrics:
        return list(stage.metrics)
    by_name = {m.metric: m for m in stage.metrics}
    shown = [by_name[name] for name in KEY_COMPARE_METRICS if name in by_name]
    shown += [
        m
        for m in stage.metrics
        if m.outcome != run_service_pb2.COMPARE_OUTCOME_NO_REGRESSION and m.metric not in KEY_COMPARE_METRICS
    ]
    return shown or list(stage.metrics)


def capacity_compared(comparison: run_service_pb2.RunComparison) -> bool:
    """True when the comparison holds two capacities compared (not a note why not)."""
    return comparison.HasField("capacity") and not comparison.capacity.note


def _capacity_cells(c: run_service_pb2.CapacityComparison) -> tuple[str | Text, ...]:
    if c.note:  # the note itself is the table's caption: a row would stretch the metric column
        return "capacity", Text("not compared (below)", style="yellow"), "", "", "", "", ""
    return (
        "capacity",
        variable_name(c.variable),
        search_load(c.variable, c.baseline),
        search_load(c.variable, c.value),
        f"{c.delta_percent:+.1f}%" if c.baseline else f"{c.value - c.baseline:+g}",
        NA,
        outcome_text(c.outcome),
    )


_RUN_OUTCOMES = {
    run_service_pb2.COMPARE_OUTCOME_REGRESSED: "[bold red]REGRESSED[/]",
    run_service_pb2.COMPARE_OUTCOME_INCONCLUSIVE: "[yellow]inconclusive[/]",
    run_service_pb2.COMPARE_OUTCOME_NO_REGRESSION: "[green]no regression[/]",
}


def comparison_tables(response: run_service_pb2.CompareRunsResponse, all_metrics: bool = False) -> list[Table]:
    """One table per compared run: per matched stage, each key metric (and any other that did
    not simply pass) with the baseline's value, this run's, the change in percent with its
    interval, the adjusted p-value and the outcome; notes (why a metric could not be judged)
    as the caption."""
    tables = []
    level = f"{response.confidence_percent:g} % confidence" if response.confidence_percent else ""
    for comparison in response.comparisons:
        verdict = _RUN_OUTCOMES.get(comparison.outcome, "nothing compared")
        table = Table(
            title=f"{comparison.run_id} vs baseline {response.baseline_run_id} — {verdict}"
            + (f" ({level})" if level else ""),
            title_justify="left",
        )
        for name in ("load", "metric", "baseline", "value", "delta \\[interval]", "p (adj.)", "outcome"):
            table.add_column(name, justify="left" if name in ("load", "metric", "outcome") else "right")
        notes: list[str] = []
        if comparison.HasField("capacity"):
            table.add_row(*_capacity_cells(comparison.capacity))
            table.add_section()
            if comparison.capacity.note:
                notes.append(comparison.capacity.note)
        if not comparison.stages and not capacity_compared(comparison):
            table.add_row("-", "no stage matches a baseline stage's load", "", "", "", "", "")
        for stage in comparison.stages:
            for i, m in enumerate(_shown_metrics(stage, all_metrics)):
                table.add_row(
                    stage.load if i == 0 else "",
                    m.metric,
                    _value_text(m.metric, m.baseline),
                    _value_text(m.metric, m.value),
                    _delta_text(m),
                    _p_text(m),
                    outcome_text(m.outcome, m.requests_needed, m.repeats_needed),
                )
                if m.note:
                    notes.append(f"{stage.load} {m.metric}: {m.note}")
            table.add_section()
        if notes:
            table.caption, table.caption_justify = "\n".join(notes), "left"
        tables.append(table)
    return tables


def any_regressed(response: run_service_pb2.CompareRunsResponse) -> bool:
    return any(c.regressed or any(m.regressed for s in c.stages for m in s.metrics) for c in response.comparisons)


def compare_exit_code(response: run_service_pb2.CompareRunsResponse) -> int:
    """What a CI gate does with a comparison: 1 when anything regressed; else 2 when some run
    compared nothing (no stage matched the baseline's loads and no capacity was compared: no
    pass); else 3 when the data could not tell (inconclusive); else 0, no regression."""
    if response.outcome == run_service_pb2.COMPARE_OUTCOME_REGRESSED or any_regressed(response):
        return exitcodes.FAILED
    if any(c.outcome == run_service_pb2.COMPARE_OUTCOME_UNSPECIFIED for c in response.comparisons):
        return exitcodes.USAGE
    if response.outcome == run_service_pb2.COMPARE_OUTCOME_INCONCLUSIVE:
        return exitcodes.INCONCLUSIVE
    return exitcodes.OK


def iter_checks(result: run_pb2.RunResult) -> list[run_pb2.CheckResult]:
    """Every check of the run: the run-wide list, or the stages' lists when that is empty."""
    if result.checks:
        return list(result.checks)
    return [c for s in result.stages for c in s.checks]
