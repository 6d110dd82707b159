"""Run-spec validation and defaults, datasets, and how a stage is split across agents."""

from __future__ import annotations

import json
from collections.abc import Callable

import pytest

from common.proto.loadtest.v1 import run_pb2
from controller.domain.datasets import entries_from_json, entries_to_json, parse_dataset
from controller.domain.errors import InvalidArgument, NotFound
from controller.domain.execution.planning import stage_shares
from controller.domain.spec import (
    MAX_LABEL_KEY_CHARS,
    MAX_LABEL_VALUE_CHARS,
    MAX_LABELS,
    MAX_REQUESTS,
    MAX_SELECTOR,
    MAX_STORED_SPEC_BYTES,
    MIN_BURSTINESS,
    MIN_RATE,
    check_resume,
    check_stored_size,
    validate_and_default,
)
from controller.store.repository import RunRecord

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


# --- limits on every repeated, map and numeric field (docs/security.md) --------------------------


def _many_labels(s: run_pb2.RunSpec) -> None:
    for i in range(MAX_LABELS + 1):
        s.labels[f"k{i}"] = "v"


def _long_label(s: run_pb2.RunSpec) -> None:
    s.labels["team"] = "x" * (MAX_LABEL_VALUE_CHARS + 1)


def _many_selectors(s: run_pb2.RunSpec) -> None:
    for i in range(MAX_SELECTOR + 1):
        s.placement.selector[f"k{i}"] = "v"


def _header_bytes(s: run_pb2.RunSpec) -> None:
    for i in range(5):
        s.target.headers[f"x-h{i}"] = "v" * 8000


def _long_check(s: run_pb2.RunSpec) -> None:
    s.checks.add(expression="p99(ttft) < " + "1" * 300 + "ms")


def _normal_std(s: run_pb2.RunSpec) -> None:
    s.workload.synthetic.output_tokens.normal.CopyFrom(
        run_pb2.NormalLength(mean=100, std=float("inf"), min=10, max=200)
    )


def _dataset_name(s: run_pb2.RunSpec) -> None:
    s.workload.dataset.format = run_pb2.DATASET_FORMAT_JSONL
    s.workload.dataset.content = '{"prompt": "hi"}'
    s.workload.dataset.name = "n" * 300


@pytest.mark.parametrize(
    ("mutate", "field"),
    [
        (_many_labels, "spec.labels"),
        (_long_label, "spec.labels['team']"),
        (_many_selectors, "spec.placement.selector"),
        (_header_bytes, "spec.target.headers"),
        (_long_check, "spec.checks[0].expression"),
        (_normal_std, "spec.workload.synthetic.output_tokens.normal"),
        (_dataset_name, "spec.workload.dataset.name"),
        (lambda s: setattr(s.stages[0], "requests", 2**64 - 1), "spec.stages[0].requests"),
        (lambda s: setattr(s.stages[0], "warmup_requests", 2**63), "spec.stages[0].warmup_requests"),
        (lambda s: setattr(s.stages[0], "request_rate", 1e-300), "spec.stages[0].request_rate"),
    ],
)
def test_limits_name_the_field(mutate: Callable[[run_pb2.RunSpec], object], field: str) -> None:
    s = spec()
    mutate(s)
    assert field in fields_of(s)


def test_gamma_burstiness_has_a_floor() -> None:
    s = spec(request_rate=5.0, arrival=run_pb2.ARRIVAL_PROCESS_GAMMA, burstiness=1e-300)
    assert "spec.stages[0].burstiness" in fields_of(s)
    validate_and_default(spec(request_rate=MIN_RATE, arrival=run_pb2.ARRIVAL_PROCESS_GAMMA, burstiness=MIN_BURSTINESS))


def test_limits_themselves_are_allowed() -> None:
    s = spec(requests=MAX_REQUESTS, warmup_requests=MAX_REQUESTS - 1)
    for i in range(MAX_LABELS):
        s.labels[f"k{i:03d}".ljust(MAX_LABEL_KEY_CHARS, "k")] = "v" * MAX_LABEL_VALUE_CHARS
    for i in range(MAX_SELECTOR):
        s.placement.selector[f"k{i}"] = "v"
    out = validate_and_default(s)
    check_stored_size(out)  # the most labels a spec may have fit the stored size
    assert len(out.labels) == MAX_LABELS


def test_a_huge_map_is_refused_once_not_entry_by_entry() -> None:
    s = spec()
    for i in range(50_000):
        s.labels[f"k{i}"] = ""
    assert fields_of(s) == ["spec.labels"]


def test_the_stored_spec_has_a_size_limit() -> None:
    s = spec()
    s.target.extra_body.update({"a": "x" * 60_000})
    for i in range(MAX_LABELS):
        s.labels[f"k{i:03d}".ljust(MAX_LABEL_KEY_CHARS, "k")] = "\U0001f600" * MAX_LABEL_VALUE_CHARS  # 4 bytes each
    out = validate_and_default(s)  # every field within its own limit...
    with pytest.raises(InvalidArgument) as info:
        check_stored_size(out)  # ...but not together
    assert info.value.violations[0].field == "spec"
    assert str(MAX_STORED_SPEC_BYTES) in info.value.violations[0].description


