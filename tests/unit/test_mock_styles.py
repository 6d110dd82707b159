"""The exact bytes of each server style's stream, and the style and under-report settings.

Streams are assembled as the server sends them (opening, token events, closing) from an
encoder with a fixed id and creation time, and compared byte for byte with the shapes the
imitated servers produce (see `mockserver.styles`).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import pytest

from mockserver.cli import add_arguments
from mockserver.config import MockConfig
from mockserver.generation import VOCABULARY, Endpoint, FinishReason, output_text, reported_tokens
from mockserver.styles import ENCODERS, STYLES, StreamEncoder, StreamSummary, Style, TokenEvents

pytestmark = pytest.mark.timeout(10)

SUMMARY = StreamSummary(
    prompt_tokens=2, completion_tokens=3, finish_reason="length", prompt_ms=30.0, generation_ms=10.0
)
CHAT = b'"id":"X","object":"chat.completion.chunk","created":7,"model":"m"'
CMPL = b'"id":"X","object":"text_completion","created":7,"model":"m"'
DONE = b"data: [DONE]\n\n"


def encoder(
    style: Style, endpoint: Endpoint = "chat", *, usage: bool = True, response_id: str | None = "X"
) -> StreamEncoder:
    return ENCODERS[style](endpoint, "m", include_usage=usage, response_id=response_id, created=7)


def events_of(token_events: TokenEvents) -> list[bytes]:
    table = token_events.table
    return [table[j % len(table)] for j in range(token_events.event_count - 1)] + [token_events.last]


def stream(
    style: Style,
    endpoint: Endpoint = "chat",
    *,
    tokens: int = 3,
    finish: FinishReason = "length",
    usage: bool = True,
    response_id: str | None = "X",
) -> bytes:
    enc = encoder(style, endpoint, usage=usage, response_id=response_id)
    body = b"".join(events_of(enc.token_events(tokens, finish)))
    return enc.opening() + body + enc.closing(SUMMARY)


def lines(*events: bytes) -> bytes:
    return b"".join(b"data: " + e + b"\n\n" for e in events)


# --- openai ----------------------------------------------------------------------------------


def test_openai_chat() -> None:
    assert stream("openai") == lines(
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" of"},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" and"},"finish_reason":"length"}]}',
        b"{" + CHAT + b',"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}',
        b"[DONE]",
    )


def test_openai_completions_without_usage() -> None:
    assert stream("openai", "completions", tokens=2, finish="stop", usage=False) == lines(
        b"{" + CMPL + b',"choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null}]}',
        b"{" + CMPL + b',"choices":[{"index":0,"text":" of","logprobs":null,"finish_reason":"stop"}]}',
        b"[DONE]",
    )


# --- vllm ------------------------------------------------------------------------------------


def test_vllm_chat_puts_null_usage_on_every_chunk_when_asked() -> None:
    assert stream("vllm", tokens=2) == lines(
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        b'"finish_reason":null}],"usage":null}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" the"},"logprobs":null,"finish_reason":null}],'
        b'"usage":null}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" of"},"logprobs":null,"finish_reason":"length",'
        b'"stop_reason":null}],"usage":null}',
        b"{" + CHAT + b',"choices":[],"usage":{"prompt_tokens":2,"total_tokens":5,"completion_tokens":3}}',
        b"[DONE]",
    )


def test_vllm_chat_without_usage_has_no_usage_field() -> None:
    assert b"usage" not in stream("vllm", usage=False)


def test_vllm_completions() -> None:
    assert stream("vllm", "completions", tokens=2) == lines(
        b"{" + CMPL + b',"choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null,'
        b'"stop_reason":null}],"usage":null}',
        b"{" + CMPL + b',"choices":[{"index":0,"text":" of","logprobs":null,"finish_reason":"length",'
        b'"stop_reason":null}],"usage":null}',
        b"{" + CMPL + b',"choices":[],"usage":{"prompt_tokens":2,"total_tokens":5,"completion_tokens":3}}',
        b"[DONE]",
    )


# --- sglang ----------------------------------------------------------------------------------


def test_sglang_chat_sends_usage_on_a_finish_chunk_with_an_empty_delta() -> None:
    assert stream("sglang", tokens=2) == lines(
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"role":"assistant","content":"","reasoning_content":null,'
        b'"tool_calls":null},"logprobs":null,"finish_reason":null,"matched_stop":null}],"usage":null}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"role":null,"content":" the","reasoning_content":null,'
        b'"tool_calls":null},"logprobs":null,"finish_reason":null,"matched_stop":null}],"usage":null}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"role":null,"content":" of","reasoning_content":null,'
        b'"tool_calls":null},"logprobs":null,"finish_reason":null,"matched_stop":null}],"usage":null}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"length",'
        b'"matched_stop":null}],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}',
        b"[DONE]",
    )


def test_sglang_without_usage_still_sends_the_finish_chunk() -> None:
    *_, finish, done = stream("sglang", usage=False).split(b"\n\n")[:-1]
    assert finish.endswith(b'"delta":{},"logprobs":null,"finish_reason":"length","matched_stop":null}],"usage":null}')
    assert done == b"data: [DONE]"


def test_sglang_completions() -> None:
    assert stream("sglang", "completions", tokens=1) == lines(
        b"{" + CMPL + b',"choices":[{"index":0,"text":" the","logprobs":null,"finish_reason":null,'
        b'"matched_stop":null}],"usage":null}',
        b"{" + CMPL + b',"choices":[{"index":0,"text":"","logprobs":null,"finish_reason":"length",'
        b'"matched_stop":null}],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}',
        b"[DONE]",
    )


# --- tgi -------------------------------------------------------------------------------------

TGI_CHAT = b'"object":"chat.completion.chunk","id":"","created":7,"model":"m","system_fingerprint":"2.0.4-native"'


def test_tgi_chat_has_no_role_chunk_no_usage_and_no_space_after_data() -> None:
    assert stream("tgi", tokens=2, response_id=None) == (
        b"data:{" + TGI_CHAT + b',"choices":[{"index":0,"delta":{"role":"assistant","content":" the"},'
        b'"logprobs":null,"finish_reason":null}]}\n\n'
        b"data:{" + TGI_CHAT + b',"choices":[{"index":0,"delta":{"role":"assistant","content":" of"},'
        b'"logprobs":null,"finish_reason":"length"}]}\n\n'
        b"data:[DONE]\n\n"
    )


def test_tgi_completions() -> None:
    assert stream("tgi", "completions", tokens=1, response_id=None) == (
        b'data:{"id":"","object":"text_completion","created":7,"choices":[{"index":0,"text":" the",'
        b'"logprobs":null,"finish_reason":"length"}],"model":"m","system_fingerprint":"2.0.4-native"}\n\n'
        b"data:[DONE]\n\n"
    )


# --- llamacpp --------------------------------------------------------------------------------

LLAMA_CHAT = b'"created":7,"id":"X","model":"m","system_fingerprint":"b6097-9515c613","object":"chat.completion.chunk"'
LLAMA_TIMINGS = (
    b'"timings":{"prompt_n":2,"prompt_ms":30.0,"prompt_per_token_ms":15.0,"prompt_per_second":66.66666666666667,'
    b'"predicted_n":3,"predicted_ms":10.0,"predicted_per_token_ms":3.3333333333333335,"predicted_per_second":300.0}'
)


@pytest.mark.parametrize("usage", [True, False])
def test_llamacpp_chat_final_chunk_carries_finish_usage_and_timings(usage: bool) -> None:
    # b6000-era llama-server puts usage on the finish chunk whether it was asked for or not.
    assert stream("llamacpp", tokens=2, usage=usage) == lines(
        b'{"choices":[{"finish_reason":null,"index":0,"delta":{"role":"assistant","content":null}}],'
        + LLAMA_CHAT
        + b"}",
        b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" the"}}],' + LLAMA_CHAT + b"}",
        b'{"choices":[{"finish_reason":null,"index":0,"delta":{"content":" of"}}],' + LLAMA_CHAT + b"}",
        b'{"choices":[{"finish_reason":"length","index":0,"delta":{}}],' + LLAMA_CHAT + b","
        b'"usage":{"completion_tokens":3,"prompt_tokens":2,"total_tokens":5},' + LLAMA_TIMINGS + b"}",
        b"[DONE]",
    )


def test_llamacpp_completions_final_chunk_has_empty_text_usage_then_id() -> None:
    head = b'"created":7,"model":"m","system_fingerprint":"b6097-9515c613","object":"text_completion"'
    assert stream("llamacpp", "completions", tokens=1) == lines(
        b'{"choices":[{"text":" the","index":0,"logprobs":null,"finish_reason":null}],' + head + b',"id":"X"}',
        b'{"choices":[{"text":"","index":0,"logprobs":null,"finish_reason":"length"}],' + head + b","
        b'"usage":{"completion_tokens":3,"prompt_tokens":2,"total_tokens":5},"id":"X",' + LLAMA_TIMINGS + b"}",
        b"[DONE]",
    )


def test_llamacpp_timings_over_zero_are_null() -> None:
    empty = StreamSummary(prompt_tokens=0, completion_tokens=1, finish_reason="stop", prompt_ms=0.0, generation_ms=0.0)
    final = json.loads(encoder("llamacpp").closing(empty).split(b"\n\n")[0].removeprefix(b"data: "))
    assert final["timings"]["prompt_per_token_ms"] is None
    assert final["timings"]["predicted_per_second"] is None
    assert final["timings"]["predicted_per_token_ms"] == 0.0


# --- litellm (proxy) -------------------------------------------------------------------------

PING = b": ping - 1970-01-01 00:00:07+00:00\r\n\r\n"


def test_litellm_frames_with_crlf_and_pings() -> None:
    enc = encoder("litellm")
    assert enc.split_writes
    openai = encoder("openai")
    assert enc.opening() == PING + openai.opening().replace(b"\n", b"\r\n")
    events = enc.token_events(16, "length")
    expected = openai.token_events(16, "length")
    assert [e.replace(b"\r\n", b"\n") for e in events.table] == [
        PING.replace(b"\r\n", b"\n") + e if m == 4 else e for m, e in enumerate(expected.table)
    ]
    assert events.last == expected.last.replace(b"\n", b"\r\n")
    assert enc.closing(SUMMARY) == openai.closing(SUMMARY).replace(b"\n", b"\r\n")


def test_litellm_writes_every_data_event_in_three_pieces_cut_inside_the_line() -> None:
    enc = encoder("litellm")
    event = enc.token_events(16, "length").table[4]  # a ping, then a token event
    pieces = enc.pieces(event)
    assert b"".join(pieces) == event
    assert pieces[0] == PING
    assert len(pieces) == 4
    assert all(b"\n" not in p for p in pieces[1:3])  # the line is still open after each
    assert pieces[3].endswith(b"}\r\n\r\n")
    closing = enc.closing(SUMMARY)
    pieces = enc.pieces(closing)
    assert b"".join(pieces) == closing
    assert len(pieces) == 6  # usage event and [DONE], three pieces each
    assert pieces[3:] == (b"data:", b" [DON", b"E]\r\n\r\n")


def test_styles_that_do_not_split_write_events_whole() -> None:
    for style in STYLES:
        if style != "litellm":
            enc = encoder(style)
            assert not enc.split_writes
            assert enc.pieces(b"data: x\n\n") == (b"data: x\n\n",)


# --- multi_token and reasoning ---------------------------------------------------------------


def test_multi_token_events_carry_four_tokens_and_the_last_the_rest() -> None:
    events = encoder("multi_token").token_events(10, "length")
    assert (events.event_count, events.tokens_per_event, events.last_tokens) == (3, 4, 2)
    assert events_of(events) == [
        b"data: {" + CHAT + b',"choices":[{"index":0,"delta":{"content":" the of and to"},"finish_reason":null}]}\n\n',
        b"data: {" + CHAT + b',"choices":[{"index":0,"delta":{"content":" in a is that"},"finish_reason":null}]}\n\n',
        b"data: {" + CHAT + b',"choices":[{"index":0,"delta":{"content":" the of"},"finish_reason":"length"}]}\n\n',
    ]


def test_reasoning_sends_the_first_half_as_reasoning_content() -> None:
    assert stream("reasoning", tokens=5) == lines(
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"reasoning_content":" the"},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"reasoning_content":" of"},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" and"},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" to"},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" in"},"finish_reason":"length"}]}',
        b"{" + CHAT + b',"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5}}',
        b"[DONE]",
    )
    assert stream("reasoning", "completions") == stream("openai", "completions")


# --- every style -----------------------------------------------------------------------------


def _event_text(payload: dict[str, Any]) -> str:
    text = ""
    for choice in payload["choices"]:
        delta = choice.get("delta") or {}
        text += choice.get("text") or delta.get("content") or delta.get("reasoning_content") or ""
    return text


@pytest.mark.parametrize("style", STYLES)
@pytest.mark.parametrize("endpoint", ["chat", "completions"])
@pytest.mark.parametrize("tokens", [1, 2, 7, 8, 9, 33])
def test_every_style_streams_exactly_the_output_text(style: Style, endpoint: Endpoint, tokens: int) -> None:
    enc = encoder(style, endpoint)
    events = enc.token_events(tokens, "stop")
    assert (events.event_count - 1) * events.tokens_per_event + events.last_tokens == tokens
    texts = []
    for event in events_of(events):
        [data] = [line for line in event.split(b"\n") if line.startswith(b"data:")]
        texts.append(_event_text(json.loads(data.removeprefix(b"data:"))))
    assert all(texts)  # every token event carries text
    assert "".join(texts) == output_text(tokens)
    assert len(texts) == events.event_count
    for extra in (enc.opening(), enc.closing(SUMMARY)):
        for line in extra.split(b"\n"):
            if line.startswith(b"data:") and b"[DONE]" not in line:
                assert _event_text(json.loads(line.removeprefix(b"data:"))) == ""


def test_vocabulary_period_assumption() -> None:
    # Events repeat with the vocabulary; multi_token relies on 4 dividing its size.
    assert len(VOCABULARY) % 4 == 0


# --- configuration ---------------------------------------------------------------------------


def test_every_style_has_an_encoder() -> None:
    assert set(ENCODERS) == set(STYLES)
    assert MockConfig().style == "openai"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("style", "vllm2", "style must be one of openai, vllm"),
        ("under_report_usage", -0.1, "under_report_usage must be between 0 and 1"),
        ("under_report_usage", 1.5, "under_report_usage must be between 0 and 1"),
        ("under_report_usage", float("nan"), "under_report_usage must be between 0 and 1"),
        ("under_report_usage", True, "under_report_usage must be between 0 and 1"),
    ],
)
def test_invalid_style_settings_are_refused(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MockConfig(**{field: value})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("emitted", "fraction", "reported"),
    [(16, 0.0, 16), (16, 0.25, 12), (16, 0.1, 14), (10, 0.3, 7), (10, 0.7, 3), (1, 0.5, 0), (5, 1.0, 0)],
)
def test_reported_tokens_falls_short_by_the_fraction_rounded_down(emitted: int, fraction: float, reported: int) -> None:
    assert reported_tokens(emitted, fraction) == reported


def test_cli_flags_reach_the_config() -> None:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--style", "llamacpp", "--under-report-usage", "0.2"])
    assert (args.style, args.under_report_usage) == ("llamacpp", 0.2)
    defaults = parser.parse_args([])
    assert (defaults.style, defaults.under_report_usage) == ("openai", 0.0)
    with pytest.raises(SystemExit):
        parser.parse_args(["--style", "nope"])


def test_connection_styles_are_validated_and_reach_the_config() -> None:
    assert MockConfig().connections == "keep_alive"
    with pytest.raises(ValueError, match="connections must be one of keep_alive, close_after_response"):
        MockConfig(connections="sometimes")  # type: ignore[arg-type]
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--connections", "close_idle"]).connections == "close_idle"
    assert parser.parse_args([]).connections == "keep_alive"
    with pytest.raises(SystemExit):
        parser.parse_args(["--connections", "nope"])


def test_reasoning_field_count_and_usage_details() -> None:
    enc = ENCODERS["reasoning"](
        "chat", "m", include_usage=True, response_id="X", created=7, reasoning_tokens=1, reasoning_field="reasoning"
    )
    summary = StreamSummary(
        prompt_tokens=2,
        completion_tokens=3,
        finish_reason="length",
        prompt_ms=1.0,
        generation_ms=1.0,
        cached_tokens=0,
        reasoning_tokens=1,
    )
    body = b"".join(events_of(enc.token_events(3, "length")))
    assert enc.opening() + body + enc.closing(summary) == lines(
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"role":"assistant","content":""},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"reasoning":" the"},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" of"},"finish_reason":null}]}',
        b"{" + CHAT + b',"choices":[{"index":0,"delta":{"content":" and"},"finish_reason":"length"}]}',
        b"{" + CHAT + b',"choices":[],"usage":{"prompt_tokens":2,"completion_tokens":3,"total_tokens":5,'
        b'"prompt_tokens_details":{"cached_tokens":0},"completion_tokens_details":{"reasoning_tokens":1}}}',
        b"[DONE]",
    )
