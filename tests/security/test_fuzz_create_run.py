"""Fuzzing CreateRun over a real channel: random bytes, mutated valid requests and generated
specs with extreme values get only OK, INVALID_ARGUMENT or RESOURCE_EXHAUSTED — never
INTERNAL or UNKNOWN — and the controller keeps serving afterwards."""

from __future__ import annotations

import contextlib
import random
from collections.abc import Iterator

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.proto.loadtest.v1 import run_pb2, run_service_pb2
from tests.security.conftest import ThreadedController

pytestmark = pytest.mark.timeout(120)

METHOD = "/loadtest.v1.RunService/CreateRun"
ACCEPTABLE = {grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.RESOURCE_EXHAUSTED}
SETTINGS = {
    "deadline": None,
    "database": None,
    "suppress_health_check": [HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
}

INT32 = st.integers(-(2**31), 2**31 - 1)
UINT32 = st.one_of(st.integers(0, 2**32 - 1), st.sampled_from([0, 1, 2, 2**31, 2**32 - 1]))
UINT64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 1, 2**63, 2**64 - 1]))
INT64 = st.one_of(st.integers(-(2**63), 2**63 - 1), st.sampled_from([-(2**63), -1, 0, 2**63 - 1]))
DOUBLE = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-320, 1e308]))
TEXT = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "\r\n", "\x00", "é" * 300, "a" * 3000]))
URLS = st.one_of(
    TEXT,
    st.builds(
        lambda s, rest: f"{s}://{rest}",
        st.sampled_from(["http", "https", "ftp", "file", "javascript", "HTTP"]),
        st.text(max_size=30),
    ),
    st.sampled_from(["http://127.0.0.1:9/v1", "http://[::1]:0/", "http://h:99999/", "https://x", "http://"]),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | DOUBLE | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)


def _duration(d: object, seconds: int, nanos: int) -> None:
    d.seconds = seconds  # type: ignore[attr-defined]
    d.nanos = nanos  # type: ignore[attr-defined]


DURATIONS = st.tuples(INT64, INT32) | st.tuples(st.integers(-10, 100_000), st.integers(0, 999_999_999))


@st.composite
def stages(draw: st.DrawFn) -> run_pb2.Stage:
    stage = run_pb2.Stage(name=draw(TEXT))
    load = draw(st.sampled_from(["concurrency", "rate", "none"]))
    if load == "concurrency":
        stage.concurrency = draw(UINT32)
    elif load == "rate":
        stage.request_rate = draw(DOUBLE)
    for name in ("duration", "warmup_duration", "ramp"):
        if draw(st.booleans()):
            _duration(getattr(stage, name), *draw(DURATIONS))
    stage.requests = draw(UINT64)
    stage.warmup_requests = draw(st.one_of(st.just(0), UINT64))
    stage.arrival = draw(st.one_of(st.integers(0, 4), INT32))  # type: ignore[assignment]
    stage.burstiness = draw(st.one_of(st.just(0.0), DOUBLE))
    stage.max_concurrency = draw(st.one_of(st.just(0), UINT32))
    return stage


