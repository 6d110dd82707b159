"""Reasoning metrics through the whole stack (controller, agent, SQLite, the mock's `reasoning`
style): the mock sends the first half of each answer's tokens as `reasoning_content`, one
token per event, `itl_ms` apart, so the known values are the reasoning token count and
TTFO - TTFR = that many inter-token gaps."""

from __future__ import annotations

import pytest

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from mockserver.config import MockConfig
from mockserver.server import MockServer
from mockserver.styles import reasoning_tokens
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final

pytestmark = pytest.mark.timeout(120)

TOKENS = 40
ITL_MS = 5.0
REQUESTS = 12


def spec(mock: MockServer) -> run_pb2.RunSpec:
    s = spec_for(mock, [], output_tokens=TOKENS)
    s.stages.add(concurrency=3, requests=REQUESTS)
    return s


async def result_of(client: ControllerClient, mock: MockServer) -> run_pb2.StageResult:
    run = await client.create_run(spec(mock))
    final = await wait_final(client, run.id, 90)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    result = await client.get_result(run.id)
    (stage,) = result.stages
    assert stage.requests_ok == REQUESTS and stage.output_tokens == REQUESTS * TOKENS
    return stage


async def test_reasoning_style_gives_ttfr_ttfo_and_reasoning_tokens(
    controller: Controller, client: ControllerClient
) -> None:
    thinking = reasoning_tokens(TOKENS)
    assert 0 < thinking < TOKENS
    config = MockConfig(ttft_ms=30, itl_ms=ITL_MS, output_tokens=TOKENS, style="reasoning")
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        stage = await result_of(client, mock)
    assert stage.reasoning_tokens == REQUESTS * thinking
    assert stage.mean_reasoning_tokens == pytest.approx(thinking)
    assert stage.mean_answer_tokens == pytest.approx(TOKENS - thinking)
    # The first text event is reasoning: TTFR is TTFT, request by request.
    assert stage.ttfr.count == stage.ttfo.count == stage.ttft.count == REQUESTS
    for agg in ("mean_ms", "p50_ms", "min_ms", "max_ms"):
        assert getattr(stage.ttfr, agg) == pytest.approx(getattr(stage.ttft, agg)), agg
    assert stage.HasField("ttfr") and stage.ttfr.HasField("p50_ci")
    # The first answer event comes `thinking` gaps after the first reasoning one. The mock
    # never sends faster than its ITL; a loaded machine makes every gap longer, so the upper
    # bound is this stage's own mean ITL (answer gaps included), with room.
    thought_ms = stage.ttfo.mean_ms - stage.ttfr.mean_ms
    assert thought_ms >= thinking * ITL_MS * 0.9, (thought_ms, stage.itl.mean_ms)
    assert thought_ms <= thinking * stage.itl.mean_ms * 1.5 + 20, (thought_ms, stage.itl.mean_ms)
    assert stage.ttfo.min_ms > stage.ttfr.min_ms


async def test_plain_style_has_no_reasoning_and_ttfo_is_ttft(controller: Controller, client: ControllerClient) -> None:
    config = MockConfig(ttft_ms=30, itl_ms=ITL_MS, output_tokens=TOKENS, style="vllm")
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        stage = await result_of(client, mock)
    assert stage.reasoning_tokens == 0 and stage.mean_reasoning_tokens == 0
    assert stage.mean_answer_tokens == pytest.approx(TOKENS)
    assert not stage.HasField("ttfr")
    assert stage.ttfo.count == REQUESTS
    for agg in ("mean_ms", "p50_ms", "p99_ms"):
        assert getattr(stage.ttfo, agg) == pytest.approx(getattr(stage.ttft, agg)), agg
    # Not a conversation: no turns, no sessions.
    assert not stage.turns and stage.sessions_completed == 0 and not stage.HasField("session_duration")


@pytest.mark.parametrize("field", ["reasoning", "reasoning_content"])
async def test_a_set_reasoning_count_in_either_field_is_measured_and_exported(
    controller: Controller, client: ControllerClient, field: str
) -> None:
    """`--reasoning-tokens R --reasoning-field F`: R reasoning tokens whatever the field, TTFO -
    TTFR = R inter-token gaps per request, and the exported samples carry what the result sums."""
    thinking = 7  # not half of TOKENS: the configured count, not the default
    config = MockConfig(
        ttft_ms=30,
        itl_ms=ITL_MS,
        output_tokens=TOKENS,
        style="reasoning",
        reasoning_tokens=thinking,
        reasoning_field=field,  # type: ignore[arg-type]
    )
    assert thinking != reasoning_tokens(TOKENS)
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        run = await client.create_run(spec(mock))
        final = await wait_final(client, run.id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        result = await client.get_result(run.id)
        samples = [s async for s in client.export_samples(run.id)]
    (stage,) = result.stages
    assert stage.requests_ok == REQUESTS and stage.output_tokens == REQUESTS * TOKENS
    assert stage.reasoning_tokens == REQUESTS * thinking
    assert stage.mean_answer_tokens == pytest.approx(TOKENS - thinking)
    assert len(samples) == REQUESTS
    assert all(s.reasoning_tokens == thinking for s in samples)
    assert sum(s.reasoning_tokens for s in samples) == stage.reasoning_tokens
    # Per request: the first answer comes `thinking` gaps after the first reasoning token; the
    # upper bound is the stage's own mean gap (a loaded machine widens every gap), with room.
    for s in samples:
        assert s.first_reasoning_ms == pytest.approx(s.ttft_ms)
        thought = s.first_answer_ms - s.first_reasoning_ms
        assert thinking * ITL_MS * 0.9 <= thought <= thinking * stage.itl.mean_ms * 1.5 + 20, (thought, stage.itl)
    # The result's TTFR and TTFO are those columns' figures.
    assert stage.ttfr.mean_ms == pytest.approx(sum(s.first_reasoning_ms for s in samples) / REQUESTS, rel=1e-6)
    assert stage.ttfo.mean_ms == pytest.approx(sum(s.first_answer_ms for s in samples) / REQUESTS, rel=1e-6)
    assert stage.ttfo.mean_ms - stage.ttfr.mean_ms >= thinking * ITL_MS * 0.9


async def test_non_streamed_reasoning_counts_from_the_usage(controller: Controller, client: ControllerClient) -> None:
    """Not streamed: the reasoning is in `message.reasoning`, its count in the usage; no
    event times, so no TTFR or TTFO (nor TTFT)."""
    thinking = 11
    config = MockConfig(
        ttft_ms=5,
        itl_ms=1,
        output_tokens=TOKENS,
        style="reasoning",
        reasoning_tokens=thinking,
        reasoning_field="reasoning",
    )
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        s = spec(mock)
        s.target.stream = False
        run = await client.create_run(s)
        final = await wait_final(client, run.id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        result = await client.get_result(run.id)
    (stage,) = result.stages
    assert stage.requests_ok == REQUESTS and stage.output_tokens == REQUESTS * TOKENS
    assert stage.reasoning_tokens == REQUESTS * thinking
    assert stage.mean_answer_tokens == pytest.approx(TOKENS - thinking)
    assert not stage.HasField("ttfr") and stage.ttfo.count == 0
