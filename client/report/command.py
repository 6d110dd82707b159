"""`llm-loadtest report RUN [RUN ...] -o FILE`: collect each run from the controller (or a
`--db` file) and write the HTML document."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client.commands import add_connection_arguments, failure, failure_types, open_reader
from client.report.collect import collect
from client.report.page import build_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser, read_only=True)
    parser.add_argument("run_ids", nargs="+", metavar="RUN", help="run id(s); several runs are overlaid")
    parser.add_argument("-o", "--output", type=Path, default=Path("report.html"), help="HTML file to write")
    parser.add_argument(
        "--no-samples",
        action="store_true",
        help="skip ExportRunSamples (no per-request distributions; faster for huge runs)",
    )


async def cmd_report(args: argparse.Namespace) -> int:
    try:
        async with open_reader(args) as client:
            runs = [await collect(client, run_id, not args.no_samples) for run_id in args.run_ids]
    except failure_types(args) as exc:
        return failure(exc, args)
    for data in runs:
        if data.samples is None and data.samples_note and not args.no_samples:
            print(f"warning: {data.run.id}: {data.samples_note}; distributions are left empty", file=sys.stderr)
    args.output.write_text(build_report(runs), encoding="utf-8")
    print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) > 1 else ''})", file=sys.stderr)
    return 0
