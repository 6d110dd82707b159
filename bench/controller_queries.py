"""Controller queries: ListRuns with 100k runs stored, GetRunResult on a run with 1M samples.

1. A real controller (`bench/_controller_proc.py`, fresh SQLite file) ingests one run of
   `--samples` samples (default 1M, `--itl-per-sample` gaps each) over 8 real agent
   streams (as `bench/controller_ingest.py` does); the streams' COMPLETED updates finish the
   run, and the controller computes and stores its result in the background. As soon as the
   run is seen final, one `GetRunResult` is timed (it waits for that computation or reads the
   stored row); the computation's own time is the `compute_ms` of the controller's
   `run_result_stored` event (its log, `--log-out` of `_controller_proc.py`).
2. The controller is stopped and `--runs` (100k) more runs are added to the file with
   SQL, copies of that run's row under new ids, times and states (mostly SUCCEEDED, some
   FAILED/CANCELLED, two models), so that `ListRuns` has a realistic table and indexes.
3. The controller is started again on the file and timed over gRPC from this process:
   `ListRuns` (page 50: unfiltered, by state, by model, and the 20th page of a walk), p50/p99
   over `--list-calls` calls each; `GetRunResult` of the 1M-sample run, every call timed
   (the first reads the stored result from SQLite, the next ones the in-memory copy).
4. Stopped again, the stored result is deleted with SQL (as for a run that ended before
   migration 8) and one `GetRunResult` in a fresh controller is timed: computed on demand.
Goals: ListRuns p99 < 5 ms; GetRunResult < 1 s, also on the first call after a start.

    .venv/bin/python bench/controller_queries.py                      # ~2 minutes
    .venv/bin/python bench/controller_queries.py --samples 200000 --runs 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
from _harness import ROOT, machine, table
from controller_ingest import run_ingest

sys.path.insert(0, str(ROOT))

from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2


def start_controller(db: str, tmp: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "bench" / "_controller_proc.py"),
            "--db",
            db,
            "--lag-out",
            str(Path(tmp) / "lag.npy"),
            "--log-out",
            str(Path(tmp) / "controller.jsonl"),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    assert proc.stdout is not None
    return proc, f"127.0.0.1:{int(proc.stdout.readline().split()[1])}"


def stop_controller(proc: subprocess.Popen[str]) -> None:
    proc.terminate()
    proc.wait(60)


def stored_event(tmp: str, run_id: str) -> dict[str, Any] | None:
    """The controller's `run_result_stored` event of the run (None if it never stored one)."""
    for line in (Path(tmp) / "controller.jsonl").read_text().splitlines():
        event = json.loads(line)
        if event.get("event") == "run_result_stored" and event.get("run_id") == run_id:
            return dict(event)
    return None


async def one_result(address: str, run_id: str) -> float:
    """ms of one GetRunResult (the connection is made before, untimed)."""
    async with ControllerClient(address) as client:
        await client.wait_ready(30)
        return float((await timed(1, lambda: client.get_result(run_id)))[0])


def add_runs(db: str, n: int) -> None:
    """Copy the one stored run `n` times with new ids, times, states and models."""
    conn = sqlite3.connect(db)
    cols = [r[1] for r in conn.execute("PRAGMA table_info(runs)") if r[1] != "pk"]
    base = conn.execute("SELECT created_at FROM runs ORDER BY pk LIMIT 1").fetchone()[0]
    select = []
    for c in cols:
        if c == "run_id":
            select.append("'run_bench_' || x")
        elif c == "request_id":
            select.append("NULL")
        elif c == "created_at":
            select.append(f"{base} - x * 1000000000")
        elif c == "state":
            select.append(
                f"CASE WHEN x % 10 = 0 THEN {run_pb2.RUN_STATE_FAILED} WHEN x % 10 = 1 "
                f"THEN {run_pb2.RUN_STATE_CANCELLED} ELSE {run_pb2.RUN_STATE_SUCCEEDED} END"
            )
        elif c == "model":
            select.append("CASE WHEN x % 2 = 0 THEN 'mock' ELSE 'llama-70b' END")
        else:
            select.append(c)
    sql = (
        f"WITH RECURSIVE seq(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM seq WHERE x < {n}) "
        f"INSERT INTO runs ({', '.join(cols)}) SELECT {', '.join(select)} FROM seq, "
        "(SELECT * FROM runs ORDER BY pk LIMIT 1)"
    )
    with conn:
        conn.execute(sql)
    conn.execute("ANALYZE")
    conn.close()


async def timed(calls: int, fn: Callable[[], Awaitable[Any]]) -> np.ndarray[Any, Any]:
    out = []
    for _ in range(calls):
        t = time.perf_counter()
        await fn()
        out.append((time.perf_counter() - t) * 1000.0)
    return np.asarray(out)


