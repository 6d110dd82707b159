"""Real processes for the fleet tests: `llm-loadtest mock-server|controller|agent`.

Every process is started from the venv's `llm-loadtest` script; ports are taken from the
"listening on" lines the processes print. Logs go to files in the test's tmp directory
(shown when a wait fails). `Fleet.close()` stops whatever is still running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
from collections import Counter
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from google.protobuf import duration_pb2

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.store import columnar
from tests.conftest import eventually

CLI = str(Path(sys.executable).parent / "llm-loadtest")
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
START_TIMEOUT_S = 30.0
T = TypeVar("T")


class Proc:
    """One `llm-loadtest` subprocess."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    @classmethod
    async def spawn(cls, name: str, args: list[str], log_dir: Path) -> Proc:
        log = log_dir / f"{name}.log"
        with log.open("ab") as log_file:
            proc = await asyncio.create_subprocess_exec(
                CLI,
                *args,
                stdout=asyncio.subprocess.PIPE,
                stderr=log_file,
                stdin=asyncio.subprocess.DEVNULL,
                env=ENV,
            )
        return cls(name, proc, log)

    async def line(self, marker: str, timeout_s: float = START_TIMEOUT_S) -> str:
        assert self.proc.stdout is not None
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    raw = await self.proc.stdout.readline()
                    if not raw:
                        break
                    if marker in raw.decode():
                        return raw.decode().strip()
        except TimeoutError:
            pass
        raise AssertionError(f"{self.name}: no {marker!r}; log tail:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def send(self, sig: int) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout_s: float) -> int:
        async with asyncio.timeout(timeout_s):
            return await self.proc.wait()

    async def stop(self, timeout_s: float = 15.0) -> int | None:
        if self.proc.returncode is None:
            try:
                self.proc.send_signal(signal.SIGCONT)  # a frozen process cannot handle SIGTERM
                self.proc.send_signal(signal.SIGTERM)
                return await self.wait(timeout_s)
            except TimeoutError:
                self.proc.kill()
            except ProcessLookupError:
                pass
        return await self.proc.wait()


class Fleet:
    """A mock model server, a controller and agents as separate processes."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.db = tmp / "runs.db"
        self.procs: list[Proc] = []
        self.target = ""
        self.address = ""
        self.controller: Proc | None = None
        self.agents: list[Proc] = []

    async def start_mock(self, ttft_ms: float = 20, itl_ms: float = 5, output_tokens: int = 16) -> str:
        mock = await Proc.spawn(
            "mock",
            [
                "mock-server",
                "--port",
                "0",
                "--ttft-ms",
                str(ttft_ms),
                "--itl-ms",
                str(itl_ms),
                "--output-tokens",
                str(output_tokens),
            ],
            self.tmp,
        )
        self.procs.append(mock)
        self.target = (await mock.line("listening on")).rsplit(" ", 1)[-1]
        return self.target

    async def start_controller(self, listen: str = "127.0.0.1:0", grace_s: float = 5.0) -> str:
        n = sum(p.name.startswith("controller") for p in self.procs)
        ctl = await Proc.spawn(
            f"controller{n}",
            ["controller", "--listen", listen, "--db", str(self.db), "--grace", str(grace_s)],
            self.tmp,
        )
        self.procs.append(ctl)
        self.controller = ctl
        self.address = (await ctl.line("listening on")).rsplit(" ", 1)[-1]
        return self.address

    async def start_agents(self, count: int, prefix: str = "agent", labels: dict[str, str] | None = None) -> list[Proc]:
        new = []
        for i in range(len(self.agents), len(self.agents) + count):
            args = ["agent", "--controller", self.address, "--name", f"{prefix}-{i}"]
            for k, v in (labels or {}).items():
                args += ["--label", f"{k}={v}"]
            new.append(await Proc.spawn(f"{prefix}-{i}", args, self.tmp))
        self.agents += new
        self.procs += new
        return new

    def client(self) -> ControllerClient:
        return ControllerClient(self.address, timeout_s=10.0)

    async def wait_agents(self, client: ControllerClient, count: int, timeout_s: float = 30.0) -> list[run_pb2.Agent]:
        return await eventually(client.list_agents, lambda a: len(a) >= count, timeout_s)

    async def mock_stats(self) -> dict[str, Any]:
        parts = urlsplit(self.target)
        async with aiohttp.ClientSession() as s, s.get(f"{parts.scheme}://{parts.netloc}/stats") as r:
            data: dict[str, Any] = await r.json()
            return data

    def sql(self, query: str, *params: object) -> list[tuple[Any, ...]]:
        """A read on the controller's SQLite file (WAL: safe while the controller writes)."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        try:
            return list(conn.execute(query, params).fetchall())
        finally:
            conn.close()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name} ---\n{p.log_tail(1500)}" for p in self.procs)

    async def close(self) -> None:
        await asyncio.gather(*(p.stop() for p in reversed(self.procs)), return_exceptions=True)


