"""Metric math: per-request samples in, the numbers of one stage out.

The controller keeps every request's sample and computes results from them here, so this module
is the one place where the definitions of docs/metrics.md become arithmetic. It is pure numpy
(no I/O, no grpc) and vectorised throughout: a stage may hold millions of requests and a hundred
inter-token gaps each, so there is no Python loop per request or per gap, only per 1-second bucket.

Times in samples are integer nanoseconds; `sent_unix_ns` is the agent's wall clock and every other
time is an offset from `sent` (0 meaning "did not happen"). Results are in milliseconds (latencies)
and seconds (duration, rates).

Every mean, percentile, rate and fraction carries a confidence interval (common/stats.py;
docs/metrics.md, "Confidence intervals"): a percentile's from two more order statistics found
in the same pass as the percentile itself, a rate's from batch means over its per-second series.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final, Self

import numpy as np
import numpy.typing as npt

from common.codes import RequestStatus, SampleFlag
from common.stats import (
    DEFAULT_CONFIDENCE_PERCENT,
    Interval,
    RankInterval,
    mean_interval,
    percentile_rank_interval,
    proportion_interval,
    rate_interval,
)

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]
BoolArray = npt.NDArray[np.bool_]

# Status code (loadtest.v1.RequestStatus) -> error kind, as reported in `StageMetrics.errors`:
# every status but OK, by its name.
ERROR_KINDS: Final[Mapping[int, str]] = MappingProxyType(
    {int(status): status.name.lower() for status in RequestStatus if status is not RequestStatus.OK}
)
# A status this version does not know (e.g. from a newer agent) is still a failure: counting it
# under its own key keeps failed traffic from disappearing out of the results.
UNKNOWN_ERROR_KIND: Final = "unknown"

PERCENTILES: Final = (50.0, 90.0, 95.0, 99.0, 99.9)
# The per-second series covers at most this many seconds (8 days: the longest stage a spec
# may set, 7 days, plus its requests' timeouts and more). It is sized by the span of the
# samples, which the controller bounds before computing (controller/domain/results/sample_limits.py);
# this keeps any other input from allocating without limit. Later seconds are left out.
MAX_SERIES_SECONDS: Final = 8 * 24 * 3600
_NS_PER_MS: Final = 1e6
_NS_PER_S: Final = 1_000_000_000
# Plain ints for the masks below: numpy compares an array with an enum member ~4x slower
# than with an int, and the ingest path builds these masks for every batch.
_OK: Final = int(RequestStatus.OK)
_WARMUP: Final = int(SampleFlag.WARMUP)
_CACHED_REPORTED: Final = int(SampleFlag.CACHED_REPORTED)
_LAST_TURN: Final = int(SampleFlag.LAST_TURN)
# A result lists the figures of at most this many turn indexes (the lowest ones).
MAX_TURNS: Final = 1000


def error_kind_name(status: int) -> str:
    """The error kind of a failed request's status code; raises ValueError for OK."""
    if status == RequestStatus.OK:
        raise ValueError("status 1 (OK) is not an error")
    return ERROR_KINDS.get(status, UNKNOWN_ERROR_KIND)


def counted_mask(flags: IntArray) -> BoolArray:
    """Which requests the metrics count (one bool per `flags` entry): all but warmup requests."""
    counted: BoolArray = (flags & _WARMUP) == 0
    return counted


def counted_ok_mask(status: IntArray, flags: IntArray) -> BoolArray:
    """Which requests count (not warmup) and succeeded (status OK)."""
    ok: BoolArray = counted_mask(flags) & (status == _OK)
    return ok


_NONE: Final = np.zeros(0, dtype=np.int64)
_ZERO: Final = np.zeros(1, dtype=np.int64)
# The SampleColumns that may be given empty (all 0).
_OPTIONAL: Final = frozenset(
    {
        "first_reasoning_ns",
        "first_answer_ns",
        "reasoning_tokens",
        "cached_prompt_tokens",
        "session_id",
        "turn_index",
        "session_group",
    }
)


