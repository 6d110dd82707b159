"""RunCoordinator without a network, on the in-memory store and on SQLite: placement, stages,
agent loss, rejoin, takeover, cancel and acks, with the agents' side played by the controller's own AgentSession.

Each fake agent is what the AgentService servicer makes of a stream: a session whose outbox
the test reads (the servicer would write it to the stream) and the coordinator calls the
servicer makes for Hello, heartbeats, updates and committed batches.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Mapping
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from common.codes import RunState
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.execution.agents import MIN_CLOCK_SAMPLES, AgentHealthReport, AgentSession
from controller.domain.execution.coordinator import RunCoordinator
from controller.domain.execution.loss import MAX_RESUME_CLAIMS, AssignmentRefused
from controller.domain.execution.state import ASSIGNMENT_LOST, AssignmentPhase
from controller.domain.results.live import RunHub
from controller.domain.spec import parse_spec, validate_and_default
from controller.store import repository as repo
from controller.store.database import Database
from controller.store.interface import Store
from controller.store.memory import MemoryStore
from controller.store.sqlite import SqliteStore
from tests.conftest import eventually

pytestmark = pytest.mark.timeout(60)

ConnectResponse = agent_service_pb2.ConnectResponse
RUNNING = agent_service_pb2.ASSIGNMENT_STATE_RUNNING
COMPLETED = agent_service_pb2.ASSIGNMENT_STATE_COMPLETED
CANCELLED = agent_service_pb2.ASSIGNMENT_STATE_CANCELLED
_session_ids = itertools.count()


@pytest.fixture(params=["memory", "sqlite"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    """The coordinator over the in-memory store, and over SQLite on a real file: the same
    behaviour from both."""
    if request.param == "memory":
        yield MemoryStore()
        return
    database = Database(tmp_path / "runs.db", read_workers=1)
    database.migrate()
    yield SqliteStore(database)
    database.close()


class Finals:
    """The runs whose final state the coordinator committed (its `on_run_final`)."""

    def __init__(self) -> None:
        self.run_ids: list[str] = []
        self._changed = asyncio.Event()

    def __call__(self, run_id: str) -> None:
        self.run_ids.append(run_id)
        self._changed.set()

    async def wait(self, run_id: str, timeout_s: float = 20.0) -> None:
        async with asyncio.timeout(timeout_s):
            while run_id not in self.run_ids:
                self._changed.clear()
                await self._changed.wait()


@contextlib.asynccontextmanager
async def coordinator(
    store: Store, *, heartbeat_interval_s: float = 30.0, lost_grace_s: float = 30.0
) -> AsyncIterator[tuple[RunCoordinator, Finals]]:
    finals = Finals()
    c = RunCoordinator(
        store, RunHub(), heartbeat_interval_s=heartbeat_interval_s, lost_grace_s=lost_grace_s, on_run_final=finals
    )
    await c.start()
    try:
        yield c, finals
    finally:
        await c.stop(timeout_s=1.0)


class FakeAgent:
    """One agent stream as the servicer feeds the coordinator."""

    def __init__(self, c: RunCoordinator, name: str) -> None:
        self.c = c
        self.name = name
        self.session = self._new_session()
        self._unread: list[ConnectResponse] = []

    def _new_session(self) -> AgentSession:
        return AgentSession(f"ses_{self.name}_{next(_session_ids)}", self.name, {}, "test", time.time_ns())

    async def connect(self, resume: Mapping[str, str] | None = None) -> None:
        """Hello (claiming `resume`: assignment id -> resume token), then the quick burst of
        heartbeats that makes the clock estimate ready (offset 0)."""
        claims = dict(resume or {})
        self.session.owned = await self.c.prove_resume(list(claims), claims)
        await self.c.agent_connected(self.session, list(claims))
        for _ in range(MIN_CLOCK_SAMPLES):
            now = time.time_ns()
            self.c.clock_sample(self.session, now, now, now, now)
        self.heartbeat()

    async def reconnect(self, resume: Mapping[str, str] | None = None) -> None:
        self.session = self._new_session()
        self._unread = []
        await self.connect(resume)

    async def disconnect(self) -> None:
        """The stream ends without a Goodbye."""
        await self.c.agent_disconnected(self.session)

    def heartbeat(self) -> None:
        self.c.heartbeat(self.session, AgentHealthReport(event_loop_lag_ms=1.0, cpu_percent=10.0))

    async def receive(self, kind: str, timeout_s: float = 10.0) -> ConnectResponse:
        """The next message of `kind` on the stream (others stay for later `receive`s)."""
        for i, message in enumerate(self._unread):
            if message.WhichOneof("body") == kind:
                return self._unread.pop(i)
        async with asyncio.timeout(timeout_s):
            while True:
                message = await self.session.outbox.get()
                if message is None:
                    raise AssertionError(f"{self.name}: stream closed ({self.session.close_reason})")
                if message.WhichOneof("body") == kind:
                    return message
                self._unread.append(message)

    async def assign(self) -> agent_service_pb2.Assign:
        return (await self.receive("assign")).assign

    def unread(self) -> list[str]:
        """The kinds of the messages sent to this agent and not `receive`d yet."""
        while not self.session.outbox.empty():
            message = self.session.outbox.get_nowait()
            if message is not None:
                self._unread.append(message)
        return [m.WhichOneof("body") for m in self._unread]

    async def update(self, assignment_id: str, *, requests_sent: int) -> None:
        """A progress update (the first one also says when the agent started)."""
        update = agent_service_pb2.AssignmentUpdate(
            assignment_id=assignment_id, state=RUNNING, requests_sent=requests_sent, start_unix_ns=time.time_ns()
        )
        await self.c.assignment_update(self.session, update)

    async def report(
        self, assignment_id: str, state: int, *, batch_count: int, requests_sent: int = 0, message: str = ""
    ) -> int:
        """The final report; returns the position its ack carries."""
        update = agent_service_pb2.AssignmentUpdate(
            assignment_id=assignment_id,
            state=state,
            requests_sent=requests_sent,
            batch_count=batch_count,
            message=message,
            start_unix_ns=time.time_ns(),
        )
        await self.c.assignment_update(self.session, update)
        ack = (await self.receive("ack")).ack
        assert ack.assignment_id == assignment_id
        return ack.batch_seq

    async def committed(self, assignment_id: str, batch_seq: int, *, new: bool = True) -> int:
        """The ingest writer committed one batch (an empty one: the coordinator only counts
        it); returns the ack the agent gets."""
        target = await self.c.resolve_batch(assignment_id)
        assert target is not None
        columns = np.zeros((len(repo.SAMPLE_COLUMNS), 0), dtype=np.int64)
        stored = repo.BatchIngest(target.assignment_pk, target.run_pk, target.stage_idx, batch_seq, columns, [], b"")
        self.c.batch_committed(self.session, target, assignment_id, batch_seq, repo.IngestOutcome(new, 0, 0, 0), stored)
        ack = (await self.receive("ack")).ack
        assert ack.assignment_id == assignment_id
        return ack.batch_seq


def make_spec(
    *,
    agents: int = 2,
    requests: int = 20,
    policy: int = run_pb2.AGENT_LOSS_POLICY_REDISTRIBUTE,
    wait_timeout_ns: int = 0,
) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(target=run_pb2.Target(base_url="http://127.0.0.1:9/v1", model="m"), skip_preflight=True)
    spec.placement.agents = agents
    spec.placement.on_agent_loss = policy  # type: ignore[assignment]
    if wait_timeout_ns:
        spec.placement.wait_timeout.FromNanoseconds(wait_timeout_ns)
    spec.stages.add(name="s0", concurrency=agents, requests=requests)
    return spec


async def create_run(store: Store, c: RunCoordinator, spec: run_pb2.RunSpec) -> repo.RunRecord:
    """As `Runs.create` stores a run: PENDING, then queued for placement."""
    valid = validate_and_default(spec)
    record, _ = await store.insert_run(
        f"run_{uuid.uuid4().hex[:20]}",
        None,
        valid.display_name,
        valid.target.model,
        json_format.MessageToJson(valid),
        [s.name for s in valid.stages],
        "",
        time.time_ns(),
        "",
        valid.SerializeToString(deterministic=True),
    )
    c.enqueue(record.run_id)
    return record


async def final_run(store: Store, finals: Finals, record: repo.RunRecord) -> repo.RunRecord:
    await finals.wait(record.run_id)
    stored = await store.get_run(record.run_id)
    assert stored is not None
    return stored


async def events(store: Store, record: repo.RunRecord) -> list[tuple[str, str]]:
    return [(e.kind, e.message) for e in await store.list_events(record.pk, 0)]


async def first_assigns(store: Store, record: repo.RunRecord, *agents: FakeAgent) -> list[agent_service_pb2.Assign]:
    """Each agent's Assign of the first stage, once the stage's start is recorded (its
    Assigns go out just before its `stage_started` event)."""
    assigns = [await agent.assign() for agent in agents]
    await eventually(lambda: events(store, record), lambda evs: "stage_started" in kinds(evs))
    return assigns


def kinds(evs: list[tuple[str, str]]) -> list[str]:
    return [kind for kind, _ in evs]


def phase(c: RunCoordinator, assignment_id: str) -> AssignmentPhase | None:
    """The assignment's phase while its stage runs (what the stage waits on)."""
    a = c._active.assignment(assignment_id)
    return a.phase if a is not None else None


