"""Target saturation on real parts: a mock with few batch slots served slower than the rate
is flagged with the achieved rate; a stage it keeps up with is not."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest

from client.formats import markdown, result_warnings
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.conftest import eventually
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final
from tests.integration.test_server_metrics import metrics_url, scrape, with_server_metrics

pytestmark = pytest.mark.timeout(120)


async def test_slots_queue_requests_and_the_wait_counts_in_ttft() -> None:
    # One slot, 5 tokens 20 ms apart: three requests at once are served one after another.
    async with MockServer(MockConfig(ttft_ms=0, itl_ms=20, output_tokens=5, max_running=1)) as mock:
        body = {"model": "mock", "prompt": "a b c", "max_tokens": 5, "stream": True}

        async def ttft(session: aiohttp.ClientSession) -> float:
            t0 = time.perf_counter()
            async with session.post(mock.base_url + "/completions", json=body) as r:
                await r.content.readany()
                first = time.perf_counter() - t0
                await r.read()
            return first

        async with aiohttp.ClientSession() as session:
            tasks = [asyncio.create_task(ttft(session)) for _ in range(3)]
            queued = await eventually(lambda: scrape(mock), lambda m: m["vllm:num_requests_waiting"].value == 2)
            assert queued["vllm:num_requests_running"].value == 1
            firsts = sorted(await asyncio.gather(*tasks))
        after = await scrape(mock)
    assert after["vllm:num_requests_waiting"].value == 0
    # Each request generates for >= 4 x 20 ms: the third waited for two of them.
    assert firsts[2] >= 0.16
    assert mock.stats.requests_ok == 3


async def test_a_target_slower_than_the_rate_is_flagged(controller: Controller, client: ControllerClient) -> None:
    # One slot, ~0.2 s per request: the mock serves about 5 requests/s.
    config = MockConfig(ttft_ms=10, itl_ms=10, output_tokens=20, max_running=1)
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = with_server_metrics(spec_for(mock, [], output_tokens=20), metrics_url(mock))
        for rate in (1.5, 20.0):  # 30% of its capacity; 4x its capacity (80 requests: ~16 s)
            stage = spec.stages.add(request_rate=rate)
            stage.duration.FromSeconds(4)
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, timeout_s=90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        result = await client.get_result(run.id)

    kept_up, overloaded = result.stages
    assert not kept_up.target_saturated and not kept_up.target_saturation_reason
    assert overloaded.target_saturated
    reason = overloaded.target_saturation_reason
    assert reason.startswith(f"the target did not keep up at rate 20/s: achieved {overloaded.request_throughput:.2f}/s")
    assert overloaded.request_throughput < 10  # a one-slot server of ~5 requests/s
    assert f"the stage ran {overloaded.duration_s:.1f} s for a planned 4.0 s" in reason
    assert "vllm:num_requests_waiting rose" in reason
    # It is the target that did not keep up, not the generator: without a concurrency cap every
    # request went out at its time however slow the answers, so no send lag comes of it. (On a
    # busy machine the agent's own loop can lag, and then the flag is right and names it: a
    # send lag from a stalled loop comes with the loop's lag.)
    why = overloaded.saturation_reason
    assert not overloaded.saturated or "event-loop lag" in why or "CPU" in why, why
    assert "send lag" not in why or "event-loop lag" in why, why

    # Where people read it: the warnings under the table (`run` and `runs result` print each
    # after "WARNING ") and the markdown.
    text = "\n".join(result_warnings(result))
    assert "stage 1: the target did not keep up at rate 20/s" in text
    assert "stage 0: the target" not in text
    assert "stage 1 (rate=20/s): the target did not keep up at rate 20/s" in markdown(result)
