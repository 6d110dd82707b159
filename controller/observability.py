"""The controller's Prometheus metrics (`llm-loadtest controller --metrics-listen`).

Everything lives in one `CollectorRegistry` per `Controller`:

- `llm_loadtest_runs{state}` — runs in the database by state (counted at scrape time);
- `llm_loadtest_agents_connected`, `llm_loadtest_agents_busy` — connected agent streams;
- `llm_loadtest_samples_ingested_total`, `llm_loadtest_sample_batches_ingested_total{outcome}`,
  `llm_loadtest_ingest_queue_batches`, `llm_loadtest_ingest_commit_seconds` — the ingest path;
- `grpc_server_started_total`, `grpc_server_handled_total{grpc_code}`,
  `grpc_server_handling_seconds` — every RPC by service, method and status code (the names
  grpc-ecosystem's interceptors use, so existing dashboards work);
- for each *running* run, by `run_id` and `stage`: `llm_loadtest_run_requests_total`,
  `llm_loadtest_run_errors_total`, `llm_loadtest_run_output_tokens_total` and the histograms
  `llm_loadtest_run_ttft_seconds` and `llm_loadtest_run_itl_seconds` (warmup excluded). A
  run's series disappear when it ends, so label cardinality stays bounded by what is running.

The live figures are counted from committed batches, the same data the results use; the
histograms are for watching a run, the exact percentiles come from `GetRunResult`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from common.codes import RequestStatus
from common.metrics import counted_mask
from common.proto.loadtest.v1 import run_pb2
from controller.domain.execution.agents import AgentSession
from controller.store import repository as repo

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1, 0.2, 0.5, 1.0)
RPC_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0, 300.0, 3600.0)
COMMIT_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _Buckets:
    """A histogram kept as per-bucket counts in numpy: a batch is observed in one call, on the
    integer nanoseconds as stored (no float copy of every gap)."""

    def __init__(self, bounds_s: tuple[float, ...]) -> None:
        self.bounds = bounds_s
        self.bounds_ns = np.asarray([round(b * 1e9) for b in bounds_s], dtype=np.int64)
        self.counts = np.zeros(len(bounds_s) + 1, dtype=np.int64)
        self.total = 0.0

    def observe_ns(self, values_ns: np.ndarray) -> None:
        if values_ns.size:
            # side="left": a value equal to a bound belongs to that bound's bucket (le).
            idx = np.searchsorted(self.bounds_ns, values_ns, side="left")
            self.counts += np.bincount(idx, minlength=self.counts.size)
            self.total += int(values_ns.sum()) / 1e9

    def exposition(self) -> list[tuple[str, float]]:
        cumulative = np.cumsum(self.counts)
        les = [repr(float(b)) for b in self.bounds] + ["+Inf"]
        return [(le, float(c)) for le, c in zip(les, cumulative, strict=True)]


@dataclass
class _StageLive:
    requests: int = 0
    errors: int = 0
    output_tokens: int = 0
    ttft: _Buckets = field(default_factory=lambda: _Buckets(TTFT_BUCKETS_S))
    itl: _Buckets = field(default_factory=lambda: _Buckets(ITL_BUCKETS_S))


class LiveRunCollector(Collector):
    """Per-run, per-stage request counters and TTFT/ITL histograms of running runs."""

    def __init__(self, running: Callable[[], set[str]]) -> None:
        self._running = running
        self._stages: dict[tuple[str, int], _StageLive] = {}

    def observe(self, run_id: str, batch: repo.BatchIngest) -> None:
        """Count one newly committed batch (called by the ingestor after the commit)."""
        cols = batch.metric_columns
        measured = counted_mask(cols.flags)
        if not measured.any():
            return
        stage = self._stages.setdefault((run_id, batch.stage_idx), _StageLive())
        ok = measured & (cols.status == RequestStatus.OK)
        stage.requests += int(measured.sum())
        stage.errors += int(measured.sum() - ok.sum())
        stage.output_tokens += int(cols.output_tokens[ok].sum())
        stage.ttft.observe_ns(cols.first_token_ns[ok & (cols.first_token_ns > 0)])
        # ITL values of the measured requests only: itl_ns is flat, itl_count says whose is whose
        # (usually every request is, and the mask is skipped).
        itl = cols.itl_ns if ok.all() else cols.itl_ns[np.repeat(ok, cols.itl_count)]
        stage.itl.observe_ns(itl)

    def collect(self) -> Iterator[Metric]:
        running = self._running()
        for key in [k for k in self._stages if k[0] not in running]:
            del self._stages[key]
        labels = ["run_id", "stage"]
        requests = CounterMetricFamily(
            "llm_loadtest_run_requests", "Finished requests of a running run (warmup excluded)", labels=labels
        )
        errors = CounterMetricFamily("llm_loadtest_run_errors", "Failed requests of a running run", labels=labels)
        tokens = CounterMetricFamily(
            "llm_loadtest_run_output_tokens", "Output tokens of the OK requests of a running run", labels=labels
        )
        ttft = HistogramMetricFamily(
            "llm_loadtest_run_ttft_seconds", "Time to first token of OK requests of a running run", labels=labels
        )
        itl = HistogramMetricFamily(
            "llm_loadtest_run_itl_seconds", "Inter-token latency (every gap) of a running run", labels=labels
        )
        for (run_id, stage_idx), s in sorted(self._stages.items()):
            values = [run_id, str(stage_idx)]
            requests.add_metric(values, s.requests)
            errors.add_metric(values, s.errors)
            tokens.add_metric(values, s.output_tokens)
            ttft.add_metric(values, s.ttft.exposition(), s.ttft.total)
            itl.add_metric(values, s.itl.exposition(), s.itl.total)
        yield from (requests, errors, tokens, ttft, itl)

    def describe(self) -> list[Metric]:
        return []


class _StateCollector(Collector):
    """Runs by state and connected agents, from what the controller knows at scrape time."""

    def __init__(self, agents: Callable[[], Sequence[AgentSession]]) -> None:
        self._agents = agents
        self.runs_by_state: dict[int, int] = {}

    def collect(self) -> Iterator[Metric]:
        runs = GaugeMetricFamily("llm_loadtest_runs", "Runs in the database by state", labels=["state"])
        for value in run_pb2.RunState.values():
            if value:
                name = run_pb2.RunState.Name(value).removeprefix("RUN_STATE_").lower()
                runs.add_metric([name], self.runs_by_state.get(value, 0))
        yield runs
        sessions = self._agents()
        yield GaugeMetricFamily("llm_loadtest_agents_connected", "Connected agent streams", value=len(sessions))
        yield GaugeMetricFamily(
            "llm_loadtest_agents_busy", "Connected agents reserved for a run", value=sum(not s.free for s in sessions)
        )

    def describe(self) -> list[Metric]:
        return []


class ControllerMetrics:
    """The controller's registry and the hooks that feed it."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._running: Callable[[], set[str]] = set
        self._agents: Callable[[], Sequence[AgentSession]] = list
        self._count_runs: Callable[[], Awaitable[dict[int, int]]] | None = None
        self._queue_depth: Callable[[], int] = lambda: 0
        self.state = _StateCollector(self._agents_now)
        self.live = LiveRunCollector(self._running_now)
        self.registry.register(self.state)
        self.registry.register(self.live)
        self.samples_ingested = Counter(
            "llm_loadtest_samples_ingested", "Samples committed to the database", registry=self.registry
        )
        self.batches_ingested = Counter(
            "llm_loadtest_sample_batches_ingested",
            "Sample batches committed (outcome=new) or recognised as replays (outcome=duplicate)",
            ["outcome"],
            registry=self.registry,
        )
        queue = Gauge(
            "llm_loadtest_ingest_queue_batches", "Sample batches waiting for the writer", registry=self.registry
        )
        queue.set_function(self._queue_depth_now)
        self.commit_seconds = Histogram(
            "llm_loadtest_ingest_commit_seconds",
            "Time to commit one ingest transaction (several batches)",
            buckets=COMMIT_BUCKETS_S,
            registry=self.registry,
        )
        rpc_labels = ["grpc_type", "grpc_service", "grpc_method"]
        self.rpc_started = Counter(
            "grpc_server_started", "RPCs started on the server", rpc_labels, registry=self.registry
        )
        self.rpc_handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, by status code",
            [*rpc_labels, "grpc_code"],
            registry=self.registry,
        )
        self.rpc_seconds = Histogram(
            "grpc_server_handling_seconds",
            "Time from the start of an RPC to its end (streams: their life)",
            rpc_labels,
            buckets=RPC_BUCKETS_S,
            registry=self.registry,
        )
        self.interceptor = RpcMetricsInterceptor(self)

    def bind(
        self,
        *,
        running: Callable[[], set[str]],
        agents: Callable[[], Sequence[AgentSession]],
        count_runs: Callable[[], Awaitable[dict[int, int]]],
        queue_depth: Callable[[], int],
    ) -> None:
        """Connect the collectors to the controller's domain objects."""
        self._running, self._agents, self._count_runs, self._queue_depth = running, agents, count_runs, queue_depth

    def _agents_now(self) -> Sequence[AgentSession]:
        return self._agents()

    def _running_now(self) -> set[str]:
        return self._running()

    def _queue_depth_now(self) -> int:
        return self._queue_depth()

    async def refresh(self) -> None:
        """Before a scrape: figures that need the database."""
        if self._count_runs is not None:
            self.state.runs_by_state = await self._count_runs()

    # --- IngestObserver ------------------------------------------------------------------

    def committed(self, run_id: str, batch: repo.BatchIngest, outcome: repo.IngestOutcome) -> None:
        """A batch went through the writer (new, or a replay of one already stored)."""
        self.batches_ingested.labels("new" if outcome.new else "duplicate").inc()
        if outcome.new:
            self.samples_ingested.inc(outcome.ok + outcome.failed)
            self.live.observe(run_id, batch)

    def commit_took(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)


