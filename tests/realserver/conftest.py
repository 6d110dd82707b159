"""The real-server tier: llama.cpp's llama-server (built from source by
scripts/build_llama_server.sh, cached per machine) serving a tiny random model the tests write.

The build runs once, when the selected tests include this tier and before any of them starts
(so a first build is not cut short by a test's timeout); `scripts/test.sh` without pytest
arguments runs it even earlier, so its time shows on its own. `llama_server_binary` gives the
binary's path.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.realserver.tiny_model import write_tiny_llama

ROOT = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = ROOT / "scripts" / "build_llama_server.sh"
SLOTS = 4
# The name llama-server serves the model as (without --alias it lists the file's path, and
# the preflight check refuses a run whose model the server does not list).
MODEL_ALIAS = "tiny-llama"
_BINARY = pytest.StashKey[str]()


# Last: the items left after `-m` and `--deselect` (deselection is a modifyitems hook too), so
# `-m 'not realserver'` builds nothing.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if any(item.get_closest_marker("realserver") for item in items) and _BINARY not in config.stash:
        config.stash[_BINARY] = build_llama_server()


def build_llama_server() -> str:
    """The cached llama-server binary (built now if this machine has none)."""
    done = subprocess.run(["bash", str(BUILD_SCRIPT)], stdout=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0:
        raise pytest.UsageError(f"{BUILD_SCRIPT} failed (exit {done.returncode}); its output is above")
    return done.stdout.strip().splitlines()[-1]


@pytest.fixture(scope="session")
def llama_server_binary(pytestconfig: pytest.Config) -> str:
    if _BINARY not in pytestconfig.stash:
        pytestconfig.stash[_BINARY] = build_llama_server()
    return pytestconfig.stash[_BINARY]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("model") / "tiny-llama.gguf")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LlamaServer:
    """One llama-server process on 127.0.0.1 with its metrics and slots endpoints."""

    def __init__(self, binary: str, model: Path, log: Path, ctx: int = 2048, slots: int = SLOTS) -> None:
        self.port = free_port()
        self.log = log
        self._log_file = log.open("wb")
        args = [
            binary,
            "-m",
            str(model),
            "--alias",
            MODEL_ALIAS,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "-np",
            str(slots),
            "-c",
            str(ctx),
            "-t",
            "2",
            "--metrics",
            "--slots",
            "--seed",
            "1",
        ]
        self.p = subprocess.Popen(args, stdout=self._log_file, stderr=subprocess.STDOUT)
        self._wait_healthy(60.0)

    @property
    def root(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return self.root + "/v1"

    @property
    def metrics_url(self) -> str:
        return self.root + "/metrics"

    def _wait_healthy(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.p.poll() is not None:
                break
            try:
                with urllib.request.urlopen(self.root + "/health", timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise AssertionError(f"llama-server did not become healthy; log:\n{self.log.read_text()[-3000:]}")

    def metrics(self) -> dict[str, float]:
        """The llamacpp:* values of /metrics (no labels in this server's exposition)."""
        with urllib.request.urlopen(self.metrics_url, timeout=5) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def slots(self) -> list[dict[str, object]]:
        with urllib.request.urlopen(self.root + "/slots", timeout=5) as r:
            return list(json.loads(r.read()))

    def signal(self, sig: signal.Signals) -> None:
        self.p.send_signal(sig)

    def stop(self) -> None:
        if self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            try:
                self.p.wait(15)
            except subprocess.TimeoutExpired:
                self.p.kill()
                self.p.wait()
        self._log_file.close()


@pytest.fixture(scope="module")
def llama_server(
    llama_server_binary: str, tiny_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LlamaServer]:
    """A llama-server shared by a module's tests (they compare counter increases, not totals)."""
    server = LlamaServer(llama_server_binary, tiny_model, tmp_path_factory.mktemp("llama") / "server.log")
    try:
        yield server
    finally:
        server.stop()
