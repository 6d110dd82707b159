"""Controller ingest: columnar sample batches from 8 concurrent agent streams into SQLite.

A real controller (its own process, `bench/_controller_proc.py`, over a fresh SQLite file)
is started; `--agents` (8) agent streams connect over real gRPC (`AgentService.Connect`,
Hello first), a run with one stage over all of them is created, and each stream, once it
has its Assign, sends `--batches` pre-serialized `SampleBatch` messages of `--batch-samples`
samples (each with `--itl-per-sample` inter-token gaps), keeping at most `--window`
batches unacked, as an agent whose controller is the bottleneck would; then its final
COMPLETED update. Heartbeats go every second.

Printed per ITL size: samples committed *and acked* per second (first batch sent to last
ack), the p50/p99 ack latency (batch sent -> cumulative ack covering it), and the
controller's event-loop lag over the ingest (a 5 ms sleep probe in the controller process:
p99 and max of how late it woke). Goal: >= 300k samples/s with the loop never blocked.

    .venv/bin/python bench/controller_ingest.py                    # ~1 minute
    .venv/bin/python bench/controller_ingest.py --itl-per-sample 0 --batches 200
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from _harness import ROOT, machine, table

sys.path.insert(0, str(ROOT))

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2

CONNECT = "/loadtest.v1.AgentService/Connect"


def batch_template(samples: int, itl_per_sample: int) -> agent_service_pb2.SampleBatch:
    now = time.time_ns()
    b = agent_service_pb2.SampleBatch()
    b.sent_unix_ns.extend(now + i * 1000 for i in range(samples))
    b.queue_delay_ns.extend([50_000] * samples)
    b.first_byte_ns.extend([90_000_000] * samples)
    b.first_token_ns.extend(100_000_000 + (i % 997) * 1000 for i in range(samples))
    b.last_token_ns.extend([1_370_000_000] * samples)
    b.done_ns.extend([1_371_000_000] * samples)
    b.prompt_tokens.extend([128] * samples)
    b.output_tokens.extend([128] * samples)
    b.status.extend([run_pb2.REQUEST_STATUS_OK] * samples)
    b.flags.extend([1] * samples)
    b.itl_count.extend([itl_per_sample] * samples)
    b.itl_ns.extend(10_000_000 + (i % 313) * 1000 for i in range(samples * itl_per_sample))
    b.error.extend([""] * samples)
    b.requested_input_tokens.extend([128] * samples)
    b.requested_output_tokens.extend([128] * samples)
    return b


class FakeAgent:
    """One agent stream speaking the real protocol, sending pre-serialized batches."""

    def __init__(self, channel: grpc.aio.Channel, name: str, labels: dict[str, str]) -> None:
        self.name = name
        self.labels = labels
        self._call = channel.stream_stream(
            CONNECT, request_serializer=None, response_deserializer=agent_service_pb2.ConnectResponse.FromString
        )()
        self.assignment_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.acked = 0
        self._ack_event = asyncio.Event()
        self.sent_at: dict[int, float] = {}
        self.latencies: list[float] = []
        self.last_ack_at = 0.0
        # One write at a time on a stream: a heartbeat written while a batch write is pending
        # fails the call (GRPC_CALL_ERROR_TOO_MANY_OPERATIONS); a real agent has one writer.
        self._write_lock = asyncio.Lock()

    async def _write(self, payload: bytes) -> None:
        async with self._write_lock:
            await self._call.write(payload)

    async def hello(self) -> None:
        body = agent_service_pb2.Hello(name=self.name, version="bench", labels=self.labels)
        hello = agent_service_pb2.ConnectRequest(hello=body)
        await self._write(hello.SerializeToString())

    async def read(self) -> None:
        async for message in self._call:
            body = message.WhichOneof("body")
            if body == "assign" and not self.assignment_id.done():
                self.assignment_id.set_result(message.assign.assignment_id)
            elif body == "ack":
                now = time.perf_counter()
                for seq in range(self.acked + 1, message.ack.batch_seq + 1):
                    sent = self.sent_at.pop(seq, None)
                    if sent is not None:
                        self.latencies.append(now - sent)
                self.acked = max(self.acked, message.ack.batch_seq)
                self.last_ack_at = now
                self._ack_event.set()

    async def heartbeat(self) -> None:
        while True:
            hb = agent_service_pb2.ConnectRequest(heartbeat=agent_service_pb2.Heartbeat())
            hb.heartbeat.agent_time.GetCurrentTime()
            await self._write(hb.SerializeToString())
            await asyncio.sleep(1.0)

    async def send_batches(self, payloads: list[bytes], window: int) -> None:
        aid = await self.assignment_id
        update = agent_service_pb2.AssignmentUpdate(assignment_id=aid, state=agent_service_pb2.ASSIGNMENT_STATE_RUNNING)
        running = agent_service_pb2.ConnectRequest(assignment_update=update)
        await self._write(running.SerializeToString())
        for seq, payload in enumerate(payloads, start=1):
            while seq - self.acked > window:
                self._ack_event.clear()
                await self._ack_event.wait()
            self.sent_at[seq] = time.perf_counter()
            await self._write(payload)
        while self.acked < len(payloads):
            self._ack_event.clear()
            await self._ack_event.wait()

    async def complete(self, batches: int) -> None:
        aid = await self.assignment_id
        done = agent_service_pb2.ConnectRequest(
            assignment_update=agent_service_pb2.AssignmentUpdate(
                assignment_id=aid, state=agent_service_pb2.ASSIGNMENT_STATE_COMPLETED, batch_count=batches
            )
        )
        await self._write(done.SerializeToString())

    async def close(self) -> None:
        await self._call.done_writing()


def payloads_for(template: agent_service_pb2.SampleBatch, aid: str, batches: int) -> list[bytes]:
    out = []
    for seq in range(1, batches + 1):
        template.assignment_id = aid
        template.batch_seq = seq
        out.append(agent_service_pb2.ConnectRequest(sample_batch=template).SerializeToString())
    return out


async def run_ingest(address: str, args: argparse.Namespace, itl_per_sample: int) -> dict[str, Any]:
    template = batch_template(args.batch_samples, itl_per_sample)
    async with ControllerClient(address) as client:
        channels = [grpc.aio.insecure_channel(address) for _ in range(args.agents)]
        labels = {"bench": str(itl_per_sample)}  # each round's run picks only that round's streams
        agents = [FakeAgent(ch, f"bench-{itl_per_sample}-{i}", labels) for i, ch in enumerate(channels)]
        readers = []
        for agent in agents:
            await agent.hello()
            readers.append(asyncio.create_task(agent.read()))
        beats = [asyncio.create_task(a.heartbeat()) for a in agents]
        await _wait_agents(client, len(agents), labels)
        spec = run_pb2.RunSpec(display_name="ingest-bench")
        spec.target.base_url = "http://127.0.0.1:9/v1"
        spec.skip_preflight = True  # the fake agents answer no preflight check
        spec.target.model = "mock"
        spec.workload.synthetic.input_tokens.fixed = 128
        spec.workload.synthetic.output_tokens.fixed = 128
        spec.placement.agents = args.agents
        stage = spec.stages.add(concurrency=args.agents)
        stage.duration.FromNanoseconds(int(600e9))
        spec.placement.selector.update(labels)
        run = await client.create_run(spec)
        aids = await asyncio.wait_for(asyncio.gather(*(a.assignment_id for a in agents)), 60)
        payloads = [payloads_for(template, aid, args.batches) for aid in aids]
        start_ns = time.time_ns()
        started = time.perf_counter()
        await asyncio.gather(*(a.send_batches(p, args.window) for a, p in zip(agents, payloads, strict=True)))
        ended = max(a.last_ack_at for a in agents)
        end_ns = start_ns + int((ended - started) * 1e9)
        for agent in agents:
            await agent.complete(args.batches)
        for b in beats:
            b.cancel()
        final = await _wait_final(client, run.id)
        for agent in agents:
            await agent.close()
        for r in readers:
            r.cancel()
        for ch in channels:
            await ch.close()
    lat = np.asarray([x for a in agents for x in a.latencies]) * 1000.0
    samples = args.agents * args.batches * args.batch_samples
    return {
        "itl": itl_per_sample,
        "samples": samples,
        "seconds": ended - started,
        "rate": samples / (ended - started),
        "ack_p50": float(np.percentile(lat, 50)),
        "ack_p99": float(np.percentile(lat, 99)),
        "window": (start_ns, end_ns),
        "state": run_pb2.RunState.Name(final.state),
        # Counted by the controller at commit: every sample sent must be stored exactly once.
        "stored": final.progress.requests_ok + final.progress.requests_failed,
    }


async def _wait_agents(client: ControllerClient, n: int, labels: dict[str, str]) -> None:
    deadline = time.monotonic() + 30
    while sum(dict(a.labels) == labels for a in await client.list_agents()) < n:
        if time.monotonic() > deadline:
            raise RuntimeError("agents did not register")
        await asyncio.sleep(0.05)


async def _wait_final(client: ControllerClient, run_id: str) -> run_pb2.Run:
    deadline = time.monotonic() + 120
    while True:
        run = await client.get_run(run_id)
        if run.state not in (run_pb2.RUN_STATE_PENDING, run_pb2.RUN_STATE_RUNNING) or time.monotonic() > deadline:
            return run
        await asyncio.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--agents", type=int, default=8, help="concurrent agent streams (default: %(default)s)")
    parser.add_argument("--batches", type=int, default=100, help="batches per agent (default: %(default)s)")
    parser.add_argument("--batch-samples", type=int, default=512, help="samples per batch (default: %(default)s)")
    parser.add_argument(
        "--itl-per-sample",
        default="0,16",
        help="comma-separated ITL values per sample, one round each (default: %(default)s)",
    )
    parser.add_argument("--window", type=int, default=16, help="unacked batches per agent (default: %(default)s)")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        db, lag_out = str(Path(tmp) / "ingest.db"), str(Path(tmp) / "lag.npy")
        proc = subprocess.Popen(
            [sys.executable, str(ROOT / "bench" / "_controller_proc.py"), "--db", db, "--lag-out", lag_out],
            stdout=subprocess.PIPE,
            text=True,
            cwd=ROOT,
        )
        results = []
        try:
            assert proc.stdout is not None
            port = int(proc.stdout.readline().split()[1])
            for itl in (int(x) for x in args.itl_per_sample.split(",")):
                results.append(asyncio.run(run_ingest(f"127.0.0.1:{port}", args, itl)))
                print(f"  itl/sample {itl}: {results[-1]['rate']:.0f} samples/s", flush=True)
        finally:
            proc.terminate()
            proc.wait(30)
        lags = np.load(lag_out)
        db_mb = Path(db).stat().st_size / 1e6
    rows = []
    for r in results:
        start, end = r["window"]
        sel = lags[(lags[:, 0] >= start) & (lags[:, 0] <= end), 1]
        rows.append(
            [
                args.agents,
                r["itl"],
                r["samples"],
                round(r["seconds"], 2),
                round(r["rate"]),
                round(r["ack_p50"], 1),
                round(r["ack_p99"], 1),
                round(float(np.percentile(sel, 99)), 1) if len(sel) else "-",
                round(float(sel.max()), 1) if len(sel) else "-",
                r["stored"],
                r["state"],
            ]
        )
    print(
        f"\nbatches of {args.batch_samples} samples, {args.batches} per agent, window {args.window}; "
        f"db {db_mb:.0f} MB at the end"
    )
    print(
        table(
            [
                "agents",
                "ITL/sample",
                "samples",
                "s",
                "samples/s committed+acked",
                "ack p50 ms",
                "ack p99 ms",
                "loop lag p99 ms",
                "loop lag max ms",
                "stored",
                "run",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
