"""A hostile agent for the security tests: its own AgentService.Connect stream with an agent
key, sending whatever the test forges (someone else's assignment ids, invented samples,
impossible values), and recording how the controller ended the stream."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Mapping
from types import TracebackType

import grpc
from google.protobuf import timestamp_pb2

from common.proto.loadtest.v1 import agent_service_pb2, agent_service_pb2_grpc, run_pb2

ConnectRequest = agent_service_pb2.ConnectRequest


def forged_batch(
    assignment_id: str,
    batch_seq: int,
    n: int,
    *,
    sent_unix_ns: list[int] | None = None,
    output_tokens: int = 100_000,
    **columns: list[int],
) -> agent_service_pb2.SampleBatch:
    """`n` plausible OK samples sent just now (any column can be overridden)."""
    now = time.time_ns()
    values: dict[str, list[int]] = {
        "sent_unix_ns": sent_unix_ns or [now - 1_000_000_000 + i for i in range(n)],
        "queue_delay_ns": [0] * n,
        "first_byte_ns": [5_000_000] * n,
        "first_token_ns": [10_000_000] * n,
        "last_token_ns": [20_000_000] * n,
        "done_ns": [21_000_000] * n,
        "prompt_tokens": [64] * n,
        "output_tokens": [output_tokens] * n,
        "status": [run_pb2.REQUEST_STATUS_OK] * n,
        "flags": [1] * n,
        "itl_count": [0] * n,
    }
    values.update(columns)
    return agent_service_pb2.SampleBatch(assignment_id=assignment_id, batch_seq=batch_seq, error=[""] * n, **values)


class HostileAgent:
    """One forged agent stream: `async with HostileAgent(address, key, ...) as h:`."""

    def __init__(
        self,
        address: str,
        api_key: str,
        *,
        name: str = "hostile",
        labels: Mapping[str, str] | None = None,
        active_assignment_ids: list[str] | None = None,
        resume_tokens: Mapping[str, str] | None = None,
    ) -> None:
        self._address = address
        self._key = api_key
        self.hello = agent_service_pb2.Hello(
            name=name,
            labels=dict(labels or {}),
            version="0",
            active_assignment_ids=active_assignment_ids or [],
            resume_tokens=dict(resume_tokens or {}),
        )
        self.responses: asyncio.Queue[agent_service_pb2.ConnectResponse] = asyncio.Queue()
        self.code: grpc.StatusCode | None = None  # how the stream ended (None while open)
        self.details = ""
        self._outbound: asyncio.Queue[ConnectRequest | None] = asyncio.Queue()
        self._ended = asyncio.Event()
        self._channel: grpc.aio.Channel | None = None
        self._reader: asyncio.Task[None] | None = None

    async def __aenter__(self) -> HostileAgent:
        self._channel = grpc.aio.insecure_channel(self._address)
        self._outbound.put_nowait(ConnectRequest(hello=self.hello))
        call = agent_service_pb2_grpc.AgentServiceStub(self._channel).Connect(
            self._requests(), metadata=(("x-api-key", self._key),), timeout=60
        )
        self._reader = asyncio.create_task(self._read(call))
        return self

    async def __aexit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self._outbound.put_nowait(None)
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._reader
        if self._channel is not None:
            await self._channel.close()

    async def _requests(self) -> AsyncIterator[ConnectRequest]:
        while (message := await self._outbound.get()) is not None:
            yield message

    async def _read(self, call: grpc.aio.StreamStreamCall) -> None:
        try:
            async for message in call:
                self.responses.put_nowait(message)
            self.code, self.details = grpc.StatusCode.OK, ""
        except grpc.aio.AioRpcError as exc:
            self.code, self.details = exc.code(), exc.details() or ""
        finally:
            self._ended.set()

    def send(self, message: ConnectRequest) -> None:
        self._outbound.put_nowait(message)

    async def next(self, kind: str, timeout_s: float = 20.0) -> agent_service_pb2.ConnectResponse:
        """The next response of `kind` (others are skipped); raises if the stream ends first."""
        async with asyncio.timeout(timeout_s):
            while True:
                get = asyncio.ensure_future(self.responses.get())
                ended = asyncio.ensure_future(self._ended.wait())
                done, _ = await asyncio.wait({get, ended}, return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                if get not in done:
                    get.cancel()
                    if self.responses.empty():
                        raise AssertionError(f"stream ended ({self.code}: {self.details}) before a {kind}")
                    continue
                message = get.result()
                if message.WhichOneof("body") == kind:
                    return message

    async def ended(self, timeout_s: float = 20.0) -> tuple[grpc.StatusCode | None, str]:
        """Wait for the controller to end the stream: (code, details)."""
        async with asyncio.timeout(timeout_s):
            await self._ended.wait()
        return self.code, self.details

    async def become_placeable(self) -> None:
        """Heartbeat with clock exchanges, as a real agent does, so the controller places it."""
        for _ in range(4):
            self.send(self._heartbeat())
            ack = (await self.next("heartbeat_ack")).heartbeat_ack
            self._clock = agent_service_pb2.ClockSample(
                agent_send_unix_ns=ack.agent_send_unix_ns,
                controller_receive_unix_ns=ack.controller_receive_unix_ns,
                controller_send_unix_ns=ack.controller_send_unix_ns,
                agent_receive_unix_ns=time.time_ns(),
            )

    _clock: agent_service_pb2.ClockSample | None = None

    def _heartbeat(self) -> ConnectRequest:
        now = timestamp_pb2.Timestamp()
        now.FromNanoseconds(time.time_ns())
        return ConnectRequest(heartbeat=agent_service_pb2.Heartbeat(agent_time=now, clock_sample=self._clock))
