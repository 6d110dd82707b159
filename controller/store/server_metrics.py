"""Storage of server-metric scrapes (migration 6): written with their sample batch, read per stage.

`insert_scrapes` runs inside `repository.ingest_batches`' transaction, only for a batch stored
for the first time, so a replayed batch adds neither scrapes nor events twice. It also writes
the run events of scrape failures: one when an endpoint starts failing (or fails differently)
and one when it recovers, not one per failed scrape.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass

from controller.store.models import database_proxy

EVENT_SCRAPE_FAILED = "server_metrics_scrape_failed"
EVENT_SCRAPE_RECOVERED = "server_metrics_scrape_recovered"


@dataclass(frozen=True)
class ScrapeRow:
    """One scrape to store: values as (name, labels, kind, value), or an error."""

    endpoint: str
    time_unix_ns: int
    error: str
    values: tuple[tuple[str, str, int, float], ...]


@dataclass(frozen=True)
class StoredScrape:
    pk: int
    endpoint: str
    time_unix_ns: int
    error: str


@dataclass(frozen=True)
class StageScrapes:
    """The scrapes of one stage in time order, and their values summed over label sets."""

    scrapes: list[StoredScrape]
    # (scrape pk, name, kind, sum of the values of every label set)
    values: list[tuple[int, str, int, float]]


def insert_scrapes(
    conn: sqlite3.Connection, run_pk: int, stage_idx: int, batch_pk: int, scrapes: Sequence[ScrapeRow]
) -> None:
    """Store the scrapes of a new batch, with run events for failures and recoveries."""
    now_ns = time.time_ns()
    for s in scrapes:
        previous = conn.execute(
            "SELECT error FROM server_scrapes WHERE run_pk = ? AND stage_idx = ? AND endpoint = ?"
            " ORDER BY time_unix_ns DESC, pk DESC LIMIT 1",
            (run_pk, stage_idx, s.endpoint),
        ).fetchone()
        before = None if previous is None else str(previous[0])
        event: tuple[str, str] | None = None
        if s.error and s.error != before:
            event = (EVENT_SCRAPE_FAILED, f"stage {stage_idx}: scraping {s.endpoint} failed: {s.error}")
        elif not s.error and before:
            event = (EVENT_SCRAPE_RECOVERED, f"stage {stage_idx}: scraping {s.endpoint} works again")
        if event is not None:
            conn.execute(
                "INSERT INTO run_events (run_pk, time_ns, kind, message) VALUES (?, ?, ?, ?)",
                (run_pk, now_ns, event[0], event[1]),
            )
        cur = conn.execute(
            "INSERT INTO server_scrapes (run_pk, stage_idx, batch_pk, endpoint, time_unix_ns, error)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (run_pk, stage_idx, batch_pk, s.endpoint, s.time_unix_ns, s.error),
        )
        scrape_pk = cur.lastrowid
        conn.executemany(
            "INSERT INTO server_metric_values (scrape_pk, name, labels, kind, value) VALUES (?, ?, ?, ?, ?)",
            ((scrape_pk, name, labels, kind, value) for name, labels, kind, value in s.values),
        )


def load_stage_scrapes(run_pk: int, stage_idx: int) -> StageScrapes:
    """Every scrape of one stage (time order) and the per-scrape sums of each metric."""
    conn = database_proxy.connection()
    scrapes = [
        StoredScrape(int(pk), str(endpoint), int(t), str(error))
        for pk, endpoint, t, error in conn.execute(
            "SELECT pk, endpoint, time_unix_ns, error FROM server_scrapes WHERE run_pk = ? AND stage_idx = ?"
            " ORDER BY time_unix_ns, pk",
            (run_pk, stage_idx),
        )
    ]
    values = [
        (int(pk), str(name), int(kind), float(total))
        for pk, name, kind, total in conn.execute(
            "SELECT v.scrape_pk, v.name, v.kind, SUM(v.value) FROM server_metric_values v"
            " JOIN server_scrapes s ON s.pk = v.scrape_pk WHERE s.run_pk = ? AND s.stage_idx = ?"
            " GROUP BY v.scrape_pk, v.name, v.kind",
            (run_pk, stage_idx),
        )
    ]
    return StageScrapes(scrapes, values)


def delete_run_scrapes(run_pk: int) -> None:
    """Bulk-delete a run's metric values (faster than cascading row by row)."""
    database_proxy.execute_sql(
        "DELETE FROM server_metric_values WHERE scrape_pk IN (SELECT pk FROM server_scrapes WHERE run_pk = ?)",
        (run_pk,),
    )
