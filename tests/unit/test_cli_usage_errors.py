"""Usage errors the CLI reports before doing any work."""

from __future__ import annotations

import pytest

from client.cli import main


@pytest.mark.parametrize("command", [["runs", "list"], ["agent"], ["health"]])
def test_a_client_certificate_without_its_key_is_a_usage_error(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--controller", "127.0.0.1:1", "--tls", "--tls-client-cert", "client.pem"])
    assert exit_info.value.code == 2
    assert "a client certificate needs its key" in capsys.readouterr().err
