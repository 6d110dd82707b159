"""SampleBatcher: columns, offsets, flags, ITL concatenation, acks, replay, backpressure."""

from __future__ import annotations

import asyncio

import pytest

from agent.batcher import SampleBatcher
from agent.sample import ClockAnchor, RequestSample
from common.codes import SampleFlag
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from tests.conftest import poll_until

pytestmark = pytest.mark.timeout(60)

ANCHOR = ClockAnchor(unix_ns=1_700_000_000_000_000_000, perf_ns=1_000_000)


def make_batcher(**kwargs: int) -> tuple[SampleBatcher, list[agent_service_pb2.SampleBatch]]:
    emitted: list[agent_service_pb2.SampleBatch] = []
    batcher = SampleBatcher("asg-1", emitted.append, anchor=ANCHOR, **kwargs)
    return batcher, emitted


def ok_sample(sent: int, *, itl: list[int] | None = None) -> RequestSample:
    return RequestSample(
        scheduled_ns=sent - 500,
        sent_ns=sent,
        first_byte_ns=sent + 1_000,
        first_token_ns=sent + 2_000,
        last_token_ns=sent + 9_000,
        done_ns=sent + 9_500,
        prompt_tokens=128,
        output_tokens=32,
        usage_from_server=True,
        status=run_pb2.REQUEST_STATUS_OK,
        itl_ns=itl or [],
    )


def test_columns_offsets_and_wall_clock() -> None:
    batcher, emitted = make_batcher()
    batcher.add(ok_sample(2_000_000, itl=[3_000, 4_000]))
    failed = RequestSample(
        scheduled_ns=3_000_000,
        sent_ns=3_000_100,
        done_ns=3_500_000,
        status=run_pb2.REQUEST_STATUS_HTTP_5XX,
        error="HTTP 500: boom",
    )
    batcher.add(failed)
    batch = batcher.flush()
    assert batch is not None
    assert emitted == [batch]
    assert batch.assignment_id == "asg-1"
    assert batch.batch_seq == 1
    assert list(batch.sent_unix_ns) == [
        ANCHOR.unix_ns + 1_000_000,
        ANCHOR.unix_ns + 2_000_100,
    ]
    assert list(batch.queue_delay_ns) == [500, 100]
    assert list(batch.first_byte_ns) == [1_000, 0]
    assert list(batch.first_token_ns) == [2_000, 0]
    assert list(batch.last_token_ns) == [9_000, 0]
    assert list(batch.done_ns) == [9_500, 499_900]
    assert list(batch.prompt_tokens) == [128, 0]
    assert list(batch.output_tokens) == [32, 0]
    assert list(batch.status) == [run_pb2.REQUEST_STATUS_OK, run_pb2.REQUEST_STATUS_HTTP_5XX]
    assert list(batch.error) == ["", "HTTP 500: boom"]
    assert list(batch.flags) == [SampleFlag.USAGE_FROM_SERVER, 0]


def test_itl_concatenated_in_sample_order_with_counts() -> None:
    batcher, _ = make_batcher()
    batcher.add(ok_sample(2_000_000, itl=[1, 2, 3]))
    batcher.add(ok_sample(2_100_000, itl=[]))
    batcher.add(ok_sample(2_200_000, itl=[7, 8]))
    batch = batcher.flush()
    assert batch is not None
    assert list(batch.itl_count) == [3, 0, 2]
    assert list(batch.itl_ns) == [1, 2, 3, 7, 8]


def test_flags_warmup_and_estimated_counts() -> None:
    batcher, _ = make_batcher()
    warm = ok_sample(2_000_000)
    warm.warmup = True
    estimated = ok_sample(2_000_000)
    estimated.usage_from_server = False
    batcher.add(warm)
    batcher.add(estimated)
    batch = batcher.flush()
    assert batch is not None
    assert list(batch.flags) == [SampleFlag.USAGE_FROM_SERVER | SampleFlag.WARMUP, 0]


def test_time_equal_to_sent_stays_present() -> None:
    batcher, _ = make_batcher()
    sample = ok_sample(2_000_000)
    sample.first_byte_ns = sample.sent_ns
    batcher.add(sample)
    batch = batcher.flush()
    assert batch is not None
    assert list(batch.first_byte_ns) == [1]


def test_seals_at_max_batch_samples_and_numbers_batches() -> None:
    batcher, emitted = make_batcher(max_batch_samples=3)
    for i in range(7):
        batcher.add(ok_sample(2_000_000 + i))
    assert [b.batch_seq for b in emitted] == [1, 2]
    assert [len(b.status) for b in emitted] == [3, 3]
    assert batcher.pending_samples == 1
    assert batcher.flush() is not None
    assert batcher.flush() is None  # nothing pending: no empty batch
    assert batcher.batch_count == 3
    assert batcher.samples_total == 7


