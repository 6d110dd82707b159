"""The authorization matrix: every method of every served service (enumerated from the
descriptors) x {admin, bootstrap, agent, reader, no key, revoked, expired, malformed}, with
reads public and with reads closed, checked against the role table in controller/auth.py.
A method without a table entry fails the test."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from common.proto.loadtest.v1 import agent_service_pb2, dataset_service_pb2, key_service_pb2, run_service_pb2
from controller.auth import METHOD_RULES, Kind
from controller.domain.access.keys import Role
from controller.server import SERVICE_NAMES, Controller
from tests.security.conftest import NO_LIMITS

pytestmark = pytest.mark.timeout(90)

BOOTSTRAP = "bootstrap-admin-key-for-tests"
DENIED = {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
# An allowed call with an empty request may be refused as invalid, never fail like this.
# (UNIMPLEMENTED is the servicer's own answer, e.g. Health/List in this grpcio version.)
BROKEN = {
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
Creds = dict[str, tuple[str | None, Role | None, bool]]  # label -> (key, role, valid)
Secured = tuple[Controller, Creds]
MODULES = (run_service_pb2, agent_service_pb2, key_service_pb2, dataset_service_pb2, health_pb2, reflection_pb2)


def all_methods() -> list[tuple[str, bool, bool]]:
    """(path, client streaming, server streaming) of every method of every service we serve."""
    out = []
    for module in MODULES:
        for service in module.DESCRIPTOR.services_by_name.values():
            for m in service.methods:
                out.append((f"/{service.full_name}/{m.name}", m.client_streaming, m.server_streaming))
    return sorted(out)


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # pragma: no cover - makes this an async generator


async def call(channel: grpc.aio.Channel, method: str, cs: bool, ss: bool, key: str | None) -> grpc.StatusCode:
    """Call `method` with an empty request; the status, or OK once a first response arrives."""
    metadata = (("x-api-key", key),) if key is not None else ()
    try:
        if not cs and not ss:
            await channel.unary_unary(method)(b"", metadata=metadata, timeout=5)
            return grpc.StatusCode.OK
        if cs and not ss:
            await channel.stream_unary(method)(_nothing(), metadata=metadata, timeout=5)
            return grpc.StatusCode.OK
        stream = (
            channel.stream_stream(method)(_nothing(), metadata=metadata, timeout=5)
            if cs
            else channel.unary_stream(method)(b"", metadata=metadata, timeout=5)
        )
        first = await stream.read()
        if first is not grpc.aio.EOF:
            stream.cancel()
            return grpc.StatusCode.OK
        code: grpc.StatusCode = await stream.code()
        return code
    except grpc.aio.AioRpcError as exc:
        return exc.code()


def expected(method: str, role: Role | None, valid: bool, reads_closed: bool) -> set[grpc.StatusCode] | None:
    """None when the call must be allowed; else the acceptable refusal codes."""
    rule = METHOD_RULES[method]
    if rule.kind is Kind.PUBLIC or (rule.kind is Kind.READ and not reads_closed):
        return None
    if not valid:
        return {grpc.StatusCode.UNAUTHENTICATED}
    assert role is not None
    return None if role in rule.roles else {grpc.StatusCode.PERMISSION_DENIED}


@pytest.fixture(params=[False, True], ids=["public-reads", "closed-reads"])
async def secured(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Secured]:
    c = Controller(
        str(tmp_path / "matrix.db"), api_key=BOOTSTRAP, require_auth_for_reads=request.param, rate_limits=NO_LIMITS
    )
    await c.start("127.0.0.1:0")
    try:
        _, admin = await c.keys.create("admin-1", Role.ADMIN)
        _, agent = await c.keys.create("agent-1", Role.AGENT)
        _, reader = await c.keys.create("reader-1", Role.READER)
        revoked_record, revoked = await c.keys.create("gone", Role.ADMIN)
        await c.keys.revoke(revoked_record.key_id)
        _, expired = await c.keys.issue("old", Role.ADMIN, expires_at_ns=time.time_ns() - 1)
        creds: Creds = {
            "admin": (admin, Role.ADMIN, True),
            "bootstrap": (BOOTSTRAP, Role.ADMIN, True),
            "agent": (agent, Role.AGENT, True),
            "reader": (reader, Role.READER, True),
            "no key": (None, None, False),
            "revoked": (revoked, None, False),
            "expired": (expired, None, False),
            "malformed": ("llt_nothex_x", None, False),
            "wrong secret": (admin[:-4] + "AAAA", None, False),
            "garbage": ("not a key at all", None, False),
        }
        yield c, creds
    finally:
        await c.stop(1.0)


def test_every_method_has_a_rule() -> None:
    missing = [m for m, _, _ in all_methods() if m not in METHOD_RULES]
    assert not missing, f"RPCs without an entry in controller.auth.METHOD_RULES: {missing}"
    # And the table names nothing that does not exist (a typo would leave a method unruled).
    assert set(METHOD_RULES) <= {m for m, _, _ in all_methods()}


async def test_authorization_matrix(secured: Secured) -> None:
    controller, creds = secured
    reads_closed = controller.auth.require_auth_for_reads
    failures = []
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        # The served services are exactly the ones enumerated from the descriptors.
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]),
            metadata=(("x-api-key", BOOTSTRAP),),
            timeout=5,
        )
        served = {s.name async for r in replies for s in r.list_services_response.service}
        enumerated = {m.split("/")[1] for m, _, _ in all_methods()}
        assert served == enumerated, (served, enumerated)
        assert set(SERVICE_NAMES) <= served

        for method, cs, ss in all_methods():
            for label, (key, role, valid) in creds.items():
                code = await call(channel, method, cs, ss, key)
                want = expected(method, role, valid, reads_closed)
                if want is None and code in DENIED:
                    failures.append(f"{method} as {label}: refused with {code.name}, should be allowed")
                elif want is None and code in BROKEN:
                    failures.append(f"{method} as {label}: allowed but failed with {code.name}")
                elif want is not None and code not in want:
                    failures.append(f"{method} as {label}: {code.name}, expected {sorted(c.name for c in want)}")
    assert not failures, "\n".join(failures)


async def test_spot_checks_and_audit(secured: Secured) -> None:
    """A few outcomes spelled out (independent of the table), and the audit rows they leave."""
    controller, creds = secured
    reader_key = creds["reader"][0]
    assert reader_key is not None
    reader_id = reader_key.split("_")[1]
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        create = ("/loadtest.v1.RunService/CreateRun", False, False)
        assert await call(channel, *create, reader_key) == grpc.StatusCode.PERMISSION_DENIED
        assert await call(channel, *create, None) == grpc.StatusCode.UNAUTHENTICATED
        assert await call(channel, *create, creds["admin"][0]) == grpc.StatusCode.INVALID_ARGUMENT  # allowed
        connect = ("/loadtest.v1.AgentService/Connect", True, True)
        assert await call(channel, *connect, reader_key) == grpc.StatusCode.PERMISSION_DENIED
        assert await call(channel, *connect, creds["agent"][0]) == grpc.StatusCode.INVALID_ARGUMENT  # no Hello
        audit = ("/loadtest.v1.KeyService/ListAuditEvents", False, False)
        assert await call(channel, *audit, creds["agent"][0]) == grpc.StatusCode.PERMISSION_DENIED
        health = ("/grpc.health.v1.Health/Check", False, False)
        assert await call(channel, *health, None) == grpc.StatusCode.OK
        list_runs = ("/loadtest.v1.RunService/ListRuns", False, False)
        closed = controller.auth.require_auth_for_reads
        assert await call(channel, *list_runs, None) == (
            grpc.StatusCode.UNAUTHENTICATED if closed else grpc.StatusCode.OK
        )
        assert await call(channel, *list_runs, creds["agent"][0]) == (
            grpc.StatusCode.PERMISSION_DENIED if closed else grpc.StatusCode.OK
        )

    rows, _ = await controller.audit.list(1000, "")
    denied = [r for r in rows if r.key_id == reader_id and r.method.endswith("/CreateRun")]
    assert denied and denied[0].outcome == "PERMISSION_DENIED"
    assert denied[0].peer.startswith("ipv") and denied[0].request_id
    anonymous = [r for r in rows if r.key_id == "" and r.method.endswith("/CreateRun")]
    assert anonymous and anonymous[0].outcome == "UNAUTHENTICATED"
    admitted = [r for r in rows if r.key_id == creds["admin"][0].split("_")[1]]  # type: ignore[union-attr]
    assert admitted and admitted[0].outcome == "INVALID_ARGUMENT"  # mutating calls are audited when allowed too
    for r in rows:  # the audit log holds key ids, never keys
        for key, _, _ in creds.values():
            if key and len(key) > 20:
                assert key not in f"{r}"
