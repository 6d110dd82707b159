"""What `run` and `runs result` print for reasoning models, prefix caching and conversations:
tables that appear only when a stage has such figures, fit 80 columns, and `--json` with
every new field."""

from __future__ import annotations

import argparse
import io
import json

import pytest
from rich.console import Console
from rich.table import Table

from client import render
from client.commands import print_result
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(10)


def stats(p50: float, count: int = 500) -> run_pb2.LatencyStats:
    return run_pb2.LatencyStats(count=count, mean_ms=p50, p50_ms=p50, p99_ms=p50 * 2.25, max_ms=p50 * 3)


def plain(index: int = 0, **fields: object) -> run_pb2.StageResult:
    return run_pb2.StageResult(
        index=index,
        name=f"concurrency={8 * (index + 1)}",
        concurrency=8 * (index + 1),
        requests_ok=500,
        requests_failed=2,
        request_throughput=12.25,
        output_token_throughput=2345.5,
        ttft=stats(81.5),
        tpot=stats(12.5),
        itl=stats(12.5),
        e2e=stats(1650.0),
        **({"ttfo": stats(81.5)} | fields),  # type: ignore[arg-type]  # TTFO is TTFT without reasoning
    )


def reasoning(index: int = 0) -> run_pb2.StageResult:
    return plain(
        index,
        ttfr=stats(95.25),
        ttfo=stats(3217.75),
        reasoning_tokens=201000,
        mean_reasoning_tokens=402.0,
        mean_answer_tokens=118.5,
    )


def conversation(index: int = 0) -> run_pb2.StageResult:
    s = plain(index, sessions_completed=163, session_duration=stats(24500.0, 163))
    s.cached_prompt_tokens = 301234
    s.prefix_cache_hit_percent = 71.25
    for t, (ttft, hit) in enumerate(((240.5, 0.0), (61.25, 83.5), (57.75, 90.25)), start=1):
        s.turns.add(
            turn=t,
            requests_ok=167,
            requests_failed=t - 1,
            ttft=stats(ttft),
            tpot=stats(12.5 + t),
            e2e=stats(1500.0 + 10 * t),
            mean_input_tokens=700.5 * t,
            prefix_cache_hit_percent=hit,
        )
    return s


def result(*stages: run_pb2.StageResult, note: str = "") -> run_pb2.RunResult:
    r = run_pb2.RunResult(run_id="run_0123456789abcdef0123", state=run_pb2.RUN_STATE_SUCCEEDED, stages=list(stages))
    if note:
        r.tokens.note = note
        r.tokens.exact = True
        r.tokens.template_overhead_tokens = 7
    return r


def rendered(tables: list[Table], width: int = 80) -> str:
    out = io.StringIO()
    console = Console(file=out, width=width, no_color=True)
    for t in tables:
        console.print(t)
    return out.getvalue()


def args(**flags: object) -> argparse.Namespace:
    return argparse.Namespace(**({"json": False, "wide": False, "allow_suspect": False} | flags))


def run_of(r: run_pb2.RunResult) -> run_pb2.Run:
    return run_pb2.Run(id=r.run_id, state=r.state)


def test_a_plain_run_gets_no_extra_table_even_with_ttfo_and_zero_cached_tokens() -> None:
    s = plain()
    s.prefix_cache_hit_percent = 0.0  # usage reported 0 cached tokens: nothing to show
    r = result(s, plain(1))
    assert render.result_extras(r) == []
    assert render.result_extras(r, wide=True) == []
    text = rendered([render.result_table(r)])
    assert "TTFR" not in text and "TTFO" not in text and "tokens:" not in text
    details = rendered([p for p in render.result_details(r) if isinstance(p, Table)], width=200)
    assert "TTFO" not in details and "session" not in details


def test_reasoning_stages_show_ttfr_ttfo_and_the_token_split_within_80_columns() -> None:
    r = result(plain(0), reasoning(1))
    text = rendered(render.result_extras(r))
    assert max(len(line) for line in text.splitlines()) <= 80
    lines = text.splitlines()
    header = next(line for line in lines if "TTFR p50" in line)
    assert header.split()[:3] == ["stage", "TTFR", "p50"]
    row = next(line for line in lines if line.startswith("1"))
    s = r.stages[1]
    assert row.split() == [
        "1",
        f"{s.ttfr.p50_ms:.1f}",
        f"{s.ttfr.p99_ms:.1f}",
        f"{s.ttfo.p50_ms:.0f}",
        f"{s.ttfo.p99_ms:.0f}",
        f"{s.mean_reasoning_tokens:.1f}",
        f"{s.mean_answer_tokens:.1f}",
    ]
    assert not any(line.startswith("0 ") for line in lines)  # the plain stage has no row
    details = rendered([p for p in render.result_details(r) if isinstance(p, Table)], width=200)
    assert details.count("TTFR") == 1 and details.count("TTFO") == 1  # stage 1's latency table only
    facts = "\n".join(p for p in render.result_details(r) if isinstance(p, str))
    assert f"{s.reasoning_tokens} reasoning tokens" in facts


