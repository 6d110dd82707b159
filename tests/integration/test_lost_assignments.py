"""Migration 11: assignments stored as lost before it (state -1) become ASSIGNMENT_STATE_LOST,
and a stage's result counts them as lost agents exactly as before."""

from __future__ import annotations

import contextlib
import sqlite3
from pathlib import Path

import pytest

from common.codes import AssignmentState
from common.proto.loadtest.v1 import agent_service_pb2
from controller.domain.results.compute import stage_fleet
from controller.store import migrations
from controller.store.database import Database
from controller.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(30)

# (assignment id, agent session, state as stored before migration 11, requests sent)
OLD_ASSIGNMENTS = (
    ("as_lost", "s1", -1, 10),
    ("as_done", "s2", int(agent_service_pb2.ASSIGNMENT_STATE_COMPLETED), 7),
    ("as_failed", "s3", int(agent_service_pb2.ASSIGNMENT_STATE_FAILED), 3),
    ("as_lost_too", "s4", -1, 4),
)


async def test_lost_assignment_state_is_migrated_and_still_counted(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "old.db"
    with monkeypatch.context() as m:
        m.setattr(migrations, "MIGRATIONS", migrations.MIGRATIONS[:10])
        assert Database(path).migrate() == list(range(1, 11))
    with contextlib.closing(sqlite3.connect(path)) as conn, conn:
        run_pk = conn.execute(
            "INSERT INTO runs (run_id, model, state, spec_json, created_at) VALUES ('run_old', 'm', 3, '{}', 1)"
        ).lastrowid
        conn.execute("INSERT INTO stages (run_pk, idx, name) VALUES (?, 0, 's')", (run_pk,))
        conn.executemany(
            "INSERT INTO assignments (assignment_id, run_pk, stage_idx, agent_session, agent_name, concurrency,"
            " requests, state, requests_sent, created_at) VALUES (?, ?, 0, ?, ?, 1, 0, ?, ?, 1)",
            [(aid, run_pk, session, f"agent-{session}", state, sent) for aid, session, state, sent in OLD_ASSIGNMENTS],
        )

    db = Database(path)
    assert db.migrate() == [v for v, _, _ in migrations.MIGRATIONS[10:]]  # 11 and any later
    db.db.connect(reuse_if_open=True)
    try:
        states = dict(db.db.execute_sql("SELECT assignment_id, state FROM assignments").fetchall())
        assert states == {
            "as_lost": AssignmentState.LOST,
            "as_done": AssignmentState.COMPLETED,
            "as_failed": AssignmentState.FAILED,
            "as_lost_too": AssignmentState.LOST,
        }
        assert AssignmentState.LOST == 5
        fleet = await SqliteStore(db).read_snapshot(stage_fleet, int(run_pk or 0), 0)
        # The two lost ones, with every request they announced (none of them stored a sample).
        assert (fleet.agents_lost, fleet.requests_lost) == (2, 14)
    finally:
        db.close()
