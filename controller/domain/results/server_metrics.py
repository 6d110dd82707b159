"""The server-side view: the model server's own Prometheus metrics beside the client's.

* `validate_server_metrics` checks `RunSpec.server_metrics` (violations name the field) and
  fills in its defaults; `plan_scrapes` picks one agent of a stage per endpoint.
* `scrape_rows` turns the `ServerScrape`s of a sample batch into rows for the store.
* `stage_server_metrics` computes a stage's server view from the stored scrapes: per-second
  series aligned with the client time series (second 0 = the stage's first sent request),
  the client-vs-server cross-check of generated tokens, finished requests and prompt tokens,
  and the scrape failures grouped by endpoint and message.

`SERVER_METRIC_MAP` is the mapping table (docs/server-metrics.md): which metric of which
server means what. To support another server, add a `ServerMetricNames` row; nothing else
changes. A role without a metric on that server is `None`. Names that changed between
versions of a server get a row each (both are accepted; a server exports one of them).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np

from common.codes import RequestStatus
from common.durations import seconds
from common.metrics import SampleColumns, counted_mask
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from common.spec_defaults import DEFAULT_SCRAPE_INTERVAL_S, MIN_SCRAPE_INTERVAL_S
from controller.domain.errors import FieldViolation
from controller.store.interface import SnapshotReads
from controller.store.server_metrics import ScrapeRow, StageScrapes

MAX_INTERVAL_S = 3600.0
DEFAULT_TOLERANCE_PERCENT = 2.0
MAX_ENDPOINTS = 16
MAX_FILTERS = 64
MAX_SERIES = 100  # per stage in a result; the roles of the mapping table come first
MAX_NAME_CHARS = 256
MAX_LABEL_CHARS = 1024
MAX_VALUES_PER_SCRAPE = 5000
_NS = 1_000_000_000

GAUGE = run_pb2.SERVER_METRIC_KIND_GAUGE
COUNTER = run_pb2.SERVER_METRIC_KIND_COUNTER

GENERATED_TOKENS = "generated_tokens"
FINISHED_REQUESTS = "finished_requests"
PROMPT_TOKENS = "prompt_tokens"


@dataclass(frozen=True)
class ServerMetricNames:
    """What one server calls each role (None: the server has no such metric)."""

    server: str
    generated_tokens: str | None  # counter: tokens generated
    finished_requests: str | None  # counter: requests finished
    prompt_tokens: str | None  # counter: prompt tokens processed
    running_requests: str | None  # gauge
    waiting_requests: str | None  # gauge
    kv_cache_usage: str | None  # gauge, fraction 0..1
    # counter: prompt tokens served from the prompt cache, which `prompt_tokens` leaves out
    # (a server whose prompt counter already includes them has None here)
    cached_prompt_tokens: str | None = None


SERVER_METRIC_MAP: tuple[ServerMetricNames, ...] = (
    ServerMetricNames(
        "vLLM",
        "vllm:generation_tokens_total",
        "vllm:request_success_total",
        "vllm:prompt_tokens_total",
        "vllm:num_requests_running",
        "vllm:num_requests_waiting",
        "vllm:kv_cache_usage_perc",
    ),
    # vLLM's V0 engine and early V1 releases: the KV-cache gauge was renamed kv_cache_usage_perc
    # (vllm-project/vllm#18354); the old name is no longer exported by default.
    ServerMetricNames("vLLM (before kv_cache_usage_perc)", None, None, None, None, None, "vllm:gpu_cache_usage_perc"),
    ServerMetricNames(
        "SGLang",
        "sglang:generation_tokens_total",
        "sglang:num_requests_total",
        "sglang:prompt_tokens_total",
        "sglang:num_running_reqs",
        "sglang:num_queue_reqs",
        "sglang:token_usage",
    ),
    # TGI exports generated tokens as a histogram; its `_sum` is the running total.
    ServerMetricNames(
        "TGI",
        "tgi_request_generated_tokens_sum",
        "tgi_request_success",
        "tgi_request_input_length_sum",
        "tgi_batch_current_size",
        "tgi_queue_size",
        None,
    ),
    # llama.cpp's prompt_tokens_total counts the tokens it evaluated, not those reused from a
    # slot's cache; current builds count those apart (prompt_tokens_cached_total) and export
    # no KV-cache gauge.
    ServerMetricNames(
        "llama.cpp",
        "llamacpp:tokens_predicted_total",
        None,
        "llamacpp:prompt_tokens_total",
        "llamacpp:requests_processing",
        "llamacpp:requests_deferred",
        None,
        "llamacpp:prompt_tokens_cached_total",
    ),
    # Older llama.cpp builds exported a KV-cache gauge (removed in ggml-org/llama.cpp#13660).
    ServerMetricNames("llama.cpp (older builds)", None, None, None, None, None, "llamacpp:kv_cache_usage_ratio"),
)

ROLES = (
    "running_requests",
    "waiting_requests",
    "kv_cache_usage",
    GENERATED_TOKENS,
    FINISHED_REQUESTS,
    PROMPT_TOKENS,
    "cached_prompt_tokens",
)
ROLE_OF: dict[str, str] = {
    getattr(row, role): role for row in SERVER_METRIC_MAP for role in ROLES if getattr(row, role) is not None
}


@dataclass(frozen=True)
class PrefixCacheSource:
    """Where one server's prefix-cache hit rate comes from (docs/server-metrics.md, "Prefix-
    cache hit rate"): counters of prompt tokens found in the cache (`hits`) and looked up
    (`queries`, or `hits + misses` where the server counts the others apart), increased over
    the stage; else a gauge of the hit rate (a fraction), its mean over the stage."""

    server: str
    hits: str | None = None
    queries: str | None = None
    misses: str | None = None
    hit_rate: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for n in (self.hits, self.queries, self.misses, self.hit_rate) if n is not None)


# In order of preference: counters before gauges, current names before older ones.
PREFIX_CACHE_SOURCES: tuple[PrefixCacheSource, ...] = (
    PrefixCacheSource("vLLM", hits="vllm:prefix_cache_hits_total", queries="vllm:prefix_cache_queries_total"),
    # vLLM V1 before the `gpu_` infix was dropped.
    PrefixCacheSource(
        "vLLM (gpu_ names)", hits="vllm:gpu_prefix_cache_hits_total", queries="vllm:gpu_prefix_cache_queries_total"
    ),
    # llama.cpp: prompt_tokens_total counts the evaluated tokens, the cached ones apart.
    PrefixCacheSource("llama.cpp", hits="llamacpp:prompt_tokens_cached_total", misses="llamacpp:prompt_tokens_total"),
    # vLLM's V0 engine: a gauge of the hit rate since start.
    PrefixCacheSource("vLLM V0", hit_rate="vllm:gpu_prefix_cache_hit_rate"),
    PrefixCacheSource("SGLang", hit_rate="sglang:cache_hit_rate"),
)
PREFIX_CACHE_NAMES = frozenset(n for source in PREFIX_CACHE_SOURCES for n in source.names)
# The metrics agents keep whatever the user's filters: the mapping table's and the hit rate's.
ALWAYS_KEPT = tuple(sorted(set(ROLE_OF) | PREFIX_CACHE_NAMES))


# --- spec ---------------------------------------------------------------------------------


def validate_server_metrics(sm: run_pb2.ServerMetricsSpec, v: list[FieldViolation]) -> None:
    """Append violations of `spec.server_metrics` to `v`."""
    path = "spec.server_metrics"
    configured = sm.metric_filters or sm.HasField("scrape_interval") or sm.HasField("mismatch_tolerance_percent")
    if configured and not sm.endpoints:
        v.append(FieldViolation(f"{path}.endpoints", "required when other server_metrics fields are set"))
    if len(sm.endpoints) > MAX_ENDPOINTS:
        v.append(FieldViolation(f"{path}.endpoints", f"at most {MAX_ENDPOINTS} endpoints"))
    for i, url in enumerate(sm.endpoints[:MAX_ENDPOINTS]):  # bounded: the listed-twice test is quadratic
        problem = _url_problem(url)
        if problem is None and url in sm.endpoints[:i]:
            problem = "listed twice"
        if problem:
            v.append(FieldViolation(f"{path}.endpoints[{i}]", problem))
    if sm.HasField("scrape_interval") and not MIN_SCRAPE_INTERVAL_S <= seconds(sm.scrape_interval) <= MAX_INTERVAL_S:
        v.append(
            FieldViolation(
                f"{path}.scrape_interval", f"must be between {MIN_SCRAPE_INTERVAL_S:g} s and {MAX_INTERVAL_S:g} s"
            )
        )
    if len(sm.metric_filters) > MAX_FILTERS:
        v.append(FieldViolation(f"{path}.metric_filters", f"at most {MAX_FILTERS} filters"))
    for i, pattern in enumerate(sm.metric_filters[:MAX_FILTERS]):
        if not pattern or len(pattern) > MAX_NAME_CHARS or any(c.isspace() for c in pattern):
            v.append(FieldViolation(f"{path}.metric_filters[{i}]", f"1-{MAX_NAME_CHARS} characters, no spaces"))
    if sm.HasField("mismatch_tolerance_percent"):
        t = sm.mismatch_tolerance_percent
        if not (math.isfinite(t) and 0 <= t <= 1000):
            v.append(FieldViolation(f"{path}.mismatch_tolerance_percent", "must be between 0 and 1000"))


def _url_problem(url: str) -> str | None:
    try:
        parts = urlsplit(url)
        port_ok = parts.port is None or parts.port > 0
    except ValueError:
        return "must be an http:// or https:// URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http:// or https:// URL"
    if not parts.hostname or not port_ok:
        return "must name a host (and a valid port)"
    if parts.username or parts.password:
        return "must not carry credentials (they would show in events and results)"
    if parts.query or parts.fragment or "?" in url or "#" in url:
        # A token in a query would be shown by every read, like the endpoint itself.
        return "must not carry a query string or fragment (a token there would show in every read)"
    if len(url) > 2048 or any(c.isspace() for c in url):
        return "must be at most 2048 chars, no spaces"
    return None


def default_server_metrics(sm: run_pb2.ServerMetricsSpec) -> None:
    """Fill in the defaults of a valid spec (only when endpoints are set)."""
    if not sm.endpoints:
        return
    if not sm.HasField("scrape_interval"):
        sm.scrape_interval.FromMilliseconds(int(DEFAULT_SCRAPE_INTERVAL_S * 1000))
    if not sm.HasField("mismatch_tolerance_percent"):
        sm.mismatch_tolerance_percent = DEFAULT_TOLERANCE_PERCENT


def plan_scrapes(sm: run_pb2.ServerMetricsSpec, active: Sequence[bool]) -> list[run_pb2.ServerMetricsSpec | None]:
    """Per agent of a stage: the endpoints it scrapes (None: none), round robin over the agents
    that have a share of the stage. User filters are widened by the mapped metrics."""
    plans: list[run_pb2.ServerMetricsSpec | None] = [None] * len(active)
    working = [i for i, a in enumerate(active) if a]
    if not sm.endpoints or not working:
        return plans
    for n, endpoint in enumerate(sm.endpoints):
        i = working[n % len(working)]
        plan = plans[i]
        if plan is None:
            plan = run_pb2.ServerMetricsSpec(scrape_interval=sm.scrape_interval)
            if sm.metric_filters:
                plan.metric_filters.extend(list(sm.metric_filters) + list(ALWAYS_KEPT))
            plans[i] = plan
        plan.endpoints.append(endpoint)
    return plans


# --- ingest -------------------------------------------------------------------------------


def scrape_rows(scrapes: Sequence[agent_service_pb2.ServerScrape]) -> tuple[ScrapeRow, ...]:
    """The scrapes of a batch as store rows (NaN values dropped: SQLite would store NULL)."""
    rows = []
    for s in scrapes:
        values = tuple(
            (v.name[:MAX_NAME_CHARS], v.labels[:MAX_LABEL_CHARS], int(v.kind), float(v.value))
            for v in s.values[:MAX_VALUES_PER_SCRAPE]
            if v.kind in (GAUGE, COUNTER) and not math.isnan(v.value)
        )
        rows.append(ScrapeRow(s.endpoint[:2048], s.time_unix_ns, s.error[:1000], values))
    return tuple(rows)


# --- results ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesOutcome:
    endpoint: str
    name: str
    kind: int
    role: str
    points: list[tuple[int, float]]  # (second, value)


@dataclass(frozen=True)
class CrossCheckOutcome:
    quantity: str
    server_metrics: list[str]
    client_value: float
    server_value: float
    difference_percent: float
    tolerance_percent: float
    mismatch: bool
    window_complete: bool
    message: str


@dataclass(frozen=True)
class ScrapeErrorOutcome:
    endpoint: str
    message: str
    count: int
    first_ns: int
    last_ns: int


@dataclass(frozen=True)
class ServerStageOutcome:
    series: list[SeriesOutcome]
    cross_checks: list[CrossCheckOutcome]
    errors: list[ScrapeErrorOutcome]
    scrapes_ok: int
    scrapes_failed: int
    series_truncated: bool
    prefix_cache_hit_percent: float | None = None
    prefix_cache_source: str = ""


def counter_increase(values: Sequence[float]) -> float:
    """Total increase of a counter over consecutive readings; a drop is a reset (restart)."""
    total = 0.0
    for before, after in itertools.pairwise(values):
        total += after - before if after >= before else after
    return total


def stage_server_metrics(
    reads: SnapshotReads, run_pk: int, stage_idx: int, sm: run_pb2.ServerMetricsSpec, cols: SampleColumns
) -> ServerStageOutcome | None:
    """The server view of one stage (None when nothing was scraped), inside a result's snapshot."""
    if not sm.endpoints:
        return None
    data = reads.load_stage_scrapes(run_pk, stage_idx)
    if not data.scrapes:
        return None
    tolerance = DEFAULT_TOLERANCE_PERCENT
    if sm.HasField("mismatch_tolerance_percent"):
        tolerance = sm.mismatch_tolerance_percent
    return compute_server_view(data, cols, tolerance)


