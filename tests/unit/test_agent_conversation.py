"""The conversation engine: session plans, the history each turn carries, the turn gate."""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from agent.conversation import (
    ConversationEngine,
    ConversationLoad,
    DatasetConversations,
    SyntheticConversations,
    TurnGate,
    TurnRequest,
    conversation_load,
    conversation_source,
    count_words,
    draw_think_ns,
    is_conversation,
)
from agent.prompts import PromptSourceError, shared_prefix
from agent.sample import RequestSample
from agent.scheduler import ClosedLoopSchedule, OpenLoopSchedule
from common.proto.loadtest.v1 import run_pb2
from common.tokenizer import Tokenizer
from tests.tokenizers_fixture import build_bpe_tokenizer

pytestmark = pytest.mark.timeout(30)

OK = run_pb2.REQUEST_STATUS_OK


def workload(turns: int = 3, seed: int = 7, system: int = 0, think_s: float = 0.0) -> run_pb2.Workload:
    w = run_pb2.Workload(seed=seed)
    w.conversation.turns.fixed = turns
    w.conversation.input_tokens.fixed = 20
    w.conversation.output_tokens.fixed = 9
    w.conversation.system_prompt_tokens = system
    if think_s:
        w.think_time.fixed.FromNanoseconds(int(think_s * 1e9))
    return w


@dataclass
class Sent:
    scheduled_ns: int
    warmup: bool
    session_id: int
    turn_index: int
    last_turn: bool
    messages: list[dict[str, str]]
    input_tokens: int
    max_tokens: int
    sample: RequestSample


@dataclass
class FakeServer:
    """Answers every turn with a reply naming its session and turn (a unit-test stand-in for
    the assignment's request path); `fail` turns get an HTTP error status."""

    fail: set[tuple[int, int]] = field(default_factory=set)
    latency_s: float = 0.0
    sent: list[Sent] = field(default_factory=list)
    abandoned: list[tuple[int, bool, int]] = field(default_factory=list)
    in_progress: int = 0
    most_in_progress: int = 0

    async def send(self, scheduled_ns: int, warmup: bool, turn: TurnRequest) -> RequestSample:
        sample = RequestSample(scheduled_ns=scheduled_ns, warmup=warmup, sent_ns=time.perf_counter_ns())
        sample.session_id, sample.turn_index, sample.last_turn = turn.session_id, turn.turn_index, turn.last_turn
        sample.answer_chunks = []
        messages = [dict(m) for m in turn.prompt.messages or ()]  # as sent: copied now
        self.sent.append(
            Sent(
                scheduled_ns,
                warmup,
                turn.session_id,
                turn.turn_index,
                turn.last_turn,
                messages,
                turn.prompt.input_tokens,
                turn.prompt.max_tokens,
                sample,
            )
        )
        await asyncio.sleep(self.latency_s)
        if (turn.session_id, turn.turn_index) in self.fail:
            sample.status = run_pb2.REQUEST_STATUS_HTTP_5XX
        else:
            sample.answer_chunks += [" reply", f" s{turn.session_id}", f" t{turn.turn_index}"]
            sample.status = OK
        sample.done_ns = time.perf_counter_ns()
        return sample

    def abandon(self, scheduled_ns: int, warmup: bool, session_id: int) -> None:
        self.abandoned.append((scheduled_ns, warmup, session_id))


def closed_load(concurrency: int, requests: int = 0, duration_s: float | None = None) -> ConversationLoad:
    sessions = ClosedLoopSchedule(concurrency=concurrency, duration_s=duration_s)
    return ConversationLoad(sessions, TurnGate(duration_s=duration_s, max_requests=requests))