def test_ack_is_cumulative_and_unacked_are_replayed_in_order() -> None:
    batcher, _ = make_batcher(max_batch_samples=1)
    for i in range(5):
        batcher.add(ok_sample(2_000_000 + i))
    assert [b.batch_seq for b in batcher.unacked()] == [1, 2, 3, 4, 5]
    batcher.ack(3)
    assert [b.batch_seq for b in batcher.unacked()] == [4, 5]
    assert batcher.acked_seq == 3
    batcher.ack(2)  # stale ack: no effect
    assert [b.batch_seq for b in batcher.unacked()] == [4, 5]
    batcher.ack(5)
    assert batcher.unacked() == []
    assert batcher.all_acked


def test_all_acked_false_while_samples_pending() -> None:
    batcher, _ = make_batcher()
    assert batcher.all_acked
    batcher.add(ok_sample(2_000_000))
    assert not batcher.all_acked
    batcher.flush()
    assert not batcher.all_acked
    batcher.ack(1)
    assert batcher.all_acked


async def test_backpressure_until_acked() -> None:
    batcher, _ = make_batcher(max_batch_samples=1, max_unacked_batches=2)
    batcher.add(ok_sample(2_000_000))
    await asyncio.wait_for(batcher.wait_writable(), 1)  # below the limit: no wait
    batcher.add(ok_sample(2_000_001))
    waiter = asyncio.create_task(batcher.wait_writable())
    await asyncio.sleep(0)
    assert not waiter.done()
    batcher.ack(1)
    await asyncio.wait_for(waiter, 1)


async def test_backpressure_on_unacked_samples() -> None:
    batcher, _ = make_batcher(max_batch_samples=10, max_unacked_samples=3)
    for i in range(3):
        batcher.add(ok_sample(2_000_000 + i))
    batcher.flush()
    waiter = asyncio.create_task(batcher.wait_writable())
    await asyncio.sleep(0)
    assert not waiter.done()
    batcher.ack(1)
    await asyncio.wait_for(waiter, 1)


async def test_periodic_flush() -> None:
    batcher, emitted = make_batcher()
    runner = asyncio.create_task(batcher.run())
    try:
        batcher.add(ok_sample(2_000_000))
        assert await poll_until(lambda: bool(emitted))
        assert [b.batch_seq for b in emitted] == [1]
    finally:
        runner.cancel()


def test_reasoning_cache_and_conversation_columns_and_flags() -> None:
    batcher, _ = make_batcher()
    plain = ok_sample(2_000_000)
    turn = ok_sample(3_000_000)
    turn.first_reasoning_ns = turn.sent_ns + 1_500
    turn.first_answer_ns = turn.sent_ns + 4_000
    turn.reasoning_tokens = 20
    turn.cached_prompt_tokens = 64
    turn.cached_reported = True
    turn.session_id = 7
    turn.turn_index = 3
    turn.last_turn = True
    batcher.add(plain)
    batcher.add(turn)
    batch = batcher.flush()
    assert batch is not None
    assert list(batch.first_reasoning_ns) == [0, 1_500]
    assert list(batch.first_answer_ns) == [0, 4_000]
    assert list(batch.reasoning_tokens) == [0, 20]
    assert list(batch.cached_prompt_tokens) == [0, 64]
    assert list(batch.session_id) == [0, 7]
    assert list(batch.turn_index) == [0, 3]
    assert batch.flags[0] & (SampleFlag.CACHED_REPORTED | SampleFlag.LAST_TURN) == 0
    assert batch.flags[1] & SampleFlag.CACHED_REPORTED and batch.flags[1] & SampleFlag.LAST_TURN


def test_columns_without_a_nonzero_value_go_out_empty() -> None:
    batcher, _ = make_batcher()
    a, b = ok_sample(2_000_000), ok_sample(3_000_000)
    a.first_answer_ns = a.first_token_ns
    b.first_answer_ns = b.first_token_ns
    b.cached_reported = True  # a reported 0: the flag says so, the column stays empty
    batcher.add(a)
    batcher.add(b)
    batch = batcher.flush()
    assert batch is not None
    assert list(batch.first_answer_ns) == [2_000, 2_000]
    assert batch.flags[1] & SampleFlag.CACHED_REPORTED
    for name in ("first_reasoning_ns", "reasoning_tokens", "cached_prompt_tokens", "session_id", "turn_index"):
        assert len(getattr(batch, name)) == 0, name
    # The next batch starts afresh: nothing non-zero, every new column empty.
    batcher.add(ok_sample(4_000_000))
    nxt = batcher.flush()
    assert nxt is not None and len(nxt.first_answer_ns) == 0 and len(nxt.status) == 1
