"""Issue 18's metrics against the mock's known values, through the real stack: an in-process
controller (a real SQLite file), real agents over gRPC, the real mock server on 127.0.0.1.

Every expected number is derived from the mock's configuration and its documented model
(docs/workloads.md, "The mock server as ground truth"):

* tokens: a chat prompt reaches the model as `bos + messages' tokens + template x (messages
  + 1)`; completions add `bos` only;
* the prefix cache (`mockserver/prefix_cache.py`): the rendered prompt (BOS, each message's
  header and text, the assistant header) in blocks of 16; a request's cached tokens are its
  longest run of leading full blocks some earlier request cached (its prompt at lookup, its
  prompt + output when it ended), at most `(P - 1) // 16` blocks;
* the prefill cost of the uncached tokens only: TTFT = ttft + prefill x (P - cached) / 1000.
"""

from __future__ import annotations

import collections
import itertools
import json
from pathlib import Path

import pytest

from agent.prompts import WORDS, PromptGenerator, token_pieces
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from common.tokenizer import Tokenizer
from controller.server import Controller
from controller.store import repository as repo
from controller.store.repository import StageSamples
from mockserver.config import MockConfig
from mockserver.generation import VOCABULARY
from mockserver.server import MockServer
from tests.integration.test_conversations_e2e import recording
from tests.integration.test_run_end_to_end import mock_stats, running_agent, wait_final

pytestmark = pytest.mark.timeout(60)

BOS, TEMPLATE, BLOCK = 1, 3, 16


def block_floor(tokens: int) -> int:
    return tokens // BLOCK * BLOCK


async def upload_tokenizer(client: ControllerClient, path: Path) -> str:
    response = await client.upload_dataset(path, run_pb2.DATASET_FORMAT_TOKENIZER, name="tok.json")
    return str(response.dataset.id)


def base_spec(mock: MockServer) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(display_name="ground-truth")
    spec.target.base_url = mock.base_url
    spec.target.model = "mock"
    return spec


async def finished(
    controller: Controller, client: ControllerClient, spec: run_pb2.RunSpec
) -> tuple[run_pb2.RunResult, list[run_service_pb2.ExportedSample], StageSamples]:
    """Run `spec` (one stage) to the end: its result, its exported samples, its stored samples."""
    run = await client.create_run(spec)
    final = await wait_final(client, run.id, 45)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    result = await client.get_result(run.id)
    samples = [s async for s in client.export_samples(run.id)]
    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    stored = await controller.db.read(repo.load_stage_samples, record.pk, 0)
    assert len(stored.columns) == len(samples)
    assert all(s.status == run_pb2.REQUEST_STATUS_OK for s in samples)
    return result, samples, stored


# --- 1. exact token counts --------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "completions"])
async def test_prompts_are_exact_and_the_template_overhead_is_the_mocks(
    controller: Controller, client: ControllerClient, tokenizer_path: Path, tok: Tokenizer, api: str
) -> None:
    tokenizer_id = await upload_tokenizer(client, tokenizer_path)
    config = MockConfig(
        ttft_ms=2,
        itl_ms=1,
        output_tokens=1000,
        tokenizer=str(tokenizer_path),
        bos_tokens=BOS,
        chat_template_tokens=TEMPLATE,
    )
    # The preflight's one message, and every single-turn prompt's: BOS, a role header, the
    # generation prompt (chat); BOS alone (completions).
    overhead = BOS + TEMPLATE * 2 if api == "chat" else BOS
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = base_spec(mock)
        if api == "completions":
            spec.target.api_kind = run_pb2.API_KIND_COMPLETIONS
        spec.workload.tokenizer_id = tokenizer_id
        spec.workload.synthetic.input_tokens.uniform.min = 20
        spec.workload.synthetic.input_tokens.uniform.max = 150
        spec.workload.synthetic.output_tokens.fixed = 9
        spec.stages.add(concurrency=2, requests=24)
        result, samples, stored = await finished(controller, client, spec)
    requested = stored.requested_input_tokens
    assert len(set(requested.tolist())) > 5  # lengths vary: the equality is not one number's
    assert (stored.columns.prompt_tokens == requested + overhead).all(), (stored.columns.prompt_tokens, requested)
    (stage,) = result.stages
    assert stage.mean_input_tokens == pytest.approx(stage.mean_requested_input_tokens + overhead)
    assert result.tokens.exact and result.tokens.tokenizer == tokenizer_id
    assert result.tokens.HasField("template_overhead_tokens")
    assert result.tokens.template_overhead_tokens == overhead
    assert all(s.usage_reported and s.output_tokens == 9 for s in samples)
    # Not by chance: word-built prompts would not be counted so by this tokenizer.
    words = " ".join(WORDS[-60:])
    assert tok.count(words) != len(words.split())