async def test_each_turn_carries_the_history_with_the_replies() -> None:
    server = FakeServer()
    engine = ConversationEngine(SyntheticConversations(workload(turns=3, system=5)), server.send, server.abandon)
    await engine.run(closed_load(1, requests=3))
    assert [(s.session_id, s.turn_index, s.last_turn) for s in server.sent] == [
        (1, 1, False),
        (1, 2, False),
        (1, 3, True),
    ]
    first, second, third = (s.messages for s in server.sent)
    system = {"role": "system", "content": shared_prefix(5)}
    assert first[0] == system and second[0] == system and third[0] == system
    assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant", "user"]
    # The history is the earlier turns' own prompts and the server's actual replies.
    assert third[:4] == second
    assert second[:2] == first
    assert third[2]["content"] == " reply s1 t1" and third[4]["content"] == " reply s1 t2"
    users = [m["content"] for m in third if m["role"] == "user"]
    assert len(set(users)) == 3 and all(count_words(u) == 20 for u in users)
    # The requested input is the whole prompt: system + users + replies (3 words each).
    assert [s.input_tokens for s in server.sent] == [5 + 20, 5 + 20 + 3 + 20, 5 + 2 * (20 + 3) + 20]
    assert all(s.max_tokens == 9 for s in server.sent)
    assert sum(count_words(m["content"]) for m in third) == server.sent[2].input_tokens


async def test_closed_loop_replaces_finished_sessions_and_counts_turns() -> None:
    server = FakeServer(latency_s=0.001)
    engine = ConversationEngine(SyntheticConversations(workload(turns=3)), server.send, server.abandon)
    await engine.run(closed_load(4, requests=25))
    assert len(server.sent) == 25  # the budget counts turns, not sessions
    sessions = {s.session_id for s in server.sent}
    assert sessions == set(range(1, max(sessions) + 1)) and len(sessions) > 4  # replaced
    # 25 turns of 3-turn sessions: 8 whole sessions at most and at least one cut short.
    per_session = {sid: [s.turn_index for s in server.sent if s.session_id == sid] for sid in sessions}
    assert all(turns == list(range(1, len(turns) + 1)) for turns in per_session.values())
    cut = [sid for sid, turns in per_session.items() if len(turns) < 3]
    assert cut and all(not s.last_turn for s in server.sent if s.session_id in cut)
    assert engine.sessions_in_progress == 0


async def test_a_failed_turn_ends_its_session() -> None:
    server = FakeServer(fail={(1, 2)})
    engine = ConversationEngine(SyntheticConversations(workload(turns=4)), server.send, server.abandon)
    await engine.run(closed_load(1, requests=6))
    turns = [(s.session_id, s.turn_index) for s in server.sent]
    assert turns == [(1, 1), (1, 2), (2, 1), (2, 2), (2, 3), (2, 4)]
    assert not server.sent[1].last_turn and server.sent[5].last_turn


async def test_think_time_separates_the_turns() -> None:
    server = FakeServer()
    engine = ConversationEngine(SyntheticConversations(workload(turns=3, think_s=0.05)), server.send, server.abandon)
    await engine.run(closed_load(1, requests=3))
    for before, after in zip(server.sent, server.sent[1:], strict=False):
        # Due exactly at the reply's end plus the think time; sent no earlier.
        assert after.scheduled_ns == before.sample.done_ns + 50_000_000
        assert after.sample.sent_ns >= after.scheduled_ns


async def test_no_turn_starts_after_the_stage_ends() -> None:
    server = FakeServer()
    engine = ConversationEngine(SyntheticConversations(workload(turns=3, think_s=1.0)), server.send, server.abandon)
    started = time.perf_counter_ns()
    await engine.run(closed_load(2, duration_s=1.5))
    elapsed_s = (time.perf_counter_ns() - started) / 1e9
    # Turn 1 at 0, turn 2 at ~1 s, turn 3 would be due at ~2 s: past the end, not sent.
    # The sessions stay in progress (thinking) until the end: none is replaced by a new one,
    # and nobody waits for the think time past the end.
    assert sorted((s.session_id, s.turn_index) for s in server.sent) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert not any(s.last_turn for s in server.sent)
    assert 1.5 <= elapsed_s < 2.0


