"""Uploaded datasets (DatasetService): stored once, content-addressed, referred to by id from
runs (`Dataset.dataset_id`, `Trace.dataset_id`, `Workload.tokenizer_id`) and streamed to the
agents (AgentService.FetchDataset).

An upload never holds the file in memory: each chunk is written to the store as it arrives (in
blobs of at most 1 MiB), hashed incrementally, and fed to the parser (common/datasets.py), which
runs on a thread beside the upload and reads the same chunks through a small bounded queue. The
upload completes in one store transaction (the row gets its id) only when the whole content
parsed; otherwise, or when the client goes away, the chunks written so far are deleted. The id
is `ds_` and 32 hex digits of sha256(format + ":" + content sha256), so the same content again
finds the stored dataset (`already_present`) and its new copy is deleted.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import queue
import re
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from common.datasets import (
    MAX_NAME_CHARS,
    PROMPT_FORMATS,
    TOKENIZER_FORMATS,
    TRACE_FORMATS,
    DatasetError,
    Summary,
    dataset_id,
    format_name,
    validate,
)
from common.proto.loadtest.v1 import run_pb2
from controller.domain.errors import FailedPrecondition, FieldViolation, InvalidArgument, NotFound
from controller.domain.paging import decode_page_token, encode_page_token
from controller.store.datasets import MAX_CHUNK_BYTES, DatasetRecord
from controller.store.interface import DatasetStore

MAX_UPLOAD_BYTES = 8 * 1024**3
MAX_TOKENIZER_BYTES = 512 * 1024**2
DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000
FETCH_CHUNKS_PER_READ = 4  # chunks (1 MiB each) read from the store at a time
_NAME = re.compile(r"[A-Za-z0-9._/\-]*")
_ID = re.compile(r"ds_[0-9a-f]{32}")
_QUEUE_CHUNKS = 4

FORMAT_FAMILIES: dict[str, frozenset[int]] = {
    "dataset": PROMPT_FORMATS,
    "trace": TRACE_FORMATS,
    "tokenizer": TOKENIZER_FORMATS,
}


def _bad(field: str, description: str) -> InvalidArgument:
    return InvalidArgument([FieldViolation(field, description)])


class _Validation:
    """The parser of one upload, on a thread of its own, reading the chunks as they are fed
    (at most `_QUEUE_CHUNKS` waiting: the upload waits for room, not the parser for bytes)."""

    def __init__(self, fmt: int) -> None:
        self._fmt = fmt
        self._loop = asyncio.get_running_loop()
        self._queue: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()
        self._room = asyncio.Semaphore(_QUEUE_CHUNKS)
        self._stop = threading.Event()
        self.future: asyncio.Future[Summary] = self._loop.create_future()
        # An abandoned upload never awaits the parser: its outcome is retrieved here, so that no
        # "exception was never retrieved" is logged when the future is collected.
        self.future.add_done_callback(lambda f: f.cancelled() or f.exception())
        threading.Thread(target=self._run, name="dataset-validation", daemon=True).start()

    def _call(self, fn: Callable[..., object], *args: object) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self._loop.call_soon_threadsafe(fn, *args)

    def _chunks(self) -> Iterator[bytes]:
        while True:
            item = self._queue.get()
            if item is None or self._stop.is_set():
                return
            self._call(self._room.release)
            yield item

    def _run(self) -> None:
        try:
            summary = validate(self._fmt, self._chunks())
        except Exception as exc:
            self._call(self._settle, None, exc)
        else:
            self._call(self._settle, summary, None)
        finally:
            self._stop.set()

    def _settle(self, summary: Summary | None, exc: Exception | None) -> None:
        if self.future.done():
            return
        if exc is not None:
            self.future.set_exception(exc)
        else:
            assert summary is not None
            self.future.set_result(summary)

    async def feed(self, blob: bytes) -> None:
        """Queue a chunk for the parser once there is room (or drop it: the parser has ended)."""
        if self.future.done() or self._stop.is_set():
            return
        room: asyncio.Future[Any] = asyncio.ensure_future(self._room.acquire())
        waiters: set[asyncio.Future[Any]] = {room, self.future}
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        if room not in done:
            room.cancel()
            return
        self._queue.put(blob)

    def failed(self) -> bool:
        return self.future.done() and self.future.exception() is not None

    async def result(self) -> Summary:
        self._queue.put(None)
        return await self.future

    def abort(self) -> None:
        self._stop.set()
        self._queue.put(None)


class DatasetLibrary:
    """Uploads, reads, lists and deletes datasets; the reference checks of CreateRun."""

    def __init__(self, store: DatasetStore) -> None:
        self._store = store

    async def start(self) -> int:
        """Delete what uploads interrupted by a stop of the controller left; returns how many."""
        return await self._store.discard_incomplete_uploads()

    async def upload(
        self, name: str, fmt: int, size_bytes: int, chunks: AsyncIterator[bytes]
    ) -> tuple[DatasetRecord, bool]:
        """Store a dataset from its chunks: (the dataset, True when it was already stored)."""
        if len(name) > MAX_NAME_CHARS or not _NAME.fullmatch(name):
            raise _bad("header.name", f"at most {MAX_NAME_CHARS} letters, digits, '.', '_', '-' or '/'")
        if fmt == run_pb2.DATASET_FORMAT_UNSPECIFIED or fmt not in run_pb2.DatasetFormat.values():
            raise _bad("header.format", "required: one of jsonl, sharegpt, csv, mooncake, azure, tokenizer")
        # A tokenizer is loaded whole to be checked (the tokenizers library reads one string).
        most = MAX_TOKENIZER_BYTES if fmt in TOKENIZER_FORMATS else MAX_UPLOAD_BYTES
        if size_bytes > most:
            raise _bad("header.size_bytes", f"at most {most} bytes for {format_name(fmt)}")
        pk = await self._store.begin_dataset_upload(name, fmt, time.time_ns())
        validation = _Validation(fmt)
        try:
            digest = hashlib.sha256()
            size = seq = 0
            pending = bytearray()

            async def flush(blob: bytes) -> None:
                nonlocal seq
                await self._store.append_dataset_chunk(pk, seq, blob)
                seq += 1
                await validation.feed(blob)
                if validation.failed():
                    await validation.future  # raises the parser's error now, not after the rest

            async for chunk in chunks:
                size += len(chunk)
                if size > (size_bytes or most):
                    limit = f"header.size_bytes ({size_bytes})" if size_bytes else f"the limit ({most})"
                    raise _bad("chunk", f"more than {limit} bytes")
                digest.update(chunk)
                pending += chunk
                while len(pending) >= MAX_CHUNK_BYTES:
                    blob = bytes(pending[:MAX_CHUNK_BYTES])
                    del pending[:MAX_CHUNK_BYTES]
                    await flush(blob)
            if pending:
                await flush(bytes(pending))
            if size_bytes and size != size_bytes:
                raise _bad("header.size_bytes", f"{size_bytes} announced, {size} received")
            if size == 0:
                raise _bad("chunk", "the content is empty")
            summary = await validation.result()
            sha = digest.hexdigest()
            return await self._store.finish_dataset_upload(
                pk, dataset_id(fmt, sha), size, sha, summary.entry_count, summary.span_s
            )
        except DatasetError as exc:
            await asyncio.shield(self._store.discard_dataset_upload(pk))
            field = "header.format" if exc.field == "format" else "chunk"
            raise _bad(field, f"{format_name(fmt)}: {exc}") from None
        except BaseException:
            validation.abort()
            await asyncio.shield(self._store.discard_dataset_upload(pk))
            raise

    async def get(self, dataset_id_: str, field: str = "dataset_id") -> DatasetRecord:
        if not dataset_id_:
            raise _bad(field, "required")
        record = await self._store.get_dataset(dataset_id_) if _ID.fullmatch(dataset_id_) else None
        if record is None:
            raise NotFound(f"dataset {dataset_id_!r} not found")
        return record

    async def list(self, page_size: int, page_token: str, fmt: int) -> tuple[list[DatasetRecord], str]:
        if page_size > MAX_PAGE_SIZE:
            raise _bad("page_size", f"at most {MAX_PAGE_SIZE}")
        if fmt and fmt not in run_pb2.DatasetFormat.values():
            raise _bad("format", "not a known format")
        after = decode_page_token(page_token) if page_token else None
        records, last = await self._store.list_datasets(page_size or DEFAULT_PAGE_SIZE, after, fmt)
        return records, encode_page_token(last) if last is not None else ""

    async def delete(self, dataset_id_: str) -> None:
        await self.get(dataset_id_)
        found, user = await self._store.delete_dataset(dataset_id_)
        if not found:
            raise NotFound(f"dataset {dataset_id_!r} not found")
        if user:
            raise FailedPrecondition(f"dataset {dataset_id_} is used by run {user}, which is pending or running")

    async def content(self, record: DatasetRecord) -> AsyncIterator[bytes]:
        """The dataset's bytes, chunk by chunk, read from the store a few chunks at a time."""
        seq = 0
        while True:
            blobs = await self._store.read_dataset_chunks(record.pk, seq, FETCH_CHUNKS_PER_READ)
            for blob in blobs:
                yield blob
            seq += len(blobs)
            if len(blobs) < FETCH_CHUNKS_PER_READ:
                return

    async def resolve(self, dataset_id_: str, family: str, field: str) -> DatasetRecord:
        """A run's reference: the dataset, which must exist and be of the family's formats
        (`dataset`, `trace`, `tokenizer`), else InvalidArgument naming `field`."""
        if not _ID.fullmatch(dataset_id_):
            raise _bad(field, f"{dataset_id_!r} is not a dataset id (ds_ and 32 hex digits)")
        record = await self._store.get_dataset(dataset_id_)
        if record is None:
            raise _bad(field, f"no uploaded dataset {dataset_id_} (llm-loadtest datasets list)")
        formats = FORMAT_FAMILIES[family]
        if record.format not in formats:
            wanted = " or ".join(sorted(format_name(f) for f in formats))
            raise _bad(field, f"dataset {dataset_id_} is {format_name(record.format)}; a {family} needs {wanted}")
        return record