def compute_server_view(data: StageScrapes, cols: SampleColumns, tolerance_percent: float) -> ServerStageOutcome:
    """Series, cross-checks and errors from stored scrapes and the stage's request samples."""
    scrape_of = {s.pk: s for s in data.scrapes}
    # (endpoint, name, kind) -> [(time, value)] in time order (the scrapes are sorted)
    readings: dict[tuple[str, str, int], list[tuple[int, float]]] = defaultdict(list)
    order = {s.pk: i for i, s in enumerate(data.scrapes)}
    for pk, name, kind, value in sorted(data.values, key=lambda row: order[row[0]]):
        s = scrape_of[pk]
        readings[(s.endpoint, name, kind)].append((s.time_unix_ns, value))

    counted = counted_mask(cols.flags)
    sent = cols.sent_unix_ns[counted] if counted.any() else cols.sent_unix_ns
    t0 = int(sent.min()) if len(sent) else min(s.time_unix_ns for s in data.scrapes)

    series = [_series(key, points, t0) for key, points in readings.items()]
    series.sort(key=lambda s: (s.role == "", ROLES.index(s.role) if s.role else 0, s.name, s.endpoint))
    truncated = len(series) > MAX_SERIES
    series = series[:MAX_SERIES]

    checks = [
        c
        for c in (
            _cross_check(GENERATED_TOKENS, readings, data, cols, tolerance_percent),
            _cross_check(FINISHED_REQUESTS, readings, data, cols, tolerance_percent),
            _cross_check(PROMPT_TOKENS, readings, data, cols, tolerance_percent),
        )
        if c is not None
    ]

    grouped: dict[tuple[str, str], list[int]] = defaultdict(list)
    for s in data.scrapes:
        if s.error:
            grouped[(s.endpoint, s.error)].append(s.time_unix_ns)
    errors = [ScrapeErrorOutcome(e, m, len(ts), min(ts), max(ts)) for (e, m), ts in grouped.items()]
    failed = sum(1 for s in data.scrapes if s.error)
    hit_percent, hit_source = prefix_cache_hit_percent(readings, _client_window(cols))
    return ServerStageOutcome(
        series, checks, errors, len(data.scrapes) - failed, failed, truncated, hit_percent, hit_source
    )


