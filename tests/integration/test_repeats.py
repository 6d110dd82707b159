"""Groups of repeats on real parts: the controller (real SQLite file), an agent over a real gRPC
stream and the mock model server on 127.0.0.1. A group's repeats run one after another with
their own seeds; its result's counts are the sums of its runs'; cancelling a repeat cancels the
ones after it; bad requests are refused naming the field."""

from __future__ import annotations

import itertools
import math
from collections.abc import Awaitable
from pathlib import Path

import grpc
import pytest

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from common.stats import z_value
from controller.server import Controller
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.conftest import eventually
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final

pytestmark = pytest.mark.timeout(120)


def short_spec(mock: MockServer, requests: int = 12) -> run_pb2.RunSpec:
    spec = spec_for(mock, [(2, 0.0)], output_tokens=4)
    spec.stages[0].ClearField("duration")
    spec.stages[0].requests = requests
    return spec


async def group_runs(client: ControllerClient, group: run_pb2.RunGroup) -> list[run_pb2.Run]:
    return [await client.get_run(run_id) for run_id in group.run_ids]


async def test_a_group_runs_its_repeats_one_after_another(controller: Controller, client: ControllerClient) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=4)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        group = await client.create_group(short_spec(mock), 3)
        assert group.id.startswith("grp_") and len(group.run_ids) == 3
        runs = [await wait_final(client, run_id) for run_id in group.run_ids]
    assert [r.state for r in runs] == [run_pb2.RUN_STATE_SUCCEEDED] * 3, [r.state_reason for r in runs]
    assert [(r.group_id, r.repeat_index) for r in runs] == [(group.id, i) for i in range(3)]
    # Each repeat started after the one before it ended.
    for before, after in itertools.pairwise(runs):
        assert after.start_time.ToNanoseconds() >= before.end_time.ToNanoseconds()
    # The spec set no seed: each repeat got a fresh one, shown in its stored spec.
    seeds = [r.spec.workload.seed for r in runs]
    assert len(set(seeds)) == 3 and 0 not in seeds

    response = await client.get_group_result(group.id)
    result = response.result
    assert [r.id for r in response.runs] == list(group.run_ids)
    assert (result.run_id, result.group.id, result.state) == (group.id, group.id, run_pb2.RUN_STATE_SUCCEEDED)
    assert list(result.group.counted_run_ids) == list(group.run_ids)
    singles = [await client.get_result(run_id) for run_id in group.run_ids]
    merged = result.stages[0]
    assert merged.repeats == 3
    assert merged.requests_ok == sum(s.stages[0].requests_ok for s in singles) == 36
    assert merged.output_tokens == sum(s.stages[0].output_tokens for s in singles)
    assert merged.ttft.count == sum(s.stages[0].ttft.count for s in singles)
    assert result.overall.requests_ok == sum(s.overall.requests_ok for s in singles)
    mean_p50 = sum(s.stages[0].ttft.p50_ms for s in singles) / 3
    assert merged.ttft.p50_ms == pytest.approx(mean_p50)
    assert merged.ttft.HasField("p50_ci") and merged.ttft.p50_ci.low <= mean_p50 <= merged.ttft.p50_ci.high
    # Never narrower than the runs' own intervals combined (docs/metrics.md, "Groups of repeats").
    assert all(s.stages[0].ttft.HasField("p50_ci") for s in singles)
    own_se = [(s.stages[0].ttft.p50_ci.high - s.stages[0].ttft.p50_ci.low) / (2 * z_value(95)) for s in singles]
    floor = z_value(95) * math.sqrt(sum(se * se for se in own_se) / 3 / 3)
    assert merged.ttft.p50_ci.high - mean_p50 >= floor * (1 - 1e-9)

    listed = await client.list_runs(group_id=group.id)
    assert sorted(r.id for r in listed.runs) == sorted(group.run_ids)


async def test_a_given_seed_steps_by_the_repeat_index_and_request_ids_return_the_group(
    controller: Controller, client: ControllerClient
) -> None:
    async with MockServer(MockConfig()) as mock:  # no agent: the runs stay pending
        spec = short_spec(mock)
        spec.workload.seed = 41
        group = await client.create_group(spec, 3, request_id="req-repeat")
        again = await client.create_group(spec, 3, request_id="req-repeat")
        assert again == group
        runs = await group_runs(client, group)
        assert [r.spec.workload.seed for r in runs] == [41, 42, 43]
        assert {r.state for r in runs} == {run_pb2.RUN_STATE_PENDING}
        # Cancelling a pending repeat cancels the ones after it, not the ones before.
        cancelled = await client.cancel_run(group.run_ids[1], "not needed")
        assert cancelled.state == run_pb2.RUN_STATE_CANCELLED
        runs = await group_runs(client, group)
        assert [r.state for r in runs] == [
            run_pb2.RUN_STATE_PENDING,
            run_pb2.RUN_STATE_CANCELLED,
            run_pb2.RUN_STATE_CANCELLED,
        ]
        await client.cancel_run(group.run_ids[0], "")
    result = (await client.get_group_result(group.id)).result
    assert result.state == run_pb2.RUN_STATE_CANCELLED and list(result.group.counted_run_ids) == []


async def test_cancelling_the_running_repeat_cancels_the_later_ones(
    controller: Controller, client: ControllerClient
) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=5, output_tokens=16)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        group = await client.create_group(spec_for(mock, [(2, 60.0)], output_tokens=16), 3)
        await eventually(lambda: client.get_run(group.run_ids[0]), lambda r: r.progress.requests_ok >= 5, 30)
        first = await client.cancel_run(group.run_ids[0], "enough")
        runs = await group_runs(client, group)
    assert first.state == run_pb2.RUN_STATE_CANCELLED and first.state_reason == "enough"
    for later in runs[1:]:
        assert later.state == run_pb2.RUN_STATE_CANCELLED
        assert group.id in later.state_reason and group.run_ids[0] in later.state_reason
        assert not later.HasField("start_time")  # never started
    result = (await client.get_group_result(group.id)).result
    assert result.state == run_pb2.RUN_STATE_CANCELLED
    assert any(f"repeat 1 ({group.run_ids[1]}) ended CANCELLED" in w for w in result.warnings)