# eq=False: the generated __eq__ would compare arrays element-wise and raise on truth testing.
@dataclass(frozen=True, eq=False)
class SampleColumns:
    """Per-request samples as columns: entry i of every per-request column is request i.

    `itl_ns` is the exception: the inter-token gaps of all requests concatenated in request
    order, request i contributing `itl_count[i]` of them. Columns are coerced to contiguous
    1-D int64 arrays.
    """

    sent_unix_ns: IntArray
    queue_delay_ns: IntArray
    first_token_ns: IntArray
    last_token_ns: IntArray
    done_ns: IntArray
    prompt_tokens: IntArray
    output_tokens: IntArray
    status: IntArray
    flags: IntArray
    itl_count: IntArray
    itl_ns: IntArray
    # Reasoning models, prefix caching, conversations (0: none, not reported, not a
    # conversation). Left out (empty), a column is all 0.
    first_reasoning_ns: IntArray = dataclasses.field(default_factory=lambda: _NONE)
    first_answer_ns: IntArray = dataclasses.field(default_factory=lambda: _NONE)
    reasoning_tokens: IntArray = dataclasses.field(default_factory=lambda: _NONE)
    cached_prompt_tokens: IntArray = dataclasses.field(default_factory=lambda: _NONE)
    session_id: IntArray = dataclasses.field(default_factory=lambda: _NONE)
    turn_index: IntArray = dataclasses.field(default_factory=lambda: _NONE)
    # Who numbered each sample's session (the controller uses the assignment's pk): a session
    # is (session_group, session_id), since session ids are unique only per assignment.
    session_group: IntArray = dataclasses.field(default_factory=lambda: _NONE)

    def __post_init__(self) -> None:
        n = len(self.sent_unix_ns)
        for field in dataclasses.fields(self):
            column = np.asarray(getattr(self, field.name), dtype=np.int64)
            if column.ndim != 1:
                raise ValueError(f"{field.name} must be 1-D, got shape {column.shape}")
            if field.name in _OPTIONAL and (not column.size or _is_zeros(column)):
                # All 0: one shared zero, broadcast (no memory, and select/concat copy nothing).
                column = _zeros(n)
            else:
                # Contiguous, because columns often arrive as strided slices of one row-major table.
                column = np.ascontiguousarray(column)
            object.__setattr__(self, field.name, column)
        for name in _PER_REQUEST:
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} has {len(getattr(self, name))} entries, expected {n}")
        if n and int(self.itl_count.min()) < 0:
            raise ValueError("itl_count must be >= 0")
        if int(self.itl_count.sum()) != len(self.itl_ns):
            raise ValueError(f"itl_ns has {len(self.itl_ns)} gaps but itl_count sums to {self.itl_count.sum()}")

    def __len__(self) -> int:
        return len(self.sent_unix_ns)

    @classmethod
    def empty(cls) -> Self:
        return cls(**{f.name: np.zeros(0, dtype=np.int64) for f in dataclasses.fields(cls)})

    @classmethod
    def concat(cls, parts: Sequence[SampleColumns]) -> Self:
        """All requests of `parts`, in order (gaps stay aligned because both orders agree)."""
        if not parts:
            return cls.empty()
        return cls(
            **{
                f.name: _NONE
                if f.name in _OPTIONAL and all(_is_zeros(getattr(p, f.name)) for p in parts)
                else np.concatenate([getattr(p, f.name) for p in parts])
                for f in dataclasses.fields(cls)
            }
        )

    def select(self, mask: npt.ArrayLike) -> SampleColumns:
        """The requests where `mask` (one bool per request) is true, with their gaps.

        Returns `self` when every request is selected: columns are treated as immutable, and
        skipping the copy matters when `itl_ns` holds tens of millions of gaps.
        """
        keep = np.asarray(mask, dtype=np.bool_)
        if keep.shape != (len(self),):
            raise ValueError(f"mask has shape {keep.shape}, expected ({len(self)},)")
        if keep.all():
            return self
        # Each request's flag repeated once per gap it owns lines up with itl_ns.
        keep_gaps = np.repeat(keep, self.itl_count)
        columns = {}
        for name in _PER_REQUEST:
            column = getattr(self, name)
            columns[name] = _NONE if name in _OPTIONAL and _is_zeros(column) else column[keep]
        return SampleColumns(**columns, itl_ns=self.itl_ns[keep_gaps])


def _zeros(n: int) -> IntArray:
    """n zeros as a read-only broadcast of one (an optional column that is all 0)."""
    return np.broadcast_to(_ZERO, (n,))


def is_zero_column(column: npt.NDArray[Any]) -> bool:
    """True for an optional column SampleColumns holds as all 0 without storing it."""
    return _is_zeros(column)


def _is_zeros(column: npt.NDArray[Any]) -> bool:
    """True for an empty column or one made by `_zeros`: every entry of a 1-D array with
    stride 0 is its first, so this is exact without a pass over it."""
    return column.ndim == 1 and (column.size == 0 or (column.strides == (0,) and column[0] == 0))


_PER_REQUEST: Final = tuple(f.name for f in dataclasses.fields(SampleColumns) if f.name != "itl_ns")


@dataclass(frozen=True)
class LatencySummary:
    """Summary of one latency metric in milliseconds; every field is 0 when `count` is 0.

    The `*_ci` intervals are None where there is too little data for one: the mean's below 2
    values, the percentiles' with no value. An interval always contains its figure.
    """

    count: int = 0
    mean: float = 0.0
    std: float = 0.0  # population (ddof=0)
    min: float = 0.0
    max: float = 0.0
    p50: float = 0.0
    p90: float = 0.0
    p95: float = 0.0
    p99: float = 0.0
    p999: float = 0.0
    mean_ci: Interval | None = None
    p50_ci: Interval | None = None
    p90_ci: Interval | None = None
    p95_ci: Interval | None = None
    p99_ci: Interval | None = None
    p999_ci: Interval | None = None


@dataclass(frozen=True)
class Slo:
    """Per-request service-level objectives in milliseconds; None means not configured."""

    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None


@dataclass(frozen=True)
class SecondBucket:
    """One second of a stage, `second` whole seconds after the stage's first `sent`."""

    second: int
    completed: int  # OK requests whose response ended in this second
    errors: int  # failed requests that ended in this second
    # Tokens by arrival of the events carrying them (as for the peak), hence fractional.
    output_tokens: float
    ttft_p50_ms: float  # over OK requests ending in this second; 0 when none had a first token
    ttft_p99_ms: float