def seconds(value: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(int(value * 1e9))
    return d


def make_spec(
    target: str,
    stages: list[run_pb2.Stage],
    *,
    agents: int,
    selector: dict[str, str] | None = None,
    policy: int = run_pb2.AGENT_LOSS_POLICY_UNSPECIFIED,
    wait_s: float | None = None,
    output_tokens: int = 16,
) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(
        display_name="fleet",
        target=run_pb2.Target(base_url=target, model="mock", request_timeout=seconds(20)),
        stages=stages,
        placement=run_pb2.Placement(agents=agents, selector=selector or {}, on_agent_loss=policy),  # type: ignore[arg-type]
    )
    spec.workload.synthetic.input_tokens.fixed = 32
    spec.workload.synthetic.output_tokens.fixed = output_tokens
    spec.workload.seed = 7
    if wait_s is not None:
        spec.placement.wait_timeout.CopyFrom(seconds(wait_s))
    return spec


def closed(concurrency: int, duration_s: float, name: str = "") -> run_pb2.Stage:
    return run_pb2.Stage(name=name or f"c{concurrency}", concurrency=concurrency, duration=seconds(duration_s))


def open_loop(rate: float, duration_s: float, name: str = "") -> run_pb2.Stage:
    return run_pb2.Stage(
        name=name or f"r{rate:g}",
        request_rate=rate,
        duration=seconds(duration_s),
        arrival=run_pb2.ARRIVAL_PROCESS_CONSTANT,
    )


async def wait_final(client: ControllerClient, run_id: str, timeout_s: float) -> run_pb2.Run:
    final = (
        run_pb2.RUN_STATE_SUCCEEDED,
        run_pb2.RUN_STATE_FAILED,
        run_pb2.RUN_STATE_CANCELLED,
        run_pb2.RUN_STATE_INTERRUPTED,
    )
    return await eventually(lambda: client.get_run(run_id), lambda r: r.state in final, timeout_s)


def sent_times(fleet: Fleet, where: str, *params: object) -> list[tuple[int, int]]:
    """(assignment pk, sent_unix_ns) of every stored sample of the batches matching `where`
    (over `sample_batches b`, `runs r` and `assignments a`); columns are stored one blob per
    batch (controller/store/columnar.py)."""
    rows = fleet.sql(
        "SELECT b.assignment_pk, b.n_samples, b.sample_columns FROM sample_batches b JOIN runs r ON r.pk = b.run_pk"
        f" JOIN assignments a ON a.pk = b.assignment_pk WHERE {where}",
        *params,
    )
    sent = columnar.COL["sent_unix_ns"]
    return [(int(pk), int(t)) for pk, n, blob in rows for t in columnar.unpack(blob, n)[sent]]


def duplicate_samples(fleet: Fleet, run_id: str) -> int:
    """Samples stored twice (same assignment, same send time)."""
    counts = Counter(sent_times(fleet, "r.run_id = ?", run_id))
    return sum(1 for n in counts.values() if n > 1)


def stored_samples(fleet: Fleet, run_id: str) -> int:
    rows = fleet.sql(
        "SELECT COALESCE(SUM(b.n_samples), 0) FROM sample_batches b JOIN runs r ON r.pk = b.run_pk WHERE r.run_id = ?",
        run_id,
    )
    return int(rows[0][0])
