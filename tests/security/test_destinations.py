"""Where agents may send traffic (issue 13, item 7), on a real controller over real gRPC.

* Targets and scrape endpoints on link-local/metadata addresses (also spelled as a decimal
  or hex number, or an IPv4-mapped IPv6 address, or a metadata host name) and on the
  controller's own gRPC and metrics ports are refused with INVALID_ARGUMENT naming the field.
* `--allow-target` (here the `allow_targets` the flag sets) admits only matching CIDRs and
  host patterns.
* A target and a scrape endpoint that answer with a non-HTTP banner: the run's result,
  samples, events and the database never contain the banner's bytes.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.integration.test_controller_api import violations
from tests.integration.test_run_end_to_end import running_agent, wait_final

pytestmark = pytest.mark.timeout(90)


class BannerServer:
    """A raw TCP server that greets every connection with a banner, like an SSH port."""

    def __init__(self, banner: bytes) -> None:
        self.banner = banner
        self.connections = 0
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _greet(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(self.banner)
        try:
            await writer.drain()
            await asyncio.wait_for(reader.read(65536), 5)
        except (OSError, TimeoutError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> BannerServer:
        self._server = await asyncio.start_server(self._greet, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def spec(base_url: str, *endpoints: str, requests: int = 1) -> run_pb2.RunSpec:
    s = run_pb2.RunSpec(display_name="destinations")
    s.target.base_url = base_url
    s.target.model = "mock"
    s.workload.synthetic.input_tokens.fixed = 8
    s.workload.synthetic.output_tokens.fixed = 4
    s.stages.add(concurrency=2, requests=requests)
    if endpoints:
        s.server_metrics.endpoints.extend(endpoints)
        s.server_metrics.scrape_interval.FromMilliseconds(200)
    return s


@pytest.fixture
async def controller(tmp_path: Path) -> AsyncIterator[Controller]:
    c = Controller(str(tmp_path / "dest.db"), metrics_listen="127.0.0.1:0")
    await c.start("127.0.0.1:0")
    try:
        yield c
    finally:
        await c.stop(1.0)


async def refused(client: ControllerClient, s: run_pb2.RunSpec) -> tuple[list[str], str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.create_run(s)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT, info.value.details()
    return violations(info.value), info.value.details() or ""


@pytest.mark.parametrize(
    "url",
    [
        "http://169.254.169.254/latest/meta-data",
        "http://[fe80::1]:8000/v1",
        "http://[::ffff:169.254.169.254]/v1",
        "http://2852039166/v1",  # 169.254.169.254 as one number: the resolver understands it
        "http://0xa9fea9fe/v1",
        "http://metadata.google.internal/computeMetadata/v1",
        "http://[fd00:ec2::254]/latest",
    ],
)
async def test_link_local_and_metadata_destinations_are_refused(controller: Controller, url: str) -> None:
    async with ControllerClient(f"127.0.0.1:{controller.port}", timeout_s=10) as client:
        fields, details = await refused(client, spec(url))
        assert fields == ["spec.target.base_url"]
        assert "metadata" in details
        fields, details = await refused(client, spec("http://127.0.0.1:9/v1", url))
        assert fields == ["spec.server_metrics.endpoints[0]"], details
        assert not (await client.list_runs()).runs


async def test_the_controllers_own_listeners_are_refused(controller: Controller) -> None:
    grpc_port, metrics_port = controller.port, controller.metrics_port
    assert metrics_port
    async with ControllerClient(f"127.0.0.1:{grpc_port}", timeout_s=10) as client:
        for target in (
            f"http://127.0.0.1:{grpc_port}/v1",
            f"http://localhost:{grpc_port}/v1",
            f"http://0.0.0.0:{metrics_port}/v1",
            f"http://127.0.0.2:{grpc_port}/v1",
        ):
            fields, details = await refused(client, spec(target))
            assert fields == ["spec.target.base_url"] and "own listener" in details, (target, details)
        scrape = f"http://127.0.0.1:{metrics_port}/metrics"
        fields, details = await refused(client, spec("http://127.0.0.1:9/v1", "http://127.0.0.1:9/metrics", scrape))
        assert fields == ["spec.server_metrics.endpoints[1]"] and "own listener" in details
        # Another port on the same address is an ordinary destination.
        run = await client.create_run(spec("http://127.0.0.1:9/v1", "http://127.0.0.1:9/metrics"))
        await client.cancel_run(run.id)


async def test_allow_target_admits_only_its_cidrs_and_host_patterns(tmp_path: Path) -> None:
    c = Controller(str(tmp_path / "allow.db"), allow_targets=["127.0.0.1/32", "10.20.0.0/16", "*.allowed.test"])
    await c.start("127.0.0.1:0")
    try:
        async with ControllerClient(f"127.0.0.1:{c.port}", timeout_s=10) as client:
            for url in (
                "http://127.0.0.1:9/v1",
                "http://10.20.3.4:8000/v1",
                "http://vllm.allowed.test/v1",
                "http://VLLM.Allowed.Test./v1",
            ):
                run = await client.create_run(spec(url))
                await client.cancel_run(run.id)
            for url in (
                "http://10.21.0.1/v1",
                "http://example.com/v1",
                "http://169.254.169.254/",
                "http://allowed.test.evil.example/v1",
                "http://[::1]:9/v1",
            ):
                fields, details = await refused(client, spec(url))
                assert fields == ["spec.target.base_url"] and "--allow-target" in details, (url, details)
            fields, _ = await refused(client, spec("http://127.0.0.1:9/v1", "http://10.99.0.1/metrics"))
            assert fields == ["spec.server_metrics.endpoints[0]"]
            # The controller's own port stays refused even inside an allowed CIDR.
            fields, details = await refused(client, spec(f"http://127.0.0.1:{c.port}/v1"))
            assert "own listener" in details
    finally:
        await c.stop(1.0)


async def test_a_non_http_banner_never_reaches_results_samples_or_the_database(
    controller: Controller, tmp_path: Path
) -> None:
    canary = f"BANNER-{uuid.uuid4().hex}"
    banner = f"SSH-2.0-OpenSSH_9.6 {canary}\r\n".encode() + b"\x00\x01\xff rest\r\n"
    async with (
        BannerServer(banner) as ssh,
        MockServer(MockConfig(ttft_ms=1, itl_ms=1, output_tokens=4)) as mock,
        running_agent(f"127.0.0.1:{controller.port}"),
        ControllerClient(f"127.0.0.1:{controller.port}", timeout_s=10) as client,
    ):
        banner_url = f"http://127.0.0.1:{ssh.port}"
        # The preflight check would stop a run at the banner before its load: skipped here so
        # that requests and scrapes meet it, and checked on a run of its own below.
        loaded = spec(banner_url + "/v1", banner_url + "/metrics", requests=4)
        loaded.skip_preflight = True
        at_banner = await client.create_run(loaded)
        scraping_banner = await client.create_run(spec(mock.base_url, banner_url + "/metrics", requests=4))
        seen: list[str] = []
        results = []
        for run in (at_banner, scraping_banner):
            final = await wait_final(client, run.id)
            results.append(await client.get_result(run.id))
            seen += [str(final), str(results[-1]), str(await client.get_run_events(run.id))]
            seen += [str(s) async for s in client.export_samples(run.id, include_warmup=True)]
        assert ssh.connections >= 5  # every request and scrape reached the banner
        checked = await wait_final(client, (await client.create_run(spec(banner_url + "/v1", requests=4))).id)
        assert checked.state == run_pb2.RUN_STATE_FAILED and "not an HTTP response" in checked.state_reason
        seen += [str(checked), str(await client.get_run_events(checked.id))]

    text = "\n".join(seen)
    assert "not an HTTP response" in text
    assert canary not in text and "SSH-2.0" not in text
    db = tmp_path / "dest.db"
    raw = b"".join(p.read_bytes() for p in (db, Path(f"{db}-wal")) if p.exists())
    assert canary.encode() not in raw
    for result in results:
        [error] = result.stages[0].server_metrics.errors
        assert error.message.startswith("not an HTTP response") and len(error.message) <= 300