@st.composite
def specs(draw: st.DrawFn) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(display_name=draw(TEXT))
    if draw(st.integers(0, 9)):
        t = spec.target
        t.base_url = draw(URLS)
        t.model = draw(TEXT)
        t.api_kind = draw(st.one_of(st.integers(0, 3), INT32))  # type: ignore[assignment]
        t.api_key = draw(TEXT)
        for k, v in draw(st.dictionaries(TEXT, TEXT, max_size=4)).items():
            t.headers[k] = v
        if draw(st.booleans()):
            _duration(t.request_timeout, *draw(DURATIONS))
        if draw(st.booleans()):
            t.stream = draw(st.booleans())
        if draw(st.booleans()):
            body = draw(st.dictionaries(TEXT, JSON_VALUES, max_size=4))
            with contextlib.suppress(ValueError, TypeError):
                t.extra_body.update(body)
    spec.stages.extend(draw(st.lists(stages(), max_size=4)))
    if draw(st.integers(0, 30)) == 0:
        spec.stages.extend([spec.stages[0] if spec.stages else run_pb2.Stage(concurrency=1)] * 101)
    w = spec.workload
    source = draw(st.sampled_from(["none", "synthetic", "dataset"]))
    if source == "synthetic":
        for lengths in (w.synthetic.input_tokens, w.synthetic.output_tokens):
            kind = draw(st.sampled_from(["fixed", "uniform", "normal", "none"]))
            if kind == "fixed":
                lengths.fixed = draw(UINT32)
            elif kind == "uniform":
                lengths.uniform.min, lengths.uniform.max = draw(UINT32), draw(UINT32)
            elif kind == "normal":
                n = lengths.normal
                n.mean, n.std, n.min, n.max = draw(DOUBLE), draw(DOUBLE), draw(UINT32), draw(UINT32)
        w.synthetic.shared_prefix_tokens = draw(st.one_of(st.just(0), UINT32))
    elif source == "dataset":
        w.dataset.format = draw(st.one_of(st.integers(0, 3), INT32))  # type: ignore[assignment]
        w.dataset.content = draw(
            st.one_of(
                TEXT,
                st.sampled_from(
                    [
                        '{"prompt": "hi"}\n',
                        '{"messages": []}',
                        "[]",
                        '{"prompt": 1e999}',
                        '[{"conversations": 5}]',
                    ]
                ),
            )
        )
        w.dataset.min_prompt_words, w.dataset.max_prompt_words = draw(UINT32), draw(UINT32)
    w.seed = draw(UINT64)
    spec.placement.agents = draw(st.one_of(st.integers(0, 3), UINT32))
    for k, v in draw(st.dictionaries(TEXT, TEXT, max_size=3)).items():
        spec.placement.selector[k] = v
    if draw(st.booleans()):
        _duration(spec.placement.wait_timeout, *draw(DURATIONS))
    spec.placement.on_agent_loss = draw(st.one_of(st.integers(0, 3), INT32))  # type: ignore[assignment]
    for k, v in draw(st.dictionaries(TEXT, TEXT, max_size=3)).items():
        spec.labels[k] = v
    for name in ("ttft", "tpot", "e2e"):
        if draw(st.booleans()):
            _duration(getattr(spec.slo, name), *draw(DURATIONS))
    expressions = st.sampled_from(["p99(ttft) < 500ms", "error_rate < 1%", "p99(ttft) < nan", "p101(ttft) < 1"])
    for expression in draw(st.lists(st.one_of(TEXT, expressions), max_size=3)):
        spec.checks.add(expression=expression, abort_on_fail=draw(st.booleans()))
    return spec


def _base_spec() -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec()
    spec.target.base_url = "http://127.0.0.1:9/v1"
    spec.target.model = "m"
    spec.target.api_key = "secret"
    spec.target.headers["x-a"] = "b"
    spec.target.extra_body.update({"temperature": 0.5})
    stage = spec.stages.add(concurrency=2)
    stage.duration.FromSeconds(5)
    spec.checks.add(expression="p99(ttft) < 500ms")
    return spec


def _set_path(spec: run_pb2.RunSpec, path: str, value: object) -> None:
    *parents, leaf = path.split(".")
    target: object = spec
    for name in parents:
        target = target.stages[0] if name == "stages[0]" else getattr(target, name)
    # A value the field's type cannot even hold leaves the field as it was.
    with contextlib.suppress(ValueError, TypeError, AttributeError):
        setattr(target, leaf, value)


# Fields of an otherwise valid spec, each with values at and beyond its edges.
PERTURBATIONS: list[tuple[str, st.SearchStrategy[object]]] = [
    ("stages[0].concurrency", UINT32),
    ("stages[0].request_rate", DOUBLE),
    ("stages[0].requests", UINT64),
    ("stages[0].request_rate", st.sampled_from([1e-300, 5e-324, 0.000999, 0.001])),
    ("stages[0].warmup_requests", UINT64),
    ("stages[0].max_concurrency", UINT32),
    ("stages[0].burstiness", DOUBLE),
    ("stages[0].arrival", INT32),
    ("stages[0].duration.seconds", INT64),
    ("stages[0].duration.nanos", INT32),
    ("stages[0].warmup_duration.seconds", INT64),
    ("stages[0].ramp.nanos", INT32),
    ("stages[0].name", TEXT),
    ("target.base_url", URLS),
    ("target.model", TEXT),
    ("target.api_kind", INT32),
    ("target.api_key", TEXT),
    ("target.request_timeout.seconds", INT64),
    ("target.request_timeout.nanos", INT32),
    ("slo.ttft.seconds", INT64),
    ("slo.e2e.nanos", INT32),
    ("placement.agents", UINT32),
    ("placement.wait_timeout.seconds", INT64),
    ("placement.on_agent_loss", INT32),
    ("workload.seed", UINT64),
    ("workload.synthetic.input_tokens.fixed", UINT32),
    ("workload.synthetic.output_tokens.normal.mean", DOUBLE),
    ("workload.synthetic.output_tokens.normal.std", DOUBLE),
    ("workload.synthetic.shared_prefix_tokens", UINT32),
    ("workload.dataset.content", TEXT),
    ("workload.dataset.format", INT32),
    ("display_name", TEXT),
]