async def call_code(call: Awaitable[object]) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await call
    return error.value.code(), error.value.details() or ""


async def test_bad_repeats_and_group_ids_are_refused(controller: Controller, client: ControllerClient) -> None:
    async with MockServer(MockConfig()) as mock:
        spec = short_spec(mock)
        code, details = await call_code(client.create_group(spec, 101))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "repeat" in details
        search = short_spec(mock)
        del search.stages[:]
        search.slo.ttft.FromMilliseconds(100)
        search.search.variable = run_pb2.SEARCH_VARIABLE_CONCURRENCY
        code, details = await call_code(client.create_group(search, 2))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "repeat" in details and "capacity search" in details
        # 0 and 1 are a single run, in no group.
        for repeat in (0, 1):
            response = await client._stub.CreateRun(run_service_pb2.CreateRunRequest(spec=spec, repeat=repeat))
            assert not response.HasField("group") and response.run.group_id == ""
    code, _ = await call_code(client.get_group_result("grp_0123456789abcdef0123"))
    assert code == grpc.StatusCode.NOT_FOUND
    for malformed in ("", "run_0123456789abcdef0123", "grp_nothex"):
        code, details = await call_code(client.get_group_result(malformed))
        assert code == grpc.StatusCode.INVALID_ARGUMENT and "group_id" in details
    code, details = await call_code(client.list_runs(group_id="grp_x"))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "group_id" in details


async def test_a_restarted_controller_resumes_the_pending_repeats_in_order(db_path: Path) -> None:
    async with MockServer(MockConfig(ttft_ms=5, itl_ms=5, output_tokens=8)) as mock:
        first = Controller(str(db_path))
        await first.start("127.0.0.1:0")
        stopped = False
        try:
            async with (
                ControllerClient(f"127.0.0.1:{first.port}") as client,
                running_agent(f"127.0.0.1:{first.port}"),
            ):
                group = await client.create_group(spec_for(mock, [(2, 1.5)], output_tokens=8), 3)
                await eventually(lambda: client.get_run(group.run_ids[0]), lambda r: r.progress.requests_ok >= 2, 30)
                await first.stop(1.0)  # while repeat 0 runs: INTERRUPTED
                stopped = True
        finally:
            if not stopped:
                await first.stop(1.0)
        second = Controller(str(db_path))
        await second.start("127.0.0.1:0")
        try:
            async with (
                ControllerClient(f"127.0.0.1:{second.port}") as client,
                running_agent(f"127.0.0.1:{second.port}"),
            ):
                runs = [await wait_final(client, run_id) for run_id in group.run_ids]
                result = (await client.get_group_result(group.id)).result
        finally:
            await second.stop(1.0)
    assert [r.state for r in runs] == [
        run_pb2.RUN_STATE_INTERRUPTED,
        run_pb2.RUN_STATE_SUCCEEDED,
        run_pb2.RUN_STATE_SUCCEEDED,
    ]
    assert runs[2].start_time.ToNanoseconds() >= runs[1].end_time.ToNanoseconds()
    assert list(result.group.counted_run_ids) == list(group.run_ids[1:])
    assert result.state == run_pb2.RUN_STATE_INTERRUPTED  # the first repeat that did not succeed


async def test_a_group_is_compared_set_as_a_baseline_and_one_point_of_its_series_history(
    controller: Controller, client: ControllerClient
) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=4)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = short_spec(mock)
        spec.series = "grouped"
        spec.labels["commit"] = "a"
        first = await client.create_group(spec, 2)
        spec.labels["commit"] = "b"
        second = await client.create_group(spec, 2)
        for run_id in [*first.run_ids, *second.run_ids]:
            await wait_final(client, run_id)
        # Not finished yet -> refused; finished -> a group is a baseline like a run.
        baseline = await client.set_baseline("grouped", first.id)
        assert baseline.run_id == first.id
        with pytest.raises(grpc.aio.AioRpcError) as missing:
            await client.set_baseline("grouped", "grp_" + "0" * 20)
        assert missing.value.code() == grpc.StatusCode.NOT_FOUND

        response = await client.compare_runs("", [second.id], 10.0, baseline_name="grouped")
        history = await client.series_history("grouped", metric="ttft_p50_ms", label="commit")
    (comparison,) = response.comparisons
    assert (response.baseline_run_id, comparison.run_id) == (first.id, second.id)
    (stage,) = comparison.stages
    groups = [(await client.get_group_result(g.id)).result for g in (first, second)]
    ttft = next(m for m in stage.metrics if m.metric == "ttft_p50_ms")
    # The groups' own figures (means over their runs) are what was compared.
    assert ttft.baseline == pytest.approx(groups[0].stages[0].ttft.p50_ms)
    assert ttft.value == pytest.approx(groups[1].stages[0].ttft.p50_ms)
    assert ttft.outcome != run_service_pb2.COMPARE_OUTCOME_UNSPECIFIED
    # Each group is one point of its series, valued by its group result.
    assert [(p.run_id, p.label_value, p.baseline) for p in history.points] == [
        (first.id, "a", True),
        (second.id, "b", False),
    ]
    for point, result in zip(history.points, groups, strict=True):
        assert point.state == run_pb2.RUN_STATE_SUCCEEDED
        assert point.value == pytest.approx(result.stages[0].ttft.p50_ms)
