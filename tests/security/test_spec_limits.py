"""Big specs cannot starve readers (issue 13, items 4 and 9): a real controller over real gRPC
refuses specs past their limits with INVALID_ARGUMENT naming the field, pages ListRuns by bytes,
and still lists everything when a run stored before the limits is enormous."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from common.proto.loadtest.v1 import run_pb2, run_service_pb2, run_service_pb2_grpc
from controller.domain.runs import MAX_PAGE_BYTES
from controller.domain.spec import MAX_LABEL_KEY_CHARS, MAX_LABEL_VALUE_CHARS, MAX_LABELS, MAX_STORED_SPEC_BYTES
from tests.security.conftest import NO_LIMITS, ThreadedController

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[ThreadedController, Path]]:
    db = tmp_path / "limits.db"
    tc = ThreadedController(db, rate_limits=NO_LIMITS)
    try:
        yield tc, db
    finally:
        tc.close()


@pytest.fixture
def stub(served: tuple[ThreadedController, Path]) -> Iterator[run_service_pb2_grpc.RunServiceStub]:
    # gRPC's default limits (4 MiB received), as grpcurl and most clients have them.
    with grpc.insecure_channel(f"127.0.0.1:{served[0].port}") as channel:
        yield run_service_pb2_grpc.RunServiceStub(channel)


def _spec() -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec()
    spec.target.base_url = "http://127.0.0.1:9/v1"
    spec.target.model = "m"
    spec.stages.add(concurrency=1).duration.FromSeconds(5)
    spec.placement.selector["pool"] = "nobody"  # never placed: the runs stay PENDING
    return spec


def _refused_fields(stub: run_service_pb2_grpc.RunServiceStub, spec: run_pb2.RunSpec) -> list[str]:
    with pytest.raises(grpc.RpcError) as info:
        stub.CreateRun(run_service_pb2.CreateRunRequest(spec=spec), timeout=30)
    error = info.value
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, error.details()  # type: ignore[attr-defined]
    status = rpc_status.from_call(error)  # type: ignore[arg-type]
    assert status is not None
    fields = []
    for detail in status.details:
        bad = error_details_pb2.BadRequest()
        assert detail.Unpack(bad)
        fields += [v.field for v in bad.field_violations]
    return fields


def test_a_hundred_thousand_labels_are_refused(stub: run_service_pb2_grpc.RunServiceStub) -> None:
    spec = _spec()
    for i in range(100_000):
        spec.labels[f"k{i}"] = "v"
    assert _refused_fields(stub, spec) == ["spec.labels"]


@pytest.mark.parametrize(
    ("content", "fmt"),
    [
        ('{"prompt": "x", "n": ' + "[" * 50_000 + "]" * 50_000 + "}", run_pb2.DATASET_FORMAT_JSONL),
        ('{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}", run_pb2.DATASET_FORMAT_JSONL),
        ("[" * 50_000 + "]" * 50_000, run_pb2.DATASET_FORMAT_SHAREGPT),
    ],
)
def test_dataset_json_python_cannot_hold(stub: run_service_pb2_grpc.RunServiceStub, content: str, fmt: int) -> None:
    spec = _spec()
    spec.workload.dataset.format = fmt  # type: ignore[assignment]
    spec.workload.dataset.content = content
    assert _refused_fields(stub, spec) == ["spec.workload.dataset.content"]


def test_numbers_past_their_bounds(stub: run_service_pb2_grpc.RunServiceStub) -> None:
    spec = _spec()
    spec.stages[0].requests = 2**64 - 1
    spec.stages.add(request_rate=1e-300).duration.FromSeconds(5)
    assert set(_refused_fields(stub, spec)) == {"spec.stages[0].requests", "spec.stages[1].request_rate"}


def test_the_stored_spec_size_is_limited(stub: run_service_pb2_grpc.RunServiceStub) -> None:
    spec = _spec()
    spec.target.extra_body.update({"a": "x" * 60_000})
    for i in range(MAX_LABELS):
        spec.labels[f"k{i:03d}".ljust(MAX_LABEL_KEY_CHARS, "k")] = "\U0001f600" * MAX_LABEL_VALUE_CHARS
    assert _refused_fields(stub, spec) == ["spec"]


def _big_spec(i: int) -> run_pb2.RunSpec:
    """A spec just under the stored size limit."""
    spec = _spec()
    spec.display_name = f"big {i}"
    for j in range(MAX_LABELS):
        spec.labels[f"k{j:03d}".ljust(MAX_LABEL_KEY_CHARS, "k")] = "\U0001f600" * MAX_LABEL_VALUE_CHARS
    spec.target.extra_body.update({"pad": "p" * (MAX_STORED_SPEC_BYTES - spec.ByteSize() - 2000)})
    return spec


def test_list_runs_pages_by_bytes(stub: run_service_pb2_grpc.RunServiceStub) -> None:
    created = set()
    for i in range(40):
        run = stub.CreateRun(run_service_pb2.CreateRunRequest(spec=_big_spec(i)), timeout=30).run
        assert run.spec.ByteSize() > MAX_STORED_SPEC_BYTES - 4000
        created.add(run.id)
    seen: list[str] = []
    token, pages = "", 0
    while True:
        page = stub.ListRuns(run_service_pb2.ListRunsRequest(page_size=50, page_token=token), timeout=30)
        pages += 1
        assert page.ByteSize() <= MAX_PAGE_BYTES + MAX_STORED_SPEC_BYTES // 8, page.ByteSize()
        assert page.runs
        seen += [r.id for r in page.runs]
        token = page.next_page_token
        if not token:
            break
        assert pages < 40
    assert len(seen) == len(set(seen)) and set(seen) == created  # every run once, no page lost
    assert pages >= 5  # 40 runs of ~128 KiB in pages of at most 1 MiB


def test_one_enormous_old_run_does_not_break_listing(
    served: tuple[ThreadedController, Path], stub: run_service_pb2_grpc.RunServiceStub
) -> None:
    """A run stored before the limits (14,000 labels of 1,000 characters, as in the issue) is
    listed without its labels; every other run stays listed; GetRun still names it."""
    small = stub.CreateRun(run_service_pb2.CreateRunRequest(spec=_spec()), timeout=30).run
    huge = _spec()
    huge.display_name = "from before the limits"
    for i in range(14_000):
        huge.labels[f"label-{i}"] = "x" * 1000
    pb = huge.SerializeToString()
    conn = sqlite3.connect(served[1])
    with conn:
        conn.execute(
            "INSERT INTO runs (run_id, display_name, model, state, state_reason, spec_json, created_at, current_stage,"
            " requests_ok, requests_failed, output_tokens, spec_pb) VALUES ('run_old_huge', ?, 'm', ?, '', ?, ?, 0,"
            " 0, 0, 0, ?)",
            (huge.display_name, run_pb2.RUN_STATE_FAILED, json.dumps({}), 2 * 10**18, pb),
        )
    conn.close()
    ids = []
    token = ""
    while True:
        page = stub.ListRuns(run_service_pb2.ListRunsRequest(page_size=50, page_token=token), timeout=30)
        ids += [r.id for r in page.runs]
        for r in page.runs:
            if r.id == "run_old_huge":
                assert r.spec.display_name == "from before the limits" and not r.spec.labels
        token = page.next_page_token
        if not token:
            break
    assert ids[0] == "run_old_huge" and small.id in ids