@dataclass(frozen=True)
class StageMetrics:
    """The numbers of one stage (or agent, or run), as defined in docs/metrics.md.

    The `*_ci` intervals are None where there is too little data for one (a rate over fewer
    than 3 whole seconds, a fraction of no requests, goodput without an SLO).
    """

    requests_ok: int
    requests_failed: int
    errors: dict[str, int]
    duration_s: float
    request_throughput: float
    output_token_throughput: float
    total_token_throughput: float
    peak_output_token_throughput: float
    achieved_concurrency: float
    prompt_tokens: int
    output_tokens: int
    output_tokens_estimated: bool
    ttft: LatencySummary
    tpot: LatencySummary
    itl: LatencySummary
    e2e: LatencySummary
    queue_delay: LatencySummary
    e2e_including_queue: LatencySummary
    goodput: float | None
    good_fraction: float | None
    time_series: list[SecondBucket]
    request_throughput_ci: Interval | None = None
    output_token_throughput_ci: Interval | None = None
    total_token_throughput_ci: Interval | None = None
    goodput_ci: Interval | None = None
    good_fraction_ci: Interval | None = None
    error_rate: float = 0.0  # failed / counted requests
    error_rate_ci: Interval | None = None
    # Reasoning models (docs/metrics.md, "Reasoning models").
    ttfr: LatencySummary = LatencySummary()
    ttfo: LatencySummary = LatencySummary()
    reasoning_tokens: int = 0
    mean_reasoning_tokens: float = 0.0
    mean_answer_tokens: float = 0.0
    # The client's view of the prefix cache (docs/metrics.md, "Prefix cache").
    cached_prompt_tokens: int = 0
    prefix_cache_hit_percent: float | None = None
    # Conversations (docs/metrics.md, "Conversations").
    turns: tuple[TurnMetrics, ...] = ()
    sessions_completed: int = 0
    session_duration: LatencySummary = LatencySummary()


@dataclass(frozen=True)
class TurnMetrics:
    """The requests of one turn index of a conversation workload."""

    turn: int
    requests_ok: int
    requests_failed: int
    ttft: LatencySummary
    tpot: LatencySummary
    e2e: LatencySummary
    mean_input_tokens: float
    prefix_cache_hit_percent: float | None


def summarize(
    values_ns: npt.ArrayLike, confidence_percent: float = DEFAULT_CONFIDENCE_PERCENT, clusters: int = 0
) -> LatencySummary:
    """Count, mean, population std, min, max and linear percentiles of `values_ns`, in ms, with
    the mean's t interval and the percentiles' order-statistic intervals at `confidence_percent`.

    `clusters` (when between 1 and the count) is the number of independent sources the values
    come in groups from — requests, for the inter-token gaps pooled over them, which move
    together within a request (a slow request is slow in every gap). The intervals then rest
    on that many values, not on every value: see `_cluster_ranks`.
    """
    values = np.asarray(values_ns)
    n = values.size
    if n == 0:
        return LatencySummary()
    effective = clusters if 0 < clusters < n else int(n)
    lo, hi = values.min(), values.max()
    # One scratch array as long as `values`, shared by the steps below: with tens of millions of
    # pooled gaps, a fresh allocation (page faults) costs as much as the arithmetic done in it.
    scratch = np.empty(n, dtype=np.float64)
    mean, std = _mean_std(values, scratch)
    rank_intervals = [_cluster_ranks(int(n), effective, p, confidence_percent) for p in PERCENTILES]
    bound_ranks = np.array([(r.low - 1, r.high - 1) for r in rank_intervals], dtype=np.int64).ravel()
    percentiles, bounds = _percentiles(values, PERCENTILES, lo, hi, scratch.view(np.int64), bound_ranks)
    p50, p90, p95, p99, p999 = (percentiles / _NS_PER_MS).tolist()
    bounds_ms = (bounds / _NS_PER_MS).reshape(-1, 2).tolist()
    p50_ci, p90_ci, p95_ci, p99_ci, p999_ci = (
        # min/max: a tiny sample's interpolated percentile may fall just outside its ranks' values.
        Interval(min(low, p), max(high, p), r.low_open, r.high_open)
        for (low, high), p, r in zip(bounds_ms, (p50, p90, p95, p99, p999), rank_intervals, strict=True)
    )
    mean_bounds = mean_interval(mean, std, effective, confidence_percent)
    return LatencySummary(
        count=int(n),
        mean=mean / _NS_PER_MS,
        std=std / _NS_PER_MS,
        min=float(lo) / _NS_PER_MS,
        max=float(hi) / _NS_PER_MS,
        p50=p50,
        p90=p90,
        p95=p95,
        p99=p99,
        p999=p999,
        mean_ci=None if mean_bounds is None else Interval(mean_bounds[0] / _NS_PER_MS, mean_bounds[1] / _NS_PER_MS),
        p50_ci=p50_ci,
        p90_ci=p90_ci,
        p95_ci=p95_ci,
        p99_ci=p99_ci,
        p999_ci=p999_ci,
    )


def _cluster_ranks(n: int, effective: int, percentile: float, confidence_percent: float) -> RankInterval:
    """The percentile's rank interval among `n` values that hold only `effective` independent
    ones: the ranks of `effective` values (percentile_rank_interval), as shares of them,
    widened to the same shares of the `n` values. With effective = n it is the exact interval.

    Conservative for pooled inter-token gaps: it treats each request's gaps as one value, as
    if a request's gaps were all alike; with gaps that vary within a request too, the true
    interval is narrower. Counting every gap as independent instead would claim far more
    certainty than the data holds (tests/unit/test_intervals.py measures both).
    """
    ranks = percentile_rank_interval(effective, percentile, confidence_percent)
    if effective == n:
        return ranks
    low = max(1, math.floor((ranks.low - 1) / effective * n) + 1)
    high = min(n, math.ceil(ranks.high / effective * n))
    return RankInterval(low, high, ranks.low_open, ranks.high_open)


