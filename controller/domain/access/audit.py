"""The audit log: every mutating call (whatever its outcome) and every refused call.

A row says when, which key (its id only), which method, which run, the outcome (a status
code name), the request id, the peer and how many calls it stands for. Details are short
reasons written by us, never request contents, so no secret can reach the log.

Mutating calls that were let through get a row each. Refused calls are aggregated: one row
per client address, key id, method and outcome per minute (WINDOW_NS), written at the first
refusal (so it shows at once) and its `count` brought up to date every FLUSH_INTERVAL_S
afterwards. A flood of bad calls therefore adds a few rows a minute instead of a row per
call, and cannot push the real history out of the retention window. The open groups are
bounded (MAX_OPEN_GROUPS, 10,000); past that, refusals of new groups are counted in one row per
method and outcome with the peer OVERFLOW_PEER.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from controller.domain.errors import FieldViolation, InvalidArgument
from controller.store.interface import AuditStore
from controller.store.security import AuditRecord

log = structlog.get_logger(__name__)

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
WINDOW_NS = 60 * 10**9
FLUSH_INTERVAL_S = 1.0
MAX_OPEN_GROUPS = 10_000
OVERFLOW_PEER = "(other addresses)"
_MAX_FIELD = 256

_GroupKey = tuple[int, str, str, str, str]  # window, peer, key id, method, outcome


@dataclass(frozen=True)
class AuditEntry:
    """What to record about one call."""

    key_id: str
    method: str
    outcome: str
    request_id: str
    peer: str
    run_id: str = ""
    detail: str = ""


@dataclass
class _Group:
    """The refusals of one group in one window: its row and the count the row holds."""

    count: int = 1
    written: int = 0
    pk: int | None = None


class AuditLog:
    """Writes and pages through the audit table."""

    def __init__(
        self, store: AuditStore, clock: Callable[[], int] = time.time_ns, max_open_groups: int = MAX_OPEN_GROUPS
    ) -> None:
        self._store = store
        self._clock = clock
        self._max_open_groups = max_open_groups
        self._groups: dict[_GroupKey, _Group] = {}
        self._flusher: asyncio.Task[None] | None = None

    @property
    def open_groups(self) -> int:
        """Refusal groups held in memory (bounded by max_open_groups, plus one per method and
        outcome for the overflow)."""
        return len(self._groups)

    async def record(self, entry: AuditEntry) -> None:
        """One row for one call."""
        await self._store.insert_audit([self._row(entry, self._clock())])

    async def record_refusal(self, entry: AuditEntry) -> bool:
        """Count a refused call in its group's row (writing the row if it is the first);
        True when it was the first."""
        now = self._clock()
        window = now // WINDOW_NS
        key = (window, entry.peer, entry.key_id, entry.method, entry.outcome)
        group = self._groups.get(key)
        if group is None and len(self._groups) >= self._max_open_groups:
            self._drop_settled(window)
            if len(self._groups) >= self._max_open_groups:
                entry = AuditEntry("", entry.method, entry.outcome, entry.request_id, OVERFLOW_PEER, "", entry.detail)
                key = (window, OVERFLOW_PEER, "", entry.method, entry.outcome)
                group = self._groups.get(key)
        if group is not None:
            group.count += 1
            return False
        group = self._groups[key] = _Group()  # before the write: refusals meanwhile count here
        try:
            group.pk = await self._store.insert_audit([self._row(entry, now)])
        except BaseException:
            del self._groups[key]
            raise
        group.written = 1
        return True

    def start(self) -> None:
        self._flusher = asyncio.create_task(self._flush_loop(), name="audit-refusal-flusher")

    async def stop(self) -> None:
        """Stop the flusher and write the counts not written yet."""
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush()

    async def flush(self) -> None:
        """Bring every refusal row's count up to date; forget groups of past windows."""
        # (group, count to write, its row's pk); groups whose first write is still under way have no pk yet
        pending = [(g, g.count, g.pk) for g in self._groups.values() if g.pk is not None and g.count > g.written]
        if pending:
            await self._store.set_audit_counts([(count, pk) for _, count, pk in pending])
            for g, count, _ in pending:
                g.written = count
        self._drop_settled(self._clock() // WINDOW_NS)

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(FLUSH_INTERVAL_S)
            try:
                await self.flush()
            except Exception:  # a failed flush is retried on the next pass
                log.exception("audit_flush_failed")

    def _drop_settled(self, window: int) -> None:
        settled = [k for k, g in self._groups.items() if k[0] < window and g.pk is not None and g.count == g.written]
        for key in settled:
            del self._groups[key]

    @staticmethod
    def _row(entry: AuditEntry, now: int) -> AuditRecord:
        return AuditRecord(
            0,
            now,
            entry.key_id[:_MAX_FIELD],
            entry.method[:_MAX_FIELD],
            entry.run_id[:_MAX_FIELD],
            entry.outcome[:_MAX_FIELD],
            entry.request_id[:_MAX_FIELD],
            entry.peer[:_MAX_FIELD],
            entry.detail[:_MAX_FIELD],
        )

    async def list(
        self, page_size: int, page_token: str, key_id: str = "", run_id: str = ""
    ) -> tuple[list[AuditRecord], str]:
        """A page of events, newest first, and the token of the next page ("" at the end)."""
        if page_size < 0:
            raise InvalidArgument([FieldViolation("page_size", "must not be negative")])
        size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        before: int | None = None
        if page_token:
            if not page_token.isdigit() or len(page_token) > 19:
                raise InvalidArgument([FieldViolation("page_token", "malformed page token")])
            before = int(page_token)
        rows = await self._store.list_audit(size + 1, before, key_id, run_id)
        more = len(rows) > size
        rows = rows[:size]
        return rows, str(rows[-1].pk) if more and rows else ""
