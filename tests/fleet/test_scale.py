"""Many agent processes on one machine complete a run together."""

from __future__ import annotations

import time

import pytest

from common.proto.loadtest.v1 import run_pb2
from tests.fleet.harness import Fleet, closed, make_spec, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

AGENTS = 32


async def test_32_agent_processes_complete_a_run(fleet: Fleet) -> None:
    target = await fleet.start_mock(ttft_ms=20, itl_ms=5, output_tokens=8)
    await fleet.start_controller()
    started = time.monotonic()
    await fleet.start_agents(AGENTS, prefix="swarm")
    async with fleet.client() as client:
        await fleet.wait_agents(client, AGENTS, timeout_s=90)
        print(f"{AGENTS} agents connected in {time.monotonic() - started:.1f} s")
        # Light load: one worker per agent, 40 requests in all.
        spec = make_spec(target, [closed(AGENTS, 2.0)], agents=AGENTS, output_tokens=8)
        spec.stages[0].requests = 40
        run = await client.create_run(spec)
        run = await wait_final(client, run.id, 60)
        assert run.state == run_pb2.RUN_STATE_SUCCEEDED, (run.state_reason, fleet.logs())
        result = await client.get_result(run.id)
    stage = result.stages[0]
    print(f"start skew over {AGENTS} agents: {stage.start_skew_ms:.2f} ms")
    assert len(stage.agents) == AGENTS
    assert stage.requests_ok == 40 and stage.requests_failed == 0
    assert stage.agents_lost == 0
    rows = fleet.sql(
        "SELECT COUNT(*), SUM(a.state = 2) FROM assignments a JOIN runs r ON r.pk = a.run_pk WHERE r.run_id = ?", run.id
    )
    assert rows[0] == (AGENTS, AGENTS)  # every agent completed its share
