"""The controller process: grpc.aio server with RunService, AgentService, health and
reflection, over one SQLite database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.grpc_options import SERVER_OPTIONS
from common.metrics_http import MetricsServer
from common.proto.loadtest.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    dataset_service_pb2,
    dataset_service_pb2_grpc,
    key_service_pb2,
    key_service_pb2_grpc,
    run_service_pb2,
)
from common.tls import ServerTls
from controller.auth import AuthInterceptor
from controller.domain.access.audit import AuditLog
from controller.domain.access.destinations import DestinationPolicy, is_loopback_listen
from controller.domain.access.keys import KeyStore
from controller.domain.access.ratelimit import RateLimiter, RateLimits
from controller.domain.baselines import Baselines
from controller.domain.execution.coordinator import RunCoordinator
from controller.domain.results.ingest import Ingestor
from controller.domain.results.live import RunHub
from controller.domain.results.provider import RunResults
from controller.domain.runs import Runs
from controller.domain.uploads import DatasetLibrary
from controller.memory import MemoryReleaser
from controller.observability import ControllerMetrics
from controller.servicers import run_service
from controller.servicers.agent_service import AgentServiceServicer
from controller.servicers.dataset_service import DatasetServiceServicer
from controller.servicers.key_service import KeyServiceServicer
from controller.servicers.run_service import RunServiceServicer
from controller.store.database import Database
from controller.store.sqlite import SqliteStore

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    key_service_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
    dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"].full_name,
)


class OpenListenerError(Exception):
    """Refused to serve a non-loopback address without keys (and without `insecure_open`)."""


class Controller:
    """Owns the database, the domain objects and the gRPC server of one controller."""

    def __init__(
        self,
        db_path: str,
        *,
        api_key: str | None = None,
        heartbeat_interval_s: float = 1.0,
        lost_grace_s: float | None = None,
        metrics_listen: str | None = None,
        require_auth_for_reads: bool = False,
        rate_limits: RateLimits | None = None,
        tls: ServerTls | None = None,
        allow_targets: Sequence[str] = (),
        insecure_open: bool = False,
    ) -> None:
        self.db = Database(db_path)
        self.store = SqliteStore(self.db)
        self._insecure_open = insecure_open
        self.destinations = DestinationPolicy(allow_targets)
        self._tls = tls
        self.keys = KeyStore(self.store, api_key)
        self.audit = AuditLog(self.store)
        self.auth = AuthInterceptor(
            self.keys, self.audit, require_auth_for_reads=require_auth_for_reads, limiter=RateLimiter(rate_limits)
        )
        # Own registry per controller: several controllers in one process (tests) stay apart.
        self.metrics = ControllerMetrics()
        self._metrics_listen = metrics_listen
        self.metrics_server = MetricsServer(self.metrics.registry, self.metrics.refresh)
        self.metrics_port = 0
        self.hub = RunHub()
        self.results = RunResults(self.store)
        self.memory = MemoryReleaser(self.db.shrink_memory)
        self.coordinator = RunCoordinator(
            self.store,
            self.hub,
            heartbeat_interval_s=heartbeat_interval_s,
            lost_grace_s=lost_grace_s,
            on_run_final=self.results.run_finished,
        )
        self.ingestor = Ingestor(self.store, self.metrics)
        self.metrics.bind(
            running=self.coordinator.running_run_ids,
            agents=self.coordinator.agents,
            count_runs=self.store.count_runs_by_state,
            queue_depth=lambda: self.ingestor.queue_depth,
        )
        self.datasets = DatasetLibrary(self.store)
        self.runs = Runs(self.store, self.coordinator, self.hub, self.results, self.destinations, self.datasets)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(interceptors=[self.metrics.interceptor, self.auth], options=SERVER_OPTIONS)
        run_service.add_to_server(RunServiceServicer(self.runs, Baselines(self.store, self.runs)), self.server)
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServiceServicer(self.coordinator, self.ingestor, heartbeat_interval_s, self.audit, self.datasets),
            self.server,
        )
        dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server(
            DatasetServiceServicer(self.datasets), self.server
        )
        key_service_pb2_grpc.add_KeyServiceServicer_to_server(KeyServiceServicer(self.keys, self.audit), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = 0

    async def start(self, listen: str) -> int:
        """Migrate, start serving on `listen` (HOST:PORT, port 0 picks one); returns the port.

        Raises OpenListenerError, before binding, for a non-loopback `listen` when the
        controller has no keys (no bootstrap key, none stored) and `insecure_open` is off."""
        applied = self.db.migrate()
        if applied:
            log.info("migrations_applied", versions=applied, db=self.db.path)
        await self.check_exposure(listen)
        discarded = await self.datasets.start()
        if discarded:
            log.info("dataset_uploads_discarded", count=discarded, hint="uploads interrupted by a stop")
        if self._tls is not None:
            self.port = self.server.add_secure_port(listen, self._tls.credentials())
        else:
            self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"could not listen on {listen}")
        await self.destinations.add_listener(listen, self.port)
        self.ingestor.start()
        await self.coordinator.start()
        self.keys.start()
        self.audit.start()
        self.memory.start()
        await self.server.start()
        if self._metrics_listen:
            self.metrics_port = await self.metrics_server.start(self._metrics_listen)
            log.info("metrics_listening", listen=self._metrics_listen, port=self.metrics_port)
            await self.destinations.add_listener(self._metrics_listen, self.metrics_port)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("controller_listening", listen=listen, port=self.port, db=self.db.path)
        return self.port

    async def check_exposure(self, listen: str) -> None:
        """The listener rule (docs/security.md, "Where agents may send traffic"): a non-loopback
        `listen` needs keys (a bootstrap key or a stored one) or `insecure_open`, else
        OpenListenerError; without an `--allow-target` list it is served with a warning.
        `start()` calls it (after migrating, before binding); it needs the database only."""
        if is_loopback_listen(listen):
            return
        if not await self.keys.auth_enabled():
            if not self._insecure_open:
                raise OpenListenerError(
                    f"refusing to listen on {listen} without API keys: anyone who reaches it could aim the agents "
                    "anywhere; set --api-key / LLM_LOADTEST_API_KEY (or create a key with `llm-loadtest keys create "
                    "--db`), listen on 127.0.0.1, or pass --insecure-open"
                )
            log.warning("controller_open", listen=listen, hint="--insecure-open: no key is required for any call")
        if not self.destinations.explicit:
            log.warning(
                "no_target_allow_list",
                listen=listen,
                hint="runs may aim the agents at any destination except link-local addresses and this "
                "controller; restrict them with --allow-target",
            )

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop within `grace_s`: NOT_SERVING; running runs are stopped on their agents and
        become INTERRUPTED; every batch received is committed and acked; then the agent
        streams are closed (after their acks) and the server stops. Results of final runs
        still being computed are cancelled (computed on their first read instead)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_s
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.coordinator.stop(timeout_s=grace_s * 0.5)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(deadline - loop.time() - 0.5, 0.1)):
                await self.ingestor.drain()
        self.coordinator.close_sessions("the controller is shutting down")
        await self.keys.stop()
        await self.ingestor.stop()
        await self.server.stop(max(deadline - loop.time(), 0.2))
        await self.audit.stop()  # after the server: no refusal is left uncounted
        await self.memory.stop()
        await self.results.close()
        await self.metrics_server.stop()
        self.destinations.close()
        self.db.close()
        log.info("controller_stopped")
