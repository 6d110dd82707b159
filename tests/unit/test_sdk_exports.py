"""The SDK's public entry point: `from client import ...` gives the SDK's classes, the package
says it is typed, and importing the CLI does not load the SDK (each command loads its own)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

import client
from client.sdk import ControllerClient
from common.tls import ClientTls

pytestmark = pytest.mark.timeout(30)


def test_the_package_exports_the_sdk() -> None:
    from client import ClientTls as exported_tls
    from client import ControllerClient as exported_client

    assert sorted(client.__all__) == ["ClientTls", "ControllerClient"]
    assert exported_client is ControllerClient and exported_tls is ClientTls
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        _ = client.nothing  # type: ignore[attr-defined]


def test_the_sdk_and_the_types_its_signatures_use_are_marked_typed() -> None:
    import common

    for package in (client, common):
        assert (Path(package.__file__).parent / "py.typed").is_file(), package.__name__


@pytest.mark.e2e
def test_importing_the_cli_leaves_the_sdk_unloaded() -> None:
    code = "import sys, client.cli; print('client.sdk' in sys.modules, 'grpc' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=20)
    assert out.stdout.split() == ["False", "False"]