def test_conversations_show_a_table_by_turn_with_sessions_and_the_cache() -> None:
    r = result(conversation())
    tables = render.result_extras(r)
    text = rendered(tables)
    assert max(len(line) for line in text.splitlines()) <= 80
    s = r.stages[0]
    turn_rows = [line.split() for line in text.splitlines() if line[:1] in "123" and "/" in line]
    assert [row[0] for row in turn_rows] == ["1", "2", "3"]
    for row, t in zip(turn_rows, s.turns, strict=True):
        assert row[1] == f"{t.requests_ok}/{t.requests_failed}"
        assert row[2] == f"{t.ttft.p50_ms:.1f}" and row[-1] == f"{t.prefix_cache_hit_percent:.1f}"
        tokens = t.mean_input_tokens
        assert row[-2] == (f"{tokens:.0f}" if tokens >= 1000 else f"{tokens:.1f}")
    assert f"sessions completed {s.sessions_completed}" in text
    assert f"p50 {s.session_duration.p50_ms / 1000:.2f} s" in text
    cache = next(line for line in text.splitlines() if line.startswith("0 ") and str(s.cached_prompt_tokens) in line)
    assert cache.split() == ["0", str(s.cached_prompt_tokens), f"{s.prefix_cache_hit_percent:.1f}"]
    assert "server hit %" not in text  # no server view
    wide = rendered(render.result_extras(r, wide=True), width=200)
    assert "TPOT p99" in wide and "E2E p99" in wide


def test_the_server_hit_rate_is_shown_beside_the_clients_where_the_server_has_one() -> None:
    s = plain(0)
    s.server_metrics.prefix_cache_hit_percent = 64.5
    s.server_metrics.prefix_cache_source = "vllm:prefix_cache_hits_total/vllm:prefix_cache_queries_total"
    r = result(s, conversation(1))
    table = render.prefix_cache_table(r)
    assert table is not None
    text = rendered([table])
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line[:2] in ("0 ", "1 ")}
    assert rows["0"] == ["0", "0", "\u2013", "64.5"]  # no client view: an en dash
    assert rows["1"][-2:] == [f"{r.stages[1].prefix_cache_hit_percent:.1f}", "\u2013"]
    assert "vllm:prefix_cache_hits_total" in rendered(render.result_extras(r, wide=True), width=200)


def test_the_token_accounting_note_is_under_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    note = "input 512 reaches the model as 519 tokens (+7 template)"
    r = result(plain(), note=note)
    assert print_result(args(), run_of(r), r) == 0
    out = capsys.readouterr().out
    assert f"tokens: {note}" in out
    assert out.index(f"tokens: {note}") < out.index("run id:")


def test_print_result_shows_the_extra_tables_after_the_summary(capsys: pytest.CaptureFixture[str]) -> None:
    r = result(reasoning(0), conversation(1))
    print_result(args(), run_of(r), r)
    out = capsys.readouterr().out
    assert out.index("E2E p99") < out.index("TTFR p50") < out.index("cached tok") < out.index("by turn")


def test_json_has_every_new_field(capsys: pytest.CaptureFixture[str]) -> None:
    r = result(reasoning(0), conversation(1), note="approximate: no tokenizer")
    r.stages[0].server_metrics.prefix_cache_hit_percent = 12.5
    print_result(args(json=True), run_of(r), r)
    printed = json.loads(capsys.readouterr().out)
    s0, s1 = printed["stages"]
    assert s0["ttfr"]["p50_ms"] == 95.25 and s0["ttfo"]["p99_ms"] == r.stages[0].ttfo.p99_ms
    assert (s0["reasoning_tokens"], s0["mean_reasoning_tokens"], s0["mean_answer_tokens"]) == (201000, 402.0, 118.5)
    assert s0["server_metrics"]["prefix_cache_hit_percent"] == 12.5
    assert "prefix_cache_hit_percent" not in s0  # unset: no client view
    assert s1["prefix_cache_hit_percent"] == 71.25 and s1["cached_prompt_tokens"] == 301234
    assert [t["turn"] for t in s1["turns"]] == [1, 2, 3] and s1["turns"][1]["ttft"]["p50_ms"] == 61.25
    assert s1["sessions_completed"] == 163 and s1["session_duration"]["count"] == 163
    assert printed["tokens"] == {
        "exact": True,
        "tokenizer": "",
        "template_overhead_tokens": 7,
        "note": "approximate: no tokenizer",
    }
    assert s0["turns"] == [] and s0["sessions_completed"] == 0  # present though empty


def test_markdown_has_the_new_tables_only_when_they_apply() -> None:
    from client import formats

    plain_md = formats.markdown(result(plain()))
    assert "TTFR" not in plain_md and "by turn" not in plain_md and "cached prompt tokens" not in plain_md
    r = result(reasoning(0), conversation(1), note="input 512 reaches the model as 519 tokens (+7 template)")
    md = formats.markdown(r)
    s0, s1 = r.stages
    row = next(line for line in md.splitlines() if line.startswith("| 0 |") and "402.0" in line)
    assert f"| {s0.mean_reasoning_tokens:.1f} | {s0.mean_answer_tokens:.1f} |" in row
    assert f"{s0.ttfo.p50_ms:.1f}" in row and f"{s0.ttfr.p99_ms:.1f}" in row
    turns = [line for line in md.splitlines() if line.startswith("| ") and line.count("|") == 10]
    assert [t.split("|")[1].strip() for t in turns[1:]] == ["1", "2", "3"]
    assert turns[2].split("|")[4].strip() == f"{s1.turns[1].ttft.p50_ms:.1f}"
    assert f"{s1.sessions_completed} sessions completed" in md
    assert f"| 1 | {s1.cached_prompt_tokens} | {s1.prefix_cache_hit_percent:.1f} | \u2013 |" in md
    assert "Tokens: input 512 reaches the model as 519 tokens (+7 template)" in md
