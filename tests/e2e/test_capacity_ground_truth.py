"""The capacity search against the mock's computed capacity (mockserver/capacity.py, docs/capacity.md
"Ground truth"): controller, one agent over gRPC and the mock in one process, short probes.

Each setting's latencies are tens of ms and its objective lies halfway between the levels the
model gives on either side of the capacity, so a few ms of scheduling noise on a busy machine
moves no verdict. Rate searches use constant arrivals: the model covers those exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from mockserver.capacity import Objectives, Workload, concurrency_capacity, rate_capacity
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.integration.test_run_end_to_end import running_agent, wait_final

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

PROMPT_TOKENS, GOODPUT_TARGET = 16, 0.8


@dataclass(frozen=True)
class Setting:
    mock: MockConfig
    objectives: Objectives
    low: float  # the search's min and max
    high: float


CONCURRENCY_SETTINGS = {
    # TPOT = 10 + 10 x C ms: 40 at C = 3, 50 at C = 4; the slots (8) are never reached.
    "tpot-below-slots": Setting(
        MockConfig(ttft_ms=20, itl_ms=10, itl_per_running_ms=10, output_tokens=8, max_running=8),
        Objectives(tpot_ms=45, goodput_target=GOODPUT_TARGET),
        1,
        16,
    ),
    # 4 slots of S = 20 + 7 x 18 = 146 ms: C = 8 waits exactly S (TTFT 166 ms), C = 10 fails for certain.
    "ttft-through-the-queue": Setting(
        MockConfig(ttft_ms=20, itl_ms=10, itl_per_running_ms=2, output_tokens=8, max_running=4),
        Objectives(ttft_ms=200, goodput_target=GOODPUT_TARGET),
        1,
        32,
    ),
}
RATE_SETTINGS = {
    # No slot limit; TPOT 45 ms at about 3.5 running: 10.48/s.
    "tpot": Setting(
        MockConfig(ttft_ms=20, itl_ms=10, itl_per_running_ms=10, output_tokens=8),
        Objectives(tpot_ms=45, goodput_target=GOODPUT_TARGET),
        8,
        40,
    ),
    # E2E = S = 80 / (1 - 10 x 4 x L) ms: 400 ms at 20/s, 286 ms at 18/s.
    "e2e": Setting(
        MockConfig(ttft_ms=30, itl_ms=5, itl_per_running_ms=4, output_tokens=11),
        Objectives(e2e_ms=400, goodput_target=GOODPUT_TARGET),
        6,
        40,
    ),
}
RATE_TOLERANCE = 10.0


def search_spec(
    target_url: str, variable: int, setting: Setting, *, tolerance: float = 5.0, max_probes: int = 10
) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(display_name="capacity ground truth")
    spec.target.base_url = target_url
    spec.target.model = "mock"
    spec.workload.synthetic.input_tokens.fixed = PROMPT_TOKENS
    spec.workload.synthetic.output_tokens.fixed = setting.mock.output_tokens
    objectives = setting.objectives
    for name in ("ttft", "tpot", "e2e"):
        value = getattr(objectives, f"{name}_ms")
        if value is not None:
            getattr(spec.slo, name).FromMicroseconds(round(value * 1000))
    s = spec.search
    s.variable = variable  # type: ignore[assignment]
    s.min, s.max = setting.low, setting.high
    s.goodput_target_percent, s.tolerance_percent = objectives.goodput_target * 100, tolerance
    s.probe_duration.FromMilliseconds(2500)
    s.probe_warmup.FromMilliseconds(500)
    s.min_requests, s.max_probes = 10, max_probes
    if variable == run_pb2.SEARCH_VARIABLE_RATE:
        s.arrival = run_pb2.ARRIVAL_PROCESS_CONSTANT
    return spec


async def run_search(
    controller: Controller,
    client: ControllerClient,
    variable: int,
    setting: Setting,
    *,
    tolerance: float = 5.0,
    max_probes: int = 10,
) -> run_pb2.CapacityResult:
    async with MockServer(setting.mock) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        run = await client.create_run(
            search_spec(mock.base_url, variable, setting, tolerance=tolerance, max_probes=max_probes)
        )
        final = await wait_final(client, run.id, 80)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        if variable == run_pb2.SEARCH_VARIABLE_RATE:
            assert all(stage.arrival == run_pb2.ARRIVAL_PROCESS_CONSTANT for stage in final.spec.stages)
        cap = (await client.get_result(run.id)).capacity
    if cap.stop_reason == run_pb2.SEARCH_STOP_REASON_GENERATOR_SATURATED:
        # On a starved machine the agent's event loop lags: the search rightly proves nothing.
        pytest.skip(f"the load generator was saturated: {cap.stop_message}")
    assert cap.stop_reason == run_pb2.SEARCH_STOP_REASON_CONVERGED, cap
    assert cap.HasField("highest_passing") and cap.HasField("lowest_failing"), cap
    return cap


@pytest.mark.parametrize("name", sorted(CONCURRENCY_SETTINGS))
async def test_concurrency_search_brackets_the_formula(
    controller: Controller, client: ControllerClient, name: str
) -> None:
    setting = CONCURRENCY_SETTINGS[name]
    truth = concurrency_capacity(setting.mock, Workload(PROMPT_TOKENS, setting.mock.output_tokens), setting.objectives)
    assert truth.highest_passing and truth.lowest_failing  # the setting has a capacity inside the search
    cap = await run_search(controller, client, run_pb2.SEARCH_VARIABLE_CONCURRENCY, setting)
    # Converged: the reported loads are neighbours. Neither contradicts the model: the reported
    # pass is no certain failure and the reported failure no certain pass.
    assert cap.highest_passing < truth.lowest_failing, (truth, cap)
    assert cap.lowest_failing > truth.highest_passing, (truth, cap)


@pytest.mark.parametrize("name", sorted(RATE_SETTINGS))
async def test_rate_search_brackets_the_formula(controller: Controller, client: ControllerClient, name: str) -> None:
    setting = RATE_SETTINGS[name]
    truth = rate_capacity(setting.mock, Workload(PROMPT_TOKENS, setting.mock.output_tokens), setting.objectives)
    assert setting.low < truth.rate < setting.high
    # Boundary probes within noise are repeated: a rate search may spend more probes.
    cap = await run_search(
        controller, client, run_pb2.SEARCH_VARIABLE_RATE, setting, tolerance=RATE_TOLERANCE, max_probes=14
    )
    tolerance = RATE_TOLERANCE / 100
    assert cap.highest_passing <= truth.rate * (1 + tolerance), (truth.rate, cap)
    assert cap.lowest_failing >= truth.rate * (1 - tolerance), (truth.rate, cap)