async def test_a_stage_ends_once_every_announced_batch_is_committed(store: Store) -> None:
    async with coordinator(store) as (c, finals):
        a, b = FakeAgent(c, "a"), FakeAgent(c, "b")
        await a.connect()
        await b.connect()
        record = await create_run(store, c, make_spec(agents=2, requests=20))
        sent_before = time.time_ns()
        assign_a, assign_b = await first_assigns(store, record, a, b)

        # One share each, one common start in the future (offsets are 0), independent seeds.
        assert (assign_a.stage.concurrency, assign_a.stage.requests) == (1, 10)
        assert (assign_b.stage.concurrency, assign_b.stage.requests) == (1, 10)
        assert assign_a.start_unix_ns == assign_b.start_unix_ns > sent_before
        assert assign_a.workload.seed != assign_b.workload.seed
        assert not assign_a.takeover and assign_a.resume_token and assign_a.resume_token != assign_b.resume_token
        assert record.run_id in c.running_run_ids()

        await a.update(assign_a.assignment_id, requests_sent=4)
        assert phase(c, assign_a.assignment_id) is AssignmentPhase.RUNNING
        # The final report's ack: nothing committed yet.
        assert await a.report(assign_a.assignment_id, COMPLETED, requests_sent=10, batch_count=3) == 0
        assert phase(c, assign_a.assignment_id) is AssignmentPhase.REPORTED

        # Cumulative acks: never past a gap, unchanged by a replay.
        assert await a.committed(assign_a.assignment_id, 1) == 1
        assert await a.committed(assign_a.assignment_id, 3) == 1
        assert await a.committed(assign_a.assignment_id, 1, new=False) == 1
        assert phase(c, assign_a.assignment_id) is AssignmentPhase.REPORTED  # batch 2 is still missing
        assert await a.committed(assign_a.assignment_id, 2) == 3
        assert phase(c, assign_a.assignment_id) is AssignmentPhase.DONE

        await b.report(assign_b.assignment_id, COMPLETED, requests_sent=10, batch_count=0)
        stored = await final_run(store, finals, record)
        assert (stored.state, stored.state_reason) == (RunState.SUCCEEDED, "")
        assert record.run_id not in c.running_run_ids()
        rows = await store.read_snapshot(lambda reads: reads.stage_assignments(record.pk, 0))
        assert [(r.agent_name, r.state, r.requests_sent, r.takeover) for r in rows] == [
            ("a", COMPLETED, 10, False),
            ("b", COMPLETED, 10, False),
        ]
        assert kinds(await events(store, record)) == ["run_started", "stage_started", "run_succeeded"]
        # Both agents are free for the next run.
        assert all(s.free for s in c.agents())


