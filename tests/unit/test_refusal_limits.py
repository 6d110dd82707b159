"""Per-address state of refusal limits and audit aggregation stays bounded under a flood from
many addresses, and the aggregated counts still add up."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path

import pytest

from controller.domain.access.audit import WINDOW_NS, AuditEntry, AuditLog
from controller.domain.access.ratelimit import TokenBuckets
from controller.store import migrations
from controller.store import security as store
from controller.store.database import Database
from controller.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(60)


def test_buckets_of_a_many_address_flood_stay_bounded() -> None:
    now = [0.0]
    buckets = TokenBuckets(1.0, 2.0, clock=lambda: now[0], max_tracked=100)
    for i in range(5000):
        buckets.take(f"10.0.{i // 256}.{i % 256}")
        buckets.take(f"10.0.{i // 256}.{i % 256}")  # each bucket left non-full: nothing idle to drop
        now[0] += 0.0001
        assert len(buckets) <= 100
    # A tracked caller keeps its state: its bucket is empty until it refills.
    assert buckets.take("10.0.19.135") > 0


async def test_refusals_aggregate_per_address_and_minute(tmp_path: Path) -> None:
    db = Database(tmp_path / "audit.db")
    db.migrate()
    now = [7 * WINDOW_NS]
    audit = AuditLog(SqliteStore(db), clock=lambda: now[0], max_open_groups=50)
    try:
        for _minute in range(2):
            for i in range(300):
                peer = f"ipv4:10.0.0.{i % 3}"  # three addresses: three groups
                await audit.record_refusal(AuditEntry("k1", "/m", "UNAUTHENTICATED", f"r{i}", peer))
            now[0] += WINDOW_NS
        # A flood from 1,000 addresses: past 50 open groups, one overflow row.
        for i in range(1000):
            peer = f"ipv4:10.1.{i // 256}.{i % 256}"
            await audit.record_refusal(AuditEntry("", "/m", "UNAUTHENTICATED", f"f{i}", peer))
            assert audit.open_groups <= 51
        await audit.flush()
        rows = await db.read(store.list_audit, 1000, None, "", "")
    finally:
        db.close()
    assert sum(r.count for r in rows) == 600 + 1000
    grouped = [r for r in rows if r.key_id == "k1"]
    assert len(grouped) == 6 and {r.count for r in grouped} == {100}
    overflow = [r for r in rows if r.peer == "(other addresses)"]
    # The six earlier groups were not flushed yet, so they keep their places: 44 new ones fit.
    assert len(overflow) == 1 and overflow[0].count == 1000 - (50 - 6)
    assert len(rows) <= 51 + 6


def test_migration_10_counts_existing_rows_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "old.db"
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:9])
        old = Database(path)
        assert old.migrate() == [1, 2, 3, 4, 5, 6, 7, 8, 9]
        old.close()
    conn = sqlite3.connect(path)
    with conn:
        conn.execute(
            "INSERT INTO audit_events (time_ns, key_id, method, run_id, outcome, request_id, peer, detail)"
            " VALUES (1, 'k', '/m', '', 'OK', 'r', 'ipv4:127.0.0.1:1', '')"
        )
    conn.close()
    db = Database(path)
    try:
        assert db.migrate()[0] == 10
        (row,) = asyncio.run(db.read(store.list_audit, 10, None, "", ""))
    finally:
        db.close()
    assert row.count == 1 and row.request_id == "r"
