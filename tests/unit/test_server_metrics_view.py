"""The controller's server view: spec validation and defaults, which agent scrapes what,
series alignment, counter resets, and when the cross-check flags a mismatch; the CLI flags."""

from __future__ import annotations

import numpy as np
import pytest

from client.spec_builder import build_spec, spec_parser
from common.metrics import SampleColumns
from common.proto.loadtest.v1 import run_pb2
from controller.domain.errors import InvalidArgument
from controller.domain.results.server_metrics import (
    COUNTER,
    GAUGE,
    PREFIX_CACHE_NAMES,
    ROLE_OF,
    compute_server_view,
    counter_increase,
    plan_scrapes,
)
from controller.domain.spec import validate_and_default
from controller.store.server_metrics import StageScrapes, StoredScrape

pytestmark = pytest.mark.timeout(10)
S = 1_000_000_000
T0 = 1_700_000_000 * S


def base_spec() -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec()
    spec.target.base_url = "http://127.0.0.1:8000/v1"
    spec.target.model = "m"
    spec.stages.add(concurrency=1, requests=1)
    return spec


def test_defaults_and_validation() -> None:
    spec = base_spec()
    spec.server_metrics.endpoints.append("http://model:8000/metrics")
    out = validate_and_default(spec)
    assert out.server_metrics.scrape_interval.ToMilliseconds() == 1000
    assert out.server_metrics.mismatch_tolerance_percent == 2.0
    assert not validate_and_default(base_spec()).HasField("server_metrics")  # nothing to default

    bad = base_spec()
    bad.server_metrics.metric_filters.extend(["vllm:*", "has space"])
    with pytest.raises(InvalidArgument) as info:
        validate_and_default(bad)
    fields = {v.field for v in info.value.violations}
    assert fields == {"spec.server_metrics.endpoints", "spec.server_metrics.metric_filters[1]"}

    dup = base_spec()
    dup.server_metrics.endpoints.extend(["http://a/metrics", "http://a/metrics", "http://b:0/metrics"])
    with pytest.raises(InvalidArgument) as info:
        validate_and_default(dup)
    assert {v.field for v in info.value.violations} == {
        "spec.server_metrics.endpoints[1]",
        "spec.server_metrics.endpoints[2]",
    }

    # Credentials in an endpoint would be shown by every read: refused, the URL not repeated.
    secret = base_spec()
    secret.server_metrics.endpoints.extend(["http://u:pw@a/metrics", "http://a/metrics?token=SECRET", "http://b/m#x"])
    with pytest.raises(InvalidArgument) as info:
        validate_and_default(secret)
    assert [v.field for v in info.value.violations] == [f"spec.server_metrics.endpoints[{i}]" for i in range(3)]
    assert "SECRET" not in str(info.value) and all("must not carry" in v.description for v in info.value.violations)


def test_one_agent_per_endpoint_among_agents_with_a_share() -> None:
    sm = run_pb2.ServerMetricsSpec(endpoints=["http://a/m", "http://b/m", "http://c/m"], metric_filters=["x_*"])
    plans = plan_scrapes(sm, [True, False, True])
    assert plans[1] is None
    assert plans[0] is not None and list(plans[0].endpoints) == ["http://a/m", "http://c/m"]
    assert plans[2] is not None and list(plans[2].endpoints) == ["http://b/m"]
    # User filters are widened by every metric the mapping table knows, and the hit rate's.
    assert set(plans[0].metric_filters) == {"x_*", *ROLE_OF, *PREFIX_CACHE_NAMES}
    assert plan_scrapes(run_pb2.ServerMetricsSpec(), [True]) == [None]
    assert plan_scrapes(sm, [False, False]) == [None, None]


def test_counter_increase_survives_resets() -> None:
    assert counter_increase([10, 15, 15, 40]) == 30
    assert counter_increase([10, 15, 3, 8]) == 5 + 3 + 5  # restart: the new value counts from 0
    assert counter_increase([7]) == 0


def columns(sent_s: list[float], duration_s: float, tokens: int, status: int = 1, flags: int = 1) -> SampleColumns:
    n = len(sent_s)
    ns = np.array([T0 + int(s * S) for s in sent_s], dtype=np.int64)
    end = np.full(n, int(duration_s * S), dtype=np.int64)
    return SampleColumns(
        sent_unix_ns=ns,
        queue_delay_ns=np.zeros(n, np.int64),
        first_token_ns=end // 2,
        last_token_ns=end,
        done_ns=end,
        prompt_tokens=np.full(n, 10, np.int64),
        output_tokens=np.full(n, tokens, np.int64),
        status=np.full(n, status, np.int64),
        flags=np.full(n, flags, np.int64),
        itl_count=np.zeros(n, np.int64),
        itl_ns=np.zeros(0, np.int64),
    )


