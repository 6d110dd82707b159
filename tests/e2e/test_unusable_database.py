"""A database file that is not SQLite, is damaged, or cannot be opened: every command taking
`--db` says so in one line on stderr and exits 1 (no traceback, no half-started controller)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.processes import CLI, ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

COMMANDS = (("controller", "--listen", "127.0.0.1:0"), ("keys", "list"), ("audit",))


def _damaged(tmp_path: Path) -> Path:
    """A real controller database whose first page (the schema) was overwritten."""
    path = tmp_path / "damaged.db"
    made = subprocess.run(
        [CLI, "keys", "create", "--db", str(path), "--role", "admin", "--name", "x"],
        capture_output=True,
        text=True,
        timeout=60,
        env=ENV,
        check=False,
    )
    assert made.returncode == 0, made.stderr
    with path.open("r+b") as f:
        f.seek(100)  # past the 100-byte header: the header still says SQLite
        f.write(b"\xff" * 3000)
    return path


@pytest.mark.parametrize("kind", ["random bytes", "damaged", "a directory"])
@pytest.mark.parametrize("command", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_unusable_database_is_one_line_and_exit_1(tmp_path: Path, kind: str, command: tuple[str, ...]) -> None:
    if kind == "random bytes":
        path = tmp_path / "corrupt.db"
        path.write_bytes(bytes(range(256)) * 80)
    elif kind == "damaged":
        path = _damaged(tmp_path)
    else:
        path = tmp_path / "dir.db"
        path.mkdir()
    done = subprocess.run(
        [CLI, *command, "--db", str(path)], capture_output=True, text=True, timeout=60, env=ENV, check=False
    )
    assert done.returncode == 1, (done.returncode, done.stderr[-2000:])
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith(f"llm-loadtest: {path} is not a usable SQLite database: "), lines[0]
    assert "Traceback" not in done.stderr and done.stdout == ""
