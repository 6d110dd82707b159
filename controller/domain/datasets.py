"""Parsing and validation of datasets sent in a run spec (JSONL and ShareGPT).

The dataset travels as text so that a malformed line is reported with its line number
as INVALID_ARGUMENT at CreateRun, not discovered by an agent mid-run. The parsed entries
are stored beside the run and sent to the agents inside their assignments.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from common.proto.loadtest.v1 import run_pb2
from controller.domain.errors import FieldViolation, InvalidArgument

MAX_DATASET_BYTES = 8 * 1024 * 1024
MAX_ENTRIES = 200_000
FIELD = "spec.workload.dataset.content"
_ROLES = frozenset({"system", "user", "assistant"})


def _bad(description: str, field: str = FIELD) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def _unreadable(exc: RecursionError | ValueError) -> str:
    """What is wrong with JSON that parses but Python cannot hold: nesting deeper than the
    interpreter's recursion limit, or an integer longer than int's digit limit (4300)."""
    if isinstance(exc, RecursionError):
        return "JSON nested too deeply"
    return "a number with too many digits"


def _words(entry: run_pb2.DatasetEntry) -> int:
    if entry.messages:
        return sum(len(m.content.split()) for m in entry.messages)
    return len(entry.prompt.split())


def _max_tokens(value: Any, where: str) -> int:
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 1_000_000:
        raise _bad(f"{where}: max_tokens must be an integer between 1 and 1000000")
    return value


def _jsonl_entry(obj: Any, where: str) -> run_pb2.DatasetEntry:
    if not isinstance(obj, dict):
        raise _bad(f"{where}: expected a JSON object")
    entry = run_pb2.DatasetEntry(max_tokens=_max_tokens(obj.get("max_tokens"), where))
    if "messages" in obj:
        messages = obj["messages"]
        if not isinstance(messages, list) or not messages:
            raise _bad(f"{where}: messages must be a non-empty list")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in _ROLES or not isinstance(m.get("content"), str):
                raise _bad(f"{where}: messages[{i}] needs a role (system/user/assistant) and string content")
            entry.messages.add(role=m["role"], content=m["content"])
        entry.prompt = "\n".join(m.content for m in entry.messages if m.role == "user")
    elif isinstance(obj.get("prompt"), str) and obj["prompt"]:
        entry.prompt = obj["prompt"]
    else:
        raise _bad(f'{where}: needs a non-empty string "prompt" or a "messages" list')
    return entry


def _parse_jsonl(content: str) -> list[run_pb2.DatasetEntry]:
    entries = []
    for number, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise _bad(f"line {number}: not valid JSON ({exc.msg})") from exc
        except (RecursionError, ValueError) as exc:
            raise _bad(f"line {number}: {_unreadable(exc)}") from None
        entries.append(_jsonl_entry(obj, f"line {number}"))
    return entries


def _parse_sharegpt(content: str) -> list[run_pb2.DatasetEntry]:
    try:
        data = json.loads(content)
    except json.JSONDecodeError as exc:
        raise _bad(f"line {exc.lineno}: not valid JSON ({exc.msg})") from exc
    except (RecursionError, ValueError) as exc:
        raise _bad(_unreadable(exc)) from None
    if not isinstance(data, list):
        raise _bad("ShareGPT data must be a JSON list of conversations")
    entries = []
    for i, conv in enumerate(data):
        turns = conv.get("conversations") if isinstance(conv, dict) else None
        if not isinstance(turns, list):
            raise _bad(f'conversation {i}: missing "conversations" list')
        # As vLLM's benchmark: the first human turn is the prompt, the reply's length the output.
        if len(turns) < 2 or not all(isinstance(t, dict) and isinstance(t.get("value"), str) for t in turns[:2]):
            continue
        prompt, reply = turns[0]["value"], turns[1]["value"]
        if turns[0].get("from") not in ("human", "user") or not prompt.strip():
            continue
        entries.append(run_pb2.DatasetEntry(prompt=prompt, max_tokens=max(1, min(len(reply.split()), 1_000_000))))
    return entries


def parse_dataset(dataset: run_pb2.Dataset) -> list[run_pb2.DatasetEntry]:
    """The entries of a dataset after filtering, or InvalidArgument naming what is wrong."""
    if dataset.format == run_pb2.DATASET_FORMAT_UNSPECIFIED or dataset.format not in run_pb2.DatasetFormat.values():
        raise _bad("required: DATASET_FORMAT_JSONL or DATASET_FORMAT_SHAREGPT", "spec.workload.dataset.format")
    size = len(dataset.content.encode())
    if size > MAX_DATASET_BYTES:
        raise _bad(f"dataset is {size} bytes; the limit is {MAX_DATASET_BYTES} (8 MiB)")
    if not dataset.content.strip():
        raise _bad("the dataset is empty")
    if dataset.max_prompt_words and dataset.min_prompt_words > dataset.max_prompt_words:
        raise _bad("min_prompt_words exceeds max_prompt_words", "spec.workload.dataset.min_prompt_words")
    if dataset.format == run_pb2.DATASET_FORMAT_JSONL:
        entries = _parse_jsonl(dataset.content)
    else:
        entries = _parse_sharegpt(dataset.content)
    low, high = dataset.min_prompt_words, dataset.max_prompt_words or 2**31
    kept = [e for e in entries if low <= _words(e) <= high]
    if not kept:
        raise _bad(f"no usable entries ({len(entries)} parsed, none left after the length filter)")
    if len(kept) > MAX_ENTRIES:
        raise _bad(f"{len(kept)} entries; the limit is {MAX_ENTRIES}")
    return kept


def content_digest(content: str) -> str:
    return hashlib.sha256(content.encode()).hexdigest()


def entries_to_json(entries: list[run_pb2.DatasetEntry]) -> str:
    return json.dumps(
        [[e.prompt, [[m.role, m.content] for m in e.messages], e.max_tokens] for e in entries], separators=(",", ":")
    )


def entries_from_json(text: str) -> list[run_pb2.DatasetEntry]:
    return (
        [
            run_pb2.DatasetEntry(
                prompt=prompt,
                messages=[run_pb2.ChatMessage(role=r, content=c) for r, c in messages],
                max_tokens=max_tokens,
            )
            for prompt, messages, max_tokens in json.loads(text)
        ]
        if text
        else []
    )
