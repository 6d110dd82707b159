"""Columnar sample storage (migration 7): a database filled through the old per-sample path
reads back identically after the migration; ingest, export paging, counts and ListRuns'
index use on the new layout."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest
from google.protobuf import json_format

from common.codes import RequestStatus, SampleFlag
from common.proto.loadtest.v1 import run_pb2
from controller.domain.runs import MAX_PAGE_BYTES
from controller.domain.spec import parse_spec
from controller.store import columnar
from controller.store import repository as repo
from controller.store.database import Database
from controller.store.migrations import MIGRATIONS, _statements

OLD_COLUMNS = columnar.LEGACY_COLUMNS  # the per-sample columns of the old `samples` table
# The old path, as repository.ingest_batches wrote it before migration 7 (one row per sample).
OLD_INSERT = (
    f"INSERT INTO samples (run_pk, stage_idx, batch_pk, {', '.join(OLD_COLUMNS)}, error)"
    f" VALUES ({', '.join('?' * (len(OLD_COLUMNS) + 4))})"
)
OLD_EXPORT = (
    "SELECT s.rowid, s.stage_idx, a.agent_name, s.sent_unix_ns, s.queue_delay_ns, s.first_byte_ns,"
    " s.first_token_ns, s.last_token_ns, s.done_ns, s.prompt_tokens, s.output_tokens, s.status, s.flags,"
    " s.itl_count, s.error, a.agent_session FROM samples s JOIN sample_batches b ON b.pk = s.batch_pk"
    " JOIN assignments a ON a.pk = b.assignment_pk WHERE s.run_pk = ? ORDER BY s.rowid"
)


def _spec(model: str = "m") -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(display_name="old run")
    spec.target.base_url = "http://127.0.0.1:9/v1"
    spec.target.model = model
    spec.stages.add(name="s0", concurrency=2).duration.FromSeconds(5)
    spec.stages.add(name="s1", concurrency=4).duration.FromSeconds(5)
    return spec


def _random_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[str], np.ndarray]:
    table = rng.integers(1, 10**9, size=(len(OLD_COLUMNS), n), dtype=np.int64)
    c = columnar.COL
    table[c["status"]] = rng.choice([1, 1, 1, 3, 4], size=n)
    table[c["flags"]] = rng.choice([0, 1, 2, 3], size=n)
    table[c["itl_count"]] = rng.integers(0, 5, size=n)
    table[c["output_tokens"]] = rng.integers(0, 50, size=n)
    errors = [f"boom {i}" if s != 1 else "" for i, s in enumerate(table[c["status"]])]
    itl = rng.integers(1, 10**8, size=int(table[c["itl_count"]].sum()), dtype=np.int64)
    return table, errors, itl


def _old_database(path: Path) -> tuple[int, list[tuple[object, ...]], dict[int, tuple[np.ndarray, np.ndarray]], str]:
    """A database at schema 6 filled the old way; returns (run pk, old export rows,
    per stage (table, itl) in storage order, the spec JSON)."""
    conn = sqlite3.connect(path)
    conn.execute(
        "CREATE TABLE schema_migrations (version INTEGER PRIMARY KEY, description TEXT NOT NULL,"
        " applied_at INTEGER NOT NULL)"
    )
    for version, description, sql in MIGRATIONS[:6]:
        assert isinstance(sql, str) and version <= 6
        for statement in _statements(sql):
            conn.execute(statement)
        conn.execute("INSERT INTO schema_migrations VALUES (?, ?, ?)", (version, description, time.time_ns()))
    spec_json = json_format.MessageToJson(_spec(), indent=None, sort_keys=True)
    run_pk = conn.execute(
        "INSERT INTO runs (run_id, model, state, spec_json, created_at) VALUES ('run_old', 'm', 3, ?, 1)",
        (spec_json,),
    ).lastrowid
    assert run_pk is not None
    rng = np.random.default_rng(7)
    # Per stage, per assignment (its batches in order): results read a stage agent by agent.
    stages: dict[int, dict[int, list[tuple[np.ndarray, np.ndarray]]]] = {0: {}, 1: {}}
    assignment = {}
    for i, stage in enumerate((0, 0, 1)):
        assignment[i] = conn.execute(
            "INSERT INTO assignments (assignment_id, run_pk, stage_idx, agent_session, agent_name, concurrency,"
            " requests, state, created_at) VALUES (?, ?, ?, ?, ?, 1, 0, 3, 1)",
            (f"a{i}", run_pk, stage, f"sess{i}", f"agent-{i % 2}"),
        ).lastrowid
    # Batches of the assignments interleaved, as several agents' streams arrive.
    for seq in range(1, 5):
        for i, stage in enumerate((0, 0, 1)):
            n = int(rng.integers(1, 40))
            table, errors, itl = _random_batch(rng, n)
            batch_pk = conn.execute(
                "INSERT INTO sample_batches (assignment_pk, batch_seq, run_pk, stage_idx, n_samples, itl_ns)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (assignment[i], seq, run_pk, stage, n, itl.astype("<i8").tobytes()),
            ).lastrowid
            conn.executemany(
                OLD_INSERT,
                [(run_pk, stage, batch_pk, *map(int, table[:, k]), errors[k]) for k in range(n)],
            )
            stages[stage].setdefault(i, []).append((table, itl))
    conn.commit()
    old_rows = conn.execute(OLD_EXPORT, (run_pk,)).fetchall()
    conn.close()
    # Assignment i runs on agent-{i % 2}: within a stage, name order is assignment order here.
    ordered = {
        s: [part for i in sorted(by_assignment) for part in by_assignment[i]] for s, by_assignment in stages.items()
    }
    joined = {
        s: (np.concatenate([t for t, _ in parts], axis=1), np.concatenate([i for _, i in parts]))
        for s, parts in ordered.items()
    }
    return run_pk, old_rows, joined, spec_json


def test_migration_7_converts_samples_written_the_old_way(tmp_path: Path) -> None:
    path = tmp_path / "old.db"
    run_pk, old_rows, stages, spec_json = _old_database(path)
    db = Database(path)
    assert db.migrate() == [v for v, _, _ in MIGRATIONS[6:]]  # 7 and any later one
    db.db.connect(reuse_if_open=True)
    try:
        tables = {r[0] for r in db.db.execute_sql("SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert "samples" not in tables and "sample_errors" in tables
        assert repo.count_samples(run_pk) == len(old_rows)
        for stage, (table, itl) in stages.items():
            cols = repo.load_stage_columns(run_pk, stage)
            for name in ("sent_unix_ns", "first_token_ns", "done_ns", "status", "flags", "itl_count"):
                assert np.array_equal(getattr(cols, name), table[columnar.COL[name]]), name
            assert np.array_equal(cols.itl_ns, itl)
            # Columns appended after migration 7 read as 0 from its 13-column blobs.
            for name in columnar.SAMPLE_COLUMNS[len(OLD_COLUMNS) :]:
                assert not getattr(cols, name).any() and len(getattr(cols, name)) == len(cols), name
            data = repo.load_stage_samples(run_pk, stage)
            assert np.array_equal(data.requested_output_tokens, table[columnar.COL["requested_output_tokens"]])
        # Export: same rows, same order, every page size (the cursor column aside).
        for page in (1, 7, 1000):
            rows, after = [], 0
            while chunk := repo.export_page(run_pk, after, page, True):
                rows.extend(chunk)
                after = int(chunk[-1][0])  # type: ignore[call-overload]
            # The columns after the session (EXPORT_EXTRA_COLUMNS) are 0 for samples of before them.
            assert [r[1:16] for r in rows] == [r[1:] for r in old_rows]
            assert {r[16:] for r in rows} == {(0,) * len(columnar.EXPORT_EXTRA_COLUMNS)}
        counted = [r for r in old_rows if not int(r[12]) & SampleFlag.WARMUP]  # type: ignore[call-overload]
        rows, after = [], 0
        while chunk := repo.export_page(run_pk, after, 5, False):
            rows.extend(chunk)
            after = int(chunk[-1][0])  # type: ignore[call-overload]
        assert [r[1:16] for r in rows] == [r[1:] for r in counted]
        first_error = next(str(r[14]) for r in old_rows if r[14])
        assert repo.failure_summary(run_pk)[2] == first_error
        record = repo.get_run("run_old")
        assert record is not None and record.spec_pb
        assert parse_spec(record) == json_format.Parse(spec_json, run_pb2.RunSpec())
    finally:
        db.close()


@pytest.fixture
def fresh_db(tmp_path: Path) -> Database:
    db = Database(tmp_path / "new.db")
    db.migrate()
    db.db.connect(reuse_if_open=True)
    return db


def test_ingest_is_idempotent_and_counts_without_warmup(fresh_db: Database) -> None:
    db = fresh_db
    spec = _spec()
    record, _ = repo.insert_run("run_new", None, "", "m", "{}", ["s0"], "", 5, "", spec.SerializeToString())
    a = repo.insert_assignment("a0", record.pk, 0, "sess", "agent", 1, 0, 2, 5)
    rng = np.random.default_rng(3)
    table, errors, itl = _random_batch(rng, 64)
    batch = repo.BatchIngest(
        a, record.pk, 0, 1, table, [(i, e) for i, e in enumerate(errors) if e], itl.astype("<i8").tobytes()
    )
    version0 = repo.sample_batches_version(record.pk)
    first, again = repo.ingest_batches([batch, batch])
    c = columnar.COL
    counted = (table[c["flags"]] & SampleFlag.WARMUP) == 0
    ok = counted & (table[c["status"]] == RequestStatus.OK)
    assert first == repo.IngestOutcome(
        True, int(ok.sum()), int((counted & ~ok).sum()), int(table[c["output_tokens"]][ok].sum())
    )
    assert again == repo.IngestOutcome(False, 0, 0, 0)
    assert repo.count_samples(record.pk) == 64
    assert repo.sample_batches_version(record.pk) != version0
    stored = repo.get_run("run_new")
    assert stored is not None and stored.requests_ok == first.ok and stored.requests_failed == first.failed
    assert parse_spec(stored) == spec
    exported = repo.export_page(record.pk, 0, 100, True)
    assert [r[14] for r in exported] == errors
    repo.delete_run(record.pk)
    assert db.db.execute_sql("SELECT COUNT(*) FROM sample_errors").fetchone()[0] == 0
    db.close()


@pytest.mark.parametrize(
    ("state", "model", "group_id", "index"),
    [
        (0, "", "", "runs_created_at"),
        (4, "", "", "runs_state_created_at"),
        (0, "llama", "", "runs_model"),
        (0, "", "grp_0123456789abcdef0123", "runs_group"),
    ],
)
def test_list_runs_seeks_in_an_index(fresh_db: Database, state: int, model: str, group_id: str, index: str) -> None:
    """Every ListRuns shape reads its page from an index in order: no scan, no sort."""
    conn = fresh_db.db.connection()
    plans = []

    def trace(sql: str) -> None:
        if sql.lstrip().startswith("SELECT") and "FROM runs" in sql:
            plans.append(sql)

    conn.set_trace_callback(trace)
    for after in (None, (10**18, 99)):
        repo.list_runs(50, after, state, model, MAX_PAGE_BYTES, group_id=group_id)
    conn.set_trace_callback(None)
    assert len(plans) == 2
    for sql in plans:
        plan = " | ".join(str(r[3]) for r in conn.execute("EXPLAIN QUERY PLAN " + sql).fetchall())
        assert f"USING COVERING INDEX {index}" in plan or f"USING INDEX {index}" in plan, plan
        assert "TEMP B-TREE" not in plan, plan
    fresh_db.close()