async def test_rejoin_within_the_grace_resumes_the_same_assignment(store: Store) -> None:
    async with coordinator(store, lost_grace_s=30.0) as (c, finals):
        a = FakeAgent(c, "a")
        await a.connect()
        record = await create_run(store, c, make_spec(agents=1, requests=5))
        (assign,) = await first_assigns(store, record, a)
        await a.update(assign.assignment_id, requests_sent=2)

        await a.disconnect()
        await a.reconnect({assign.assignment_id: assign.resume_token})
        assert a.session.owned == {assign.assignment_id}
        assert phase(c, assign.assignment_id) is AssignmentPhase.RUNNING
        resumed = c._active.assignment(assign.assignment_id)
        assert resumed is not None and resumed.slot.session is a.session and resumed.grace_timer is None

        # The new session carries on (well before the 30 s grace could have run out).
        assert await a.report(assign.assignment_id, COMPLETED, requests_sent=5, batch_count=1) == 0
        assert await a.committed(assign.assignment_id, 1) == 1
        stored = await final_run(store, finals, record)
        assert stored.state == RunState.SUCCEEDED
        assert "cancel" not in a.unread()
        evs = await events(store, record)
        assert kinds(evs) == ["run_started", "stage_started", "agent_disconnected", "agent_rejoined", "run_succeeded"]
        assert evs[3][1] == f"a resumed {assign.assignment_id}"
        rows = await store.read_snapshot(lambda reads: reads.stage_assignments(record.pk, 0))
        assert [(r.state, r.requests_sent) for r in rows] == [(COMPLETED, 5)]


