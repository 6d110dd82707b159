"""Credentials outside `api_key` (issue 13, item 5), on a real controller over real gRPC.

* A base URL with userinfo (`http://user:SECRET@host/v1`) or a query (`?key=SECRET`) is
  refused with INVALID_ARGUMENT on `spec.target.base_url`, naming where the key goes instead,
  and nothing of it is stored; `llm-loadtest run` refuses such a `--target` before it dials
  the controller, with one line.
* A header whose name does not look like a credential (`Ocp-Apim-Subscription-Key`,
  `X-Functions-Key`) is still secret: every read shows `[redacted]`, and the database holds
  the value only in `run_secrets`. Only the documented harmless headers are shown as given.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import grpc
import pytest

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.domain.access.secrets import REDACTED
from controller.server import Controller
from tests.integration.test_controller_api import violations
from tests.processes import CLI, ENV

pytestmark = pytest.mark.timeout(60)


def spec(base_url: str) -> run_pb2.RunSpec:
    s = run_pb2.RunSpec(display_name="credentials")
    s.target.base_url = base_url
    s.target.model = "mock"
    s.stages.add(concurrency=1, requests=1)
    return s


def urls(secret: str) -> list[str]:
    return [
        f"http://user:{secret}@127.0.0.1:9/v1",
        f"http://{secret}@127.0.0.1:9/v1",
        f"https://127.0.0.1:9/v1?key={secret}",
        f"http://127.0.0.1:9/v1?api-version=1&code={secret}",
        f"http://127.0.0.1:9/v1#{secret}",
    ]


async def test_credentials_in_the_base_url_are_refused(controller: Controller, client: ControllerClient) -> None:
    secret = f"SECRET{uuid.uuid4().hex}"
    for url in urls(secret):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await client.create_run(spec(url))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert violations(info.value) == ["spec.target.base_url"], url
        details = info.value.details() or ""
        assert "--target-api-key" in details and "LLM_LOADTEST_TARGET_API_KEY" in details and "--header" in details
        assert secret not in details and secret not in str(info.value.trailing_metadata())
    assert not (await client.list_runs()).runs
    db = Path(controller.db.path)
    raw = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
    assert secret.encode() not in raw


@pytest.mark.e2e
async def test_the_cli_refuses_such_a_target_before_sending(tmp_path: Path) -> None:
    secret = f"SECRET{uuid.uuid4().hex}"
    dialled: list[int] = []

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        dialled.append(1)
        writer.close()

    listener = await asyncio.start_server(count, "127.0.0.1", 0)  # stands in for a controller
    address = f"127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    try:
        for url in urls(secret)[:3]:
            proc = await asyncio.create_subprocess_exec(
                CLI,
                "run",
                "--controller",
                address,
                "--target",
                url,
                "--model",
                "m",
                "--requests",
                "1",
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=ENV,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 2
            lines = err.decode().strip().splitlines()
            assert len(lines) == 1 and "--target" in lines[0] and "--target-api-key" in lines[0], lines
            assert secret not in (out + err).decode()
    finally:
        listener.close()
        await listener.wait_closed()
    assert not dialled


async def test_every_custom_header_is_secret_unless_harmless(controller: Controller, client: ControllerClient) -> None:
    canary = uuid.uuid4().hex
    s = spec("http://127.0.0.1:9/v1")
    secret_headers = {
        "Ocp-Apim-Subscription-Key": f"apim-{canary}",
        "X-Functions-Key": f"fn-{canary}",
        "X-Org": f"org-{canary}",
    }
    s.target.headers.update(secret_headers)
    s.target.headers.update({"OpenAI-Organization": "team-a", "Accept-Language": "de"})
    run = await client.create_run(s)
    reads = [str(run), str(await client.get_run(run.id)), str(await client.list_runs())]
    got = (await client.get_run(run.id)).spec.target.headers
    assert {k: got[k] for k in secret_headers} == dict.fromkeys(secret_headers, REDACTED)
    assert got["OpenAI-Organization"] == "team-a" and got["Accept-Language"] == "de"
    await client.cancel_run(run.id)
    reads += [str(u) async for u in client.watch(run.id)]
    assert all(canary not in text for text in reads)
    db = Path(controller.db.path)
    raw = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
    assert canary.encode() not in raw  # erased with the run's secrets when it ended
