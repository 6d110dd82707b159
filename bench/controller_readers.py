"""Readers beside a running benchmark: do ListRuns pollers and WatchRun watchers delay heartbeats?

1. A real controller (`bench/_controller_proc.py`, fresh SQLite file, per-caller rate limits
   off: the worst case) stores one run whose spec carries `--labels` labels of
   `--key-chars`/`--value-chars` characters (default: the most a spec may carry); stopped, the
   file gets `--runs` copies of that run (as `bench/controller_queries.py` does), so every
   ListRuns page is as big as stored specs can make it.
2. Started again with a real agent (`llm-loadtest agent`) and the mock server, it runs two
   runs of `--duration` s each (closed loop, `--concurrency` streams, placed on that agent):
   * quiet: nothing else talks to the controller;
   * readers: a separate process runs `--pollers` ListRuns loops (page 50, back to back,
     walking pages) and `--watchers` WatchRun streams on the running run.
   During both, a probe stream in this process speaks the agent protocol (`Connect`, Hello,
   then a Heartbeat every `--probe-interval` s; it is never placed: its labels match no run)
   and records the round trip of every heartbeat (sent -> its HeartbeatAck) and the gaps
   between acks: what an agent sees of the controller's heartbeat handling. The controller's
   own event-loop lag (a 5 ms sleep probe in its process) is split by run.
Printed: each run's final state, the probe's heartbeat round trip p50/p99/max and largest
gap between acks, the controller's loop lag p99/max, and the readers' throughput; the
loaded figures as ratios of the quiet run's (the floor, measured in the same invocation).
An agent is declared lost after 3 s without a heartbeat (3 intervals of 1 s), so the
goal is: the loaded run SUCCEEDS and its heartbeat max stays far below 3 s.

    .venv/bin/python bench/controller_readers.py                 # ~1.5 minutes
    .venv/bin/python bench/controller_readers.py --labels 2000 --value-chars 1000 --runs 200
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from _harness import CLI, ROOT, machine, mock_server, table
from controller_queries import add_runs, start_controller, stop_controller

sys.path.insert(0, str(ROOT))

from client.sdk import ControllerClient
from common.codes import FINAL_RUN_STATES
from common.proto.loadtest.v1 import agent_service_pb2, agent_service_pb2_grpc, run_pb2
from common.tls import open_channel


def labelled_spec(args: argparse.Namespace) -> run_pb2.RunSpec:
    """The template run: as many labels as allowed, never placed (it fails after 1 s)."""
    spec = run_pb2.RunSpec(display_name="readers-bench template")
    spec.target.base_url = "http://127.0.0.1:9/v1"
    spec.target.model = "mock"
    spec.stages.add(concurrency=1).duration.FromSeconds(1)
    spec.placement.selector["pool"] = "nobody"
    spec.placement.wait_timeout.FromSeconds(1)
    for i in range(args.labels):
        key = f"k{i:05d}".ljust(args.key_chars, "k")
        spec.labels[key] = "v" * args.value_chars
    return spec


def load_spec(base_url: str, args: argparse.Namespace) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(display_name="readers-bench load")
    spec.target.base_url = base_url
    spec.target.model = "mock"
    spec.workload.synthetic.input_tokens.fixed = 64
    spec.workload.synthetic.output_tokens.fixed = 32
    spec.stages.add(concurrency=args.concurrency).duration.FromNanoseconds(int(args.duration * 1e9))
    spec.placement.selector["pool"] = "load"
    return spec


async def wait_final(client: ControllerClient, run_id: str, timeout_s: float) -> run_pb2.Run:
    deadline = time.monotonic() + timeout_s
    while True:
        run = await client.get_run(run_id)
        if run.state in FINAL_RUN_STATES or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.2)


class HeartbeatProbe:
    """An agent-protocol stream that only heartbeats, timing each HeartbeatAck."""

    def __init__(self, address: str, interval_s: float) -> None:
        self._channel = open_channel(address, None)
        self._interval_s = interval_s
        self._queue: asyncio.Queue[agent_service_pb2.ConnectRequest] = asyncio.Queue()
        self._sent: dict[int, float] = {}
        self.acks: list[tuple[float, float]] = []  # (received at, round trip s), perf_counter clock
        self._tasks: list[asyncio.Task[None]] = []

    async def _requests(self) -> Any:
        hello = agent_service_pb2.Hello(name="heartbeat-probe", version="bench", labels={"pool": "probe"})
        yield agent_service_pb2.ConnectRequest(hello=hello)
        while True:
            yield await self._queue.get()

    async def start(self) -> None:
        call = agent_service_pb2_grpc.AgentServiceStub(self._channel).Connect(self._requests())
        self._tasks = [asyncio.create_task(self._read(call)), asyncio.create_task(self._beat())]

    async def _beat(self) -> None:
        while True:
            hb = agent_service_pb2.ConnectRequest(heartbeat=agent_service_pb2.Heartbeat())
            now_ns = time.time_ns()
            hb.heartbeat.agent_time.FromNanoseconds(now_ns)
            self._sent[now_ns] = time.perf_counter()
            self._queue.put_nowait(hb)
            await asyncio.sleep(self._interval_s)

    async def _read(self, call: Any) -> None:
        async for message in call:
            if message.WhichOneof("body") == "heartbeat_ack":
                now = time.perf_counter()
                sent = self._sent.pop(message.heartbeat_ack.agent_send_unix_ns, None)
                if sent is not None:
                    self.acks.append((now, now - sent))

    def between(self, t0: float, t1: float) -> dict[str, float]:
        """Round-trip percentiles and the largest gap between acks received in [t0, t1], ms."""
        times = np.asarray([a for a, _ in self.acks if t0 <= a <= t1])
        rtt = np.asarray([r for a, r in self.acks if t0 <= a <= t1]) * 1000.0
        if len(rtt) < 2:
            return {
                "n": float(len(rtt)),
                "p50": float("nan"),
                "p99": float("nan"),
                "max": float("nan"),
                "gap": float("nan"),
            }
        return {
            "n": float(len(rtt)),
            "p50": float(np.percentile(rtt, 50)),
            "p99": float(np.percentile(rtt, 99)),
            "max": float(rtt.max()),
            "gap": float(np.diff(times).max() * 1000.0),
        }

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._channel.close()


async def readers_child(address: str, run_id: str, pollers: int, watchers: int, seconds: float) -> None:
    """The readers (in their own process, so their CPU is not the probe's): print their counts."""
    counts = {"list_calls": 0, "list_bytes": 0, "list_errors": 0, "watch_updates": 0, "watch_errors": 0}
    stop_at = time.monotonic() + seconds
    async with ControllerClient(address, timeout_s=30.0) as client:

        async def poll() -> None:
            token = ""
            while time.monotonic() < stop_at:
                try:
                    page = await client.list_runs(page_size=50, page_token=token)
                except Exception:  # counted: the figure is how many calls failed
                    counts["list_errors"] += 1
                    await asyncio.sleep(0.05)
                    continue
                counts["list_calls"] += 1
                counts["list_bytes"] += page.ByteSize()
                token = page.next_page_token

        async def watch() -> None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, stop_at - time.monotonic())):
                    try:
                        async for _ in client.watch(run_id):
                            counts["watch_updates"] += 1
                    except Exception:  # counted
                        counts["watch_errors"] += 1

        await asyncio.gather(*(poll() for _ in range(pollers)), *(watch() for _ in range(watchers)))
    print(json.dumps(counts), flush=True)