async def test_output_tokens_without_usage_are_counted_with_the_tokenizer(
    controller: Controller, client: ControllerClient, tokenizer_path: Path
) -> None:
    """`--style tgi` sends no usage: the agent counts the streamed text with the tokenizer,
    and the mock's words are one token each for it, so the count is the mock's exactly."""
    tokenizer_id = await upload_tokenizer(client, tokenizer_path)
    config = MockConfig(ttft_ms=2, itl_ms=1, output_tokens=1000, tokenizer=str(tokenizer_path), style="tgi")
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = base_spec(mock)
        spec.workload.tokenizer_id = tokenizer_id
        spec.workload.synthetic.input_tokens.fixed = 30
        spec.workload.synthetic.output_tokens.uniform.min = 5
        spec.workload.synthetic.output_tokens.uniform.max = 40
        spec.stages.add(concurrency=2, requests=16)
        result, samples, stored = await finished(controller, client, spec)
        stats = await mock_stats(mock)
    assert not any(s.usage_reported for s in samples)
    # The mock generates max_tokens (below its natural length): the requested output is the count.
    assert (stored.columns.output_tokens == stored.requested_output_tokens).all()
    assert len(set(stored.requested_output_tokens.tolist())) > 3
    (stage,) = result.stages
    assert stage.output_tokens == int(stored.requested_output_tokens.sum())
    # What the mock wrote, the preflight's answers aside (each a max_tokens the agent asked).
    assert stats["output_tokens_total"] >= stage.output_tokens
    assert stage.output_tokens_estimated  # counted by the client: flagged as such
    # No usage: the template's overhead is unknown, not guessed.
    assert result.tokens.exact and not result.tokens.HasField("template_overhead_tokens")


# --- 2. prefix groups against the prefix cache --------------------------------------------


def metrics_url(mock: MockServer) -> str:
    return mock.base_url.removesuffix("/v1") + "/metrics"


