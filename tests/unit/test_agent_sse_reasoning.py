"""Reasoning, answer and prefix-cache figures of the SSE and JSON parsers, against streams in
the shapes vLLM (`reasoning_content`, later `reasoning`), DeepSeek's API and OpenRouter
document (tests/unit/sse_fixtures/, abridged: a few events each, usage as they send it)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from agent.sample import RequestSample
from agent.sse import StreamParser, parse_json_body
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(60)

FIXTURES = Path(__file__).parent / "sse_fixtures"
OK = run_pb2.REQUEST_STATUS_OK


def replay(name: str, *, chunks: list[str] | None = None) -> RequestSample:
    """The fixture fed one SSE block per read, block k arriving at k * 100 ns."""
    sample = RequestSample(scheduled_ns=1, sent_ns=1, answer_chunks=chunks)
    parser = StreamParser(sample, chat=True)
    blocks = [b + b"\n\n" for b in (FIXTURES / name).read_bytes().split(b"\n\n") if b.strip()]
    for k, block in enumerate(blocks, start=1):
        parser.feed(block, k * 100)
    parser.finish(len(blocks) * 100 + 1)
    return sample


def test_vllm_reasoning_content_events_then_answer_with_cached_usage() -> None:
    chunks: list[str] = []
    s = replay("vllm_reasoning_content.sse", chunks=chunks)
    assert s.status == OK
    # Block 1 is the role chunk; 2-4 reasoning; 5-6 answer; 7 usage; 8 [DONE].
    assert (s.first_token_ns, s.first_reasoning_ns, s.first_answer_ns) == (200, 200, 500)
    assert s.last_token_ns == 600
    assert s.itl_ns == [100, 100, 100, 100]
    # No completion_tokens_details: reasoning tokens are the reasoning events.
    assert s.reasoning_tokens == 3
    assert s.output_tokens == 5 and s.usage_from_server
    assert (s.prompt_tokens, s.cached_prompt_tokens, s.cached_reported) == (12, 8, True)
    assert chunks == ["The", " answer"]


def test_newer_vllm_reasoning_field_and_null_prompt_details() -> None:
    chunks: list[str] = []
    s = replay("vllm_reasoning.sse", chunks=chunks)
    assert (s.first_reasoning_ns, s.first_answer_ns, s.first_token_ns) == (200, 400, 200)
    assert s.reasoning_tokens == 2
    assert s.output_tokens == 6
    # prompt_tokens_details: null means the server does not say: not reported, not 0 cached.
    assert (s.cached_prompt_tokens, s.cached_reported) == (0, False)
    assert "".join(chunks) == "Four."


def test_deepseek_usage_reasoning_tokens_win_over_counted_events() -> None:
    chunks: list[str] = []
    s = replay("deepseek_reasoner.sse", chunks=chunks)
    # The first chunk has an empty reasoning_content: not an event.
    assert (s.first_reasoning_ns, s.first_answer_ns) == (200, 400)
    assert s.reasoning_tokens == 37  # usage.completion_tokens_details, not the 2 events
    assert s.output_tokens == 41
    # A reported 0 is a count: the prefix cache served nothing.
    assert (s.cached_prompt_tokens, s.cached_reported) == (0, True)
    assert chunks == ["Hello", "!"]


def test_openrouter_reasoning_with_empty_content_and_comments() -> None:
    chunks: list[str] = []
    s = replay("openrouter_reasoning.sse", chunks=chunks)
    # Blocks: 1 comment, 2 reasoning (content ""), 3 comment, 4 reasoning, 5 answer.
    assert (s.first_reasoning_ns, s.first_answer_ns, s.first_token_ns) == (200, 500, 200)
    assert s.itl_ns == [200, 100]
    assert (s.reasoning_tokens, s.output_tokens) == (148, 150)
    assert (s.prompt_tokens, s.cached_prompt_tokens, s.cached_reported) == (10, 4, True)
    assert chunks == ["Paris"]


def test_plain_answer_has_no_reasoning_and_first_answer_is_first_token() -> None:
    s = replay("vllm_reasoning_content.sse")  # answer_chunks None: nothing collected, no error
    assert s.answer_chunks is None
    body = (FIXTURES / "vllm_reasoning_content.sse").read_bytes()
    plain = b"\n\n".join(b for b in body.split(b"\n\n") if b"reasoning_content" not in b) + b"\n\n"
    sample = RequestSample(scheduled_ns=1, sent_ns=1)
    parser = StreamParser(sample, chat=True)
    parser.feed(plain, 1000)
    parser.finish(1001)
    assert sample.first_answer_ns == sample.first_token_ns == 1000
    assert (sample.first_reasoning_ns, sample.reasoning_tokens) == (0, 0)


def test_counts_are_capped_by_output_and_prompt() -> None:
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": 9},
        "completion_tokens_details": {"reasoning_tokens": 7},
    }
    events = [
        {"choices": [{"index": 0, "delta": {"reasoning_content": "x"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "y"}, "finish_reason": "stop"}], "usage": usage},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    sample = RequestSample(scheduled_ns=1, sent_ns=1)
    parser = StreamParser(sample, chat=True)
    parser.feed(body, 10)
    parser.finish(11)
    assert (sample.reasoning_tokens, sample.output_tokens) == (3, 3)
    assert (sample.cached_prompt_tokens, sample.prompt_tokens) == (5, 5)


@pytest.mark.parametrize("bad", [None, "7", -1, True, 1.5])
def test_unusable_detail_values_are_ignored(bad: object) -> None:
    usage = {
        "prompt_tokens": 5,
        "completion_tokens": 3,
        "prompt_tokens_details": {"cached_tokens": bad},
        "completion_tokens_details": {"reasoning_tokens": bad},
    }
    events = [
        {"choices": [{"index": 0, "delta": {"reasoning": "x"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "y"}, "finish_reason": "stop"}], "usage": usage},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    sample = RequestSample(scheduled_ns=1, sent_ns=1)
    parser = StreamParser(sample, chat=True)
    parser.feed(body, 10)
    parser.finish(11)
    assert sample.status == OK
    assert sample.reasoning_tokens == 1  # the one reasoning event
    assert (sample.cached_prompt_tokens, sample.cached_reported) == (0, False)


def test_completions_text_goes_to_answer_chunks() -> None:
    events = [
        {"choices": [{"index": 0, "text": "one", "finish_reason": None}]},
        {"choices": [{"index": 0, "text": " two", "finish_reason": "stop"}]},
    ]
    body = b"".join(b"data: " + json.dumps(e).encode() + b"\n\n" for e in events) + b"data: [DONE]\n\n"
    chunks: list[str] = []
    sample = RequestSample(scheduled_ns=1, sent_ns=1, answer_chunks=chunks)
    parser = StreamParser(sample, chat=False)
    parser.feed(body, 10)
    parser.finish(11)
    assert chunks == ["one", " two"]
    assert sample.first_answer_ns == 10 and sample.first_reasoning_ns == 0


def test_json_body_reasoning_words_usage_details_and_answer_text() -> None:
    answer = {
        "choices": [{"message": {"role": "assistant", "content": "the answer", "reasoning": "a b c d"}}],
        "usage": {"prompt_tokens": 30, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 16}},
    }
    chunks: list[str] = []
    sample = RequestSample(answer_chunks=chunks)
    parse_json_body(sample, json.dumps(answer).encode(), chat=True)
    assert sample.status == OK
    assert (sample.output_tokens, sample.reasoning_tokens) == (20, 4)  # words of the reasoning
    assert (sample.cached_prompt_tokens, sample.cached_reported) == (16, True)
    assert chunks == ["the answer"]
    assert sample.first_answer_ns == sample.first_reasoning_ns == 0  # no events in a JSON body

    answer["usage"] = {
        "prompt_tokens": 30,
        "completion_tokens": 20,
        "completion_tokens_details": {"reasoning_tokens": 12},
    }
    sample = RequestSample()
    parse_json_body(sample, json.dumps(answer).encode(), chat=True)
    assert sample.reasoning_tokens == 12 and not sample.cached_reported

    del answer["usage"]
    sample = RequestSample()
    parse_json_body(sample, json.dumps(answer).encode(), chat=True)
    assert (sample.output_tokens, sample.reasoning_tokens) == (6, 4)
