"""The exposition-text parser of the agent's scraper: what it keeps, what it refuses."""

from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from agent.scrape import COUNTER, GAUGE, ExpositionError, MetricSample, name_filter, parse_exposition
from mockserver.metrics import MALFORMED_PAGE, ServerCounters, render

pytestmark = pytest.mark.timeout(10)

VLLM_PAGE = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 3.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1234.0
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e9
# TYPE vllm:e2e_request_latency_seconds histogram
vllm:e2e_request_latency_seconds_bucket{le="0.5",model_name="m"} 2.0
vllm:e2e_request_latency_seconds_bucket{le="+Inf",model_name="m"} 5.0
vllm:e2e_request_latency_seconds_count{model_name="m"} 5.0
vllm:e2e_request_latency_seconds_sum{model_name="m"} 3.25
"""


def test_vllm_page_keeps_gauges_counters_and_histogram_totals() -> None:
    got = parse_exposition(VLLM_PAGE)
    assert got == [
        MetricSample("vllm:num_requests_running", 'engine="0",model_name="m"', GAUGE, 3.0),
        MetricSample("vllm:generation_tokens_total", 'engine="0",model_name="m"', COUNTER, 1234.0),
        MetricSample("vllm:e2e_request_latency_seconds_count", 'model_name="m"', COUNTER, 5.0),
        MetricSample("vllm:e2e_request_latency_seconds_sum", 'model_name="m"', COUNTER, 3.25),
    ]


def test_openmetrics_counter_family_without_total_and_untyped_samples() -> None:
    page = (
        "# TYPE llamacpp:tokens_predicted counter\n"
        "llamacpp:tokens_predicted_total 42\n"
        "llamacpp:tokens_predicted_created 1700000000\n"
        "tgi_request_success 7 1700000000000\n"  # untyped, with a time stamp
        "requests_served_total 9\n"  # untyped, counter by its name
        "# EOF\n"
        "ignored after EOF {{{\n"
    )
    assert parse_exposition(page) == [
        MetricSample("llamacpp:tokens_predicted_total", "", COUNTER, 42.0),
        MetricSample("tgi_request_success", "", GAUGE, 7.0),
        MetricSample("requests_served_total", "", COUNTER, 9.0),
    ]


def test_labels_are_sorted_and_escapes_kept() -> None:
    page = 'm{z="1", a="q\\"uote\\\\", b="line\\nbreak",} 1\n'
    (sample,) = parse_exposition(page)
    assert sample.labels == 'a="q\\"uote\\\\",b="line\\nbreak",z="1"'


def test_special_values() -> None:
    page = '# TYPE g gauge\ng{a="1"} NaN\ng{a="2"} +Inf\ng{a="3"} -Inf\ng{a="4"} 1e-3\n'
    values = [s.value for s in parse_exposition(page)]
    assert math.isnan(values[0]) and values[1:] == [math.inf, -math.inf, 0.001]


@pytest.mark.parametrize(
    ("page", "line"),
    [
        (MALFORMED_PAGE, 3),
        ("ok 1\nnot exposition text\n", 2),
        ('m{a="1" 2\n', 1),
        ("m{a=1} 2\n", 1),
        ("m one\n", 1),
        ("# TYPE m colour\nm 1\n", 1),
        ("m 1 2 3\n", 1),
    ],
)
def test_malformed_pages_are_refused_with_the_line(page: str, line: int) -> None:
    with pytest.raises(ExpositionError) as info:
        parse_exposition(page)
    assert info.value.line_no == line
    assert f"line {line}" in str(info.value)


def test_prometheus_client_output_parses() -> None:
    registry = CollectorRegistry()
    Counter("sglang:generation_tokens", "tokens", ["model"], registry=registry).labels("m").inc(17)
    Gauge("sglang:num_running_reqs", "running", registry=registry).set(4)
    Histogram("tgi_request_generated_tokens", "tokens", registry=registry).observe(12)
    got = {(s.name, s.kind): s.value for s in parse_exposition(generate_latest(registry).decode())}
    assert got[("sglang:generation_tokens_total", COUNTER)] == 17
    assert got[("sglang:num_running_reqs", GAUGE)] == 4
    assert got[("tgi_request_generated_tokens_sum", COUNTER)] == 12
    assert got[("tgi_request_generated_tokens_count", COUNTER)] == 1
    assert not any(name.endswith(("_bucket", "_created")) for name, _ in got)


def test_mock_page_parses() -> None:
    counters = ServerCounters()
    counters.finished["length"] = 3
    samples = {s.name + s.labels: s for s in parse_exposition(render('m"x', counters, 2, 100, 48))}
    assert samples['vllm:num_requests_runningmodel_name="m\\"x"'].value == 2
    assert samples['vllm:generation_tokens_totalmodel_name="m\\"x"'].value == 48
    assert samples['vllm:request_success_totalfinished_reason="length",model_name="m\\"x"'].value == 3


def test_name_filter() -> None:
    keep = name_filter(["vllm:*", "*_running"])
    assert keep("vllm:num_requests_waiting") and keep("tgi_running") and not keep("process_cpu_seconds_total")
    assert name_filter([])("anything")
