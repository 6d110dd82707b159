"""The agent's link to its controller (`ControllerLink`): one `AgentService.Connect` stream, one
controller session, at a time.

Connection lifecycle (`ControllerLink.run`):

1. Open a channel and the bidi stream with our API key as call metadata; send `Hello`
   (name, labels, version, ids of assignments still running in this process, and the
   resume token of every assignment it holds, which proves they were given to it) and
   wait for `Welcome` (session id, heartbeat interval).
2. Replay, in order, every assignment's unacked batches (batch_seq order) followed by its
   final `AssignmentUpdate` if it has finished, then let live traffic through. Replay and
   switching live traffic to the new stream happen in one event-loop step, so nothing
   emitted in between can overtake or be lost.
3. Run three tasks until one ends: the reader (Assign, Cancel, Ack, HeartbeatAck), the
   single writer that drains the connection's outbound `asyncio.Queue` (every message of
   every task goes through it, so writes never interleave), and the heartbeat (agent clock,
   event-loop lag, CPU, in-flight requests, and the previous clock exchange: t1 = our send,
   t2/t3 = the controller's receive/send from its HeartbeatAck, t4 = our receive). A burst
   of `CLOCK_BURST` quick heartbeats after connecting gives the controller an offset
   estimate before it places this agent.
4. When the stream breaks, running assignments keep running (their batches stay unacked in
   their batchers, which apply backpressure if the outage lasts) until the lease expires;
   reconnect with jittered exponential backoff (0.2 s doubling to 5 s) and go to 1.
   UNAUTHENTICATED or PERMISSION_DENIED from the controller is final: `AgentAuthError`.

Lease: every message from the controller renews `lease` (its length comes from Welcome).
When it expires (controller gone, network partition, or this process was frozen), running
assignments are cancelled: a partitioned agent must not load a model server forever.

Preflight: a `Preflight` from the controller checks the target (`agent.preflight`) in a task
of its own, outside every assignment, and is answered with a `PreflightResult` (dropped if
the stream breaks meanwhile: the controller then fails the run's start, see docs/fleet.md).

Requests are announced (`announce`) before they are sent: the runner's `requests_sent`
goes to the controller and the request waits until that update is written to the stream,
so a controller that loses this agent knows how many requests it sent but never reported.

Shutdown (the `stop` event): cancel running assignments (their in-flight requests become
`cancelled` samples and they report CANCELLED), let the writer drain, wait up to
`shutdown_grace_s` for the controller to ack every batch, send Goodbye, half-close the
stream and close.

The link holds no state that outlives the process; assignments are registered here from
`Assign` until the controller has acked all their batches after their final update
(`AssignmentRunner.released`).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import grpc
import structlog
from google.protobuf import timestamp_pb2

from agent.assignment import AssignmentRunner, Lease
from agent.datasets import DatasetCache
from agent.health import CpuMeter, LoopLagMonitor
from agent.preflight import check_target
from agent.sample import PROCESS_CLOCK_ANCHOR, ClockAnchor
from common.durations import seconds
from common.grpc_options import CLIENT_OPTIONS, auth_metadata
from common.proto.loadtest.v1 import agent_service_pb2, agent_service_pb2_grpc, run_pb2
from common.version import __version__

log = structlog.get_logger(__name__)

ConnectRequest = agent_service_pb2.ConnectRequest
ConnectResponse = agent_service_pb2.ConnectResponse
ChannelFactory = Callable[[str], Any]  # grpc.aio.Channel (grpc ships no type information)

DEFAULT_HEARTBEAT_INTERVAL_S = 5.0
MIN_HEARTBEAT_INTERVAL_S = 0.2
CLOCK_BURST = 6
CLOCK_BURST_INTERVAL_S = 0.05
# Finished assignments waiting for a final ack cost little, but a controller that never
# acks (e.g. assignments with no batches) must not make the registry grow forever.
MAX_RETAINED_FINISHED = 256

_REFUSED = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class AgentAuthError(RuntimeError):
    """The controller refused this agent's API key (not retried)."""


class ControllerProtocolError(RuntimeError):
    """The controller broke the protocol (e.g. no Welcome first); the agent reconnects."""


