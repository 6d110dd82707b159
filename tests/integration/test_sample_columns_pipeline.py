"""The reasoning, prefix-cache and conversation columns from end to end without a network:
RequestSamples -> the agent's SampleBatcher -> SampleBatch (serialized and parsed, as on the
wire) -> ingest's checks -> a real SQLite file (and the memory store) -> the run's result.
Two agents number their sessions alike: sessions are keyed per assignment."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from agent.batcher import SampleBatcher
from agent.sample import ClockAnchor, RequestSample
from common.codes import RunState
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.results import provider
from controller.domain.results.ingest import IngestTarget, to_ingest
from controller.store.database import Database
from controller.store.interface import Store
from controller.store.memory import MemoryStore
from controller.store.sqlite import SqliteStore
from tests.unit.store.test_store_contract import new_assignment, new_run

pytestmark = pytest.mark.timeout(60)

S, MS = 1_000_000_000, 1_000_000
T0 = 1_700_000_000 * S
ANCHOR = ClockAnchor(unix_ns=T0, perf_ns=0)  # perf time t is wall clock T0 + t
OK = run_pb2.REQUEST_STATUS_OK


@pytest.fixture(params=["sqlite", "memory"])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Store]:
    if request.param == "memory":
        yield MemoryStore()
        return
    db = Database(tmp_path / "store.db")
    db.migrate()
    try:
        yield SqliteStore(db)
    finally:
        db.close()


def turn(session: int, index: int, sent_s: float, *, last: bool = False, ok: bool = True) -> RequestSample:
    """A reasoning turn: reasoning at 20 ms, answer at 120 ms, done at 200 ms; 100 prompt
    tokens a turn of history, half of them cached from turn 2 on."""
    sent = 2 * S + int(sent_s * S)
    sample = RequestSample(
        scheduled_ns=sent,
        sent_ns=sent,
        first_byte_ns=sent + 10 * MS,
        first_token_ns=sent + 20 * MS,
        first_reasoning_ns=sent + 20 * MS,
        first_answer_ns=sent + 120 * MS,
        last_token_ns=sent + 190 * MS,
        done_ns=sent + 200 * MS,
        prompt_tokens=100 * index,
        output_tokens=30,
        reasoning_tokens=10,
        usage_from_server=True,
        cached_prompt_tokens=50 * index if index > 1 else 0,
        cached_reported=True,
        session_id=session,
        turn_index=index,
        last_turn=last,
        status=OK,
    )
    if not ok:
        sample.fail(run_pb2.REQUEST_STATUS_HTTP_5XX, "HTTP 500")
    return sample


def conversations(offset_s: float) -> list[RequestSample]:
    return [
        # Session 1: three turns, all OK: complete, 2 s + 200 ms.
        turn(1, 1, offset_s),
        turn(1, 2, offset_s + 1),
        turn(1, 3, offset_s + 2, last=True),
        # Session 2: its second (last) turn failed.
        turn(2, 1, offset_s),
        turn(2, 2, offset_s + 1, last=True, ok=False),
        # Session 3: never reached its last turn in the stage.
        turn(3, 1, offset_s + 0.5),
    ]


def wire(samples: list[RequestSample]) -> agent_service_pb2.SampleBatch:
    batches: list[agent_service_pb2.SampleBatch] = []
    batcher = SampleBatcher("asg", batches.append, anchor=ANCHOR)
    for s in samples:
        batcher.add(s)
    batcher.flush()
    (batch,) = batches
    return agent_service_pb2.SampleBatch.FromString(batch.SerializeToString())


async def test_conversation_and_reasoning_columns_reach_the_result(store: Store) -> None:
    spec = run_pb2.RunSpec()
    spec.target.model = "m"
    spec.stages.add(name="chat", concurrency=3).duration.FromSeconds(10)
    run = await new_run(store, spec_pb=spec.SerializeToString(), stages=["chat"])
    await store.update_run(run.pk, state=RunState.RUNNING, started_at=T0)
    for agent, offset in (("agent-a", 0.0), ("agent-b", 0.25)):
        pk = await new_assignment(store, run.pk, f"asg_{agent}", agent=agent)
        target = IngestTarget(pk, run.pk, "run_a", 0, T0, None, 0)
        ingest = to_ingest(target, wire(conversations(offset)), T0 + 60 * S)
        await store.ingest_batches([ingest])
    await store.finish_run(run.pk, RunState.SUCCEEDED, "", T0 + 20 * S)
    computed = await store.read_snapshot(provider.compute_result, run.pk, "run_a", spec, RunState.SUCCEEDED)
    (stage,) = computed.message.stages

    assert (stage.requests_ok, stage.requests_failed) == (10, 2)
    # Per agent session 1 completed; ids repeat across agents but the sessions are distinct.
    assert stage.sessions_completed == 2
    assert stage.session_duration.count == 2
    assert stage.session_duration.min_ms == pytest.approx(2200.0)
    assert stage.session_duration.max_ms == pytest.approx(2200.0)
    assert [a.sessions_completed for a in stage.agents] == [1, 1]
    assert computed.message.overall.sessions_completed == 2

    assert [(t.turn, t.requests_ok, t.requests_failed) for t in stage.turns] == [(1, 6, 0), (2, 2, 2), (3, 2, 0)]
    assert [t.mean_input_tokens for t in stage.turns] == [100.0, 200.0, 300.0]
    assert [t.prefix_cache_hit_percent for t in stage.turns] == [0.0, 50.0, 50.0]
    assert stage.turns[0].ttft.mean_ms == pytest.approx(20.0)

    assert stage.reasoning_tokens == 100 and stage.mean_reasoning_tokens == pytest.approx(10.0)
    assert stage.mean_answer_tokens == pytest.approx(20.0)
    assert stage.ttfr.count == 10 and stage.ttfr.mean_ms == pytest.approx(20.0)
    assert stage.ttfo.count == 10 and stage.ttfo.mean_ms == pytest.approx(120.0)
    # Cached over prompt tokens of the OK requests: turns 2-3 cache half, turn 1 nothing.
    ok_prompt = 6 * 100 + 2 * 200 + 2 * 300
    ok_cached = 2 * 100 + 2 * 150
    assert stage.cached_prompt_tokens == ok_cached
    assert stage.prefix_cache_hit_percent == pytest.approx(100 * ok_cached / ok_prompt)
