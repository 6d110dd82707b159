"""The files a `run` names that go to the controller as uploaded datasets, not in its spec:
`--dataset` (prompts), `--trace` (a Mooncake or Azure trace) and `--tokenizer` (the model's
tokenizer.json).

Each is uploaded (content-addressed: a file uploaded before is not sent again) before the run
is created, and the spec refers to it by id: `Workload.trace.dataset_id`,
`Workload.tokenizer_id`, `Workload.dataset.dataset_id`. A `--trace` stage without --duration or --requests then gets the
whole trace (`spec_builder.finish_trace_stage`, from the upload's entry count and span).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from client import spec_builder
from client.sdk import ControllerClient
from common.datasets import upload_name
from common.proto.loadtest.v1 import dataset_service_pb2, run_pb2


async def _upload(
    client: ControllerClient, path: Path, fmt: run_pb2.DatasetFormat.ValueType, name: str = ""
) -> dataset_service_pb2.UploadDatasetResponse:
    return await client.upload_dataset(path, fmt, upload_name(name or path.name))


async def upload_run_files(client: ControllerClient, args: argparse.Namespace, spec: run_pb2.RunSpec) -> None:
    """Upload --dataset, --tokenizer and --trace and point the spec at them."""
    path = getattr(args, "dataset", None)
    if path is not None and spec.workload.HasField("dataset"):
        dataset = spec.workload.dataset
        uploaded = await _upload(client, path, dataset.format, dataset.name)
        dataset.dataset_id = uploaded.dataset.id
        how = "already stored" if uploaded.already_present else "uploaded"
        print(
            f"dataset {uploaded.dataset.id} ({uploaded.dataset.entry_count} entries) {how}", file=sys.stderr, flush=True
        )
    tokenizer = getattr(args, "tokenizer", None)
    if tokenizer is not None:
        path = spec_builder.tokenizer_file(tokenizer)
        uploaded = await _upload(client, path, run_pb2.DATASET_FORMAT_TOKENIZER)
        spec.workload.tokenizer_id = uploaded.dataset.id
        print(f"tokenizer {path} is dataset {uploaded.dataset.id}", file=sys.stderr, flush=True)
    trace = getattr(args, "trace", None)
    if trace is not None:
        fmt = spec_builder.trace_format(trace, getattr(args, "trace_format", None))
        uploaded = await _upload(client, trace, fmt)
        info = uploaded.dataset
        spec.workload.trace.dataset_id = info.id
        spec_builder.finish_trace_stage(spec, int(info.entry_count), float(info.span_s), args)
        print(
            f"trace {trace} is dataset {info.id}: {info.entry_count} requests over {info.span_s:.1f} s",
            file=sys.stderr,
            flush=True,
        )
