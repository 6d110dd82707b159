"""common/datasets.py: every dataset format, read whole and in chunks of any size, and its errors
naming the line (or list index) and the field."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from common.datasets import (
    ConversationTurn,
    DatasetError,
    TraceRequest,
    conversation_turns,
    dataset_id,
    guess_format,
    iter_entries,
    iter_lines,
    parse_entries,
    parse_trace,
    upload_name,
    validate,
)
from common.proto.loadtest.v1 import run_pb2
from tests.tokenizers_fixture import build_bpe_tokenizer

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


# --- prompt datasets -------------------------------------------------------------------------


def jsonl(*rows: object) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.parametrize("size", [1, 3, 64, 1 << 20])
def test_jsonl_in_chunks_of_any_size(size: int) -> None:
    data = jsonl({"prompt": "héllo wörld ✓", "max_tokens": 5}, {"prompt": "two"}) + b"\n   \n" + jsonl({"prompt": "x"})
    entries = list(iter_entries(JSONL, chunked(data, size)))
    assert [(e.prompt, e.max_tokens) for e in entries] == [("héllo wörld ✓", 5), ("two", 0), ("x", 0)]


def test_iter_lines_numbers_and_last_line_without_newline() -> None:
    assert list(iter_lines(chunked(b"a\n\nb\nc", 2))) == [(1, "a\n"), (2, "\n"), (3, "b\n"), (4, "c")]
    with pytest.raises(DatasetError, match="line 2: not valid UTF-8"):
        list(iter_lines(b"ok\n\xff\xfe\n"))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "x", "max_tokens": 0}', 'line 2: field "max_tokens": must be an integer 1..1000000'),
        ('{"prompt": "x", "max_tokens": "5"}', 'line 2: field "max_tokens": must be an integer 1..1000000'),
        ('{"prompt": ""}', 'line 2: field "prompt": must be a non-empty string'),
        ('{"prompt": 5}', 'line 2: field "prompt": must be a non-empty string'),
        ('{"messages": []}', 'line 2: field "messages": must be a non-empty list'),
        ('{"messages": [{"role": "bot", "content": "x"}]}', 'line 2: field "messages[0].role"'),
        ('{"messages": [{"role": "user", "content": 1}]}', 'line 2: field "messages[0].content": must be a string'),
        ('{"text": "x"}', 'line 2: needs a field "prompt"'),
        ("[1, 2]", "line 2: expected a JSON object"),
        ("{nope", "line 2: not valid JSON"),
    ],
)
def test_jsonl_errors_name_line_and_field(line: str, message: str) -> None:
    data = b'{"prompt": "fine"}\n' + line.encode() + b"\n"
    assert str(error_of(JSONL, data)).startswith(message)


def test_jsonl_messages_and_all_turns() -> None:
    conv = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "one two three"},
            {"role": "user", "content": "second"},
        ],
        "max_tokens": 9,
    }
    (single,) = parse_entries(JSONL, jsonl(conv))
    assert single.prompt == "first question\nsecond" and len(single.messages) == 4 and single.max_tokens == 9
    (entry,) = parse_entries(JSONL, jsonl(conv), all_turns=True)
    assert entry.prompt == "first question" and entry.max_tokens == 9
    assert conversation_turns(entry) == (
        "be brief",
        [ConversationTurn("first question", 3), ConversationTurn("second", 9)],
    )
    (prompt_only,) = parse_entries(JSONL, jsonl({"prompt": "alone"}), all_turns=True)
    assert conversation_turns(prompt_only) == ("", [ConversationTurn("alone", 0)])


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([{"role": "assistant", "content": "x"}], "messages[0].role"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "messages[1].role"),
        ([{"role": "system", "content": "x"}], "messages"),
        (
            [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y"},
                {"role": "system", "content": "z"},
            ],
            "messages[2].role",
        ),
    ],
)
def test_all_turns_needs_alternating_messages(messages: list[dict[str, str]], field: str) -> None:
    data = jsonl({"prompt": "ok"}, {"messages": messages})
    assert len(parse_entries(JSONL, data)) == 2  # fine as single requests
    err = error_of(JSONL, data, all_turns=True)
    assert str(err).startswith(f'line 2: field "{field}"') and err.field == field


def test_word_filters_and_nothing_left() -> None:
    data = jsonl({"prompt": "a b c"}, {"prompt": "a"}, {"prompt": " ".join("w" * 20)})
    assert [e.prompt for e in parse_entries(JSONL, data, min_prompt_words=2, max_prompt_words=10)] == ["a b c"]
    assert "no usable entries (3 parsed" in str(error_of(JSONL, data, min_prompt_words=100))
    assert error_of(JSONL, data, min_prompt_words=5, max_prompt_words=2).field == "min_prompt_words"
    assert "no usable entries" in str(error_of(JSONL, b"\n\n"))


def sharegpt(*convs: object) -> bytes:
    return json.dumps(list(convs), indent=1).encode()


def turn(who: str, text: str) -> dict[str, str]:
    return {"from": who, "value": text}


def test_sharegpt_first_turn_and_all_turns() -> None:
    data = sharegpt(
        {
            "conversations": [
                turn("system", "sys"),
                turn("human", "q1"),
                turn("gpt", "a b"),
                turn("human", "q2"),
                turn("gpt", "c d e"),
                turn("human", "dangling"),
            ]
        },
        {"conversations": [turn("human", "hi there"), turn("gpt", "a b c d")]},
        {"conversations": [turn("human", "lonely")]},
        {"conversations": [turn("gpt", "starts with a reply"), turn("human", "x")]},
    )
    entries = parse_entries(SHAREGPT, data)
    assert [(e.prompt, e.max_tokens) for e in entries] == [("hi there", 4)]  # the first needs human first
    convs = parse_entries(SHAREGPT, chunked(data, 5), all_turns=True)
    assert [conversation_turns(e) for e in convs] == [
        ("sys", [ConversationTurn("q1", 2), ConversationTurn("q2", 3)]),
        ("", [ConversationTurn("hi there", 4)]),
    ]
    assert [m.role for m in convs[0].messages] == ["system", "user", "assistant", "user", "assistant"]


def test_sharegpt_cut_where_alternation_breaks() -> None:
    data = sharegpt(
        {
            "conversations": [
                turn("human", "q1"),
                turn("gpt", "a"),
                turn("human", "q2"),
                turn("human", "q3"),
                turn("gpt", "b"),
            ]
        }
    )
    (entry,) = parse_entries(SHAREGPT, data, all_turns=True)
    assert conversation_turns(entry)[1] == [ConversationTurn("q1", 1)]


@pytest.mark.parametrize("size", [1, 7, 1 << 20])
def test_sharegpt_incremental_matches_whole(size: int) -> None:
    convs = [
        {"conversations": [turn("human", f"question {i} " + "word " * (i % 50)), turn("gpt", "x " * (i % 7 + 1))]}
        for i in range(300)
    ]
    data = sharegpt(*convs)
    whole = parse_entries(SHAREGPT, data)
    assert len(whole) == 300 and whole[5].max_tokens == 6
    assert parse_entries(SHAREGPT, chunked(data, size)) == whole


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b'{"conversations": []}', "line 1: ShareGPT data must be a JSON list"),
        (b'[{"conversations": []},\n {"conversations": 5}]', '[1]: field "conversations": must be a list'),
        (b'[{"conversations": []},\n 7]', "[1]: expected a JSON object"),
        (b'[{"conversations": []},\n\n {"conversations": [}]', "line 3: not valid JSON"),
        (b'[{"conversations": []}\n\n {"conversations": []}]', "line 3: not valid JSON (expected , or ]"),
        (b'[{"conversations": []}', "line 1: not valid JSON (the list is not closed)"),
        (b'[{"conversations": []}] x', "line 1: not valid JSON (extra data"),
        (b"  ", "the file is empty"),
        (b"[]", "no usable entries"),
    ],
)
def test_sharegpt_errors(text: bytes, message: str) -> None:
    for size in (2, 1 << 20):
        with pytest.raises(DatasetError) as info:
            parse_entries(SHAREGPT, chunked(text, size))
        assert str(info.value).startswith(message), (size, str(info.value))


def test_csv() -> None:
    data = b'prompt,max_tokens,system\nhello world,5,\n"multi\nline, quoted",,be brief\n\nlast,7,\n'
    entries = parse_entries(CSV, chunked(data, 3))
    assert [(e.prompt, e.max_tokens) for e in entries] == [("hello world", 5), ("multi\nline, quoted", 0), ("last", 7)]
    assert [(m.role, m.content) for m in entries[1].messages] == [
        ("system", "be brief"),
        ("user", "multi\nline, quoted"),
    ]
    assert not entries[0].messages
    (only,) = parse_entries(CSV, b"prompt\njust a prompt\n", all_turns=True)
    assert conversation_turns(only) == ("", [ConversationTurn("just a prompt", 0)])


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"text,max_tokens\nx,5\n", 'line 1: the header needs a "prompt" column'),
        (b'prompt,max_tokens\nok,1\n"a\nb",zero\n', 'line 3: field "max_tokens": must be an integer 1..1000000'),
        (b"prompt,max_tokens\nok,1\n,5\n", 'line 3: field "prompt": must be a non-empty string'),
        (b"prompt\nok\nx,y\n", "line 3: 2 columns; the header has 1"),
        (b"", "the file is empty"),
        (b"prompt\n", "no usable entries"),
    ],
)
def test_csv_errors(text: bytes, message: str) -> None:
    assert str(error_of(CSV, text)).startswith(message)


# --- tokenizers, validate, ids ---------------------------------------------------------------


def test_tokenizer_format(tmp_path: Path) -> None:
    path = build_bpe_tokenizer(tmp_path / "tokenizer.json")
    assert validate(TOKENIZER, chunked(Path(path).read_bytes(), 1000)).entry_count == 0
    with pytest.raises(DatasetError, match="tokenizer"):
        validate(TOKENIZER, b'{"not": "a tokenizer"}')


def test_validate_counts_and_format_required() -> None:
    assert validate(JSONL, jsonl({"prompt": "a"}, {"prompt": "b"})).entry_count == 2
    assert validate(CSV, b"prompt\na\nb\nc\n").entry_count == 3
    with pytest.raises(DatasetError) as info:
        validate(run_pb2.DATASET_FORMAT_UNSPECIFIED, b"x")
    assert info.value.field == "format"
    with pytest.raises(DatasetError) as info:
        list(iter_entries(MOONCAKE, b"{}"))
    assert info.value.field == "format"


def test_dataset_id_depends_on_format_and_content() -> None:
    sha = "ab" * 32
    a = dataset_id(JSONL, sha)
    assert a.startswith("ds_") and len(a) == 35 and int(a[3:], 16) >= 0
    assert a == dataset_id(JSONL, sha) and a != dataset_id(CSV, sha) and a != dataset_id(JSONL, "cd" * 32)


@pytest.mark.parametrize(
    ("name", "head", "fmt"),
    [
        ("prompts.jsonl", b'{"prompt": "x"}\n', JSONL),
        ("trace.JSONL", b'{"timestamp": 0, "input_length": 5, "output_length": 1, "hash_ids": [1]}\n', MOONCAKE),
        ("empty.jsonl", b"", JSONL),
        ("a.csv", b"prompt,max_tokens\nx,1\n", CSV),
        ("azure.csv", b"TIMESTAMP,ContextTokens,GeneratedTokens\n", AZURE),
        ("dir/tokenizer.json", b"{}", TOKENIZER),
        ("sharegpt.json", b"[]", SHAREGPT),
        ("notes.txt", b"hello", 0),
    ],
)
def test_guess_format(name: str, head: bytes, fmt: int) -> None:
    assert guess_format(name, head) == fmt


def test_upload_name() -> None:
    assert upload_name("my prompts (v2).jsonl") == "my_prompts__v2_.jsonl"
    assert upload_name("data/sets/a-b_c.csv") == "data/sets/a-b_c.csv"
    long = "x" * 300 + ".jsonl"
    assert upload_name(long) == long[-200:] and len(upload_name(long)) == 200