@pytest.mark.parametrize(
    ("prefix", "popularity", "style"),
    [
        (64, run_pb2.PREFIX_POPULARITY_UNIFORM, "vllm"),  # B + T + P = 68: 4 full blocks shared
        (60, run_pb2.PREFIX_POPULARITY_UNIFORM, "vllm"),  # 64: exactly 4 blocks
        (45, run_pb2.PREFIX_POPULARITY_UNIFORM, "vllm"),  # 49: 3 blocks, one token of the fourth
        (45, run_pb2.PREFIX_POPULARITY_ZIPF, "vllm"),
        (45, run_pb2.PREFIX_POPULARITY_ZIPF, "llamacpp"),  # llama-server's counters
    ],
)
async def test_prefix_groups_hit_what_the_block_model_predicts(
    controller: Controller,
    client: ControllerClient,
    tokenizer_path: Path,
    tok: Tokenizer,
    prefix: int,
    popularity: int,
    style: str,
) -> None:
    groups, requests, input_tokens = 4, 40, 100
    tokenizer_id = await upload_tokenizer(client, tokenizer_path)
    assert len(token_pieces(tok).pieces) > requests  # request markers all differ in their first piece
    config = MockConfig(
        ttft_ms=2,
        itl_ms=1,
        output_tokens=1000,
        tokenizer=str(tokenizer_path),
        bos_tokens=BOS,
        chat_template_tokens=TEMPLATE,
        prefix_cache=True,
        prefix_cache_block_tokens=BLOCK,
        style=style,  # type: ignore[arg-type]
    )
    mock = MockServer(config)
    seen = recording(mock)
    async with mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = base_spec(mock)
        spec.workload.tokenizer_id = tokenizer_id
        spec.workload.seed = 18  # the groups drawn are the same on every run of the test
        synthetic = spec.workload.synthetic
        synthetic.input_tokens.fixed = input_tokens
        synthetic.output_tokens.fixed = 3
        synthetic.shared_prefix_tokens = prefix
        synthetic.prefix_groups = groups
        synthetic.prefix_popularity = popularity  # type: ignore[assignment]
        spec.server_metrics.endpoints.append(metrics_url(mock))
        spec.server_metrics.scrape_interval.FromMilliseconds(200)
        spec.stages.add(concurrency=2, requests=requests)
        result, samples, _ = await finished(controller, client, spec)
        stats = await mock_stats(mock)

    # Which group each request drew: its message starts with that group's prefix text.
    prefixes = [PromptGenerator(spec.workload, tok).prefix(g) for g in range(groups)]
    drawn = collections.Counter(
        next(g for g, p in enumerate(prefixes) if s.messages[0]["content"].startswith(p))
        for s in seen
        if s.messages[0]["content"].startswith(tuple(prefixes))
    )
    assert sum(drawn.values()) == requests
    if popularity == run_pb2.PREFIX_POPULARITY_ZIPF:
        # Group k (1-based) has weight 1/k: the first drawn 4 times as often as the fourth.
        assert drawn[0] > drawn[3] and drawn[0] > requests / groups, drawn
    # The rendered prompt: BOS, the user header, the prompt, the assistant header.
    prompt_tokens = BOS + TEMPLATE + input_tokens + TEMPLATE
    assert all(s.prompt_tokens == prompt_tokens and s.cached_reported for s in samples)
    # A group's first request finds only BOS and the header (less than a block) cached; every
    # later one its group's whole blocks of BOS + header + prefix (the marker then differs).
    assert BOS + TEMPLATE < BLOCK
    hit = min(block_floor(BOS + TEMPLATE + prefix), (prompt_tokens - 1) // BLOCK * BLOCK)
    expected = sorted([0] * len(drawn) + [hit] * (requests - len(drawn)))
    assert sorted(s.cached_prompt_tokens for s in samples) == expected
    (stage,) = result.stages
    cached = sum(expected)
    assert stage.cached_prompt_tokens == cached
    assert stage.prefix_cache_hit_percent == pytest.approx(100 * cached / (requests * prompt_tokens))
    # The mock's own counter: the same tokens (the preflight's lookup found nothing cached).
    assert stats["cached_tokens_total"] == cached
    # The server's view from its counters over the stage's scrape window: the preflight's
    # lookup precedes the window, so both sides count the same lookups (docs/server-metrics.md).
    server = stage.server_metrics
    source = "vllm:prefix_cache" if style == "vllm" else "llamacpp:prompt_tokens_cached"
    assert server.prefix_cache_source.startswith(source), server.prefix_cache_source
    assert server.prefix_cache_hit_percent == pytest.approx(stage.prefix_cache_hit_percent, abs=1e-9)


async def test_nothing_beyond_the_shared_prefix_is_cached_across_stages_and_agents(
    controller: Controller, client: ControllerClient, tokenizer_path: Path
) -> None:
    """Request n of every assignment (two stages of two agents here) once wrote the same
    request marker after the shared prefix: 61 tokens of BOS, header and prefix, plus three
    marker pieces, reached a fourth block, and a later stage hit 64 tokens instead of 48."""
    prefix, requests = 57, 12
    tokenizer_id = await upload_tokenizer(client, tokenizer_path)
    config = MockConfig(
        ttft_ms=2,
        itl_ms=1,
        output_tokens=1000,
        tokenizer=str(tokenizer_path),
        bos_tokens=BOS,
        chat_template_tokens=TEMPLATE,
        prefix_cache=True,
        prefix_cache_block_tokens=BLOCK,
    )
    address = f"127.0.0.1:{controller.port}"
    async with MockServer(config) as mock, running_agent(address, "agent-1"), running_agent(address, "agent-2"):
        spec = base_spec(mock)
        spec.workload.tokenizer_id = tokenizer_id
        spec.workload.synthetic.input_tokens.fixed = 100
        spec.workload.synthetic.output_tokens.fixed = 3
        spec.workload.synthetic.shared_prefix_tokens = prefix
        # Fixed: two assignments' markers could still agree by chance (3 pieces in 51^3).
        spec.workload.seed = 18
        spec.placement.agents = 2
        for _ in range(2):
            spec.stages.add(concurrency=2, requests=requests)
        run = await client.create_run(spec)
        final = await wait_final(client, run.id, 45)
        assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        samples = [s async for s in client.export_samples(run.id)]
    assert len(samples) == 2 * requests and len({(s.stage_index, s.agent_name) for s in samples}) == 4
    hit = block_floor(BOS + TEMPLATE + prefix)
    assert BOS + TEMPLATE + prefix + 3 >= hit + BLOCK  # the marker would complete another block
    assert sorted(s.cached_prompt_tokens for s in samples) == [0] + [hit] * (2 * requests - 1)


# --- 3. conversations against the prefix cache ---------------------------------------------


async def test_conversation_turns_hit_their_history_and_pay_only_uncached_prefill(
    controller: Controller, client: ControllerClient, tokenizer_path: Path
) -> None:
    sessions, turns, user, output, system = 4, 3, 60, 20, 30
    ttft_ms, prefill_ms_per_1k, think_s = 10.0, 2000.0, 0.2
    tokenizer_id = await upload_tokenizer(client, tokenizer_path)
    config = MockConfig(
        ttft_ms=ttft_ms,
        itl_ms=1,
        output_tokens=1000,
        tokenizer=str(tokenizer_path),
        bos_tokens=BOS,
        chat_template_tokens=TEMPLATE,
        prefix_cache=True,
        prefix_cache_block_tokens=BLOCK,
        prefill_ms_per_1k_tokens=prefill_ms_per_1k,
    )
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = base_spec(mock)
        spec.workload.tokenizer_id = tokenizer_id
        c = spec.workload.conversation
        c.turns.fixed, c.input_tokens.fixed, c.output_tokens.fixed, c.system_prompt_tokens = turns, user, output, system
        spec.workload.think_time.fixed.FromMilliseconds(int(think_s * 1000))
        # `sessions` sessions start together and run in step; the budget is their turns.
        spec.stages.add(concurrency=sessions, requests=sessions * turns)
        result, samples, stored = await finished(controller, client, spec)
    (stage,) = result.stages

    # Turn k's prompt: BOS, the system prompt, k user prompts and k - 1 replies, each after
    # its header, and the generation prompt (all exact with the tokenizer).
    def prompt_tokens(k: int) -> int:
        return BOS + TEMPLATE * (2 * k + 1) + system + k * user + (k - 1) * output

    # Turn k > 1 repeats turn k - 1's prompt and reply, cached when that reply ended: its
    # whole blocks. Turn 1 shares BOS, the system prompt and the user header with the other
    # sessions' turn 1: every session but the first to arrive finds their whole blocks.
    def cached(k: int) -> int:
        return block_floor(prompt_tokens(k - 1) + output) if k > 1 else block_floor(BOS + 2 * TEMPLATE + system)

    by_session: dict[tuple[str, int], dict[int, run_service_pb2.ExportedSample]] = collections.defaultdict(dict)
    for s in samples:
        by_session[(s.agent_session, s.session_id)][s.turn_index] = s
    assert len(by_session) == sessions
    first_turn_misses = 0
    for session in by_session.values():
        assert sorted(session) == [1, 2, 3]
        assert [session[k].last_turn for k in (1, 2, 3)] == [False, False, True]
        for k, s in session.items():
            assert s.prompt_tokens == prompt_tokens(k) and s.output_tokens == output and s.cached_reported
            if k == 1 and s.cached_prompt_tokens == 0:
                first_turn_misses += 1
            else:
                assert s.cached_prompt_tokens == cached(k), (k, s.cached_prompt_tokens)
    assert first_turn_misses == 1
    # The agent's requested input: the history counted with the tokenizer (no template).
    messages = {1: 2, 2: 4, 3: 6}
    overhead = {prompt_tokens(k): BOS + TEMPLATE * (m + 1) for k, m in messages.items()}
    assert all(
        int(p) == int(r) + overhead[int(p)]
        for p, r in zip(stored.columns.prompt_tokens, stored.requested_input_tokens, strict=True)
    )

    # Per turn: every session's k-th request, and the hit rate of the model.
    assert [t.turn for t in stage.turns] == [1, 2, 3]
    for t in stage.turns:
        assert t.requests_ok == sessions and t.requests_failed == 0
        assert t.mean_input_tokens == pytest.approx(prompt_tokens(t.turn))
        hits = cached(t.turn) * (sessions - 1 if t.turn == 1 else sessions)
        assert t.prefix_cache_hit_percent == pytest.approx(100 * hits / (sessions * prompt_tokens(t.turn)))
    assert stage.turns[1].prefix_cache_hit_percent > 50 and stage.turns[2].prefix_cache_hit_percent > 60

    # TTFT pays the prefill of the uncached tokens only. The mock is never early; a loaded
    # machine makes it late, by a margin the test allows generously (half, plus 60 ms) — far
    # less than the prefill the cached part would have cost (turn 3: 2 ms x 192 tokens).
    for s in samples:
        due_ms = ttft_ms + prefill_ms_per_1k * (s.prompt_tokens - s.cached_prompt_tokens) / 1000
        uncached_all_ms = ttft_ms + prefill_ms_per_1k * s.prompt_tokens / 1000
        assert due_ms - 1 <= s.ttft_ms <= due_ms * 1.5 + 60, (s.turn_index, s.ttft_ms, due_ms)
        if s.turn_index > 1:
            assert due_ms * 1.5 + 60 < uncached_all_ms  # the bound tells the cache's effect apart
    # By turn: turn 3 sends 2.7 x turn 1's prompt, yet waits about as long (reference in-run).
    ttft = {t.turn: t.ttft.mean_ms for t in stage.turns}
    assert ttft[3] < 1.5 * ttft[1], ttft
    assert prompt_tokens(3) > 2.5 * prompt_tokens(1)

    # Sessions: all ran every turn; a session lasts its turns plus the think times between.
    assert stage.sessions_completed == sessions
    assert stage.session_duration.count == sessions
    durations = []
    for session in by_session.values():
        first, last = session[1], session[turns]
        durations.append((last.sent_unix_ns - first.sent_unix_ns) / 1e6 + last.done_ms)
        least = sum(session[k].done_ms for k in session) + (turns - 1) * think_s * 1000
        assert least <= durations[-1] <= least + (turns - 1) * 100, (least, durations[-1])
    assert stage.session_duration.mean_ms == pytest.approx(sum(durations) / sessions, rel=1e-3)
    assert stage.session_duration.max_ms == pytest.approx(max(durations), rel=1e-3)

    # The exports carry what the aggregates count; the run-wide figures are the stage's.
    assert stage.cached_prompt_tokens == sum(s.cached_prompt_tokens for s in samples)
    assert stage.prompt_tokens == sum(s.prompt_tokens for s in samples)
    overall = result.overall
    assert overall.sessions_completed == sessions and [t.requests_ok for t in overall.turns] == [sessions] * turns
    assert overall.prefix_cache_hit_percent == pytest.approx(stage.prefix_cache_hit_percent)


# --- 5. trace replay --------------------------------------------------------------------

TRACE_BLOCK = 2 * BLOCK  # the trace's blocks: whole blocks of the mock's cache

# (hash_ids, input_length): the expected cache hits follow from the ids (docs/workloads.md,
# "Trace replay": equal ids are equal text; the last block is cut to the input length).
MOONCAKE = [
    ([1, 2, 3], 96),  # nothing cached yet
    ([1, 2, 3], 96),  # the same prompt, 6 whole blocks: 5 found (the last token is computed)
    ([1, 2, 4], 100),  # the first two trace blocks
    ([1, 2], 50),  # block 2 cut after 18 tokens: 50 shared, 3 whole blocks
    ([5], 40),  # a new block, then random text
    ([5, 6], 80),  # block 5 again
    ([1, 7, 3], 96),  # block 1 only: block 3 after another block is another prefix
    ([7], 40),  # block 7 at position 0 is not block 7 at position 1
    ([1, 2, 3, 8], 128),  # request 0's three blocks
]


def trace_units(index: int, hash_ids: list[int], length: int) -> list[object]:
    """A trace prompt as the cache sees it: token p of block h is (h, p); after the blocks,
    text of the request's own."""
    units: list[object] = [(h, p) for h in hash_ids for p in range(TRACE_BLOCK)][:length]
    return units + [("own", index, n) for n in range(length - len(units))]


def predicted_cached(trace: list[tuple[list[int], int]]) -> list[int]:
    """Each request's cached tokens: the longest prefix it shares with an earlier one, in
    whole blocks, at most (P - 1) // block blocks."""
    prompts = [trace_units(i, ids, n) for i, (ids, n) in enumerate(trace)]
    out = []
    for i, units in enumerate(prompts):
        shared = 0
        for earlier in prompts[:i]:
            n = 0
            while n < min(len(units), len(earlier)) and units[n] == earlier[n]:
                n += 1
            shared = max(shared, n)
        out.append(min(block_floor(shared), (len(units) - 1) // BLOCK * BLOCK))
    return out


@pytest.mark.parametrize("with_tokenizer", [False, True])
async def test_a_mooncake_traces_shared_blocks_hit_the_prefix_cache(
    controller: Controller, client: ControllerClient, tokenizer_path: Path, with_tokenizer: bool
) -> None:
    trace = [
        {"timestamp": 150 * i, "input_length": n, "output_length": 2 + i % 3, "hash_ids": ids}
        for i, (ids, n) in enumerate(MOONCAKE)
    ]
    data = "".join(json.dumps(r) + "\n" for r in trace).encode()
    dataset_id = str((await client.upload_dataset(data, run_pb2.DATASET_FORMAT_MOONCAKE_TRACE)).dataset.id)
    expected = predicted_cached(MOONCAKE)
    assert expected == [0, 80, 64, 48, 0, 32, 32, 0, 96]  # the model, spelled out
    # Words (one token each for the mock without a tokenizer), or the tokenizer's pieces on
    # both sides; no template, so the cache sees exactly the prompt's tokens.
    config = MockConfig(
        ttft_ms=2,
        itl_ms=1,
        output_tokens=1000,
        prefix_cache=True,
        prefix_cache_block_tokens=BLOCK,
        tokenizer=str(tokenizer_path) if with_tokenizer else "",
    )
    address = f"127.0.0.1:{controller.port}"
    async with MockServer(config) as mock, running_agent(address, "agent-1"), running_agent(address, "agent-2"):
        spec = base_spec(mock)
        if with_tokenizer:
            spec.workload.tokenizer_id = await upload_tokenizer(client, tokenizer_path)
        spec.workload.trace.CopyFrom(run_pb2.Trace(dataset_id=dataset_id, replay_speed=1.0, block_tokens=TRACE_BLOCK))
        spec.stages.add(trace_replay=True, requests=len(trace)).duration.FromSeconds(20)
        spec.placement.agents = 2
        spec.server_metrics.endpoints.append(metrics_url(mock))
        spec.server_metrics.scrape_interval.FromMilliseconds(200)
        result, samples, _ = await finished(controller, client, spec)
    # Request i by its send time (the trace's order: 150 ms apart).
    samples.sort(key=lambda s: s.sent_unix_ns)
    assert [s.prompt_tokens for s in samples] == [n for _, n in MOONCAKE]
    assert [s.output_tokens for s in samples] == [r["output_length"] for r in trace]
    assert [s.cached_prompt_tokens for s in samples] == expected
    assert {s.agent_name for s in samples} == {"agent-1", "agent-2"}
    (stage,) = result.stages
    assert stage.cached_prompt_tokens == sum(expected)
    hit = 100 * sum(expected) / sum(n for _, n in MOONCAKE)
    assert stage.prefix_cache_hit_percent == pytest.approx(hit)
    assert stage.server_metrics.prefix_cache_hit_percent == pytest.approx(hit, abs=1e-9)
    # Each agent's row: its share's cached tokens.
    rows = {a.agent_name: a.cached_prompt_tokens for a in stage.agents}
    assert rows == {
        name: sum(s.cached_prompt_tokens for s in samples if s.agent_name == name) for name in ("agent-1", "agent-2")
    }


async def test_an_azure_traces_lengths_are_honoured_exactly(
    controller: Controller, client: ControllerClient, tokenizer_path: Path
) -> None:
    lengths = [(37, 3), (120, 9), (5, 1), (64, 4), (200, 2), (17, 12)]
    rows = ["TIMESTAMP,ContextTokens,GeneratedTokens"]
    rows += [f"2023-11-16 18:15:{46 + i // 5:02d}.{(i % 5) * 2:d}000000,{n},{o}" for i, (n, o) in enumerate(lengths)]
    data = ("\n".join(rows) + "\n").encode()
    dataset_id = str((await client.upload_dataset(data, run_pb2.DATASET_FORMAT_AZURE_TRACE)).dataset.id)
    tokenizer_id = await upload_tokenizer(client, tokenizer_path)
    # With the tokenizer on both sides and no template, a prompt of n tokens is n for the mock.
    config = MockConfig(ttft_ms=2, itl_ms=1, output_tokens=1000, tokenizer=str(tokenizer_path))
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = base_spec(mock)
        spec.workload.tokenizer_id = tokenizer_id
        spec.workload.trace.CopyFrom(run_pb2.Trace(dataset_id=dataset_id, replay_speed=1.0))
        spec.stages.add(trace_replay=True, requests=len(lengths)).duration.FromSeconds(20)
        result, samples, stored = await finished(controller, client, spec)
    samples.sort(key=lambda s: s.sent_unix_ns)
    assert [(s.prompt_tokens, s.output_tokens) for s in samples] == lengths
    assert sorted(stored.requested_input_tokens.tolist()) == sorted(n for n, _ in lengths)
    assert result.tokens.exact and result.tokens.template_overhead_tokens == 0
    # Sent at the trace's times (200 ms apart), from the stage start: scheduled = sent - queue delay.
    scheduled = [s.sent_unix_ns - s.queue_delay_ms * 1e6 for s in samples]
    gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(scheduled)]
    assert gaps == pytest.approx([200.0] * (len(lengths) - 1), abs=1.0)


@pytest.mark.parametrize("thinking", [7, len(VOCABULARY)])
async def test_a_reasoning_conversation_reuses_only_the_answers_it_sends_back(
    controller: Controller, client: ControllerClient, thinking: int
) -> None:
    """The history carries each reply's answer, not its reasoning: turn k hits turn k - 1's
    prompt, and no more — unless the answer's first words equal the reasoning's (the mock's
    output cycles through its words, so an R that is a multiple of their number starts the
    answer with the reasoning's words), when the hit extends over the answer."""
    sessions, turns, user, output = 3, 3, 30, 20
    answer = output - thinking
    config = MockConfig(
        ttft_ms=2,
        itl_ms=1,
        output_tokens=1000,
        bos_tokens=BOS,
        chat_template_tokens=TEMPLATE,
        prefix_cache=True,
        prefix_cache_block_tokens=BLOCK,
        style="reasoning",
        reasoning_tokens=thinking,
    )
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = base_spec(mock)
        c = spec.workload.conversation
        c.turns.fixed, c.input_tokens.fixed, c.output_tokens.fixed = turns, user, output
        spec.stages.add(concurrency=sessions, requests=sessions * turns)
        result, samples, _ = await finished(controller, client, spec)

    def prompt_tokens(k: int) -> int:  # k users and k - 1 answers, each after its header
        return BOS + TEMPLATE * 2 * k + k * user + (k - 1) * answer

    extended = answer if thinking % len(VOCABULARY) == 0 else 0
    for s in samples:
        k = s.turn_index
        assert s.prompt_tokens == prompt_tokens(k) and s.reasoning_tokens == thinking
        assert s.cached_prompt_tokens == (block_floor(prompt_tokens(k - 1) + extended) if k > 1 else 0), (k, s)
    (stage,) = result.stages
    assert [t.requests_ok for t in stage.turns] == [sessions] * turns
    assert stage.sessions_completed == sessions
    assert stage.reasoning_tokens == sessions * turns * thinking


async def test_an_uploaded_chat_dataset_replays_its_turns_exactly_and_hits_its_history(
    controller: Controller, client: ControllerClient, tokenizer_path: Path, tok: Tokenizer
) -> None:
    """`Dataset.all_turns` with the tokenizer: each turn's requested input is its messages
    counted with it, the server's count adds the template, and turn 2 hits turn 1's prompt
    and reply; turn 1 of every session but the first hits the shared system prompt."""
    system = "You answer questions about " + " ".join(WORDS[100:140]) + "."
    firsts = ("zebra", "mango", "quartz")  # first tokens differ: the sessions part after the header
    chats = [
        {
            "messages": [
                {"role": "system", "content": system},
                {"role": "user", "content": f"{w} first question about the history"},
                {"role": "assistant", "content": "one two three four five"},
                {"role": "user", "content": f"and the second question of {w}"},
                {"role": "assistant", "content": "a b"},
            ]
        }
        for w in firsts
    ]
    data = "".join(json.dumps(c) + "\n" for c in chats).encode()
    dataset_id = str((await client.upload_dataset(data, run_pb2.DATASET_FORMAT_JSONL)).dataset.id)
    tokenizer_id = await upload_tokenizer(client, tokenizer_path)
    config = MockConfig(
        ttft_ms=2,
        itl_ms=1,
        output_tokens=1000,
        tokenizer=str(tokenizer_path),
        bos_tokens=BOS,
        chat_template_tokens=TEMPLATE,
        prefix_cache=True,
        prefix_cache_block_tokens=BLOCK,
    )
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = base_spec(mock)
        spec.workload.tokenizer_id = tokenizer_id
        spec.workload.dataset.dataset_id = dataset_id
        spec.workload.dataset.all_turns = True
        spec.stages.add(concurrency=1, requests=2 * len(chats))  # each entry once
        result, samples, stored = await finished(controller, client, spec)
    count = tok.count
    by_first = {}
    for s in samples:
        by_first.setdefault((s.agent_session, s.session_id), {})[s.turn_index] = s
    assert len(by_first) == len(chats) and all(sorted(t) == [1, 2] for t in by_first.values())
    # Turn 1: system + first user; turn 2 adds the mock's 5-token reply and the second user.
    # The three entries' user texts have the same count up to the word: compare as a set.
    turn1 = {BOS + 3 * TEMPLATE + count(system) + count(c["messages"][1]["content"]) for c in chats}
    assert {t[1].prompt_tokens for t in by_first.values()} == turn1
    for session in by_first.values():
        first, second = session[1], session[2]
        assert first.output_tokens == 5 and second.output_tokens == 2  # the dataset's reply lengths
        users = [
            c
            for c in chats
            if BOS + 3 * TEMPLATE + count(system) + count(c["messages"][1]["content"]) == first.prompt_tokens
        ]
        assert any(
            second.prompt_tokens == first.prompt_tokens + 2 * TEMPLATE + 5 + count(c["messages"][3]["content"])
            for c in users
        )
        assert second.cached_prompt_tokens == block_floor(first.prompt_tokens + 5)
    # Requested input: the messages counted with the tokenizer; the mock adds the template.
    messages = {1: 2, 2: 4}
    turns = {s.prompt_tokens: s.turn_index for s in samples}
    assert all(
        int(p) == int(r) + BOS + TEMPLATE * (messages[turns[int(p)]] + 1)
        for p, r in zip(stored.columns.prompt_tokens, stored.requested_input_tokens, strict=True)
    )
    shared_system = block_floor(BOS + 2 * TEMPLATE + count(system))
    assert shared_system >= BLOCK
    assert sorted(t[1].cached_prompt_tokens for t in by_first.values()) == [0, shared_system, shared_system]
    (stage,) = result.stages
    assert stage.sessions_completed == len(chats)


async def test_a_group_of_repeats_sums_sessions_turns_and_cached_tokens(
    controller: Controller, client: ControllerClient
) -> None:
    """Two repeats of a conversation (each its own seed, so its own prompts): the group's
    stage sums what each run's model predicts (docs/metrics.md, "Groups of repeats")."""
    repeats, sessions, turns, user, output = 2, 2, 3, 30, 10
    config = MockConfig(
        ttft_ms=2,
        itl_ms=1,
        output_tokens=1000,
        bos_tokens=BOS,
        chat_template_tokens=TEMPLATE,
        prefix_cache=True,
        prefix_cache_block_tokens=BLOCK,
    )
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = base_spec(mock)
        c = spec.workload.conversation
        c.turns.fixed, c.input_tokens.fixed, c.output_tokens.fixed = turns, user, output
        spec.stages.add(concurrency=sessions, requests=sessions * turns)
        group = await client.create_group(spec, repeats)
        for run_id in group.run_ids:
            final = await wait_final(client, run_id, 45)
            assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
        response = await client.get_group_result(group.id)

    def prompt_tokens(k: int) -> int:
        return BOS + TEMPLATE * 2 * k + k * user + (k - 1) * output

    # Turn 1 shares BOS and a header only (less than a block); turn k > 1 the blocks of turn
    # k - 1's prompt and reply.
    cached = {k: block_floor(prompt_tokens(k - 1) + output) if k > 1 else 0 for k in range(1, turns + 1)}
    (stage,) = response.result.stages
    assert stage.repeats == repeats
    assert stage.sessions_completed == repeats * sessions
    assert stage.cached_prompt_tokens == repeats * sessions * sum(cached.values())
    assert [t.requests_ok for t in stage.turns] == [repeats * sessions] * turns
    for t in stage.turns:
        assert t.mean_input_tokens == pytest.approx(prompt_tokens(t.turn))
        assert t.prefix_cache_hit_percent == pytest.approx(100 * cached[t.turn] / prompt_tokens(t.turn))
    total = sum(prompt_tokens(k) for k in cached)
    assert stage.prefix_cache_hit_percent == pytest.approx(100 * sum(cached.values()) / total)
    assert stage.session_duration.count == repeats * sessions


async def test_sessions_cut_by_the_budget_are_not_completed(controller: Controller, client: ControllerClient) -> None:
    """3 sessions in progress and a budget of 10 turns: the sessions that ran all 3 turns are
    the completed ones; those the budget cut are not, and have no duration."""
    concurrency, turns, budget = 3, 3, 10
    config = MockConfig(ttft_ms=2, itl_ms=1, output_tokens=1000)
    async with MockServer(config) as mock, running_agent(f"127.0.0.1:{controller.port}"):
        spec = base_spec(mock)
        c = spec.workload.conversation
        c.turns.fixed, c.input_tokens.fixed, c.output_tokens.fixed = turns, 20, 5
        spec.stages.add(concurrency=concurrency, requests=budget)
        result, samples, _ = await finished(controller, client, spec)
    assert len(samples) == budget
    by_session: dict[tuple[str, int], list[run_service_pb2.ExportedSample]] = collections.defaultdict(list)
    for s in samples:
        by_session[(s.agent_session, s.session_id)].append(s)
    complete = [
        v for v in by_session.values() if sorted(s.turn_index for s in v) == [1, 2, 3] and any(s.last_turn for s in v)
    ]
    cut = [v for v in by_session.values() if not any(s.last_turn for s in v)]
    assert complete and cut  # 10 turns are not whole sessions of 3
    assert len(complete) + len(cut) == len(by_session)
    (stage,) = result.stages
    assert stage.sessions_completed == len(complete)
    assert stage.session_duration.count == len(complete)
    assert [t.requests_ok for t in stage.turns] == [
        sum(any(s.turn_index == k for s in v) for v in by_session.values()) for k in range(1, turns + 1)
    ]