async def test_budget_used_up_during_a_think_time_ends_the_stage_at_once() -> None:
    server = FakeServer()
    engine = ConversationEngine(SyntheticConversations(workload(turns=3, think_s=5.0)), server.send, server.abandon)
    started = time.perf_counter_ns()
    await engine.run(closed_load(3, requests=3))
    assert len(server.sent) == 3 and {s.turn_index for s in server.sent} == {1}
    assert (time.perf_counter_ns() - started) / 1e9 < 4.0  # nobody sat out the 5 s think time


async def test_open_loop_starts_sessions_at_the_rate_and_caps_them() -> None:
    stage = run_pb2.Stage(request_rate=200.0, max_concurrency=2, arrival=run_pb2.ARRIVAL_PROCESS_CONSTANT, requests=12)
    load = conversation_load(stage, seed=1)
    assert isinstance(load.sessions, OpenLoopSchedule)
    server = FakeServer(latency_s=0.01)
    original = server.send

    async def counting(scheduled_ns: int, warmup: bool, turn: TurnRequest) -> RequestSample:
        server.in_progress = engine.sessions_in_progress
        server.most_in_progress = max(server.most_in_progress, server.in_progress)
        return await original(scheduled_ns, warmup, turn)

    engine = ConversationEngine(SyntheticConversations(workload(turns=3)), counting, server.abandon)
    await engine.run(load)
    assert len(server.sent) == 12
    assert server.most_in_progress == 2  # the cap holds sessions, not requests


def test_warmup_counts_turns() -> None:
    stage = run_pb2.Stage(concurrency=2, requests=10, warmup_requests=4)
    load = conversation_load(stage)
    assert isinstance(load.sessions, ClosedLoopSchedule)
    assert load.sessions.max_requests == 0 and load.concurrency == 2  # the turns are the gate's
    load.gate.start(0)
    flags = [load.gate.admit(i) for i in range(11)]
    assert flags == [True] * 4 + [False] * 6 + [None]
    assert load.gate.stop.is_set()


def test_turn_counts_follow_the_distribution() -> None:
    w = workload()
    w.conversation.turns.ClearField("fixed")
    w.conversation.turns.uniform.min, w.conversation.turns.uniform.max = 2, 5
    source = SyntheticConversations(w)
    counts = [len(source.next_session().turns) for _ in range(400)]
    assert set(counts) == {2, 3, 4, 5}
    assert abs(statistics.mean(counts) - 3.5) < 0.25
    default = run_pb2.Workload(seed=1)
    default.conversation.SetInParent()
    plans = [SyntheticConversations(default).next_session() for _ in range(3)]
    assert all(len(p.turns) == 3 for p in plans)  # default: fixed 3
    assert all(t.tokens == 128 and t.max_tokens == 128 for p in plans for t in p.turns)


def test_think_times_are_drawn_per_turn() -> None:
    rng = random.Random(3)
    fixed = run_pb2.DurationDistribution()
    fixed.fixed.FromMilliseconds(1500)
    assert draw_think_ns(rng, fixed) == 1_500_000_000
    assert draw_think_ns(rng, run_pb2.DurationDistribution()) == 0
    uniform = run_pb2.DurationDistribution()
    uniform.uniform.min.FromSeconds(1)
    uniform.uniform.max.FromSeconds(3)
    draws = [draw_think_ns(rng, uniform) / 1e9 for _ in range(2000)]
    assert min(draws) >= 1 and max(draws) <= 3 and abs(statistics.mean(draws) - 2) < 0.1
    exponential = run_pb2.DurationDistribution()
    exponential.exponential_mean.FromSeconds(2)
    draws = [draw_think_ns(rng, exponential) / 1e9 for _ in range(4000)]
    assert abs(statistics.mean(draws) - 2) < 0.15 and abs(statistics.stdev(draws) - 2) < 0.25
    w = workload(turns=4)
    w.think_time.CopyFrom(uniform)
    thinks = [t.think_ns for t in SyntheticConversations(w).next_session().turns]
    assert len(set(thinks)) == 4 and all(1e9 <= t <= 3e9 for t in thinks)


