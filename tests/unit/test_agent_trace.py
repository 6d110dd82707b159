"""Trace replay on the agent: prompts from hash ids, the split between agents, the schedule."""

from __future__ import annotations

import asyncio
import time

import pytest

from agent.prompts import Prompt
from agent.trace import (
    TracePrompts,
    TraceSchedule,
    load_trace,
    offsets_ns,
    share_entries,
    takeover_share,
    trace_schedule,
)
from common.datasets import TraceRequest
from common.proto.loadtest.v1 import run_pb2
from common.tokenizer import Tokenizer
from controller.domain.execution.planning import split_integer, trace_takeover_shares
from tests.tokenizers_fixture import build_bpe_tokenizer

pytestmark = pytest.mark.timeout(60)

BLOCK = 16


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_path(build_bpe_tokenizer(tmp_path_factory.mktemp("tok") / "tokenizer.json"))


def req(ts: float, n: int, out: int = 8, ids: tuple[int, ...] = ()) -> TraceRequest:
    return TraceRequest(ts, n, out, ids)


@pytest.mark.parametrize("with_tokenizer", [True, False])
def test_equal_hash_ids_are_equal_blocks(tokenizer: Tokenizer, with_tokenizer: bool) -> None:
    tok = tokenizer if with_tokenizer else None
    one = TracePrompts(BLOCK, seed=1, tokenizer=tok)
    other_agent = TracePrompts(BLOCK, seed=2, tokenizer=tok)
    a = one.prompt(0, req(0, 4 * BLOCK, ids=(7, 8, 9, 10)))
    b = other_agent.prompt(1, req(5, 3 * BLOCK + 5, ids=(7, 8, 11, 12)))
    if with_tokenizer:
        ta, tb = tokenizer.encode(a.text), tokenizer.encode(b.text)
        assert len(ta) == a.input_tokens == 4 * BLOCK
        assert len(tb) == b.input_tokens == 3 * BLOCK + 5  # the last block cut to fit
    else:
        ta, tb = a.text.split(), b.text.split()  # words stand for tokens
        assert len(ta) == a.input_tokens == 4 * BLOCK
        assert len(tb) == b.input_tokens == 3 * BLOCK + 5
    assert ta[: 2 * BLOCK] == tb[: 2 * BLOCK]
    assert ta[2 * BLOCK : 3 * BLOCK] != tb[2 * BLOCK : 3 * BLOCK]
    assert ta[3 * BLOCK :][:5] != tb[3 * BLOCK :]


def test_prompt_lengths_are_exact_with_the_tokenizer(tokenizer: Tokenizer) -> None:
    prompts = TracePrompts(BLOCK, seed=3, tokenizer=tokenizer)
    for i, n in enumerate([1, 2, 15, 16, 17, 40, 100, 333]):
        for ids in [(), (1,), (1, 2, 3)]:
            prompt = prompts.prompt(i, req(0, n, out=n + 1, ids=ids))
            assert tokenizer.count(prompt.text) == prompt.input_tokens == n
            assert prompt.max_tokens == n + 1


def test_requests_without_hash_ids_are_unique(tokenizer: Tokenizer) -> None:
    prompts = TracePrompts(BLOCK, seed=3, tokenizer=tokenizer)
    texts = [prompts.prompt(i, req(0, 30)).text for i in range(50)]
    assert len(set(texts)) == 50
    assert len({t.split()[0] + t.split()[1] for t in texts}) > 40  # they differ from the start


def trace(n: int) -> list[TraceRequest]:
    return [req(i * 37.5 + (i % 3), 10 + i % 7, ids=(i % 4,)) for i in range(n)]


@pytest.mark.parametrize("agents", [1, 2, 3])
@pytest.mark.parametrize("requests", [0, 1, 2, 10, 31])
def test_the_shares_of_the_agents_are_the_trace(agents: int, requests: int) -> None:
    entries = trace(31)
    limits = split_integer(requests, agents)
    schedules = []
    for i in range(agents):
        stage = run_pb2.Stage(trace_replay=True, requests=limits[i])
        if not requests:
            stage.duration.FromSeconds(60)
        elif limits[i] == 0:
            continue  # the controller gives this agent nothing (stage_shares: None)
        schedules.append(
            trace_schedule(stage, run_pb2.Trace(replay_speed=2.0), entries, seed=i, share_index=i, share_count=agents)
        )
    planned = sorted(p for s in schedules for p in s.planned())
    expected = offsets_ns(entries, 2.0)[: requests or None]
    assert [offset for offset, _ in planned] == expected
    assert [index for _, index in planned] == list(range(len(expected)))


