"""Run-spec validation and defaults, datasets, and how a stage is split across agents."""

from __future__ import annotations

import json

import pytest

from common.proto.loadtest.v1 import run_pb2
from controller.domain.coordinator import stage_shares
from controller.domain.datasets import entries_from_json, entries_to_json, parse_dataset
from controller.domain.errors import InvalidArgument
from controller.domain.spec import validate_and_default

pytestmark = pytest.mark.timeout(10)


def spec(**stage: object) -> run_pb2.RunSpec:
    s = run_pb2.RunSpec()
    s.target.base_url = "http://127.0.0.1:8000/v1"
    s.target.model = "m"
    st = s.stages.add()
    st.duration.FromSeconds(10)
    for k, val in stage.items():
        if k in ("warmup_duration", "ramp", "duration"):
            getattr(st, k).FromNanoseconds(int(float(val) * 1e9))  # type: ignore[arg-type]
        else:
            setattr(st, k, val)
    if st.WhichOneof("load") is None:
        st.concurrency = 1
    return s


def fields_of(s: run_pb2.RunSpec) -> list[str]:
    with pytest.raises(InvalidArgument) as info:
        validate_and_default(s)
    return [v.field for v in info.value.violations]


@pytest.mark.parametrize(
    ("stage", "field"),
    [
        ({"request_rate": -1.0}, "spec.stages[0].request_rate"),
        ({"request_rate": float("nan")}, "spec.stages[0].request_rate"),
        ({"request_rate": 5.0, "arrival": run_pb2.ARRIVAL_PROCESS_GAMMA}, "spec.stages[0].burstiness"),
        (
            {"request_rate": 5.0, "arrival": run_pb2.ARRIVAL_PROCESS_GAMMA, "burstiness": -0.5},
            "spec.stages[0].burstiness",
        ),
        ({"request_rate": 5.0, "burstiness": 0.5}, "spec.stages[0].burstiness"),
        ({"concurrency": 4, "max_concurrency": 2}, "spec.stages[0].max_concurrency"),
        ({"concurrency": 4, "arrival": run_pb2.ARRIVAL_PROCESS_CONSTANT}, "spec.stages[0].arrival"),
        ({"concurrency": 1, "warmup_duration": 10}, "spec.stages[0].warmup_duration"),
        ({"concurrency": 1, "ramp": 11}, "spec.stages[0].ramp"),
        ({"concurrency": 1, "requests": 5, "warmup_requests": 5}, "spec.stages[0].warmup_requests"),
    ],
)
def test_bad_load_shapes_name_the_field(stage: dict[str, object], field: str) -> None:
    assert field in fields_of(spec(**stage))


def test_open_loop_defaults_to_poisson() -> None:
    out = validate_and_default(spec(request_rate=2.5))
    assert out.stages[0].arrival == run_pb2.ARRIVAL_PROCESS_POISSON
    assert out.stages[0].name == "rate=2.5/s"


def test_length_distributions() -> None:
    s = spec()
    s.workload.synthetic.input_tokens.normal.CopyFrom(run_pb2.NormalLength(mean=100, std=0, min=10, max=200))
    assert "spec.workload.synthetic.input_tokens.normal" in fields_of(s)
    s.workload.synthetic.input_tokens.normal.std = 10
    out = validate_and_default(s)
    assert out.workload.synthetic.output_tokens.fixed == 128  # default filled


def test_extra_body_cannot_override_our_fields() -> None:
    s = spec()
    s.target.extra_body.update({"cache_prompt": False, "stream": False, "max_completion_tokens": 9})
    assert sorted(fields_of(s)) == ["spec.target.extra_body.max_completion_tokens", "spec.target.extra_body.stream"]

def dataset_spec(content: str, fmt: int = run_pb2.DATASET_FORMAT_JSONL) -> run_pb2.RunSpec:
    s = spec()
    s.workload.dataset.format = fmt  # type: ignore[assignment]
    s.workload.dataset.content = content
    return s


def test_dataset_errors_name_the_line() -> None:
    good = json.dumps({"prompt": "hello there"})
    with pytest.raises(InvalidArgument) as info:
        parse_dataset(dataset_spec(f"{good}\n\n{{not json\n").workload.dataset)
    assert "line 3: not valid JSON" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        parse_dataset(dataset_spec(f'{good}\n{{"text": "x"}}\n').workload.dataset)
    assert "line 2" in str(info.value)
    with pytest.raises(InvalidArgument) as info:
        parse_dataset(dataset_spec("  \n").workload.dataset)
    assert "empty" in str(info.value)
    assert info.value.violations[0].field == "spec.workload.dataset.content"


def test_dataset_parsing_and_filter() -> None:
    lines = [
        {"prompt": "one two three", "max_tokens": 7},
        {"messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a b"}]},
        {"prompt": " ".join(["w"] * 50)},
    ]
    ds = dataset_spec("\n".join(json.dumps(x) for x in lines)).workload.dataset
    ds.max_prompt_words = 10
    entries = parse_dataset(ds)
    assert [e.max_tokens for e in entries] == [7, 0]
    assert entries[1].messages[1].content == "a b" and entries[1].prompt == "a b"
    assert entries_from_json(entries_to_json(entries)) == entries


def test_sharegpt() -> None:
    data = [
        {"conversations": [{"from": "human", "value": "hi there"}, {"from": "gpt", "value": "a b c d"}]},
        {"conversations": [{"from": "human", "value": "lonely"}]},
    ]
    entries = parse_dataset(dataset_spec(json.dumps(data), run_pb2.DATASET_FORMAT_SHAREGPT).workload.dataset)
    assert [(e.prompt, e.max_tokens) for e in entries] == [("hi there", 4)]


def test_closed_loop_shares_sum_to_the_total() -> None:
    stage = run_pb2.Stage(concurrency=10, requests=101, warmup_requests=7)
    shares = stage_shares(stage, 4)
    assert [s.concurrency for s in shares if s] == [3, 3, 2, 2]
    assert sum(s.requests for s in shares if s) == 101
    assert sum(s.warmup_requests for s in shares if s) == 7
    assert stage_shares(run_pb2.Stage(concurrency=2), 3)[2] is None


def test_open_loop_shares_split_the_rate() -> None:
    stage = run_pb2.Stage(request_rate=40.0, max_concurrency=6, requests=10)
    shares = stage_shares(stage, 4)
    assert all(s is not None and s.request_rate == 10.0 for s in shares)
    assert [s.max_concurrency for s in shares if s] == [2, 2, 1, 1]
    assert [s.requests for s in shares if s] == [3, 3, 2, 2]


def test_unreachable_timeout_defaults_to_10s_and_is_bounded() -> None:
    assert validate_and_default(spec()).target.unreachable_timeout.seconds == 10
    for seconds in (-1, 3601):
        s = spec()
        s.target.unreachable_timeout.FromSeconds(seconds)
        assert fields_of(s) == ["spec.target.unreachable_timeout"]
    s = spec()
    s.target.unreachable_timeout.FromSeconds(3)
    assert validate_and_default(s).target.unreachable_timeout.seconds == 3
