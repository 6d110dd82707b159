"""Repository functions for uploaded datasets (jobs for `Database.write`/`read`, as in
`repository`).

An upload is a row without an id (`begin_dataset_upload`), its chunks appended as they arrive
(`append_dataset_chunk`, one write each), then either completed (`finish_dataset_upload`: the
row gets its content-addressed id, or, when that id is already stored, the new row and its
chunks are deleted and the stored one returned) or discarded (`discard_dataset_upload`). Reads
see only completed datasets.
"""

from __future__ import annotations

from dataclasses import dataclass

from common.codes import RunState
from controller.store.models import database_proxy

MAX_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class DatasetRecord:
    """A stored dataset (never its content)."""

    pk: int
    dataset_id: str
    name: str
    format: int
    size: int
    sha256: str
    entry_count: int
    span_s: float
    created_at: int
    chunks: int = 0


# A ListDatasets page: the datasets and the (created_at, pk) of the last when more follow.
DatasetsPage = tuple[list[DatasetRecord], tuple[int, int] | None]

_COLUMNS = "pk, id, name, format, size, sha256, entry_count, span_s, created_at"
_ACTIVE = (int(RunState.PENDING), int(RunState.RUNNING))


def _record(row: tuple[object, ...], chunks: int = 0) -> DatasetRecord:
    pk, dataset_id, name, fmt, size, sha256, entry_count, span_s, created_at = row
    return DatasetRecord(
        int(pk),  # type: ignore[call-overload]
        str(dataset_id),
        str(name),
        int(fmt),  # type: ignore[call-overload]
        int(size),  # type: ignore[call-overload]
        str(sha256),
        int(entry_count),  # type: ignore[call-overload]
        float(span_s),  # type: ignore[arg-type]
        int(created_at),  # type: ignore[call-overload]
        chunks,
    )


def begin_dataset_upload(name: str, fmt: int, now_ns: int) -> int:
    """A new upload's row (no id yet); returns its pk."""
    cursor = database_proxy.execute_sql(
        "INSERT INTO datasets (id, name, format, created_at) VALUES (NULL, ?, ?, ?)", (name, fmt, now_ns)
    )
    return int(cursor.lastrowid)


def append_dataset_chunk(dataset_pk: int, seq: int, blob: bytes) -> None:
    """Chunk `seq` (from 0) of an upload, at most MAX_CHUNK_BYTES."""
    if len(blob) > MAX_CHUNK_BYTES:
        raise ValueError(f"a dataset chunk is at most {MAX_CHUNK_BYTES} bytes")
    database_proxy.execute_sql(
        "INSERT INTO dataset_chunks (dataset_pk, seq, blob) VALUES (?, ?, ?)", (dataset_pk, seq, blob)
    )


def finish_dataset_upload(
    dataset_pk: int, dataset_id: str, size: int, sha256: str, entry_count: int, span_s: float
) -> tuple[DatasetRecord, bool]:
    """Complete an upload under its id: (the dataset, False); or when that id is already stored,
    delete the upload and return (the stored dataset, True)."""
    row = database_proxy.execute_sql(f"SELECT {_COLUMNS} FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
    if row is not None:
        discard_dataset_upload(dataset_pk)
        return _record(row), True
    database_proxy.execute_sql(
        "UPDATE datasets SET id = ?, size = ?, sha256 = ?, entry_count = ?, span_s = ? WHERE pk = ? AND id IS NULL",
        (dataset_id, size, sha256, entry_count, span_s, dataset_pk),
    )
    record = get_dataset(dataset_id)
    if record is None:
        raise LookupError(f"no upload {dataset_pk} under way")
    return record, False


def discard_dataset_upload(dataset_pk: int) -> None:
    """Delete an upload under way and its chunks (a completed dataset stays)."""
    database_proxy.execute_sql(
        "DELETE FROM dataset_chunks WHERE dataset_pk = (SELECT pk FROM datasets WHERE pk = ? AND id IS NULL)",
        (dataset_pk,),
    )
    database_proxy.execute_sql("DELETE FROM datasets WHERE pk = ? AND id IS NULL", (dataset_pk,))


def discard_incomplete_uploads() -> int:
    """Delete the uploads a stopped controller left unfinished; returns how many."""
    pks = [r[0] for r in database_proxy.execute_sql("SELECT pk FROM datasets WHERE id IS NULL")]
    for pk in pks:
        discard_dataset_upload(pk)
    return len(pks)


def get_dataset(dataset_id: str) -> DatasetRecord | None:
    """A completed dataset with its number of chunks, or None."""
    row = database_proxy.execute_sql(f"SELECT {_COLUMNS} FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
    if row is None:
        return None
    chunks = database_proxy.execute_sql("SELECT COUNT(*) FROM dataset_chunks WHERE dataset_pk = ?", (row[0],))
    return _record(row, int(chunks.fetchone()[0]))


def list_datasets(limit: int, after: tuple[int, int] | None, fmt: int) -> DatasetsPage:
    """Completed datasets, newest first, after (created_at, pk) of a previous page; `fmt` 0: any."""
    where = ["id IS NOT NULL"]
    params: list[object] = []
    if fmt:
        where.append("format = ?")
        params.append(fmt)
    if after is not None:
        where.append("(created_at < ? OR (created_at = ? AND pk < ?))")
        params += [after[0], after[0], after[1]]
    rows = database_proxy.execute_sql(
        f"SELECT {_COLUMNS} FROM datasets WHERE {' AND '.join(where)} ORDER BY created_at DESC, pk DESC LIMIT ?",
        (*params, limit + 1),
    ).fetchall()
    records = [_record(r) for r in rows[:limit]]
    more = len(rows) > limit
    return records, ((records[-1].created_at, records[-1].pk) if more and records else None)


def read_dataset_chunks(dataset_pk: int, from_seq: int, limit: int) -> list[bytes]:
    """Up to `limit` chunks of a dataset from `seq` on, in order."""
    rows = database_proxy.execute_sql(
        "SELECT blob FROM dataset_chunks WHERE dataset_pk = ? AND seq >= ? ORDER BY seq LIMIT ?",
        (dataset_pk, from_seq, limit),
    )
    return [bytes(r[0]) for r in rows]


def dataset_user(dataset_id: str) -> str:
    """The id of a pending or running run whose spec refers to the dataset, or ""."""
    row = database_proxy.execute_sql(
        "SELECT run_id FROM runs WHERE state IN (?, ?) AND instr(spec_json, ?) > 0 LIMIT 1",
        (*_ACTIVE, dataset_id),
    ).fetchone()
    return str(row[0]) if row is not None else ""


def delete_dataset(dataset_id: str) -> tuple[bool, str]:
    """Delete a dataset unless a pending or running run refers to it: (it existed, the id of
    such a run or "" when it was deleted)."""
    row = database_proxy.execute_sql("SELECT pk FROM datasets WHERE id = ?", (dataset_id,)).fetchone()
    if row is None:
        return False, ""
    user = dataset_user(dataset_id)
    if user:
        return True, user
    database_proxy.execute_sql("DELETE FROM dataset_chunks WHERE dataset_pk = ?", (row[0],))
    database_proxy.execute_sql("DELETE FROM datasets WHERE pk = ?", (row[0],))
    return True, ""
