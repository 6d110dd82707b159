"""API keys on a real controller: the database holds no secret, a revoked key's open stream
ends within 5 s (revoked over gRPC, or with the CLI on the database file), an expired key is
refused, and the per-key write limit answers RESOURCE_EXHAUSTED with retry info."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from agent.controller_link import AgentAuthError, run_agent
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import agent_service_pb2, agent_service_pb2_grpc, key_service_pb2
from controller.domain.access.keys import Role
from controller.domain.access.ratelimit import RateLimits
from controller.server import Controller
from tests.conftest import eventually
from tests.integration.test_controller_api import valid_spec

pytestmark = pytest.mark.timeout(60)

BOOTSTRAP = "bootstrap-key-for-key-tests"
REVOKE_WITHIN_S = 5.0


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    c = Controller(str(tmp_path / "keys.db"), api_key=BOOTSTRAP, rate_limits=RateLimits(1000, 1000, 1000, 1000))
    await c.start("127.0.0.1:0")
    try:
        yield c
    finally:
        await c.stop(1.0)


def _db_bytes(path: str) -> bytes:
    return b"".join(p.read_bytes() for p in (Path(path), Path(path + "-wal")) if p.exists())


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    return proc.returncode or 0, out.decode(), err.decode()


async def _hello() -> AsyncIterator[agent_service_pb2.ConnectRequest]:
    yield agent_service_pb2.ConnectRequest(hello=agent_service_pb2.Hello(name="raw"))
    await asyncio.Event().wait()  # keep our side open


@pytest.mark.e2e
async def test_database_holds_no_secret(controller: Controller) -> None:
    async with ControllerClient(f"127.0.0.1:{controller.port}", api_key=BOOTSTRAP) as admin:
        created = await admin.create_key("edge-1", key_service_pb2.KEY_ROLE_AGENT, ttl_s=3600)
        token = created.secret
        assert token.startswith(f"llt_{created.key.id}_")
        listed = await admin.list_keys()
        assert [k.id for k in listed] == [created.key.id]
        assert token not in str(listed)
    code, out, err = await _cli("keys", "create", "--db", controller.db.path, "--role", "reader", "--name", "cli")
    assert code == 0, err
    cli_token = out.strip()
    assert cli_token.startswith("llt_") and cli_token not in err
    raw = _db_bytes(controller.db.path)
    for t in (token, cli_token):
        secret = t.split("_", 2)[2]
        assert t.encode() not in raw and secret.encode() not in raw
        assert t.split("_")[1].encode() in raw  # the id is there: it is how keys are found
    # Both keys work (the controller sees keys written by another process).
    async with ControllerClient(f"127.0.0.1:{controller.port}", api_key=cli_token) as reader:
        await reader.list_runs()


async def test_revoked_key_ends_running_agent(controller: Controller) -> None:
    """Revoked over gRPC: the real agent's stream ends and the agent stops (refused)."""
    _, token = await controller.keys.create("edge-2", Role.AGENT)
    stop = asyncio.Event()
    agent = asyncio.create_task(run_agent(f"127.0.0.1:{controller.port}", "edge-2", {}, token, stop))
    try:
        async with ControllerClient(f"127.0.0.1:{controller.port}", api_key=BOOTSTRAP) as admin:
            await eventually(admin.list_agents, lambda agents: len(agents) == 1, timeout_s=15)
            started = time.monotonic()
            await admin.revoke_key(token.split("_")[1])
            with pytest.raises(AgentAuthError):
                await asyncio.wait_for(agent, REVOKE_WITHIN_S + 5)
            assert time.monotonic() - started < REVOKE_WITHIN_S
            await eventually(admin.list_agents, lambda agents: not agents, timeout_s=5)
            events, _ = await controller.audit.list(100, "")
            assert any(e.outcome == "UNAUTHENTICATED" and e.method.endswith("/Connect") for e in events)
    finally:
        stop.set()
        agent.cancel()
        await asyncio.gather(agent, return_exceptions=True)


@pytest.mark.e2e
async def test_key_revoked_on_the_database_ends_stream(controller: Controller) -> None:
    """Revoked by another process (`llm-loadtest keys revoke --db`): noticed within 5 s."""
    record, token = await controller.keys.create("edge-3", Role.AGENT)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        call = agent_service_pb2_grpc.AgentServiceStub(channel).Connect(
            _hello(), metadata=(("x-api-key", token),), timeout=30
        )
        assert (await call.read()).WhichOneof("body") == "welcome"
        code, _, err = await _cli("keys", "revoke", "--db", controller.db.path, record.key_id)
        assert code == 0, err
        started = time.monotonic()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while True:
                message = await call.read()
                assert message is not grpc.aio.EOF
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert time.monotonic() - started < REVOKE_WITHIN_S
        assert record.key_id in (info.value.details() or "") and token not in (info.value.details() or "")
    # New calls with it are refused too.
    async with ControllerClient(f"127.0.0.1:{controller.port}", api_key=token) as client:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.create_run(valid_spec())
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_expired_key_refused(controller: Controller) -> None:
    _, token = await controller.keys.issue("old", Role.ADMIN, expires_at_ns=time.time_ns() - 1)
    async with ControllerClient(f"127.0.0.1:{controller.port}", api_key=token) as client:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.create_run(valid_spec())
        assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "expired" in (info.value.details() or "")
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        call = agent_service_pb2_grpc.AgentServiceStub(channel).Connect(
            _hello(), metadata=(("authorization", f"Bearer {token}"),), timeout=10
        )
        with pytest.raises(grpc.aio.AioRpcError) as connect:
            await call.read()
        assert connect.value.code() == grpc.StatusCode.UNAUTHENTICATED


async def test_bad_key_creation_is_invalid(controller: Controller) -> None:
    async with ControllerClient(f"127.0.0.1:{controller.port}", api_key=BOOTSTRAP) as admin:
        for name, role in (("", key_service_pb2.KEY_ROLE_AGENT), ("x", key_service_pb2.KEY_ROLE_UNSPECIFIED)):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await admin.create_key(name, role)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await admin.revoke_key("0123456789ab")
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND


async def test_write_rate_limit_per_key(tmp_path: Path) -> None:
    c = Controller(str(tmp_path / "limits.db"), api_key=BOOTSTRAP, rate_limits=RateLimits(0.5, 3, 1000, 1000))
    await c.start("127.0.0.1:0")
    try:
        _, first = await c.keys.create("a", Role.ADMIN)
        _, second = await c.keys.create("b", Role.ADMIN)
        async with (
            ControllerClient(f"127.0.0.1:{c.port}", api_key=first) as a,
            ControllerClient(f"127.0.0.1:{c.port}", api_key=second) as b,
        ):
            for _ in range(3):
                await a.create_run(valid_spec())
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await a.create_run(valid_spec())
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            status = rpc_status.from_call(info.value)  # type: ignore[arg-type]
            assert status is not None
            retry = error_details_pb2.RetryInfo()
            assert any(d.Unpack(retry) for d in status.details)
            assert 0 < retry.retry_delay.ToNanoseconds() / 1e9 <= 2.0  # one token at 0.5/s
            # Another key's writes, and this key's reads, are not affected.
            await b.create_run(valid_spec())
            assert len((await a.list_runs()).runs) == 4
        rows, _ = await c.audit.list(100, "")
        assert any(r.outcome == "RESOURCE_EXHAUSTED" and r.key_id == first.split("_")[1] for r in rows)
    finally:
        await c.stop(1.0)
