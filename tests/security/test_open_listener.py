"""No open controller on a public address (issue 13, item 8).

`llm-loadtest controller --listen 0.0.0.0:...` with no bootstrap key and no stored key exits 2
with one line, before it binds, unless `--insecure-open` is given; with keys (or the flag) the
rule passes, and with no `--allow-target` list the log warns. The refusals run the real CLI;
the cases that would accept are checked on the real Controller's rule itself (`check_exposure`,
which `start()` calls before binding), so that no test listens on a public address.
"""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from controller.server import Controller, OpenListenerError
from tests.processes import CLI, ENV

pytestmark = pytest.mark.timeout(60)


def run_controller(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [CLI, "controller", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
        stdin=subprocess.DEVNULL,
        check=False,
    )


@pytest.mark.e2e
@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0"])
def test_no_keys_on_a_public_address_exits_2_with_one_line(tmp_path: Path, listen: str) -> None:
    done = run_controller("--listen", listen, "--db", str(tmp_path / "open.db"))
    assert done.returncode == 2, done.stdout + done.stderr
    assert "listening" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("llm-loadtest controller:")]
    assert len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"refusing to listen on {listen} without API keys" in errors[0]
    for hint in ("--api-key", "LLM_LOADTEST_API_KEY", "--insecure-open", "127.0.0.1"):
        assert hint in errors[0]


@pytest.mark.e2e
def test_a_bad_allow_target_entry_exits_2_with_one_line(tmp_path: Path) -> None:
    done = run_controller("--listen", "127.0.0.1:0", "--db", str(tmp_path / "c.db"), "--allow-target", "10.0.0.0/33")
    assert done.returncode == 2
    [line] = [x for x in done.stderr.splitlines() if x.startswith("llm-loadtest controller:")]
    assert "--allow-target '10.0.0.0/33'" in line


async def exposure(db: Path, listen: str, **kwargs: Any) -> list[str]:
    """Run the listener rule of a real Controller on `db`; the warnings it logs."""
    controller = Controller(str(db), **kwargs)
    try:
        controller.db.migrate()
        with capture_logs() as logs:
            await controller.check_exposure(listen)
        return [str(e["event"]) for e in logs if e["log_level"] == "warning"]
    finally:
        controller.destinations.close()
        controller.db.close()


async def test_the_rule_on_the_real_controller(tmp_path: Path) -> None:
    fresh_db = tmp_path / "rule.db"
    with pytest.raises(OpenListenerError):
        await exposure(fresh_db, "0.0.0.0:50051")
    assert await exposure(fresh_db, "127.0.0.1:50051") == []  # loopback: open is fine
    assert await exposure(fresh_db, "localhost:50051") == []
    assert await exposure(fresh_db, "0.0.0.0:50051", api_key="bootstrap-key") == ["no_target_allow_list"]
    assert await exposure(fresh_db, "0.0.0.0:50051", insecure_open=True) == ["controller_open", "no_target_allow_list"]
    assert await exposure(fresh_db, "0.0.0.0:50051", api_key="k", allow_targets=["10.0.0.0/8"]) == []


@pytest.mark.e2e
async def test_a_stored_key_is_enough(tmp_path: Path) -> None:
    fresh_db = tmp_path / "rule.db"
    proc = await asyncio.create_subprocess_exec(
        CLI,
        "keys",
        "create",
        "--db",
        str(fresh_db),
        "--role",
        "admin",
        "--name",
        "ops",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=ENV,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, err
    assert out.decode().startswith("llt_")
    assert await exposure(fresh_db, "0.0.0.0:50051") == ["no_target_allow_list"]
