"""Uploaded datasets on the agent: fetched from the controller (AgentService.FetchDataset) on
the agent's own channel and key, checked against their SHA-256, and kept in memory by id for
the life of the process, so a dataset used by many stages (or by concurrent assignments) is
downloaded once. Prompt datasets are parsed here with common/datasets.py (the parser the
controller validated the upload with), on a thread, and the parsed entries are cached too, per
(dataset, all_turns, word filters).

`ControllerLink` owns one `DatasetCache` and hands it to every `AssignmentRunner`
(`AssignmentRunner.datasets`): traces (`common.datasets.parse_trace`) and tokenizers
(`common.tokenizer.Tokenizer(data)`) take their bytes from `await cache.get(dataset_id)`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable
from typing import Any

import grpc
import structlog

from common.datasets import DatasetError, format_name, parse_entries
from common.grpc_options import CLIENT_OPTIONS, auth_metadata
from common.proto.loadtest.v1 import agent_service_pb2, agent_service_pb2_grpc, run_pb2

log = structlog.get_logger(__name__)

ChannelFactory = Callable[[str], Any]  # grpc.aio.Channel (grpc ships no type information)
FETCH_TIMEOUT_S = 900.0


class DatasetFetchError(RuntimeError):
    """A dataset could not be fetched or used; the message says which and why."""


def _retrieved(task: asyncio.Task[Any]) -> None:
    """A shared task's outcome is its callers'; one whose callers all gave up logs nothing."""
    if not task.cancelled():
        task.exception()


def _insecure_channel(target: str) -> Any:
    return grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)


class DatasetCache:
    """Datasets fetched from one controller, by id (see the module docstring)."""

    def __init__(
        self,
        controller: str,
        api_key: str | None = None,
        channel_factory: ChannelFactory = _insecure_channel,
        timeout_s: float = FETCH_TIMEOUT_S,
    ) -> None:
        self._controller = controller
        self._api_key = api_key
        self._channel_factory = channel_factory
        self._timeout_s = timeout_s
        self._data: dict[str, bytes] = {}
        self._formats: dict[str, int] = {}
        self._downloads: dict[str, asyncio.Task[bytes]] = {}
        self._entries: dict[tuple[str, bool, int, int], asyncio.Task[list[run_pb2.DatasetEntry]]] = {}
        self.downloads = 0  # completed downloads (a test's witness of the single download)

    def format_of(self, dataset_id: str) -> int:
        """The format of a fetched dataset (0 before it was fetched)."""
        return self._formats.get(dataset_id, 0)

    async def get(self, dataset_id: str) -> bytes:
        """The dataset's bytes, downloaded on first use; concurrent callers share one download.
        DatasetFetchError when the controller does not have it or the bytes do not check out."""
        data = self._data.get(dataset_id)
        if data is not None:
            return data
        task = self._downloads.get(dataset_id)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.create_task(self._download(dataset_id), name=f"fetch-{dataset_id}")
            task.add_done_callback(_retrieved)
            self._downloads[dataset_id] = task
        # A caller that gives up (its assignment cancelled) does not cancel the others' download.
        return await asyncio.shield(task)

    async def _download(self, dataset_id: str) -> bytes:
        channel = self._channel_factory(self._controller)
        started = asyncio.get_running_loop().time()
        try:
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            call = stub.FetchDataset(
                agent_service_pb2.FetchDatasetRequest(dataset_id=dataset_id),
                metadata=auth_metadata(self._api_key),
                timeout=self._timeout_s,
            )
            parts: list[bytes] = []
            digest = hashlib.sha256()
            size, sha, fmt, first = 0, "", 0, True
            async for message in call:
                if first:
                    size, sha, fmt, first = message.size_bytes, message.sha256, message.format, False
                digest.update(message.chunk)
                parts.append(message.chunk)
        except grpc.aio.AioRpcError as exc:
            if exc.code() == grpc.StatusCode.NOT_FOUND:
                raise DatasetFetchError(f"dataset {dataset_id} is not on the controller (deleted?)") from None
            raise DatasetFetchError(
                f"fetching dataset {dataset_id} failed: {exc.code().name}: {exc.details()}"
            ) from None
        finally:
            await channel.close()
        data = b"".join(parts)
        del parts
        if len(data) != size or digest.hexdigest() != sha:
            raise DatasetFetchError(
                f"dataset {dataset_id} arrived damaged: {len(data)} bytes with SHA-256 {digest.hexdigest()[:12]}..., "
                f"expected {size} bytes with {sha[:12]}..."
            )
        self._data[dataset_id] = data
        self._formats[dataset_id] = fmt
        self.downloads += 1
        log.info(
            "dataset_fetched",
            dataset_id=dataset_id,
            format=format_name(fmt),
            bytes=len(data),
            seconds=round(asyncio.get_running_loop().time() - started, 3),
        )
        return data

    async def entries(
        self,
        dataset_id: str,
        *,
        fmt: int = 0,
        all_turns: bool = False,
        min_prompt_words: int = 0,
        max_prompt_words: int = 0,
    ) -> list[run_pb2.DatasetEntry]:
        """The prompt entries of an uploaded dataset, parsed (on a thread) and filtered as the
        run's `Dataset` asks; cached. DatasetFetchError naming the dataset and what is wrong."""
        key = (dataset_id, all_turns, min_prompt_words, max_prompt_words)
        task = self._entries.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None)):
            task = asyncio.create_task(self._parse(dataset_id, fmt, all_turns, min_prompt_words, max_prompt_words))
            task.add_done_callback(_retrieved)
            self._entries[key] = task
        return await asyncio.shield(task)

    async def _parse(
        self, dataset_id: str, fmt: int, all_turns: bool, min_words: int, max_words: int
    ) -> list[run_pb2.DatasetEntry]:
        data = await self.get(dataset_id)
        fmt = self._formats.get(dataset_id) or fmt
        try:
            return await asyncio.to_thread(
                parse_entries,
                fmt,
                data,
                all_turns=all_turns,
                min_prompt_words=min_words,
                max_prompt_words=max_words,
            )
        except DatasetError as exc:
            raise DatasetFetchError(f"dataset {dataset_id}: {exc}") from None
