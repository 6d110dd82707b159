"""Targets that misbehave, with the real controller, a real agent and the real mock on 127.0.0.1.

* A server that closes kept-alive connections (llama-server's way): no failed request, the
  retries counted per stage and warned about.
* The preflight check: a model the server does not list, an unreachable target and a server
  answering 501 fail the run before any load, with the reason; `skip_preflight` goes ahead;
  a server answering as another model is a warning.
* A dead target (`kill -9` of the mock process mid-stage) fails the run after the target's
  `unreachable_timeout`, with a bounded number of requests meanwhile (back-off).
* A frozen target (SIGSTOP: connections open, nothing answers) shows as a stall event.
"""

from __future__ import annotations

import asyncio
import re
import signal
import socket
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from controller.store import repository as repo
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.integration.test_run_end_to_end import mock_stats, running_agent, spec_for, wait_final
from tests.processes import Proc

pytestmark = pytest.mark.timeout(90)

# The failures below must come quickly: well before a stage would have ended.
FAST_S = 15.0


def spec_at(base_url: str, concurrency: int, seconds: float) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(display_name="faults")
    spec.target.base_url, spec.target.model = base_url, "mock"
    spec.workload.synthetic.input_tokens.fixed = 32
    spec.workload.synthetic.output_tokens.fixed = 16
    stage = spec.stages.add(concurrency=concurrency)
    stage.duration.FromNanoseconds(int(seconds * 1e9))
    return spec


async def stored(controller: Controller, run_id: str) -> int:
    record = await controller.db.read(repo.get_run, run_id)
    assert record is not None
    return int(await controller.db.read(repo.count_samples, record.pk))


async def test_a_server_closing_every_connection_causes_no_failure_and_is_reported(
    controller: Controller, client: ControllerClient
) -> None:
    config = MockConfig(ttft_ms=5, itl_ms=1, output_tokens=8, connections="close_after_response")
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        run = await client.create_run(spec_for(mock, [(4, 2.0)], output_tokens=8))
        final = await wait_final(client, run.id)
        result = await client.get_result(run.id)
        stats = await mock_stats(mock)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    stage = result.stages[0]
    assert stage.requests_failed == 0 and stage.requests_ok > 20
    assert stage.requests_retried > 0
    assert stage.requests_retried <= stage.requests_ok
    # Retried attempts never reached the model: it saw each request once (and the check's).
    assert stats["requests_total"] == stage.requests_ok + 1
    assert any("closed the kept-alive connection" in w for w in result.warnings), result.warnings


async def test_preflight_fails_a_run_for_a_model_the_server_does_not_serve(
    controller: Controller, client: ControllerClient
) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=4)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = spec_for(mock, [(4, 30.0)])
        spec.target.model = "llama-3-70b"
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, FAST_S)
        stats = await mock_stats(mock)
    assert final.state == run_pb2.RUN_STATE_FAILED
    assert f"model 'llama-3-70b' is not served by {mock.base_url}; the server lists: mock" in final.state_reason
    assert stats["requests_total"] == 0  # the model list was enough: no completion request
    assert await stored(controller, run.id) == 0


async def test_preflight_fails_a_run_whose_target_is_unreachable(
    controller: Controller, client: ControllerClient
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: connections are refused
    async with running_agent(f"127.0.0.1:{controller.port}"):
        spec = spec_at(f"http://127.0.0.1:{port}/v1", 4, 30.0)
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, FAST_S)
    assert final.state == run_pb2.RUN_STATE_FAILED
    assert f"cannot connect to http://127.0.0.1:{port}/v1" in final.state_reason
    assert await stored(controller, run.id) == 0


@pytest.fixture
async def not_implemented() -> AsyncIterator[tuple[str, list[str]]]:
    """A server answering 501 to everything; yields its base URL and the paths it was asked."""
    asked: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(f"{request.method} {request.path}")
        return web.json_response({"error": {"message": "Not Implemented"}}, status=501)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1", asked
    finally:
        await runner.cleanup()


async def test_preflight_fails_a_run_against_a_501_server(
    controller: Controller, client: ControllerClient, not_implemented: tuple[str, list[str]]
) -> None:
    base_url, asked = not_implemented
    async with running_agent(f"127.0.0.1:{controller.port}"):
        spec = spec_at(base_url, 4, 30.0)
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, FAST_S)
    assert final.state == run_pb2.RUN_STATE_FAILED
    assert "HTTP 501: Not Implemented" in final.state_reason
    assert "does the server implement this endpoint?" in final.state_reason
    assert asked == ["GET /v1/models", "POST /v1/chat/completions"]  # two requests, no load
    assert await stored(controller, run.id) == 0


