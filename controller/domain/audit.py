"""The audit log: every mutating call (whatever its outcome) and every refused call.

A row says when, which key (its id only), which method, which run, the outcome (a status
code name), the request id and the peer. Details are short reasons written by us, never
request contents, so no secret can reach the log.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from controller.domain.errors import FieldViolation, InvalidArgument
from controller.store import security as store
from controller.store.database import Database
from controller.store.security import AuditRecord

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
_MAX_FIELD = 256


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


class AuditLog:
    """Writes and pages through the audit table."""

    def __init__(self, db: Database) -> None:
        self._db = db

    async def record(self, entry: AuditEntry) -> None:
        row = AuditRecord(
            0, time.time_ns(), entry.key_id[:_MAX_FIELD], entry.method[:_MAX_FIELD], entry.run_id[:_MAX_FIELD],
            entry.outcome[:_MAX_FIELD], entry.request_id[:_MAX_FIELD], entry.peer[:_MAX_FIELD],
            entry.detail[:_MAX_FIELD],
        )  # fmt: skip
        await self._db.write(store.insert_audit, [row])

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
        rows = await self._db.read(store.list_audit, size + 1, before, key_id, run_id)
        more = len(rows) > size
        rows = rows[:size]
        return rows, str(rows[-1].pk) if more and rows else ""