@st.composite
def near_valid_specs(draw: st.DrawFn) -> run_pb2.RunSpec:
    """A valid spec with one to three fields pushed to extreme values (reaches the checks a
    fully random spec rarely gets to, behind its first violations)."""
    spec = _base_spec()
    for path, values in draw(st.lists(st.sampled_from(PERTURBATIONS), min_size=1, max_size=3)):
        _set_path(spec, path, draw(values))
    if draw(st.integers(0, 4)) == 0:
        key = draw(st.sampled_from(["h", "authorization", "bad header", "x" * 300, ""]))
        spec.target.headers[key] = draw(TEXT)
    if draw(st.integers(0, 4)) == 0:
        with contextlib.suppress(ValueError, TypeError):
            spec.target.extra_body.update(draw(st.dictionaries(TEXT, JSON_VALUES, max_size=3)))
    if draw(st.integers(0, 9)) == 0:  # maps around their count limits (docs/security.md)
        field = draw(st.sampled_from(["labels", "selector", "headers"]))
        entries = (
            spec.target.headers
            if field == "headers"
            else getattr(spec.placement if field == "selector" else spec, field)
        )
        for i in range(draw(st.sampled_from([15, 16, 17, 63, 64, 65, 2000]))):
            entries[f"x-k{i}"] = draw(st.sampled_from(["v", "v" * 256, "v" * 257]))
    if draw(st.integers(0, 9)) == 0:
        spec.workload.dataset.format = run_pb2.DATASET_FORMAT_JSONL
        spec.workload.dataset.content = draw(
            st.sampled_from(
                [
                    '{"prompt": "x", "n": ' + "[" * 5000 + "]" * 5000 + "}",
                    '{"prompt": "x", "max_tokens": ' + "9" * 5000 + "}",
                ]
            )
        )
    return spec


@pytest.fixture
def channel(threaded_controller: ThreadedController) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{threaded_controller.port}") as ch:
        yield ch


def _call(channel: grpc.Channel, payload: bytes, details: dict[str, str] | None = None) -> grpc.StatusCode:
    create = channel.unary_unary(METHOD)  # bytes in, bytes out: the payload goes as is
    try:
        create(payload, timeout=10)
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()  # type: ignore[attr-defined]
        if details is not None:
            details.setdefault(code.name, exc.details())  # type: ignore[attr-defined]
        return code
    return grpc.StatusCode.OK


def _valid_request() -> bytes:
    return run_service_pb2.CreateRunRequest(spec=_base_spec()).SerializeToString()


def test_fuzz_create_run(channel: grpc.Channel, threaded_controller: ThreadedController) -> None:
    seen: dict[str, int] = {}
    details: dict[str, str] = {}

    def check(payload: bytes) -> None:
        code = _call(channel, payload, details)
        seen[code.name] = seen.get(code.name, 0) + 1
        assert code in ACCEPTABLE, f"{code} ({details.get(code.name)}) for payload {payload[:300]!r}"
        # RESOURCE_EXHAUSTED must be ours, not the client refusing an oversized error status.
        assert "metadata size" not in details.get("RESOURCE_EXHAUSTED", ""), details

    @settings(max_examples=900, **SETTINGS)  # type: ignore[arg-type]
    @given(spec=near_valid_specs())
    def near_valid(spec: run_pb2.RunSpec) -> None:
        check(run_service_pb2.CreateRunRequest(spec=spec).SerializeToString())

    @settings(max_examples=500, **SETTINGS)  # type: ignore[arg-type]
    @given(spec=specs(), request_id=st.one_of(st.just(""), TEXT))
    def generated(spec: run_pb2.RunSpec, request_id: str) -> None:
        check(run_service_pb2.CreateRunRequest(spec=spec, request_id=request_id).SerializeToString())

    @settings(max_examples=500, **SETTINGS)  # type: ignore[arg-type]
    @given(payload=st.one_of(st.binary(max_size=600), st.binary(min_size=1, max_size=8).map(lambda b: b * 50)))
    def random_bytes(payload: bytes) -> None:
        check(payload)

    valid = _valid_request()

    @settings(max_examples=1100, **SETTINGS)  # type: ignore[arg-type]
    @given(seed=st.integers(0, 2**32 - 1), flips=st.integers(1, 8))
    def mutated(seed: int, flips: int) -> None:
        rng = random.Random(seed)
        data = bytearray(valid)
        for _ in range(flips):
            op = rng.randrange(3)
            i = rng.randrange(len(data))
            if op == 0:
                data[i] = rng.randrange(256)
            elif op == 1:
                del data[i]
            else:
                data.insert(i, rng.randrange(256))
        check(bytes(data))

    near_valid()
    generated()
    random_bytes()
    mutated()
    total = sum(seen.values())
    assert total >= 3000, (seen, details)
    # The generators reach both sides of validation, not only one.
    assert seen.get("OK", 0) > 0 and seen.get("INVALID_ARGUMENT", 0) > total // 4, (seen, details)

    # Still serving, and still correct: health is SERVING and a valid run is created.
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=5).status == health_pb2.HealthCheckResponse.SERVING
    assert _call(channel, valid) == grpc.StatusCode.OK