async def test_skip_preflight_goes_ahead(controller: Controller, client: ControllerClient) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=4)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = spec_for(mock, [(2, 0.0)], output_tokens=4)
        spec.stages[0].ClearField("duration")
        spec.stages[0].requests = 6
        spec.target.model = "llama-3-70b"  # the mock answers any model
        spec.skip_preflight = True
        run = await client.create_run(spec)
        final = await wait_final(client, run.id)
        stats = await mock_stats(mock)
        events = await client.get_run_events(run.id)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    assert stats["requests_total"] == 6  # no check request
    assert not any(e.kind.startswith("preflight") for e in events)


async def test_a_response_from_another_model_is_a_warning(controller: Controller, client: ControllerClient) -> None:
    mock = MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=4))

    @web.middleware
    async def alias(request: web.Request, handler: object) -> web.StreamResponse:
        if request.path == "/v1/models":  # lists an alias, but answers as `mock`
            return web.json_response({"object": "list", "data": [{"id": "alias", "object": "model"}]})
        return await handler(request)  # type: ignore[operator, no-any-return]

    mock.app.middlewares.append(alias)
    async with mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = spec_for(mock, [(2, 0.0)], output_tokens=4)
        spec.stages[0].ClearField("duration")
        spec.stages[0].requests = 4
        spec.target.model = "alias"
        run = await client.create_run(spec)
        final = await wait_final(client, run.id)
        result = await client.get_result(run.id)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    assert result.warnings == ["the server answered the preflight request for model 'alias' as model 'mock'"]


def start_mock(tmp_path: Path) -> tuple[Proc, str]:
    proc = Proc(
        "mock-server",
        "--port",
        "0",
        "--ttft-ms",
        "5",
        "--itl-ms",
        "2",
        "--output-tokens",
        "16",
        log=tmp_path / "mock.log",
    )
    base_url = proc.wait_line("listening on").rsplit(" ", 1)[-1]
    return proc, base_url


@pytest.mark.e2e
async def test_a_target_killed_mid_stage_fails_the_run_with_bounded_requests(
    controller: Controller, client: ControllerClient, tmp_path: Path
) -> None:
    mock, base_url = start_mock(tmp_path)
    try:
        async with running_agent(f"127.0.0.1:{controller.port}"):
            spec = spec_at(base_url, 4, 60.0)
            spec.target.unreachable_timeout.FromSeconds(2)
            run = await client.create_run(spec)
            progress = await wait_progress(client, run.id, 20)
            mock.p.send_signal(signal.SIGKILL)
            final = await wait_final(client, run.id, FAST_S)
            result = await client.get_result(run.id)
    finally:
        mock.stop()
    assert final.state == run_pb2.RUN_STATE_FAILED
    assert "the target refused connections for" in final.state_reason
    assert "unreachable_timeout 2 s" in final.state_reason
    stage = result.stages[0]
    # Without back-off a closed loop of 4 fails ~1000 requests a second; with it, the 2 s
    # cost a few probes beside the 4 requests the kill cut off.
    failed_after_kill = stage.requests_failed
    assert stage.requests_ok >= progress
    assert 1 <= failed_after_kill <= 40, failed_after_kill


async def wait_progress(client: ControllerClient, run_id: str, ok: int) -> int:
    for _ in range(400):
        run = await client.get_run(run_id)
        if run.progress.requests_ok >= ok:
            return int(run.progress.requests_ok)
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} did not get {ok} requests done: {run}")


@pytest.mark.e2e
async def test_a_frozen_target_shows_as_a_stall(
    controller: Controller, client: ControllerClient, tmp_path: Path
) -> None:
    mock, base_url = start_mock(tmp_path)
    try:
        async with running_agent(f"127.0.0.1:{controller.port}"):
            spec = spec_at(base_url, 2, 8.0)
            spec.target.request_timeout.FromSeconds(10)
            run = await client.create_run(spec)
            await wait_progress(client, run.id, 5)
            mock.p.send_signal(signal.SIGSTOP)  # connections stay open, nothing answers
            final = await wait_final(client, run.id, 40)
            events = await client.get_run_events(run.id)
    finally:
        mock.p.send_signal(signal.SIGCONT)
        mock.stop()
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    stalls = [e.message for e in events if e.kind == "stall"]
    assert len(stalls) == 1, [(e.kind, e.message) for e in events]
    pattern = r"no request could be sent for ([0-9.]+) s \(from ([0-9.]+) s into the stage; 2 request"
    match = re.search(pattern, stalls[0])
    assert match, stalls[0]
    length_s, start_s = float(match[1]), float(match[2])
    assert length_s >= 5.0  # from the freeze to the end of the 8 s sending window
    assert start_s + length_s <= 8.0 + 0.5
