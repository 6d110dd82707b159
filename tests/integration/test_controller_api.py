"""RunService against a real controller: validation, errors, pagination, health, reflection."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller

pytestmark = pytest.mark.timeout(60)


def valid_spec(model: str = "m", concurrency: int = 1) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec()
    spec.target.base_url = "http://127.0.0.1:9/v1"
    spec.target.model = model
    stage = spec.stages.add(concurrency=concurrency)
    stage.duration.FromSeconds(5)
    return spec


def violations(exc: grpc.aio.AioRpcError) -> list[str]:
    status = rpc_status.from_call(exc)  # type: ignore[arg-type]
    assert status is not None
    out = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        out.extend(v.field for v in bad.field_violations)
    return out


def _no_stages() -> run_pb2.RunSpec:
    spec = valid_spec()
    del spec.stages[:]
    return spec


def _concurrency_zero() -> run_pb2.RunSpec:
    spec = valid_spec()
    spec.stages[0].concurrency = 0
    return spec


def _negative_duration() -> run_pb2.RunSpec:
    spec = valid_spec()
    spec.stages[0].duration.seconds = -5
    return spec


def _ftp_url() -> run_pb2.RunSpec:
    spec = valid_spec()
    spec.target.base_url = "ftp://127.0.0.1/v1"
    return spec


def _unknown_api_kind() -> run_pb2.RunSpec:
    spec = valid_spec()
    spec.target.api_kind = 42  # type: ignore[assignment]
    return spec


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (_no_stages, "spec.stages"),
        (_concurrency_zero, "spec.stages[0].concurrency"),
        (_negative_duration, "spec.stages[0].duration"),
        (_ftp_url, "spec.target.base_url"),
        (_unknown_api_kind, "spec.target.api_kind"),
    ],
)
async def test_invalid_spec_names_the_field(client: ControllerClient, make, field: str) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.create_run(make())
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert field in info.value.details()
    assert field in violations(info.value)
    page = await client.list_runs()
    assert list(page.runs) == []  # nothing was stored


async def test_unknown_run_is_not_found(client: ControllerClient) -> None:
    for call in (client.get_run, client.get_result, client.cancel_run, client.delete_run):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call("run_doesnotexist")
        assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_cancel_finished_run_is_failed_precondition(client: ControllerClient) -> None:
    run = await client.create_run(valid_spec())
    cancelled = await client.cancel_run(run.id, "test")
    assert cancelled.state == run_pb2.RUN_STATE_CANCELLED
    assert cancelled.state_reason == "test"
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.cancel_run(run.id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION


async def test_create_is_idempotent_with_request_id(client: ControllerClient) -> None:
    a = await client.create_run(valid_spec(), request_id="same")
    b = await client.create_run(valid_spec(), request_id="same")
    assert a.id == b.id
    assert len((await client.list_runs()).runs) == 1


async def test_pending_run_waits_for_agents_and_defaults_are_filled(client: ControllerClient) -> None:
    run = await client.create_run(valid_spec())
    assert run.state == run_pb2.RUN_STATE_PENDING
    got = await client.get_run(run.id)
    assert got.state == run_pb2.RUN_STATE_PENDING
    assert got.spec.workload.seed != 0
    assert got.spec.target.api_kind == run_pb2.API_KIND_CHAT
    assert got.spec.stages[0].name == "concurrency=1"


async def test_list_runs_paginates_newest_first_and_filters(client: ControllerClient) -> None:
    created = [await client.create_run(valid_spec(model=f"m{i % 2}")) for i in range(7)]
    await client.cancel_run(created[0].id)
    seen: list[str] = []
    token = ""
    while True:
        page = await client.list_runs(page_size=3, page_token=token)
        assert len(page.runs) <= 3
        seen.extend(r.id for r in page.runs)
        token = page.next_page_token
        if not token:
            break
    assert seen == [r.id for r in reversed(created)]
    by_model = await client.list_runs(model="m1")
    assert [r.id for r in by_model.runs] == [r.id for r in reversed(created) if r.spec.target.model == "m1"]
    by_state = await client.list_runs(state=run_pb2.RUN_STATE_CANCELLED)
    assert [r.id for r in by_state.runs] == [created[0].id]
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.list_runs(page_token="!!not-a-token")
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT


async def test_delete_requires_final_state(client: ControllerClient) -> None:
    run = await client.create_run(valid_spec())
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.delete_run(run.id)
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    await client.cancel_run(run.id)
    await client.delete_run(run.id)
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.get_run(run.id)
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


async def test_target_api_key_never_returned(client: ControllerClient, controller: Controller) -> None:
    spec = valid_spec()
    spec.target.api_key = "sk-canary-5f1e2d"
    run = await client.create_run(spec)
    assert run.spec.target.api_key == ""
    assert (await client.get_run(run.id)).spec.target.api_key == ""
    assert all(r.spec.target.api_key == "" for r in (await client.list_runs()).runs)


async def test_health_and_reflection(controller: Controller) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "loadtest.v1.RunService", "loadtest.v1.AgentService"):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(timeout=5)
        await call.write(reflection_pb2.ServerReflectionRequest(list_services=""))
        reply = await call.read()
        await call.done_writing()
        names = {s.name for s in reply.list_services_response.service}
        assert {"loadtest.v1.RunService", "loadtest.v1.AgentService", "grpc.health.v1.Health"} <= names


async def test_request_id_is_echoed(controller: Controller) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        from common.proto.loadtest.v1 import run_service_pb2, run_service_pb2_grpc

        stub = run_service_pb2_grpc.RunServiceStub(channel)
        call = stub.ListRuns(run_service_pb2.ListRunsRequest(), metadata=(("x-request-id", "req-123"),), timeout=5)
        await call
        assert ("x-request-id", "req-123") in tuple(await call.initial_metadata())
        call = stub.ListRuns(run_service_pb2.ListRunsRequest(), timeout=5)
        await call
        generated = dict(tuple(await call.initial_metadata()))["x-request-id"]
        assert len(generated) == 32