def prefix_cache_hit_percent(
    readings: dict[tuple[str, str, int], list[tuple[int, float]]], window: tuple[int, int] | None
) -> tuple[float | None, str]:
    """The server's prefix-cache hit rate over the stage, percent, and the metric names it
    comes from (None, "" when no endpoint exports a source). Each endpoint uses its first
    source of `PREFIX_CACHE_SOURCES`; counters are summed over the endpoints (hits over
    queries), a gauge is averaged over the readings in the stage's window (all of them when
    none falls inside) and over the endpoints. Counters win when some endpoint has them."""
    hits = queries = 0.0
    counted: set[str] = set()
    gauges: list[float] = []
    gauged: set[str] = set()
    for endpoint in sorted({e for e, _, _ in readings}):
        for source in PREFIX_CACHE_SOURCES:
            if source.hits is not None and (endpoint, source.hits, COUNTER) in readings:
                other = source.queries or source.misses
                if other is None or (endpoint, other, COUNTER) not in readings:
                    continue
                h = counter_increase([v for _, v in readings[(endpoint, source.hits, COUNTER)]])
                o = counter_increase([v for _, v in readings[(endpoint, other, COUNTER)]])
                hits += h
                queries += o if source.queries is not None else h + o
                counted.update((source.hits, other))
                break
            if source.hit_rate is not None and (endpoint, source.hit_rate, GAUGE) in readings:
                points = readings[(endpoint, source.hit_rate, GAUGE)]
                inside = [v for t, v in points if window is not None and window[0] <= t <= window[1]]
                values = inside or [v for _, v in points]
                gauges.append(math.fsum(values) / len(values))
                gauged.add(source.hit_rate)
                break
    if counted:
        # No prompt looked up in the stage: no rate (not 0 %).
        return (100.0 * hits / queries if queries > 0 else None), ", ".join(sorted(counted))
    if gauges:
        return 100.0 * math.fsum(gauges) / len(gauges), ", ".join(sorted(gauged))
    return None, ""