async def test_a_rejoin_before_the_old_stream_ended_moves_the_assignment_to_the_new_session(store: Store) -> None:
    async with coordinator(store, lost_grace_s=0.2) as (c, finals):
        a = FakeAgent(c, "a")
        await a.connect()
        record = await create_run(store, c, make_spec(agents=1, requests=5))
        (assign,) = await first_assigns(store, record, a)
        old = a.session

        # The agent reconnects while the controller still holds its old stream.
        await a.reconnect({assign.assignment_id: assign.resume_token})
        assert (old.owned, old.run_id, old.assignment_id) == (set(), "", "")
        assert a.session.assignment_id == assign.assignment_id
        await c.agent_disconnected(old)  # the old stream's end is noticed later: no grace starts

        assert await a.report(assign.assignment_id, COMPLETED, requests_sent=5, batch_count=0) == 0
        stored = await final_run(store, finals, record)
        assert stored.state == RunState.SUCCEEDED
        assert kinds(await events(store, record)) == ["run_started", "stage_started", "agent_rejoined", "run_succeeded"]


async def test_resume_claims_are_proved_by_their_tokens(store: Store) -> None:
    async with coordinator(store) as (c, finals):
        a = FakeAgent(c, "a")
        await a.connect()
        record = await create_run(store, c, make_spec(agents=1, requests=5))
        (assign,) = await first_assigns(store, record, a)

        # Another agent knows the id (ListAgents shows it) but not the token.
        with pytest.raises(AssignmentRefused) as refused:
            await c.prove_resume([assign.assignment_id], {})
        assert (refused.value.assignment_id, refused.value.run_id) == (assign.assignment_id, record.run_id)
        with pytest.raises(AssignmentRefused):
            await c.prove_resume([], {assign.assignment_id: "forged"})
        with pytest.raises(AssignmentRefused):
            await c.prove_resume([f"asg_{i}" for i in range(MAX_RESUME_CLAIMS + 1)], {})
        assert await c.prove_resume(["asg_unknown"], {}) == set()  # nothing to take over

        await a.report(assign.assignment_id, COMPLETED, requests_sent=5, batch_count=0)
        await final_run(store, finals, record)

        # Finished: still proved (from the store), but no longer active, so the agent drops it.
        late = FakeAgent(c, "a")
        await late.connect({assign.assignment_id: assign.resume_token})
        assert late.session.owned == {assign.assignment_id}
        cancel = (await late.receive("cancel")).cancel
        assert (cancel.assignment_id, cancel.reason) == (assign.assignment_id, "assignment is no longer active")
        assert await c.run_of_assignment(assign.assignment_id) == record.run_id
        assert await c.run_of_assignment("asg_unknown") is None


