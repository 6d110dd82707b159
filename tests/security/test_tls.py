"""TLS and mutual TLS on a real controller, with certificates generated for the test: an agent
or client without a certificate, or with one from another CA, cannot connect; with the
right one it can (and a real agent runs over it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from agent.controller_link import run_agent
from client.sdk import ControllerClient
from common.tls import ClientTls, ServerTls, open_channel
from controller.server import Controller
from tests.conftest import eventually
from tests.security.certs import CertificateAuthority, Pem

pytestmark = pytest.mark.timeout(60)


class Pki:
    def __init__(self, directory: Path) -> None:
        self.ca = CertificateAuthority(directory, "main")
        self.other = CertificateAuthority(directory, "other")
        self.server = self.ca.issue("controller", server=True)
        self.client = self.ca.issue("edge-1", server=False)
        self.stranger = self.other.issue("edge-x", server=False)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


@pytest.fixture
async def mtls_controller(tmp_path: Path, pki: Pki) -> AsyncIterator[Controller]:
    c = Controller(str(tmp_path / "tls.db"), tls=ServerTls(pki.server.cert, pki.server.key, pki.ca.cert_file))
    await c.start("127.0.0.1:0")
    try:
        yield c
    finally:
        await c.stop(1.0)


async def _reaches(address: str, tls: ClientTls | None) -> bool:
    async with ControllerClient(address, timeout_s=5.0, tls=tls) as client:
        try:
            await client.list_runs()
        except grpc.aio.AioRpcError as exc:
            assert exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED), exc
            return False
        return True


async def test_mtls_requires_a_certificate_from_our_ca(mtls_controller: Controller, pki: Pki) -> None:
    address = f"localhost:{mtls_controller.port}"
    right = ClientTls(pki.ca.cert_file, pki.client.cert, pki.client.key)
    assert await _reaches(address, right)
    assert not await _reaches(address, ClientTls(pki.ca.cert_file))  # no client certificate
    assert not await _reaches(address, ClientTls(pki.ca.cert_file, pki.stranger.cert, pki.stranger.key))
    assert not await _reaches(address, None)  # plaintext
    # The client checks the controller too: a CA that did not sign it is refused.
    assert not await _reaches(address, ClientTls(pki.other.cert_file, pki.client.cert, pki.client.key))


async def test_agent_connects_over_mtls(mtls_controller: Controller, pki: Pki) -> None:
    address = f"127.0.0.1:{mtls_controller.port}"
    good = ClientTls(pki.ca.cert_file, pki.client.cert, pki.client.key, server_name="localhost")
    bad = ClientTls(pki.ca.cert_file, pki.stranger.cert, pki.stranger.key, server_name="localhost")
    stop = asyncio.Event()
    agents = [
        asyncio.create_task(
            run_agent(address, name, {}, None, stop, channel_factory=lambda t, tls=tls: open_channel(t, tls))
        )
        for name, tls in (("good", good), ("bad", bad))
    ]
    try:
        async with ControllerClient(address, timeout_s=5.0, tls=good) as client:
            listed = await eventually(client.list_agents, lambda a: len(a) >= 1, timeout_s=15)
            assert [a.name for a in listed] == ["good"]
            # The stranger keeps failing its handshake (it retries with backoff, never gets in).
            await asyncio.sleep(0)
            assert not agents[1].done() or agents[1].exception() is not None
            assert [a.name for a in await client.list_agents()] == ["good"]
    finally:
        stop.set()
        for task in agents:
            task.cancel()
        await asyncio.gather(*agents, return_exceptions=True)


async def test_tls_without_client_auth(tmp_path: Path, pki: Pki) -> None:
    c = Controller(str(tmp_path / "tls-only.db"), tls=ServerTls(pki.server.cert, pki.server.key))
    await c.start("127.0.0.1:0")
    try:
        address = f"localhost:{c.port}"
        assert await _reaches(address, ClientTls(pki.ca.cert_file))
        assert not await _reaches(address, None)
    finally:
        await c.stop(1.0)


def test_cert_without_key_is_a_usage_error(pki: Pki) -> None:
    with pytest.raises(ValueError, match="needs its key"):
        ClientTls(pki.ca.cert_file, pki.client.cert, None)
    assert isinstance(pki.client, Pem)
