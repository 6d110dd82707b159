"""How a closed loop's start affects measured TTFT: lockstep vs spread starts, with and without
pre-opened connections.

Starts the mock model server in its own process (`llm-loadtest mock-server --port 0`), runs
one agent assignment (closed loop, N workers) against it for each variant in this process
(uvloop, like `llm-loadtest agent`), and prints TTFT / ITL / queue-delay figures from the
samples the agent emitted. The mock's TTFT is exact, so anything above it is queueing in the
agent, the mock or the kernel.

    .venv/bin/python bench/agent_stream_start.py --concurrency 300 --duration 10

Variants: `lockstep` (all workers start at once, no pre-opened connections: the previous
behaviour), `spread` (first requests spread over min(1 s, 2 ms x N)), `preconnect`
(connections opened first, lockstep start) and `spread+preconnect` (the default now).
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import uvloop

import agent.assignment
import agent.scheduler
from agent.assignment import AssignmentRunner
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2

VARIANTS = {
    "lockstep": (0.0, 0),
    "spread": (agent.scheduler.START_WINDOW_PER_WORKER_S, 0),
    "preconnect": (0.0, agent.assignment.MAX_PRECONNECT),
    "spread+preconnect": (agent.scheduler.START_WINDOW_PER_WORKER_S, agent.assignment.MAX_PRECONNECT),
}


@contextlib.contextmanager
def mock_server(ttft_ms: float, itl_ms: float, output_tokens: int) -> Iterator[str]:
    exe = Path(sys.executable).with_name("llm-loadtest")
    cmd = [str(exe), "mock-server", "--port", "0", "--ttft-ms", str(ttft_ms), "--itl-ms", str(itl_ms)]
    cmd += ["--output-tokens", str(output_tokens)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        if "listening on" not in line:
            raise RuntimeError(f"mock server did not start: {line!r}")
        yield line.rsplit(" ", 1)[-1].strip()
    finally:
        proc.terminate()
        proc.wait(10)


def assign(base_url: str, concurrency: int, duration_s: float) -> agent_service_pb2.Assign:
    stage = run_pb2.Stage(concurrency=concurrency)
    stage.duration.FromNanoseconds(int(duration_s * 1e9))
    return agent_service_pb2.Assign(
        assignment_id="bench",
        run_id="bench",
        target=run_pb2.Target(base_url=base_url, model="mock"),
        workload=run_pb2.Workload(
            seed=1,
            synthetic=run_pb2.SyntheticWorkload(
                input_tokens=run_pb2.LengthDistribution(fixed=128),
                output_tokens=run_pb2.LengthDistribution(fixed=64),
            ),
        ),
        stage=stage,
    )


async def run_variant(base_url: str, concurrency: int, duration_s: float) -> list[agent_service_pb2.SampleBatch]:
    messages: list[agent_service_pb2.ConnectRequest] = []
    runner = AssignmentRunner(assign(base_url, concurrency, duration_s), messages.append)
    await runner.start()
    return [m.sample_batch for m in messages if m.HasField("sample_batch")]


def report(name: str, batches: list[agent_service_pb2.SampleBatch], concurrency: int, elapsed_s: float) -> None:
    sent = np.concatenate([np.asarray(b.sent_unix_ns) for b in batches])
    ttft = np.concatenate([np.asarray(b.first_token_ns) for b in batches]) / 1e6
    queue = np.concatenate([np.asarray(b.queue_delay_ns) for b in batches]) / 1e6
    done = np.concatenate([np.asarray(b.done_ns) for b in batches])
    itl = np.concatenate([np.asarray(b.itl_ns) for b in batches]) / 1e6
    ok = np.concatenate([np.asarray(b.status) for b in batches]) == run_pb2.REQUEST_STATUS_OK
    order = np.argsort(sent, kind="stable")
    first = order[:concurrency]  # the first request of every worker
    p = np.percentile
    window = (sent + done).max() - sent.min()
    print(
        f"{name:18s} n={len(sent):5d} ok={int(ok.sum()):5d} "
        f"ttft p50={p(ttft, 50):6.1f} p90={p(ttft, 90):6.1f} p99={p(ttft, 99):6.1f} ms | "
        f"first-wave ttft p50={p(ttft[first], 50):6.1f} p99={p(ttft[first], 99):6.1f} | "
        f"itl p50={p(itl, 50):5.1f} p99={p(itl, 99):5.1f} | "
        f"queue p99={p(queue, 99):5.2f} ms | in-flight={done.sum() / window:6.1f} | wall={elapsed_s:5.1f}s",
        flush=True,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, default=300)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    args = parser.parse_args()
    print(f"closed loop N={args.concurrency}, {args.duration:g} s, mock ttft 50 ms, itl 10 ms, 64 tokens")
    for _ in range(args.repeat):
        for name in args.variants.split(","):
            per_worker_s, preconnect = VARIANTS[name]
            agent.scheduler.START_WINDOW_PER_WORKER_S = per_worker_s
            agent.assignment.MAX_PRECONNECT = preconnect
            with mock_server(50, 10, 64) as base_url:  # a fresh server per variant
                started = time.perf_counter()
                batches = uvloop.run(run_variant(base_url, args.concurrency, args.duration))
                report(name, batches, args.concurrency, time.perf_counter() - started)


if __name__ == "__main__":
    main()