@dataclass(frozen=True, slots=True)
class ReconnectBackoff:
    """Exponential backoff with jitter: `initial_s` doubling up to `max_s`, ±`jitter`."""

    initial_s: float = 0.2
    max_s: float = 5.0
    jitter: float = 0.2

    def delay_s(self, attempt: int, rng: random.Random) -> float:
        """Delay before reconnect attempt number `attempt` (0 = first retry)."""
        base = min(self.max_s, self.initial_s * 2.0 ** min(attempt, 30))
        return base * rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)


def _insecure_channel(target: str) -> Any:
    return grpc.aio.insecure_channel(target, options=CLIENT_OPTIONS)


class _Outbound:
    """The outbound queue of one connection; the writer task is its only consumer."""

    __slots__ = ("queue",)

    def __init__(self) -> None:
        self.queue: asyncio.Queue[agent_service_pb2.ConnectRequest] = asyncio.Queue()


class LinkObserver(Protocol):
    """Watches a link for metrics (agent/observability.py); never changes what it does."""

    def attach(self, link: ControllerLink) -> None:
        """Called once by the link's constructor."""

    def on_send(self, message: agent_service_pb2.ConnectRequest) -> None:
        """Every message the link emits (sample batches once, when sealed)."""


class ControllerLink:
    """Keeps one agent connected to its controller and runs the assignments it gets."""

    def __init__(
        self,
        controller: str,
        *,
        name: str,
        labels: Mapping[str, str],
        api_key: str | None,
        stop: asyncio.Event,
        anchor: ClockAnchor = PROCESS_CLOCK_ANCHOR,
        backoff: ReconnectBackoff | None = None,
        rng: random.Random | None = None,
        channel_factory: ChannelFactory = _insecure_channel,
        welcome_timeout_s: float = 30.0,
        shutdown_grace_s: float = 5.0,
        observer: LinkObserver | None = None,
    ) -> None:
        self._controller = controller
        self._name = name
        self._labels = dict(labels)
        self._api_key = api_key
        self._stop = stop
        self._anchor = anchor
        self._backoff = backoff or ReconnectBackoff()
        self._rng = rng or random.Random()
        self._channel_factory = channel_factory
        self._welcome_timeout_s = welcome_timeout_s
        self._shutdown_grace_s = shutdown_grace_s

        self._assignments: dict[str, AssignmentRunner] = {}
        self._outbound: _Outbound | None = None
        self._acked = asyncio.Event()
        self._lag = LoopLagMonitor()
        self._cpu = CpuMeter()
        self._session_id = ""
        self._welcomed = False
        # Renewed by every message from the controller; running assignments stop when it
        # expires (a partitioned agent must not keep loading a model server).
        self.lease = Lease()
        self._clock_sample: agent_service_pb2.ClockSample | None = None
        # Announcements of requests about to be sent, not yet written (one per assignment).
        self._announcing: dict[str, tuple[agent_service_pb2.ConnectRequest, asyncio.Future[None]]] = {}
        self._observer = observer
        self._preflights: set[asyncio.Task[None]] = set()
        # Uploaded datasets, fetched once per process on a channel of their own.
        self.datasets = DatasetCache(controller, api_key, channel_factory)
        if observer is not None:
            observer.attach(self)

    @property
    def assignments(self) -> Mapping[str, AssignmentRunner]:
        """Assignments this process still holds (running, or finished and not fully acked)."""
        return self._assignments

    @property
    def connected(self) -> bool:
        """True while a welcomed stream is live."""
        return self._outbound is not None

    @property
    def session_id(self) -> str:
        """Id of the current (or last) session."""
        return self._session_id

    # --- the connection loop ---------------------------------------------------------

    async def run(self) -> None:
        """Stay connected and run assignments until `stop` is set.

        Raises `AgentAuthError` when the controller refuses our key.
        """
        lag_task = asyncio.create_task(self._lag.run(), name="loop-lag")
        lease_task = asyncio.create_task(self._lease_watchdog(), name="lease-watchdog")
        attempt = 0
        try:
            while not self._stop.is_set():
                self._welcomed = False
                try:
                    await self._run_connection()
                    reason = "stream closed by controller"
                except AgentAuthError:
                    raise
                except grpc.aio.AioRpcError as exc:
                    reason = f"{exc.code().name}: {exc.details()}"
                except (ControllerProtocolError, TimeoutError) as exc:
                    reason = str(exc) or type(exc).__name__
                except Exception as exc:
                    log.exception("agent_session_error", controller=self._controller)
                    reason = f"{type(exc).__name__}: {exc}"
                if self._stop.is_set():
                    break
                welcomed = self._welcomed
                attempt = 0 if welcomed else attempt + 1
                delay = self._backoff.delay_s(max(attempt - 1, 0), self._rng)
                log.warning(
                    "agent_disconnected" if welcomed else "agent_connect_failed",
                    controller=self._controller,
                    reason=reason,
                    retry_in_s=round(delay, 3),
                    running_assignments=sum(not r.finished for r in self._assignments.values()),
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            lag_task.cancel()
            lease_task.cancel()
            for preflight in self._preflights:
                preflight.cancel()
            # Reached with assignments still running only on AgentAuthError or when our
            # own task is cancelled: they still stop the normal way (cancelled samples,
            # final update), just without anyone left to deliver them.
            await self._stop_assignments()

    async def _run_connection(self) -> None:
        """One stream from Hello to its end (sets `_welcomed` once Welcome arrives)."""
        channel = self._channel_factory(self._controller)
        call: Any = None
        tasks: list[asyncio.Task[Any]] = []
        outbound = _Outbound()
        try:
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            call = stub.Connect(metadata=auth_metadata(self._api_key))
            outbound.queue.put_nowait(self.hello())
            writer = asyncio.create_task(self._write_loop(call, outbound.queue), name="writer")
            stop_waiter = asyncio.create_task(self._stop.wait(), name="stop-waiter")
            tasks += [writer, stop_waiter]

            welcome = await self._read_welcome(call, writer, stop_waiter)
            if welcome is None:
                return  # stopped before the controller answered
            self._welcomed = True
            self._session_id = welcome.session_id
            self.lease.configure(seconds(welcome.lease_duration) or None)
            self.lease.renew()
            asked_s = seconds(welcome.heartbeat_interval)
            interval = max(asked_s, MIN_HEARTBEAT_INTERVAL_S) if asked_s > 0 else DEFAULT_HEARTBEAT_INTERVAL_S

            replayed = 0
            for runner in self._assignments.values():
                for message in runner.replay_messages():
                    outbound.queue.put_nowait(message)
                    replayed += message.HasField("sample_batch")
            self._outbound = outbound  # from here on, emitted messages go to this stream
            log.info(
                "agent_connected",
                session_id=welcome.session_id,
                controller=self._controller,
                heartbeat_interval_s=interval,
                replayed_batches=replayed,
            )

            reader = asyncio.create_task(self._read_loop(call), name="reader")
            heartbeat = asyncio.create_task(self._heartbeat_loop(outbound.queue, interval), name="heartbeat")
            tasks += [reader, heartbeat]
            done, _ = await asyncio.wait({reader, writer, heartbeat, stop_waiter}, return_when=asyncio.FIRST_COMPLETED)
            if done == {stop_waiter}:
                await self._close_gracefully(call, outbound, reader, writer, heartbeat)
                return
            await self._raise_stream_error(call, reader, writer, heartbeat)
        finally:
            if self._outbound is outbound:
                self._outbound = None
            self._release_announcements()
            for task in tasks:
                task.cancel()
            if tasks:
                await asyncio.wait(tasks)
            if call is not None:
                call.cancel()
            await channel.close()

    async def _read_welcome(
        self, call: Any, writer: asyncio.Task[None], stop_waiter: asyncio.Task[Any]
    ) -> agent_service_pb2.Welcome | None:
        read = asyncio.ensure_future(call.read())
        try:
            done, _ = await asyncio.wait(
                {read, writer, stop_waiter},
                timeout=self._welcome_timeout_s,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            if not read.done():
                read.cancel()
        if read in done:
            try:
                first = read.result()
            except grpc.aio.AioRpcError as exc:
                self._raise_if_refused(exc.code(), exc.details())
                raise
            if first is grpc.aio.EOF:
                await self._raise_stream_error(call)
                raise ControllerProtocolError("controller closed the stream before Welcome")
            if first.WhichOneof("body") != "welcome":
                raise ControllerProtocolError(f"expected Welcome, got {first.WhichOneof('body') or 'an empty message'}")
            welcome: agent_service_pb2.Welcome = first.welcome
            return welcome
        if writer in done:
            await self._raise_stream_error(call, writer)
            raise ControllerProtocolError("stream failed before Welcome")
        if stop_waiter in done:
            return None
        raise TimeoutError(f"no Welcome within {self._welcome_timeout_s:g} s")

    async def _raise_stream_error(self, call: Any, *tasks: asyncio.Task[Any]) -> None:
        """Turn the end of a stream into the right exception (auth refusal is final)."""
        if call.done():
            code = await call.code()
            self._raise_if_refused(code, await call.details())
        for task in tasks:
            if task.done() and not task.cancelled():
                error = task.exception()
                if error is not None:
                    raise error

    def _raise_if_refused(self, code: Any, details: Any) -> None:
        if code in _REFUSED:
            log.error(
                "agent_auth_failed",
                controller=self._controller,
                code=code.name,
                details=str(details),
                hint="check --api-key / LLM_LOADTEST_API_KEY and the key's role",
            )
            raise AgentAuthError(f"controller refused this agent: {code.name}: {details}")

    async def _close_gracefully(
        self,
        call: Any,
        outbound: _Outbound,
        reader: asyncio.Task[None],
        writer: asyncio.Task[None],
        heartbeat: asyncio.Task[None],
    ) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._shutdown_grace_s
        drain = asyncio.create_task(self._drain(outbound, deadline), name="drain")
        try:
            await asyncio.wait({drain, reader, writer}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not drain.done():
                drain.cancel()
                await asyncio.wait({drain})
        if reader.done() or writer.done():
            return  # the stream broke while draining; nothing more can be delivered
        heartbeat.cancel()
        writer.cancel()
        await asyncio.wait({heartbeat, writer})
        # Say goodbye (a departure, not a loss), half-close and let the controller end the
        # stream, so nothing written is lost to an abrupt cancel; bounded, since a
        # controller may not answer.
        with contextlib.suppress(Exception):
            await call.write(ConnectRequest(goodbye=agent_service_pb2.Goodbye(reason="agent shutting down")))
            await call.done_writing()
            await asyncio.wait({reader}, timeout=max(deadline - loop.time(), 0.5))

    async def _drain(self, outbound: _Outbound, deadline: float) -> None:
        """Stop the load, get every message written and every batch acked (bounded)."""
        loop = asyncio.get_running_loop()
        await self._stop_assignments(timeout_s=max(deadline - loop.time(), 0.1))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(deadline):
                await outbound.queue.join()
                while not all(r.batcher.all_acked for r in self._assignments.values()):
                    self._acked.clear()
                    await self._acked.wait()
        unacked = sum(r.batcher.unacked_batches for r in self._assignments.values())
        if unacked:
            log.warning("agent_shutdown_unacked", unacked_batches=unacked)

    async def _stop_assignments(self, timeout_s: float | None = None) -> None:
        runners = [r for r in self._assignments.values() if not r.finished]
        for runner in runners:
            runner.cancel("agent shutting down")
        tasks = [r.task for r in runners if r.task is not None and not r.task.done()]
        if tasks:
            # asyncio.wait, not gather: if we are cancelled, the assignments must still
            # finish their own shutdown rather than be cancelled from here.
            await asyncio.wait(tasks, timeout=timeout_s)

    # --- the three stream tasks ------------------------------------------------------

    async def _write_loop(self, call: Any, queue: asyncio.Queue[agent_service_pb2.ConnectRequest]) -> None:
        while True:
            message = await queue.get()
            announced: asyncio.Future[None] | None = None
            if message.HasField("assignment_update"):
                entry = self._announcing.get(message.assignment_update.assignment_id)
                if entry is not None and entry[0] is message:
                    # From here on, new requests need a new announcement.
                    del self._announcing[message.assignment_update.assignment_id]
                    announced = entry[1]
            try:
                await call.write(message)
            finally:
                queue.task_done()
                if announced is not None and not announced.done():
                    announced.set_result(None)

    async def announce(self, runner: AssignmentRunner) -> None:
        """Tell the controller how many requests `runner` has sent, before the newest one
        goes out: returns once the count is written to the stream (or at once while
        disconnected). Requests arriving while an announcement waits share it, so at high
        rates this costs one write per writer turn, not one per request. A controller that
        loses this agent can then count what it sent but never reported."""
        outbound = self._outbound
        if outbound is None:
            return
        entry = self._announcing.get(runner.assignment_id)
        if entry is None:
            message = ConnectRequest(assignment_update=runner.current_update())
            future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._announcing[runner.assignment_id] = (message, future)
            outbound.queue.put_nowait(message)
        else:
            message, future = entry
            message.assignment_update.requests_sent = runner.requests_sent
        await asyncio.shield(future)

    def _release_announcements(self) -> None:
        for _, future in self._announcing.values():
            if not future.done():
                future.set_result(None)
        self._announcing.clear()

    async def _lease_watchdog(self) -> None:
        """Stop running assignments once the lease expires (no word from the controller)."""
        while True:
            await asyncio.sleep(0.05)
            if self.lease.valid():
                continue
            running = [r for r in self._assignments.values() if not r.finished]
            for runner in running:
                if not runner.cancelling:
                    log.warning(
                        "agent_lease_expired", assignment_id=runner.assignment_id, lease_s=self.lease.duration_s
                    )
                    runner.cancel(f"lease expired: no word from the controller for {self.lease.duration_s:g} s")

    async def _read_loop(self, call: Any) -> None:
        while True:
            message = await call.read()
            if message is grpc.aio.EOF:
                return
            self.lease.renew()
            self.handle_response(message)

    async def _heartbeat_loop(self, queue: asyncio.Queue[agent_service_pb2.ConnectRequest], interval_s: float) -> None:
        # A quick burst first: the controller's clock offset estimate keeps the exchange
        # with the least round trip, and it places agents once it has a few of them.
        for _ in range(CLOCK_BURST):
            queue.put_nowait(self.heartbeat())
            await asyncio.sleep(min(CLOCK_BURST_INTERVAL_S, interval_s))
        while True:
            queue.put_nowait(self.heartbeat())
            await asyncio.sleep(interval_s)

    # --- messages --------------------------------------------------------------------

    def hello(self) -> agent_service_pb2.ConnectRequest:
        """The first message of a stream."""
        return ConnectRequest(
            hello=agent_service_pb2.Hello(
                name=self._name,
                labels=self._labels,
                version=__version__,
                active_assignment_ids=[r.assignment_id for r in self._assignments.values() if not r.finished],
                # Every assignment held, finished ones too: their replays need the proof as well.
                resume_tokens={r.assignment_id: r.resume_token for r in self._assignments.values()},
            )
        )

    def heartbeat(self) -> agent_service_pb2.ConnectRequest:
        """A heartbeat with the agent clock and health since the previous one."""
        agent_time = timestamp_pb2.Timestamp()
        agent_time.FromNanoseconds(time.time_ns())
        return ConnectRequest(
            heartbeat=agent_service_pb2.Heartbeat(
                agent_time=agent_time,
                health=run_pb2.AgentHealth(
                    event_loop_lag_ms=self._lag.take_max_ms(),
                    cpu_percent=self._cpu.take_percent(),
                    in_flight=sum(r.in_flight for r in self._assignments.values()),
                ),
                clock_sample=self._clock_sample,
            )
        )

    def send(self, message: agent_service_pb2.ConnectRequest) -> None:
        """Queue a message on the live stream; dropped while disconnected.

        Dropping is safe: batches stay in their batcher until acked and final updates are
        kept by their runner, and both are replayed on the next connection.
        """
        if self._observer is not None:
            self._observer.on_send(message)
        if self._outbound is not None:
            self._outbound.queue.put_nowait(message)

    def handle_response(self, message: agent_service_pb2.ConnectResponse) -> None:
        """Act on one controller message."""
        kind = message.WhichOneof("body")
        if kind == "assign":
            self._on_assign(message.assign)
        elif kind == "cancel":
            self._on_cancel(message.cancel)
        elif kind == "ack":
            self._on_ack(message.ack)
        elif kind == "preflight":
            task = asyncio.create_task(self._preflight(message.preflight), name="preflight")
            self._preflights.add(task)
            task.add_done_callback(self._preflights.discard)
        elif kind == "heartbeat_ack":
            ack = message.heartbeat_ack
            self._clock_sample = agent_service_pb2.ClockSample(
                agent_send_unix_ns=ack.agent_send_unix_ns,
                controller_receive_unix_ns=ack.controller_receive_unix_ns,
                controller_send_unix_ns=ack.controller_send_unix_ns,
                agent_receive_unix_ns=time.time_ns(),
            )
        else:
            log.warning("agent_unexpected_message", kind=kind)

    def _on_assign(self, assign: agent_service_pb2.Assign) -> None:
        assignment_id = assign.assignment_id
        existing = self._assignments.get(assignment_id)
        if existing is not None:
            # A repeated Assign (e.g. after a reconnect): report where it stands.
            self.send(ConnectRequest(assignment_update=existing.current_update()))
            return
        if not assignment_id or self._stop.is_set():
            self.send(
                ConnectRequest(
                    assignment_update=agent_service_pb2.AssignmentUpdate(
                        assignment_id=assignment_id,
                        state=agent_service_pb2.ASSIGNMENT_STATE_FAILED,
                        message="agent is shutting down" if assignment_id else "assignment_id is required",
                    )
                )
            )
            return
        runner = AssignmentRunner(
            assign, self.send, anchor=self._anchor, lease=self.lease, announce=self.announce, datasets=self.datasets
        )
        self._assignments[assignment_id] = runner
        runner.start().add_done_callback(_log_task_failure)
        self._prune_finished()

    async def _preflight(self, preflight: agent_service_pb2.Preflight) -> None:
        """Check the target and answer the controller."""
        outcome = await check_target(preflight.target, preflight.workload, self.datasets)
        log.info(
            "preflight_done",
            run_id=preflight.run_id,
            ok=outcome.ok,
            message=outcome.message,
            response_model=outcome.response_model,
        )
        self.send(
            ConnectRequest(
                preflight_result=agent_service_pb2.PreflightResult(
                    preflight_id=preflight.preflight_id,
                    ok=outcome.ok,
                    message=outcome.message,
                    served_models=outcome.served_models,
                    response_model=outcome.response_model,
                    usage_prompt_tokens=outcome.usage_prompt_tokens,
                    counted_prompt_tokens=outcome.counted_prompt_tokens,
                )
            )
        )

    def _on_cancel(self, cancel: agent_service_pb2.Cancel) -> None:
        runner = self._assignments.get(cancel.assignment_id)
        if runner is None:
            # Never seen, or already fully acked: tell the controller there is nothing left.
            self.send(
                ConnectRequest(
                    assignment_update=agent_service_pb2.AssignmentUpdate(
                        assignment_id=cancel.assignment_id,
                        state=agent_service_pb2.ASSIGNMENT_STATE_CANCELLED,
                        message="assignment not running on this agent",
                    )
                )
            )
        elif runner.finished:
            self.send(ConnectRequest(assignment_update=runner.current_update()))
        else:
            runner.cancel(cancel.reason)

    def _on_ack(self, ack: agent_service_pb2.Ack) -> None:
        runner = self._assignments.get(ack.assignment_id)
        if runner is None:
            return
        runner.ack(ack.batch_seq)
        if runner.released:
            del self._assignments[ack.assignment_id]
        self._acked.set()

    def _prune_finished(self) -> None:
        finished = [r for r in self._assignments.values() if r.finished]
        for runner in finished[: max(len(finished) - MAX_RETAINED_FINISHED, 0)]:
            log.warning(
                "assignment_dropped_unacked",
                assignment_id=runner.assignment_id,
                unacked_batches=runner.batcher.unacked_batches,
            )
            del self._assignments[runner.assignment_id]


def _log_task_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("assignment_task_failed", task=task.get_name(), error=repr(task.exception()))


async def run_agent(
    controller: str,
    name: str,
    labels: dict[str, str],
    api_key: str | None,
    stop: asyncio.Event,
    observer: LinkObserver | None = None,
    channel_factory: ChannelFactory = _insecure_channel,
) -> None:
    """Run an agent in the current event loop until `stop` is set.

    Raises `AgentAuthError` if the controller refuses `api_key`. `channel_factory` opens the
    channel (e.g. with TLS credentials, see common/tls.py).
    """
    link = ControllerLink(
        controller,
        name=name,
        labels=labels,
        api_key=api_key,
        stop=stop,
        observer=observer,
        channel_factory=channel_factory,
    )
    await link.run()
