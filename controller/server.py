"""The controller process: grpc.aio server with RunService, AgentService, health and
reflection, over one SQLite database."""

from __future__ import annotations

import grpc
import structlog
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from common.grpc_options import SERVER_OPTIONS
from common.proto.loadtest.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    run_service_pb2,
    run_service_pb2_grpc,
)
from controller.auth import AuthInterceptor
from controller.domain.coordinator import RunCoordinator
from controller.domain.ingest import Ingestor
from controller.domain.live import RunHub
from controller.domain.runs import Runs
from controller.servicers.agent_service import AgentServiceServicer
from controller.servicers.run_service import RunServiceServicer
from controller.store.database import Database

log = structlog.get_logger(__name__)

SERVICE_NAMES = (
    run_service_pb2.DESCRIPTOR.services_by_name["RunService"].full_name,
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
)


class Controller:
    """Owns the database, the domain objects and the gRPC server of one controller."""

    def __init__(
        self,
        db_path: str,
        *,
        api_key: str | None = None,
        heartbeat_interval_s: float = 1.0,
        lost_grace_s: float = 10.0,
    ) -> None:
        self.db = Database(db_path)
        self.hub = RunHub()
        self.coordinator = RunCoordinator(self.db, self.hub, lost_grace_s=lost_grace_s)
        self.ingestor = Ingestor(self.db)
        self.runs = Runs(self.db, self.coordinator, self.hub)
        self.health = health.aio.HealthServicer()
        self.server = grpc.aio.server(interceptors=[AuthInterceptor(api_key)], options=SERVER_OPTIONS)
        run_service_pb2_grpc.add_RunServiceServicer_to_server(RunServiceServicer(self.runs), self.server)
        agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
            AgentServiceServicer(self.coordinator, self.ingestor, heartbeat_interval_s), self.server
        )
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
        self.port = self.server.add_insecure_port(listen)
        if self.port == 0:
            raise OSError(f"could not listen on {listen}")
        self.ingestor.start()
        await self.coordinator.start()
        await self.server.start()
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.SERVING)
        log.info("controller_listening", listen=listen, port=self.port, db=self.db.path)
        return self.port

    async def stop(self, grace_s: float = 5.0) -> None:
        """Stop: NOT_SERVING, no new runs, commit queued samples, close streams."""
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await self.coordinator.stop()
        await self.ingestor.stop()
        await self.server.stop(grace_s)
        self.db.close()
        log.info("controller_stopped")
