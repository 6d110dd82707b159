"""The audit log keeps only its newest events."""

from __future__ import annotations

from pathlib import Path

from controller.store import security as store
from controller.store.database import Database
from controller.store.security import AuditRecord


async def test_only_the_newest_events_are_kept(tmp_path: Path) -> None:
    db = Database(tmp_path / "audit.db")
    db.migrate()
    try:
        for i in range(7):
            row = AuditRecord(0, i, "key", "/m", "", "OK", f"req-{i}", "peer", "")
            await db.write(store.insert_audit, [row], 3)
        kept = await db.read(store.list_audit, 100, None, "", "")
    finally:
        db.close()
    assert [r.request_id for r in kept] == ["req-6", "req-5", "req-4"]
