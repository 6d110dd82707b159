"""Trace replay through the whole stack: a real controller, two real agents over gRPC, the
real mock server, a real SQLite file; the trace (Mooncake JSONL) is built in the test.

Every request of the trace must be sent exactly once, split between the two agents, at the
trace's time over the replay speed from the stage start (its scheduled time: sent minus
queue delay), with the trace's lengths (the mock counts prompt words, and trace prompts
without a tokenizer are one word per token).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agent.controller_link import ControllerLink
from agent.preflight import PREFLIGHT_PROMPT, PREFLIGHT_REQUESTS
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from common.tokenizer import Tokenizer
from controller.server import Controller
from controller.store import repository as repo
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.conftest import eventually
from tests.integration.test_run_end_to_end import mock_stats, wait_final

pytestmark = pytest.mark.timeout(120)

SPEED = 4.0
BLOCK = 8


class TraceBytes:
    """Stand-in for the agent's FetchDataset cache (agent.datasets.DatasetCache) until the
    upload path is merged: the same `get(dataset_id) -> bytes`, serving the test's trace."""

    def __init__(self, contents: dict[str, bytes]) -> None:
        self._contents = contents
        self.fetched: list[str] = []

    async def get(self, dataset_id: str) -> bytes:
        """The content of `dataset_id`."""
        self.fetched.append(dataset_id)
        return self._contents[dataset_id]


async def provide(
    client: ControllerClient, content: bytes, fmt: int, stand_in_id: str
) -> tuple[str, TraceBytes | None]:
    """The dataset's id: uploaded for real when the SDK can (`ControllerClient.upload_dataset`,
    the agents then fetch it over FetchDataset), else served by a `TraceBytes` stand-in."""
    upload = getattr(client, "upload_dataset", None)
    if upload is None:
        return stand_in_id, TraceBytes({stand_in_id: content})
    response = await upload(content, fmt)
    return str(response.dataset.id), None


@contextlib.asynccontextmanager
async def agent(address: str, name: str, datasets: TraceBytes | None) -> AsyncIterator[ControllerLink]:
    stop = asyncio.Event()
    link = ControllerLink(address, name=name, labels={}, api_key=None, stop=stop)
    if datasets is not None:
        link.datasets = datasets
    task = asyncio.create_task(link.run())
    try:
        yield link
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 15)


def mooncake_trace() -> list[dict[str, object]]:
    """30 requests over 2.4 s of trace time with bursts (equal times) and shared blocks; input
    lengths are distinct so a sample's prompt length names its request."""
    times = [0, 0, 0, 40, 80, 80, 200, 210, 220, 400, 400, 400, 400, 650, 700]
    times += [900 + 100 * i for i in range(15)]
    out = []
    for i, t in enumerate(times):
        length = 3 * BLOCK + i  # 3 full blocks and a part of a fourth
        ids = [1, 2, 100 + i, 200 + i] if i % 2 else [1, 300 + i, 400 + i, 500 + i]
        out.append({"timestamp": t, "input_length": length, "output_length": 2 + i % 5, "hash_ids": ids})
    return out


