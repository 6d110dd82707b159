"""The target API key never leaks: a run with a unique random key against targets that answer
401 (echoing the key back in the error body, as a careless server might) and 500, controller
and agent as real processes at debug log level; every read, watch, export, compare and report
path is called (RPCs and the CLI, including the HTML report); then every response, the logs
and the raw database file (and its WAL) are searched for the key: zero occurrences. The key
also travels in a header whose name does not look like a credential
(`Ocp-Apim-Subscription-Key`), and specs that put it into the base URL (userinfo, a query)
are refused, by the controller and by `llm-loadtest run`, without repeating it.

Our own API keys (bootstrap and the agent's key) must not appear in the logs either."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from aiohttp import web

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import key_service_pb2, run_pb2
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.fleet.harness import CLI, ENV, Proc
from tests.integration.test_controller_api import violations

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(90)]

BOOTSTRAP = f"boot-{uuid.uuid4().hex}"


class EchoingTarget:
    """A model server that refuses every request with 401 and repeats the credentials it got."""

    def __init__(self) -> None:
        self.seen: list[str] = []
        self._runner: web.AppRunner | None = None
        self.base_url = ""

    async def _reject(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        header_key = request.headers.get("X-Api-Key", "")
        subscription = request.headers.get("Ocp-Apim-Subscription-Key", "")
        self.seen.extend((auth, header_key, subscription))
        body = {
            "error": {
                "message": f"invalid credentials: {auth} {header_key} {subscription}",
                "type": "auth",
                "key": auth[7:],
            }
        }
        return web.json_response(body, status=401)

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._reject)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://127.0.0.1:{port}/v1"

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()


def _spec(base_url: str, key: str, name: str, *, preflight: bool = False) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(display_name=name, skip_preflight=not preflight)
    spec.target.base_url = base_url
    spec.target.model = "mock"
    spec.target.api_key = key
    # A credential header is as secret as the key (its value carries the canary's hex part).
    spec.target.headers["X-Api-Key"] = "hdr-" + key.removeprefix("sk-canary-")
    # Secret too, though its name has no credential word: every header is, unless harmless.
    spec.target.headers["Ocp-Apim-Subscription-Key"] = "apim-" + key.removeprefix("sk-canary-")
    spec.target.headers["OpenAI-Organization"] = "team-a"  # on the harmless list: shown as given
    stage = spec.stages.add(concurrency=2, requests=12)
    stage.name = "only"
    spec.checks.add(expression="error_rate < 1%")
    return spec


async def _cli(out: list[str], *args: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        CLI, *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, env=ENV
    )
    stdout, stderr = await asyncio.wait_for(proc.communicate(), 60)
    out.extend([stdout.decode(errors="replace"), stderr.decode(errors="replace")])
    return proc.returncode or 0


@pytest.fixture
async def targets() -> AsyncIterator[tuple[EchoingTarget, MockServer]]:
    echo = EchoingTarget()
    await echo.start()
    mock = MockServer(MockConfig(error_rate=1.0, ttft_ms=1, itl_ms=1, output_tokens=4))
    await mock.start()
    try:
        yield echo, mock
    finally:
        await mock.close()
        await echo.close()


async def test_target_api_key_never_leaks(tmp_path: Path, targets: tuple[EchoingTarget, MockServer]) -> None:
    echo, mock = targets
    canary = f"sk-canary-{uuid.uuid4().hex}"
    db = tmp_path / "canary.db"
    procs: list[Proc] = []
    seen: list[str] = []  # every response and output, as text
    try:
        controller = await Proc.spawn(
            "controller",
            [
                "controller",
                "--listen",
                "127.0.0.1:0",
                "--db",
                str(db),
                "--api-key",
                BOOTSTRAP,
                "--log-level",
                "debug",
                "--grace",
                "2",
            ],
            tmp_path,
        )
        procs.append(controller)
        address = (await controller.line("listening on")).rsplit(" ", 1)[-1]
        async with ControllerClient(address, api_key=BOOTSTRAP, timeout_s=15) as admin:
            agent_key = (await admin.create_key("edge", key_service_pb2.KEY_ROLE_AGENT)).secret
            procs.append(
                await Proc.spawn(
                    "agent",
                    [
                        "agent",
                        "--controller",
                        address,
                        "--name",
                        "edge",
                        "--api-key",
                        agent_key,
                        "--log-level",
                        "debug",
                    ],
                    tmp_path,
                )
            )
            for _ in range(300):
                if await admin.list_agents():
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("agent did not connect:\n" + procs[-1].log_tail())

            # Refused specs: the error never repeats the key.
            bad = _spec(echo.base_url, canary + "\n", "bad")
            bad.stages[0].concurrency = 0
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await admin.create_run(bad)
            seen += [str(refused.value.details()), str(refused.value.trailing_metadata()), *violations(refused.value)]
            assert any("api_key" in v for v in violations(refused.value))
            # The key in the base URL, as userinfo or a query parameter: refused, never repeated.
            for url in (echo.base_url.replace("http://", f"http://user:{canary}@"), f"{echo.base_url}?key={canary}"):
                with pytest.raises(grpc.aio.AioRpcError) as refused:
                    await admin.create_run(_spec(url, "", "in-url"))
                assert violations(refused.value) == ["spec.target.base_url"]
                seen += [str(refused.value.details()), str(refused.value.trailing_metadata())]

            run_401 = await admin.create_run(_spec(echo.base_url, canary, "echo-401"), request_id="canary-1")
            run_500 = await admin.create_run(_spec(mock.base_url, canary, "mock-500"))
            # The preflight check's error (the echoed 401) is the run's reason, redacted too.
            run_pre = await admin.create_run(_spec(echo.base_url, canary, "preflight-401", preflight=True))
            seen.append(str(await admin.create_run(_spec(echo.base_url, canary, "again"), request_id="canary-1")))
            for run in (run_401, run_500, run_pre):
                seen.append(str(run))
                async for update in admin.watch(run.id):  # live updates until the final result
                    seen.append(str(update))
            assert any(canary in s for s in echo.seen), "the key must reach the target (in the assignment)"
            assert any(s.startswith("hdr-") for s in echo.seen), "so must the credential header"
            assert any(s.startswith("apim-") for s in echo.seen), "and the subscription-key header"
            assert mock.stats.requests_failed > 0

            pre = await admin.get_run(run_pre.id)
            assert pre.state == run_pb2.RUN_STATE_FAILED and "HTTP 401" in pre.state_reason, pre
            assert "[redacted]" in pre.state_reason
            # Every read path, after the runs ended.
            for run in (run_401, run_500, run_pre):
                got = await admin.get_run(run.id)
                assert got.state in (run_pb2.RUN_STATE_SUCCEEDED, run_pb2.RUN_STATE_FAILED), got
                assert got.spec.target.api_key == ""
                assert got.spec.target.headers["Ocp-Apim-Subscription-Key"] == "[redacted]"
                assert got.spec.target.headers["OpenAI-Organization"] == "team-a"
                seen += [str(got), str(await admin.get_result(run.id))]
                seen += [str(s) async for s in admin.export_samples(run.id, include_warmup=True)]
                seen += [str(u) async for u in admin.watch(run.id)]
                seen.append(str(await admin.get_run_events(run.id)) if hasattr(admin, "get_run_events") else "")
            samples = [s async for s in admin.export_samples(run_401.id)]
            assert samples and all(s.status == run_pb2.REQUEST_STATUS_HTTP_4XX for s in samples)
            seen += [
                str(await admin.list_runs()),
                str(await admin.list_agents()),
                str(await admin.compare_runs(run_401.id, [run_500.id])),
                str(await admin.list_audit_events(1000)),
                str(await admin.list_keys(True)),
            ]

        # The CLI: report (HTML), export, get, result, compare, list, audit.
        report = tmp_path / "report.html"
        conn = ["--controller", address, "--api-key", BOOTSTRAP]
        assert await _cli(seen, "report", run_401.id, run_500.id, "-o", str(report), *conn) == 0
        seen.append(report.read_text())
        for fmt in ("csv", "jsonl"):
            await _cli(seen, "runs", "export", run_401.id, "--format", fmt, *conn)
        await _cli(seen, "runs", "get", run_401.id, *conn)
        await _cli(seen, "runs", "result", run_500.id, *conn)
        await _cli(seen, "runs", "compare", run_401.id, run_500.id, *conn)
        await _cli(seen, "runs", "list", *conn)
        await _cli(seen, "audit", "--json", *conn)
        url_with_key = echo.base_url.replace("http://", f"http://user:{canary}@")
        assert await _cli(seen, "run", "--target", url_with_key, "--model", "mock", "--requests", "1", *conn) == 2
        assert any("HTTP 401" in s for s in seen)  # the errors are there, without the key

        # The database file after the runs ended (the controller still running), then after stop.
        raw_live = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
        for proc in procs[::-1]:
            await proc.stop()
        raw_after = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
        logs = {p.name: p.log.read_text(errors="replace") for p in procs}
        assert "api_key_created" in logs["controller"] and '"level": "debug"' in "".join(logs.values())

        needles = [canary, canary[len("sk-canary-") :]]
        for needle in needles:
            leaks = [s[max(0, s.find(needle) - 80) : s.find(needle) + 80] for s in seen if needle in s]
            assert not leaks, f"target API key in responses/CLI output: {leaks[:3]}"
            for name, text in logs.items():
                assert needle not in text, f"target API key in the {name} log"
            assert needle.encode() not in raw_live, "target API key in the database while the controller runs"
            assert needle.encode() not in raw_after, "target API key in the database file"
        for ours in (BOOTSTRAP, agent_key, agent_key.split("_", 2)[2]):
            for name, text in logs.items():
                assert ours not in text, f"one of our own API keys in the {name} log"
            assert all(ours not in s for s in seen if "secret" not in s)
        json.dumps(len(seen))  # everything above was text
    finally:
        for proc in procs[::-1]:
            await proc.stop()
