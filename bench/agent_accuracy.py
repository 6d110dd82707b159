"""Agent accuracy: steady-state TTFT p99 error and ITL p99 beside the mock's own emission.

The mock (`--ttft-ms 100 --itl-ms 10 --output-tokens 128`, one worker pinned to CPU 0, or
`--mock-workers N`) is started afresh for each stream count; the client runs pinned to
CPU 1 (see `bench/_clients.py`). Over the steady window (from `--warmup` s to 1 s before the
end), printed per client and stream count:

* TTFT p99 error = measured TTFT p99 - 100 ms (includes the mock's own lateness, which the
  `floor` client shows; goals for the agent: <= 5 ms at 256 streams, <= 10 ms at 512);
* the mock's first-token lateness p99 (from its `/stats/emission`);
* ITL p99 measured beside the mock's emission ITL p99 (goal: within 2 ms at 256 streams).

    .venv/bin/python bench/agent_accuracy.py               # ~2 minutes
    .venv/bin/python bench/agent_accuracy.py --streams 256 --clients agent
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _harness import machine, mock_busy_note, mock_server, run_arguments, run_client, table

TTFT_MS, ITL_MS, TOKENS = 100.0, 10.0, 128


def main() -> None:
    parser = run_arguments(__doc__, streams="128,256,512", duration_s=14.0, clients="floor,agent")
    args = parser.parse_args()
    print(machine())
    print(
        f"mock: ttft {TTFT_MS:g} ms, itl {ITL_MS:g} ms, {TOKENS} tokens, {args.mock_workers} worker(s) on CPU 0; "
        f"clients on CPU 1"
    )
    rows = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-accuracy-") as tmp:
        for streams in [int(s) for s in args.streams.split(",")]:
            for kind in args.clients.split(","):
                with mock_server(TTFT_MS, ITL_MS, TOKENS, workers=args.mock_workers) as url:
                    run = run_client(kind, url, streams, args.duration, args.warmup, Path(tmp))
                em = run.window.mock_emission
                itl_p99, mock_itl_p99 = run.itl_p99_ms(), em.get("itl", {}).get("p99_ms", float("nan"))
                rows.append(
                    [
                        streams,
                        kind,
                        len(run.ttft_ms),
                        round(run.ttft_p99_error_ms(TTFT_MS), 2),
                        em.get("ttft_late", {}).get("p99_ms", "-"),
                        round(itl_p99, 2),
                        mock_itl_p99,
                        round(itl_p99 - mock_itl_p99, 2),
                        f"{run.window.mock_utilisation:.0%}",
                        f"{run.window.cpu_utilisation:.0%}",
                    ]
                )
                notes += mock_busy_note(streams, kind, run.window)
                print(f"  {streams} streams {kind}: TTFT p99 error {rows[-1][3]} ms", flush=True)
    print()
    print(
        table(
            [
                "streams",
                "client",
                "requests",
                "TTFT p99 err ms",
                "mock first-token late p99 ms",
                "ITL p99 ms",
                "mock emission ITL p99 ms",
                "ITL p99 - mock",
                "mock CPU",
                "client CPU",
            ],
            rows,
        )
    )
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
