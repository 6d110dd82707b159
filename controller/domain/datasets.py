"""Datasets inlined in a run spec (`Dataset.content`): parsed and validated at CreateRun.

The parsing itself is common/datasets.py (shared with the agent and the uploads of
DatasetService); this is the CreateRun side: the 8 MiB limit of inline content, the
InvalidArgument naming `spec.workload.dataset.content` and the line, and the storage form of
the parsed entries (stored beside the run and sent to the agents inside their assignments).
Uploaded datasets (`Dataset.dataset_id`) are not parsed here: the agents fetch and parse them.
"""

from __future__ import annotations

import hashlib
import json

from common.datasets import PROMPT_FORMATS, DatasetError, parse_entries
from common.proto.loadtest.v1 import run_pb2
from controller.domain.errors import FieldViolation, InvalidArgument

MAX_DATASET_BYTES = 8 * 1024 * 1024
MAX_ENTRIES = 200_000
FIELD = "spec.workload.dataset.content"


def _bad(description: str, field: str = FIELD) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


def parse_dataset(dataset: run_pb2.Dataset) -> list[run_pb2.DatasetEntry]:
    """The entries of an inline dataset after filtering, or InvalidArgument naming what is wrong."""
    if dataset.format not in PROMPT_FORMATS:
        required = "required: DATASET_FORMAT_JSONL, DATASET_FORMAT_SHAREGPT or DATASET_FORMAT_CSV"
        raise _bad(required, "spec.workload.dataset.format")
    data = dataset.content.encode()
    if len(data) > MAX_DATASET_BYTES:
        raise _bad(
            f"dataset is {len(data)} bytes; the limit of inline content is {MAX_DATASET_BYTES} (8 MiB):"
            " upload it (`llm-loadtest datasets upload`) and refer to it by `dataset_id`"
        )
    if not dataset.content.strip():
        raise _bad("the dataset is empty")
    try:
        kept = parse_entries(
            dataset.format,
            data,
            all_turns=dataset.all_turns,
            min_prompt_words=dataset.min_prompt_words,
            max_prompt_words=dataset.max_prompt_words,
        )
    except DatasetError as exc:
        field = "spec.workload.dataset.min_prompt_words" if exc.field == "min_prompt_words" else FIELD
        raise _bad(str(exc), field) from None
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
