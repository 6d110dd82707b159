"""API-key auth on a real controller: writes and agent streams need the key, reads do not,
and a refused bidi Connect fails at once instead of at its deadline."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import agent_service_pb2, agent_service_pb2_grpc
from controller.server import Controller
from tests.integration.test_controller_api import valid_spec

pytestmark = pytest.mark.timeout(60)
KEY = "test-admin-key-123"


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Controller]:
    c = Controller(str(tmp_path / "auth.db"), api_key=KEY)
    await c.start("127.0.0.1:0")
    try:
        yield c
    finally:
        await c.stop(1.0)


@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_create_run_needs_the_key(secured: Controller, key: str | None) -> None:
    async with ControllerClient(f"127.0.0.1:{secured.port}", api_key=key) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.create_run(valid_spec())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        # Reads stay public.
        assert list((await client.list_runs()).runs) == []


@pytest.mark.parametrize(
    ("key", "says", "never"),
    [
        (None, ["--api-key", "LLM_LOADTEST_API_KEY"], []),
        # The bootstrap key may be of any form: a wrong one is not told to look like llt_...
        ("wrong-key", ["not the bootstrap key"], ["expected llt_"]),
    ],
)
async def test_a_refused_key_says_what_to_do(
    secured: Controller, key: str | None, says: list[str], never: list[str]
) -> None:
    async with ControllerClient(f"127.0.0.1:{secured.port}", api_key=key) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.create_run(valid_spec())
    details = info.value.details() or ""
    assert all(text in details for text in says) and not any(text in details for text in never), details


async def test_create_run_with_key_and_bearer(secured: Controller) -> None:
    async with ControllerClient(f"127.0.0.1:{secured.port}", api_key=KEY) as client:
        run = await client.create_run(valid_spec())
        assert (await client.get_run(run.id)).id == run.id
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        from common.proto.loadtest.v1 import run_service_pb2, run_service_pb2_grpc

        stub = run_service_pb2_grpc.RunServiceStub(channel)
        reply = await stub.CreateRun(
            run_service_pb2.CreateRunRequest(spec=valid_spec()),
            metadata=(("authorization", f"Bearer {KEY}"),),
            timeout=5,
        )
        assert reply.run.id


async def _hello() -> AsyncIterator[agent_service_pb2.ConnectRequest]:
    yield agent_service_pb2.ConnectRequest(hello=agent_service_pb2.Hello(name="t"))


@pytest.mark.parametrize("key", [None, "wrong-key"])
async def test_connect_refused_fast(secured: Controller, key: str | None) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        metadata = (("x-api-key", key),) if key else ()
        started = time.monotonic()
        call = stub.Connect(_hello(), metadata=metadata, timeout=30)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - started < 5  # not at the 30 s deadline


async def test_connect_with_key_gets_welcome(secured: Controller) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{secured.port}") as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        call = stub.Connect(_hello(), metadata=(("x-api-key", KEY),), timeout=10)
        first = await call.read()
        assert first.WhichOneof("body") == "welcome"
        assert first.welcome.session_id.startswith("ses_")
        call.cancel()
