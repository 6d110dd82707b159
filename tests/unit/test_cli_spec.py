"""The `run` flags build the spec they describe."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from client.spec_builder import build_spec, spec_parser
from common.proto.loadtest.v1 import run_pb2

pytestmark = pytest.mark.timeout(10)
BASE = ["--target", "http://127.0.0.1:8000/v1", "--model", "m"]


def spec(*flags: str) -> run_pb2.RunSpec:
    return build_spec(spec_parser().parse_args([*BASE, *flags]))


def test_concurrency_sweep() -> None:
    s = spec("--concurrency", "1,8,32", "--duration", "5s")
    assert [st.concurrency for st in s.stages] == [1, 8, 32]
    assert all(st.duration.seconds == 5 and st.requests == 0 for st in s.stages)


def test_rate_sweep_with_gamma_cap_warmup_and_ramp() -> None:
    s = spec("--rate", "2,4.5", "--burstiness", "0.25", "--max-concurrency", "8", "--warmup", "20req",
             "--ramp", "3s", "--requests", "100")  # fmt: skip
    assert [st.request_rate for st in s.stages] == [2.0, 4.5]
    st = s.stages[0]
    assert st.arrival == run_pb2.ARRIVAL_PROCESS_GAMMA and st.burstiness == 0.25
    assert (st.max_concurrency, st.warmup_requests, st.ramp.seconds, st.requests) == (8, 20, 3, 100)
    assert not st.HasField("duration")  # --requests alone: no default duration
    assert spec("--rate", "3", "--warmup", "2s").stages[0].warmup_duration.seconds == 2


def test_lengths() -> None:
    s = spec("--input-tokens", "64-256", "--output-tokens", "normal:200,50", "--shared-prefix", "32")
    syn = s.workload.synthetic
    assert (syn.input_tokens.uniform.min, syn.input_tokens.uniform.max) == (64, 256)
    assert (syn.output_tokens.normal.mean, syn.output_tokens.normal.std) == (200, 50)
    assert syn.output_tokens.normal.min == 1 and syn.output_tokens.normal.max == 400
    assert syn.shared_prefix_tokens == 32
    with pytest.raises(SystemExit):
        spec_parser().parse_args([*BASE, "--input-tokens", "lots"])


def test_spike_scenario() -> None:
    s = spec("--scenario", "spike", "--peak-concurrency", "200", "--duration", "2s")
    assert [st.concurrency for st in s.stages] == [20, 200, 20]
    assert all(st.duration.seconds == 2 for st in s.stages)
    with pytest.raises(argparse.ArgumentTypeError):
        spec("--scenario", "spike")


def test_dataset_and_target_options(tmp_path: Path) -> None:
    path = tmp_path / "prompts.jsonl"
    path.write_text(json.dumps({"prompt": "hi"}) + "\n")
    s = spec("--dataset", str(path), "--ignore-eos", "--min-tokens", "--insecure",
             "--extra-body", '{"cache_prompt": false}', "--api-kind", "completions", "--no-stream")  # fmt: skip
    assert s.workload.dataset.format == run_pb2.DATASET_FORMAT_JSONL
    assert s.workload.dataset.content.startswith('{"prompt"')
    assert s.workload.ignore_eos and s.workload.pin_min_tokens
    assert s.target.insecure_skip_verify and not s.target.stream
    assert s.target.extra_body["cache_prompt"] is False
    assert s.target.api_kind == run_pb2.API_KIND_COMPLETIONS


def test_preflight_and_unreachable_timeout_flags() -> None:
    plain = spec("--concurrency", "1")
    assert not plain.skip_preflight and not plain.target.HasField("unreachable_timeout")
    s = spec("--concurrency", "1", "--skip-preflight", "--unreachable-timeout", "30s")
    assert s.skip_preflight and s.target.unreachable_timeout.seconds == 30


@pytest.mark.parametrize(
    "flags",
    [("--requests", str(2**64)), ("--requests", "-1"), ("--seed", "-5"), ("--concurrency", str(2**32)),
     ("--warmup", f"{2**64}req"), ("--max-concurrency", "-1")],
)
def test_integers_the_spec_cannot_hold_are_usage_errors(flags: tuple[str, str]) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=flags[0]):
        spec(*flags)