async def test_two_agents_replay_a_mooncake_trace_at_its_times(
    controller: Controller, client: ControllerClient
) -> None:
    trace = mooncake_trace()
    data = "".join(json.dumps(r) + "\n" for r in trace).encode()
    dataset_id, datasets = await provide(client, data, run_pb2.DATASET_FORMAT_MOONCAKE_TRACE, "ds_" + "7" * 32)
    address = f"127.0.0.1:{controller.port}"
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=1000)) as mock,
        agent(address, "agent-1", datasets),
        agent(address, "agent-2", datasets),
    ):
        spec = run_pb2.RunSpec(display_name="trace")
        spec.target.base_url = mock.base_url
        spec.target.model = "mock"
        spec.workload.trace.CopyFrom(run_pb2.Trace(dataset_id=dataset_id, replay_speed=SPEED, block_tokens=BLOCK))
        stage = spec.stages.add(trace_replay=True, requests=len(trace))
        stage.duration.FromSeconds(30)
        spec.placement.agents = 2
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        samples = [s async for s in client.export_samples(run.id)]
        stats = await mock_stats(mock)
    # Fetched for the preflight, parsed once per process, reused by the stage.
    if datasets is not None:
        assert datasets.fetched and set(datasets.fetched) == {dataset_id} and len(datasets.fetched) <= 2

    # Every request once: the prompt length names the trace request.
    index_of = {r["input_length"]: i for i, r in enumerate(trace)}
    sent = sorted(index_of[s.prompt_tokens] for s in samples)
    assert sent == list(range(len(trace)))
    assert all(s.status == run_pb2.REQUEST_STATUS_OK for s in samples)
    assert stats["requests_total"] == len(trace) + 2 * PREFLIGHT_REQUESTS
    for s in samples:
        assert s.output_tokens == trace[index_of[s.prompt_tokens]]["output_length"]
    # Split round-robin: agent-k sent the requests i % 2 == its share.
    by_agent: dict[str, set[int]] = {}
    for s in samples:
        by_agent.setdefault(s.agent_name, set()).add(index_of[s.prompt_tokens] % 2)
    assert sorted(map(sorted, by_agent.values())) == [[0], [1]]

    # Scheduled times are the trace's over the speed, from the stage start: within one agent
    # (one origin) to the clock's resolution, and across agents up to their clock offset
    # estimates (which are noise here: one machine, one clock).
    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    (stage_record,) = await controller.db.read(repo.list_stages, record.pk)
    start_ns = stage_record.started_at  # the stage's planned common start (controller clock)
    assert start_ns
    gaps: dict[str, list[float]] = {}
    for s in samples:
        scheduled_ns = s.sent_unix_ns - s.queue_delay_ms * 1e6
        due_ns = start_ns + trace[index_of[s.prompt_tokens]]["timestamp"] / SPEED * 1e6  # type: ignore[operator]
        gaps.setdefault(s.agent_name, []).append(scheduled_ns - due_ns)
    for name, values in gaps.items():
        assert max(values) - min(values) < 0.05e6, (name, values)  # one origin per agent
        assert abs(values[0]) < 20e6, (name, values)  # the stage's start, up to the offset estimate
    # Sent no earlier than scheduled; the queue delay is the achieved-vs-scheduled gap.
    assert all(s.queue_delay_ms >= 0 for s in samples)


async def test_tokenizer_exact_prompts_and_the_template_overhead(
    controller: Controller, client: ControllerClient, tmp_path: Path
) -> None:
    from tests.tokenizers_fixture import build_bpe_tokenizer

    path = build_bpe_tokenizer(tmp_path / "tokenizer.json")
    tokenizer = Tokenizer.from_path(path)
    tokenizer_id, datasets = await provide(
        client, path.read_bytes(), run_pb2.DATASET_FORMAT_TOKENIZER, "ds_" + "6" * 32
    )
    address = f"127.0.0.1:{controller.port}"
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=1000)) as mock,
        agent(address, "agent-1", datasets),
    ):
        spec = run_pb2.RunSpec(display_name="tokens")
        spec.target.base_url = mock.base_url
        spec.target.model = "mock"
        spec.workload.tokenizer_id = tokenizer_id
        spec.workload.synthetic.input_tokens.fixed = 100
        spec.workload.synthetic.output_tokens.fixed = 4
        spec.workload.synthetic.shared_prefix_tokens = 30
        spec.workload.synthetic.prefix_groups = 3
        spec.stages.add(concurrency=2, requests=20)
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        samples = [s async for s in client.export_samples(run.id)]
        result = await client.get_result(run.id)
    # The mock counts words; the prompts are single-token pieces, one word each: the server's
    # count is the tokenizer's, 100 exactly (a word-built prompt would be 100 words, far more tokens).
    assert len(samples) == 20
    assert all(s.prompt_tokens == 100 and s.usage_reported for s in samples)
    # The preflight's prompt: the mock counted its words, the tokenizer its tokens.
    overhead = len(PREFLIGHT_PROMPT.split()) - tokenizer.count(PREFLIGHT_PROMPT)
    assert overhead != 0
    assert result.tokens.exact and result.tokens.tokenizer == tokenizer_id
    assert result.tokens.template_overhead_tokens == overhead
    assert result.tokens.note.startswith(f"exact: input 100 reaches the model as {100 + overhead} tokens")


