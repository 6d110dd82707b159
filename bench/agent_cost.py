"""Agent CPU cost per 1000 streamed output tokens, beside a raw-socket floor and minimal aiohttp.

For each stream count (default 128 and 512) the mock (`--ttft-ms 100 --itl-ms 10
--output-tokens 128`, one worker pinned to CPU 0) is started afresh, then each client runs
a closed loop of that many streams pinned to CPU 1 (see `bench/_clients.py`):

* `floor`: raw sockets, no HTTP/SSE parsing;
* `aiohttp`: minimal aiohttp + uvloop, no JSON;
* `agent`: llm-loadtest's load path (scheduler, client, SSE parser, batcher, batches
  serialized).

Printed per client: CPU ms per 1000 output tokens over the steady window (process CPU /
tokens the mock wrote), the ratio to the floor, output tokens/s, the client's CPU
utilisation, steady-state TTFT p99 error (measured - 100 ms) and ITL p99 beside the mock's
own emission ITL p99. Goal: agent <= 12 ms per 1k tokens at 128 and 512 streams.

    .venv/bin/python bench/agent_cost.py                 # ~2 minutes
    .venv/bin/python bench/agent_cost.py --streams 128 --duration 8
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _harness import machine, mock_busy_note, mock_server, run_arguments, run_client, table

TTFT_MS, ITL_MS, TOKENS = 100.0, 10.0, 128


def main() -> None:
    parser = run_arguments(__doc__, streams="128,512", duration_s=14.0, clients="floor,aiohttp,agent")
    args = parser.parse_args()
    print(machine())
    print(
        f"mock: ttft {TTFT_MS:g} ms, itl {ITL_MS:g} ms, {TOKENS} tokens, {args.mock_workers} worker(s) on CPU 0; "
        f"clients on CPU 1; {args.duration:g} s runs, window from {args.warmup:g} s"
    )
    rows = []
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench-cost-") as tmp:
        for streams in [int(s) for s in args.streams.split(",")]:
            floor = None
            for kind in args.clients.split(","):
                with mock_server(TTFT_MS, ITL_MS, TOKENS, workers=args.mock_workers) as url:
                    run = run_client(kind, url, streams, args.duration, args.warmup, Path(tmp))
                w = run.window
                cost = w.cpu_ms_per_1k_tokens
                if kind == "floor":
                    floor = cost
                rows.append(
                    [
                        streams,
                        kind,
                        round(cost, 2),
                        f"{cost / floor:.2f}x" if floor else "-",
                        round(w.tokens_per_s),
                        f"{w.cpu_utilisation:.0%}",
                        f"{w.mock_utilisation:.0%}",
                        round(run.ttft_p99_error_ms(TTFT_MS), 2),
                        round(run.itl_p99_ms(), 2),
                        w.mock_emission.get("itl", {}).get("p99_ms", "-"),
                    ]
                )
                notes += mock_busy_note(streams, kind, run.window)
                print(f"  {streams} streams {kind}: {cost:.2f} ms/1k tokens", flush=True)
    print()
    print(
        table(
            [
                "streams",
                "client",
                "CPU ms / 1k tok",
                "vs floor",
                "tok/s",
                "client CPU",
                "mock CPU",
                "TTFT p99 err ms",
                "ITL p99 ms",
                "mock emission ITL p99 ms",
            ],
            rows,
        )
    )
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