def test_sessions_are_reproducible_from_the_seed() -> None:
    w = workload(turns=2, system=4)
    w.conversation.turns.ClearField("fixed")
    w.conversation.turns.uniform.min, w.conversation.turns.uniform.max = 1, 6
    w.think_time.exponential_mean.FromSeconds(1)
    one, two = SyntheticConversations(w), SyntheticConversations(w)
    plans = [one.next_session() for _ in range(20)]
    assert plans == [two.next_session() for _ in range(20)]
    w.seed += 1
    assert plans != [SyntheticConversations(w).next_session() for _ in range(20)]
    texts = [t.text for p in plans for t in p.turns]
    assert len(set(texts)) == len(texts)  # every turn's prompt is unique


def test_dataset_entries_replay_every_user_turn() -> None:
    def entry(*messages: tuple[str, str], max_tokens: int = 0) -> run_pb2.DatasetEntry:
        return run_pb2.DatasetEntry(
            messages=[run_pb2.ChatMessage(role=r, content=c) for r, c in messages], max_tokens=max_tokens
        )

    entries = [
        entry(("system", "be brief"), ("user", "hello there"), ("assistant", "a b c d"), ("user", "and then")),
        entry(("user", "one"), ("assistant", "x y"), ("user", "two"), ("assistant", "x y z"), max_tokens=50),
        run_pb2.DatasetEntry(prompt="just a prompt", max_tokens=7),
    ]
    w = run_pb2.Workload(seed=5)
    w.dataset.all_turns = True
    w.think_time.fixed.FromSeconds(1)
    assert is_conversation(w)
    source = DatasetConversations(entries, w)
    plans = {p.turns[0].text: p for p in (source.next_session() for _ in range(3))}
    first = plans["hello there"]
    assert first.preamble == ({"role": "system", "content": "be brief"},) and first.preamble_tokens == 2
    assert [(t.text, t.max_tokens, t.tokens) for t in first.turns] == [("hello there", 4, 2), ("and then", 128, 2)]
    assert [(t.text, t.max_tokens) for t in plans["one"].turns] == [("one", 2), ("two", 3)]
    assert [(t.text, t.max_tokens) for t in plans["just a prompt"].turns] == [("just a prompt", 7)]
    assert all(t.think_ns == 1_000_000_000 for p in plans.values() for t in p.turns)


async def test_dataset_sessions_send_the_servers_replies() -> None:
    entry = run_pb2.DatasetEntry(
        messages=[
            run_pb2.ChatMessage(role="user", content="first question"),
            run_pb2.ChatMessage(role="assistant", content="the dataset's own answer"),
            run_pb2.ChatMessage(role="user", content="second question"),
        ]
    )
    w = run_pb2.Workload(seed=2)
    w.dataset.all_turns = True
    server = FakeServer()
    engine = ConversationEngine(DatasetConversations([entry], w), server.send, server.abandon)
    await engine.run(closed_load(1, requests=2))
    assert server.sent[1].messages == [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": " reply s1 t1"},
        {"role": "user", "content": "second question"},
    ]
    assert server.sent[0].max_tokens == 4 and server.sent[1].input_tokens == 2 + 3 + 2


def test_sources_refuse_what_they_cannot_run() -> None:
    chat = run_pb2.Target(api_kind=run_pb2.API_KIND_CHAT)
    completions = run_pb2.Target(api_kind=run_pb2.API_KIND_COMPLETIONS)
    with pytest.raises(PromptSourceError, match="chat API"):
        conversation_source(workload(), completions)
    assert isinstance(conversation_source(workload(), chat), SyntheticConversations)
    w = run_pb2.Workload()
    w.dataset.all_turns = True
    with pytest.raises(PromptSourceError, match="user turn"):
        conversation_source(w, chat, [run_pb2.DatasetEntry(messages=[run_pb2.ChatMessage(role="system", content="x")])])
    assert not is_conversation(run_pb2.Workload())


