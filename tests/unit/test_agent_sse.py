"""The SSE parser against byte chunks as they come off the network (no network)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from agent.sample import RequestSample
from agent.sse import StreamParser, parse_json_body
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(60)

OK = run_pb2.REQUEST_STATUS_OK
PROTOCOL = run_pb2.REQUEST_STATUS_PROTOCOL


def chat_event(
    content: str | None = None,
    *,
    role: bool = False,
    reasoning: str | None = None,
    finish: str | None = None,
    usage: dict[str, int] | None = None,
    choices: bool = True,
) -> bytes:
    delta: dict[str, Any] = {}
    if role:
        delta["role"] = "assistant"
    if content is not None or role:
        delta["content"] = content
    if reasoning is not None:
        delta["reasoning_content"] = reasoning
    body: dict[str, Any] = {"id": "x", "object": "chat.completion.chunk"}
    body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish}] if choices else []
    body["usage"] = usage
    return b"data: " + json.dumps(body).encode() + b"\n\n"


def text_event(text: str, *, finish: str | None = None) -> bytes:
    body = {"choices": [{"index": 0, "text": text, "finish_reason": finish}], "usage": None}
    return b"data: " + json.dumps(body).encode() + b"\n\n"


DONE = b"data: [DONE]\n\n"
USAGE = {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}


def parse(
    chunks: list[tuple[bytes, int]], *, chat: bool = True, eof_ns: int | None = None
) -> tuple[RequestSample, StreamParser]:
    sample = RequestSample(scheduled_ns=1, sent_ns=1)
    parser = StreamParser(sample, chat=chat)
    for data, t in chunks:
        parser.feed(data, t)
    parser.finish(eof_ns if eof_ns is not None else chunks[-1][1] + 1)
    return sample, parser


def test_one_event_per_read_gives_all_times_and_server_usage() -> None:
    sample, _ = parse(
        [
            (chat_event("", role=True), 100),
            (chat_event("Hello"), 200),
            (chat_event(" world"), 350),
            (chat_event("!", finish="stop"), 400),
            (chat_event(choices=False, usage=USAGE), 410),
            (DONE, 420),
        ]
    )
    assert sample.status == OK
    assert sample.first_byte_ns == 100
    assert sample.first_token_ns == 200  # the role chunk with "" is not a token
    assert sample.last_token_ns == 400
    assert sample.itl_ns == [150, 50]
    assert sample.done_ns == 420
    assert (sample.prompt_tokens, sample.output_tokens) == (7, 3)
    assert sample.usage_from_server


def test_role_chunk_with_null_content_is_not_a_token() -> None:
    sample, _ = parse([(chat_event(None, role=True), 100), (chat_event("a"), 300), (DONE, 400)])
    assert sample.first_token_ns == 300
    assert sample.first_byte_ns == 100


def test_data_line_split_across_reads_is_stamped_when_complete() -> None:
    event = chat_event("Hello")
    cut = len(event) // 2
    sample, _ = parse([(event[:7], 100), (event[7:cut], 150), (event[cut:], 200), (DONE, 300)])
    assert sample.status == OK
    assert sample.first_byte_ns == 100
    assert sample.first_token_ns == 200
    assert sample.output_tokens == 1


def test_several_events_in_one_read_share_its_arrival_time() -> None:
    blob = chat_event("a") + chat_event("b") + chat_event("c")
    sample, parser = parse([(blob, 100), (chat_event("d") + DONE, 250)])
    assert sample.first_token_ns == 100
    assert sample.last_token_ns == 250
    assert sample.itl_ns == [0, 0, 150]
    assert parser.text_events == 4


def test_split_in_the_middle_of_done_and_crlf_line_endings() -> None:
    crlf = chat_event("a").replace(b"\n", b"\r\n")
    sample, _ = parse([(crlf, 100), (b"data: [DO", 200), (b"NE]\r\n\r\n", 300)])
    assert sample.status == OK
    assert sample.done_ns == 300


def test_keepalive_comments_and_other_fields_are_ignored() -> None:
    sample, _ = parse(
        [
            (b": keep-alive\n\n", 50),
            (b"event: message\nid: 1\n" + chat_event("a"), 100),
            (b":\n\n" + chat_event("b", finish="length") + DONE, 200),
        ]
    )
    assert sample.status == OK
    assert sample.first_byte_ns == 50  # comments are bytes too
    assert sample.first_token_ns == 100
    assert sample.itl_ns == [100]


def test_usage_on_a_chunk_that_also_has_choices() -> None:
    last = chat_event("c", finish="stop", usage={"prompt_tokens": 5, "completion_tokens": 9})
    sample, _ = parse([(chat_event("a"), 100), (last, 200), (DONE, 300)])
    assert sample.output_tokens == 9
    assert sample.prompt_tokens == 5
    assert sample.usage_from_server
    assert sample.last_token_ns == 200


def test_reasoning_content_counts_as_text() -> None:
    sample, _ = parse(
        [
            (chat_event(None, role=True), 50),
            (chat_event(None, reasoning="thinking"), 100),
            (chat_event("answer"), 200),
            (DONE, 300),
        ]
    )
    assert sample.first_token_ns == 100
    assert sample.itl_ns == [100]
    assert sample.output_tokens == 2


def test_completions_text_events() -> None:
    sample, _ = parse(
        [(text_event(""), 50), (text_event(" a"), 100), (text_event(" b", finish="stop"), 160), (DONE, 170)],
        chat=False,
    )
    assert sample.status == OK
    assert sample.first_token_ns == 100
    assert sample.itl_ns == [60]
    assert sample.output_tokens == 2


def test_completions_parser_ignores_chat_deltas() -> None:
    sample, _ = parse([(chat_event("a"), 100), (DONE, 200)], chat=False)
    assert sample.first_token_ns == 0
    assert sample.output_tokens == 0


def test_no_usage_estimates_output_tokens_from_text_events() -> None:
    sample, _ = parse([(chat_event("a") + chat_event("b") + chat_event("c"), 100), (DONE, 200)])
    assert sample.status == OK
    assert sample.output_tokens == 3
    assert not sample.usage_from_server
    assert sample.prompt_tokens == 0


def test_error_event_is_a_protocol_error() -> None:
    error = {"error": {"message": "model overloaded", "type": "ServerError", "code": 503}}
    sample, parser = parse([(chat_event("a"), 100), (b"data: " + json.dumps(error).encode() + b"\n\n", 200)])
    assert sample.status == PROTOCOL
    assert "model overloaded" in sample.error
    assert parser.closed
    assert sample.done_ns == 200
    assert sample.output_tokens == 1  # what arrived before the error still counts


def test_malformed_json_is_a_protocol_error_and_later_input_is_ignored() -> None:
    sample, _ = parse([(b'data: {"choices": [\n\n', 100), (chat_event("a") + DONE, 200)])
    assert sample.status == PROTOCOL
    assert "malformed JSON" in sample.error
    assert sample.first_token_ns == 0


def test_stream_without_done_or_finish_reason_is_a_protocol_error() -> None:
    sample, _ = parse([(chat_event("a"), 100), (chat_event("b"), 200)], eof_ns=250)
    assert sample.status == PROTOCOL
    assert "without [DONE]" in sample.error
    assert sample.done_ns == 250  # a failed response ends where the failure was seen


def test_finish_reason_without_done_ends_at_eof() -> None:
    sample, _ = parse([(chat_event("a"), 100), (chat_event("b", finish="stop"), 200)], eof_ns=250)
    assert sample.status == OK
    assert sample.done_ns == 250


def test_last_line_without_newline_is_processed_at_eof() -> None:
    sample, _ = parse([(chat_event("a"), 100), (b"data: [DONE]", 200)], eof_ns=210)
    assert sample.status == OK
    assert sample.done_ns == 210


def test_data_without_space_and_unknown_data() -> None:
    sample, _ = parse([(b'data:{"choices":[{"delta":{"content":"x"}}]}\n\n', 100), (DONE, 120)])
    assert sample.first_token_ns == 100
    assert sample.status == OK
    bad, _ = parse([(b"data: hello\n\n", 100)])
    assert bad.status == PROTOCOL


def test_non_streaming_chat_body() -> None:
    body = {
        "choices": [{"message": {"role": "assistant", "content": "one two three"}}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 3},
    }
    sample = RequestSample()
    parse_json_body(sample, json.dumps(body).encode(), chat=True)
    assert sample.status == OK
    assert (sample.prompt_tokens, sample.output_tokens, sample.usage_from_server) == (4, 3, True)


def test_non_streaming_reasoning_answer_counts_reasoning_and_content_words() -> None:
    # A reasoning parser's non-streamed answer (vLLM, SGLang): both parts are generated text.
    message = {"role": "assistant", "content": "the answer", "reasoning_content": "let me think first"}
    sample = RequestSample()
    parse_json_body(sample, json.dumps({"choices": [{"message": message}]}).encode(), chat=True)
    assert sample.status == OK
    assert sample.output_tokens == 2 + 4
    assert not sample.usage_from_server
    # Newer vLLM names it `reasoning` and may repeat it as `reasoning_content`: counted once.
    both = {"role": "assistant", "content": "ok", "reasoning": "a b c", "reasoning_content": "a b c"}
    sample = RequestSample()
    parse_json_body(sample, json.dumps({"choices": [{"message": both}]}).encode(), chat=True)
    assert sample.output_tokens == 1 + 3


def test_non_streaming_without_usage_estimates_words() -> None:
    sample = RequestSample()
    parse_json_body(sample, b'{"choices": [{"text": " a b c d"}]}', chat=False)
    assert sample.status == OK
    assert sample.output_tokens == 4
    assert not sample.usage_from_server


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'{"choices": []}', b'{"error": {"message": "bad"}}'])
def test_non_streaming_bad_bodies_are_protocol_errors(body: bytes) -> None:
    sample = RequestSample()
    parse_json_body(sample, body, chat=True)
    assert sample.status == PROTOCOL
    assert sample.error