async def test_a_lost_agents_trace_share_is_taken_over_exactly(
    controller: Controller, client: ControllerClient
) -> None:
    """Agent-2 dies mid-replay (its task cancelled, its stream cut: an in-process kill -9).
    Agent-1 takes over the requests of agent-2's share that it had not announced, at the
    trace's own times: nothing is sent twice, and the taken-over requests are exactly the
    rest of that share."""
    n, step_ms = 60, 100
    trace = [{"timestamp": i * step_ms, "input_length": 10 + i, "output_length": 2, "hash_ids": [i]} for i in range(n)]
    content = "".join(json.dumps(r) + "\n" for r in trace).encode()
    dataset_id, datasets = await provide(client, content, run_pb2.DATASET_FORMAT_MOONCAKE_TRACE, "ds_" + "5" * 32)
    address = f"127.0.0.1:{controller.port}"
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1, output_tokens=1000)) as mock,
        agent(address, "agent-1", datasets),
    ):
        stop = asyncio.Event()
        victim = ControllerLink(address, name="agent-2", labels={}, api_key=None, stop=stop)
        if datasets is not None:
            victim.datasets = datasets
        victim_task = asyncio.create_task(victim.run())
        await eventually(client.list_agents, lambda agents: len(agents) == 2, 10)
        spec = run_pb2.RunSpec(display_name="takeover")
        spec.target.base_url = mock.base_url
        spec.target.model = "mock"
        spec.workload.trace.CopyFrom(run_pb2.Trace(dataset_id=dataset_id, replay_speed=1.0, block_tokens=4))
        stage = spec.stages.add(trace_replay=True, requests=n)
        stage.duration.FromSeconds(30)
        spec.placement.agents = 2
        run = await client.create_run(spec)
        await eventually(lambda: mock_stats(mock), lambda s: s["requests_total"] >= 2 * PREFLIGHT_REQUESTS + 10, 20)
        victim_task.cancel()  # the stream breaks; its assignment stops without a final word
        with contextlib.suppress(asyncio.CancelledError):
            await victim_task
        final = await wait_final(client, run.id, 90)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        samples = [s async for s in client.export_samples(run.id)]
        events = await client.get_run_events(run.id)
    takeover = next(e for e in events if e.kind == "takeover")
    announced = int(takeover.message.split("not sent after its first ")[1].split()[0])

    index_of = {r["input_length"]: i for i, r in enumerate(trace)}
    indices = [index_of[s.prompt_tokens] for s in samples]
    assert len(indices) == len(set(indices))  # nothing sent twice
    survivor = {i for s, i in zip(samples, indices, strict=True) if s.agent_name == "agent-1"}
    # The survivor's own share is whole; the victim's share is the other parity.
    (parity,) = [p for p in (0, 1) if not all(i in survivor for i in range(p, n, 2))]
    victim_share = list(range(parity, n, 2))
    own = sorted(i for s, i in zip(samples, indices, strict=True) if s.agent_name == "agent-1" and i % 2 != parity)
    taken = sorted(i for s, i in zip(samples, indices, strict=True) if s.agent_name == "agent-1" and i % 2 == parity)
    delivered = sorted(i for s, i in zip(samples, indices, strict=True) if s.agent_name == "agent-2")
    assert own == [i for i in range(n) if i % 2 != parity]  # agent-1's own share, whole
    assert 0 < announced < len(victim_share)
    assert taken == victim_share[announced:]  # exactly what the victim had not announced
    assert set(delivered) <= set(victim_share[:announced])
    # The taken-over requests keep the trace's times (those already due went out at once).
    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    (stage_record,) = await controller.db.read(repo.list_stages, record.pk)
    assert stage_record.started_at
    for s, i in zip(samples, indices, strict=True):
        if s.agent_name == "agent-1" and i % 2 == parity:
            scheduled_ns = s.sent_unix_ns - s.queue_delay_ms * 1e6
            assert abs(scheduled_ns - (stage_record.started_at + i * step_ms * 1e6)) < 20e6, i


async def test_a_trace_the_agent_cannot_read_fails_the_preflight(
    controller: Controller, client: ControllerClient
) -> None:
    """A trace the agent cannot parse fails the run's preflight, naming the line and the field
    (with the upload path, the controller refuses such a trace at upload already)."""
    bad = b'{"timestamp": 0, "input_length": 5, "output_length": 1}\n'
    bad += b'{"timestamp": 3, "input_length": 0, "output_length": 1}\n'
    upload = getattr(client, "upload_dataset", None)
    if upload is not None:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await upload(bad, run_pb2.DATASET_FORMAT_MOONCAKE_TRACE)
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "line 2" in str(info.value.details()) and "input_length" in str(info.value.details())
        return
    dataset_id = "ds_" + "4" * 32
    datasets = TraceBytes({dataset_id: bad})
    async with (
        MockServer(MockConfig(ttft_ms=5, itl_ms=1)) as mock,
        agent(f"127.0.0.1:{controller.port}", "a", datasets),
    ):
        spec = run_pb2.RunSpec()
        spec.target.base_url = mock.base_url
        spec.target.model = "mock"
        spec.workload.trace.dataset_id = dataset_id
        spec.stages.add(trace_replay=True, requests=2)
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, 60)
        stats = await mock_stats(mock)
    assert final.state == run_pb2.RUN_STATE_FAILED
    assert "preflight" in final.state_reason and "line 2" in final.state_reason, final.state_reason
    assert "input_length" in final.state_reason
    assert stats["requests_total"] == 0  # the check stopped before any request