async def query(address: str, run_id: str, args: argparse.Namespace) -> tuple[list[list[Any]], list[float], int]:
    rows: list[list[Any]] = []
    async with ControllerClient(address) as client:
        await client.wait_ready(30)
        await client.list_runs(page_size=50)  # connection and first-query warm-up
        cursor = ""
        for _ in range(19):
            cursor = (await client.list_runs(page_size=50, page_token=cursor)).next_page_token
        page20 = cursor
        cases: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
            ("ListRuns page 1", lambda: client.list_runs(page_size=50)),
            ("ListRuns state=FAILED", lambda: client.list_runs(page_size=50, state=run_pb2.RUN_STATE_FAILED)),
            ("ListRuns model=llama-70b", lambda: client.list_runs(page_size=50, model="llama-70b")),
            ("ListRuns page 21", lambda: client.list_runs(page_size=50, page_token=page20)),
        ]
        for name, fn in cases:
            ms = await timed(args.list_calls, fn)
            rows.append(
                [
                    name,
                    args.list_calls,
                    round(float(np.percentile(ms, 50)), 2),
                    round(float(np.percentile(ms, 99)), 2),
                    round(float(ms.max()), 2),
                ]
            )
        total = len((await client.list_runs(page_size=1)).runs)
        result_ms = list(await timed(args.result_calls, lambda: client.get_result(run_id)))
    return rows, result_ms, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=1_000_000, help="samples in the big run (default: %(default)s)")
    parser.add_argument("--itl-per-sample", type=int, default=8, help="ITL values per sample (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=100_000, help="runs added for ListRuns (default: %(default)s)")
    parser.add_argument("--list-calls", type=int, default=200, help="calls per ListRuns case (default: %(default)s)")
    parser.add_argument("--result-calls", type=int, default=3, help="GetRunResult calls (default: %(default)s)")
    parser.add_argument("--keep-db", metavar="PATH", help="copy the database here at the end (for profiling)")
    args = parser.parse_args()
    print(machine())
    agents, per_batch = 8, 512
    ingest_args = argparse.Namespace(
        agents=agents, batches=max(1, round(args.samples / (agents * per_batch))), batch_samples=per_batch, window=16
    )
    samples = agents * ingest_args.batches * per_batch
    with tempfile.TemporaryDirectory(prefix="bench-queries-") as tmp:
        db = str(Path(tmp) / "queries.db")
        proc, address = start_controller(db, tmp)
        try:
            t = time.perf_counter()
            ingest = asyncio.run(run_ingest(address, ingest_args, args.itl_per_sample))
            took = time.perf_counter() - t
            print(f"  ingested {samples} samples in {took:.1f} s ({ingest['rate']:.0f}/s)", flush=True)
            run_id = sqlite3.connect(db).execute("SELECT run_id FROM runs ORDER BY pk LIMIT 1").fetchone()[0]
            after_finish_ms = asyncio.run(one_result(address, run_id))
        finally:
            stop_controller(proc)
        stored = stored_event(tmp, run_id)
        compute_ms = f"{stored['compute_ms']:.0f}" if stored else "- (none stored)"
        print(f"  run {ingest['state']}; result computed in {compute_ms} ms", flush=True)
        t = time.perf_counter()
        add_runs(db, args.runs)
        print(f"  added {args.runs} runs in {time.perf_counter() - t:.1f} s", flush=True)
        db_mb = Path(db).stat().st_size / 1e6
        proc, address = start_controller(db, tmp)
        try:
            rows, result_ms, _ = asyncio.run(query(address, run_id, args))
        finally:
            stop_controller(proc)
        if args.keep_db:
            shutil.copyfile(db, args.keep_db)
        # The cold figure without a stored result: computed on demand by a fresh controller.
        conn = sqlite3.connect(db)
        with conn:
            conn.execute("DELETE FROM run_results")
        conn.close()
        proc, address = start_controller(db, tmp)
        try:
            on_demand_ms = asyncio.run(one_result(address, run_id))
        finally:
            stop_controller(proc)
    print(f"\n{args.runs + 1} runs; run {run_id} has {samples} samples x {args.itl_per_sample} ITL; db {db_mb:.0f} MB")
    print(table(["query", "calls", "p50 ms", "p99 ms", "max ms"], rows))
    print(f"\nGetRunResult (1 stage, {samples} samples):")
    calls = ", ".join(f"{x:.0f}" for x in result_ms)
    print(f"  background computation when the run finished (run_result_stored compute_ms): {compute_ms} ms")
    print(f"  right after the run finished (waits for that computation or reads its row): {after_finish_ms:.0f} ms")
    print(f"  after a restart, {args.result_calls} calls (first: the stored result, then in memory): {calls} ms")
    print(f"  stored result deleted, fresh controller (computed on demand): {on_demand_ms:.0f} ms")


if __name__ == "__main__":
    main()
