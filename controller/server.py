"""The controller process: grpc.aio server with RunService, AgentService, health and
reflection, over one SQLite database."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.grpc_options import SERVER_OPTIONS
from common.metrics_http import MetricsServer
from common.proto.loadtest.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    key_service_pb2,
    key_service_pb2_grpc,
    run_service_pb2,
)
from common.tls import ServerTls
from controller.auth import AuthInterceptor
from controller.domain.audit import AuditLog
from controller.domain.coordinator import RunCoordinator
from controller.domain.ingest import Ingestor
from controller.domain.keys import KeyStore
from controller.domain.live import RunHub
from controller.domain.ratelimit import RateLimiter, RateLimits
from controller.domain.run_results import RunResults
from controller.domain.runs import Runs
from controller.observability import ControllerMetrics
from controller.servicers import run_service
from controller.servicers.agent_service import AgentServiceServicer
from controller.servicers.key_service import KeyServiceServicer
from controller.servicers.run_service import RunServiceServicer
from controller.store import repository as repo
from controller.store.database import Database

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    key_service_pb2.DESCRIPTOR.services_by_name["KeyService"].full_name,
)


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
    ) -> None:
        self.db = Database(db_path)
        self._tls = tls
        self.keys = KeyStore(self.db, api_key)
        self.audit = AuditLog(self.db)
        self.auth = AuthInterceptor(
            self.keys, self.audit, require_auth_for_reads=require_auth_for_reads, limiter=RateLimiter(rate_limits)
        )
        # Own registry per controller: several controllers in one process (tests) stay apart.
        self.metrics = ControllerMetrics()
        self._metrics_listen = metrics_listen
        self.metrics_server = MetricsServer(self.metrics.registry, self.metrics.refresh)
        self.metrics_port = 0
        self.hub = RunHub()
        self.results = RunResults(self.db)
        self.coordinator = RunCoordinator(
            self.db, self.hub, heartbeat_interval_s=heartbeat_interval_s, lost_grace_s=lost_grace_s,
            on_run_final=self.results.run_finished,
        )  # fmt: skip
        self.ingestor = Ingestor(self.db, self.metrics)
        self.metrics.bind(
            running=lambda: set(self.coordinator.executions),
            agents=self.coordinator.registry,
            count_runs=lambda: self.db.read(repo.count_runs_by_state),
            queue_depth=lambda: self.ingestor.queue_depth,
        )
        self.runs = Runs(self.db, self.coordinator, self.hub, self.results)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(
            interceptors=[self.metrics.interceptor, self.auth], options=SERVER_OPTIONS
        )
        run_service.add_to_server(RunServiceServicer(self.runs), self.server)
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServiceServicer(self.coordinator, self.ingestor, heartbeat_interval_s), self.server
        )
        key_service_pb2_grpc.add_KeyServiceServicer_to_server(KeyServiceServicer(self.keys, self.audit), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), self.server
        )
        self.port = 0

    async def start(self, listen: str) -> int:
        """Migrate, start serving on `listen` (HOST:PORT, port 0 picks one); returns the port."""
        applied = self.db.migrate()
        if applied:
            log.info("migrations_applied", versions=applied, db=self.db.path)
        if self._tls is not None:
            self.port = self.server.add_secure_port(listen, self._tls.credentials())
        else:
            self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"could not listen on {listen}")
        self.ingestor.start()
        await self.coordinator.start()
        self.keys.start()
        await self.server.start()
        if self._metrics_listen:
            self.metrics_port = await self.metrics_server.start(self._metrics_listen)
            log.info("metrics_listening", listen=self._metrics_listen, port=self.metrics_port)
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("controller_listening", listen=listen, port=self.port, db=self.db.path)
        return self.port

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
        await self.results.close()
        await self.metrics_server.stop()
        self.db.close()
        log.info("controller_stopped")