def scrapes(
    times_s: list[float], tokens: list[float], running: list[float], errors: dict[int, str] | None = None
) -> StageScrapes:
    errors = errors or {}
    stored = [StoredScrape(i, "http://m/metrics", T0 + int(t * S), errors.get(i, "")) for i, t in enumerate(times_s)]
    values: list[tuple[int, str, int, float]] = []
    for i in range(len(times_s)):
        if i not in errors:
            values += [
                (i, "vllm:generation_tokens_total", COUNTER, tokens[i]),
                (i, "vllm:num_requests_running", GAUGE, running[i]),
            ]
    return StageScrapes(stored, values)


def test_series_are_aligned_and_the_cross_check_compares_the_window() -> None:
    cols = columns([0.0, 0.5, 1.0, 1.5], 1.0, tokens=100)  # 4 requests, 100 tokens each, 0 .. 2.5 s
    data = scrapes([-0.2, 0.6, 1.6, 2.6, 3.0], [1000, 1100, 1250, 1400, 1400], [0, 2, 2, 1, 0])
    view = compute_server_view(data, cols, 2.0)
    by_name = {s.name: s for s in view.series}
    running = by_name["vllm:num_requests_running"]
    assert running.role == "running_requests"
    assert running.points == [(0, 2.0), (1, 2.0), (2, 1.0), (3, 0.0)]  # the baseline at -0.2 s is dropped
    rate = by_name["vllm:generation_tokens_total"]
    # Each increase is credited to the middle of its interval, as a per-second rate.
    assert rate.points[0][0] == 0 and rate.points[0][1] == pytest.approx(100 / 0.8)
    (tokens,) = view.cross_checks  # no finished-requests counter was scraped: no check for it
    assert tokens.quantity == "generated_tokens" and tokens.server_value == 400 == tokens.client_value
    assert tokens.server_metrics == ["vllm:generation_tokens_total"]
    assert tokens.window_complete and not tokens.mismatch
    assert view.scrapes_ok == 5 and view.scrapes_failed == 0 and not view.errors


def test_mismatch_beyond_tolerance_and_incomplete_windows() -> None:
    cols = columns([0.0, 0.5], 1.0, tokens=97)
    data = scrapes([-0.1, 2.0], [0, 200], [0, 0])
    tokens = compute_server_view(data, cols, 2.0).cross_checks[0]
    assert tokens.difference_percent == pytest.approx(-3.0) and tokens.mismatch
    assert not compute_server_view(data, cols, 5.0).cross_checks[0].mismatch

    # The first scrape failed: the counter's window starts after the first request; not judged.
    late = scrapes([-0.1, 0.3, 2.0], [0, 50, 200], [0, 0, 0], errors={0: "timed out"})
    view = compute_server_view(late, cols, 2.0)
    check = view.cross_checks[0]
    assert not check.window_complete and not check.mismatch and "not compared" in check.message
    assert view.scrapes_failed == 1 and view.errors[0].message == "timed out" and view.errors[0].count == 1


def test_cli_flags_build_the_server_metrics_spec() -> None:
    args = spec_parser().parse_args(
        [
            "--target",
            "http://127.0.0.1:8000/v1",
            "--model",
            "m",
            "--concurrency",
            "1",
            "--server-metrics",
            "http://a:8000/metrics",
            "--server-metrics",
            "http://b:8000/metrics",
            "--scrape-interval",
            "500ms",
            "--metric-filter",
            "vllm:*",
            "--mismatch-tolerance",
            "5",
        ]
    )
    sm = build_spec(args).server_metrics
    assert list(sm.endpoints) == ["http://a:8000/metrics", "http://b:8000/metrics"]
    assert sm.scrape_interval.ToMilliseconds() == 500 and list(sm.metric_filters) == ["vllm:*"]
    assert sm.mismatch_tolerance_percent == 5
    plain = build_spec(spec_parser().parse_args(["--target", "http://h/v1", "--model", "m", "--concurrency", "1"]))
    assert not plain.HasField("server_metrics")