def test_offsets_are_the_trace_times_over_the_speed() -> None:
    entries = [req(1000.0, 1), req(1000.0, 2), req(1250.5, 3), req(4000.0, 4)]
    assert offsets_ns(entries, 1.0) == [0, 0, 250_500_000, 3_000_000_000]
    assert offsets_ns(entries, 4.0) == [0, 0, 62_625_000, 750_000_000]


def test_a_duration_ends_the_replay() -> None:
    stage = run_pb2.Stage(trace_replay=True)
    stage.duration.FromMilliseconds(150)
    entries = [req(t, 1) for t in (0, 50, 100, 149.9, 150, 300)]
    schedule = trace_schedule(stage, run_pb2.Trace(), entries, seed=1)
    assert [i for _, i in schedule.planned()] == [0, 1, 2, 3]


@pytest.mark.parametrize("takers", [1, 2, 3])
@pytest.mark.parametrize(("lost_index", "lost_count", "sent"), [(0, 1, 0), (1, 2, 3), (2, 3, 5), (0, 2, 0)])
def test_takeovers_replay_exactly_what_the_lost_share_had_not_sent(
    takers: int, lost_index: int, lost_count: int, sent: int
) -> None:
    n = 40
    lost = list(share_entries(n, lost_index, lost_count))
    rest = lost[sent:]
    got = sorted(
        i for m in range(takers) for i in share_entries(n, *takeover_share(lost_index, lost_count, sent, m, takers))
    )
    assert got == rest
    # The controller's plan of the same takeover, with a request limit: the same entries.
    share = run_pb2.Stage(trace_replay=True, requests=len(lost))
    parts = trace_takeover_shares(share, lost_index, lost_count, sent, takers, None, 0)
    planned = []
    for part in parts:
        if part is None:
            continue
        stage, index, count = part
        schedule = trace_schedule(
            stage, run_pb2.Trace(), [req(i, 1) for i in range(n)], seed=1, share_index=index, share_count=count
        )
        planned += [i for _, i in schedule.planned()]
    assert sorted(planned) == rest


async def test_the_schedule_sends_each_request_at_its_trace_time() -> None:
    entries = [req(t, 3 + i, out=2 + i) for i, t in enumerate([0, 0, 20, 45, 60, 61, 100])]
    stage = run_pb2.Stage(trace_replay=True)
    stage.duration.FromSeconds(5)
    base = trace_schedule(stage, run_pb2.Trace(replay_speed=2.0), entries, seed=1, share_index=1, share_count=2)
    sent: list[tuple[int, int, Prompt]] = []

    async def send(scheduled: int, warmup: bool, prompt: Prompt) -> None:
        sent.append((scheduled, time.perf_counter_ns(), prompt))

    origin = time.perf_counter_ns()
    schedule = TraceSchedule(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, "origin_ns": origin})
    await asyncio.wait_for(schedule.run(send, lambda s, w: None), 10)
    assert [s - origin for s, _, _ in sent] == [offsets_ns(entries, 2.0)[i] for i in (1, 3, 5)]
    assert all(at >= scheduled for scheduled, at, _ in sent)  # never early
    assert [p.max_tokens for _, _, p in sent] == [3, 5, 7]


async def test_a_takeover_origin_in_the_past_sends_overdue_requests_at_once() -> None:
    entries = [req(t, 2) for t in (0, 10, 20, 5000)]
    stage = run_pb2.Stage(trace_replay=True, requests=3)
    base = trace_schedule(stage, run_pb2.Trace(), entries, seed=1)
    origin = time.perf_counter_ns() - 1_000_000_000  # the stage started a second ago
    schedule = TraceSchedule(**{**{f: getattr(base, f) for f in base.__dataclass_fields__}, "origin_ns": origin})
    got: list[int] = []

    async def send(scheduled: int, warmup: bool, prompt: Prompt) -> None:
        got.append(scheduled - origin)

    await asyncio.wait_for(schedule.run(send, lambda s, w: None), 10)
    assert got == [0, 10_000_000, 20_000_000]  # scheduled at the trace's times: queue delay shows the lag


def test_load_trace_reads_both_formats() -> None:
    mooncake = (
        b'{"timestamp": 0, "input_length": 10, "output_length": 2, "hash_ids": [1]}\n'
        b'{"timestamp": 7, "input_length": 3, "output_length": 1}\n'
    )
    assert load_trace(mooncake) == [req(0.0, 10, 2, (1,)), req(7.0, 3, 1)]
    azure = b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,100,20\n2023-11-16 18:15:47.0,50,5\n"
    assert load_trace(azure) == [req(0.0, 100, 20), req(500.0, 50, 5)]
    with pytest.raises(ValueError, match="line 2"):
        load_trace(b'{"timestamp": 0, "input_length": 10, "output_length": 2}\n{"timestamp": 1}\n')
