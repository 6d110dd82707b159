"""SQLite access from asyncio: one writer thread, a small read pool.

Every job is one function run inside `connection_context()`-like reuse plus `atomic()` on
a worker thread, so the event loop never blocks on SQLite. Writes are serialised through
a single-thread executor (SQLite allows one writer anyway; queueing in Python is cheaper
than `SQLITE_BUSY` retries); reads run concurrently in WAL mode.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import time
from collections.abc import Callable
from pathlib import Path
from typing import ParamSpec, TypeVar

from peewee import DatabaseError, SqliteDatabase

from controller.store.migrations import apply_migrations
from controller.store.models import database_proxy

T = TypeVar("T")
P = ParamSpec("P")
F = TypeVar("F", bound=Callable[..., object])
WAL_WIPE_BUSY_MS = 250
WAL_WIPE_RETRY_S = 1.0


def erases_secrets(fn: F) -> F:
    """Mark a write job that deletes secrets: after it commits, the WAL file (which still
    holds the pages as they were written, secret included) is checkpointed and truncated."""
    fn.erases_secrets = True  # type: ignore[attr-defined]
    return fn


PRAGMAS = {
    "journal_mode": "wal",
    # WAL + NORMAL survives a crash of the controller process (not of the OS) without
    # an fsync per commit; the ingest path commits many times a second.
    "synchronous": "normal",
    "foreign_keys": 1,
    "busy_timeout": 10_000,
    # Deleted rows are overwritten with zeros (erased target API keys must not linger in
    # free space of the file); see also `erases_secrets`.
    "secure_delete": 1,
    "cache_size": -64_000,
    # Reads of large runs' sample blobs straight from the mapped file instead of a pread and
    # a copy per 4 KiB page (address space only; pages are shared with the OS cache).
    "mmap_size": 1 << 30,
    "temp_store": "memory",
}
_WRITING_PRAGMAS = frozenset({"journal_mode", "synchronous", "secure_delete"})


class UnusableDatabase(Exception):
    """The file cannot serve as the controller's database: not SQLite, corrupt, unreadable."""

    def __init__(self, path: str, error: BaseException) -> None:
        super().__init__(f"{path} is not a usable SQLite database: {error}")


class Database:
    """The controller's SQLite database with its writer thread and read pool."""

    def __init__(self, path: str | Path, read_workers: int = 4, *, read_only: bool = False) -> None:
        self.path = str(path)
        if read_only:
            # For the CLI's `--db` reads: SQLite itself refuses every write, and the pragmas
            # that would change the file (journal mode, secure delete) are left out.
            uri = Path(path).resolve().as_uri() + "?mode=ro"
            pragmas = {k: v for k, v in PRAGMAS.items() if k not in _WRITING_PRAGMAS}
            self.db = SqliteDatabase(uri, pragmas=pragmas, check_same_thread=False, uri=True)
        else:
            self.db = SqliteDatabase(self.path, pragmas=PRAGMAS, check_same_thread=False)
        database_proxy.initialize(self.db)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="sqlite-writer")
        self._readers = concurrent.futures.ThreadPoolExecutor(read_workers, thread_name_prefix="sqlite-reader")
        self._wipe_pending = False
        self._wipe_tried = -WAL_WIPE_RETRY_S

    def migrate(self) -> list[int]:
        """Apply pending migrations (synchronously; call before serving). UnusableDatabase when
        the file is not a database, is corrupt or cannot be opened."""
        try:
            self.db.connect(reuse_if_open=True)
            try:
                return apply_migrations(self.db)
            finally:
                self.db.close()
        except DatabaseError as exc:  # peewee's, also for sqlite3's OperationalError
            raise UnusableDatabase(self.path, exc) from None

    async def write(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(*args, **kwargs)` in one transaction on the writer thread."""
        result = await self._run(self._writer, functools.partial(fn, *args, **kwargs))
        erased = bool(getattr(fn, "erases_secrets", False))
        if erased or (self._wipe_pending and time.monotonic() - self._wipe_tried >= WAL_WIPE_RETRY_S):
            self._wipe_tried = time.monotonic()
            loop = asyncio.get_running_loop()
            self._wipe_pending = not await loop.run_in_executor(self._writer, self._truncate_wal)
        return result

    def _truncate_wal(self) -> bool:
        """Checkpoint and truncate the WAL, waiting briefly for readers; False if busy (retried
        after a later write)."""
        self.db.connect(reuse_if_open=True)
        self.db.execute_sql(f"PRAGMA busy_timeout = {WAL_WIPE_BUSY_MS}")
        try:
            busy = self.db.execute_sql("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
        finally:
            self.db.execute_sql(f"PRAGMA busy_timeout = {PRAGMAS['busy_timeout']}")
        return bool(busy == 0)

    async def read(self, fn: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(*args, **kwargs)` in a read transaction on the read pool."""
        return await self._run(self._readers, functools.partial(fn, *args, **kwargs))

    async def _run(self, pool: concurrent.futures.ThreadPoolExecutor, job: Callable[[], T]) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(pool, self._job, job)

    async def shrink_memory(self) -> None:
        """Free the writer connection's unused cached pages (`PRAGMA shrink_memory`), between
        two writes. The readers' caches stay small: they read through the memory map."""

        def shrink() -> None:
            self.db.connect(reuse_if_open=True)
            self.db.execute_sql("PRAGMA shrink_memory")

        await asyncio.get_running_loop().run_in_executor(self._writer, shrink)

    def _job(self, job: Callable[[], T]) -> T:
        # Connections are per thread and kept open for the thread's life: reopening one
        # per job costs more than the job for small reads.
        self.db.connect(reuse_if_open=True)
        with self.db.atomic():
            return job()

    def close(self) -> None:
        """Finish queued jobs, then close every thread's connection."""
        for pool in (self._writer, self._readers):
            pool.submit(self.db.close).result()
            pool.shutdown(wait=True)
        self.db.close()