async def test_an_agent_lost_after_the_grace_has_the_rest_of_its_share_redistributed(store: Store) -> None:
    async with coordinator(store, lost_grace_s=0.2) as (c, finals):
        a, b = FakeAgent(c, "a"), FakeAgent(c, "b")
        await a.connect()
        await b.connect()
        record = await create_run(store, c, make_spec(agents=2, requests=20))
        assign_a, assign_b = await first_assigns(store, record, a, b)
        await a.update(assign_a.assignment_id, requests_sent=4)
        await a.disconnect()

        takeover = await b.assign()  # once the grace ran out
        assert takeover.takeover and takeover.stage_index == 0
        assert (takeover.stage.concurrency, takeover.stage.requests) == (1, 6)  # 10 less the 4 announced
        assert takeover.workload.seed not in (assign_a.workload.seed, assign_b.workload.seed)
        assert phase(c, assign_a.assignment_id) is AssignmentPhase.LOST

        # The lost agent comes back with a new session: named in an event, its share stays moved.
        await a.reconnect()
        assert a.session.free

        for assignment_id, sent in ((assign_b.assignment_id, 10), (takeover.assignment_id, 6)):
            await b.report(assignment_id, COMPLETED, requests_sent=sent, batch_count=0)
        stored = await final_run(store, finals, record)
        assert stored.state == RunState.SUCCEEDED
        evs = await events(store, record)
        assert kinds(evs) == [
            "run_started",
            "stage_started",
            "agent_disconnected",
            "agent_lost",
            "takeover",
            "agent_rejoined",
            "run_succeeded",
        ]
        assert evs[3][1] == (
            f"stage 0: a disconnected and did not resume within 0.2 s; assignment {assign_a.assignment_id} "
            "had announced 4 requests"
        )
        assert evs[4][1] == "stage 0: the share of a (concurrency 1, 6 requests) goes to b (concurrency 1, 6 requests)"
        rows = await store.read_snapshot(lambda reads: reads.stage_assignments(record.pk, 0))
        assert [(r.agent_name, r.state, r.requests_sent, r.takeover) for r in rows] == [
            ("a", ASSIGNMENT_LOST, 4, False),
            ("b", COMPLETED, 10, False),
            ("b", COMPLETED, 6, True),
        ]
        assert evs[5][1] == f"a rejoined with new session {a.session.session_id} (its lost share stays with the others)"
        assert "assign" not in a.unread()


async def test_cancel_during_a_takeover_stops_the_takeover_too(store: Store) -> None:
    async with coordinator(store, lost_grace_s=0.2) as (c, finals):
        a, b = FakeAgent(c, "a"), FakeAgent(c, "b")
        await a.connect()
        await b.connect()
        record = await create_run(store, c, make_spec(agents=2, requests=20))
        _, assign_b = await first_assigns(store, record, a, b)
        await a.disconnect()
        takeover = await b.assign()

        cancelling = asyncio.create_task(c.cancel_running(record.run_id, "stopped by the test", wait_s=20.0))
        cancels = [(await b.receive("cancel")).cancel for _ in range(2)]
        assert {x.assignment_id for x in cancels} == {assign_b.assignment_id, takeover.assignment_id}
        assert {x.reason for x in cancels} == {"stopped by the test"}
        for assignment_id in (assign_b.assignment_id, takeover.assignment_id):
            await b.report(assignment_id, CANCELLED, requests_sent=1, batch_count=0)
        await cancelling  # returns once the run's final state is stored
        assert record.run_id in finals.run_ids

        stored = await final_run(store, finals, record)
        assert (stored.state, stored.state_reason) == (RunState.CANCELLED, "stopped by the test")
        # Cancelled as asked: not an agent leaving, so no share moves again.
        assert kinds(await events(store, record)) == [
            "run_started",
            "stage_started",
            "agent_disconnected",
            "agent_lost",
            "takeover",
            "run_cancelled",
        ]


