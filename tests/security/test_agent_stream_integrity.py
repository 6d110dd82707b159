"""Agent stream integrity (issue 13, items 1-3): a hostile client with an agent key cannot
write into another agent's run, cannot hijack an assignment on resume, cannot store
impossible values, cannot make a result read allocate without limit, and cannot take a
legitimate run's batches down with its own. Real controller, real gRPC, real agents and the
real mock server; the hostile client is tests/security/hostile.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import grpc
import numpy as np
import pytest

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.domain.access.keys import Role
from controller.domain.results import sample_limits as limits
from controller.domain.results.ingest import Ingestor, IngestTarget
from controller.server import Controller
from controller.store import repository as repo
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.conftest import eventually
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final
from tests.security.conftest import AGENT_BOOTSTRAP
from tests.security.hostile import HostileAgent, forged_batch

pytestmark = pytest.mark.timeout(180)


@contextlib.asynccontextmanager
async def real_agent(controller: Controller, name: str, labels: dict[str, str]) -> AsyncIterator[asyncio.Task[None]]:
    _, key = await controller.keys.create(name, Role.AGENT)
    async with running_agent(f"127.0.0.1:{controller.port}", name, labels, key) as task:
        yield task


def placed(spec: run_pb2.RunSpec, role: str) -> run_pb2.RunSpec:
    spec.placement.agents = 1
    spec.placement.selector["role"] = role
    # No preflight: the hostile agents here would not answer one, and the victim's counts are
    # compared with every request the mock served.
    spec.skip_preflight = True
    return spec


async def stored_samples(controller: Controller, run_id: str) -> int:
    record = await controller.db.read(repo.get_run, run_id)
    assert record is not None
    return await controller.db.read(repo.count_samples, record.pk)


async def refusals(controller: Controller, outcome: str, run_id: str) -> list[str]:
    events, _ = await controller.audit.list(1000, "", run_id=run_id)
    return [e.detail for e in events if e.outcome == outcome and e.method.endswith("AgentService/Connect")]


async def test_foreign_samples_and_hijack_are_refused_and_the_victim_run_is_exact(keyed_controller: Controller) -> None:
    controller = keyed_controller
    address = f"127.0.0.1:{controller.port}"
    _, hostile_key = await controller.keys.create("intruder", Role.AGENT)
    async with (
        MockServer(MockConfig(ttft_ms=10, itl_ms=2, output_tokens=8)) as mock,
        real_agent(controller, "victim-agent", {"role": "victim"}),
        ControllerClient(address, api_key=AGENT_BOOTSTRAP, timeout_s=10) as admin,
        ControllerClient(address, timeout_s=10) as reader,  # reads are public
    ):
        run = await admin.create_run(placed(spec_for(mock, [(2, 4.0)], output_tokens=8), "victim"))
        agents = await eventually(reader.list_agents, lambda a: any(x.assignment_id for x in a), timeout_s=30)
        victim_assignment = next(x.assignment_id for x in agents if x.assignment_id)

        # 1,000 invented samples tagged with the victim's assignment.
        async with HostileAgent(address, hostile_key) as h:
            await h.next("welcome")
            h.send(agent_service_pb2.ConnectRequest(sample_batch=forged_batch(victim_assignment, 1, 1000)))
            code, details = await h.ended()
        assert code == grpc.StatusCode.PERMISSION_DENIED and victim_assignment in details, (code, details)
        # A forged final report for it.
        async with HostileAgent(address, hostile_key) as h:
            await h.next("welcome")
            update = agent_service_pb2.AssignmentUpdate(
                assignment_id=victim_assignment, state=agent_service_pb2.ASSIGNMENT_STATE_COMPLETED, batch_count=1
            )
            h.send(agent_service_pb2.ConnectRequest(assignment_update=update))
            code, details = await h.ended()
        assert code == grpc.StatusCode.PERMISSION_DENIED and victim_assignment in details, (code, details)
        # A resume of the victim's assignment: with no token, and with a guessed one.
        for tokens in ({}, {victim_assignment: "guessed-token"}):
            async with HostileAgent(
                address, hostile_key, active_assignment_ids=[victim_assignment], resume_tokens=tokens
            ) as h:
                code, details = await h.ended()
                assert h.responses.empty()  # not even a Welcome
            assert code == grpc.StatusCode.PERMISSION_DENIED and victim_assignment in details, (code, details)

        final = await wait_final(admin, run.id)
        result = await admin.get_result(run.id)
        served = mock.stats

    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    # Exactly the samples the mock served: nothing of the hostile's was stored.
    assert await stored_samples(controller, run.id) == served.requests_total > 0
    stage = result.stages[0]
    assert stage.requests_ok + stage.requests_failed == served.requests_total
    assert stage.output_tokens == served.output_tokens_total
    # Every refusal is an audit row of the victim's run.
    assert len(await refusals(controller, "PERMISSION_DENIED", run.id)) == 4


async def test_impossible_values_are_refused_and_nothing_is_stored(keyed_controller: Controller) -> None:
    controller = keyed_controller
    address = f"127.0.0.1:{controller.port}"
    _, key = await controller.keys.create("own-run", Role.AGENT)
    async with (
        MockServer(MockConfig(ttft_ms=10, itl_ms=2, output_tokens=8)) as mock,
        ControllerClient(address, api_key=AGENT_BOOTSTRAP, timeout_s=10) as admin,
    ):
        run = await admin.create_run(placed(spec_for(mock, [(1, 30.0)]), "own"))
        async with HostileAgent(address, key, labels={"role": "own"}) as h:
            await h.next("welcome")
            await h.become_placeable()
            assign = (await h.next("assign", timeout_s=30)).assign
        now = time.time_ns()
        day = 86_400 * 10**9
        bad = [
            ("sent_unix_ns", forged_batch(assign.assignment_id, 1, 2, sent_unix_ns=[now, now + 2 * 10**7 * 10**9])),
            ("sent_unix_ns", forged_batch(assign.assignment_id, 1, 2, sent_unix_ns=[now, -5])),
            ("sent_unix_ns", forged_batch(assign.assignment_id, 1, 1, sent_unix_ns=[now - day])),
            ("done_ns", forged_batch(assign.assignment_id, 1, 1, done_ns=[2**64 - 1])),
            ("done_ns", forged_batch(assign.assignment_id, 1, 1, done_ns=[limits.MAX_OFFSET_NS + 1])),
            ("output_tokens", forged_batch(assign.assignment_id, 1, 1, output_tokens=4_000_000_000)),
            ("last_token_ns before first_token_ns", forged_batch(assign.assignment_id, 1, 1, last_token_ns=[1])),
            ("inter-token gaps", forged_batch(assign.assignment_id, 1, 1, itl_count=[2], itl_ns=[10**12, 10**12])),
            ("status", forged_batch(assign.assignment_id, 1, 1, status=[-3])),
            (
                "reasoning_tokens larger than output_tokens",
                forged_batch(assign.assignment_id, 1, 1, reasoning_tokens=[100_001]),
            ),
            ("first_answer_ns after done_ns", forged_batch(assign.assignment_id, 1, 1, first_answer_ns=[30_000_000])),
            ("session_id has 1", forged_batch(assign.assignment_id, 1, 2, session_id=[1])),
            ("batch_seq", forged_batch(assign.assignment_id, 0, 1)),
        ]
        for what, batch in bad:
            # Each on a resumed session: the Assign's token proves the assignment is ours.
            async with HostileAgent(
                address, key, labels={"role": "x"}, resume_tokens={assign.assignment_id: assign.resume_token}
            ) as h:
                await h.next("welcome")
                h.send(agent_service_pb2.ConnectRequest(sample_batch=batch))
                code, details = await h.ended()
            assert code == grpc.StatusCode.INVALID_ARGUMENT and what in details, (what, code, details)
            assert assign.assignment_id in details
        final = await wait_final(admin, run.id)
    assert await stored_samples(controller, run.id) == 0
    assert final.state == run_pb2.RUN_STATE_FAILED  # its only agent was refused: lost
    assert len(await refusals(controller, "INVALID_ARGUMENT", run.id)) == len(bad)


async def test_an_agent_cannot_report_its_assignment_lost(keyed_controller: Controller) -> None:
    """ASSIGNMENT_STATE_LOST is the controller's to set: an agent's report of it for its own
    assignment is no final report (a later real one still counts), and is not acknowledged."""
    controller = keyed_controller
    address = f"127.0.0.1:{controller.port}"
    _, key = await controller.keys.create("claims-lost", Role.AGENT)
    async with (
        MockServer(MockConfig(ttft_ms=10, itl_ms=2, output_tokens=8)) as mock,
        ControllerClient(address, api_key=AGENT_BOOTSTRAP, timeout_s=10) as admin,
    ):
        run = await admin.create_run(placed(spec_for(mock, [(1, 30.0)]), "claims"))
        async with HostileAgent(address, key, labels={"role": "claims"}) as h:
            await h.next("welcome")
            await h.become_placeable()
            assign = (await h.next("assign", timeout_s=30)).assign

            def report(state: agent_service_pb2.AssignmentState.ValueType) -> None:
                update = agent_service_pb2.AssignmentUpdate(assignment_id=assign.assignment_id, state=state)
                h.send(agent_service_pb2.ConnectRequest(assignment_update=update))

            report(agent_service_pb2.ASSIGNMENT_STATE_LOST)
            h.send(h._heartbeat())  # messages are handled in order: its ack comes after any for the report
            answered: list[str] = []
            async with asyncio.timeout(20):
                while not answered or answered[-1] != "heartbeat_ack":
                    answered.append(str((await h.responses.get()).WhichOneof("body")))
            report(agent_service_pb2.ASSIGNMENT_STATE_COMPLETED)
            await h.next("ack")
            query = "SELECT state FROM assignments WHERE assignment_id = ?"
            stored = await controller.db.read(
                lambda: repo.database_proxy.execute_sql(query, (assign.assignment_id,)).fetchone()[0]
            )
        final = await wait_final(admin, run.id)
    assert "ack" not in answered, answered
    # Had LOST been taken as the final state, the COMPLETED report would have been ignored.
    assert stored == agent_service_pb2.ASSIGNMENT_STATE_COMPLETED
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason  # its only assignment completed


async def test_stored_outliers_cannot_exhaust_a_result_read(keyed_controller: Controller) -> None:
    """Samples as an older controller stored them (no ingest checks): GetRunResult still
    answers, with the outliers left out and said so, and a series as long as the stage."""
    controller = keyed_controller
    address = f"127.0.0.1:{controller.port}"
    async with (
        MockServer(MockConfig(ttft_ms=10, itl_ms=2, output_tokens=8)) as mock,
        real_agent(controller, "honest", {"role": "honest"}),
        ControllerClient(address, api_key=AGENT_BOOTSTRAP, timeout_s=60) as admin,
    ):
        spec = placed(spec_for(mock, [(2, 0.0)], output_tokens=8), "honest")
        spec.stages[0].requests = 20
        run = await admin.create_run(spec)
        assert (await wait_final(admin, run.id)).state == run_pb2.RUN_STATE_SUCCEEDED
        clean = await admin.get_result(run.id)
        record = await controller.db.read(repo.get_run, run.id)
        assert record is not None
        pk = int(
            await controller.db.read(
                lambda: repo.database_proxy.execute_sql(
                    "SELECT pk FROM assignments WHERE run_pk = ?", (record.pk,)
                ).fetchone()[0]
            )
        )
        now = time.time_ns()
        outliers = forged_batch("old", 99, 4, sent_unix_ns=[now - 2 * 10**16, -(2**62), now, now])
        table = np.array([np.asarray(getattr(outliers, c) or [0] * 4, dtype=np.int64) for c in repo.SAMPLE_COLUMNS])
        table[repo.SAMPLE_COLUMNS.index("done_ns"), 2] = 2**62  # an offset no request can have
        table[repo.SAMPLE_COLUMNS.index("first_token_ns"), 3] = -(10**15)
        stored = repo.BatchIngest(pk, record.pk, 0, 99, table, [], b"")
        await controller.db.write(repo.ingest_batches, [stored])

        result = await admin.get_result(run.id)
    stage, before = result.stages[0], clean.stages[0]
    assert stage.samples_ignored == 4 and "left out" in stage.samples_ignored_reason
    assert stage.requests_ok == before.requests_ok == 20
    assert len(stage.time_series) == len(before.time_series)
    assert clean.stages[0].samples_ignored == 0


async def test_overflowing_batch_seq_beside_a_legit_run(keyed_controller: Controller) -> None:
    controller = keyed_controller
    address = f"127.0.0.1:{controller.port}"
    _, key = await controller.keys.create("overflow", Role.AGENT)
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=4)) as mock,
        real_agent(controller, "legit", {"role": "legit"}),
        ControllerClient(address, api_key=AGENT_BOOTSTRAP, timeout_s=10) as admin,
    ):
        hostile_run = await admin.create_run(placed(spec_for(mock, [(1, 30.0)]), "hostile"))
        async with HostileAgent(address, key, labels={"role": "hostile"}) as h:
            await h.next("welcome")
            await h.become_placeable()
            assign = (await h.next("assign", timeout_s=30)).assign
        legit = await admin.create_run(placed(spec_for(mock, [(4, 3.0)], output_tokens=4), "legit"))
        refused = 0
        deadline = time.monotonic() + 60
        while (await admin.get_run(legit.id)).state in (run_pb2.RUN_STATE_PENDING, run_pb2.RUN_STATE_RUNNING):
            assert time.monotonic() < deadline
            async with HostileAgent(
                address, key, labels={"role": "x"}, resume_tokens={assign.assignment_id: assign.resume_token}
            ) as h:
                await h.next("welcome")
                # One batch a connection: the stream ends at the first, and writes racing that
                # end would make the client's own status INTERNAL rather than the server's.
                h.send(agent_service_pb2.ConnectRequest(sample_batch=forged_batch(assign.assignment_id, 2**64 - 1, 50)))
                code, details = await h.ended()
            assert code == grpc.StatusCode.INVALID_ARGUMENT and "batch_seq" in details, (code, details)
            refused += 1
        final = await wait_final(admin, legit.id)
        served = mock.stats
    assert refused >= 2
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    assert await stored_samples(controller, legit.id) == served.requests_total > 0
    assert await stored_samples(controller, hostile_run.id) == 0


async def test_a_batch_that_fails_its_write_fails_alone(keyed_controller: Controller) -> None:
    """A write that fails despite the checks (here: its assignment does not exist) is retried
    alone; the other batches of its write group are committed and acked."""
    controller = keyed_controller
    ingestor = Ingestor(controller.store)
    ingestor.start()
    try:
        record, _ = await controller.db.write(repo.insert_run, "run_w", None, "", "m", "{}", ["s"], "", time.time_ns())
        pk = await controller.db.write(
            repo.insert_assignment, "asg_w", record.pk, 0, "ses", "a", 1, 0, 1, time.time_ns()
        )
        now = time.time_ns()
        good = IngestTarget(pk, record.pk, "run_w", 0, now - 10**9, None, 0)
        missing = IngestTarget(pk + 1000, record.pk, "run_w", 0, now - 10**9, None, 0)
        committed: list[int] = []
        # Queued before the writer runs: one write group.
        for seq, target in ((1, good), (2, missing), (3, good)):
            await ingestor.submit(target, forged_batch("asg_w", seq, 10), lambda o, b: committed.append(b.batch_seq))
        await ingestor.drain()
    finally:
        await ingestor.stop()
    assert committed == [1, 3]
    assert await controller.db.read(repo.count_samples, record.pk) == 20
