"""common/datasets.py: every dataset format, read whole and in chunks of any size, and its errors
naming the line (or list index) and the field."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from common.datasets import (
    DatasetError,
    TraceRequest,
    parse_entries,
    parse_trace,
    validate,
)
from common.proto.loadtest.v1 import run_pb2

JSONL = run_pb2.DATASET_FORMAT_JSONL
SHAREGPT = run_pb2.DATASET_FORMAT_SHAREGPT
CSV = run_pb2.DATASET_FORMAT_CSV
MOONCAKE = run_pb2.DATASET_FORMAT_MOONCAKE_TRACE
AZURE = run_pb2.DATASET_FORMAT_AZURE_TRACE
TOKENIZER = run_pb2.DATASET_FORMAT_TOKENIZER


def chunked(data: bytes, size: int) -> Iterator[bytes]:
    for i in range(0, len(data), size):
        yield data[i : i + size]


def error_of(fmt: int, data: bytes, **kwargs: object) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        if fmt in (MOONCAKE, AZURE):
            parse_trace(fmt, data, **kwargs)  # type: ignore[arg-type]
        else:
            parse_entries(fmt, data, **kwargs)  # type: ignore[arg-type]
    return info.value


# --- traces ----------------------------------------------------------------------------------


def mooncake(*rows: dict[str, object]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def test_mooncake_trace() -> None:
    data = mooncake(
        {"timestamp": 1000, "input_length": 1024, "output_length": 10, "hash_ids": [0, 1]},
        {"timestamp": 1000, "input_length": 600, "output_length": 3, "hash_ids": [0]},
        {"timestamp": 2500.5, "input_length": 7, "output_length": 1},
    )
    requests = parse_trace(MOONCAKE, data)
    assert requests == [
        TraceRequest(0.0, 1024, 10, (0, 1)),
        TraceRequest(0.0, 600, 3, (0,)),
        TraceRequest(1500.5, 7, 1, ()),
    ]
    assert parse_trace(MOONCAKE, data, block_tokens=512) == requests
    summary = validate(MOONCAKE, chunked(data, 7))
    assert (summary.entry_count, summary.span_s) == (3, 1.5005)


@pytest.mark.parametrize(
    ("line", "field"),
    [
        ({"timestamp": -1, "input_length": 5, "output_length": 5}, "timestamp"),
        ({"timestamp": "0", "input_length": 5, "output_length": 5}, "timestamp"),
        ({"timestamp": 5, "input_length": 0, "output_length": 5}, "input_length"),
        ({"timestamp": 5, "input_length": 5.5, "output_length": 5}, "input_length"),
        ({"timestamp": 5, "input_length": 5}, "output_length"),
        ({"timestamp": 5, "input_length": 5, "output_length": True}, "output_length"),
        ({"timestamp": 5, "input_length": 5, "output_length": 5, "hash_ids": [1, -2]}, "hash_ids"),
        ({"timestamp": 5, "input_length": 5, "output_length": 5, "hash_ids": "1"}, "hash_ids"),
        ({"timestamp": 4, "input_length": 5, "output_length": 5}, "timestamp"),  # earlier than line 1
    ],
)
def test_mooncake_errors_name_line_and_field(line: dict[str, object], field: str) -> None:
    first = {"timestamp": 5, "input_length": 5, "output_length": 5}
    err = error_of(MOONCAKE, mooncake(first, line))
    assert str(err).startswith(f'line 2: field "{field}": '), str(err)
    assert err.field == field


def test_mooncake_hash_ids_at_most_one_per_block() -> None:
    data = mooncake({"timestamp": 0, "input_length": 513, "output_length": 1, "hash_ids": [1, 2, 3]})
    assert parse_trace(MOONCAKE, data)[0].hash_ids == (1, 2, 3)  # the block size is unknown: no check
    err = error_of(MOONCAKE, data, block_tokens=512)
    assert 'line 1: field "hash_ids": 3 ids for 513 tokens; at most 2' in str(err)
    assert parse_trace(MOONCAKE, data, block_tokens=256)[0].hash_ids == (1, 2, 3)


def test_mooncake_bad_json_and_empty() -> None:
    assert "line 2: not valid JSON" in str(
        error_of(MOONCAKE, b'{"timestamp": 0, "input_length": 1, "output_length": 1}\n{x\n')
    )
    assert "line 1: expected a JSON object" in str(error_of(MOONCAKE, b"[1]\n"))
    assert "no requests" in str(error_of(MOONCAKE, b"\n \n"))


AZURE_HEADER = "TIMESTAMP,ContextTokens,GeneratedTokens\n"


def test_azure_trace() -> None:
    data = (
        AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n"
        "2023-11-16 18:15:50.9951690,396,109\n"
        "\n"
        "2023-11-16 18:16:46.6805900,1000,1\n"
    ).encode()
    requests = parse_trace(AZURE, data)
    assert [(r.input_length, r.output_length, r.hash_ids) for r in requests] == [
        (374, 44, ()),
        (396, 109, ()),
        (1000, 1, ()),
    ]
    assert requests[0].timestamp_ms == 0.0
    assert requests[1].timestamp_ms == pytest.approx(4314.579, abs=1e-3)
    assert requests[2].timestamp_ms == pytest.approx(60000.0, abs=1e-3)
    assert validate(AZURE, chunked(data, 5)).span_s == pytest.approx(60.0, abs=1e-6)


def test_azure_columns_in_any_order_with_extras() -> None:
    data = b"GeneratedTokens,extra,TIMESTAMP,ContextTokens\n5,x,2024-05-10 00:00:00,7\n6,y,2024-05-10T00:00:01.5Z,8\n"
    assert parse_trace(AZURE, data) == [TraceRequest(0.0, 7, 5, ()), TraceRequest(1500.0, 8, 6, ())]


@pytest.mark.parametrize(
    ("row", "field"),
    [
        ("2023-11-16 18:15:45.0000000,374,44", "TIMESTAMP"),  # decreasing
        ("yesterday,374,44", "TIMESTAMP"),
        ("2023-13-16 18:15:47.0,374,44", "TIMESTAMP"),
        ("2023-11-16 18:15:47.0,0,44", "ContextTokens"),
        ("2023-11-16 18:15:47.0,12,", "GeneratedTokens"),
        ("2023-11-16 18:15:47.0,12,4.5", "GeneratedTokens"),
    ],
)
def test_azure_errors_name_line_and_field(row: str, field: str) -> None:
    data = (AZURE_HEADER + "2023-11-16 18:15:46.6805900,374,44\n" + row + "\n").encode()
    err = error_of(AZURE, data)
    assert str(err).startswith(f'line 3: field "{field}": '), str(err)


def test_azure_header_needs_the_columns() -> None:
    err = error_of(AZURE, b"time,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46,1,1\n")
    assert "line 1" in str(err) and "TIMESTAMP" in str(err)
    assert "no requests" in str(error_of(AZURE, AZURE_HEADER.encode()))
    assert "line 2: 4 columns" in str(error_of(AZURE, (AZURE_HEADER + "2023-11-16 18:15:46,1,1,1\n").encode()))


def test_trace_format_required() -> None:
    with pytest.raises(DatasetError) as info:
        parse_trace(JSONL, b'{"prompt": "x"}\n')
    assert info.value.field == "format"
