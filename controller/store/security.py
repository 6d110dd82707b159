"""Repository functions for API keys and the audit log (jobs for `Database.write`/`read`).

Like `repository`, each function is a whole job run on a worker thread inside a
transaction, and returns plain dataclasses. The key table holds a SHA-256 digest of each
secret, never the secret itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from controller.store.models import database_proxy


@dataclass(frozen=True)
class KeyRecord:
    """One stored API key (without its secret)."""

    key_id: str
    secret_sha256: bytes
    role: str
    name: str
    created_at: int
    expires_at: int | None
    revoked_at: int | None

    def usable(self, now_ns: int) -> bool:
        """Neither revoked nor expired at `now_ns`."""
        return self.revoked_at is None and (self.expires_at is None or now_ns < self.expires_at)


@dataclass(frozen=True)
class AuditRecord:
    """One row of the audit log."""

    pk: int
    time_ns: int
    key_id: str
    method: str
    run_id: str
    outcome: str
    request_id: str
    peer: str
    detail: str
    count: int = 1  # the calls the row stands for (refusals are aggregated; see domain/access/audit.py)


_KEY_COLUMNS = "key_id, secret_sha256, role, name, created_at, expires_at, revoked_at"


def _key(row: Sequence[object]) -> KeyRecord:
    key_id, digest, role, name, created, expires, revoked = row
    return KeyRecord(
        str(key_id),
        bytes(digest),  # type: ignore[call-overload]
        str(role),
        str(name),
        int(created),  # type: ignore[call-overload]
        None if expires is None else int(expires),  # type: ignore[call-overload]
        None if revoked is None else int(revoked),  # type: ignore[call-overload]
    )


# --- keys -------------------------------------------------------------------------------


def insert_key(record: KeyRecord) -> None:
    database_proxy.execute_sql(
        f"INSERT INTO api_keys ({_KEY_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            record.key_id,
            record.secret_sha256,
            record.role,
            record.name,
            record.created_at,
            record.expires_at,
            record.revoked_at,
        ),
    )


def get_key(key_id: str) -> KeyRecord | None:
    row = database_proxy.execute_sql(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id = ?", (key_id,)).fetchone()
    return _key(row) if row else None


def list_keys(include_revoked: bool) -> list[KeyRecord]:
    where = "" if include_revoked else " WHERE revoked_at IS NULL"
    rows = database_proxy.execute_sql(
        f"SELECT {_KEY_COLUMNS} FROM api_keys{where} ORDER BY created_at DESC, key_id"
    ).fetchall()
    return [_key(r) for r in rows]


def get_keys(key_ids: Sequence[str]) -> list[KeyRecord]:
    if not key_ids:
        return []
    marks = ", ".join("?" * len(key_ids))
    rows = database_proxy.execute_sql(f"SELECT {_KEY_COLUMNS} FROM api_keys WHERE key_id IN ({marks})", tuple(key_ids))
    return [_key(r) for r in rows.fetchall()]


def revoke_key(key_id: str, now_ns: int) -> KeyRecord | None:
    """Mark a key revoked (a second revoke keeps the first time); None if there is no such key."""
    database_proxy.execute_sql(
        "UPDATE api_keys SET revoked_at = ? WHERE key_id = ? AND revoked_at IS NULL", (now_ns, key_id)
    )
    return get_key(key_id)


def any_keys() -> bool:
    """Whether any key was ever created (revoked ones count: revoking never reopens a controller)."""
    return bool(database_proxy.execute_sql("SELECT EXISTS (SELECT 1 FROM api_keys)").fetchone()[0])


# --- audit ------------------------------------------------------------------------------


# The audit log keeps the newest this many rows: whatever is recorded, the database cannot
# grow without bound (and refusals are aggregated, so a flood of them adds few rows).
AUDIT_RETENTION_EVENTS = 1_000_000


def insert_audit(events: Sequence[AuditRecord], retention: int = AUDIT_RETENTION_EVENTS) -> int:
    """Append events; returns the pk of the last one."""
    conn = database_proxy.connection()
    conn.executemany(
        "INSERT INTO audit_events (time_ns, key_id, method, run_id, outcome, request_id, peer, detail, count)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
        [(e.time_ns, e.key_id, e.method, e.run_id, e.outcome, e.request_id, e.peer, e.detail, e.count) for e in events],
    )
    newest = int(conn.execute("SELECT MAX(pk) FROM audit_events").fetchone()[0] or 0)
    # A range on the rowid: an index seek that finds nothing in the common case.
    conn.execute("DELETE FROM audit_events WHERE pk <= ?", (newest - retention,))
    return newest


def set_audit_counts(counts: Sequence[tuple[int, int]]) -> None:
    """Set the count of aggregated rows: (count, pk) pairs (rows gone by retention are skipped)."""
    database_proxy.connection().executemany("UPDATE audit_events SET count = ? WHERE pk = ?", counts)


def list_audit(limit: int, before_pk: int | None, key_id: str, run_id: str) -> list[AuditRecord]:
    """Newest first; `before_pk` is the last pk of the previous page."""
    clauses: list[str] = []
    params: list[object] = []
    for column, value in (("key_id", key_id), ("run_id", run_id)):
        if value:
            clauses.append(f"{column} = ?")
            params.append(value)
    if before_pk is not None:
        clauses.append("pk < ?")
        params.append(before_pk)
    where = f" WHERE {' AND '.join(clauses)}" if clauses else ""
    rows = database_proxy.execute_sql(
        "SELECT pk, time_ns, key_id, method, run_id, outcome, request_id, peer, detail, count FROM audit_events"
        f"{where} ORDER BY pk DESC LIMIT ?",
        (*params, limit),
    ).fetchall()
    return [AuditRecord(*r) for r in rows]
