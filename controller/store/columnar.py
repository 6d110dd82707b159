"""Columnar sample storage (migration 7): one `sample_batches` row per received batch.

A batch's per-sample columns are one blob (`sample_batches.sample_columns`): the
`SAMPLE_COLUMNS` in that order, each as `n_samples` little-endian int64 — a (19, n) C-order
array. Columns are only ever appended: a blob written before the last ones existed (the 13
`LEGACY_COLUMNS` before the reasoning, prefix-cache and conversation columns) holds fewer
rows, which its length tells (len / 8 / n), and reads with the missing columns as 0 (what
they mean: no reasoning, nothing cached reported, not a conversation). No migration.
Its inter-token gaps are in `itl_ns` (one blob of little-endian int64 for the whole batch).
Error messages are rare, so only samples that carry one have a row in `sample_errors`
(batch pk, offset in the batch); every other sample's error is "".

Why: a blob per batch is one row insert per 512 samples and `np.frombuffer` to read, where
one SQLite row per sample (an `executemany` of 16 values each) held ingest far below its goal
and made reading a large stage back slow (BENCHMARKS.md, sections 5 and 6). A sample's
position is the pair (batch pk, offset): storage order is batch pk, then offset.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from common.codes import RequestStatus
from common.metrics import counted_mask

SAMPLE_COLUMNS = (
    "sent_unix_ns",
    "queue_delay_ns",
    "first_byte_ns",
    "first_token_ns",
    "last_token_ns",
    "done_ns",
    "prompt_tokens",
    "output_tokens",
    "status",
    "flags",
    "itl_count",
    "requested_input_tokens",
    "requested_output_tokens",
    # Appended for reasoning models, prefix caching and conversations (agent_service.proto
    # SampleBatch fields 200-205); absent (0) in blobs stored before them.
    "first_reasoning_ns",
    "first_answer_ns",
    "reasoning_tokens",
    "cached_prompt_tokens",
    "session_id",
    "turn_index",
)
COL = {name: i for i, name in enumerate(SAMPLE_COLUMNS)}
# The columns of the first columnar blobs (and of the old per-sample `samples` table).
LEGACY_COLUMNS = SAMPLE_COLUMNS[:13]

# An export cursor is one integer: (batch pk << 32) | offset of the last sample exported.
_OFFSET_BITS = 32
_OFFSET_MASK = (1 << _OFFSET_BITS) - 1

Table = npt.NDArray[np.int64]  # (len(SAMPLE_COLUMNS), n)


def pack(table: Table) -> bytes:
    """A batch's (19, n) int64 table as the stored blob."""
    return np.ascontiguousarray(table, dtype="<i8").tobytes()


def stored_rows(blob: bytes, n: int) -> int:
    """How many of the `SAMPLE_COLUMNS` a batch's blob holds (the first ones, in order)."""
    if not n:
        return len(SAMPLE_COLUMNS)
    rows, rest = divmod(len(blob), 8 * n)
    if rest or not len(LEGACY_COLUMNS) <= rows <= len(SAMPLE_COLUMNS):
        raise ValueError(f"a sample blob of {len(blob)} bytes does not hold {n} samples' columns")
    return rows


def unpack(blob: bytes, n: int) -> Table:
    """The stored blob of a batch of `n` samples as a read-only (19, n) int64 table (a view
    when the blob holds every column; columns it predates are 0)."""
    rows = stored_rows(blob, n)
    stored = np.frombuffer(blob, dtype="<i8").reshape(rows, n)
    if rows == len(SAMPLE_COLUMNS):
        return stored
    table = np.zeros((len(SAMPLE_COLUMNS), n), dtype=np.int64)
    table[:rows] = stored
    table.flags.writeable = False
    return table


def unpack_many(blobs: Sequence[bytes], counts: Sequence[int]) -> Table:
    """Several batches' blobs as one (19, total) table, batches in the given order."""
    if not blobs:
        return np.zeros((len(SAMPLE_COLUMNS), 0), dtype=np.int64)
    return np.concatenate([unpack(b, n) for b, n in zip(blobs, counts, strict=True)], axis=1).astype(
        np.int64, copy=False
    )


