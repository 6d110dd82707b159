"""AgentService.Connect: one bidi stream per agent.

A reader task consumes the agent's messages in order (Hello first, then heartbeats,
updates and sample batches); the response side drains the session's outbox. Sample
batches go to the ingest queue; their acks come back through the outbox after commit.

Integrity (docs/security.md, "Agent stream integrity"): a session reports only for the
assignments it owns (given to it, or proved in Hello with their resume tokens). A report
for another existing assignment ends the stream with PERMISSION_DENIED, a batch with
impossible values with INVALID_ARGUMENT; either way the stream reads nothing more,
nothing of the message is stored, and the refusal is an audit row.
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
from controller.domain.access.audit import AuditEntry, AuditLog
from controller.domain.execution.agents import AgentHealthReport, AgentSession
from controller.domain.execution.coordinator import RunCoordinator
from controller.domain.execution.loss import AssignmentRefused
from controller.domain.results.ingest import Ingestor, IngestTarget, MalformedBatch
from controller.domain.uploads import DatasetLibrary
from controller.servicers.dataset_service import fetch
from controller.servicers.errors import stream_errors
from controller.store.repository import BatchIngest, IngestOutcome

log = structlog.get_logger(__name__)

HELLO_TIMEOUT_S = 10.0
CONNECT_METHOD = "/loadtest.v1.AgentService/Connect"


class _Refusal(Exception):
    """Ends the stream with `code`: the agent sent something it may not (already audited)."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class AgentServiceServicer(agent_service_pb2_grpc.AgentServiceServicer):
    def __init__(
        self,
        coordinator: RunCoordinator,
        ingestor: Ingestor,
        heartbeat_interval_s: float = 1.0,
        audit: AuditLog | None = None,
        datasets: DatasetLibrary | None = None,
    ) -> None:
        self._coordinator = coordinator
        self._ingestor = ingestor
        self._heartbeat_interval_s = heartbeat_interval_s
        self._audit = audit
        self._datasets = datasets

    @stream_errors
    async def FetchDataset(
        self, request: agent_service_pb2.FetchDatasetRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[agent_service_pb2.FetchDatasetResponse]:
        if self._datasets is None:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "this controller serves no datasets")
            return
        async for message in fetch(self._datasets, request):
            yield message

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
        peer = context.peer()
        try:
            session.owned = await self._coordinator.prove_resume(
                list(hello.active_assignment_ids), dict(hello.resume_tokens)
            )
        except AssignmentRefused as exc:
            await self._refuse(peer, session, grpc.StatusCode.PERMISSION_DENIED, exc.message, exc.run_id)
            _end_with(context, grpc.StatusCode.PERMISSION_DENIED, exc.message)
            return
        interval, lease = duration_pb2.Duration(), duration_pb2.Duration()
        interval.FromNanoseconds(int(self._heartbeat_interval_s * 1e9))
        lease.FromNanoseconds(int(self._coordinator.lease_s * 1e9))
        yield agent_service_pb2.ConnectResponse(
            welcome=agent_service_pb2.Welcome(
                session_id=session.session_id, heartbeat_interval=interval, lease_duration=lease
            )
        )
        await self._coordinator.agent_connected(session, list(hello.active_assignment_ids))
        reader = asyncio.create_task(self._read(session, request_iterator, peer), name=f"read-{session.session_id}")
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
        refusal = reader.exception() if reader.done() and not reader.cancelled() else None
        if isinstance(refusal, _Refusal):
            _end_with(context, refusal.code, refusal.message)

    async def _refuse(self, peer: str, session: AgentSession, code: grpc.StatusCode, message: str, run_id: str) -> None:
        """Log and audit a refusal (the caller ends the stream)."""
        bound = structlog.contextvars.get_contextvars()
        log.warning(
            "agent_message_refused",
            session_id=session.session_id,
            agent=session.name,
            code=code.name,
            run_id=run_id,
            reason=message,
        )
        if self._audit is None:
            return
        entry = AuditEntry(
            str(bound.get("key_id", "")),
            CONNECT_METHOD,
            code.name,
            str(bound.get("request_id", "")),
            peer,
            run_id,
            f"session {session.session_id}: {message}",
        )
        try:
            await self._audit.record(entry)
        except Exception:  # the refusal matters more than its audit row
            log.exception("audit_write_failed")

    async def _owned(self, peer: str, session: AgentSession, assignment_id: str, what: str) -> bool:
        """True if the session may report for the assignment; False if there is no such
        assignment; raises _Refusal for somebody else's."""
        if assignment_id in session.owned:
            return True
        run_id = await self._coordinator.run_of_assignment(assignment_id)
        if run_id is None:
            return False
        message = f"{what} for assignment {assignment_id[:64]}, which was not given to this session"
        await self._refuse(peer, session, grpc.StatusCode.PERMISSION_DENIED, message, run_id)
        session.close(message)
        raise _Refusal(grpc.StatusCode.PERMISSION_DENIED, message)

    async def _read(
        self, session: AgentSession, request_iterator: AsyncIterator[agent_service_pb2.ConnectRequest], peer: str
    ) -> None:
        async for message in request_iterator:
            body = message.WhichOneof("body")
            if body == "sample_batch":
                await self._ingest(session, message.sample_batch, peer)
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
                    self._coordinator.clock_sample(
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
                update = message.assignment_update
                # An unknown assignment's update only earns an ack; the coordinator ignores it.
                await self._owned(peer, session, update.assignment_id, "AssignmentUpdate")
                await self._coordinator.assignment_update(session, update)
            elif body == "preflight_result":
                self._coordinator.preflight_result(session, message.preflight_result)
            else:
                log.warning("unexpected_agent_message", session_id=session.session_id, body=body)

    async def _ingest(self, session: AgentSession, batch: agent_service_pb2.SampleBatch, peer: str) -> None:
        owned = await self._owned(peer, session, batch.assignment_id, "SampleBatch")
        target = await self._coordinator.resolve_batch(batch.assignment_id) if owned else None
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
            # Refused whole: not stored, not acked (a replay is refused again), the stream ends.
            message = str(exc)
            await self._refuse(peer, session, grpc.StatusCode.INVALID_ARGUMENT, message, target.run_id)
            await self._coordinator.batch_refused(session, batch.assignment_id, message)
            session.close(message)
            raise _Refusal(grpc.StatusCode.INVALID_ARGUMENT, message) from None


def _end_with(context: grpc.aio.ServicerContext, code: grpc.StatusCode, message: str) -> None:
    """End the stream with a status once the handler returns. Not `abort`: that sends the
    status at once, and the call's end then cancels the handler while the auth wrapper is
    still iterating it (controller/auth.py `_until`), which turned the refusal into INTERNAL."""
    context.set_code(code)
    context.set_details(message)


def _stamped(message: agent_service_pb2.ConnectResponse) -> agent_service_pb2.ConnectResponse:
    """Set a heartbeat answer's send time as late as possible (the clock exchange's t3)."""
    if message.HasField("heartbeat_ack"):
        message.heartbeat_ack.controller_send_unix_ns = time.time_ns()
    return message
