"""The conversation flags of `run` (--turns, --think-time, --system-prompt-tokens, --all-turns)."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from client.spec_builder import build_spec, spec_parser
from common.proto.loadtest.v1 import run_pb2
from controller.domain.spec import validate_and_default

pytestmark = pytest.mark.timeout(10)
BASE = ["--target", "http://127.0.0.1:8000/v1", "--model", "m"]


def spec(*flags: str) -> run_pb2.RunSpec:
    return build_spec(spec_parser().parse_args([*BASE, *flags]))


def test_turns_make_a_conversation_workload() -> None:
    s = spec(
        "--turns",
        "2-6",
        "--input-tokens",
        "64",
        "--output-tokens",
        "32",
        "--system-prompt-tokens",
        "200",
        "--concurrency",
        "4",
    )
    c = s.workload.conversation
    assert s.workload.WhichOneof("source") == "conversation"
    assert (c.turns.uniform.min, c.turns.uniform.max) == (2, 6)
    assert (c.input_tokens.fixed, c.output_tokens.fixed, c.system_prompt_tokens) == (64, 32, 200)
    assert s.stages[0].concurrency == 4  # sessions in progress
    assert not s.workload.HasField("think_time")
    validate_and_default(s)  # the controller accepts what the flags build


@pytest.mark.parametrize(
    ("text", "which", "values"),
    [
        ("2s", "fixed", (2.0,)),
        ("500ms", "fixed", (0.5,)),
        ("1s-5s", "uniform", (1.0, 5.0)),
        ("exp:3s", "exponential_mean", (3.0,)),
    ],
)
def test_think_time_forms(text: str, which: str, values: tuple[float, ...]) -> None:
    s = spec("--think-time", text)
    think = s.workload.think_time
    assert think.WhichOneof("distribution") == which
    if which == "uniform":
        got = (think.uniform.min.ToNanoseconds() / 1e9, think.uniform.max.ToNanoseconds() / 1e9)
    else:
        got = (getattr(think, which).ToNanoseconds() / 1e9,)
    assert got == values
    # --think-time alone is a conversation of the default 3 turns.
    assert s.workload.WhichOneof("source") == "conversation"
    assert validate_and_default(s).workload.conversation.turns.fixed == 3


def test_all_turns_replays_a_dataset(tmp_path: Path) -> None:
    data = tmp_path / "chats.jsonl"
    data.write_text('{"messages": [{"role": "user", "content": "hi"}]}\n')
    s = spec("--dataset", str(data), "--all-turns", "--think-time", "1s")
    assert s.workload.dataset.all_turns and s.workload.think_time.fixed.seconds == 1
    assert not spec("--dataset", str(data)).workload.dataset.all_turns


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--all-turns"], "--all-turns needs --dataset"),
        (["--turns", "3", "--shared-prefix", "10"], "--shared-prefix does not apply to conversations"),
        (["--dataset", "{data}", "--turns", "3"], "--turns is for synthetic conversations"),
        (["--dataset", "{data}", "--system-prompt-tokens", "3"], "--system-prompt-tokens is for synthetic"),
        (["--dataset", "{data}", "--think-time", "1s"], "--think-time with --dataset needs --all-turns"),
    ],
)
def test_contradicting_flags_are_usage_errors(tmp_path: Path, flags: list[str], message: str) -> None:
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "hi"}\n')
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        spec(*(f.replace("{data}", str(data)) for f in flags))


@pytest.mark.parametrize("text", ["soon", "5s-1s", "exp:", "1s-", "11m", "1s-700s"])
def test_bad_think_times_are_refused(text: str) -> None:
    with pytest.raises(SystemExit):
        spec_parser().parse_args([*BASE, "--think-time", text])