def read_stage(
    conn: sqlite3.Connection, run_pk: int, stage_idx: int, assignment_order: Sequence[int]
) -> tuple[Table, Table, list[int], list[int]]:
    """A stage's samples, assignment after assignment in `assignment_order` (pks), each one's
    batches in their order: (the (19, n) table, the pooled inter-token gaps, each batch's
    assignment pk, each batch's sample count).

    Reading by assignment (the (assignment_pk, batch_seq) index, no sort) keeps each agent's
    samples contiguous, so the per-agent rows of a result are slices of the stage's arrays
    rather than copies gathered from batches interleaved in storage order. The totals are read
    first (`length()` of a blob does not read its content), so every batch is copied once,
    straight into its place; iterating a cursor keeps one batch's bytes alive at a time.
    """
    where = "FROM sample_batches WHERE run_pk = ? AND stage_idx = ?"
    total, gap_bytes = conn.execute(
        f"SELECT COALESCE(SUM(n_samples), 0), COALESCE(SUM(length(itl_ns)), 0) {where}", (run_pk, stage_idx)
    ).fetchone()
    table = np.empty((len(SAMPLE_COLUMNS), int(total)), dtype=np.int64)
    itl = np.empty(int(gap_bytes) // 8, dtype=np.int64)
    assignments: list[int] = []
    counts: list[int] = []
    at = gap_at = 0
    for assignment_pk in assignment_order:
        for n, blob, gaps in conn.execute(
            f"SELECT n_samples, sample_columns, itl_ns {where} AND assignment_pk = ? ORDER BY batch_seq",
            (run_pk, stage_idx, assignment_pk),
        ):
            rows = stored_rows(blob, n)
            table[:rows, at : at + n] = np.frombuffer(blob, dtype="<i8").reshape(rows, n)
            table[rows:, at : at + n] = 0
            k = len(gaps) // 8
            itl[gap_at : gap_at + k] = np.frombuffer(gaps, dtype="<i8")
            at, gap_at = at + n, gap_at + k
            assignments.append(int(assignment_pk))
            counts.append(int(n))
    return table[:, :at], itl[:gap_at], assignments, counts


def tally(table: Table) -> tuple[int, int, int]:
    """(ok, failed, output tokens of the OK ones) over a batch's non-warmup samples."""
    counted = counted_mask(table[COL["flags"]])
    ok = counted & (table[COL["status"]] == RequestStatus.OK)
    n_ok = int(np.count_nonzero(ok))
    return n_ok, int(np.count_nonzero(counted)) - n_ok, int(table[COL["output_tokens"]][ok].sum())


def cursor(batch_pk: int, offset: int) -> int:
    """The export cursor of the sample at `offset` in batch `batch_pk`."""
    return (batch_pk << _OFFSET_BITS) | offset


def split_cursor(value: int) -> tuple[int, int]:
    """(batch pk, offset) of an export cursor; (0, 0) is "before the first sample"."""
    return value >> _OFFSET_BITS, value & _OFFSET_MASK


# The columns an export row carries after its agent session (ExportedSample's fields 200-),
# each 0 where the stored table has no such column.
EXPORT_EXTRA_COLUMNS = (
    "first_reasoning_ns",
    "first_answer_ns",
    "reasoning_tokens",
    "cached_prompt_tokens",
    "session_id",
    "turn_index",
)


def export_rows(
    conn: sqlite3.Connection, run_pk: int, after: int, limit: int, include_warmup: bool
) -> list[tuple[object, ...]]:
    """Up to `limit` samples after cursor `after`, in storage order, as export rows:
    (cursor, stage, agent name, sent, queue delay, first byte, first token, last token, done,
    prompt tokens, output tokens, status, flags, itl_count, error, agent session, then the
    EXPORT_EXTRA_COLUMNS)."""
    after_pk, after_offset = split_cursor(after)
    batches = conn.execute(
        "SELECT b.pk, b.stage_idx, b.n_samples, b.sample_columns, a.agent_name, a.agent_session"
        " FROM sample_batches b JOIN assignments a ON a.pk = b.assignment_pk"
        " WHERE b.run_pk = ? AND b.pk >= ? ORDER BY b.pk",
        (run_pk, after_pk),
    )
    out: list[tuple[object, ...]] = []
    wanted = [COL[c] for c in SAMPLE_COLUMNS[:11]]
    extra = [COL.get(c) for c in EXPORT_EXTRA_COLUMNS]
    for batch_pk, stage, n, blob, agent, session in batches:
        table = unpack(blob, n)
        start = after_offset + 1 if batch_pk == after_pk else 0
        offsets = np.arange(start, n)
        if not include_warmup:
            offsets = offsets[counted_mask(table[COL["flags"], offsets])]
        offsets = offsets[: limit - len(out)]
        if not offsets.size:
            continue
        errors = dict(
            conn.execute(
                "SELECT idx, error FROM sample_errors WHERE batch_pk = ? AND idx BETWEEN ? AND ?",
                (batch_pk, int(offsets[0]), int(offsets[-1])),
            ).fetchall()
        )
        values: list[list[Any]] = table[wanted][:, offsets].T.tolist()
        zeros = [0] * offsets.size
        extras = list(zip(*(zeros if c is None else table[c, offsets].tolist() for c in extra), strict=True))
        for i, v, x in zip(offsets.tolist(), values, extras, strict=True):
            # v: sent, queue, first_byte, first_token, last_token, done, prompt, output, status, flags, itl_count
            out.append((cursor(batch_pk, i), stage, agent, *v, errors.get(i, ""), session, *x))
        if len(out) >= limit:
            break
    return out


# --- migration 7 --------------------------------------------------------------------------

_MIGRATION_DDL = (
    "ALTER TABLE sample_batches ADD COLUMN sample_columns BLOB NOT NULL DEFAULT x''",
    "CREATE TABLE sample_errors ("
    " batch_pk INTEGER NOT NULL REFERENCES sample_batches (pk) ON DELETE CASCADE,"
    " idx INTEGER NOT NULL, error TEXT NOT NULL, PRIMARY KEY (batch_pk, idx)) WITHOUT ROWID",
    # The spec in protobuf binary form: ListRuns decodes it far faster than it parses the JSON
    # (BENCHMARKS.md, section 6). Empty for a run whose spec could not be converted (JSON is used).
    "ALTER TABLE runs ADD COLUMN spec_pb BLOB NOT NULL DEFAULT x''",
)


def migrate_to_columnar(conn: sqlite3.Connection) -> None:
    """Migration 7: per-sample rows become one column blob per batch; runs get `spec_pb`.

    Runs inside the migration's transaction; existing samples keep their order, values and
    error messages.
    """
    for statement in _MIGRATION_DDL:
        conn.execute(statement)
    # The old table has the legacy columns; their blobs read with the later ones as 0.
    names = ", ".join(LEGACY_COLUMNS)
    batches = conn.execute("SELECT pk FROM sample_batches ORDER BY pk").fetchall()
    for (batch_pk,) in batches:
        rows = conn.execute(
            f"SELECT {names}, error FROM samples WHERE batch_pk = ? ORDER BY rowid", (batch_pk,)
        ).fetchall()
        table = np.array([r[:-1] for r in rows], dtype=np.int64).reshape(len(rows), len(LEGACY_COLUMNS)).T
        conn.execute(
            "UPDATE sample_batches SET sample_columns = ?, n_samples = ? WHERE pk = ?",
            (pack(table), len(rows), batch_pk),
        )
        conn.executemany(
            "INSERT INTO sample_errors (batch_pk, idx, error) VALUES (?, ?, ?)",
            ((batch_pk, i, r[-1]) for i, r in enumerate(rows) if r[-1]),
        )
    conn.execute("DROP TABLE samples")
    _backfill_spec_pb(conn)


def _backfill_spec_pb(conn: sqlite3.Connection) -> None:
    from google.protobuf import json_format  # only this migration step needs protos

    from common.proto.loadtest.v1 import run_pb2

    for pk, spec_json in conn.execute("SELECT pk, spec_json FROM runs").fetchall():
        try:
            spec = json_format.Parse(spec_json, run_pb2.RunSpec())
        except json_format.ParseError:
            continue  # stays empty: read through the JSON as before
        conn.execute("UPDATE runs SET spec_pb = ? WHERE pk = ?", (spec.SerializeToString(), pk))
