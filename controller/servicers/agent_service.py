"""AgentService.Connect: one bidi stream per agent.

A reader task consumes the agent's messages in order (Hello first, then heartbeats,
updates and sample batches); the response side drains the session's outbox. Sample
batches go to the ingest queue; their acks come back through the outbox after commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import grpc
import structlog
from google.protobuf import duration_pb2

from common.proto.loadtest.v1 import agent_service_pb2, agent_service_pb2_grpc
from controller.domain.agents import AgentHealthReport, AgentSession
from controller.domain.coordinator import RunCoordinator
from controller.domain.ingest import Ingestor, IngestTarget, MalformedBatch
from controller.store.repository import BatchIngest, IngestOutcome

log = structlog.get_logger(__name__)

HELLO_TIMEOUT_S = 10.0


class AgentServiceServicer(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(self, coordinator: RunCoordinator, ingestor: Ingestor, heartbeat_interval_s: float = 1.0) -> None:
        self._coordinator = coordinator
        self._ingestor = ingestor
        self._heartbeat_interval_s = heartbeat_interval_s

    async def Connect(
        self,
        request_iterator: AsyncIterator[agent_service_pb2.ConnectRequest],
        context: grpc.aio.ServicerContext,
    ) -> AsyncIterator[agent_service_pb2.ConnectResponse]:
        try:
            async with asyncio.timeout(HELLO_TIMEOUT_S):
                first = await anext(request_iterator)
        except (TimeoutError, StopAsyncIteration):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "expected Hello as the first message")
        if first.WhichOneof("body") != "hello":
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "the first message must be Hello")
        hello = first.hello
        session = AgentSession(
            session_id=f"ses_{uuid.uuid4().hex[:16]}",
            name=(hello.name or context.peer())[:256],
            labels=dict(hello.labels),
            version=hello.version[:64],
            connected_at_ns=time.time_ns(),
        )
        session.last_heartbeat_ns = session.connected_at_ns
        interval, lease = duration_pb2.Duration(), duration_pb2.Duration()
        interval.FromNanoseconds(int(self._heartbeat_interval_s * 1e9))
        lease.FromNanoseconds(int(self._coordinator.lease_s * 1e9))
        yield agent_service_pb2.ConnectResponse(
            welcome=agent_service_pb2.Welcome(
                session_id=session.session_id, heartbeat_interval=interval, lease_duration=lease
            )
        )
        await self._coordinator.agent_connected(session, list(hello.active_assignment_ids))
        reader = asyncio.create_task(self._read(session, request_iterator), name=f"read-{session.session_id}")
        get: asyncio.Future[agent_service_pb2.ConnectResponse | None] | None = None
        try:
            while True:
                if session.close_reason and session.outbox.empty():
                    break  # closed by the controller (its end-of-stream marker may not fit)
                get = asyncio.ensure_future(session.outbox.get())
                done, _ = await asyncio.wait({get, reader}, return_when=asyncio.FIRST_COMPLETED)
                if get in done:
                    message = get.result()
                    if message is not None:
                        yield _stamped(message)
                        continue
                # The agent closed its side, or the controller ends the stream (agent
                # lost, shutdown): flush what is queued (acks), then end.
                while not session.outbox.empty():
                    queued = session.outbox.get_nowait()
                    if queued is not None:
                        yield _stamped(queued)
                break
        finally:
            if get is not None:
                get.cancel()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await reader
            await asyncio.shield(self._coordinator.agent_disconnected(session))

    async def _read(
        self, session: AgentSession, request_iterator: AsyncIterator[agent_service_pb2.ConnectRequest]
    ) -> None:
        async for message in request_iterator:
            body = message.WhichOneof("body")
            if body == "sample_batch":
                await self._ingest(session, message.sample_batch)
            elif body == "heartbeat":
                received_ns = time.time_ns()
                hb = message.heartbeat
                session.send(
                    agent_service_pb2.ConnectResponse(
                        heartbeat_ack=agent_service_pb2.HeartbeatAck(
                            agent_send_unix_ns=hb.agent_time.ToNanoseconds(), controller_receive_unix_ns=received_ns
                        )
                    )
                )
                h = hb.health
                self._coordinator.heartbeat(session, AgentHealthReport(h.event_loop_lag_ms, h.cpu_percent, h.in_flight))
                if hb.HasField("clock_sample"):
                    c = hb.clock_sample
                    self._coordinator.registry.clock_sample(
                        session,
                        c.agent_send_unix_ns,
                        c.controller_receive_unix_ns,
                        c.controller_send_unix_ns,
                        c.agent_receive_unix_ns,
                    )
            elif body == "goodbye":
                session.departing = True
                log.info("agent_goodbye", session_id=session.session_id, reason=message.goodbye.reason[:200])
            elif body == "assignment_update":
                await self._coordinator.assignment_update(session, message.assignment_update)
            elif body == "preflight_result":
                self._coordinator.preflight_result(message.preflight_result)
            else:
                log.warning("unexpected_agent_message", session_id=session.session_id, body=body)

    async def _ingest(self, session: AgentSession, batch: agent_service_pb2.SampleBatch) -> None:
        target = await self._coordinator.resolve_batch(batch.assignment_id)
        if target is None:
            # Nothing to attach the samples to (e.g. the run was deleted): ack so the
            # agent stops replaying, and tell it to drop the assignment.
            session.send(
                agent_service_pb2.ConnectResponse(
                    ack=agent_service_pb2.Ack(assignment_id=batch.assignment_id, batch_seq=batch.batch_seq)
                )
            )
            session.send(
                agent_service_pb2.ConnectResponse(
                    cancel=agent_service_pb2.Cancel(assignment_id=batch.assignment_id, reason="unknown assignment")
                )
            )
            return
        seq = batch.batch_seq

        def committed(outcome: IngestOutcome, stored: BatchIngest, t: IngestTarget = target) -> None:
            self._coordinator.batch_committed(session, t, batch.assignment_id, seq, outcome, stored)

        try:
            await self._ingestor.submit(target, batch, committed)
        except MalformedBatch as exc:
            log.error(
                "malformed_batch",
                session_id=session.session_id,
                assignment_id=batch.assignment_id,
                batch_seq=seq,
                error=str(exc),
            )


def _stamped(message: agent_service_pb2.ConnectResponse) -> agent_service_pb2.ConnectResponse:
    """Set a heartbeat answer's send time as late as possible (the clock exchange's t3)."""
    if message.HasField("heartbeat_ack"):
        message.heartbeat_ack.controller_send_unix_ns = time.time_ns()
    return message
