"""Uploaded datasets through the whole stack in one process: the real controller (SQLite file),
a real agent that fetches the dataset over FetchDataset, and the real mock server."""

from __future__ import annotations

import asyncio
import json

import pytest

from agent.assignment import AssignmentRunner
from agent.datasets import DatasetCache, DatasetFetchError
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from controller.server import Controller
from controller.store import repository as repo
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final

pytestmark = pytest.mark.timeout(120)


def prompts(n: int) -> bytes:
    # Entry i: "entry i" and i % 5 more words (2..6 words); max_tokens 2 + i % 3.
    return "".join(
        json.dumps({"prompt": f"entry {i}" + " w" * (i % 5), "max_tokens": 2 + i % 3}) + "\n" for i in range(n)
    ).encode()


async def test_a_run_uses_an_uploaded_dataset(controller: Controller, client: ControllerClient) -> None:
    info = (await client.upload_dataset(prompts(50), run_pb2.DATASET_FORMAT_JSONL, name="p.jsonl")).dataset
    async with (
        MockServer(MockConfig(ttft_ms=2, itl_ms=1, output_tokens=100)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = spec_for(mock, [])
        spec.ClearField("workload")
        spec.workload.dataset.dataset_id = info.id
        spec.workload.dataset.min_prompt_words = 4  # entries with i % 5 >= 2
        for _ in range(2):
            spec.stages.add(concurrency=2, requests=15)
        run = await client.create_run(spec)
        assert run.spec.workload.dataset.entry_count == 50 and run.spec.workload.dataset.format == 1
        final = await wait_final(client, run.id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    assert await controller.db.read(repo.get_run_dataset, record.pk) == ""  # no copy beside the run
    for stage in (0, 1):
        cols = await controller.db.read(repo.load_stage_columns, record.pk, stage)
        assert len(cols) == 15
        assert set(cols.prompt_tokens.tolist()) <= {4, 5, 6}, cols.prompt_tokens  # the filter applied
        assert set(cols.output_tokens.tolist()) <= {2, 3, 4}  # each entry's max_tokens


async def test_an_unusable_dataset_fails_the_assignment_clearly(
    controller: Controller, client: ControllerClient
) -> None:
    info = (await client.upload_dataset(prompts(10), run_pb2.DATASET_FORMAT_JSONL)).dataset
    async with (
        MockServer(MockConfig(ttft_ms=2, itl_ms=1, output_tokens=4)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
    ):
        spec = spec_for(mock, [])
        spec.ClearField("workload")
        spec.workload.dataset.dataset_id = info.id
        spec.workload.dataset.min_prompt_words = 50  # none has that many
        spec.stages.add(concurrency=1, requests=5)
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, 90)
    assert final.state == run_pb2.RUN_STATE_FAILED
    assert info.id in final.state_reason and "no usable entries" in final.state_reason, final.state_reason


async def test_cache_downloads_once_and_checks(controller: Controller, client: ControllerClient) -> None:
    data = prompts(20_000)  # a few MiB: several chunks
    info = (await client.upload_dataset(data, run_pb2.DATASET_FORMAT_JSONL)).dataset
    cache = DatasetCache(f"127.0.0.1:{controller.port}")
    got = await asyncio.gather(*(cache.get(info.id) for _ in range(5)))
    assert all(g == data for g in got) and cache.downloads == 1
    assert await cache.get(info.id) is got[0] and cache.downloads == 1
    assert cache.format_of(info.id) == run_pb2.DATASET_FORMAT_JSONL
    entries = await cache.entries(info.id, max_prompt_words=2)
    assert len(entries) == 4000 and all(e.prompt.startswith("entry ") for e in entries)
    assert await cache.entries(info.id, max_prompt_words=2) is entries  # parsed once too
    with pytest.raises(DatasetFetchError, match="not on the controller"):
        await cache.get("ds_" + "0" * 32)
    with pytest.raises(DatasetFetchError, match="not on the controller"):
        await cache.get("nonsense")
    bad = (await client.upload_dataset(b'{"prompt": "x"}\n', run_pb2.DATASET_FORMAT_JSONL)).dataset
    with pytest.raises(DatasetFetchError, match="no usable entries"):
        await cache.entries(bad.id, min_prompt_words=3)


@pytest.mark.parametrize("with_cache", [False, True])
async def test_an_assignment_whose_dataset_cannot_be_fetched_fails(controller: Controller, with_cache: bool) -> None:
    missing = "ds_" + "f" * 32
    assign = agent_service_pb2.Assign(
        assignment_id="asg-1",
        run_id="run-1",
        target=run_pb2.Target(base_url="http://127.0.0.1:9/v1", model="mock"),
        workload=run_pb2.Workload(seed=7, dataset=run_pb2.Dataset(dataset_id=missing, format=1)),
        stage=run_pb2.Stage(concurrency=1, requests=1),
    )
    messages: list[agent_service_pb2.ConnectRequest] = []
    cache = DatasetCache(f"127.0.0.1:{controller.port}") if with_cache else None
    runner = AssignmentRunner(assign, messages.append, datasets=cache)
    assert runner.datasets is cache
    await asyncio.wait_for(runner.start(), 20)
    final = [m.assignment_update for m in messages if m.HasField("assignment_update")][-1]
    assert final.state == agent_service_pb2.ASSIGNMENT_STATE_FAILED
    assert missing in final.message
    assert ("not on the controller" if with_cache else "no controller to fetch it") in final.message
    assert not any(m.HasField("sample_batch") for m in messages)
