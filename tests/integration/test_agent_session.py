"""ControllerLink over a real grpc.aio stream against a scripted fake controller.

The fake implements the controller's side of `AgentService.Connect` as the proto describes
it (Welcome first, cumulative acks after "commit", Cancel on demand, optional API key), so
these tests pin the agent's half of the protocol: Hello, heartbeats, assignment updates,
batch_count, replay after a controller restart, auth refusal, graceful shutdown. Load goes
to the real mock model server.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from agent.controller_link import AgentAuthError, ControllerLink, ReconnectBackoff, run_agent
from common.grpc_options import API_KEY_ENV, API_KEY_METADATA, SERVER_OPTIONS
from common.proto.loadtest.v1 import agent_service_pb2, agent_service_pb2_grpc, run_pb2
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.conftest import poll_until

pytestmark = pytest.mark.timeout(60)

ConnectRequest = agent_service_pb2.ConnectRequest
ConnectResponse = agent_service_pb2.ConnectResponse
COMPLETED = agent_service_pb2.ASSIGNMENT_STATE_COMPLETED
CANCELLED = agent_service_pb2.ASSIGNMENT_STATE_CANCELLED
RUNNING = agent_service_pb2.ASSIGNMENT_STATE_RUNNING


class FakeController(agent_service_pb2_grpc.AgentServiceServicer):
    """The controller side of the worker protocol, scripted by the test."""

    def __init__(self, *, auto_ack: bool = True, api_key: str | None = None) -> None:
        self.auto_ack = auto_ack
        self.api_key = api_key
        self.hellos: list[agent_service_pb2.Hello] = []
        self.received: list[ConnectRequest] = []  # everything after Hello, all streams
        self.batches: dict[tuple[str, int], agent_service_pb2.SampleBatch] = {}
        self.outbox: asyncio.Queue[ConnectResponse] | None = None
        self.half_closed = 0

    # --- what the test inspects ---

    def updates(self, assignment_id: str) -> list[agent_service_pb2.AssignmentUpdate]:
        return [
            m.assignment_update
            for m in self.received
            if m.HasField("assignment_update") and m.assignment_update.assignment_id == assignment_id
        ]

    def final(self, assignment_id: str) -> agent_service_pb2.AssignmentUpdate | None:
        finals = [u for u in self.updates(assignment_id) if u.state != RUNNING]
        return finals[-1] if finals else None

    def heartbeats(self) -> list[agent_service_pb2.Heartbeat]:
        return [m.heartbeat for m in self.received if m.HasField("heartbeat")]

    def batch_seqs_received(self, assignment_id: str) -> list[int]:
        return [
            m.sample_batch.batch_seq
            for m in self.received
            if m.HasField("sample_batch") and m.sample_batch.assignment_id == assignment_id
        ]

    def samples(self, assignment_id: str) -> list[int]:
        """Statuses of the committed (deduplicated) samples, in batch order."""
        seqs = sorted(seq for aid, seq in self.batches if aid == assignment_id)
        return [s for seq in seqs for s in self.batches[(assignment_id, seq)].status]

    def through(self, assignment_id: str) -> int:
        seq = 0
        while (assignment_id, seq + 1) in self.batches:
            seq += 1
        return seq

    def send(self, message: ConnectResponse) -> None:
        assert self.outbox is not None, "no agent connected"
        self.outbox.put_nowait(message)

    # --- the servicer ---

    # The context.read()/write() style of a bidi handler, which the generated base class
    # does not describe.
    async def Connect(self, request_iterator: Any, context: Any) -> None:  # type: ignore[override]
        if self.api_key is not None:
            metadata = dict(context.invocation_metadata())
            if metadata.get(API_KEY_METADATA) != self.api_key:
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "invalid API key")
        first = await context.read()
        assert first.HasField("hello")
        self.hellos.append(first.hello)
        interval = agent_service_pb2.Welcome().heartbeat_interval
        interval.FromMilliseconds(100)
        await context.write(
            ConnectResponse(
                welcome=agent_service_pb2.Welcome(session_id=f"ses-{len(self.hellos)}", heartbeat_interval=interval)
            )
        )
        outbox: asyncio.Queue[ConnectResponse] = asyncio.Queue()
        self.outbox = outbox

        async def write() -> None:
            while True:
                await context.write(await outbox.get())

        writer = asyncio.create_task(write())
        try:
            while True:
                message = await context.read()
                if message is grpc.aio.EOF:
                    self.half_closed += 1
                    break
                self.received.append(message)
                if message.HasField("sample_batch"):
                    batch = message.sample_batch
                    self.batches.setdefault((batch.assignment_id, batch.batch_seq), batch)
                    if self.auto_ack:
                        aid = batch.assignment_id
                        outbox.put_nowait(
                            ConnectResponse(ack=agent_service_pb2.Ack(assignment_id=aid, batch_seq=self.through(aid)))
                        )
            # Like the real controller: flush queued acks, then end the stream.
            while not outbox.empty():
                await context.write(outbox.get_nowait())
        finally:
            writer.cancel()
            if self.outbox is outbox:
                self.outbox = None


@contextlib.asynccontextmanager
async def controller_server(controller: FakeController, port: int = 0) -> AsyncIterator[int]:
    server = grpc.aio.server(options=SERVER_OPTIONS)
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(controller, server)
    bound = server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    try:
        yield bound
    finally:
        await server.stop(None)


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    async with MockServer(MockConfig(ttft_ms=5, itl_ms=2, output_tokens=8)) as server:
        yield server


def assign_message(
    assignment_id: str, base_url: str, *, concurrency: int, requests: int = 0, duration_s: float = 0
) -> ConnectResponse:
    stage = run_pb2.Stage(concurrency=concurrency, requests=requests)
    if duration_s:
        stage.duration.FromNanoseconds(int(duration_s * 1e9))
    return ConnectResponse(
        assign=agent_service_pb2.Assign(
            assignment_id=assignment_id,
            run_id="run-1",
            target=run_pb2.Target(base_url=base_url, model="mock", api_key="sk-target"),
            workload=run_pb2.Workload(seed=3),
            stage=stage,
        )
    )


def make_session(port: int, stop: asyncio.Event, api_key: str | None = None) -> ControllerLink:
    return ControllerLink(
        f"127.0.0.1:{port}",
        name="agent-under-test",
        labels={"zone": "a"},
        api_key=api_key,
        stop=stop,
        backoff=ReconnectBackoff(initial_s=0.05, max_s=0.2),
        shutdown_grace_s=5.0,
    )


async def test_assignment_runs_reports_and_is_released_after_acks(mock: MockServer) -> None:
    controller = FakeController()
    async with controller_server(controller) as port:
        stop = asyncio.Event()
        session = make_session(port, stop)
        agent = asyncio.create_task(session.run())
        try:
            assert await poll_until(lambda: session.connected)
            hello = controller.hellos[0]
            assert (hello.name, dict(hello.labels)) == ("agent-under-test", {"zone": "a"})
            assert hello.version
            assert list(hello.active_assignment_ids) == []
            assert session.session_id == "ses-1"

            controller.send(assign_message("a1", mock.base_url, concurrency=4, requests=20))
            assert await poll_until(lambda: controller.final("a1") is not None)
            final = controller.final("a1")
            assert final is not None
            assert final.state == COMPLETED
            assert final.requests_sent == 20
            assert controller.updates("a1")[0].state == RUNNING
            assert sorted(controller.batch_seqs_received("a1")) == list(range(1, final.batch_count + 1))
            errs = [e for (aid, _), b in controller.batches.items() for e in b.error]
            assert controller.samples("a1") == [run_pb2.REQUEST_STATUS_OK] * 20, errs
            # Every batch acked after the final update: the agent forgets the assignment.
            assert await poll_until(lambda: "a1" not in session.assignments)

            assert await poll_until(lambda: len(controller.heartbeats()) >= 2)
            beat = controller.heartbeats()[-1]
            assert beat.agent_time.seconds > 1_600_000_000
            assert beat.health.cpu_percent >= 0
            assert beat.health.event_loop_lag_ms >= 0
        finally:
            stop.set()
            await asyncio.wait_for(agent, 10)
        assert controller.half_closed == 1  # graceful close, not a reset


async def test_cancel_reports_cancelled_with_all_batches(mock: MockServer) -> None:
    controller = FakeController()
    async with MockServer(MockConfig(ttft_ms=10_000, output_tokens=8)) as slow, controller_server(controller) as port:
        stop = asyncio.Event()
        session = make_session(port, stop)
        agent = asyncio.create_task(session.run())
        try:
            assert await poll_until(lambda: controller.outbox is not None)
            controller.send(assign_message("a2", slow.base_url, concurrency=5, duration_s=30))
            assert await poll_until(lambda: "a2" in session.assignments and session.assignments["a2"].in_flight == 5)
            assert await poll_until(lambda: any(h.health.in_flight == 5 for h in controller.heartbeats()))
            controller.send(ConnectResponse(cancel=agent_service_pb2.Cancel(assignment_id="a2", reason="user")))
            assert await poll_until(lambda: controller.final("a2") is not None)
            final = controller.final("a2")
            assert final is not None
            assert (final.state, final.message, final.requests_sent) == (CANCELLED, "user", 5)
            assert await poll_until(lambda: controller.through("a2") == final.batch_count)
            assert controller.samples("a2") == [run_pb2.REQUEST_STATUS_CANCELLED] * 5
        finally:
            stop.set()
            await asyncio.wait_for(agent, 10)


async def test_reconnect_keeps_running_and_replays_unacked(mock: MockServer) -> None:
    controller = FakeController(auto_ack=False)
    stop = asyncio.Event()
    async with controller_server(controller) as port:
        session = make_session(port, stop)
        agent = asyncio.create_task(session.run())
        assert await poll_until(lambda: controller.outbox is not None)
        controller.send(assign_message("a3", mock.base_url, concurrency=2, duration_s=3.0))
        assert await poll_until(lambda: len(controller.batch_seqs_received("a3")) >= 2)
    # The controller is gone mid-assignment; the load goes on without it.
    assert await poll_until(lambda: not session.connected)
    runner = session.assignments["a3"]
    sent_at_outage = runner.requests_sent
    assert await poll_until(lambda: runner.requests_sent > sent_at_outage + 5)

    restarted = FakeController(auto_ack=True)
    try:
        async with controller_server(restarted, port):
            assert await poll_until(lambda: restarted.hellos != [])
            assert list(restarted.hellos[0].active_assignment_ids) == ["a3"]  # still running
            assert await poll_until(lambda: restarted.final("a3") is not None)
            final = restarted.final("a3")
            assert final is not None
            assert final.state == COMPLETED
            # Every batch arrives on the new stream (nothing was acked before), in order.
            seqs = restarted.batch_seqs_received("a3")
            assert seqs[: final.batch_count] == list(range(1, final.batch_count + 1))
            assert len(restarted.samples("a3")) == final.requests_sent
            assert await poll_until(lambda: "a3" not in session.assignments)
            assert session.session_id == "ses-1"  # the restarted controller's first session
    finally:
        stop.set()
        await asyncio.wait_for(agent, 10)


async def test_final_update_of_a_finished_unacked_assignment_is_resent(mock: MockServer) -> None:
    controller = FakeController(auto_ack=False)
    stop = asyncio.Event()
    async with controller_server(controller) as port:
        session = make_session(port, stop)
        agent = asyncio.create_task(session.run())
        assert await poll_until(lambda: controller.outbox is not None)
        controller.send(assign_message("a4", mock.base_url, concurrency=2, requests=60))
        assert await poll_until(lambda: controller.final("a4") is not None)
        first_final = controller.final("a4")
        assert first_final is not None
        assert first_final.batch_count >= 2  # ~20 ms per request, flushed every 100 ms
        # Ack only part of it: the rest must be replayed.
        controller.send(ConnectResponse(ack=agent_service_pb2.Ack(assignment_id="a4", batch_seq=1)))
        assert await poll_until(lambda: session.assignments["a4"].batcher.acked_seq == 1)
    assert await poll_until(lambda: not session.connected)
    restarted = FakeController(auto_ack=True)
    try:
        async with controller_server(restarted, port):
            assert await poll_until(lambda: restarted.final("a4") is not None)
            assert list(restarted.hellos[0].active_assignment_ids) == []
            assert restarted.final("a4") == first_final
            assert restarted.batch_seqs_received("a4") == list(range(2, first_final.batch_count + 1))
    finally:
        stop.set()
        await asyncio.wait_for(agent, 10)


async def test_shutdown_cancels_flushes_and_waits_for_acks() -> None:
    controller = FakeController()
    async with MockServer(MockConfig(ttft_ms=10_000, output_tokens=8)) as slow, controller_server(controller) as port:
        stop = asyncio.Event()
        session = make_session(port, stop)
        agent = asyncio.create_task(session.run())
        assert await poll_until(lambda: controller.outbox is not None)
        controller.send(assign_message("a5", slow.base_url, concurrency=3, duration_s=30))
        assert await poll_until(lambda: "a5" in session.assignments and session.assignments["a5"].in_flight == 3)
        stop.set()
        await asyncio.wait_for(agent, 10)
        final = controller.final("a5")
        assert final is not None
        assert final.state == CANCELLED
        assert controller.through("a5") == final.batch_count >= 1
        assert controller.samples("a5") == [run_pb2.REQUEST_STATUS_CANCELLED] * 3
        assert controller.half_closed == 1


async def test_refused_api_key_is_final() -> None:
    controller = FakeController(api_key="right-key")
    async with controller_server(controller) as port:
        stop = asyncio.Event()
        with pytest.raises(AgentAuthError, match="UNAUTHENTICATED"):
            await asyncio.wait_for(run_agent(f"127.0.0.1:{port}", "a", {}, "wrong-key", stop), 10)
        assert controller.hellos == []


async def test_right_api_key_is_accepted() -> None:
    controller = FakeController(api_key="right-key")
    async with controller_server(controller) as port:
        stop = asyncio.Event()
        agent = asyncio.create_task(run_agent(f"127.0.0.1:{port}", "a", {}, "right-key", stop))
        assert await poll_until(lambda: controller.hellos != [])
        stop.set()
        await asyncio.wait_for(agent, 10)


async def test_stop_while_controller_unreachable_returns() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    stop = asyncio.Event()
    agent = asyncio.create_task(run_agent(f"127.0.0.1:{port}", "a", {}, None, stop))
    done, _ = await asyncio.wait({agent}, timeout=0.5)
    assert not done  # keeps retrying
    stop.set()
    await asyncio.wait_for(agent, 10)


# --- the agent process (`agent.cli.run`), as `llm-loadtest agent` runs it -----------------

AGENT_MAIN = (
    "import argparse, sys\n"
    "from agent.cli import add_arguments, run\n"
    "parser = argparse.ArgumentParser()\n"
    "add_arguments(parser)\n"
    "sys.exit(run(parser.parse_args()))\n"
)
REPO_ROOT = str(Path(__file__).resolve().parents[2])


async def start_agent_process(*args: str) -> asyncio.subprocess.Process:
    env = {**os.environ, "PYTHONPATH": REPO_ROOT}
    env.pop(API_KEY_ENV, None)
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        AGENT_MAIN,
        *args,
        cwd=REPO_ROOT,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.e2e
async def test_process_exits_1_when_refused_and_never_logs_the_key() -> None:
    controller = FakeController(api_key="right-key")
    async with controller_server(controller) as port:
        proc = await start_agent_process("--controller", f"127.0.0.1:{port}", "--api-key", "wrong-key-1234")
        _, stderr = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 1
    assert b"agent_auth_failed" in stderr
    assert b"wrong-key-1234" not in stderr


@pytest.mark.e2e
async def test_process_stops_gracefully_on_sigterm() -> None:
    controller = FakeController(api_key="right-key")
    async with controller_server(controller) as port:
        proc = await start_agent_process(
            "--controller",
            f"127.0.0.1:{port}",
            "--api-key",
            "right-key",
            "--name",
            "proc-agent",
            "--label",
            "zone=b",
            "--log-format",
            "console",
        )
        try:
            # A heartbeat proves the agent has taken the Welcome.
            assert await poll_until(lambda: controller.heartbeats() != [], timeout_s=30)
            assert controller.hellos[0].name == "proc-agent"
            assert dict(controller.hellos[0].labels) == {"zone": "b"}
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 30)
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert b"agent_connected" in stderr
    assert b"right-key" not in stderr
    assert controller.half_closed == 1


@pytest.mark.e2e
async def test_second_signal_stops_without_waiting_for_acks() -> None:
    controller = FakeController(auto_ack=False)  # graceful shutdown would wait 5 s for acks
    async with (
        MockServer(MockConfig(ttft_ms=10_000, output_tokens=8)) as slow,
        controller_server(controller) as port,
    ):
        proc = await start_agent_process("--controller", f"127.0.0.1:{port}")
        try:
            assert await poll_until(lambda: controller.heartbeats() != [], timeout_s=30)
            controller.send(assign_message("a6", slow.base_url, concurrency=2, duration_s=30))
            assert await poll_until(lambda: any(h.health.in_flight == 2 for h in controller.heartbeats()))
            loop = asyncio.get_running_loop()
            started = loop.time()
            proc.send_signal(signal.SIGTERM)
            assert await poll_until(lambda: controller.final("a6") is not None)  # first: graceful
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 30)
            assert loop.time() - started < 4
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
    assert proc.returncode == 0, stderr.decode(errors="replace")
    assert b"agent_stopped_forcibly" in stderr
