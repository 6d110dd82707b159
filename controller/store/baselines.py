"""Repository functions for the baseline of each series (jobs for `Database.write`/`read`, as
in `repository`; the runs of a series are `repository.series_runs`).

A baseline names a run or a group of repeats by id, so the table has no foreign key to runs;
`repository.delete_run` deletes the baselines that name the deleted run.
"""

from __future__ import annotations

from dataclasses import dataclass

from controller.store.models import database_proxy


@dataclass(frozen=True)
class BaselineRecord:
    """The baseline of one series."""

    name: str
    run_id: str  # a run's id or a group's id (`grp_...`)
    set_at_ns: int
    set_by_key_id: str  # "" with authentication off


_COLUMNS = "name, run_id, set_at_ns, set_by_key_id"


def set_baseline(record: BaselineRecord) -> None:
    """Insert the series' baseline, or replace the one it had."""
    database_proxy.execute_sql(
        f"INSERT OR REPLACE INTO baselines ({_COLUMNS}) VALUES (?, ?, ?, ?)",
        (record.name, record.run_id, record.set_at_ns, record.set_by_key_id),
    )


def get_baseline(name: str) -> BaselineRecord | None:
    row = database_proxy.execute_sql(f"SELECT {_COLUMNS} FROM baselines WHERE name = ?", (name,)).fetchone()
    return BaselineRecord(*row) if row is not None else None


def list_baselines() -> list[BaselineRecord]:
    """Every baseline, by name."""
    return [
        BaselineRecord(*row) for row in database_proxy.execute_sql(f"SELECT {_COLUMNS} FROM baselines ORDER BY name")
    ]


def delete_baseline(name: str) -> bool:
    """True when the series had a baseline."""
    cursor = database_proxy.execute_sql("DELETE FROM baselines WHERE name = ?", (name,))
    return bool(cursor.rowcount)
