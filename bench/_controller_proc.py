"""A real controller in its own process, with an event-loop lag probe, for the controller benchmarks.

    python bench/_controller_proc.py --db FILE --lag-out FILE.npy [--log-out FILE.jsonl]

Prints `port N` once serving. Until SIGTERM, a task sleeps `PROBE_S` at a time and records
(wall-clock ns, lag ms) of every wake-up: how late the loop came back to it. On SIGTERM the
controller stops and the probe's readings are saved to `--lag-out`. The controller's log goes
to stderr at WARNING, or with `--log-out` to that file as JSON lines from INFO (lifecycle
events such as `run_result_stored`, which carries a result's computation time).
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from controller.domain.access.ratelimit import RateLimits
from controller.server import Controller

PROBE_S = 0.005


async def main(db: str, lag_out: str) -> None:
    # Per-caller rate limits off (a million a second): the benchmarks measure the controller's
    # speed, and one benchmark client issues hundreds of reads a second.
    unlimited = RateLimits(write_rate=1e6, write_burst=1e6, read_rate=1e6, read_burst=1e6)
    controller = Controller(db, rate_limits=unlimited)
    port = await controller.start("127.0.0.1:0")
    print(f"port {port}", flush=True)
    readings: list[tuple[int, float]] = []

    async def probe() -> None:
        while True:
            t = time.perf_counter()
            await asyncio.sleep(PROBE_S)
            readings.append((time.time_ns(), (time.perf_counter() - t - PROBE_S) * 1000.0))

    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    task = asyncio.create_task(probe())
    await stop.wait()
    task.cancel()
    np.save(lag_out, np.asarray(readings, dtype=np.float64).reshape(-1, 2))
    await controller.stop(1.0)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--db", required=True)
    parser.add_argument("--lag-out", required=True)
    parser.add_argument("--log-out", help="write the controller's INFO log here (JSON lines)")
    args = parser.parse_args()
    import logging

    import structlog

    if args.log_out:
        structlog.configure(
            processors=[
                structlog.processors.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(),
            ],
            wrapper_class=structlog.make_filtering_bound_logger(logging.INFO),
            logger_factory=structlog.WriteLoggerFactory(file=Path(args.log_out).open("a")),  # noqa: SIM115
        )
    else:
        structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    asyncio.run(main(args.db, args.lag_out))
