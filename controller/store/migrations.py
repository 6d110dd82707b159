"""Numbered schema migrations, applied in order inside one transaction each.

The schema is written out as SQL (not derived from the Peewee models) so a migration
always means the same thing, whatever the models look like later. `schema_migrations`
records which numbers have been applied; never edit an applied migration, add one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from peewee import Database

from controller.store.columnar import migrate_to_columnar

# A migration is SQL, or a function run on the connection inside the migration's transaction
# (for a data conversion SQL cannot express).
MIGRATIONS: Sequence[tuple[int, str, str | Callable[[Database], None]]] = (
    (
        1,
        "initial schema",
        """
        CREATE TABLE runs (
            pk INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL UNIQUE,
            request_id TEXT UNIQUE,
            display_name TEXT NOT NULL DEFAULT '',
            model TEXT NOT NULL,
            state INTEGER NOT NULL,
            state_reason TEXT NOT NULL DEFAULT '',
            spec_json TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            started_at INTEGER,
            ended_at INTEGER,
            current_stage INTEGER NOT NULL DEFAULT 0,
            requests_ok INTEGER NOT NULL DEFAULT 0,
            requests_failed INTEGER NOT NULL DEFAULT 0,
            output_tokens INTEGER NOT NULL DEFAULT 0
        );
        CREATE INDEX runs_created_at ON runs (created_at DESC, pk DESC);
        CREATE INDEX runs_state ON runs (state);
        CREATE INDEX runs_state_created_at ON runs (state, created_at DESC, pk DESC);
        CREATE INDEX runs_model ON runs (model, created_at DESC, pk DESC);

        -- Target API keys live apart from the spec and are erased when the run ends.
        CREATE TABLE run_secrets (
            run_pk INTEGER PRIMARY KEY REFERENCES runs (pk) ON DELETE CASCADE,
            target_api_key TEXT NOT NULL
        );

        CREATE TABLE stages (
            pk INTEGER PRIMARY KEY,
            run_pk INTEGER NOT NULL REFERENCES runs (pk) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            name TEXT NOT NULL,
            started_at INTEGER,
            ended_at INTEGER,
            UNIQUE (run_pk, idx)
        );

        CREATE TABLE agents (
            session_id TEXT PRIMARY KEY,
            name TEXT NOT NULL,
            labels_json TEXT NOT NULL,
            version TEXT NOT NULL,
            connected_at INTEGER NOT NULL,
            disconnected_at INTEGER
        );

        CREATE TABLE assignments (
            pk INTEGER PRIMARY KEY,
            assignment_id TEXT NOT NULL UNIQUE,
            run_pk INTEGER NOT NULL REFERENCES runs (pk) ON DELETE CASCADE,
            stage_idx INTEGER NOT NULL,
            agent_session TEXT NOT NULL,
            agent_name TEXT NOT NULL,
            concurrency INTEGER NOT NULL,
            requests INTEGER NOT NULL,
            state INTEGER NOT NULL,
            message TEXT NOT NULL DEFAULT '',
            batch_count INTEGER,
            requests_sent INTEGER NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL,
            ended_at INTEGER
        );
        CREATE INDEX assignments_run ON assignments (run_pk, stage_idx);

        -- One row per received batch; the unique key makes replayed batches harmless.
        -- Inter-token gaps of the whole batch are one blob of little-endian int64.
        CREATE TABLE sample_batches (
            pk INTEGER PRIMARY KEY,
            assignment_pk INTEGER NOT NULL REFERENCES assignments (pk) ON DELETE CASCADE,
            batch_seq INTEGER NOT NULL,
            run_pk INTEGER NOT NULL REFERENCES runs (pk) ON DELETE CASCADE,
            stage_idx INTEGER NOT NULL,
            n_samples INTEGER NOT NULL,
            itl_ns BLOB NOT NULL,
            UNIQUE (assignment_pk, batch_seq)
        );
        CREATE INDEX sample_batches_run ON sample_batches (run_pk, stage_idx);

        CREATE TABLE samples (
            run_pk INTEGER NOT NULL REFERENCES runs (pk) ON DELETE CASCADE,
            stage_idx INTEGER NOT NULL,
            batch_pk INTEGER NOT NULL REFERENCES sample_batches (pk) ON DELETE CASCADE,
            sent_unix_ns INTEGER NOT NULL,
            queue_delay_ns INTEGER NOT NULL,
            first_byte_ns INTEGER NOT NULL,
            first_token_ns INTEGER NOT NULL,
            last_token_ns INTEGER NOT NULL,
            done_ns INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            output_tokens INTEGER NOT NULL,
            status INTEGER NOT NULL,
            flags INTEGER NOT NULL,
            itl_count INTEGER NOT NULL,
            error TEXT NOT NULL
        );
        CREATE INDEX samples_run_stage ON samples (run_pk, stage_idx);
        CREATE INDEX samples_batch ON samples (batch_pk);

        CREATE TABLE run_events (
            pk INTEGER PRIMARY KEY,
            run_pk INTEGER NOT NULL REFERENCES runs (pk) ON DELETE CASCADE,
            time_ns INTEGER NOT NULL,
            kind TEXT NOT NULL,
            message TEXT NOT NULL
        );
        CREATE INDEX run_events_run ON run_events (run_pk, pk);
        """,
    ),
    (
        2,
        "parsed datasets of runs",
        """
        -- The parsed entries a run's agents draw prompts from (JSON list), stored apart
        -- from the spec so reads of the run stay small.
        CREATE TABLE run_datasets (
            run_pk INTEGER PRIMARY KEY REFERENCES runs (pk) ON DELETE CASCADE,
            entries_json TEXT NOT NULL
        );
        """,
    ),
    (
        3,
        "requested lengths per sample, load-generator health per assignment",
        """
        ALTER TABLE samples ADD COLUMN requested_input_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE samples ADD COLUMN requested_output_tokens INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE assignments ADD COLUMN max_loop_lag_ms REAL NOT NULL DEFAULT 0;
        ALTER TABLE assignments ADD COLUMN max_cpu_percent REAL NOT NULL DEFAULT 0;
        """,
    ),
    (
        4,
        "fleet: synchronized starts, takeovers, lost agents",
        """
        -- planned_start_ns / started_ns: controller clock; started_ns is the agent's
        -- reported start corrected by its estimated clock offset.
        ALTER TABLE assignments ADD COLUMN planned_start_ns INTEGER;
        ALTER TABLE assignments ADD COLUMN started_ns INTEGER;
        ALTER TABLE assignments ADD COLUMN clock_offset_ns INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE assignments ADD COLUMN takeover INTEGER NOT NULL DEFAULT 0;
        ALTER TABLE stages ADD COLUMN reduced_load_reason TEXT NOT NULL DEFAULT '';
        """,
    ),
    (
        5,
        "security: API keys with roles, audit log",
        """
        -- A key is `llt_<key_id>_<secret>`; only a SHA-256 digest of the secret is kept.
        CREATE TABLE api_keys (
            key_id TEXT PRIMARY KEY,
            secret_sha256 BLOB NOT NULL,
            role TEXT NOT NULL,
            name TEXT NOT NULL,
            created_at INTEGER NOT NULL,
            expires_at INTEGER,
            revoked_at INTEGER
        );

        -- Every mutating call and every refused call.
        CREATE TABLE audit_events (
            pk INTEGER PRIMARY KEY,
            time_ns INTEGER NOT NULL,
            key_id TEXT NOT NULL,
            method TEXT NOT NULL,
            run_id TEXT NOT NULL,
            outcome TEXT NOT NULL,
            request_id TEXT NOT NULL,
            peer TEXT NOT NULL,
            detail TEXT NOT NULL
        );
        CREATE INDEX audit_events_key ON audit_events (key_id, pk);
        CREATE INDEX audit_events_run ON audit_events (run_id, pk);
        """,
    ),
    (
        6,
        "server metrics: scrapes of the model server's Prometheus endpoints",
        """
        -- One row per scrape (failed ones carry `error`), stored with the sample batch that
        -- brought it, so a replayed batch adds nothing twice.
        CREATE TABLE server_scrapes (
            pk INTEGER PRIMARY KEY,
            run_pk INTEGER NOT NULL REFERENCES runs (pk) ON DELETE CASCADE,
            stage_idx INTEGER NOT NULL,
            batch_pk INTEGER NOT NULL REFERENCES sample_batches (pk) ON DELETE CASCADE,
            endpoint TEXT NOT NULL,
            time_unix_ns INTEGER NOT NULL,
            error TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX server_scrapes_stage ON server_scrapes (run_pk, stage_idx, endpoint, time_unix_ns);
        CREATE INDEX server_scrapes_batch ON server_scrapes (batch_pk);

        -- The gauge and counter values of successful scrapes (kind: loadtest.v1.ServerMetricKind).
        CREATE TABLE server_metric_values (
            scrape_pk INTEGER NOT NULL REFERENCES server_scrapes (pk) ON DELETE CASCADE,
            name TEXT NOT NULL,
            labels TEXT NOT NULL,
            kind INTEGER NOT NULL,
            value REAL NOT NULL
        );
        CREATE INDEX server_metric_values_scrape ON server_metric_values (scrape_pk);
        """,
    ),
    (
        7,
        "columnar samples: one column blob per batch, errors apart; binary run specs",
        # See controller/store/columnar.py: converts every stored sample, drops `samples`.
        # Before it a sample was a row of `samples` (migrations 1 and 3), its gaps in its
        # batch's `itl_ns` blob as now, and a run's spec was only `spec_json`. The conversion
        # keeps the samples' order (the old rowid order is the new batch pk, then offset) and
        # fills `spec_pb` for every run whose JSON parses; a run whose JSON does not keeps an
        # empty `spec_pb` and is read through `spec_json`.
        lambda db: migrate_to_columnar(db.connection()),
    ),
    (
        8,
        "stored results of final runs",
        """
        -- A final run's result as the API returns it (a serialized loadtest.v1.RunResult),
        -- computed once when the run ends. It is valid while the run's state, its stored
        -- batches (count, highest pk) and the computation's format (RESULT_FORMAT in
        -- controller/domain/results/provider.py) are still the ones it was computed at.
        CREATE TABLE run_results (
            run_pk INTEGER PRIMARY KEY REFERENCES runs (pk) ON DELETE CASCADE,
            state INTEGER NOT NULL,
            batches INTEGER NOT NULL,
            last_batch_pk INTEGER NOT NULL,
            format INTEGER NOT NULL,
            result BLOB NOT NULL
        );
        """,
    ),
    (
        9,
        "assignment resume tokens",
        """
        -- SHA-256 (hex) of the secret sent in an assignment's Assign: a reconnecting agent
        -- presents the secret to resume the assignment (empty: from before migration 9,
        -- cannot be resumed).
        ALTER TABLE assignments ADD COLUMN resume_token_sha256 TEXT NOT NULL DEFAULT '';
        """,
    ),
    (
        10,
        "aggregated refusals in the audit log",
        """
        -- How many calls a row stands for: 1 for a mutating call; refused calls of one
        -- address, key id, method and outcome share one row per minute.
        ALTER TABLE audit_events ADD COLUMN count INTEGER NOT NULL DEFAULT 1;
        """,
    ),
    (
        11,
        "lost assignments stored as ASSIGNMENT_STATE_LOST",
        """
        -- An assignment whose agent was lost was stored with state -1, a number outside
        -- loadtest.v1.AssignmentState; it is that enum's ASSIGNMENT_STATE_LOST (5) from now on.
        UPDATE assignments SET state = 5 WHERE state = -1;
        """,
    ),
    (
        12,
        "series of runs and their baselines",
        """
        -- The series a run belongs to (RunSpec.series, '' for none), kept apart from the spec so
        -- a series' runs are one index range. Runs stored before: from their JSON spec when it
        -- names one (no released controller wrote one, so this is normally '').
        ALTER TABLE runs ADD COLUMN series TEXT NOT NULL DEFAULT '';
        UPDATE runs SET series = json_extract(spec_json, '$.series')
            WHERE CASE WHEN json_valid(spec_json) THEN json_type(spec_json, '$.series') = 'text' ELSE 0 END;
        CREATE INDEX runs_series ON runs (series, created_at DESC, pk DESC);

        -- The baseline of each series: a run's id or a group's id (`grp_...`), so no foreign
        -- key; deleting a run deletes the baselines that name it (repository.delete_run).
        CREATE TABLE baselines (
            name TEXT PRIMARY KEY,
            run_id TEXT NOT NULL,
            set_at_ns INTEGER NOT NULL,
            set_by_key_id TEXT NOT NULL DEFAULT ''
        );
        CREATE INDEX baselines_run ON baselines (run_id);
        """,
    ),
    (
        13,
        "groups of repeats",
        """
        -- A group of repeats (CreateRunRequest.repeat): its runs share `group_id` (`grp_...`;
        -- NULL for a run created alone) and are numbered from 0 by `repeat_index`. The index
        -- is partial (only grouped runs), and a query's `group_id = ?` implies its condition,
        -- so ListRuns of a group seeks it by (created_at, pk) as the other filters do.
        ALTER TABLE runs ADD COLUMN group_id TEXT;
        ALTER TABLE runs ADD COLUMN repeat_index INTEGER NOT NULL DEFAULT 0;
        CREATE INDEX runs_group ON runs (group_id, created_at DESC, pk DESC) WHERE group_id IS NOT NULL;
        """,
    ),
    (
        14,
        "uploaded datasets",
        """
        -- Datasets, traces and tokenizers uploaded once (DatasetService) and referred to by id
        -- from runs. `id` (`ds_...`, content-addressed) is NULL while the upload is under way:
        -- its chunks are written as they arrive, and the row gets its id, size and digest in
        -- the transaction that completes the upload; a failed upload's row is deleted with its
        -- chunks (and the controller deletes rows left without an id when it starts).
        CREATE TABLE datasets (
            pk INTEGER PRIMARY KEY,
            id TEXT UNIQUE,
            name TEXT NOT NULL DEFAULT '',
            format INTEGER NOT NULL,
            size INTEGER NOT NULL DEFAULT 0,
            sha256 TEXT NOT NULL DEFAULT '',
            entry_count INTEGER NOT NULL DEFAULT 0,
            span_s REAL NOT NULL DEFAULT 0,
            created_at INTEGER NOT NULL
        );
        CREATE INDEX datasets_created_at ON datasets (created_at DESC, pk DESC);
        -- The content in order, each blob at most 1 MiB.
        CREATE TABLE dataset_chunks (
            dataset_pk INTEGER NOT NULL REFERENCES datasets (pk) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            blob BLOB NOT NULL,
            PRIMARY KEY (dataset_pk, seq)
        ) WITHOUT ROWID;
        """,
    ),
)


def apply_migrations(db: Database) -> list[int]:
    """Apply every migration not yet recorded; returns the numbers applied now."""
    db.execute_sql(
        "CREATE TABLE IF NOT EXISTS schema_migrations ("
        " version INTEGER PRIMARY KEY, description TEXT NOT NULL, applied_at INTEGER NOT NULL)"
    )
    done = {row[0] for row in db.execute_sql("SELECT version FROM schema_migrations")}
    applied: list[int] = []
    for version, description, sql in MIGRATIONS:
        if version in done:
            continue
        with db.atomic():
            if callable(sql):
                sql(db)
            else:
                for statement in _statements(sql):
                    db.execute_sql(statement)
            db.execute_sql(
                "INSERT INTO schema_migrations (version, description, applied_at) VALUES (?, ?, ?)",
                (version, description, time.time_ns()),
            )
        applied.append(version)
    return applied


def _statements(sql: str) -> list[str]:
    lines = [line for line in sql.splitlines() if not line.strip().startswith("--")]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
