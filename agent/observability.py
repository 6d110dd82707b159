"""The agent's Prometheus metrics (`llm-loadtest agent --metrics-listen`).

Load-generator health, so an operator can see an agent saturating before its latencies lie:

- `llm_loadtest_agent_in_flight_requests` — requests in flight now;
- `llm_loadtest_agent_assignments` — assignments held (running, or finished and not yet acked);
- `llm_loadtest_agent_connected` — 1 while a welcomed stream to the controller is live;
- `llm_loadtest_agent_event_loop_lag_seconds` (last measurement) and
  `llm_loadtest_agent_event_loop_lag_seconds_hist` (every measurement, 10 a second);
- `llm_loadtest_agent_send_lag_seconds` — histogram of send lag (`sent - scheduled`, the
  client-side queueing of every request), from the sealed sample batches;
- `llm_loadtest_agent_requests_total{status}` — finished requests, `ok` or `error`;
- `llm_loadtest_agent_cpu_percent` — CPU of this process since the previous scrape, percent of
  one core, beside prometheus-client's `process_cpu_seconds_total`.

One registry per `AgentMetrics`, never the global default.
"""

from __future__ import annotations

import asyncio
import contextlib

import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from agent.controller_link import ControllerLink
from agent.health import CpuMeter, LoopLagMonitor
from common.codes import RequestStatus
from common.metrics_http import MetricsServer
from common.proto.loadtest.v1 import agent_service_pb2

LAG_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
SEND_LAG_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class AgentMetrics:
    """The agent's registry; a `LinkObserver` for `run_agent`."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._link: ControllerLink | None = None
        self._cpu = CpuMeter()
        ProcessCollector(registry=self.registry)
        Gauge("llm_loadtest_agent_in_flight_requests", "Requests in flight now", registry=self.registry).set_function(
            self._in_flight
        )
        Gauge(
            "llm_loadtest_agent_assignments",
            "Assignments held (running, or finished and not yet acked)",
            registry=self.registry,
        ).set_function(self._assignments)
        Gauge(
            "llm_loadtest_agent_connected",
            "1 while a welcomed stream to the controller is live",
            registry=self.registry,
        ).set_function(self._connected)
        Gauge(
            "llm_loadtest_agent_cpu_percent",
            "CPU of this process since the previous scrape, percent of one core",
            registry=self.registry,
        ).set_function(self._cpu.take_percent)
        self._lag_last = Gauge(
            "llm_loadtest_agent_event_loop_lag_seconds",
            "Event-loop lag: how late a 100 ms timer fired, last reading",
            registry=self.registry,
        )
        self._lag_hist = Histogram(
            "llm_loadtest_agent_event_loop_lag_seconds_hist",
            "Event-loop lag readings (10 a second)",
            buckets=LAG_BUCKETS_S,
            registry=self.registry,
        )
        self._send_lag = Histogram(
            "llm_loadtest_agent_send_lag_seconds",
            "Send lag of every request: sent minus scheduled",
            buckets=SEND_LAG_BUCKETS_S,
            registry=self.registry,
        )
        self._requests = Counter(
            "llm_loadtest_agent_requests",
            "Finished requests by status (ok or error)",
            ["status"],
            registry=self.registry,
        )
        self.lag_monitor = LoopLagMonitor(on_sample=self._on_lag)
        self._server = MetricsServer(self.registry)
        self._lag_task: asyncio.Task[None] | None = None

    async def serve(self, listen: str) -> int:
        """Serve /metrics on `listen` (HOST:PORT) and start measuring loop lag; returns the port."""
        port = await self._server.start(listen)
        self._lag_task = asyncio.create_task(self.lag_monitor.run(), name="metrics-loop-lag")
        return port

    async def close(self) -> None:
        if self._lag_task is not None:
            self._lag_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._lag_task
        await self._server.stop()

    def _in_flight(self) -> int:
        return sum(r.in_flight for r in self._link.assignments.values()) if self._link else 0

    def _assignments(self) -> int:
        return len(self._link.assignments) if self._link else 0

    def _connected(self) -> int:
        return int(bool(self._link and self._link.connected))

    def _on_lag(self, lag_s: float) -> None:
        self._lag_last.set(lag_s)
        self._lag_hist.observe(lag_s)

    # --- LinkObserver --------------------------------------------------------------------

    def attach(self, link: ControllerLink) -> None:
        self._link = link

    def on_send(self, message: agent_service_pb2.ConnectRequest) -> None:
        if message.WhichOneof("body") != "sample_batch":
            return
        batch = message.sample_batch
        status = np.asarray(batch.status, dtype=np.int64)
        ok = int((status == RequestStatus.OK).sum())
        self._requests.labels("ok").inc(ok)
        self._requests.labels("error").inc(status.size - ok)
        for delay_ns in batch.queue_delay_ns:
            self._send_lag.observe(delay_ns / 1e9)