async def one_run(
    client: ControllerClient,
    probe: HeartbeatProbe,
    base_url: str,
    args: argparse.Namespace,
    address: str,
    with_readers: bool,
) -> dict[str, Any]:
    run = await client.create_run(load_spec(base_url, args))
    t0_wall, t0 = time.time_ns(), time.perf_counter()
    readers: asyncio.subprocess.Process | None = None
    if with_readers:
        readers = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--readers-child",
            address,
            run.id,
            str(args.pollers),
            str(args.watchers),
            str(args.duration + 5),
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
        )
    final = await wait_final(client, run.id, args.duration + 60)
    t1_wall, t1 = time.time_ns(), time.perf_counter()
    counts: dict[str, int] = {}
    if readers is not None:
        out, _ = await readers.communicate()
        counts = json.loads(out.decode().strip().splitlines()[-1]) if out.strip() else {}
    return {
        "state": run_pb2.RunState.Name(final.state),
        "reason": final.state_reason,
        "probe": probe.between(t0, t1),
        "wall": (t0_wall, t1_wall),
        "seconds": t1 - t0,
        "counts": counts,
        "requests_ok": final.progress.requests_ok,
    }


async def measure(address: str, base_url: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    probe = HeartbeatProbe(address, args.probe_interval)
    async with ControllerClient(address, timeout_s=30.0) as client:
        await client.wait_ready(30)
        deadline = time.monotonic() + 30
        while not any(a.labels.get("pool") == "load" for a in await client.list_agents()):
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not connect")
            await asyncio.sleep(0.1)
        await probe.start()
        try:
            return [await one_run(client, probe, base_url, args, address, with_readers=w) for w in (False, True)]
        finally:
            await probe.close()


def lag_between(lag: np.ndarray[Any, Any], wall: tuple[int, int]) -> tuple[float, float]:
    inside = lag[(lag[:, 0] >= wall[0]) & (lag[:, 0] <= wall[1]), 1]
    return (float(np.percentile(inside, 99)), float(inside.max())) if len(inside) else (float("nan"), float("nan"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000, help="stored runs with big specs (default: %(default)s)")
    parser.add_argument("--labels", type=int, default=64, help="labels per stored run (default: %(default)s)")
    parser.add_argument("--key-chars", type=int, default=128, help="characters per label key (default: %(default)s)")
    parser.add_argument("--value-chars", type=int, default=256, help="characters per value (default: %(default)s)")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds per run (default: %(default)s)")
    parser.add_argument("--concurrency", type=int, default=8, help="streams of the runs (default: %(default)s)")
    parser.add_argument("--pollers", type=int, default=8, help="ListRuns loops (default: %(default)s)")
    parser.add_argument("--watchers", type=int, default=200, help="WatchRun streams (default: %(default)s)")
    parser.add_argument("--probe-interval", type=float, default=0.1, help="probe heartbeat s (default: %(default)s)")
    parser.add_argument(
        "--readers-child", nargs=5, metavar=("ADDRESS", "RUN", "POLLERS", "WATCHERS", "SECONDS"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.readers_child:
        address, run_id, pollers, watchers, seconds = args.readers_child
        asyncio.run(readers_child(address, run_id, int(pollers), int(watchers), float(seconds)))
        return
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-readers-") as tmp:
        db = str(Path(tmp) / "readers.db")
        proc, address = start_controller(db, tmp)
        try:

            async def template() -> int:
                async with ControllerClient(address, timeout_s=60.0) as client:
                    await client.wait_ready(30)
                    run = await client.create_run(labelled_spec(args))
                    await wait_final(client, run.id, 30)
                    return run.spec.ByteSize()

            spec_bytes = asyncio.run(template())
        finally:
            stop_controller(proc)
        add_runs(db, args.runs)
        print(f"  {args.runs + 1} stored runs of {spec_bytes} spec bytes ({args.labels} labels)", flush=True)
        with mock_server(20.0, 5.0, 32, cpu=None) as base_url:
            proc, address = start_controller(db, tmp)
            agent_log = (Path(tmp) / "agent.log").open("wb")
            agent = subprocess.Popen(
                [CLI, "agent", "--controller", address, "--name", "load", "--label", "pool=load"],
                stdout=agent_log,
                stderr=agent_log,
                cwd=ROOT,
            )
            try:
                runs = asyncio.run(measure(address, base_url, args))
            finally:
                agent.terminate()
                agent.wait(30)
                agent_log.close()
                stop_controller(proc)
            lag = np.load(Path(tmp) / "lag.npy")
    quiet, loaded = runs
    rows = []
    for name, r in (("quiet", quiet), ("readers", loaded)):
        lag_p99, lag_max = lag_between(lag, r["wall"])
        p = r["probe"]
        rows.append(
            [
                name,
                r["state"],
                r["requests_ok"],
                int(p["n"]),
                round(p["p50"], 1),
                round(p["p99"], 1),
                round(p["max"], 1),
                round(p["gap"], 1),
                round(lag_p99, 1),
                round(lag_max, 1),
            ]
        )
    print(
        f"\ncontroller + 1 agent + mock; {args.duration:g} s runs at concurrency {args.concurrency}; "
        f"{args.runs + 1} stored runs of {spec_bytes} spec bytes"
    )
    print(
        table(
            [
                "run",
                "state",
                "requests",
                "heartbeats",
                "hb rtt p50 ms",
                "hb rtt p99 ms",
                "hb rtt max ms",
                "max ack gap ms",
                "loop lag p99 ms",
                "loop lag max ms",
            ],
            rows,
        )
    )
    q, lo = quiet["probe"], loaded["probe"]
    print(
        f"\nreaders / quiet: heartbeat rtt p99 x{lo['p99'] / q['p99']:.1f}, max x{lo['max'] / q['max']:.1f}; "
        f"max gap between acks x{lo['gap'] / q['gap']:.1f} (probe interval {args.probe_interval * 1000:.0f} ms)"
    )
    c, secs = loaded["counts"], loaded["seconds"]
    if c:
        print(
            f"readers: {c['list_calls'] / secs:.0f} ListRuns/s ({c['list_bytes'] / secs / 1e6:.1f} MB/s, "
            f"{c['list_errors']} failed), {c['watch_updates'] / secs:.0f} WatchRun updates/s "
            f"({c['watch_errors']} streams failed)"
        )
    for name, r in (("quiet", quiet), ("readers", loaded)):
        if r["state"] != "RUN_STATE_SUCCEEDED":
            print(f"{name} run {r['state']}: {r['reason']}")


if __name__ == "__main__":
    main()