async def test_open_loop_stops_dispatching_once_the_budget_is_used_up() -> None:
    # Session arrivals at 0, 4 s and 8 s; the first session's 3 turns use the whole budget.
    stage = run_pb2.Stage(request_rate=0.25, arrival=run_pb2.ARRIVAL_PROCESS_CONSTANT, requests=3)
    server = FakeServer()
    engine = ConversationEngine(SyntheticConversations(workload(turns=3)), server.send, server.abandon)
    started = time.perf_counter_ns()
    await engine.run(conversation_load(stage))
    assert [(s.session_id, s.turn_index) for s in server.sent] == [(1, 1), (1, 2), (1, 3)]
    assert engine.sessions_started == 1 and not server.abandoned
    assert (time.perf_counter_ns() - started) / 1e9 < 3.0  # not waiting for the arrival at 4 s


async def test_with_a_tokenizer_the_prompts_are_exact_and_the_history_counted_in_its_tokens(tmp_path: Path) -> None:
    # The fixture's small BPE makes most words several tokens: word counts would be far off.
    tokenizer = Tokenizer.from_path(build_bpe_tokenizer(tmp_path / "tokenizer.json"))
    w = workload(turns=3, system=30)
    w.conversation.input_tokens.fixed = 25
    server = FakeServer()
    source = conversation_source(w, run_pb2.Target(), tokenizer=tokenizer)
    engine = ConversationEngine(source, server.send, server.abandon, tokenizer.count)
    await engine.run(closed_load(1, requests=3))
    third = server.sent[2].messages
    assert third[0]["role"] == "system" and tokenizer.count(third[0]["content"]) == 30
    users = [m["content"] for m in third if m["role"] == "user"]
    assert len(set(users)) == 3 and [tokenizer.count(u) for u in users] == [25, 25, 25]
    # The same system prompt in every session (and in a new source: a fixed seed).
    again = conversation_source(workload(seed=99, system=30), run_pb2.Target(), tokenizer=tokenizer)
    assert again.next_session().preamble[0]["content"] == third[0]["content"]
    # The requested input: every message's content counted with the tokenizer.
    assert [s.input_tokens for s in server.sent] == [
        sum(tokenizer.count(m["content"]) for m in s.messages) for s in server.sent
    ]
    # Dataset turns are counted with it too.
    d = run_pb2.Workload(seed=5)
    d.dataset.all_turns = True
    entry = run_pb2.DatasetEntry(messages=[run_pb2.ChatMessage(role="user", content="Serving engines are tuned")])
    (turn,) = conversation_source(d, run_pb2.Target(), [entry], tokenizer).next_session().turns
    assert turn.tokens == tokenizer.count("Serving engines are tuned") != count_words("Serving engines are tuned")


def test_with_a_tokenizer_turns_and_the_system_prompt_are_exact(tmp_path: Path) -> None:
    from common.tokenizer import Tokenizer
    from tests.tokenizers_fixture import build_bpe_tokenizer

    tok = Tokenizer.from_path(build_bpe_tokenizer(tmp_path / "tokenizer.json"))
    w = workload(system=30)
    source = conversation_source(w, run_pb2.Target(), (), tok)
    for _ in range(3):
        plan = source.next_session()
        (system,) = plan.preamble
        assert tok.count(system["content"]) == plan.preamble_tokens == 30
        assert all(tok.count(t.text) == t.tokens == 20 for t in plan.turns)
    # Without it: words, as before.
    plain = conversation_source(w, run_pb2.Target()).next_session()
    assert plain.preamble[0]["content"] == shared_prefix(30)
    assert all(len(t.text.split()) == t.tokens == 20 for t in plain.turns)
    # Dataset conversations count their texts with it too.
    entry = run_pb2.DatasetEntry(messages=[run_pb2.ChatMessage(role="user", content="information theory")])
    w.dataset.all_turns = True
    (turn,) = conversation_source(w, run_pb2.Target(), [entry], tok).next_session().turns
    assert turn.tokens == tok.count("information theory") != 2
