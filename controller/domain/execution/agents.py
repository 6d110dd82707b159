"""Connected agents: their sessions, health, clock offset and outbound message queues.

The servicer owns the stream; the domain talks to an agent only by putting messages
on its session's outbox, which the servicer drains onto the stream. The outbox is
bounded (`OUTBOX_MESSAGES`): an agent that stops reading its stream for that long is
treated as gone rather than growing the controller's memory.

Clock offset (`ClockEstimate`): every heartbeat is answered with the controller's receive
and send times; the agent returns the completed exchange (four time stamps, as in NTP) in
its next heartbeat. The estimate kept is the one with the smallest round trip, whose error
is bounded by half that round trip.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from common.proto.loadtest.v1 import agent_service_pb2

OUTBOX_MESSAGES = 10_000
# An agent is placed on runs only once its clock offset rests on this many exchanges (agents
# send a quick burst of heartbeats after connecting), or after CLOCK_READY_AFTER_S.
MIN_CLOCK_SAMPLES = 3
CLOCK_READY_AFTER_S = 5.0


@dataclass
class AgentHealthReport:
    event_loop_lag_ms: float = 0.0
    cpu_percent: float = 0.0
    in_flight: int = 0


@dataclass
class ClockEstimate:
    """Controller clock minus agent clock, from the heartbeat exchange with the least RTT."""

    offset_ns: int = 0
    rtt_ns: int | None = None
    samples: int = 0

    def add(self, t1: int, t2: int, t3: int, t4: int) -> bool:
        """Add one exchange (t1 agent send, t2 controller receive, t3 controller send, t4
        agent receive); True if it became the estimate."""
        rtt = (t4 - t1) - (t3 - t2)
        if t1 <= 0 or t4 <= 0 or rtt < 0:
            return False  # incomplete or nonsensical (e.g. the agent's clock stepped)
        self.samples += 1
        if self.rtt_ns is not None and rtt >= self.rtt_ns:
            return False
        self.rtt_ns = rtt
        self.offset_ns = ((t2 - t1) + (t3 - t4)) // 2
        return True


@dataclass(eq=False)
class AgentSession:
    """One connected agent stream."""

    session_id: str
    name: str
    labels: dict[str, str]
    version: str
    connected_at_ns: int
    outbox: asyncio.Queue[agent_service_pb2.ConnectResponse | None] = field(
        default_factory=lambda: asyncio.Queue(OUTBOX_MESSAGES)
    )
    last_heartbeat_ns: int = 0
    last_heartbeat_mono: float = field(default_factory=time.monotonic)
    health: AgentHealthReport = field(default_factory=AgentHealthReport)
    clock: ClockEstimate = field(default_factory=ClockEstimate)
    # The run this agent is reserved for, and the assignment it is working on.
    run_id: str = ""
    assignment_id: str = ""
    closed: bool = False
    # Set when the controller ends the stream on purpose (agent lost, controller stopping).
    close_reason: str = ""
    # The agent said Goodbye: its disconnect is a departure, not a loss.
    departing: bool = False
    # The assignments this session may report for: given to it (Assign) or proved on resume
    # with their tokens (`AgentLoss.prove_resume`). Anything else it sends is refused.
    owned: set[str] = field(default_factory=set)

    def send(self, message: agent_service_pb2.ConnectResponse) -> None:
        """Queue a message for the agent (dropped if the stream has ended).

        An outbox that is full means the agent has not read its stream for thousands of
        messages: the stream is closed instead of buffering without bound.
        """
        if self.closed or self.close_reason:
            return
        try:
            self.outbox.put_nowait(message)
        except asyncio.QueueFull:
            self.close("agent is not reading its stream (outbox full)")

    def close(self, reason: str) -> None:
        """Ask the servicer to flush what is queued and end the stream."""
        if not self.close_reason:
            self.close_reason = reason
            # A None past the bound would block; the servicer also checks close_reason.
            with contextlib.suppress(asyncio.QueueFull):
                self.outbox.put_nowait(None)

    def matches(self, selector: Mapping[str, str]) -> bool:
        """True if every `key=value` of `selector` is among this agent's labels."""
        return all(self.labels.get(k) == v for k, v in selector.items())

    connected_mono: float = field(default_factory=time.monotonic)

    @property
    def clock_ready(self) -> bool:
        """True once the clock offset is estimated well enough to start stages together."""
        return self.clock.samples >= MIN_CLOCK_SAMPLES or time.monotonic() - self.connected_mono > CLOCK_READY_AFTER_S

    @property
    def free(self) -> bool:
        return not self.closed and not self.close_reason and not self.run_id and self.clock_ready


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

    def free(self, selector: Mapping[str, str] | None = None) -> list[AgentSession]:
        """Free sessions (optionally only those matching `selector`), oldest first."""
        return [s for s in self.all() if s.free and (not selector or s.matches(selector))]

    def matching(self, selector: Mapping[str, str]) -> list[AgentSession]:
        """Connected sessions matching `selector`, free or not."""
        return [s for s in self.all() if not s.close_reason and s.matches(selector)]

    def heartbeat(self, session: AgentSession, health: AgentHealthReport) -> None:
        session.last_heartbeat_ns = time.time_ns()
        session.last_heartbeat_mono = time.monotonic()
        session.health = health

    def clock_sample(self, session: AgentSession, t1: int, t2: int, t3: int, t4: int) -> None:
        """Add a clock exchange; an agent whose clock just became ready may be placed."""
        was_ready = session.clock_ready
        session.clock.add(t1, t2, t3, t4)
        if session.clock_ready and not was_ready:
            self._notify()

    def release(self, session: AgentSession) -> None:
        session.run_id = ""
        session.assignment_id = ""
        self._notify()

    def _notify(self) -> None:
        self._on_change()
