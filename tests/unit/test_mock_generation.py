"""The mock model's pure logic: config validation, request parsing, output plan, latencies."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from mockserver.config import MockConfig
from mockserver.generation import (
    VOCABULARY,
    BadRequestError,
    CompletionRequest,
    LatencyModel,
    output_text,
    parse_request,
    plan_output,
)

pytestmark = pytest.mark.timeout(10)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("ttft_ms", -1.0, "ttft_ms must be a finite number >= 0"),
        ("itl_ms", float("nan"), "itl_ms must be a finite number >= 0"),
        ("jitter_ms", float("inf"), "jitter_ms must be a finite number >= 0"),
        ("ttft_ms", "50", "ttft_ms must be a number"),
        ("output_tokens", 0, "output_tokens must be >= 1"),
        ("output_tokens", 2.5, "output_tokens must be an integer"),
        ("output_tokens", True, "output_tokens must be an integer"),
        ("error_rate", 1.5, "error_rate must be between 0 and 1"),
        ("error_rate", -0.1, "error_rate must be between 0 and 1"),
        ("error_rate", float("nan"), "error_rate must be between 0 and 1"),
        ("seed", 1.0, "seed must be an integer"),
        ("model", " ", "model must be a non-empty string"),
    ],
)
def test_config_refuses_invalid_values(field: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MockConfig(**{field: value})


def test_config_accepts_edge_values() -> None:
    config = MockConfig(ttft_ms=0, itl_ms=0, output_tokens=1, error_rate=1, jitter_ms=0)
    assert (config.ttft_ms, config.error_rate) == (0, 1)


def _request(**fields: Any) -> CompletionRequest:
    return parse_request("chat", json.dumps({"messages": [{"content": "hi"}], **fields}).encode())


@pytest.mark.parametrize(
    ("fields", "tokens", "finish"),
    [
        ({}, 10, "stop"),
        ({"max_tokens": 10}, 10, "length"),
        ({"max_tokens": 11}, 10, "stop"),
        ({"max_tokens": 1}, 1, "length"),
        ({"max_tokens": 30, "ignore_eos": True}, 30, "length"),
        ({"min_tokens": 15}, 15, "stop"),
        ({"min_tokens": 15, "max_tokens": 12}, 12, "length"),
        ({"min_tokens": 15, "max_tokens": 20, "ignore_eos": True}, 20, "length"),
        ({"min_tokens": 0}, 10, "stop"),
    ],
)
def test_plan_output(fields: dict[str, Any], tokens: int, finish: str) -> None:
    plan = plan_output(_request(**fields), natural_tokens=10)
    assert (plan.tokens, plan.finish_reason) == (tokens, finish)


def test_include_usage_only_applies_to_streams() -> None:
    assert _request(stream=True, stream_options={"include_usage": True}).include_usage
    assert not _request(stream=False, stream_options={"include_usage": True}).include_usage
    assert not _request(stream=True).include_usage


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"", None),
        (b"null", None),
        (b'{"messages": [{"content": "x"}], "stream_options": 1}', "stream_options"),
        (b'{"messages": [{"content": "x"}], "ignore_eos": 1}', "ignore_eos"),
        (b'{"messages": [{"content": "x"}], "max_completion_tokens": 1.5}', "max_completion_tokens"),
        (b'{"messages": [{"content": ["x"]}]}', "messages"),
    ],
)
def test_parse_request_rejects(body: bytes, param: str | None) -> None:
    with pytest.raises(BadRequestError) as info:
        parse_request("chat", body)
    assert info.value.param == param


def test_output_text_has_one_word_per_token() -> None:
    assert output_text(0) == ""
    text = output_text(len(VOCABULARY) * 3 + 2)
    assert len(text.split()) == len(VOCABULARY) * 3 + 2
    assert text.startswith(VOCABULARY[0] + VOCABULARY[1])


def test_latency_without_jitter_is_exact() -> None:
    model = LatencyModel(50.0, 10.0, 0.0, random.Random(0))
    assert model.ttft() == pytest.approx(0.05)
    assert model.itl() == pytest.approx(0.01)
    assert model.generation_time(5) == pytest.approx(0.05 + 4 * 0.01)
    assert model.generation_time(1) == pytest.approx(0.05)


def test_latency_jitter_is_bounded_clamped_and_seeded() -> None:
    draws = [LatencyModel(2.0, 10.0, 5.0, random.Random(3)).ttft() for _ in range(3)]
    assert len(set(draws)) == 1  # same seed, same draw
    model = LatencyModel(2.0, 10.0, 5.0, random.Random(3))
    itls = [model.itl() for _ in range(2000)]
    ttfts = [model.ttft() for _ in range(2000)]
    assert 0.005 <= min(itls) < 0.0055 and 0.0145 < max(itls) <= 0.015
    assert min(ttfts) == 0.0  # 2 ms - 5 ms is clamped, never negative
    assert max(ttfts) <= 0.007