def test_llamacpp_prompt_tokens_add_the_cached_ones_counted_apart() -> None:
    cols = columns([0.0, 0.5, 1.0], 1.0, tokens=8)  # 3 requests, 10 prompt tokens each
    times = [-0.1, 1.0, 2.5]
    stored = [StoredScrape(i, "http://llama/metrics", T0 + int(t * S), "") for i, t in enumerate(times)]
    values: list[tuple[int, str, int, float]] = []
    for i, (evaluated, cached, predicted) in enumerate([(100, 0, 50), (112, 4, 58), (120, 10, 74)]):
        values += [
            (i, "llamacpp:prompt_tokens_total", COUNTER, evaluated),
            (i, "llamacpp:prompt_tokens_cached_total", COUNTER, cached),
            (i, "llamacpp:tokens_predicted_total", COUNTER, predicted),
        ]
    checks = {c.quantity: c for c in compute_server_view(StageScrapes(stored, values), cols, 2.0).cross_checks}
    prompt = checks["prompt_tokens"]
    # 20 evaluated + 10 reused from the cache = the client's 30.
    assert prompt.server_value == 30 == prompt.client_value and not prompt.mismatch
    assert prompt.server_metrics == ["llamacpp:prompt_tokens_cached_total", "llamacpp:prompt_tokens_total"]
    assert checks["generated_tokens"].server_value == 24 == checks["generated_tokens"].client_value
    # Without the cache counter (older builds) the evaluated tokens alone fall short: flagged.
    older = [v for v in values if v[1] != "llamacpp:prompt_tokens_cached_total"]
    (_, prompt_only) = compute_server_view(StageScrapes(stored, older), cols, 2.0).cross_checks
    assert prompt_only.server_value == 20 and prompt_only.mismatch


def test_the_mapping_accepts_old_and_new_names() -> None:
    # Renamed across versions: both names map to the same role.
    assert ROLE_OF["vllm:kv_cache_usage_perc"] == ROLE_OF["vllm:gpu_cache_usage_perc"] == "kv_cache_usage"
    assert ROLE_OF["llamacpp:kv_cache_usage_ratio"] == "kv_cache_usage"  # older llama.cpp builds only
    assert ROLE_OF["llamacpp:prompt_tokens_cached_total"] == "cached_prompt_tokens"
    assert ROLE_OF["llamacpp:requests_deferred"] == "waiting_requests"
    # The agents keep every mapped metric whatever the user's filters.
    spec = run_pb2.ServerMetricsSpec(endpoints=["http://m/metrics"], metric_filters=["nothing*"])
    (plan,) = plan_scrapes(spec, [True])
    assert plan is not None and "llamacpp:prompt_tokens_cached_total" in plan.metric_filters


def hit_rate_scrapes(endpoint: str, times_s: list[float], series: dict[tuple[str, int], list[float]]) -> StageScrapes:
    stored = [StoredScrape(i, endpoint, T0 + int(t * S), "") for i, t in enumerate(times_s)]
    values = [(i, name, kind, vals[i]) for (name, kind), vals in series.items() for i in range(len(times_s))]
    return StageScrapes(stored, values)


def test_vllm_prefix_cache_hit_rate_from_counter_deltas_over_the_stage() -> None:
    cols = columns([0.0, 0.5], 1.0, tokens=8)
    data = hit_rate_scrapes(
        "http://v/metrics",
        [-0.1, 0.8, 2.0],
        {
            # Since start: 1000 hits of 4000 queries before the stage; 300 of 400 during it.
            ("vllm:prefix_cache_hits_total", COUNTER): [1000, 1100, 1300],
            ("vllm:prefix_cache_queries_total", COUNTER): [4000, 4200, 4400],
            ("vllm:gpu_prefix_cache_hit_rate", GAUGE): [0.1, 0.1, 0.1],  # a lesser source: unused
        },
    )
    view = compute_server_view(data, cols, 2.0)
    assert view.prefix_cache_hit_percent == pytest.approx(75.0)
    assert view.prefix_cache_source == "vllm:prefix_cache_hits_total, vllm:prefix_cache_queries_total"
    # No query during the stage: no rate rather than 0 %.
    idle = hit_rate_scrapes(
        "http://v/metrics",
        [-0.1, 2.0],
        {("vllm:prefix_cache_hits_total", COUNTER): [5, 5], ("vllm:prefix_cache_queries_total", COUNTER): [9, 9]},
    )
    assert compute_server_view(idle, cols, 2.0).prefix_cache_hit_percent is None


def test_hit_rate_gauges_are_averaged_over_the_stage_window() -> None:
    cols = columns([0.0, 0.5], 1.0, tokens=8)  # the window: 0 .. 1.5 s
    for name in ("sglang:cache_hit_rate", "vllm:gpu_prefix_cache_hit_rate"):
        data = hit_rate_scrapes("http://s/metrics", [-0.5, 0.5, 1.0, 3.0], {(name, GAUGE): [0.9, 0.2, 0.4, 0.9]})
        view = compute_server_view(data, cols, 2.0)
        assert view.prefix_cache_hit_percent == pytest.approx(30.0), name
        assert view.prefix_cache_source == name


