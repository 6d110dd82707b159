"""Peewee models over the schema in migrations.py (the migrations own the DDL).

Times are integers: nanoseconds since the Unix epoch (controller clock).
"""

from __future__ import annotations

from peewee import (
    AutoField,
    BlobField,
    CharField,
    DatabaseProxy,
    FloatField,
    ForeignKeyField,
    IntegerField,
    Model,
    TextField,
)

database_proxy = DatabaseProxy()


class BaseModel(Model):
    class Meta:
        database = database_proxy


class RunRow(BaseModel):
    pk = AutoField()
    run_id = CharField(unique=True)
    request_id = CharField(null=True, unique=True)
    display_name = TextField(default="")
    model = TextField()
    state = IntegerField()
    state_reason = TextField(default="")
    spec_json = TextField()
    created_at = IntegerField()
    started_at = IntegerField(null=True)
    ended_at = IntegerField(null=True)
    current_stage = IntegerField(default=0)
    requests_ok = IntegerField(default=0)
    requests_failed = IntegerField(default=0)
    output_tokens = IntegerField(default=0)
    spec_pb = BlobField(default=b"")  # migration 7: the spec as protobuf binary
    series = TextField(default="")  # migration 12: RunSpec.series
    group_id = CharField(null=True)  # migration 13: its group of repeats (NULL: none)
    repeat_index = IntegerField(default=0)  # migration 13

    class Meta:
        table_name = "runs"


class RunSecretRow(BaseModel):
    run = ForeignKeyField(RunRow, column_name="run_pk", primary_key=True, on_delete="CASCADE")
    target_api_key = TextField()

    class Meta:
        table_name = "run_secrets"


class StageRow(BaseModel):
    pk = AutoField()
    run = ForeignKeyField(RunRow, column_name="run_pk", on_delete="CASCADE")
    idx = IntegerField()
    name = TextField()
    started_at = IntegerField(null=True)
    ended_at = IntegerField(null=True)
    reduced_load_reason = TextField(default="")

    class Meta:
        table_name = "stages"


class AgentRow(BaseModel):
    session_id = CharField(primary_key=True)
    name = TextField()
    labels_json = TextField()
    version = TextField()
    connected_at = IntegerField()
    disconnected_at = IntegerField(null=True)

    class Meta:
        table_name = "agents"


class AssignmentRow(BaseModel):
    pk = AutoField()
    assignment_id = CharField(unique=True)
    run = ForeignKeyField(RunRow, column_name="run_pk", on_delete="CASCADE")
    stage_idx = IntegerField()
    agent_session = TextField()
    agent_name = TextField()
    concurrency = IntegerField()
    requests = IntegerField()
    state = IntegerField()
    message = TextField(default="")
    batch_count = IntegerField(null=True)
    requests_sent = IntegerField(default=0)
    created_at = IntegerField()
    ended_at = IntegerField(null=True)
    max_loop_lag_ms = FloatField(default=0.0)
    max_cpu_percent = FloatField(default=0.0)
    planned_start_ns = IntegerField(null=True)
    started_ns = IntegerField(null=True)
    clock_offset_ns = IntegerField(default=0)
    takeover = IntegerField(default=0)
    resume_token_sha256 = TextField(default="")  # migration 9

    class Meta:
        table_name = "assignments"


class SampleBatchRow(BaseModel):
    pk = AutoField()
    assignment = ForeignKeyField(AssignmentRow, column_name="assignment_pk", on_delete="CASCADE")
    batch_seq = IntegerField()
    run = ForeignKeyField(RunRow, column_name="run_pk", on_delete="CASCADE")
    stage_idx = IntegerField()
    n_samples = IntegerField()
    itl_ns = BlobField()
    sample_columns = BlobField(default=b"")  # migration 7: see controller/store/columnar.py

    class Meta:
        table_name = "sample_batches"


class RunEventRow(BaseModel):
    pk = AutoField()
    run = ForeignKeyField(RunRow, column_name="run_pk", on_delete="CASCADE")
    time_ns = IntegerField()
    kind = TextField()
    message = TextField()

    class Meta:
        table_name = "run_events"
