"""Conversations through the whole stack: controller, agent, the mock server, SQLite.

The mock's request bodies are observed by an aiohttp middleware added to the real mock (it
only records what arrives); the mock's replies are its known text (`output_text`), which
depends on each turn's max_tokens, so a body carrying the right replies proves that the
agent put the server's own answers into the history.
"""

from __future__ import annotations

import itertools
import json
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest
from aiohttp import web

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from controller.store import repository as repo
from mockserver.config import MockConfig
from mockserver.generation import output_text
from mockserver.server import MockServer
from tests.integration.test_run_end_to_end import running_agent, wait_final

pytestmark = pytest.mark.timeout(120)

TTFT_MS, ITL_MS = 20, 2


@dataclass
class Seen:
    """One chat request as the mock received it, and when (perf_counter_ns) it arrived and
    its handler returned."""

    body: dict[str, Any]
    arrived_ns: int
    ended_ns: int = 0

    @property
    def messages(self) -> list[dict[str, str]]:
        return list(self.body["messages"])


def recording(mock: MockServer) -> list[Seen]:
    """Record every chat completion request the mock receives."""
    seen: list[Seen] = []

    @web.middleware
    async def record(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> Any:
        if not request.path.endswith("/chat/completions"):
            return await handler(request)
        entry = Seen(json.loads(await request.read()), time.perf_counter_ns())
        seen.append(entry)
        try:
            return await handler(request)
        finally:
            entry.ended_ns = time.perf_counter_ns()

    mock.app.middlewares.append(record)
    return seen


def conversation_spec(mock: MockServer, concurrency: int, requests: int, think_s: float) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(display_name="conversations")
    spec.target.base_url = mock.base_url
    spec.target.model = "mock"
    c = spec.workload.conversation
    c.turns.fixed = 3
    c.input_tokens.fixed = 16
    c.output_tokens.uniform.min, c.output_tokens.uniform.max = 3, 12
    c.system_prompt_tokens = 10
    spec.workload.think_time.fixed.FromNanoseconds(int(think_s * 1e9))
    spec.stages.add(concurrency=concurrency, requests=requests)
    return spec


def sessions_of(seen: list[Seen]) -> dict[str, list[Seen]]:
    """The conversation requests grouped by session (its first user prompt is unique), each
    session's turns in order (turn k has 2k messages: system, k users, k-1 replies)."""
    sessions: dict[str, list[Seen]] = defaultdict(list)
    for s in seen:
        if s.messages[0]["role"] == "system":  # not the preflight request
            sessions[s.messages[1]["content"]].append(s)
    for turns in sessions.values():
        turns.sort(key=lambda s: len(s.messages))
    return dict(sessions)


def words(messages: list[dict[str, str]]) -> int:
    return sum(len(m["content"].split()) for m in messages)


async def test_turns_carry_the_history_and_the_servers_replies(
    controller: Controller, client: ControllerClient
) -> None:
    concurrency, requests, think_s = 3, 21, 0.25
    mock = MockServer(MockConfig(ttft_ms=TTFT_MS, itl_ms=ITL_MS, output_tokens=100))
    seen = recording(mock)  # before the mock starts: its middlewares are then frozen
    async with mock, running_agent(f"127.0.0.1:{controller.port}"):
        run = await client.create_run(conversation_spec(mock, concurrency, requests, think_s))
        final = await wait_final(client, run.id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        result = await client.get_result(run.id)
    sessions = sessions_of(seen)
    turns = [t for session in sessions.values() for t in session]
    assert len(turns) == requests == result.stages[0].requests_ok  # the budget counts turns
    # Sessions cut short by the end of the budget are the ones begun last: at most one per
    # session slot.
    assert len(sessions) >= requests // 3 and sum(len(s) == 3 for s in sessions.values()) >= requests // 3 - concurrency
    system = {s[0].messages[0]["content"] for s in sessions.values()}
    assert len(system) == 1 and len(next(iter(system)).split()) == 10  # the same system prompt everywhere
    for session in sessions.values():
        assert [len(t.messages) for t in session] == [2, 4, 6][: len(session)]
        for before, after in itertools.pairwise(session):
            k = len(before.messages)
            # The history as sent before, then the mock's actual reply to it, then a new prompt.
            assert after.messages[:k] == before.messages
            assert after.messages[k] == {"role": "assistant", "content": output_text(before.body["max_tokens"])}
            assert after.messages[k + 1]["role"] == "user" and len(after.messages[k + 1]["content"].split()) == 16
            # Think time: the next turn arrives no sooner than the reply's shortest possible
            # time (the mock's latency) plus the think time after it.
            least_ns = (TTFT_MS + ITL_MS * (before.body["max_tokens"] - 1)) / 1e3 + think_s
            assert after.arrived_ns - before.arrived_ns >= least_ns * 1e9
    users = [m["content"] for t in turns for m in t.messages[-1:]]
    assert len(set(users)) == len(users)  # every turn's prompt is new
    # What the agent requested as input is the whole history, counted as the mock counts it.
    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    stored = await controller.db.read(repo.load_stage_samples, record.pk, 0)
    assert sorted(stored.columns.prompt_tokens.tolist()) == sorted(words(t.messages) for t in turns)
    assert np.array_equal(stored.requested_input_tokens, stored.columns.prompt_tokens)
    assert stored.columns.prompt_tokens.max() > 2 * stored.columns.prompt_tokens.min()  # the history grows


async def test_closed_loop_keeps_concurrency_sessions_in_progress(
    controller: Controller, client: ControllerClient
) -> None:
    concurrency, think_s = 4, 0.2
    mock = MockServer(MockConfig(ttft_ms=TTFT_MS, itl_ms=ITL_MS, output_tokens=100))
    seen = recording(mock)  # before the mock starts: its middlewares are then frozen
    async with mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = conversation_spec(mock, concurrency, 0, think_s)
        spec.stages[0].duration.FromSeconds(3)
        final = await wait_final(client, (await client.create_run(spec)).id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    sessions = sessions_of(seen)
    # A session is in progress from its first request's arrival to its last reply's end.
    spans = [(s[0].arrived_ns, s[-1].ended_ns) for s in sessions.values()]
    assert len(spans) > 2 * concurrency  # finished sessions were replaced
    edges = sorted([(a, 1) for a, _ in spans] + [(e, -1) for _, e in spans])
    level, most, weighted = 0, 0, 0.0
    window = (min(a for a, _ in spans), max(a for a, _ in spans))  # up to the last session start
    for (t, step), (t_next, _) in itertools.pairwise(edges):
        level += step
        most = max(most, level)
        lo, hi = max(t, window[0]), min(t_next, window[1])
        if hi > lo:
            weighted += level * (hi - lo)
    mean = weighted / (window[1] - window[0])
    assert most == concurrency
    # Between a session's end and its replacement's start only the agent's own turnaround.
    assert mean >= 0.85 * concurrency, mean


async def test_dataset_all_turns_replays_each_user_turn(controller: Controller, client: ControllerClient) -> None:
    chats = [
        {
            "messages": [
                {"role": "system", "content": "you are terse"},
                {"role": "user", "content": f"conversation {i} first question"},
                {"role": "assistant", "content": "one two three four five"},
                {"role": "user", "content": f"conversation {i} second question"},
                {"role": "assistant", "content": "a b c"},
            ]
        }
        for i in range(3)
    ]
    mock = MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=100))
    seen = recording(mock)  # before the mock starts: its middlewares are then frozen
    async with mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = run_pb2.RunSpec()
        spec.target.base_url, spec.target.model = mock.base_url, "mock"
        spec.workload.dataset.format = run_pb2.DATASET_FORMAT_JSONL
        spec.workload.dataset.content = "\n".join(json.dumps(c) for c in chats)
        spec.workload.dataset.all_turns = True
        spec.stages.add(concurrency=1, requests=6)  # each entry once: 3 sessions of 2 turns
        final = await wait_final(client, (await client.create_run(spec)).id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    sessions = sessions_of(seen)
    assert sorted(sessions) == [f"conversation {i} first question" for i in range(3)]
    for first, second in sessions.values():
        assert first.body["max_tokens"] == 5 and second.body["max_tokens"] == 3  # the dataset's reply lengths
        assert second.messages[:2] == first.messages
        # The mock's reply, not the dataset's, in the history.
        assert second.messages[2] == {"role": "assistant", "content": output_text(5)}
        assert second.messages[3]["content"].endswith("second question")


async def test_open_loop_starts_sessions_at_the_rate(controller: Controller, client: ControllerClient) -> None:
    rate, seconds = 4.0, 2
    mock = MockServer(MockConfig(ttft_ms=TTFT_MS, itl_ms=ITL_MS, output_tokens=100))
    seen = recording(mock)
    async with mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = conversation_spec(mock, 1, 0, 0.1)
        spec.stages[0].request_rate = rate  # replaces the concurrency (one oneof)
        spec.stages[0].arrival = run_pb2.ARRIVAL_PROCESS_CONSTANT
        spec.stages[0].duration.FromSeconds(seconds)
        final = await wait_final(client, (await client.create_run(spec)).id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    sessions = sessions_of(seen)
    # Constant arrivals: exactly rate x duration session starts, each then running its turns.
    assert len(sessions) == rate * seconds
    starts = sorted(s[0].arrived_ns for s in sessions.values())
    assert (starts[-1] - starts[0]) / 1e9 == pytest.approx((rate * seconds - 1) / rate, abs=0.2)
    assert max(len(s) for s in sessions.values()) == 3  # sessions run several turns each


async def test_non_streaming_turns_carry_the_replies(controller: Controller, client: ControllerClient) -> None:
    mock = MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=100))
    seen = recording(mock)
    async with mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = conversation_spec(mock, 1, 3, 0.0)
        spec.target.stream = False
        final = await wait_final(client, (await client.create_run(spec)).id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    (session,) = sessions_of(seen).values()
    assert [len(t.messages) for t in session] == [2, 4, 6]
    for before, after in itertools.pairwise(session):
        assert after.messages[len(before.messages)]["content"] == output_text(before.body["max_tokens"])