def _series(key: tuple[str, str, int], points: list[tuple[int, float]], t0: int) -> SeriesOutcome:
    endpoint, name, kind = key
    buckets: dict[int, list[float]] = defaultdict(list)
    if kind == COUNTER:
        for (t_prev, v_prev), (t, v) in itertools.pairwise(points):
            if t <= t_prev:
                continue
            increase = v - v_prev if v >= v_prev else v
            # The increase happened somewhere between the two scrapes: credit its middle.
            buckets[((t_prev + t) // 2 - t0) // _NS].append(increase * _NS / (t - t_prev))
    else:
        for t, v in points:
            buckets[(t - t0) // _NS].append(v)
    out = [(int(sec), float(np.mean(vals))) for sec, vals in sorted(buckets.items()) if sec >= 0]
    return SeriesOutcome(endpoint, name, kind, ROLE_OF.get(name, ""), out)


def _client_window(cols: SampleColumns) -> tuple[int, int] | None:
    if not len(cols):
        return None
    end = np.maximum(np.maximum(cols.first_token_ns, cols.last_token_ns), cols.done_ns)
    return int(cols.sent_unix_ns.min()), int((cols.sent_unix_ns + end).max())


def _cross_check(
    quantity: str,
    readings: dict[tuple[str, str, int], list[tuple[int, float]]],
    data: StageScrapes,
    cols: SampleColumns,
    tolerance: float,
) -> CrossCheckOutcome | None:
    names = {getattr(row, quantity) for row in SERVER_METRIC_MAP} - {None}
    # Prompt tokens a server reused from its cache and counted apart belong to the prompts too.
    extra: set[str] = set()
    if quantity == PROMPT_TOKENS:
        extra = {row.cached_prompt_tokens for row in SERVER_METRIC_MAP if row.cached_prompt_tokens is not None}
    endpoints = sorted({s.endpoint for s in data.scrapes})
    used: list[str] = []
    server = 0.0
    complete = True
    window = _client_window(cols)
    for endpoint in endpoints:
        found = [n for n in sorted(names) if (endpoint, n, COUNTER) in readings]
        if not found:
            continue
        # One counter of the quantity per endpoint, plus its cache counter where counted apart.
        for name in found[:1] + [n for n in sorted(extra) if (endpoint, n, COUNTER) in readings]:
            points = readings[(endpoint, name, COUNTER)]
            used.append(name)
            server += counter_increase([v for _, v in points])
            if window is None or len(points) < 2 or points[0][0] > window[0] or points[-1][0] < window[1]:
                complete = False
    if not used:
        return None
    if quantity == GENERATED_TOKENS:
        client = float(cols.output_tokens.sum())
    elif quantity == PROMPT_TOKENS:
        client = float(cols.prompt_tokens.sum())
    else:
        client = float(np.count_nonzero(cols.status == RequestStatus.OK))
    # A server that counted nothing while the client did is infinitely far off.
    diff = (client - server) / server * 100.0 if server > 0 else (0.0 if client == 0 else math.inf)
    mismatch = complete and abs(diff) > tolerance
    label = quantity.replace("_", " ")
    summary = f"{label}: client {client:,.0f}, server {server:,.0f} ({', '.join(sorted(set(used)))}), {diff:+.1f}%"
    if not complete:
        message = f"{summary}; not compared: the scrapes did not cover the whole stage"
    elif mismatch:
        message = f"{summary}: MISMATCH (tolerance {tolerance:g}%)"
    else:
        message = f"{summary}: agree within {tolerance:g}%"
    return CrossCheckOutcome(quantity, sorted(set(used)), client, server, diff, tolerance, mismatch, complete, message)