def test_llamacpp_hit_rate_counts_the_evaluated_tokens_as_misses() -> None:
    cols = columns([0.0, 0.5], 1.0, tokens=8)
    data = hit_rate_scrapes(
        "http://l/metrics",
        [-0.1, 2.0],
        {
            ("llamacpp:prompt_tokens_cached_total", COUNTER): [0, 30],
            ("llamacpp:prompt_tokens_total", COUNTER): [100, 110],
        },
    )
    view = compute_server_view(data, cols, 2.0)
    assert view.prefix_cache_hit_percent == pytest.approx(100 * 30 / 40)
    assert view.prefix_cache_source == "llamacpp:prompt_tokens_cached_total, llamacpp:prompt_tokens_total"
    # A build without the cached counter: no hit rate.
    older = hit_rate_scrapes("http://l/metrics", [-0.1, 2.0], {("llamacpp:prompt_tokens_total", COUNTER): [0, 9]})
    none = compute_server_view(older, cols, 2.0)
    assert none.prefix_cache_hit_percent is None and none.prefix_cache_source == ""


def test_hit_counters_of_several_endpoints_are_summed() -> None:
    cols = columns([0.0], 1.0, tokens=8)
    a = hit_rate_scrapes(
        "http://a/metrics",
        [-0.1, 2.0],
        {("vllm:prefix_cache_hits_total", COUNTER): [0, 90], ("vllm:prefix_cache_queries_total", COUNTER): [0, 100]},
    )
    b = hit_rate_scrapes(
        "http://b/metrics",
        [-0.1, 2.0],
        {
            ("vllm:gpu_prefix_cache_hits_total", COUNTER): [0, 10],
            ("vllm:gpu_prefix_cache_queries_total", COUNTER): [0, 100],
        },
    )
    b_scrapes = [StoredScrape(s.pk + 10, s.endpoint, s.time_unix_ns, s.error) for s in b.scrapes]
    b_values = [(pk + 10, n, k, v) for pk, n, k, v in b.values]
    view = compute_server_view(StageScrapes([*a.scrapes, *b_scrapes], [*a.values, *b_values]), cols, 2.0)
    assert view.prefix_cache_hit_percent == pytest.approx(50.0)
    assert "vllm:gpu_prefix_cache_hits_total" in view.prefix_cache_source
    assert "vllm:prefix_cache_hits_total" in view.prefix_cache_source


VLLM_PAGE = """# HELP vllm:prefix_cache_queries_total Prefix cache queries, in terms of number of queried tokens.
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {queries}
# HELP vllm:prefix_cache_hits_total Prefix cache hits, in terms of number of cached tokens.
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{{engine="0",model_name="m"}} 1.0
"""
SGLANG_PAGE = """# HELP sglang:cache_hit_rate The prefix cache hit rate.
# TYPE sglang:cache_hit_rate gauge
sglang:cache_hit_rate{{model_name="m"}} {rate}
"""


def test_hit_rate_from_pages_as_the_agent_parses_and_filters_them() -> None:
    """The names as servers expose them survive the agent's parser and a user's filter."""
    from agent.scrape import name_filter, parse_exposition

    (plan,) = plan_scrapes(run_pb2.ServerMetricsSpec(endpoints=["http://v/metrics"], metric_filters=["x*"]), [True])
    assert plan is not None
    keep = name_filter(list(plan.metric_filters))
    cols = columns([0.0, 0.5], 1.0, tokens=8)
    pages = {
        "http://v/metrics": [VLLM_PAGE.format(queries=q, hits=h) for q, h in ((100, 10), (300, 160), (500, 310))],
        "http://s/metrics": [SGLANG_PAGE.format(rate=r) for r in (0.5, 0.25, 0.75)],
    }
    for endpoint, texts in pages.items():
        stored, values = [], []
        for i, (t, text) in enumerate(zip((-0.1, 0.7, 2.0), texts, strict=True)):
            stored.append(StoredScrape(i, endpoint, T0 + int(t * S), ""))
            values += [(i, v.name, v.kind, v.value) for v in parse_exposition(text) if keep(v.name)]
        view = compute_server_view(StageScrapes(stored, values), cols, 2.0)
        if endpoint == "http://v/metrics":
            assert view.prefix_cache_hit_percent == pytest.approx(100 * 300 / 400)
        else:  # the one reading inside the stage's window (0 .. 1.5 s)
            assert view.prefix_cache_hit_percent == pytest.approx(25.0)
