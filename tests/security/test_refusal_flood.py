"""A client flooding a real controller with refused calls: wrong, unknown and revoked keys and
a reader key calling what it may not, over several connections (so several ephemeral ports)
from one address. Past the per-address refusal burst the flood gets RESOURCE_EXHAUSTED, the
audit log grows by a handful of aggregated rows whose counts add up to the calls, and a valid
key used from the same address keeps working, its mutating calls audited one row each."""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import key_service_pb2, run_service_pb2
from controller.domain.access.keys import Role
from controller.domain.access.ratelimit import DEFAULT_REFUSAL_BURST, DEFAULT_REFUSAL_RATE, RateLimits
from controller.server import Controller
from controller.store.security import AuditRecord
from tests.conftest import eventually
from tests.integration.test_controller_api import valid_spec

pytestmark = pytest.mark.timeout(120)

BOOTSTRAP = "bootstrap-key-for-flood-tests"
CREATE_RUN = "/loadtest.v1.RunService/CreateRun"
REFUSALS = {"UNAUTHENTICATED", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED"}
CONNECTIONS = 5
CALLS_PER_CONNECTION = 100
# Default refusal limits (what a deployment gets); generous write/read limits so the valid
# key's own calls are never the ones limited.
LIMITS = RateLimits(write_rate=1000, write_burst=1000, read_rate=1000, read_burst=1000)


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    c = Controller(str(tmp_path / "flood.db"), api_key=BOOTSTRAP, rate_limits=LIMITS)
    await c.start("127.0.0.1:0")
    try:
        yield c
    finally:
        await c.stop(1.0)


async def _refused_create(channel: grpc.aio.Channel, key: str) -> grpc.aio.AioRpcError:
    """A CreateRun the controller must refuse; the error it answered."""
    create = channel.unary_unary(
        CREATE_RUN,
        request_serializer=run_service_pb2.CreateRunRequest.SerializeToString,
        response_deserializer=run_service_pb2.CreateRunResponse.FromString,
    )
    try:
        await create(run_service_pb2.CreateRunRequest(spec=valid_spec()), metadata=(("x-api-key", key),), timeout=10)
    except grpc.aio.AioRpcError as exc:
        return exc
    raise AssertionError(f"a CreateRun with key {key[:8]}... was allowed")


async def _cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, out.decode(), err.decode()


@pytest.mark.e2e
async def test_refusal_flood_is_limited_and_aggregated(controller: Controller) -> None:
    admin_record, admin = await controller.keys.create("admin-1", Role.ADMIN)
    _, reader = await controller.keys.create("reader-1", Role.READER)
    revoked_record, revoked = await controller.keys.create("gone", Role.ADMIN)
    await controller.keys.revoke(revoked_record.key_id)
    bad_keys = [
        admin[:-4] + "AAAA",  # a real key id, a wrong secret
        "llt_0123456789ab_" + "x" * 43,  # an unknown key id
        revoked,
        reader,  # valid, but a reader may not create runs: PERMISSION_DENIED
    ]
    before, _ = await controller.audit.list(1000, "")
    codes: list[grpc.StatusCode] = []
    started = time.monotonic()
    address = f"127.0.0.1:{controller.port}"
    async with ControllerClient(address, api_key=admin) as legit:
        for connection in range(CONNECTIONS):
            # A new channel per round: a new connection, so a new ephemeral port.
            async with grpc.aio.insecure_channel(address) as channel:
                for i in range(CALLS_PER_CONNECTION):
                    error = await _refused_create(channel, bad_keys[i % len(bad_keys)])
                    codes.append(error.code())
                    if error.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and i == CALLS_PER_CONNECTION - 1:
                        # Throttled refusals say when to retry and what the call's refusal was.
                        assert "too many refused calls from this address" in error.details()
                        assert "a reader key may not call" in error.details()
                        status = rpc_status.from_call(error)  # type: ignore[arg-type]
                        assert status is not None
                        retry = error_details_pb2.RetryInfo()
                        assert any(d.Unpack(retry) for d in status.details)
                        assert retry.retry_delay.ToNanoseconds() > 0
            # The valid key, from the same address, is unaffected by the flood.
            await legit.create_run(valid_spec(model=f"legit-{connection}"))
            assert admin_record.key_id in {k.id for k in await legit.list_keys()}

    elapsed_s = time.monotonic() - started
    calls = CONNECTIONS * CALLS_PER_CONNECTION
    counted = Counter(c.name for c in codes)
    # The burst is answered as refused, in full and first; then only what the bucket refilled
    # meanwhile (one address, one bucket, whatever the connection): the rest is throttled.
    burst = int(DEFAULT_REFUSAL_BURST)
    assert all(c != grpc.StatusCode.RESOURCE_EXHAUSTED for c in codes[:burst]), codes[:burst]
    answered = calls - counted["RESOURCE_EXHAUSTED"]
    assert answered <= burst + math.ceil(elapsed_s * DEFAULT_REFUSAL_RATE) + 1, (counted, elapsed_s)
    assert counted["RESOURCE_EXHAUSTED"] >= calls * 0.8, counted
    assert set(counted) <= REFUSALS

    def refusal_rows(rows: list[AuditRecord]) -> list[AuditRecord]:
        old = {r.pk for r in before}
        return [r for r in rows if r.pk not in old and r.method == CREATE_RUN and r.outcome in REFUSALS]

    async def new_rows() -> list[AuditRecord]:
        return refusal_rows((await controller.audit.list(1000, ""))[0])

    # Counts are brought up to date within a second or so of the calls.
    rows = await eventually(new_rows, lambda rs: sum(r.count for r in rs) == calls, timeout_s=20)
    # One row per address, key id and outcome per minute: a handful, not one per call.
    assert len(rows) <= 2 * (len(bad_keys) + 1), [(r.key_id, r.outcome, r.count) for r in rows]
    assert {r.peer for r in rows} == {"ipv4:127.0.0.1"}  # the address, without the port
    by_outcome = Counter[str]()
    for r in rows:
        by_outcome[r.outcome] += r.count
    assert by_outcome == counted
    # The valid key's mutating calls keep a row each.
    all_rows, _ = await controller.audit.list(1000, "", key_id=admin_record.key_id)
    created = [r for r in all_rows if r.method == CREATE_RUN and r.outcome == "OK"]
    assert len(created) == CONNECTIONS and all(r.count == 1 for r in created)

    # `llm-loadtest audit` shows the counts (here straight from the database file).
    code, out, err = await _cli("audit", "--db", controller.db.path, "--json", "--limit", "1000")
    assert code == 0, err
    shown = [e for e in json.loads(out) if e["method"] == CREATE_RUN and e["outcome"] in REFUSALS]
    assert sum(e["count"] for e in shown) == calls
    # And ListAuditEvents carries them.
    async with ControllerClient(address, api_key=admin) as legit:
        events = (await legit.list_audit_events(1000)).events
    assert sum(e.count for e in events if e.method == CREATE_RUN and e.outcome in REFUSALS) == calls
    assert all(e.count == 1 for e in events if e.outcome == "OK")


async def test_missing_key_refusals_share_the_address_bucket(controller: Controller) -> None:
    """Calls with no key at all are refusals like the others: limited per address."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        list_keys = channel.unary_unary(
            "/loadtest.v1.KeyService/ListKeys",
            request_serializer=key_service_pb2.ListKeysRequest.SerializeToString,
            response_deserializer=key_service_pb2.ListKeysResponse.FromString,
        )
        codes = []
        for _ in range(int(DEFAULT_REFUSAL_BURST) + 30):
            with pytest.raises(grpc.aio.AioRpcError) as info:
                await list_keys(key_service_pb2.ListKeysRequest(), timeout=10)
            codes.append(info.value.code())
    assert codes[0] == grpc.StatusCode.UNAUTHENTICATED
    assert codes[-1] == grpc.StatusCode.RESOURCE_EXHAUSTED
