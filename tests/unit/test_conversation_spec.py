"""Validation and defaults of conversation workloads (Workload.conversation, think_time, all_turns)."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from common.proto.loadtest.v1 import run_pb2
from controller.domain.spec import MAX_THINK_SECONDS, MAX_TOKENS, MAX_TURNS, validate_and_default
from tests.unit.test_spec_validation import fields_of, spec

pytestmark = pytest.mark.timeout(10)


def conversation_spec() -> run_pb2.RunSpec:
    s = spec()
    s.workload.conversation.SetInParent()
    return s


def test_defaults_are_filled_in() -> None:
    out = validate_and_default(conversation_spec())
    c = out.workload.conversation
    assert (c.turns.fixed, c.input_tokens.fixed, c.output_tokens.fixed) == (3, 128, 128)
    assert not out.workload.HasField("synthetic")  # the source stays a conversation
    assert not out.workload.HasField("think_time")
    s = conversation_spec()
    s.workload.conversation.turns.uniform.min, s.workload.conversation.turns.uniform.max = 2, 9
    s.workload.think_time.exponential_mean.FromSeconds(3)
    out = validate_and_default(s)
    assert out.workload.conversation.turns.uniform.max == 9 and out.workload.think_time.exponential_mean.seconds == 3


def _set(path: str, value: object) -> Callable[[run_pb2.RunSpec], None]:
    def apply(s: run_pb2.RunSpec) -> None:
        *parents, name = path.split(".")
        target: object = s
        for part in parents:
            target = getattr(target, part)
        if hasattr(getattr(target, name), "FromNanoseconds"):
            getattr(target, name).FromNanoseconds(int(float(value) * 1e9))  # type: ignore[arg-type]
        else:
            setattr(target, name, value)

    return apply


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (_set("workload.conversation.turns.fixed", 0), "spec.workload.conversation.turns.fixed"),
        (_set("workload.conversation.turns.fixed", MAX_TURNS + 1), "spec.workload.conversation.turns.fixed"),
        (_set("workload.conversation.turns.uniform.max", MAX_TURNS + 1), "spec.workload.conversation.turns.uniform"),
        (_set("workload.conversation.input_tokens.fixed", 0), "spec.workload.conversation.input_tokens.fixed"),
        (
            _set("workload.conversation.output_tokens.fixed", MAX_TOKENS + 1),
            "spec.workload.conversation.output_tokens.fixed",
        ),
        (
            _set("workload.conversation.system_prompt_tokens", MAX_TOKENS + 1),
            "spec.workload.conversation.system_prompt_tokens",
        ),
        (_set("workload.think_time.fixed", -1), "spec.workload.think_time.fixed"),
        (_set("workload.think_time.fixed", MAX_THINK_SECONDS + 1), "spec.workload.think_time.fixed"),
        (
            _set("workload.think_time.exponential_mean", MAX_THINK_SECONDS + 0.5),
            "spec.workload.think_time.exponential_mean",
        ),
        (_set("workload.think_time.uniform.max", MAX_THINK_SECONDS * 2), "spec.workload.think_time.uniform.max"),
        (_set("target.api_kind", run_pb2.API_KIND_COMPLETIONS), "spec.target.api_kind"),
    ],
)
def test_bad_conversations_name_the_field(change: Callable[[run_pb2.RunSpec], None], field: str) -> None:
    s = conversation_spec()
    change(s)
    assert fields_of(s) == [field]


def test_uniform_think_time_needs_min_below_max() -> None:
    s = conversation_spec()
    s.workload.think_time.uniform.min.FromSeconds(5)
    s.workload.think_time.uniform.max.FromSeconds(1)
    assert fields_of(s) == ["spec.workload.think_time.uniform"]
    s.workload.think_time.uniform.max.FromSeconds(MAX_THINK_SECONDS)
    assert validate_and_default(s).workload.think_time.uniform.max.seconds == MAX_THINK_SECONDS


def test_think_time_only_for_conversations() -> None:
    s = spec()
    s.workload.think_time.fixed.FromSeconds(1)
    assert fields_of(s) == ["spec.workload.think_time"]
    s.workload.dataset.all_turns = True  # a dataset replayed as conversations takes one
    s.workload.dataset.format = run_pb2.DATASET_FORMAT_JSONL
    s.workload.dataset.content = '{"prompt": "hi"}'
    assert validate_and_default(s).workload.think_time.fixed.seconds == 1
    s.target.api_kind = run_pb2.API_KIND_COMPLETIONS
    assert fields_of(s) == ["spec.target.api_kind"]