def per_request_tpot(
    first_token: npt.ArrayLike, last_token: npt.ArrayLike, output_tokens: npt.ArrayLike
) -> tuple[FloatArray, BoolArray]:
    """Each request's TPOT and where it is defined: (last token - first token) / (output
    tokens - 1), in the unit of the token times, for a request with more than one output token
    and both a first and a last token (a time of 0 meaning "did not happen"); NaN elsewhere.

    The controller applies it to nanosecond offsets, the HTML report to the milliseconds of
    exported samples.
    """
    first, last, tokens = np.asarray(first_token), np.asarray(last_token), np.asarray(output_tokens)
    defined = (tokens > 1) & (first > 0) & (last > 0)
    values = np.full(len(defined), np.nan)
    np.divide(last - first, tokens - 1, out=values, where=defined)
    return values, defined


def compute_stage_metrics(
    cols: SampleColumns, slo: Slo | None = None, confidence_percent: float = DEFAULT_CONFIDENCE_PERCENT
) -> StageMetrics:
    """Every metric of the requests in `cols` (warmup requests are dropped first), with
    intervals at `confidence_percent`."""
    cols = cols.select(counted_mask(cols.flags))
    ok = cols.status == _OK
    ok_cols = cols.select(ok)

    # A request's end is `done`; a sample without one (e.g. a failure before the stream closed)
    # ends at the last thing we saw of it, which is never earlier than `sent` itself.
    end_ns = np.maximum(np.maximum(cols.first_token_ns, cols.last_token_ns), cols.done_ns)
    if len(cols):
        t0 = int(cols.sent_unix_ns.min())
        duration_ns = int((cols.sent_unix_ns + end_ns).max()) - t0
    else:
        t0, duration_ns = 0, 0
    duration_s = duration_ns / _NS_PER_S

    def per_second(amount: float) -> float:
        return amount / duration_s if duration_s > 0 else 0.0

    requests_ok = len(ok_cols)
    prompt_tokens = int(ok_cols.prompt_tokens.sum())
    output_tokens = int(ok_cols.output_tokens.sum())

    first, last = ok_cols.first_token_ns, ok_cols.last_token_ns
    # Full-length TPOT (NaN where undefined) so goodput can test it request by request.
    tpot_ns, has_tpot = per_request_tpot(first, last, ok_cols.output_tokens)
    # E2E ends at the last token as vLLM does; non-streaming responses have only `done`.
    e2e_ns = np.where(last > 0, last, ok_cols.done_ns)
    has_e2e = e2e_ns > 0

    seconds = _per_second(cols, ok, ok_cols, end_ns, t0)
    time_series = _time_series(seconds, ok_cols)
    good = _meets_slo(ok_cols, slo, tpot_ns, e2e_ns)
    good_count = None if good is None else int(good.sum())
    counted = len(cols)

    # Rates' intervals from the stage's whole seconds (the last, partial one left out).
    whole = min(duration_ns // _NS_PER_S, seconds.length)

    def rate_ci(rate: float, per_second: FloatArray | IntArray) -> Interval | None:
        return rate_interval(rate, per_second[:whole], confidence_percent)

    def fraction_ci(part: int) -> Interval | None:
        bounds = proportion_interval(part, counted, confidence_percent)
        return None if bounds is None else Interval(*bounds)

    reasoning_tokens = int(ok_cols.reasoning_tokens.sum())
    cached_tokens, hit_percent = prefix_cache_hit(ok_cols.flags, ok_cols.cached_prompt_tokens, ok_cols.prompt_tokens)
    ttft = summarize(first[first > 0])
    reasoned = not _is_zeros(ok_cols.first_reasoning_ns) and bool(ok_cols.first_reasoning_ns.any())
    if reasoned:
        ttfo_ns = ttfo_offsets(ok_cols.first_answer_ns, ok_cols.first_reasoning_ns, first)
        ttfo = summarize(ttfo_ns[ttfo_ns > 0])
        ttfr = summarize(ok_cols.first_reasoning_ns[ok_cols.first_reasoning_ns > 0])
    else:
        # Without reasoning every text event is an answer: the first answer is the first
        # token (the agent records them so), and TTFO is TTFT, not computed twice.
        ttfo, ttfr = ttft, LatencySummary()
    sessions_completed, session_duration = session_metrics(cols, ok, end_ns)

    request_throughput = per_second(requests_ok)
    output_token_throughput = per_second(output_tokens)
    total_token_throughput = per_second(prompt_tokens + output_tokens)
    goodput = None if good_count is None else per_second(good_count)
    failed = counted - requests_ok
    return StageMetrics(
        requests_ok=requests_ok,
        requests_failed=len(cols) - requests_ok,
        errors=_count_errors(cols.status[~ok]),
        duration_s=duration_s,
        request_throughput=request_throughput,
        output_token_throughput=output_token_throughput,
        total_token_throughput=total_token_throughput,
        peak_output_token_throughput=max((b.output_tokens for b in time_series), default=0.0),
        # Little's law: the summed time requests spent in flight over the window's length.
        achieved_concurrency=float(end_ns.sum()) / duration_ns if duration_ns > 0 else 0.0,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        output_tokens_estimated=bool(((ok_cols.flags & SampleFlag.USAGE_FROM_SERVER) == 0).any()),
        ttft=ttft,
        tpot=summarize(tpot_ns[has_tpot]),
        itl=summarize(ok_cols.itl_ns, clusters=int(np.count_nonzero(ok_cols.itl_count))),
        e2e=summarize(e2e_ns[has_e2e]),
        queue_delay=summarize(cols.queue_delay_ns),
        e2e_including_queue=summarize(e2e_ns[has_e2e] + ok_cols.queue_delay_ns[has_e2e]),
        goodput=goodput,
        # Divided by every request, failed ones included, so dropped traffic never looks good.
        good_fraction=None if good_count is None else good_count / max(counted, 1),
        time_series=time_series,
        request_throughput_ci=rate_ci(request_throughput, seconds.completed),
        output_token_throughput_ci=rate_ci(output_token_throughput, seconds.output_tokens),
        total_token_throughput_ci=rate_ci(total_token_throughput, seconds.output_tokens + seconds.prompt_tokens),
        goodput_ci=(
            None
            if good is None or goodput is None
            else rate_ci(goodput, _bincount(seconds.ok_end_second[good], seconds.length))
        ),
        good_fraction_ci=None if good_count is None else fraction_ci(good_count),
        error_rate=failed / counted if counted else 0.0,
        error_rate_ci=fraction_ci(failed),
        ttfr=ttfr,
        ttfo=ttfo,
        reasoning_tokens=reasoning_tokens,
        mean_reasoning_tokens=reasoning_tokens / requests_ok if requests_ok else 0.0,
        mean_answer_tokens=(output_tokens - reasoning_tokens) / requests_ok if requests_ok else 0.0,
        cached_prompt_tokens=cached_tokens,
        prefix_cache_hit_percent=hit_percent,
        turns=_turn_metrics(cols, ok_cols, tpot_ns, e2e_ns),
        sessions_completed=sessions_completed,
        session_duration=session_duration,
    )


def ttfo_offsets(first_answer: IntArray, first_reasoning: IntArray, first_token: IntArray) -> IntArray:
    """Each request's first answer event (0: none). A request without reasoning events whose
    agent sent no `first_answer` (an older agent) answered at its first token."""
    return np.where(first_answer > 0, first_answer, np.where(first_reasoning == 0, first_token, 0))


def prefix_cache_hit(flags: IntArray, cached_tokens: IntArray, prompt_tokens: IntArray) -> tuple[int, float | None]:
    """(cached prompt tokens, their percent of the prompt tokens) over the (OK) requests whose
    usage reported cached tokens; the percent is None when none did (or their prompts are 0)."""
    reported = (flags & _CACHED_REPORTED) != 0
    if not reported.any():
        return 0, None
    cached = int(cached_tokens[reported].sum())
    prompt = int(prompt_tokens[reported].sum())
    return cached, (100.0 * cached / prompt if prompt > 0 else None)


def _turn_metrics(
    cols: SampleColumns, ok_cols: SampleColumns, tpot_ns: FloatArray, e2e_ns: IntArray
) -> tuple[TurnMetrics, ...]:
    """Per turn index (> 0) of the counted requests `cols`: the turn's figures (at most
    `MAX_TURNS`, the lowest). `ok_cols` are the OK ones, `tpot_ns` and `e2e_ns` theirs."""
    turn = cols.turn_index
    in_turn = turn > 0
    if not in_turn.any():
        return ()
    indexes, all_counts = np.unique(turn[in_turn], return_counts=True)
    indexes, all_counts = indexes[:MAX_TURNS], all_counts[:MAX_TURNS]
    ok_turn = ok_cols.turn_index
    order = np.argsort(ok_turn, kind="stable")
    sorted_turn = ok_turn[order]
    lo = np.searchsorted(sorted_turn, indexes, side="left")
    hi = np.searchsorted(sorted_turn, indexes, side="right")
    first = ok_cols.first_token_ns
    out = []
    for t, total, a, b in zip(indexes.tolist(), all_counts.tolist(), lo.tolist(), hi.tolist(), strict=True):
        mine = order[a:b]
        ttft, tpot, e2e = first[mine], tpot_ns[mine], e2e_ns[mine]
        hit = prefix_cache_hit(ok_cols.flags[mine], ok_cols.cached_prompt_tokens[mine], ok_cols.prompt_tokens[mine])[1]
        out.append(
            TurnMetrics(
                turn=int(t),
                requests_ok=b - a,
                requests_failed=int(total) - (b - a),
                ttft=summarize(ttft[ttft > 0]),
                tpot=summarize(tpot[~np.isnan(tpot)]),
                e2e=summarize(e2e[e2e > 0]),
                mean_input_tokens=float(ok_cols.prompt_tokens[mine].mean()) if b > a else 0.0,
                prefix_cache_hit_percent=hit,
            )
        )
    return tuple(out)


def session_metrics(cols: SampleColumns, ok: BoolArray, end_ns: IntArray) -> tuple[int, LatencySummary]:
    """(sessions completed, their durations) over the counted requests `cols` (`ok`: which
    succeeded; `end_ns`: each one's end, offset from its `sent`). A session is the requests of
    one (session_group, session_id > 0); it completed when it holds its last turn (flag) and
    every turn up to it, each once and OK. Its duration runs from its first `sent` to its last
    end (think times included)."""
    has = cols.session_id > 0
    if not has.any():
        return 0, LatencySummary()
    group, sid = cols.session_group[has], cols.session_id[has]
    order = np.lexsort((sid, group))
    group, sid = group[order], sid[order]
    change = np.empty(len(sid), dtype=np.bool_)
    change[0] = True
    np.not_equal(sid[1:], sid[:-1], out=change[1:])
    change[1:] |= group[1:] != group[:-1]
    starts = np.flatnonzero(change)
    size = np.diff(np.append(starts, len(sid)))
    turn = cols.turn_index[has][order]
    last = (cols.flags[has][order] & _LAST_TURN) != 0
    all_ok = np.add.reduceat(ok[has][order].astype(np.int64), starts) == size
    last_turn = np.maximum.reduceat(np.where(last, turn, 0), starts)
    highest = np.maximum.reduceat(turn, starts)
    lowest = np.minimum.reduceat(turn, starts)
    complete = all_ok & (last_turn > 0) & (highest == last_turn) & (lowest == 1) & (size == last_turn)
    if not complete.any():
        return 0, LatencySummary()
    sent = cols.sent_unix_ns[has][order]
    began = np.minimum.reduceat(sent, starts)
    ended = np.maximum.reduceat(sent + end_ns[has][order], starts)
    return int(complete.sum()), summarize((ended - began)[complete])


def _count_errors(failed_status: IntArray) -> dict[str, int]:
    """Failed requests per error kind, only the kinds that occurred."""
    known = (failed_status >= min(ERROR_KINDS)) & (failed_status <= max(ERROR_KINDS))
    counts = np.bincount(failed_status[known], minlength=max(ERROR_KINDS) + 1)
    errors = {kind: int(counts[status]) for status, kind in ERROR_KINDS.items() if counts[status]}
    unknown = int((~known).sum())
    if unknown:
        errors[UNKNOWN_ERROR_KIND] = unknown
    return errors


def _meets_slo(ok_cols: SampleColumns, slo: Slo | None, tpot_ns: FloatArray, e2e_ns: IntArray) -> BoolArray | None:
    """Which OK requests meet every configured SLO; None when no SLO is configured.

    A value that cannot be measured cannot be shown to meet its objective, so a request without
    a first token fails a TTFT SLO. TPOT is the exception: with one output token there is no
    token after the first, and vLLM counts TPOT as 0 there, so the SLO is met.
    """
    if slo is None or (slo.ttft_ms is None and slo.tpot_ms is None and slo.e2e_ms is None):
        return None
    good = np.ones(len(ok_cols), dtype=np.bool_)
    if slo.ttft_ms is not None:
        first = ok_cols.first_token_ns
        good &= (first > 0) & (first <= slo.ttft_ms * _NS_PER_MS)
    if slo.tpot_ms is not None:
        # NaN (undefined TPOT) compares false, leaving only the single-token exception.
        good &= (ok_cols.output_tokens <= 1) | (tpot_ns <= slo.tpot_ms * _NS_PER_MS)
    if slo.e2e_ms is not None:
        good &= (e2e_ns > 0) & (e2e_ns <= slo.e2e_ms * _NS_PER_MS)
    return good


# eq=False: arrays (see SampleColumns).
@dataclass(frozen=True, eq=False)
class _Seconds:
    """A stage's amounts per second from its first `sent` (OK requests count where they ended,
    output tokens where the events carrying them arrived); `length` entries each."""

    length: int
    ok_end_second: IntArray  # per OK request; may lie outside 0..length-1
    in_series: BoolArray  # per OK request: its end second is in the series
    completed: IntArray
    errors: IntArray
    output_tokens: FloatArray
    prompt_tokens: FloatArray


def _per_second(cols: SampleColumns, ok: BoolArray, ok_cols: SampleColumns, end_ns: IntArray, t0: int) -> _Seconds:
    if not len(cols):
        empty = np.zeros(0, dtype=np.int64)
        return _Seconds(0, empty, np.zeros(0, dtype=np.bool_), empty, empty, np.zeros(0), np.zeros(0))
    end_second = (cols.sent_unix_ns - t0 + end_ns) // _NS_PER_S
    ok_end_second = end_second[ok]
    tokens = _output_tokens_by_second(ok_cols, t0)
    # Token events never come after their request's end, but a bucket is kept for each anyway.
    n = min(max(int(end_second.max()) + 1, len(tokens)), MAX_SERIES_SECONDS)
    tokens = _add(tokens, np.zeros(n))[:n]
    in_series = (end_second >= 0) & (end_second < n)
    ok_in_series = in_series[ok]
    ok_seconds = ok_end_second[ok_in_series]
    return _Seconds(
        length=n,
        ok_end_second=ok_end_second,
        in_series=ok_in_series,
        completed=np.bincount(ok_seconds, minlength=n),
        errors=np.bincount(end_second[~ok & in_series], minlength=n),
        output_tokens=tokens,
        prompt_tokens=_histogram(ok_seconds, ok_cols.prompt_tokens[ok_in_series].astype(np.float64), n),
    )


def _bincount(seconds: IntArray, n: int) -> IntArray:
    """Entries per second 0..n-1 (seconds outside the series are left out)."""
    return np.bincount(seconds[(seconds >= 0) & (seconds < n)], minlength=n)


def _time_series(seconds: _Seconds, ok_cols: SampleColumns) -> list[SecondBucket]:
    """Per-second buckets from the stage's first `sent`; requests count where they ended."""
    if not seconds.length:
        return []
    n, ok_end_second = seconds.length, seconds.ok_end_second
    has_ttft = (ok_cols.first_token_ns > 0) & seconds.in_series
    ttft_p50, ttft_p99 = (
        _grouped_percentiles(ok_end_second[has_ttft], ok_cols.first_token_ns[has_ttft], n, (50.0, 99.0)) / _NS_PER_MS
    )
    return [
        SecondBucket(second=i, completed=c, errors=e, output_tokens=t, ttft_p50_ms=a, ttft_p99_ms=b)
        for i, (c, e, t, a, b) in enumerate(
            zip(
                seconds.completed.tolist(),
                seconds.errors.tolist(),
                seconds.output_tokens.tolist(),
                ttft_p50.tolist(),
                ttft_p99.tolist(),
                strict=True,
            )
        )
    ]


_CHUNK_REQUESTS = 65_536


def _output_tokens_by_second(ok_cols: SampleColumns, t0: int) -> FloatArray:
    """Output tokens per second of arrival, for OK requests.

    The exact arrival of each token is unknown; what is known is when each text-carrying event
    arrived (`first_token`, then one event per gap), so a request's tokens are spread evenly
    over its events. A request with no gaps (one event, or non-streaming) has all its tokens at
    its last token, or at `done` when it had no text events.
    """
    streamed = (ok_cols.first_token_ns > 0) & (ok_cols.itl_count > 0)
    tokens = ok_cols.output_tokens.astype(np.float64)
    rel_sent = ok_cols.sent_unix_ns - t0

    at_end = ~streamed
    end = np.where(ok_cols.last_token_ns > 0, ok_cols.last_token_ns, ok_cols.done_ns)
    by_second = _histogram((rel_sent[at_end] + end[at_end]) // _NS_PER_S, tokens[at_end])
    streams = ok_cols.select(streamed)
    if not len(streams):
        return by_second
    counts = streams.itl_count
    first_at = rel_sent[streamed] + streams.first_token_ns
    per_event = tokens[streamed] / (counts + 1)
    # The first token is an event of its own, before the first gap.
    by_second = _add(by_second, _histogram(first_at // _NS_PER_S, per_event))
    # Requests a slice at a time: the working arrays stay in the CPU's cache (one pass over a
    # large stage's gaps is slower: BENCHMARKS.md, "Results stored when a run ends").
    gap_at = np.concatenate(([0], np.cumsum(counts)))
    for a in range(0, len(streams), _CHUNK_REQUESTS):
        b = min(a + _CHUNK_REQUESTS, len(streams))
        gaps = streams.itl_ns[gap_at[a] : gap_at[b]]
        by_second = _add(by_second, _gaps_by_second(counts[a:b], gaps, first_at[a:b], per_event[a:b]))
    return by_second


def _gaps_by_second(counts: IntArray, gaps: IntArray, first_at: IntArray, per_event: FloatArray) -> FloatArray:
    """Tokens per second of the events after the first token, for requests that each have
    `counts` (>= 1) of the `gaps`, first token at `first_at`, and `per_event` tokens an event."""
    # Event k of a request arrives at first_token + its first k gaps. One running sum over all
    # gaps gives every event's time, once each request's first gap is raised by the distance
    # from the previous request's last event to this request's first token. It is the only
    # array as long as the gaps built here, and every later step reuses it in place.
    starts = np.cumsum(counts) - counts
    last_at = first_at + np.add.reduceat(gaps, starts)
    seconds = gaps.copy()
    seconds[starts] += first_at
    seconds[starts[1:]] -= last_at[:-1]
    np.cumsum(seconds, out=seconds)
    seconds //= _NS_PER_S
    np.maximum(seconds, 0, out=seconds)  # a negative gap (clock bug) must not crash bincount
    # A request's events within one second form a run. Weighing runs (a few per request)
    # rather than events saves a float array as long as the gaps and a weighted pass over it.
    # Marks: 1 where the second changes, 2 where a request starts (and so does a run).
    marks = np.empty(len(seconds), dtype=np.uint8)
    np.not_equal(seconds[1:], seconds[:-1], out=marks[1:])
    marks[starts] = 2
    runs = np.flatnonzero(marks)
    run_length = np.diff(runs, append=len(seconds))
    owner = np.cumsum(marks[runs] == 2) - 1
    return _histogram(seconds[runs], run_length * per_event[owner])


def _mean_std(values: npt.NDArray[Any], scratch: FloatArray) -> tuple[float, float]:
    """Mean and population standard deviation (ddof=0), using `scratch` for the deviations.

    Deviations are taken from a rough mean (of a strided sample), so var = E[d**2] - E[d]**2
    loses nothing to cancellation; Σd and Σd² (a BLAS dot) then take one fast pass each, where
    np.std needs a mean pass, a cast, and a fresh temporary.
    """
    n = len(values)
    pivot = float(values[:: max(1, n // 4096)].mean())
    deviations = np.subtract(values, pivot, out=scratch[:n])
    mean_deviation = float(deviations.sum()) / n
    variance = float(np.dot(deviations, deviations)) / n - mean_deviation**2
    return pivot + mean_deviation, float(np.sqrt(max(variance, 0.0)))


def _percentiles(
    values: npt.NDArray[Any],
    percentiles: Sequence[float],
    lo: Any,
    hi: Any,
    scratch: IntArray,
    extra_ranks: IntArray,
) -> tuple[FloatArray, npt.NDArray[Any]]:
    """np.percentile(values, percentiles) with the default 'linear' method, bit for bit, and
    the order statistics at `extra_ranks` (0-based; the percentiles' interval bounds).

    numpy's recipe: virtual index (n - 1) * q, and a lerp that starts from the far end when the
    fraction is >= 0.5. Only the order statistics it needs are computed (see below), all of them
    in one pass: the interval bounds lie next to their percentiles, mostly in the same buckets.
    """
    n = len(values)
    virtual = (n - 1) * (np.asarray(percentiles, dtype=np.float64) / 100.0)
    below = np.floor(virtual).astype(np.int64)
    above = np.minimum(below + 1, n - 1)
    ranks = np.unique(np.concatenate([below, above, extra_ranks]))
    stats = _order_statistics(values, ranks, lo, hi, scratch)
    a = stats[np.searchsorted(ranks, below)]
    b = stats[np.searchsorted(ranks, above)]
    return _lerp(a, b, virtual - below), stats[np.searchsorted(ranks, extra_ranks)]


def _order_statistics(
    values: npt.NDArray[Any],
    ranks: IntArray,
    lo: Any,
    hi: Any,
    scratch: IntArray,
    partition_below: int = 1 << 16,
) -> npt.NDArray[Any]:
    """The values at positions `ranks` (sorted, unique) of sorted `values`; `lo`/`hi` its min/max.

    Pooled ITL holds tens of millions of gaps, and np.partition over all of them dominates the
    stage's cost. For large integer arrays a histogram of (value - lo) >> shift (at most 2**16
    buckets, built in `scratch`) tells which buckets hold the wanted ranks; only those values are
    kept and searched, recursing while that shrinks the problem. Exact, as buckets are
    contiguous value ranges.
    """
    if lo == hi:
        return np.full(len(ranks), lo, dtype=values.dtype)
    span = int(hi) - int(lo)
    if len(values) <= partition_below or values.dtype.kind != "i" or span >= 1 << 62:
        return np.asarray(np.partition(values, ranks)[ranks])
    shift = max(0, span.bit_length() - 16)
    key = np.subtract(values, lo, out=scratch[: len(values)])
    key >>= shift
    counts = np.bincount(key)
    ends = np.cumsum(counts)
    bucket = np.searchsorted(ends, ranks, side="right")
    if shift == 0:  # one bucket per value: the bucket is the answer
        return np.asarray(bucket + lo, dtype=values.dtype)
    needed = np.unique(bucket)
    wanted = np.zeros(len(counts), dtype=np.bool_)
    wanted[needed] = True
    chosen = values[wanted[key]]
    # Rank within `chosen`: rank within the bucket plus the sizes of the chosen buckets before.
    chosen_start = np.cumsum(counts[needed]) - counts[needed]
    local = ranks - (ends - counts)[bucket] + chosen_start[np.searchsorted(needed, bucket)]
    c_lo, c_hi = chosen.min(), chosen.max()
    # Recurse only when it pays: far fewer values, or a much narrower range (finer buckets next).
    if 4 * len(chosen) <= len(values) or int(c_hi) - int(c_lo) <= span >> 8:
        return _order_statistics(chosen, local, c_lo, c_hi, scratch, partition_below)
    return np.asarray(np.partition(chosen, local)[local])


def _lerp(a: npt.NDArray[Any], b: npt.NDArray[Any], t: FloatArray) -> FloatArray:
    """numpy's percentile interpolation, including its switch of end point at t >= 0.5.

    The difference is taken in the values' own dtype, as numpy does, so int64 nanoseconds beyond
    2**53 interpolate exactly alike.
    """
    diff = b - a
    return np.asarray(np.where(t >= 0.5, b - diff * (1 - t), a + diff * t), dtype=np.float64)


def _grouped_percentiles(groups: IntArray, values: IntArray, n_groups: int, percentiles: Sequence[float]) -> FloatArray:
    """Percentiles of `values` within each group 0..n_groups-1 (0 for an empty group).

    One sort for all groups instead of an np.percentile call per group, with numpy's 'linear'
    method reproduced as in `_percentiles`.
    """
    out = np.zeros((len(percentiles), n_groups))
    if not len(values):
        return out
    lo = int(values.min())
    width = int(values.max()) - lo + 1
    if n_groups * width < 1 << 62:
        # Sorting one combined key is several times faster than lexsort on two.
        combined = groups * width + (values - lo)
        combined.sort()
        ordered = combined % width + lo
    else:
        ordered = values[np.lexsort((values, groups))]
    sizes = np.bincount(groups, minlength=n_groups)
    present = sizes > 0
    starts = (np.cumsum(sizes) - sizes)[present]
    sizes = sizes[present]
    for row, percentile in enumerate(percentiles):
        virtual = (sizes - 1) * (percentile / 100.0)
        below = np.floor(virtual).astype(np.int64)
        a = ordered[starts + below]
        b = ordered[starts + np.minimum(below + 1, sizes - 1)]
        out[row, present] = _lerp(a, b, virtual - below)
    return out


def _histogram(seconds: IntArray, weights: FloatArray, length: int = 0) -> FloatArray:
    """Sum of `weights` per second index (indexes outside the series are left out), at least
    `length` entries."""
    if len(seconds) and (int(seconds.min()) < 0 or int(seconds.max()) >= MAX_SERIES_SECONDS):
        keep = (seconds >= 0) & (seconds < MAX_SERIES_SECONDS)
        seconds, weights = seconds[keep], weights[keep]
    return np.asarray(np.bincount(seconds, weights=weights, minlength=length), dtype=np.float64)


def _add(a: FloatArray, b: FloatArray) -> FloatArray:
    """Element-wise sum of two histograms of possibly different lengths."""
    if len(a) < len(b):
        a, b = b, a
    a = a.copy()
    a[: len(b)] += b
    return a
