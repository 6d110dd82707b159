"""Trace replay, prefix groups and the tokenizer in run specs: validation and the CLI flags."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from client.spec_builder import build_spec, finish_trace_stage, spec_parser
from common.durations import seconds
from common.proto.loadtest.v1 import run_pb2
from controller.domain.errors import InvalidArgument
from controller.domain.execution.planning import stage_shares
from controller.domain.spec import describe_stage, validate_and_default
from tests.tokenizers_fixture import build_bpe_tokenizer

pytestmark = pytest.mark.timeout(30)

BASE = ["--target", "http://127.0.0.1:8000/v1", "--model", "m"]


def trace_spec(**trace: object) -> run_pb2.RunSpec:
    s = run_pb2.RunSpec()
    s.target.base_url = "http://127.0.0.1:8000/v1"
    s.target.model = "m"
    s.workload.trace.CopyFrom(run_pb2.Trace(**{"dataset_id": "ds_" + "0" * 32, **trace}))  # type: ignore[arg-type]
    s.stages.add(trace_replay=True, requests=10)
    return s


def violations(s: run_pb2.RunSpec) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as info:
        validate_and_default(s)
    return {v.field: v.description for v in info.value.violations}


def test_a_trace_spec_is_valid_and_defaulted() -> None:
    out = validate_and_default(trace_spec())
    assert out.workload.trace.replay_speed == 1.0
    assert out.workload.trace.block_tokens == 512
    assert out.stages[0].name == describe_stage(out.stages[0]) == "trace replay"
    assert (
        validate_and_default(trace_spec(replay_speed=1000.0, block_tokens=65536)).workload.trace.block_tokens == 65536
    )


@pytest.mark.parametrize(
    ("trace", "field"),
    [
        ({"replay_speed": -1.0}, "spec.workload.trace.replay_speed"),
        ({"replay_speed": 1000.5}, "spec.workload.trace.replay_speed"),
        ({"replay_speed": float("nan")}, "spec.workload.trace.replay_speed"),
        ({"block_tokens": 65537}, "spec.workload.trace.block_tokens"),
        ({"dataset_id": ""}, "spec.workload.trace.dataset_id"),
    ],
)
def test_bad_traces_name_the_field(trace: dict[str, object], field: str) -> None:
    assert field in violations(trace_spec(**trace))


def test_trace_stages_and_trace_workloads_go_together() -> None:
    s = trace_spec()
    s.stages.add(concurrency=2, requests=5)
    assert "needs" not in violations(s).get("spec.stages[1].trace_replay", "needs")
    assert "spec.stages[1].trace_replay" in violations(s)
    synthetic = run_pb2.RunSpec()
    synthetic.CopyFrom(trace_spec())
    synthetic.workload.synthetic.SetInParent()
    assert "trace workload" in violations(synthetic)["spec.stages[0].trace_replay"]
    off = trace_spec()
    off.stages[0].trace_replay = False
    assert "spec.stages[0].trace_replay" in violations(off)
    capped = trace_spec()
    capped.stages[0].max_concurrency = 3
    assert "spec.stages[0].max_concurrency" in violations(capped)


def synthetic_spec(**synthetic: object) -> run_pb2.RunSpec:
    s = run_pb2.RunSpec()
    s.target.base_url = "http://127.0.0.1:8000/v1"
    s.target.model = "m"
    s.workload.synthetic.CopyFrom(run_pb2.SyntheticWorkload(**synthetic))  # type: ignore[arg-type]
    s.stages.add(concurrency=1, requests=10)
    return s


@pytest.mark.parametrize(
    ("synthetic", "field"),
    [
        ({"shared_prefix_tokens": 10, "prefix_groups": 10001}, "spec.workload.synthetic.prefix_groups"),
        ({"prefix_groups": 4}, "spec.workload.synthetic.prefix_groups"),
        (
            {"shared_prefix_tokens": 10, "prefix_groups": 4, "prefix_popularity": 2, "zipf_exponent": -1.0},
            "spec.workload.synthetic.zipf_exponent",
        ),
        (
            {"shared_prefix_tokens": 10, "prefix_groups": 4, "prefix_popularity": 2, "zipf_exponent": float("nan")},
            "spec.workload.synthetic.zipf_exponent",
        ),
        (
            {"shared_prefix_tokens": 10, "prefix_groups": 4, "zipf_exponent": 1.2},
            "spec.workload.synthetic.zipf_exponent",
        ),
        ({"shared_prefix_tokens": 10, "prefix_popularity": 9}, "spec.workload.synthetic.prefix_popularity"),
    ],
)
def test_bad_prefix_groups_name_the_field(synthetic: dict[str, object], field: str) -> None:
    assert field in violations(synthetic_spec(**synthetic))


def test_prefix_groups_defaults() -> None:
    out = validate_and_default(synthetic_spec(shared_prefix_tokens=10, prefix_groups=10000))
    assert out.workload.synthetic.prefix_popularity == run_pb2.PREFIX_POPULARITY_UNIFORM
    zipf = validate_and_default(synthetic_spec(shared_prefix_tokens=10, prefix_groups=5, prefix_popularity=2))
    assert zipf.workload.synthetic.zipf_exponent == 1.0


def test_a_trace_stage_goes_whole_to_every_agent() -> None:
    stage = run_pb2.Stage(trace_replay=True, requests=5)
    stage.duration.FromSeconds(30)
    shares = stage_shares(stage, 3)
    assert [s.requests for s in shares if s is not None] == [2, 2, 1]
    assert all(s is not None and s.trace_replay and seconds(s.duration) == 30 for s in shares)
    assert [s for s in stage_shares(run_pb2.Stage(trace_replay=True, requests=1), 2)][1] is None


def cli(*flags: str) -> run_pb2.RunSpec:
    return build_spec(spec_parser().parse_args([*BASE, *flags]))


def test_cli_trace_flags(tmp_path: Path) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 5, "output_length": 1}\n')
    s = cli("--trace", str(path), "--replay-speed", "2.5", "--trace-block-tokens", "256")
    assert s.workload.trace.replay_speed == 2.5 and s.workload.trace.block_tokens == 256
    assert len(s.stages) == 1 and s.stages[0].trace_replay
    args = spec_parser().parse_args([*BASE, "--trace", str(path), "--replay-speed", "2"])
    s = build_spec(args)
    finish_trace_stage(s, 120, 60.0, args)
    assert s.stages[0].requests == 120 and seconds(s.stages[0].duration) == 31.0
    given = spec_parser().parse_args([*BASE, "--trace", str(path), "--requests", "7"])
    s = build_spec(given)
    finish_trace_stage(s, 120, 60.0, given)
    assert s.stages[0].requests == 7 and not s.stages[0].HasField("duration")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--concurrency", "4"], "not with --concurrency"),
        (["--rate", "4"], "not with --rate"),
        (["--shared-prefix", "4"], "not with --shared-prefix"),
        (["--replay-speed", "0"], "--replay-speed"),
        (["--replay-speed", "2000"], "--replay-speed"),
    ],
)
def test_cli_trace_conflicts(tmp_path: Path, flags: list[str], message: str) -> None:
    path = tmp_path / "t.jsonl"
    path.write_text("{}\n")
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        cli("--trace", str(path), *flags)


def test_cli_trace_flags_need_a_trace(tmp_path: Path) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="apply to --trace"):
        cli("--replay-speed", "2")
    with pytest.raises(argparse.ArgumentTypeError, match="no such file"):
        cli("--trace", str(tmp_path / "missing.jsonl"))


def test_cli_prefix_groups() -> None:
    s = cli("--shared-prefix", "64", "--prefix-groups", "8", "--prefix-popularity", "zipf:1.3")
    assert s.workload.synthetic.prefix_groups == 8
    assert s.workload.synthetic.prefix_popularity == run_pb2.PREFIX_POPULARITY_ZIPF
    assert s.workload.synthetic.zipf_exponent == 1.3
    assert cli("--prefix-popularity", "zipf").workload.synthetic.zipf_exponent == 1.0
    assert cli("--prefix-popularity", "uniform").workload.synthetic.prefix_popularity == 1
    for bad in ("zipf:0", "zipf:-1", "zipf:x", "pareto", "uniform:2"):
        with pytest.raises(SystemExit):
            cli("--prefix-popularity", bad)


def test_cli_tokenizer(tmp_path: Path) -> None:
    build_bpe_tokenizer(tmp_path / "model" / "tokenizer.json")
    cli("--tokenizer", str(tmp_path / "model"))  # accepted: uploaded when the run is created
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(argparse.ArgumentTypeError, match="--tokenizer"):
        cli("--tokenizer", str(tmp_path / "bad.json"))
    with pytest.raises(argparse.ArgumentTypeError, match="--tokenizer"):
        cli("--tokenizer", str(tmp_path / "nothing"))


def test_token_accounting_notes() -> None:
    from controller.domain.execution.preflight import template_overhead, token_accounting, tokens_event_message

    spec = run_pb2.RunSpec()
    spec.workload.synthetic.input_tokens.fixed = 512
    plain = token_accounting(spec, [tokens_event_message(19, 7)])
    assert not plain.exact and not plain.HasField("template_overhead_tokens")
    assert "approximate" in plain.note and "--tokenizer" in plain.note
    spec.workload.tokenizer_id = "ds_" + "1" * 32
    assert template_overhead([tokens_event_message(19, 7)]) == 12
    known = token_accounting(spec, ["something else", tokens_event_message(19, 7)])
    assert known.exact and known.tokenizer == spec.workload.tokenizer_id
    assert known.template_overhead_tokens == 12
    assert known.note == "exact: input 512 reaches the model as 524 tokens: the chat template adds 12"
    unknown = token_accounting(spec, [])
    assert unknown.exact and not unknown.HasField("template_overhead_tokens") and "unknown" in unknown.note
    spec.workload.synthetic.input_tokens.uniform.min = 1
    spec.workload.synthetic.input_tokens.uniform.max = 9
    assert (
        "a prompt of N tokens reaches the model as N +12" in token_accounting(spec, [tokens_event_message(19, 7)]).note
    )
    assert token_accounting(spec, [tokens_event_message(7, 7)]).template_overhead_tokens == 0
    conversation = run_pb2.RunSpec()
    conversation.workload.tokenizer_id = spec.workload.tokenizer_id
    conversation.workload.conversation.turns.fixed = 3
    note = token_accounting(conversation, [tokens_event_message(19, 7)]).note
    assert "adds 12" in note and "each further message of a conversation adds its own header" in note
    assert "further message" not in known.note


def test_a_trace_stage_has_no_ramp() -> None:
    s = trace_spec()
    s.stages[0].duration.FromSeconds(10)
    s.stages[0].ramp.FromSeconds(2)
    assert "spec.stages[0].ramp" in violations(s)


async def test_run_files_are_uploaded_and_named_in_the_spec(tmp_path: Path) -> None:
    """`upload_run_files` against a stand-in for `ControllerClient.upload_dataset` (the
    datasets SDK call): the spec names what was uploaded, and the trace stage gets its length."""
    from client.uploads import upload_run_files
    from common.proto.loadtest.v1 import dataset_service_pb2

    uploads: list[tuple[str, int]] = []

    class Uploader:
        async def upload_dataset(
            self, path: Path, fmt: int, name: str = ""
        ) -> dataset_service_pb2.UploadDatasetResponse:
            uploads.append((path.name, fmt))
            info = dataset_service_pb2.DatasetInfo(id=f"ds_{len(uploads):032d}", name=name, format=fmt)  # type: ignore[arg-type]
            if fmt != run_pb2.DATASET_FORMAT_TOKENIZER:
                info.entry_count, info.span_s = 50, 12.0
            return dataset_service_pb2.UploadDatasetResponse(dataset=info)

    build_bpe_tokenizer(tmp_path / "model" / "tokenizer.json")
    trace = tmp_path / "azure.csv"
    trace.write_text("TIMESTAMP,ContextTokens,GeneratedTokens\n")
    args = spec_parser().parse_args(
        [*BASE, "--trace", str(trace), "--replay-speed", "4", "--tokenizer", str(tmp_path / "model")]
    )
    spec = build_spec(args)
    await upload_run_files(Uploader(), args, spec)
    assert uploads == [
        ("tokenizer.json", run_pb2.DATASET_FORMAT_TOKENIZER),
        ("azure.csv", run_pb2.DATASET_FORMAT_AZURE_TRACE),
    ]
    assert spec.workload.tokenizer_id == "ds_" + "1".rjust(32, "0")
    assert spec.workload.trace.dataset_id == "ds_" + "2".rjust(32, "0")
    assert spec.stages[0].requests == 50 and seconds(spec.stages[0].duration) == 12.0 / 4 + 1.0
    validate_and_default(spec)  # what the CLI sends is a valid spec
