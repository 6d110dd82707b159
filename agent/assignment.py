"""One assignment on this agent: the load path wired together, and its lifecycle.

`AssignmentRunner` owns what an `Assign` needs: a `LoadSchedule` (when), a `TargetClient`
(how), a `PromptSource` (what: synthetic prompts or dataset entries) and a `SampleBatcher`
(where samples go). A trace_replay stage has a `TraceSchedule` (agent.trace) instead, which
hands each request its own prompt; a conversation workload a `ConversationLoad` whose
sessions send their turns (agent.conversation). The workload's uploaded dataset, tokenizer
and trace come from the link's `DatasetCache` before the load starts. Its lifecycle:

1. `start()` runs it as a task and emits `AssignmentUpdate(RUNNING)`.
2. A closed loop first opens its connections (`TargetClient.preconnect`, one per worker),
   so that the first request of each worker does not pay for a TCP/TLS handshake inside
   its TTFT. It then waits for the stage's common start time (`Assign.start_unix_ns`, in
   the controller's clock, minus this agent's estimated clock offset), reports RUNNING with
   the time it actually started, and the schedule runs this agent's share of the stage; each
   request waits for batcher backpressure, checks the `Lease` (an expired lease cancels the
   assignment instead of sending), is announced to the controller, is sent, and its sample
   (with its warmup flag) is added to the batcher (also when the request is cancelled). An open-loop arrival
   the stage could not send before it ended becomes a `cancelled` sample. A conversation
   workload runs sessions instead (`agent.conversation`): the schedule starts sessions, each
   sends its turns through the same request path, its samples carrying the session and turn.
   While the target refuses connections, requests back off and go one at a time; when it
   has refused them for the target's `unreachable_timeout` the load stops and the
   assignment FAILS with that reason (`agent.reachability`). Stretches in which no request
   could be sent and nothing came back are noted as stalls (`agent.stalls`).
3. When the schedule ends (or fails, or `cancel()` cancels it), the batcher is flushed and
   a final `AssignmentUpdate` (COMPLETED, FAILED or CANCELLED) carries `batch_count`, so
   the controller knows which batches to expect, `requests_sent` and the stalls.
4. The runner then stays registered with the session until the controller has acked every
   batch *and* sent an ack after the final update (`released`), so that after a reconnect
   its unacked batches and its final update can be replayed (`replay_messages()`).

The runner never touches the gRPC stream: everything it reports goes through `emit`, which
the session points at the current connection's outbound queue (or drops while disconnected;
the replay covers what was dropped).
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import time
from collections.abc import Awaitable, Callable
from typing import TypeAlias
from urllib.parse import urlsplit

import structlog

from agent.batcher import SampleBatcher
from agent.conversation import (
    ConversationEngine,
    ConversationLoad,
    TurnRequest,
    conversation_load,
    conversation_source,
    count_tokens_with,
    is_conversation,
)
from agent.datasets import DatasetCache, DatasetFetchError
from agent.gcload import load_thresholds
from agent.prompts import Prompt, PromptSource, PromptSourceError, prompt_source
from agent.reachability import TargetReachability
from agent.sample import MAX_ERROR_CHARS, PROCESS_CLOCK_ANCHOR, ClockAnchor, RequestSample
from agent.scheduler import ClosedLoopSchedule, LoadSchedule, UnsupportedStageError, schedule_for_stage
from agent.scrape import ServerMetricsScraper
from agent.stalls import STALL_POLL_S, Stall, StallWatch
from agent.target_client import TargetClient, TargetConfigError
from agent.tokens import estimate_output_tokens, load_tokenizer
from agent.trace import TraceSchedule, fetch_trace, trace_schedule
from common import codes
from common.durations import seconds
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from common.spec_defaults import unreachable_timeout_s
from common.tokenizer import Tokenizer

log = structlog.get_logger(__name__)

Emit = Callable[[agent_service_pb2.ConnectRequest], None]
Announce = Callable[["AssignmentRunner"], Awaitable[None]]
AssignmentState: TypeAlias = agent_service_pb2.AssignmentState.ValueType

# Pre-opening thousands of connections would itself be the burst it is meant to avoid.
MAX_PRECONNECT = 1024
# Bounds how much later than its Assign the stage can start; connections not open by then
# are opened by the first requests, as without pre-connecting.
PRECONNECT_TIMEOUT_S = 2.0

# How long before the start time to stop sleeping and yield to the loop until it is reached.
# Zero: a plain timer wakes close to its time, while several agents busy-waiting on a machine
# with few cores delay each other by a scheduler time slice (BENCHMARKS.md, "Figures behind
# constants in the code").
START_SPIN_S = 0.0
# With this much time left before the start, collect garbage first (and not at the start).
START_GC_MARGIN_S = 0.1
START_LATE_WARN_MS = 5.0


class Lease:
    """How long this agent may keep firing without hearing from its controller.

    The session renews it on every message from the controller; `duration_s` None means
    no lease (a controller that does not grant one).
    """

    def __init__(self, duration_s: float | None = None) -> None:
        self.duration_s = duration_s
        self._renewed = time.monotonic()

    def configure(self, duration_s: float | None) -> None:
        """Set the lease length (from the controller's Welcome)."""
        self.duration_s = duration_s

    def renew(self) -> None:
        """The controller was heard from just now."""
        self._renewed = time.monotonic()

    def valid(self) -> bool:
        """False once `duration_s` passed without a renewal."""
        return self.duration_s is None or time.monotonic() - self._renewed < self.duration_s


class AssignmentRunner:
    """Runs one `Assign` and keeps its results until the controller has them."""

    def __init__(
        self,
        assign: agent_service_pb2.Assign,
        emit: Emit,
        *,
        anchor: ClockAnchor = PROCESS_CLOCK_ANCHOR,
        batcher: SampleBatcher | None = None,
        lease: Lease | None = None,
        announce: Announce | None = None,
        datasets: DatasetCache | None = None,
    ) -> None:
        self._assign = assign
        # Uploaded datasets, traces and tokenizers by id (agent/datasets.py), shared by the
        # process's assignments; None where no controller can be asked (unit tests).
        self.datasets = datasets
        self._tokenizer: Tokenizer | None = None
        self._emit = emit
        self._lease = lease or Lease()
        self._announce = announce
        self._start_unix_ns = 0
        self._batcher = batcher or SampleBatcher(assign.assignment_id, self._emit_batch, anchor=anchor)
        self._task: asyncio.Task[None] | None = None
        self._load_task: asyncio.Task[None] | None = None
        self._client: TargetClient | None = None
        self._prompts: PromptSource | None = None
        self._conversations: ConversationEngine | None = None
        self._cancel_reason: str | None = None
        self._in_flight = 0
        self._requests_sent = 0
        self._requests_abandoned = 0
        self._final_update: agent_service_pb2.AssignmentUpdate | None = None
        self._acked_after_final = False
        self._scraper: ServerMetricsScraper | None = None
        self._anchor = anchor
        self._fail_reason: str | None = None
        self._reach = TargetReachability(unreachable_timeout_s(assign.target), self._target_dead)
        # Activity for the stall watch: the last send or completion, and the requests in flight.
        self._last_activity_ns = 0
        self._in_flight_samples: dict[int, RequestSample] = {}
        self._stalls: list[Stall] = []
        self._load_start_ns = 0

    @property
    def assignment_id(self) -> str:
        """The assignment's id."""
        return self._assign.assignment_id

    @property
    def resume_token(self) -> str:
        """The secret of the Assign; presented in Hello to resume the assignment."""
        return self._assign.resume_token

    @property
    def batcher(self) -> SampleBatcher:
        """The assignment's batcher."""
        return self._batcher

    @property
    def in_flight(self) -> int:
        """Requests in flight now."""
        return self._in_flight

    @property
    def requests_sent(self) -> int:
        """Requests handed to the HTTP client so far."""
        return self._requests_sent

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The running task, once started."""
        return self._task

    @property
    def cancelling(self) -> bool:
        """True once `cancel()` was called."""
        return self._cancel_reason is not None

    @property
    def finished(self) -> bool:
        """True once the final update has been produced."""
        return self._final_update is not None

    @property
    def final_update(self) -> agent_service_pb2.AssignmentUpdate | None:
        """The final update (COMPLETED, FAILED or CANCELLED), once finished."""
        return self._final_update

    @property
    def released(self) -> bool:
        """Finished, every batch acked, and an ack received after the final update."""
        return self.finished and self._acked_after_final and self._batcher.all_acked

    def start(self) -> asyncio.Task[None]:
        """Start running the assignment as a task (reports RUNNING)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"assignment-{self.assignment_id}")
        return self._task

    def cancel(self, reason: str) -> None:
        """Cancel in-flight requests and stop; the runner then reports CANCELLED."""
        if self._cancel_reason is None:
            self._cancel_reason = reason or "cancelled"
        if self._load_task is not None:
            self._load_task.cancel()

    def _target_dead(self, reason: str) -> None:
        """The target refused connections too long: stop the load, the assignment fails."""
        if self._fail_reason is None and self._cancel_reason is None:
            self._fail_reason = reason
            log.warning("target_unreachable", assignment_id=self.assignment_id, reason=reason)
            if self._load_task is not None:
                self._load_task.cancel()

    def ack(self, batch_seq: int) -> None:
        """The controller committed every batch with batch_seq <= `batch_seq`."""
        self._batcher.ack(batch_seq)
        if self._final_update is not None and batch_seq >= self._final_update.batch_count:
            self._acked_after_final = True

    def current_update(self) -> agent_service_pb2.AssignmentUpdate:
        """The final update when finished, else a RUNNING update with progress."""
        if self._final_update is not None:
            return self._final_update
        return agent_service_pb2.AssignmentUpdate(
            assignment_id=self.assignment_id,
            state=agent_service_pb2.ASSIGNMENT_STATE_RUNNING,
            batch_count=self._batcher.batch_count,
            requests_sent=self._requests_sent,
            start_unix_ns=self._start_unix_ns,
        )

    def replay_messages(self) -> list[agent_service_pb2.ConnectRequest]:
        """What a new connection must carry: unacked batches in order, then the final update."""
        messages = [agent_service_pb2.ConnectRequest(sample_batch=batch) for batch in self._batcher.unacked()]
        if self._final_update is not None:
            messages.append(agent_service_pb2.ConnectRequest(assignment_update=self._final_update))
        return messages

    def _emit_batch(self, batch: agent_service_pb2.SampleBatch) -> None:
        self._emit(agent_service_pb2.ConnectRequest(sample_batch=batch))

    async def _run(self) -> None:
        assign = self._assign
        self._emit(agent_service_pb2.ConnectRequest(assignment_update=self.current_update()))
        log.info(
            "assignment_started",
            assignment_id=assign.assignment_id,
            run_id=assign.run_id,
            stage_index=assign.stage_index,
            load=assign.stage.WhichOneof("load"),
            concurrency=assign.stage.concurrency,
            request_rate=assign.stage.request_rate,
            duration_s=seconds(assign.stage.duration),
            requests=assign.stage.requests,
            model=assign.target.model,
            # Host only: a base URL may carry credentials in its user-info part.
            target_host=urlsplit(assign.target.base_url).hostname,
        )
        flusher = asyncio.create_task(self._batcher.run(), name="sample-flusher")
        state: AssignmentState = agent_service_pb2.ASSIGNMENT_STATE_CANCELLED
        message = "agent stopped"
        try:
            tokenizer = await load_tokenizer(assign.workload, self.datasets)
            self._tokenizer = tokenizer
            schedule: LoadSchedule | ConversationLoad | TraceSchedule
            if assign.stage.WhichOneof("load") == "trace_replay":
                schedule = await self._trace_schedule(tokenizer)
            elif is_conversation(assign.workload):
                entries = await self._dataset_entries()
                schedule = conversation_load(assign.stage, assign.workload.seed)
                source = conversation_source(assign.workload, assign.target, entries, tokenizer)
                self._conversations = ConversationEngine(
                    source, self._send_turn, self._abandon_one, count_tokens_with(tokenizer)
                )
            else:
                # An uploaded dataset may be large: it is fetched, and every prompt source
                # prepared (counted with the tokenizer), on a thread, not on the loop that must
                # keep heartbeating.
                entries = await self._dataset_entries()
                schedule = schedule_for_stage(assign.stage, assign.workload.seed)
                self._prompts = await asyncio.to_thread(prompt_source, assign.workload, entries, tokenizer)
            self._client = TargetClient(
                assign.target,
                ignore_eos=assign.workload.ignore_eos,
                pin_min_tokens=assign.workload.pin_min_tokens,
            )
            if assign.server_metrics.endpoints:
                # The first scrape is the stage's counter baseline: taken before any request.
                self._scraper = ServerMetricsScraper(
                    assign.server_metrics,
                    self._batcher.add_server_scrape,
                    insecure_skip_verify=assign.target.insecure_skip_verify,
                    clock=lambda: self._anchor.to_unix_ns(time.perf_counter_ns()),  # the samples' clock
                )
                await self._scraper.start()
            self._load_task = asyncio.create_task(self._load(schedule, self._client), name="load")
            if self._cancel_reason is not None:  # cancelled before the load began
                self._load_task.cancel()
            await self._load_task
            if self._scraper is not None:
                await self._scraper.stop()  # the last scrape closes the stage's counter window
            state, message = agent_service_pb2.ASSIGNMENT_STATE_COMPLETED, ""
            if self._requests_abandoned:
                message = (
                    f"{self._requests_abandoned} requests due before the end of the stage were not sent "
                    "(held back by max_concurrency or an agent that could not keep up)"
                )
        except asyncio.CancelledError:
            state = agent_service_pb2.ASSIGNMENT_STATE_CANCELLED
            message = self._cancel_reason or "agent stopped"
            if self._fail_reason is not None and self._cancel_reason is None:
                state, message = agent_service_pb2.ASSIGNMENT_STATE_FAILED, self._fail_reason
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # our own task is being cancelled, not just the load: propagate
            # Otherwise the CancelledError is the load task's, caused by cancel(): done.
        except (
            UnsupportedStageError,
            TargetConfigError,
            PromptSourceError,
            DatasetFetchError,
        ) as exc:
            state, message = agent_service_pb2.ASSIGNMENT_STATE_FAILED, str(exc)
        except Exception as exc:
            log.exception("assignment_error", assignment_id=assign.assignment_id)
            state = agent_service_pb2.ASSIGNMENT_STATE_FAILED
            message = f"{type(exc).__name__}: {exc}"[:MAX_ERROR_CHARS]
        finally:
            flusher.cancel()
            if self._load_task is not None and not self._load_task.done():
                self._load_task.cancel()
            if self._scraper is not None:
                self._scraper.cancel()
            # Synchronous first: even if this task is cancelled again while closing the
            # client below, the samples and the final update are already on their way.
            self._batcher.flush()
            self._finish(state, message)
            if self._scraper is not None:
                await self._scraper.close()
            if self._client is not None:
                await self._client.close()

    async def _dataset_entries(self) -> list[run_pb2.DatasetEntry]:
        """The Assign's dataset entries; for an uploaded dataset (`Dataset.dataset_id`, sent
        without entries), fetched and parsed here with the run's `all_turns` and word filters."""
        workload = self._assign.workload
        if (
            workload.WhichOneof("source") != "dataset"
            or not workload.dataset.dataset_id
            or self._assign.dataset_entries
        ):
            return list(self._assign.dataset_entries)
        dataset = workload.dataset
        if self.datasets is None:
            raise DatasetFetchError(f"dataset {dataset.dataset_id}: this agent has no controller to fetch it from")
        return await self.datasets.entries(
            dataset.dataset_id,
            fmt=dataset.format,
            all_turns=dataset.all_turns,
            min_prompt_words=dataset.min_prompt_words,
            max_prompt_words=dataset.max_prompt_words,
        )

    async def _trace_schedule(self, tokenizer: Tokenizer | None) -> TraceSchedule:
        """This agent's share of a trace_replay stage (the trace fetched and parsed)."""
        assign = self._assign
        trace = assign.workload.trace
        if assign.workload.WhichOneof("source") != "trace" or not trace.dataset_id:
            raise UnsupportedStageError("a trace_replay stage needs a trace workload (workload.trace.dataset_id)")
        entries = await fetch_trace(self.datasets, trace.dataset_id)
        return await asyncio.to_thread(
            trace_schedule,
            assign.stage,
            trace,
            entries,
            seed=assign.workload.seed,
            share_index=assign.share_index,
            share_count=assign.share_count,
            tokenizer=tokenizer,
        )

    def _trace_origin_ns(self) -> int:
        """The stage's start (trace time 0) on the perf clock: the Assign's start time, which
        for a takeover is the stage's original start (already past)."""
        if not self._assign.start_unix_ns:
            return time.perf_counter_ns()
        # The pair of readings least apart of a few (a preemption between them would shift every time).
        best = None
        for _ in range(3):
            before, unix, after = time.perf_counter_ns(), time.time_ns(), time.perf_counter_ns()
            if best is None or after - before < best[0]:
                best = (after - before, (before + after) // 2, unix)
        assert best is not None
        _, now_perf, now_unix = best
        return now_perf - (now_unix - (self._assign.start_unix_ns - self._assign.clock_offset_ns))

    async def _load(self, schedule: LoadSchedule | ConversationLoad | TraceSchedule, client: TargetClient) -> None:
        closed_loop = schedule.concurrency if isinstance(schedule, ClosedLoopSchedule | ConversationLoad) else 0
        if closed_loop:
            opened = await client.preconnect(min(closed_loop, MAX_PRECONNECT), PRECONNECT_TIMEOUT_S)
            log.debug("preconnected", assignment_id=self.assignment_id, connections=opened)
        await self._wait_for_start()
        self._start_unix_ns = time.time_ns()
        if self._assign.start_unix_ns:  # a synchronized start: report when it really began
            self._emit(agent_service_pb2.ConnectRequest(assignment_update=self.current_update()))
        self._load_start_ns = self._last_activity_ns = time.perf_counter_ns()
        stage = self._assign.stage
        window_ns = stage.duration.ToNanoseconds() if stage.HasField("duration") else 0
        watch = StallWatch(self._load_start_ns + window_ns if window_ns > 0 else None)
        watcher = asyncio.create_task(self._watch_stalls(watch), name="stall-watch")
        try:
            with load_thresholds():
                if isinstance(schedule, ConversationLoad):
                    assert self._conversations is not None
                    await self._conversations.run(schedule)
                elif isinstance(schedule, TraceSchedule):
                    schedule = dataclasses.replace(schedule, origin_ns=self._trace_origin_ns())
                    await schedule.run(self._send_one, self._abandon_one)
                else:
                    await schedule.run(self._send_one, self._abandon_one)
        finally:
            watcher.cancel()
            self._stalls = watch.finish(time.perf_counter_ns())

    async def _watch_stalls(self, watch: StallWatch) -> None:
        """Poll the assignment's activity for stalls (off the request path)."""
        while True:
            await asyncio.sleep(STALL_POLL_S)
            activity = self._last_activity_ns
            for sample in self._in_flight_samples.values():
                # Its send counts from `sent_ns` (a refused one is in flight for well under
                # a poll interval, and counts nothing when it ends).
                activity = max(activity, sample.sent_ns, sample.first_byte_ns, sample.last_token_ns)
            watch.observe(time.perf_counter_ns(), activity, len(self._in_flight_samples))

    async def _wait_for_start(self) -> None:
        """Wait for the stage's common start time (controller clock, corrected by the offset
        the controller estimated for this agent); a start time already past starts at once."""
        if not self._assign.start_unix_ns:
            return
        target_ns = self._assign.start_unix_ns - self._assign.clock_offset_ns
        lead_s = (target_ns - time.time_ns()) / 1e9
        if lead_s > START_GC_MARGIN_S:
            gc.collect()  # now rather than as a pause of tens of ms at the start time
        gc.disable()
        try:
            delay_s = (target_ns - time.time_ns()) / 1e9
            if delay_s > START_SPIN_S:
                await asyncio.sleep(delay_s - START_SPIN_S)
            while time.time_ns() < target_ns:  # noqa: ASYNC110 - a few ms of precise waiting
                await asyncio.sleep(0)
        finally:
            gc.enable()
        late_ms = (time.time_ns() - target_ns) / 1e6
        if late_ms > START_LATE_WARN_MS and not self._assign.takeover:
            log.warning(
                "assignment_started_late",
                assignment_id=self.assignment_id,
                late_ms=round(late_ms, 3),
                lead_ms=round(lead_s * 1000, 3),
            )

    async def _send_one(self, scheduled_ns: int, warmup: bool, prompt: Prompt | None = None) -> None:
        """One request; `prompt` is the trace request's, else the prompt source's next."""
        await self._send_request(scheduled_ns, warmup, None, prompt)

    async def _send_turn(self, scheduled_ns: int, warmup: bool, turn: TurnRequest) -> RequestSample | None:
        return await self._send_request(scheduled_ns, warmup, turn)

    async def _send_request(
        self, scheduled_ns: int, warmup: bool, turn: TurnRequest | None, prompt: Prompt | None = None
    ) -> RequestSample | None:
        """One request (a conversation's `turn`, a trace request's `prompt`, else the prompt
        source's next); its sample, None if it was not sent (the lease expired)."""
        assert self._client is not None  # set before the schedule starts
        await self._batcher.wait_writable()
        if not self._lease.valid():
            # Checked per request: after a freeze (SIGSTOP) overdue requests would otherwise
            # go out before the session's lease watchdog gets to run.
            self.cancel(f"lease expired: no word from the controller for {self._lease.duration_s:g} s")
            await asyncio.sleep(0)  # the load task is cancelled here
            return None
        reach = self._reach
        probe = await reach.wait_turn() if reach.refusing else False
        if turn is not None:
            prompt = turn.prompt
        elif prompt is None:
            assert self._prompts is not None
            prompt = self._prompts.next_prompt()
        sample = RequestSample(
            scheduled_ns=scheduled_ns,
            warmup=warmup,
            requested_input_tokens=prompt.input_tokens,
            requested_output_tokens=prompt.max_tokens,
        )
        if turn is not None:
            sample.session_id, sample.turn_index, sample.last_turn = turn.session_id, turn.turn_index, turn.last_turn
            sample.answer_chunks = []
        elif self._tokenizer is not None:
            sample.answer_chunks = []  # the text counted when the server sends no usage
        self._in_flight += 1
        self._requests_sent += 1
        in_flight = self._in_flight_samples
        in_flight[id(sample)] = sample
        try:
            if self._announce is not None:
                await self._announce(self)
            await self._client.send(prompt.text, prompt.max_tokens, sample, messages=prompt.messages)
            if self._tokenizer is not None:
                estimate_output_tokens(sample, self._tokenizer)
            if probe or sample.connect_failed or reach.refusing:
                reach.outcome(sample.connect_failed, sample.error, probe)
        except asyncio.CancelledError:
            if probe:
                reach.probe_abandoned()
            if sample.status == run_pb2.REQUEST_STATUS_UNSPECIFIED:
                # Cancelled while announcing, before the client had it: never sent.
                sample.sent_ns = sample.done_ns = time.perf_counter_ns()
                sample.fail(run_pb2.REQUEST_STATUS_CANCELLED, "cancelled before it was sent")
            raise
        finally:
            # Also on cancellation: the client has marked the sample `cancelled`.
            self._in_flight -= 1
            del in_flight[id(sample)]
            if not sample.connect_failed:
                # A request refused before it was sent (the server stopped listening) is not
                # activity: its retries must not hide a stall (agent/stalls.py).
                self._last_activity_ns = time.perf_counter_ns()
            self._batcher.add(sample)
        return sample

    def _abandon_one(self, scheduled_ns: int, warmup: bool, session_id: int = 0) -> None:
        # Never sent: `sent` is when it was given up, so its queue delay is how long it
        # waited, and nothing happened after it.
        now = time.perf_counter_ns()
        sample = RequestSample(scheduled_ns=scheduled_ns, sent_ns=now, done_ns=now, warmup=warmup)
        if session_id:
            sample.session_id, sample.turn_index = session_id, 1
        sample.fail(run_pb2.REQUEST_STATUS_CANCELLED, "not sent: the stage ended while the request was held back")
        self._requests_abandoned += 1
        self._batcher.add(sample)

    def _finish(self, state: AssignmentState, message: str) -> None:
        update = agent_service_pb2.AssignmentUpdate(
            assignment_id=self.assignment_id,
            state=state,
            message=message,
            batch_count=self._batcher.batch_count,
            requests_sent=self._requests_sent,
            start_unix_ns=self._start_unix_ns,
        )
        for stall in self._stalls:
            entry = update.stalls.add(in_flight=stall.in_flight)
            entry.start_offset.FromNanoseconds(max(stall.start_ns - self._load_start_ns, 0))
            entry.length.FromNanoseconds(stall.end_ns - stall.start_ns)
        self._final_update = update
        self._emit(agent_service_pb2.ConnectRequest(assignment_update=update))
        log.info(
            "assignment_finished",
            assignment_id=self.assignment_id,
            state=codes.AssignmentState(state).name.lower(),
            message=message,
            requests_sent=self._requests_sent,
            batch_count=self._batcher.batch_count,
        )
