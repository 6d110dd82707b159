"""`llm-loadtest quickstart`: a real benchmark on one machine with no setup.

Starts the mock model server, a controller and one agent as separate processes on
127.0.0.1 (each on a port it picks and reports), runs a concurrency sweep against the
mock, prints the per-stage table and shuts everything down. The run stays in the
database file; the last lines say how to look at it again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shlex
import signal
import sys
import tempfile
from pathlib import Path

from client import commands, spec_builder
from client.sdk import ControllerClient

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 15.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--db", default="llm-loadtest.db", help="SQLite database file (kept after the run)")
    parser.add_argument("--concurrency", type=spec_builder.int_list, default=[1, 8, 32], help="stages (default 1,8,32)")
    parser.add_argument(
        "--duration", type=spec_builder.duration, default=10.0, help="duration of each stage (default 10s)"
    )
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="mock time to first token")
    parser.add_argument("--itl-ms", type=float, default=10.0, help="mock inter-token latency")
    parser.add_argument("--output-tokens", type=int, default=64, help="tokens per response")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


class _Process:
    def __init__(self, name: str, proc: asyncio.subprocess.Process, log_path: Path) -> None:
        self.name, self.proc, self.log_path = name, proc, log_path

    async def ready_line(self, marker: str) -> str:
        assert self.proc.stdout is not None
        async with asyncio.timeout(START_TIMEOUT_S):
            while True:
                line = (await self.proc.stdout.readline()).decode()
                if not line:
                    raise RuntimeError(f"{self.name} exited early; see {self.log_path}")
                if marker in line:
                    return line.strip()

    async def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(STOP_TIMEOUT_S):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


async def _spawn(name: str, args: list[str], log_dir: Path) -> _Process:
    log_path = log_dir / f"{name}.log"
    log_file = log_path.open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "client.cli",
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=log_file,
        stdin=asyncio.subprocess.DEVNULL,
    )
    log_file.close()
    return _Process(name, proc, log_path)


async def _wait_for_agent(client: ControllerClient) -> None:
    async with asyncio.timeout(START_TIMEOUT_S):
        while not await client.list_agents():  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.1)


def _print_next_steps(run_id: str, db_file: Path) -> None:
    """The commands that look at the run afterwards: read from the database file, since the
    controller stops with the quickstart."""
    db = shlex.quote(str(db_file))
    print(
        f"""
look at this run again (no controller needed, the database file is read directly):
  llm-loadtest runs result {run_id} --db {db}
  llm-loadtest report {run_id} --db {db} -o report.html
  llm-loadtest runs export {run_id} --db {db} --format csv -o samples.csv""",
        file=sys.stderr,
    )


async def quickstart(args: argparse.Namespace) -> int:
    db_file = Path(args.db).resolve()  # noqa: ASYNC240 - once, before anything runs
    log_dir = Path(tempfile.mkdtemp(prefix="llm-loadtest-quickstart-"))
    procs: list[_Process] = []
    try:
        print("starting mock model server, controller and one agent on 127.0.0.1 ...", file=sys.stderr)
        mock = await _spawn(
            "mock-server",
            [
                "mock-server",
                "--port",
                "0",
                "--ttft-ms",
                str(args.ttft_ms),
                "--itl-ms",
                str(args.itl_ms),
                "--output-tokens",
                str(args.output_tokens),
            ],
            log_dir,
        )
        procs.append(mock)
        target = (await mock.ready_line("listening on")).rsplit(" ", 1)[-1]
        controller = await _spawn("controller", ["controller", "--listen", "127.0.0.1:0", "--db", args.db], log_dir)
        procs.append(controller)
        address = (await controller.ready_line("listening on")).rsplit(" ", 1)[-1]
        agent = await _spawn("agent", ["agent", "--controller", address, "--name", "quickstart-agent"], log_dir)
        procs.append(agent)
        async with ControllerClient(address, timeout_s=10.0) as client:
            await _wait_for_agent(client)
            print(f"mock at {target}, controller at {address}, database {db_file}", file=sys.stderr)
            run_args = spec_builder.spec_parser().parse_args(
                [
                    "--target",
                    target,
                    "--model",
                    "mock",
                    "--name",
                    "quickstart",
                    "--concurrency",
                    ",".join(map(str, args.concurrency)),
                    "--duration",
                    f"{args.duration}s",
                    "--output-tokens",
                    str(args.output_tokens),
                ]
            )
            run_args.json = args.json
            run = await client.create_run(spec_builder.build_spec(run_args))
            print(f"created run {run.id}", file=sys.stderr, flush=True)
            result = await commands.watch_until_done(client, run.id)
            run = await client.get_run(run.id)
        code = commands.print_result(run_args, run, result)
        _print_next_steps(run.id, db_file)
        return code
    except (RuntimeError, TimeoutError) as exc:
        print(f"quickstart failed: {exc or 'timed out'}; logs in {log_dir}", file=sys.stderr)
        return 1
    finally:
        for proc in reversed(procs):
            with contextlib.suppress(ProcessLookupError):
                await proc.stop()
