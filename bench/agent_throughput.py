"""One agent process's maximum sustained output tokens/s.

The agent (llm-loadtest's load path, `bench/_clients.py agent`) runs pinned to CPU 1 against
the mock on CPU 0 (`--ttft-ms 100 --itl-ms 10 --output-tokens 128` by default; `--itl-ms 5`
halves the streams needed for the same rate) at increasing stream counts. Printed per
level: achieved output tokens/s over the steady window, the agent's CPU utilisation, the
mock's, the TTFT p99 error and the *capacity* = achieved / agent CPU utilisation, i.e. the
rate at which the agent's core would be full at the measured cost per token.

On a 2-core machine the one-core mock's limit (BENCHMARKS.md, "Mock capacity") is reached
before the agent's: when the mock's CPU is near 100 % the achieved rate is the mock's limit
and the capacity column is the agent's figure. Goal: >= 40k output tokens/s for one agent
process.

    .venv/bin/python bench/agent_throughput.py                      # ~1.5 minutes
    .venv/bin/python bench/agent_throughput.py --streams 256,512 --itl-ms 5
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from _harness import machine, mock_busy_note, mock_server, run_arguments, run_client, table


def main() -> None:
    parser = run_arguments(__doc__, streams="256,512,768", duration_s=12.0)
    parser.add_argument("--itl-ms", type=float, default=10.0, help="mock inter-token latency (default: %(default)s)")
    parser.add_argument("--ttft-ms", type=float, default=100.0, help="mock time to first token (default: %(default)s)")
    parser.add_argument("--tokens", type=int, default=128, help="output tokens per request (default: %(default)s)")
    args = parser.parse_args()
    print(machine())
    rows = []
    notes: list[str] = []
    best = 0.0
    with tempfile.TemporaryDirectory(prefix="bench-throughput-") as tmp:
        for streams in [int(s) for s in args.streams.split(",")]:
            with mock_server(args.ttft_ms, args.itl_ms, args.tokens, workers=args.mock_workers) as url:
                run = run_client("agent", url, streams, args.duration, args.warmup, Path(tmp))
            w = run.window
            capacity = w.tokens_per_s / w.cpu_utilisation if w.cpu_utilisation else float("nan")
            best = max(best, w.tokens_per_s)
            rows.append(
                [
                    streams,
                    round(w.tokens_per_s),
                    f"{w.cpu_utilisation:.0%}",
                    f"{w.mock_utilisation:.0%}",
                    round(w.cpu_ms_per_1k_tokens, 2),
                    round(run.ttft_p99_error_ms(args.ttft_ms), 1),
                    round(capacity),
                ]
            )
            notes += mock_busy_note(streams, "agent", run.window)
            print(f"  {streams} streams: {w.tokens_per_s:.0f} tok/s at {w.cpu_utilisation:.0%} agent CPU", flush=True)
    print()
    print(
        table(
            [
                "streams",
                "achieved tok/s",
                "agent CPU",
                "mock CPU",
                "CPU ms / 1k tok",
                "TTFT p99 err ms",
                "capacity tok/s (achieved / agent CPU)",
            ],
            rows,
        )
    )
    print(f"\nmax achieved: {best:.0f} output tok/s from one agent process")
    for note in notes:
        print(note)


if __name__ == "__main__":
    main()
