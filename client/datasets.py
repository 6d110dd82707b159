"""`llm-loadtest datasets upload|list|get|delete`: datasets, traces and tokenizers uploaded to
the controller once and referred to by id from runs (docs/user-guide.md, "Datasets")."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.table import Table

from client import exitcodes, render
from client.commands import add_connection_arguments, failure, failure_types, open_client
from client.envconfig import not_from_env
from client.sdk import ControllerClient
from common.datasets import FORMAT_BY_NAME, format_name, guess_format, upload_name
from common.proto.loadtest.v1 import dataset_service_pb2

# Enough of a file to recognise its format (the first line of a JSONL or CSV file).
_HEAD_BYTES = 64 * 1024


def add_datasets_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="datasets_command", required=True, metavar="{upload,list,get,delete}")
    p = sub.add_parser("upload", help="upload a dataset, trace or tokenizer (content-addressed: once)")
    add_connection_arguments(p)
    p.add_argument("file", type=Path, metavar="FILE")
    # No variable sets these: LLM_LOADTEST_FORMAT and LLM_LOADTEST_NAME mean other commands' flags.
    not_from_env(
        p.add_argument(
            "--format",
            choices=sorted(FORMAT_BY_NAME),
            help="default: from the file (.jsonl, .json ShareGPT, .csv, tokenizer.json; a Mooncake .jsonl or an "
            "Azure .csv by its first line)",
        )
    )
    not_from_env(p.add_argument("--name", default=None, help="default: the file's name"))
    p.add_argument("--json", action="store_true", help="print the stored dataset as JSON (docs/json.md)")
    p = sub.add_parser("list", help="list uploaded datasets, newest first")
    add_connection_arguments(p)
    not_from_env(p.add_argument("--format", choices=sorted(FORMAT_BY_NAME), help="only datasets of this format"))
    p.add_argument("--limit", type=int, default=100, help="how many to show")
    p.add_argument("--json", action="store_true", help="print a JSON array of datasets (docs/json.md)")
    p = sub.add_parser("get", help="show one dataset")
    add_connection_arguments(p)
    p.add_argument("dataset_id", metavar="ID")
    p.add_argument("--json", action="store_true", help="print the dataset as JSON (docs/json.md)")
    p = sub.add_parser("delete", help="delete a dataset no pending or running run uses")
    add_connection_arguments(p)
    p.add_argument("dataset_id", metavar="ID")


def file_format(path: Path, given: str | None) -> int:
    """The DatasetFormat of a file: the `--format` given, else guessed (ValueError when it
    cannot be)."""
    if given:
        return FORMAT_BY_NAME[given]
    with path.open("rb") as f:
        head = f.read(_HEAD_BYTES)
    fmt = guess_format(path.name, head)
    if not fmt:
        raise ValueError(
            f"{path}: cannot tell the format from the name; give --format ({', '.join(sorted(FORMAT_BY_NAME))})"
        )
    return fmt


async def upload_file(
    client: ControllerClient, path: Path, fmt: int, name: str | None = None
) -> dataset_service_pb2.UploadDatasetResponse:
    """Upload (or find already stored) a file as a dataset; its name defaults to the file's."""
    return await client.upload_dataset(path, fmt, name if name is not None else upload_name(path.name))


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)  # pragma: no cover


def _table(datasets: list[dataset_service_pb2.DatasetInfo]) -> Table:
    table = Table(box=None)
    for column in ("ID", "NAME", "FORMAT", "ENTRIES", "SIZE", "SPAN", "CREATED"):
        table.add_column(column)
    for d in datasets:
        created = d.create_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S") if d.create_time.seconds else ""
        span = f"{d.span_s:.1f} s" if d.span_s else ""
        table.add_row(d.id, d.name, format_name(d.format), str(d.entry_count), _size(d.size_bytes), span, created)
    return table


async def cmd_datasets(args: argparse.Namespace) -> int:
    command = args.datasets_command
    try:
        if command == "upload":
            fmt = file_format(args.file, args.format)
    except (ValueError, OSError) as exc:
        print(f"llm-loadtest datasets upload: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    try:
        async with open_client(args) as client:
            return await _datasets(args, client, fmt if command == "upload" else 0)
    except failure_types(args) as exc:
        return failure(exc, args, exitcodes.USAGE if command == "upload" else exitcodes.FAILED)


async def _datasets(args: argparse.Namespace, client: ControllerClient, fmt: int) -> int:
    command = args.datasets_command
    if command == "upload":
        reply = await upload_file(client, args.file, fmt, args.name)
        d = reply.dataset
        if args.json:
            print(json.dumps(render.message_dict(reply), indent=2, ensure_ascii=False))
            return exitcodes.OK
        print(d.id)
        print(
            f"{format_name(d.format)}, {d.entry_count} entries, {d.size_bytes} bytes"
            + (f", span {d.span_s:.1f} s" if d.span_s else "")
            + (", already present" if reply.already_present else ", uploaded"),
            file=sys.stderr,
        )
        return exitcodes.OK
    if command == "list":
        wanted = FORMAT_BY_NAME[args.format] if args.format else 0
        datasets: list[dataset_service_pb2.DatasetInfo] = []
        token = ""
        while len(datasets) < args.limit:
            page = await client.list_datasets(min(1000, args.limit - len(datasets)), token, wanted)
            datasets.extend(page.datasets)
            token = page.next_page_token
            if not token:
                break
        if args.json:
            print(json.dumps([render.message_dict(d) for d in datasets], indent=2, ensure_ascii=False))
        else:
            render.console().print(_table(datasets))
        return exitcodes.OK
    if command == "get":
        d = await client.get_dataset(args.dataset_id)
        if args.json:
            print(json.dumps(render.message_dict(d), indent=2, ensure_ascii=False))
        else:
            render.console().print(_table([d]))
        return exitcodes.OK
    await client.delete_dataset(args.dataset_id)
    print(f"deleted {args.dataset_id}", file=sys.stderr)
    return exitcodes.OK
