"""The model's tokenizer on the agent: fetched like any uploaded dataset, counted with.

`load_tokenizer` gets the workload's tokenizer (`Workload.tokenizer_id`, an uploaded dataset
of format TOKENIZER) through the agent's `DatasetSource` (the controller's FetchDataset
stream, `agent.datasets.DatasetCache`) before a stage or a preflight starts, and keeps the
last few loaded (stages of a run share one). `estimate_output_tokens` counts a reply's
answer text with it when the server reported no usage.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from typing import Protocol

from agent.datasets import DatasetFetchError
from agent.sample import RequestSample
from common.proto.loadtest.v1 import run_pb2
from common.tokenizer import Tokenizer, TokenizerError

# Tokenizers kept loaded (a run's stages and preflight use the same one).
KEEP_TOKENIZERS = 4


class DatasetSource(Protocol):
    """Where the agent gets an uploaded dataset's bytes (`agent.datasets.DatasetCache`)."""

    async def get(self, dataset_id: str) -> bytes:
        """The dataset's content; raises for an unknown id or a broken transfer."""
        ...


_LOADED: OrderedDict[str, Tokenizer] = OrderedDict()


async def fetch_dataset(source: DatasetSource | None, dataset_id: str, what: str) -> bytes:
    """The bytes of `dataset_id` (a `what`: "trace", "tokenizer"), or DatasetFetchError."""
    if source is None:
        raise DatasetFetchError(f"{what} {dataset_id}: this agent cannot fetch uploaded datasets")
    try:
        return await source.get(dataset_id)
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        raise DatasetFetchError(f"{what} {dataset_id}: {exc}") from None


async def load_tokenizer(workload: run_pb2.Workload, source: DatasetSource | None) -> Tokenizer | None:
    """The workload's tokenizer, or None when it names none."""
    dataset_id = workload.tokenizer_id
    if not dataset_id:
        return None
    tokenizer = _LOADED.get(dataset_id)
    if tokenizer is not None:
        _LOADED.move_to_end(dataset_id)
        return tokenizer
    data = await fetch_dataset(source, dataset_id, "tokenizer")
    try:
        tokenizer = await asyncio.to_thread(Tokenizer, data, dataset_id)
    except TokenizerError as exc:
        raise DatasetFetchError(f"tokenizer {dataset_id}: {exc}") from None
    _LOADED[dataset_id] = tokenizer
    while len(_LOADED) > KEEP_TOKENIZERS:
        _LOADED.popitem(last=False)
    return tokenizer


def estimate_output_tokens(sample: RequestSample, tokenizer: Tokenizer | None) -> int:
    """A completed request's output tokens counted with the tokenizer when the server sent
    no usage: the answer text (`sample.answer_chunks`, collected when it is a list) plus the
    reasoning tokens counted from events. Sets and returns `sample.output_tokens` (unchanged
    with usage, without a tokenizer, or when no answer text was collected)."""
    if (
        tokenizer is None
        or sample.usage_from_server
        or not sample.answer_chunks  # nothing collected: the parser's own estimate stays
        or sample.status != run_pb2.REQUEST_STATUS_OK
    ):
        return sample.output_tokens
    sample.output_tokens = tokenizer.count("".join(sample.answer_chunks)) + sample.reasoning_tokens
    return sample.output_tokens