@pytest.mark.parametrize(
    ("content", "fmt", "text"),
    [
        ('{"prompt": "x", "n": ' + "[" * 100_000 + "]" * 100_000 + "}", run_pb2.DATASET_FORMAT_JSONL, "nested"),
        ('{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}", run_pb2.DATASET_FORMAT_JSONL, "digits"),
        ("[" * 100_000 + "]" * 100_000, run_pb2.DATASET_FORMAT_SHAREGPT, "nested"),
        ('[{"conversations": [], "n": ' + "9" * 5000 + "}]", run_pb2.DATASET_FORMAT_SHAREGPT, "digits"),
    ],
)
def test_json_python_cannot_hold_is_invalid_argument(content: str, fmt: int, text: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        parse_dataset(dataset_spec(content, fmt).workload.dataset)
    assert info.value.violations[0].field == "spec.workload.dataset.content"
    assert text in info.value.violations[0].description


def search_spec(**search: object) -> run_pb2.RunSpec:
    s = spec()
    del s.stages[:]
    s.slo.ttft.FromMilliseconds(500)
    s.search.variable = run_pb2.SEARCH_VARIABLE_CONCURRENCY
    for k, val in search.items():
        if k in ("probe_duration", "probe_warmup"):
            getattr(s.search, k).FromNanoseconds(int(float(val) * 1e9))  # type: ignore[arg-type]
        else:
            setattr(s.search, k, val)
    return s


def test_a_search_gets_its_defaults_in_one_place() -> None:
    out = validate_and_default(search_spec())
    s = out.search
    assert (s.goodput_target_percent, s.min, s.max, s.tolerance_percent) == (95, 1, 1024, 5)
    assert s.probe_duration.seconds == 30 and s.probe_warmup.seconds == 5
    assert (s.min_requests, s.max_probes) == (100, 16)
    assert not out.stages  # planned as the run goes
    rate = validate_and_default(search_spec(variable=run_pb2.SEARCH_VARIABLE_RATE, min=0.5)).search
    assert (rate.min, rate.max) == (0.5, 1000)
    short = validate_and_default(search_spec(probe_duration=3)).search
    assert short.probe_warmup.ToNanoseconds() == 500_000_000


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s.search.ClearField("variable"), "spec.search.variable"),
        (lambda s: s.ClearField("slo"), "spec.slo"),
        (lambda s: s.stages.add(concurrency=1).duration.FromSeconds(1), "spec.stages"),
        (lambda s: setattr(s.search, "min", 8.0) or setattr(s.search, "max", 4.0), "spec.search.min"),
        (lambda s: setattr(s.search, "max", 0.5), "spec.search.max"),  # below the default min (1)
        (lambda s: setattr(s.search, "min", -3.0), "spec.search.min"),
        (lambda s: setattr(s.search, "max", float("inf")), "spec.search.max"),
        (lambda s: setattr(s.search, "min", float("nan")), "spec.search.min"),
        (lambda s: setattr(s.search, "min", 2.5), "spec.search.min"),  # concurrency is whole
        (lambda s: setattr(s.search, "max", 50_000.0), "spec.search.max"),  # per agent
        (lambda s: setattr(s.search, "goodput_target_percent", 0.0), "spec.search.goodput_target_percent"),
        (lambda s: setattr(s.search, "goodput_target_percent", 101.0), "spec.search.goodput_target_percent"),
        (lambda s: setattr(s.search, "tolerance_percent", 0.0), "spec.search.tolerance_percent"),
        (lambda s: s.search.probe_warmup.FromSeconds(30), "spec.search.probe_warmup"),
        (lambda s: s.search.probe_duration.FromSeconds(-1), "spec.search.probe_duration"),
        (lambda s: setattr(s.search, "max_probes", 101), "spec.search.max_probes"),
        (lambda s: setattr(s.search, "cost_per_hour_usd", -1.0), "spec.search.cost_per_hour_usd"),
        (lambda s: s.checks.add(expression="capacity >= 20", abort_on_fail=True), "spec.checks[0].abort_on_fail"),
        # A concurrency search has no arrivals; gamma would need a burstiness a search has not.
        (lambda s: setattr(s.search, "arrival", run_pb2.ARRIVAL_PROCESS_CONSTANT), "spec.search.arrival"),
        (
            lambda s: (
                setattr(s.search, "variable", run_pb2.SEARCH_VARIABLE_RATE)
                or setattr(s.search, "arrival", run_pb2.ARRIVAL_PROCESS_GAMMA)
            ),
            "spec.search.arrival",
        ),
    ],
)
def test_invalid_searches_name_the_field(change: Callable[[run_pb2.RunSpec], object], field: str) -> None:
    s = search_spec()
    change(s)
    assert field in fields_of(s)


def test_a_capacity_check_needs_a_search() -> None:
    s = spec()
    s.checks.add(expression="capacity >= 20")
    assert fields_of(s) == ["spec.checks[0].expression"]
    ok = search_spec()
    ok.checks.add(expression="capacity >= 20")
    validate_and_default(ok)
    rate = search_spec(variable=run_pb2.SEARCH_VARIABLE_RATE, min=0.25, max=2.5)
    assert validate_and_default(rate).search.max == 2.5
    rate.search.arrival = run_pb2.ARRIVAL_PROCESS_CONSTANT
    assert validate_and_default(rate).search.arrival == run_pb2.ARRIVAL_PROCESS_CONSTANT


def test_resume_must_name_a_stored_search_of_the_same_variable() -> None:
    def record(spec: run_pb2.RunSpec) -> RunRecord:
        return RunRecord(1, "run_a", "", "m", 3, "", "", 0, None, None, 0, 0, 0, 0, spec.SerializeToString())

    s = validate_and_default(search_spec(resume_from_run_id="run_a"))
    with pytest.raises(NotFound):
        check_resume(s, None)
    with pytest.raises(InvalidArgument) as info:
        check_resume(s, record(spec()))
    assert info.value.violations[0].field == "spec.search.resume_from_run_id"
    with pytest.raises(InvalidArgument):
        check_resume(s, record(search_spec(variable=run_pb2.SEARCH_VARIABLE_RATE)))
    check_resume(s, record(search_spec()))