async def test_a_loss_while_the_run_is_cancelled_hands_nothing_over(store: Store) -> None:
    async with coordinator(store, lost_grace_s=1.0) as (c, finals):
        a, b = FakeAgent(c, "a"), FakeAgent(c, "b")
        await a.connect()
        await b.connect()
        record = await create_run(store, c, make_spec(agents=2, requests=20))
        _, assign_b = await first_assigns(store, record, a, b)
        await a.disconnect()  # in its grace when the cancel comes

        cancelling = asyncio.create_task(c.cancel_running(record.run_id, "stop", wait_s=20.0))
        assert (await b.receive("cancel")).cancel.assignment_id == assign_b.assignment_id
        # a's grace runs out while b is still stopping: the stage is not over yet.
        await eventually(lambda: events(store, record), lambda evs: "agent_lost" in kinds(evs))
        await b.report(assign_b.assignment_id, CANCELLED, batch_count=0)
        await cancelling

        stored = await final_run(store, finals, record)
        assert stored.state == RunState.CANCELLED
        # Lost during the cancel, but the cancelled run hands nothing over.
        assert kinds(await events(store, record)) == [
            "run_started",
            "stage_started",
            "agent_disconnected",
            "agent_lost",
            "run_cancelled",
        ]
        assert "assign" not in b.unread()


async def test_an_agent_that_stops_on_its_own_has_left_and_its_share_moves(store: Store) -> None:
    async with coordinator(store) as (c, finals):
        a, b = FakeAgent(c, "a"), FakeAgent(c, "b")
        await a.connect()
        await b.connect()
        record = await create_run(store, c, make_spec(agents=2, requests=20))
        assign_a, assign_b = await first_assigns(store, record, a, b)
        # SIGTERM on the agent: it cancels its assignment without being asked.
        await a.report(assign_a.assignment_id, CANCELLED, requests_sent=3, batch_count=0, message="agent stopping")

        takeover = await b.assign()
        assert takeover.takeover and takeover.stage.requests == 7
        for assignment_id in (assign_b.assignment_id, takeover.assignment_id):
            await b.report(assignment_id, COMPLETED, batch_count=0)
        stored = await final_run(store, finals, record)
        assert stored.state == RunState.SUCCEEDED
        evs = await events(store, record)
        assert kinds(evs) == ["run_started", "stage_started", "agent_left", "takeover", "run_succeeded"]
        assert evs[2][1] == "stage 0: a stopped its assignment early (agent stopping)"


async def test_heartbeat_silence_loses_the_agent_and_fail_fails_the_run(store: Store) -> None:
    async with coordinator(store, heartbeat_interval_s=0.1) as (c, finals):
        a = FakeAgent(c, "a")
        await a.connect()

        async def keep_beating() -> None:
            while True:
                a.heartbeat()
                await asyncio.sleep(0.02)

        beating = asyncio.create_task(keep_beating())  # until the run is placed on it
        record = await create_run(store, c, make_spec(agents=1, policy=run_pb2.AGENT_LOSS_POLICY_FAIL))
        (assign,) = await first_assigns(store, record, a)
        beating.cancel()  # the agent freezes

        stored = await final_run(store, finals, record)
        assert a.session.close_reason.startswith("a missed 3 heartbeats (silent for ")
        assert stored.state == RunState.FAILED
        assert stored.state_reason.startswith("stage 0: agent lost (a missed 3 heartbeats")
        assert stored.state_reason.endswith("and on_agent_loss is FAIL")
        assert kinds(await events(store, record)) == ["run_started", "stage_started", "agent_lost", "run_failed"]
        rows = await store.read_snapshot(lambda reads: reads.stage_assignments(record.pk, 0))
        assert [r.state for r in rows] == [ASSIGNMENT_LOST]
        assert c.agents() == []  # the frozen agent's stream is closed; it rejoins with a new session
        with pytest.raises(AssertionError, match="stream closed"):
            await a.receive("assign")
        assert phase(c, assign.assignment_id) is None  # the stage is over