def _split_method(full: str) -> tuple[str, str]:
    service, _, method = full.lstrip("/").rpartition("/")
    return service, method


def _code_of(context: grpc.aio.ServicerContext, fallback: grpc.StatusCode) -> str:
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return str(code.name)
    return str(fallback.name)


class RpcMetricsInterceptor(grpc.aio.ServerInterceptor):
    """Counts every RPC by method and status code and times it (outermost interceptor)."""

    def __init__(self, metrics: ControllerMetrics) -> None:
        self._m = metrics

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, method = _split_method(details.method)
        kind = {
            (False, False): "unary",
            (True, False): "client_stream",
            (False, True): "server_stream",
            (True, True): "bidi_stream",
        }[(bool(handler.request_streaming), bool(handler.response_streaming))]
        labels = (kind, service, method)
        m = self._m

        def finish(started: float, code: str) -> None:
            m.rpc_handled.labels(*labels, code).inc()
            m.rpc_seconds.labels(*labels).observe(time.perf_counter() - started)

        async def run_unary(call: Callable[[], Awaitable[Any]], context: grpc.aio.ServicerContext) -> Any:
            m.rpc_started.labels(*labels).inc()
            started, code = time.perf_counter(), ""
            try:
                result = await call()
                code = _code_of(context, grpc.StatusCode.OK)
                return result
            except asyncio.CancelledError:
                code = grpc.StatusCode.CANCELLED.name
                raise
            except BaseException:
                code = _code_of(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                finish(started, code)

        async def run_stream(items: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
            m.rpc_started.labels(*labels).inc()
            started, code = time.perf_counter(), grpc.StatusCode.CANCELLED.name
            try:
                async for item in items:
                    yield item
                code = _code_of(context, grpc.StatusCode.OK)
            except asyncio.CancelledError:
                raise
            except GeneratorExit:
                raise  # the stream was closed under us: counted as CANCELLED
            except BaseException:
                code = _code_of(context, grpc.StatusCode.UNKNOWN)
                raise
            finally:
                finish(started, code)

        des, ser = handler.request_deserializer, handler.response_serializer
        streamer = handler.stream_stream if handler.request_streaming else handler.unary_stream
        if handler.response_streaming and not inspect.isasyncgenfunction(streamer):
            # A streaming method written as a coroutine that calls `context.write` (the
            # health service's Watch): time it like a unary call, keep it a coroutine.
            inner_write = streamer

            async def write_stream(request: Any, context: grpc.aio.ServicerContext) -> None:
                await run_unary(lambda: inner_write(request, context), context)

            make = (
                grpc.stream_stream_rpc_method_handler
                if handler.request_streaming
                else grpc.unary_stream_rpc_method_handler
            )
            return make(write_stream, des, ser)
        if handler.request_streaming and handler.response_streaming:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in run_stream(inner_ss(requests, context), context):
                    yield item

            return grpc.stream_stream_rpc_method_handler(stream_stream, des, ser)
        if handler.response_streaming:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                async for item in run_stream(inner_us(request, context), context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(unary_stream, des, ser)
        if handler.request_streaming:
            inner_su = handler.stream_unary

            async def stream_unary(requests: Any, context: grpc.aio.ServicerContext) -> Any:
                return await run_unary(lambda: inner_su(requests, context), context)

            return grpc.stream_unary_rpc_method_handler(stream_unary, des, ser)
        inner_uu = handler.unary_unary

        async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
            return await run_unary(lambda: inner_uu(request, context), context)

        return grpc.unary_unary_rpc_method_handler(unary_unary, des, ser)
