"""DatasetService and FetchDataset against a real controller over a real SQLite file: upload,
get, list, delete, content-addressed dedupe, errors naming the line, nothing left behind by a
failed upload, the auth rules, and CreateRun's references to uploaded datasets."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from client.sdk import ControllerClient
from common.datasets import dataset_id
from common.proto.loadtest.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    key_service_pb2,
    run_pb2,
)
from controller.server import Controller
from tests.conftest import eventually
from tests.integration.test_controller_api import valid_spec, violations
from tests.tokenizers_fixture import build_bpe_tokenizer

pytestmark = pytest.mark.timeout(60)
KEY = "test-admin-key-datasets"
JSONL = run_pb2.DATASET_FORMAT_JSONL
MOONCAKE = (
    b'{"timestamp": 0, "input_length": 10, "output_length": 2}\n'
    b'{"timestamp": 4000, "input_length": 10, "output_length": 2}\n'
)


def jsonl(n: int, width: int = 5) -> bytes:
    return "".join(
        json.dumps({"prompt": f"prompt {i} " + "w " * width, "max_tokens": 1 + i % 9}) + "\n" for i in range(n)
    ).encode()


def db_counts(path: Path) -> tuple[int, int]:
    with sqlite3.connect(path) as conn:
        return (
            conn.execute("SELECT COUNT(*) FROM datasets").fetchone()[0],
            conn.execute("SELECT COUNT(*) FROM dataset_chunks").fetchone()[0],
        )


async def fetch_all(address: str, ds_id: str, key: str | None = None) -> list[agent_service_pb2.FetchDatasetResponse]:
    async with grpc.aio.insecure_channel(address) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        metadata = (("x-api-key", key),) if key else ()
        return [
            m
            async for m in stub.FetchDataset(
                agent_service_pb2.FetchDatasetRequest(dataset_id=ds_id), metadata=metadata, timeout=20
            )
        ]


async def test_upload_get_list_fetch_delete(client: ControllerClient, controller: Controller, db_path: Path) -> None:
    data = jsonl(30_000, width=40)  # several MiB: more than one stored chunk
    assert len(data) > 3 * (1 << 20)
    uploaded = await client.upload_dataset(data, JSONL, name="prompts.jsonl", check_first=False)
    info = uploaded.dataset
    sha = hashlib.sha256(data).hexdigest()
    assert not uploaded.already_present
    assert (info.id, info.name, info.format, info.size_bytes, info.sha256) == (
        dataset_id(JSONL, sha),
        "prompts.jsonl",
        JSONL,
        len(data),
        sha,
    )
    assert info.entry_count == 30_000 and info.create_time.seconds > 0
    assert await client.get_dataset(info.id) == info
    listed = await client.list_datasets()
    assert [d.id for d in listed.datasets] == [info.id] and not listed.next_page_token
    assert db_counts(db_path) == (1, -(-len(data) // (1 << 20)))

    messages = await fetch_all(f"127.0.0.1:{controller.port}", info.id)
    assert (messages[0].size_bytes, messages[0].sha256, messages[0].format) == (len(data), sha, JSONL)
    assert all(len(m.chunk) <= 1 << 20 for m in messages) and not any(m.sha256 for m in messages[1:])
    assert b"".join(m.chunk for m in messages) == data

    await client.delete_dataset(info.id)
    assert db_counts(db_path) == (0, 0)
    for call in (client.get_dataset(info.id), client.delete_dataset(info.id)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await call
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await fetch_all(f"127.0.0.1:{controller.port}", info.id)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND


async def test_same_content_is_stored_once(client: ControllerClient, db_path: Path, tmp_path: Path) -> None:
    data = jsonl(50)
    first = await client.upload_dataset(data, JSONL, name="a", check_first=False)
    again = await client.upload_dataset(data, JSONL, name="b", check_first=False)  # sent again
    assert again.already_present and again.dataset == first.dataset  # the first name stays
    path = tmp_path / "same.jsonl"
    path.write_bytes(data)
    cheap = await client.upload_dataset(path, JSONL)  # id computed locally: nothing sent
    assert cheap.already_present and cheap.dataset.id == first.dataset.id
    assert db_counts(db_path)[0] == 1
    other = await client.upload_dataset(b"prompt\nhello\n", run_pb2.DATASET_FORMAT_CSV)
    assert other.dataset.id != first.dataset.id and other.dataset.entry_count == 1
    csv_listed = await client.list_datasets(fmt=run_pb2.DATASET_FORMAT_CSV)
    assert [d.id for d in csv_listed.datasets] == [other.dataset.id]
    page = await client.list_datasets(page_size=1)
    assert len(page.datasets) == 1 and page.next_page_token
    rest = await client.list_datasets(page_size=1, page_token=page.next_page_token)
    assert {page.datasets[0].id, rest.datasets[0].id} == {first.dataset.id, other.dataset.id}


@pytest.mark.parametrize(
    ("fmt", "content", "field", "says"),
    [
        (
            JSONL,
            b'{"prompt": "ok"}\n' * 3 + b'{"prompt": "x", "max_tokens": -1}\n',
            "chunk",
            'line 4: field "max_tokens"',
        ),
        (run_pb2.DATASET_FORMAT_CSV, b"text\nx\n", "chunk", 'line 1: the header needs a "prompt" column'),
        (run_pb2.DATASET_FORMAT_SHAREGPT, b'[{"conversations": 3}]', "chunk", '[0]: field "conversations"'),
        (
            run_pb2.DATASET_FORMAT_MOONCAKE_TRACE,
            b'{"timestamp": 1, "input_length": 0, "output_length": 1}\n',
            "chunk",
            'line 1: field "input_length"',
        ),
        (
            run_pb2.DATASET_FORMAT_AZURE_TRACE,
            b"TIMESTAMP,ContextTokens,GeneratedTokens\nnope,1,1\n",
            "chunk",
            'line 2: field "TIMESTAMP"',
        ),
        (run_pb2.DATASET_FORMAT_TOKENIZER, b"{}", "chunk", "tokenizer"),
        (run_pb2.DATASET_FORMAT_UNSPECIFIED, b"x", "header.format", "required"),
        (JSONL, b"", "chunk", "empty"),
    ],
)
async def test_invalid_upload_names_line_and_field_and_leaves_nothing(
    client: ControllerClient, db_path: Path, fmt: int, content: bytes, field: str, says: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.upload_dataset(content, fmt, check_first=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert violations(err.value) == [field] and says in (err.value.details() or ""), err.value.details()
    assert db_counts(db_path) == (0, 0)
    assert list((await client.list_datasets()).datasets) == []


async def test_an_error_late_in_a_large_upload_leaves_nothing(client: ControllerClient, db_path: Path) -> None:
    data = jsonl(40_000, width=30) + b"{broken\n"
    lines = data.count(b"\n")
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.upload_dataset(data, JSONL, check_first=False)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert f"line {lines}: not valid JSON" in (err.value.details() or "")
    assert db_counts(db_path) == (0, 0)


async def test_header_rules(controller: Controller, db_path: Path) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)

        async def send(*messages: dataset_service_pb2.UploadDatasetRequest) -> grpc.aio.AioRpcError:
            async def gen() -> AsyncIterator[dataset_service_pb2.UploadDatasetRequest]:
                for m in messages:
                    yield m

            with pytest.raises(grpc.aio.AioRpcError) as err:
                await stub.UploadDataset(gen(), timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            return err.value

        header = dataset_service_pb2.UploadDatasetHeader
        req = dataset_service_pb2.UploadDatasetRequest
        assert violations(await send(req(chunk=b"x"))) == ["header"]
        assert violations(await send(req(header=header(format=JSONL, name="bad name!")))) == ["header.name"]
        too_long = await send(req(header=header(format=JSONL, size_bytes=3)), req(chunk=b'{"prompt": "x"}\n'))
        assert violations(too_long) == ["chunk"]
        short = await send(req(header=header(format=JSONL, size_bytes=100)), req(chunk=b'{"prompt": "x"}\n'))
        assert violations(short) == ["header.size_bytes"]
        twice = await send(req(header=header(format=JSONL)), req(header=header(format=JSONL)))
        assert violations(twice) == ["header"]
    assert db_counts(db_path) == (0, 0)


async def test_tokenizer_and_traces_upload(client: ControllerClient, tmp_path: Path) -> None:
    tok = build_bpe_tokenizer(tmp_path / "tokenizer.json")
    info = (await client.upload_dataset(Path(tok), run_pb2.DATASET_FORMAT_TOKENIZER, name="tok")).dataset
    assert info.entry_count == 0 and info.format == run_pb2.DATASET_FORMAT_TOKENIZER
    azure = b"TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.5,10,2\n2023-11-16 18:15:49.0,20,3\n"
    trace = (await client.upload_dataset(azure, run_pb2.DATASET_FORMAT_AZURE_TRACE)).dataset
    assert trace.entry_count == 2 and trace.span_s == pytest.approx(2.5)


async def test_create_run_references(client: ControllerClient) -> None:
    prompts = (await client.upload_dataset(jsonl(20), JSONL, name="p.jsonl")).dataset
    mooncake = MOONCAKE
    trace = (await client.upload_dataset(mooncake, run_pb2.DATASET_FORMAT_MOONCAKE_TRACE)).dataset

    spec = valid_spec()
    spec.workload.dataset.dataset_id = prompts.id
    run = await client.create_run(spec)
    stored = (await client.get_run(run.id)).spec.workload.dataset
    assert (stored.format, stored.entry_count, stored.content_sha256, stored.name) == (
        JSONL,
        20,
        prompts.sha256,
        "p.jsonl",
    )

    cases: list[tuple[run_pb2.RunSpec, str]] = []
    missing = valid_spec()
    missing.workload.dataset.dataset_id = "ds_" + "0" * 32
    cases.append((missing, "spec.workload.dataset.dataset_id"))
    wrong_family = valid_spec()
    wrong_family.workload.dataset.dataset_id = trace.id
    cases.append((wrong_family, "spec.workload.dataset.dataset_id"))
    malformed = valid_spec()
    malformed.workload.dataset.dataset_id = "not-an-id"
    cases.append((malformed, "spec.workload.dataset.dataset_id"))
    both = valid_spec()
    both.workload.dataset.dataset_id = prompts.id
    both.workload.dataset.content = '{"prompt": "x"}'
    cases.append((both, "spec.workload.dataset.content"))
    other_format = valid_spec()
    other_format.workload.dataset.dataset_id = prompts.id
    other_format.workload.dataset.format = run_pb2.DATASET_FORMAT_CSV
    cases.append((other_format, "spec.workload.dataset.format"))
    tokenizer = valid_spec()
    tokenizer.workload.tokenizer_id = prompts.id
    cases.append((tokenizer, "spec.workload.tokenizer_id"))
    for bad, field in cases:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.create_run(bad)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(err.value) == [field], (field, err.value.details())

    # A pending run holds its dataset; once it is final the dataset can go.
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.delete_dataset(prompts.id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION and run.id in (err.value.details() or "")
    await client.cancel_run(run.id)
    await client.delete_dataset(prompts.id)


async def test_create_run_trace_reference_fills_its_outputs(client: ControllerClient) -> None:
    mooncake = MOONCAKE
    trace = (await client.upload_dataset(mooncake, run_pb2.DATASET_FORMAT_MOONCAKE_TRACE)).dataset
    spec = valid_spec()
    spec.workload.trace.dataset_id = trace.id
    spec.workload.trace.replay_speed = 2.0
    replay = run_pb2.RunSpec()
    replay.CopyFrom(spec)
    replay.stages[0].trace_replay = True
    try:  # which stages a trace workload takes is the spec validation's (trace replay) business
        run = await client.create_run(replay)
    except grpc.aio.AioRpcError as first:
        try:
            run = await client.create_run(spec)
        except grpc.aio.AioRpcError as exc:
            assert "dataset_id" not in " ".join(violations(exc) + violations(first)), exc.details()
            pytest.skip(f"this branch's spec validation refuses both trace stages: {exc.details()}")
    stored = (await client.get_run(run.id)).spec.workload.trace
    assert stored.entry_count == 2 and stored.span.ToMilliseconds() == 2000
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await client.delete_dataset(trace.id)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[Controller]:
    c = Controller(str(tmp_path / "auth.db"), api_key=KEY)
    await c.start("127.0.0.1:0")
    try:
        yield c
    finally:
        await c.stop(1.0)


async def test_auth_rules(secured: Controller) -> None:
    address = f"127.0.0.1:{secured.port}"
    async with ControllerClient(address, api_key=KEY) as admin:
        reader = (await admin.create_key("dash", key_service_pb2.KEY_ROLE_READER)).secret
        agent = (await admin.create_key("edge", key_service_pb2.KEY_ROLE_AGENT)).secret
        info = (await admin.upload_dataset(jsonl(3), JSONL)).dataset
    async with ControllerClient(address, api_key=reader) as as_reader:
        assert (await as_reader.get_dataset(info.id)).id == info.id
        assert len((await as_reader.list_datasets()).datasets) == 1
        for call in (as_reader.upload_dataset(jsonl(4), JSONL), as_reader.delete_dataset(info.id)):
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await call
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    async with ControllerClient(address) as anonymous:  # reads are public by default
        assert (await anonymous.get_dataset(info.id)).id == info.id
    assert b"".join(m.chunk for m in await fetch_all(address, info.id, agent)) == jsonl(3)
    assert b"".join(m.chunk for m in await fetch_all(address, info.id, KEY)) == jsonl(3)
    for key, code in ((reader, grpc.StatusCode.PERMISSION_DENIED), (None, grpc.StatusCode.UNAUTHENTICATED)):
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await fetch_all(address, info.id, key)
        assert err.value.code() == code
    # Uploads and deletes are audited like every write, naming the dataset.
    async with ControllerClient(address, api_key=KEY) as admin:
        await admin.delete_dataset(info.id)
        await secured.audit.flush()
        events = (await admin.list_audit_events()).events
    rows = {(e.method.rsplit("/", 1)[-1], e.outcome, e.detail) for e in events}
    assert ("UploadDataset", "OK", f"dataset {info.id}") in rows, rows
    assert ("DeleteDataset", "OK", f"dataset {info.id}") in rows, rows
    assert any(m == "UploadDataset" and o == "PERMISSION_DENIED" for m, o, _ in rows), rows


async def test_an_upload_abandoned_by_its_client_leaves_nothing(controller: Controller, db_path: Path) -> None:
    data = jsonl(40_000, width=30)
    assert len(data) > 3 << 20
    async with grpc.aio.insecure_channel(f"127.0.0.1:{controller.port}") as channel:
        call = dataset_service_pb2_grpc.DatasetServiceStub(channel).UploadDataset(timeout=30)
        await call.write(
            dataset_service_pb2.UploadDatasetRequest(header=dataset_service_pb2.UploadDatasetHeader(format=JSONL))
        )
        for i in range(0, 3 << 20, 1 << 20):
            await call.write(dataset_service_pb2.UploadDatasetRequest(chunk=data[i : i + (1 << 20)]))
        # The chunks sent are being stored: the upload's row exists, without an id.
        await eventually(lambda: asyncio.to_thread(db_counts, db_path), lambda c: c[0] == 1 and c[1] >= 2)
        call.cancel()  # the client goes away without finishing
        with pytest.raises(asyncio.CancelledError):
            await call
    await eventually(lambda: asyncio.to_thread(db_counts, db_path), lambda c: c == (0, 0))


async def test_concurrent_uploads(client: ControllerClient, db_path: Path) -> None:
    contents = [jsonl(12_000 + i, width=30) for i in range(8)]  # each more than 1 MiB
    assert all(len(c) > 1 << 20 for c in contents)
    replies = await asyncio.gather(*(client.upload_dataset(c, JSONL, check_first=False) for c in contents))
    assert [r.dataset.entry_count for r in replies] == [12_000 + i for i in range(8)]
    assert len({r.dataset.id for r in replies}) == 8 and not any(r.already_present for r in replies)
    same = await asyncio.gather(*(client.upload_dataset(contents[0], JSONL, check_first=False) for _ in range(3)))
    assert {r.dataset.id for r in same} == {replies[0].dataset.id} and all(r.already_present for r in same)
    assert db_counts(db_path)[0] == 8
