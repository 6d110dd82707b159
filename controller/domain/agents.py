"""Connected agents: their sessions, health and outbound message queues.

The servicer owns the stream; the domain talks to an agent only by putting messages
on its session's outbox, which the servicer drains onto the stream.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from common.proto.loadtest.v1 import agent_service_pb2


@dataclass
class AgentHealthReport:
    event_loop_lag_ms: float = 0.0
    cpu_percent: float = 0.0
    in_flight: int = 0


@dataclass(eq=False)
class AgentSession:
    """One connected agent stream."""

    session_id: str
    name: str
    labels: dict[str, str]
    version: str
    connected_at_ns: int
    outbox: asyncio.Queue[agent_service_pb2.ConnectResponse] = field(
        default_factory=asyncio.Queue
    )
    last_heartbeat_ns: int = 0
    health: AgentHealthReport = field(default_factory=AgentHealthReport)
    # The run this agent is reserved for, and the assignment it is working on.
    run_id: str = ""
    assignment_id: str = ""
    closed: bool = False

    def send(self, message: agent_service_pb2.ConnectResponse) -> None:
        """Queue a message for the agent (dropped if the stream has ended)."""
        if not self.closed:
            self.outbox.put_nowait(message)

    @property
    def free(self) -> bool:
        return not self.closed and not self.run_id


class AgentRegistry:
    """The sessions that are connected now."""

    def __init__(self, on_change: Callable[[], None] = lambda: None) -> None:
        self._sessions: dict[str, AgentSession] = {}
        self._on_change = on_change

    def add(self, session: AgentSession) -> None:
        self._sessions[session.session_id] = session
        self._notify()

    def remove(self, session: AgentSession) -> None:
        session.closed = True
        self._sessions.pop(session.session_id, None)
        self._notify()

    def get(self, session_id: str) -> AgentSession | None:
        return self._sessions.get(session_id)

    def all(self) -> list[AgentSession]:
        return sorted(self._sessions.values(), key=lambda s: (s.connected_at_ns, s.session_id))

    def free(self) -> list[AgentSession]:
        return [s for s in self.all() if s.free]

    def heartbeat(self, session: AgentSession, health: AgentHealthReport) -> None:
        session.last_heartbeat_ns = time.time_ns()
        session.health = health

    def release(self, session: AgentSession) -> None:
        session.run_id = ""
        session.assignment_id = ""
        self._notify()

    def _notify(self) -> None:
        self._on_change()
