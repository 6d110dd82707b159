"""The `run` flags build the spec they describe."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from client.cli import main
from client.spec_builder import build_spec, resume_search, spec_parser
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
    s = spec(
        "--rate",
        "2,4.5",
        "--burstiness",
        "0.25",
        "--max-concurrency",
        "8",
        "--warmup",
        "20req",
        "--ramp",
        "3s",
        "--requests",
        "100",
    )
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
    s = spec(
        "--dataset",
        str(path),
        "--ignore-eos",
        "--min-tokens",
        "--insecure",
        "--extra-body",
        '{"cache_prompt": false}',
        "--api-kind",
        "completions",
        "--no-stream",
    )
    assert s.workload.dataset.format == run_pb2.DATASET_FORMAT_JSONL
    assert s.workload.dataset.content == "" and s.workload.dataset.name == "prompts.jsonl"  # `run` uploads it
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
    [
        ("--requests", str(2**64)),
        ("--requests", "-1"),
        ("--seed", "-5"),
        ("--concurrency", str(2**32)),
        ("--warmup", f"{2**64}req"),
        ("--max-concurrency", "-1"),
    ],
)
def test_integers_the_spec_cannot_hold_are_usage_errors(flags: tuple[str, str]) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=flags[0]):
        spec(*flags)


SEARCH = ["--search", "concurrency", "--slo", "ttft=500ms,tpot=50ms"]


def test_a_search_builds_a_search_spec_and_no_stages() -> None:
    s = spec(
        *SEARCH,
        "--goodput-target",
        "90%",
        "--search-min",
        "2",
        "--search-max",
        "64",
        "--search-tolerance",
        "10",
        "--probe-duration",
        "20s",
        "--probe-warmup",
        "4s",
        "--min-requests",
        "50",
        "--max-probes",
        "8",
        "--cost-per-hour",
        "2.5",
    )
    assert not s.stages
    assert s.slo.ttft.ToMilliseconds() == 500 and s.slo.tpot.ToMilliseconds() == 50
    search = s.search
    assert search.variable == run_pb2.SEARCH_VARIABLE_CONCURRENCY
    assert (search.goodput_target_percent, search.min, search.max, search.tolerance_percent) == (90, 2, 64, 10)
    assert (search.probe_duration.seconds, search.probe_warmup.seconds) == (20, 4)
    assert (search.min_requests, search.max_probes, search.cost_per_hour_usd) == (50, 8, 2.5)
    assert not search.resume_from_run_id


def test_search_settings_not_given_stay_unset_for_the_controllers_defaults() -> None:
    search = spec("--search", "rate", "--slo", "e2e=10s").search
    assert search.variable == run_pb2.SEARCH_VARIABLE_RATE
    for field in ("goodput_target_percent", "tolerance_percent", "cost_per_hour_usd", "probe_duration", "probe_warmup"):
        assert not search.HasField(field), field
    assert (search.min, search.max, search.min_requests, search.max_probes) == (0, 0, 0, 0)
    # A warmup of zero given on purpose is kept: "no warmup", not "the default warmup".
    assert spec(*SEARCH, "--probe-warmup", "0s").search.HasField("probe_warmup")


def test_a_run_without_search_flags_has_no_search() -> None:
    assert not spec("--concurrency", "4").HasField("search")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--search", "concurrency"], "--search needs --slo"),
        ([*SEARCH, "--concurrency", "8"], "--concurrency cannot be given with it (use --search-min/--search-max)"),
        ([*SEARCH, "--rate", "2"], "--rate cannot be given"),
        ([*SEARCH, "--duration", "30s"], "use --probe-duration"),
        ([*SEARCH, "--requests", "100"], "use --min-requests"),
        ([*SEARCH, "--warmup", "5s"], "use --probe-warmup"),
        ([*SEARCH, "--scenario", "stress", "--peak-concurrency", "8"], "--scenario cannot be given"),
        ([*SEARCH, "--max-concurrency", "8"], "--max-concurrency cannot be given"),
        (
            ["--search", "concurrency", "--slo", "ttft=1s", "--arrival", "constant"],
            "--arrival applies to a rate search",
        ),
        (["--search", "rate", "--slo", "ttft=1s", "--arrival", "gamma"], "takes --arrival poisson or constant"),
        (["--concurrency", "8", "--goodput-target", "90"], "--goodput-target needs --search"),
        (["--probe-duration", "10s"], "--probe-duration needs --search"),
        ([*SEARCH, "--search-min", "1.5"], "--search-min: a concurrency is a whole number"),
        ([*SEARCH, "--search-min", "64", "--search-max", "8"], "--search-min 64 is above --search-max 8"),
        ([*SEARCH, "--probe-duration", "10s", "--probe-warmup", "10s"], "--probe-warmup must be shorter"),
    ],
)
def test_bad_search_combinations_are_usage_errors(flags: list[str], message: str) -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=re.escape(message)):
        spec(*flags)


def test_a_rate_search_takes_its_arrival_process() -> None:
    assert spec("--search", "rate", "--slo", "ttft=1s", "--arrival", "constant").search.arrival == (
        run_pb2.ARRIVAL_PROCESS_CONSTANT
    )
    assert spec("--search", "rate", "--slo", "ttft=1s").search.arrival == run_pb2.ARRIVAL_PROCESS_UNSPECIFIED


def test_a_rate_search_takes_fractional_loads() -> None:
    search = spec("--search", "rate", "--slo", "ttft=1s", "--search-min", "0.5", "--search-max", "12.5").search
    assert (search.min, search.max) == (0.5, 12.5)


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--goodput-target", "0"),
        ("--goodput-target", "101%"),
        ("--goodput-target", "high"),
        ("--search-tolerance", "0%"),
        ("--search-tolerance", "1001%"),
        ("--search-min", "0"),
        ("--search-max", "-3"),
        ("--search-max", "nan"),
        ("--probe-duration", "0s"),
        ("--probe-duration", "soon"),
        ("--probe-warmup", "-1s"),
        ("--min-requests", "0"),
        ("--min-requests", "1.5"),
        ("--max-probes", "0"),
        ("--cost-per-hour", "0"),
        ("--cost-per-hour", "$3"),
        ("--search", "latency"),
    ],
)
def test_bad_search_values_are_one_line_usage_errors(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["run", *BASE, *SEARCH, f"{flag}={value}"])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and f"argument {flag}" in lines[0], lines


@pytest.mark.parametrize(("text", "percent"), [("95%", 95.0), ("95", 95.0), ("2.5 %", 2.5), ("100%", 100.0)])
def test_percent_flags_take_a_percent_sign_or_not(text: str, percent: float) -> None:
    assert spec(*SEARCH, "--goodput-target", text).search.goodput_target_percent == percent
    assert spec(*SEARCH, "--search-tolerance", text).search.tolerance_percent == percent


def test_a_tolerance_may_exceed_100_percent() -> None:
    assert spec(*SEARCH, "--search-tolerance", "250%").search.tolerance_percent == 250


def earlier_search_run() -> run_pb2.Run:
    earlier = run_pb2.Run(id="run_earlier")
    earlier.spec.slo.ttft.FromMilliseconds(300)
    earlier.spec.search.CopyFrom(
        run_pb2.SearchSpec(
            variable=run_pb2.SEARCH_VARIABLE_RATE,
            goodput_target_percent=99,
            min=2,
            max=40,
            tolerance_percent=3,
            max_probes=12,
            cost_per_hour_usd=4.0,
        )
    )
    earlier.spec.search.probe_duration.FromSeconds(60)
    return earlier


def test_resume_takes_the_earlier_runs_search_settings_and_slo_where_not_given() -> None:
    s = spec("--resume", "run_earlier", "--search-max", "80", "--probe-duration", "45s")
    assert s.search.resume_from_run_id == "run_earlier" and not s.stages
    resume_search(s, earlier_search_run())
    assert s.search.variable == run_pb2.SEARCH_VARIABLE_RATE
    assert (s.search.goodput_target_percent, s.search.min, s.search.max, s.search.tolerance_percent) == (99, 2, 80, 3)
    assert (s.search.max_probes, s.search.cost_per_hour_usd) == (12, 4.0)
    assert s.search.probe_duration.seconds == 45  # given: kept, not merged field by field
    assert not s.search.HasField("probe_warmup")  # neither run set it
    assert s.slo.ttft.ToMilliseconds() == 300


def test_resume_keeps_an_slo_given_on_the_command_line() -> None:
    s = spec("--resume", "run_earlier", "--slo", "ttft=1s")
    resume_search(s, earlier_search_run())
    assert s.slo.ttft.seconds == 1


def test_resume_refuses_a_run_that_was_no_search_or_searched_the_other_variable() -> None:
    s = spec("--resume", "run_plain")
    with pytest.raises(argparse.ArgumentTypeError, match="run run_plain is not a capacity search"):
        resume_search(s, run_pb2.Run(id="run_plain"))
    s = spec(*SEARCH, "--resume", "run_earlier")
    with pytest.raises(argparse.ArgumentTypeError, match="searched rate, not concurrency"):
        resume_search(s, earlier_search_run())


def test_resume_with_stage_flags_is_a_usage_error() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="--concurrency cannot be given"):
        spec("--resume", "run_earlier", "--concurrency", "4")
