"""Controller memory: RSS of a real controller process before and after large requests.

A real `llm-loadtest controller` process (fresh SQLite file, rate limits raised out of the
way) is measured idle (after a first call), then after each of these, in order, every figure read from /proc/PID/status
(VmRSS: resident now; VmHWM: the peak so far):

1. one run of `--samples` samples ingested over 8 real agent streams (as
   `bench/controller_ingest.py` does), finished, its result computed and stored;
2. `--result-calls` GetRunResult of that run;
3. one ExportRunSamples of it (every sample);
4. `--datasets` CreateRun with a dataset near the 8 MiB limit (each then cancelled);
5. `--runs` CreateRun with 32 labels each, then `--list-calls` ListRuns of 1,000 runs;
6. `--settle-s` seconds without calls ("kept": what the controller holds on to).

Every figure is printed as a ratio to the idle RSS measured in the same run, so results from
machines of different speed and allocators compare. About a minute with the defaults.

    .venv/bin/python bench/controller_memory.py
    .venv/bin/python bench/controller_memory.py --samples 500000 --datasets 8
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import CLI, ROOT, machine, table
from controller_ingest import run_ingest

sys.path.insert(0, str(ROOT))

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.domain.datasets import MAX_DATASET_BYTES


def start_controller(db: str) -> tuple[subprocess.Popen[str], str]:
    """The real controller command, as deployed (its own allocator settings included)."""
    limits = [f"--{kind}-{what}={1e6}" for kind in ("write", "read") for what in ("rate-limit", "burst")]
    proc = subprocess.Popen(
        [CLI, "controller", "--listen", "127.0.0.1:0", "--db", db, "--log-level", "warning", *limits],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    return proc, proc.stdout.readline().split()[-1]


def stop_controller(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(60)


def status_mb(pid: int) -> dict[str, float]:
    """VmRSS (of which RssAnon: heap and other private memory; RssFile: mapped files, e.g.
    SQLite's mmap of the database) and VmHWM of `pid`, MB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
            out[name] = int(value.split()[0]) / 1024
    return out


def big_dataset() -> str:
    """JSONL just under the dataset limit (8 MiB): ~100k prompts of ~80 bytes."""
    lines = []
    size = 0
    i = 0
    while True:
        line = json.dumps({"prompt": f"prompt {i}: " + "lorem ipsum dolor sit amet " * 2}) + "\n"
        if size + len(line) > MAX_DATASET_BYTES - 1024:
            return "".join(lines)
        lines.append(line)
        size += len(line)
        i += 1


def pending_spec(name: str) -> run_pb2.RunSpec:
    """A valid run no agent matches (it stays PENDING until cancelled)."""
    spec = run_pb2.RunSpec(display_name=name)
    spec.target.base_url = "http://127.0.0.1:9/v1"
    spec.target.model = "mock"
    spec.placement.selector.update({"nobody": "here"})
    stage = spec.stages.add(concurrency=1)
    stage.duration.FromSeconds(5)
    return spec


async def phases(
    address: str, pid: int, run_id: str, args: argparse.Namespace, measure: list[tuple[str, dict[str, float]]]
) -> None:
    async with ControllerClient(address) as client:
        await client.wait_ready(30)
        for _ in range(args.result_calls):
            await client.get_result(run_id)
        measure.append((f"{args.result_calls} x GetRunResult", status_mb(pid)))
        exported = 0
        async for _ in client.export_samples(run_id, page_size=10_000):
            exported += 1
        measure.append((f"ExportRunSamples ({exported} samples)", status_mb(pid)))
        content = big_dataset()
        for i in range(args.datasets):
            spec = pending_spec(f"dataset-{i}")
            spec.workload.dataset.format = run_pb2.DATASET_FORMAT_JSONL
            spec.workload.dataset.content = content
            run = await client.create_run(spec)
            await client.cancel_run(run.id)
        measure.append((f"{args.datasets} x CreateRun, {len(content) / 2**20:.1f} MiB dataset", status_mb(pid)))
        for i in range(args.runs):
            spec = pending_spec(f"list-{i}")
            spec.labels.update({f"label-{j}": f"value-{i}-{j}-" + "x" * 40 for j in range(32)})
            await client.create_run(spec)
        listed = 0
        for _ in range(args.list_calls):
            listed = len((await client.list_runs(page_size=1000)).runs)
        measure.append((f"{args.runs} x CreateRun, {args.list_calls} x ListRuns of {listed}", status_mb(pid)))
    await asyncio.sleep(args.settle_s)  # the figure *is* what remains after a quiet while
    measure.append((f"kept: {args.settle_s:g} s later, no calls", status_mb(pid)))


async def idle(address: str, pid: int) -> dict[str, float]:
    async with ControllerClient(address) as client:
        await client.wait_ready(30)
        await client.list_runs(page_size=10)
    return status_mb(pid)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200_000, help="samples of the big run (default: %(default)s)")
    parser.add_argument("--result-calls", type=int, default=3, help="GetRunResult calls (default: %(default)s)")
    parser.add_argument("--datasets", type=int, default=4, help="CreateRun with a big dataset (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=1000, help="runs created for ListRuns (default: %(default)s)")
    parser.add_argument("--list-calls", type=int, default=5, help="ListRuns of 1,000 runs (default: %(default)s)")
    parser.add_argument("--settle-s", type=float, default=3.0, help="quiet time before 'kept' (default: %(default)s)")
    args = parser.parse_args()
    print(machine())
    agents, per_batch = 8, 512
    ingest_args = argparse.Namespace(
        agents=agents, batches=max(1, round(args.samples / (agents * per_batch))), batch_samples=per_batch, window=16
    )
    measure: list[tuple[str, dict[str, float]]] = []
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        db = str(Path(tmp) / "memory.db")
        proc, address = start_controller(db)
        try:
            measure.append(("idle (after a first call)", asyncio.run(idle(address, proc.pid))))
            t = time.perf_counter()
            ingest = asyncio.run(run_ingest(address, ingest_args, 8))
            samples = agents * ingest_args.batches * per_batch
            measure.append((f"ingest of {samples} samples, run {ingest['state']}", status_mb(proc.pid)))
            print(f"  ingested {samples} samples in {time.perf_counter() - t:.1f} s", flush=True)
            run_id = sqlite3.connect(db).execute("SELECT run_id FROM runs ORDER BY pk LIMIT 1").fetchone()[0]
            asyncio.run(phases(address, proc.pid, run_id, args, measure))
        finally:
            stop_controller(proc)
    base = measure[0][1]["VmRSS"]
    rows = [
        [
            name,
            round(m["VmRSS"]),
            f"{m['VmRSS'] / base:.2f}",
            round(m["RssAnon"]),
            round(m["RssFile"]),
            round(m["VmHWM"]),
            f"{m['VmHWM'] / base:.2f}",
        ]
        for name, m in measure
    ]
    print(f"\nController RSS (idle: {base:.0f} MB = 1.00; anon: heap, file: mapped database and libraries)")
    print(table(["after", "RSS MB", "RSS / idle", "anon MB", "file MB", "peak MB", "peak / idle"], rows))


if __name__ == "__main__":
    main()