async def test_a_refused_batch_loses_the_assignment_and_continue_reduces_the_load(store: Store) -> None:
    async with coordinator(store) as (c, finals):
        a, b = FakeAgent(c, "a"), FakeAgent(c, "b")
        await a.connect()
        await b.connect()
        record = await create_run(store, c, make_spec(agents=2, policy=run_pb2.AGENT_LOSS_POLICY_CONTINUE))
        assign_a, assign_b = await first_assigns(store, record, a, b)
        await c.batch_refused(a.session, assign_a.assignment_id, "sample 3: negative latency")
        await b.report(assign_b.assignment_id, COMPLETED, batch_count=0)

        stored = await final_run(store, finals, record)
        assert stored.state == RunState.SUCCEEDED
        evs = await events(store, record)
        assert kinds(evs) == [
            "run_started",
            "stage_started",
            "batch_refused",
            "agent_lost",
            "reduced_load",
            "run_succeeded",
        ]
        assert evs[2][1] == "a: sample 3: negative latency"
        assert evs[4][1] == "stage 0: a lost; on_agent_loss is CONTINUE"
        reason = await store.read_snapshot(lambda reads: reads.stage_reduced_load_reason(record.pk, 0))
        assert reason == "a lost; on_agent_loss is CONTINUE"
        assert "assign" not in b.unread()


async def test_a_run_that_cannot_be_placed_fails_naming_what_was_missing(store: Store) -> None:
    async with coordinator(store) as (c, finals):
        a = FakeAgent(c, "a")
        await a.connect()
        record = await create_run(store, c, make_spec(agents=2, wait_timeout_ns=100_000_000))
        stored = await final_run(store, finals, record)
        reason = "placement: needed 2 agents, but after waiting 0.1 s only 1 was connected (1 free)"
        assert (stored.state, stored.state_reason) == (RunState.FAILED, reason)
        assert kinds(await events(store, record)) == ["run_failed"]
        assert a.unread() == []  # nothing was assigned


async def test_stop_interrupts_a_running_run(store: Store) -> None:
    async with coordinator(store) as (c, finals):
        a = FakeAgent(c, "a")
        await a.connect()
        record = await create_run(store, c, make_spec(agents=1))
        (assign,) = await first_assigns(store, record, a)

        stopping = asyncio.create_task(c.stop(timeout_s=10.0))
        cancel = (await a.receive("cancel")).cancel
        assert (cancel.assignment_id, cancel.reason) == (assign.assignment_id, "the controller is shutting down")
        assert await a.report(assign.assignment_id, CANCELLED, batch_count=1) == 0
        assert await a.committed(assign.assignment_id, 1) == 1  # the last batch still counts
        await stopping

        stored = await final_run(store, finals, record)
        assert stored.state == RunState.INTERRUPTED
        assert stored.state_reason == "the controller stopped while the run was running"
        assert kinds(await events(store, record))[-1] == "run_interrupted"


async def test_a_search_plans_its_probes_as_stored_stages_one_at_a_time(store: Store) -> None:
    spec = make_spec(agents=1)
    del spec.stages[:]
    spec.slo.ttft.FromMilliseconds(100)
    spec.search.variable = run_pb2.SEARCH_VARIABLE_CONCURRENCY
    spec.search.max_probes = 3
    spec.search.probe_duration.FromSeconds(1)
    async with coordinator(store) as (c, finals):
        a = FakeAgent(c, "a")
        await a.connect()
        record = await create_run(store, c, spec)
        for probe in range(3):
            assign = await a.assign()
            # The probe is a stage of the stored spec before it runs.
            stored = await store.get_run(record.run_id)
            assert stored is not None
            decoded = parse_spec(stored)
            assert len(decoded.stages) == probe + 1
            assert decoded.stages[probe].concurrency == assign.stage.concurrency == 1
            assert assign.stage_index == probe and assign.stage.warmup_duration.nanos == 166_666_666
            await a.report(assign.assignment_id, COMPLETED, batch_count=0)
        stored = await final_run(store, finals, record)
        assert stored.state == RunState.SUCCEEDED
        evs = await events(store, record)
        # Nothing was counted: each probe proved nothing and was repeated, until max_probes.
        assert kinds(evs).count("probe_planned") == 3
        [stop] = [message for kind, message in evs if kind == "search_stopped"]
        assert stop.startswith("3 probes ran before the search converged")
        assert a.unread().count("assign") == 0
