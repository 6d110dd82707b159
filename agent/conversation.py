"""Multi-turn conversations: sessions of turns, each turn carrying the whole history.

A conversation workload (`Workload.conversation`, or a dataset with `all_turns`) sends
*sessions*. A session is an optional system prompt and T turns; turn k sends the whole
history as chat messages (system, user 1, assistant 1, ..., user k), where every assistant
message is the text the server actually answered in that session (`RequestSample.answer_chunks`,
filled by the stream parser), then waits the turn's think time after the reply ends, then
sends turn k+1. What a session contains is drawn up front, when it starts
(`ConversationSource.next_session()`):

* synthetic (`SyntheticConversations`): T from `turns` (default fixed 3); each turn's user
  prompt from `agent.prompts.PromptGenerator` with the conversation's `input_tokens` and
  `output_tokens` (its `max_tokens`), so turn prompts are built, counted and made unique
  exactly as single prompts are; the system prompt of `system_prompt_tokens` is
  `agent.prompts.shared_prefix()`: the same text in every session of every agent (a fixed
  seed, not the workload's); the think time after each turn from `Workload.think_time`.
  Drawn in session order from the assignment's seed, so session n of an assignment has the
  same content on every repetition of the run, whatever the timing.
* dataset (`DatasetConversations`): entries in a seeded random order, each used once per
  cycle (as `agent.prompts.DatasetPrompts`); an entry's messages before its first user
  message (system prompts) open the history, each user message is a turn, and the length
  in words of the assistant message that follows it in the dataset is that turn's
  `max_tokens` (no such message: the entry's `max_tokens`, else 128); the dataset's
  assistant texts are never sent, the server's replies take their place. System messages
  after the first user message are ignored. An entry without messages is one turn.

Load (`ConversationLoad`, from `conversation_load()`): the stage's schedule decides when
*sessions* start, and each session runs its turns itself. Closed loop: `concurrency`
sessions in progress, a finished session replaced at once by a new one; open loop:
`request_rate` session starts per second (the arrivals of `agent.arrivals`), and
`max_concurrency` caps the sessions in progress. The `TurnGate` applies the stage's limits
to turns: `requests` counts turns (requests), warmup flags a turn as a request is flagged
today (scheduled within `warmup_duration`, or among the first `warmup_requests` turns), and
at the end of the duration no new turn starts while turns in flight finish. A session cut
short by the end of the stage (or by the request budget) just stops: its last sent turn is
not `last_turn`. A session whose next turn would be due after the end stays in progress
(thinking) until the end, so a closed loop does not replace it by a fresh session in the
stage's last seconds. When the budget's last turn is taken the gate's `stop` event is set:
the schedule starts no more sessions, and sessions thinking stop at once.

A turn is due (`scheduled_ns`) when its session started (turn 1) or at the end of the
previous turn's reply plus the think time (turn k > 1): whatever delays it past that
(batcher backpressure, a slow agent) is queue delay, as for single requests.

A failed turn (any status other than OK: an HTTP error, a timeout, a broken stream, a
cancellation) ends its session: the next turn would need the reply that did not come. Its
sample is recorded like any failed request; it is the session's last sample but not
`last_turn` (unless it was the planned final turn).

Samples: `session_id` counts sessions from 1 within the assignment, `turn_index` from 1,
`last_turn` marks the planned final turn of a session; `requested_input_tokens` is the
estimate of the whole request's prompt: system prompt, every user prompt (their
`Prompt.input_tokens`) and every reply (counted by `count_tokens`: words, as
`agent.prompts` counts dataset text; with the workload's tokenizer, its tokens, and then the
system and user prompts are built to exactly their lengths in its tokens too). A session
arrival that the stage could not start before it ended (open loop, held back by the cap) is
recorded as one cancelled turn 1 of a session of its own.

Conversations need the chat API (the controller refuses them for completions at
CreateRun); `conversation_source()` refuses them too.
"""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from agent.prompts import (
    DEFAULT_OUTPUT_TOKENS,
    Prompt,
    PromptGenerator,
    PromptSourceError,
    draw_length,
    shared_prefix,
)
from agent.sample import RequestSample
from agent.scheduler import (
    ClosedLoopSchedule,
    LoadSchedule,
    OpenLoopSchedule,
    RequestBudget,
    Warmup,
    schedule_for_stage,
)
from common.durations import seconds
from common.proto.loadtest.v1 import run_pb2
from common.tokenizer import Tokenizer

DEFAULT_TURNS = 3
Message = dict[str, str]
# Not the workload's seed itself: the session draws (turns, think times) must not shift the
# prompt generator's stream, which is the single-prompt workloads' stream.
_SESSION_SEED = "llm-loadtest sessions"


def count_words(text: str) -> int:
    """Tokens of a text as `agent.prompts` estimates them without a tokenizer: its words."""
    return len(text.split())


def is_conversation(workload: run_pb2.Workload) -> bool:
    """Whether the workload sends sessions of turns rather than single requests."""
    source = workload.WhichOneof("source")
    return source == "conversation" or (source == "dataset" and workload.dataset.all_turns)


def draw_think_ns(rng: random.Random, dist: run_pb2.DurationDistribution) -> int:
    """One think time in ns: fixed, uniform on [min, max], exponential with a mean; 0 unset."""
    kind = dist.WhichOneof("distribution")
    if kind == "fixed":
        value = seconds(dist.fixed)
    elif kind == "uniform":
        low, high = sorted((seconds(dist.uniform.min), seconds(dist.uniform.max)))
        value = rng.uniform(low, high)
    elif kind == "exponential_mean":
        mean = seconds(dist.exponential_mean)
        value = rng.expovariate(1.0 / mean) if mean > 0 else 0.0
    else:
        value = 0.0
    return max(0, int(value * 1e9))


@dataclass(frozen=True, slots=True)
class TurnPlan:
    """One turn of a planned session: its new user prompt and what follows its reply."""

    text: str
    max_tokens: int
    tokens: int  # estimated tokens of `text`
    think_ns: int = 0  # pause after the reply before the next turn


@dataclass(frozen=True, slots=True)
class SessionPlan:
    """A session drawn at its start: the messages that open the history, and its turns."""

    preamble: tuple[Message, ...]
    preamble_tokens: int
    turns: tuple[TurnPlan, ...]


class ConversationSource(Protocol):
    """A stream of planned sessions for one assignment."""

    def next_session(self) -> SessionPlan:
        """The next session's plan."""
        ...


class SyntheticConversations:
    """Sessions of synthetic turns (`Workload.conversation`)."""

    def __init__(self, workload: run_pb2.Workload, tokenizer: Tokenizer | None = None) -> None:
        conversation = workload.conversation
        self._turns = conversation.turns
        self._think = workload.think_time
        self._rng = random.Random(f"{_SESSION_SEED}:{workload.seed}")
        # With a tokenizer the user prompts are exact in its tokens, as single prompts are.
        self._prompts = PromptGenerator(turn_prompt_workload(workload), tokenizer)
        words = conversation.system_prompt_tokens
        system = shared_prefix(words)
        tokens = words
        if words and tokenizer is not None:
            # The shared prefix of that many tokens (the same text on every agent), counted.
            system = PromptGenerator(_system_prompt_workload(words), tokenizer).prefix(0)
            tokens = tokenizer.count(system)
        self._preamble: tuple[Message, ...] = ({"role": "system", "content": system},) if words else ()
        self._preamble_tokens = tokens

    def next_session(self) -> SessionPlan:
        """T turns, each a fresh prompt of the generator and a think time."""
        rng = self._rng
        turns = []
        for _ in range(draw_length(rng, self._turns, DEFAULT_TURNS)):
            prompt = self._prompts.next_prompt()
            turns.append(TurnPlan(prompt.text, prompt.max_tokens, prompt.input_tokens, draw_think_ns(rng, self._think)))
        return SessionPlan(self._preamble, self._preamble_tokens, tuple(turns))


def _system_prompt_workload(tokens: int) -> run_pb2.Workload:
    out = run_pb2.Workload()
    out.synthetic.shared_prefix_tokens = tokens
    return out


def turn_prompt_workload(workload: run_pb2.Workload) -> run_pb2.Workload:
    """The workload whose synthetic prompts are a conversation's user prompts: the same seed
    and every other field, the conversation's lengths as `synthetic` (no shared prefix)."""
    out = run_pb2.Workload()
    out.CopyFrom(workload)
    conversation = workload.conversation
    out.synthetic.SetInParent()  # replaces `conversation` in the source oneof
    out.synthetic.input_tokens.CopyFrom(conversation.input_tokens)
    out.synthetic.output_tokens.CopyFrom(conversation.output_tokens)
    return out


def _entry_session(entry: run_pb2.DatasetEntry, count_tokens: Callable[[str], int]) -> SessionPlan | None:
    """An entry as a session template (think times 0), None without a user turn."""
    fallback = entry.max_tokens or DEFAULT_OUTPUT_TOKENS
    if not entry.messages:
        if not entry.prompt.strip():
            return None
        return SessionPlan((), 0, (TurnPlan(entry.prompt, fallback, count_tokens(entry.prompt)),))
    preamble: list[Message] = []
    texts: list[str] = []
    outputs: list[int] = []
    for message in entry.messages:
        if message.role == "user":
            texts.append(message.content)
            outputs.append(fallback)
        elif not texts:
            preamble.append({"role": message.role, "content": message.content})
        elif message.role == "assistant":
            outputs[-1] = max(1, min(count_words(message.content), 1_000_000))
    if not texts:
        return None
    turns = tuple(TurnPlan(text, out, count_tokens(text)) for text, out in zip(texts, outputs, strict=True))
    return SessionPlan(tuple(preamble), sum(count_tokens(m["content"]) for m in preamble), turns)


class DatasetConversations:
    """Sessions replaying dataset entries turn by turn (`Dataset.all_turns`)."""

    def __init__(
        self,
        entries: Sequence[run_pb2.DatasetEntry],
        workload: run_pb2.Workload,
        count_tokens: Callable[[str], int] = count_words,
    ) -> None:
        sessions = [s for s in (_entry_session(e, count_tokens) for e in entries) if s is not None]
        if not sessions:
            raise PromptSourceError("the workload's dataset has no entry with a user turn")
        self._sessions = sessions
        self._order_rng = random.Random(workload.seed)
        self._rng = random.Random(f"{_SESSION_SEED}:{workload.seed}")
        self._think = workload.think_time
        self._order: list[int] = []
        self._next = 0

    def next_session(self) -> SessionPlan:
        """The next entry of the current permutation (a new permutation after the last)."""
        if self._next >= len(self._order):
            self._order = list(range(len(self._sessions)))
            self._order_rng.shuffle(self._order)
            self._next = 0
        entry = self._sessions[self._order[self._next]]
        self._next += 1
        turns = tuple(dataclasses.replace(t, think_ns=draw_think_ns(self._rng, self._think)) for t in entry.turns)
        return dataclasses.replace(entry, turns=turns)


def conversation_source(
    workload: run_pb2.Workload,
    target: run_pb2.Target,
    dataset_entries: Sequence[run_pb2.DatasetEntry] = (),
    tokenizer: Tokenizer | None = None,
) -> ConversationSource:
    """The session source of a conversation workload (`is_conversation(workload)`); with the
    model's tokenizer, prompts are built and counted with it."""
    if target.api_kind == run_pb2.API_KIND_COMPLETIONS:
        raise PromptSourceError("conversations need the chat API (api_kind chat), not completions")
    if workload.WhichOneof("source") == "dataset":
        return DatasetConversations(dataset_entries, workload, count_tokens_with(tokenizer))
    return SyntheticConversations(workload, tokenizer)


def count_tokens_with(tokenizer: Tokenizer | None) -> Callable[[str], int]:
    """How a conversation counts a text's tokens: with the tokenizer, else its words."""
    return tokenizer.count if tokenizer is not None else count_words


@dataclass(frozen=True, slots=True)
class TurnRequest:
    """What one turn sends: the history and new user prompt as `prompt.messages`, and which
    turn of which session it is."""

    session_id: int
    turn_index: int
    last_turn: bool
    prompt: Prompt


SendTurn = Callable[[int, bool, TurnRequest], Awaitable[RequestSample | None]]
"""Sends one turn due at `scheduled_ns` (warmup or not) and returns its finished sample, or
None when it was not sent (the assignment is stopping)."""

AbandonTurn = Callable[[int, bool, int], None]
"""Records turn 1 of session `session_id`, due at `scheduled_ns`, as never sent."""


class TurnGate:
    """The stage's limits applied to turns: its duration, its request budget, warmup.

    `start(start_ns)` when the stage's schedule starts; `admit(scheduled_ns)` before each
    turn. `stop` is set once the budget is used up (the schedule then starts no session).
    """

    def __init__(self, duration_s: float | None = None, max_requests: int = 0, warmup: Warmup | None = None) -> None:
        self._duration_ns = int(duration_s * 1e9) if duration_s else None
        self._budget = RequestBudget(max_requests)
        self._max_requests = max_requests
        self._warmup = warmup or Warmup()
        self._start_ns = 0
        self.deadline_ns: int | None = None
        self.stop = asyncio.Event()

    @property
    def taken(self) -> int:
        """Turns admitted so far."""
        return self._budget.taken

    def start(self, start_ns: int) -> None:
        """The stage began at `start_ns` (perf_counter_ns)."""
        self._start_ns = start_ns
        self.deadline_ns = start_ns + self._duration_ns if self._duration_ns is not None else None

    def admit(self, scheduled_ns: int) -> bool | None:
        """The warmup flag of a turn due at `scheduled_ns`, or None: not to be sent (the
        stage is over or its budget used up)."""
        if self.stop.is_set() or (self.deadline_ns is not None and scheduled_ns >= self.deadline_ns):
            return None
        if not self._budget.take():
            self.stop.set()
            return None
        if self._max_requests and self._budget.taken >= self._max_requests:
            self.stop.set()  # this is the last turn: sessions waiting to send another stop now
        return self._warmup.applies(self._budget.taken - 1, scheduled_ns - self._start_ns)

    def abandoned(self, scheduled_ns: int) -> bool:
        """Count a turn due at `scheduled_ns` that is recorded as never sent; its warmup flag."""
        self._budget.take()
        return self._warmup.applies(self._budget.taken - 1, scheduled_ns - self._start_ns)

    async def wait_until(self, due_ns: int) -> bool:
        """Sleep until `due_ns` and return True; False when the turn would be due after the
        end of the stage (after sleeping until the end: the session is in progress, thinking,
        until then, so a closed loop does not replace it early) or once the budget is used up
        (at once, also while sleeping)."""
        late = self.deadline_ns is not None and due_ns >= self.deadline_ns
        if late:
            assert self.deadline_ns is not None
            due_ns = self.deadline_ns
        delay_ns = due_ns - time.perf_counter_ns()
        if delay_ns > 0 and not self.stop.is_set():
            try:
                async with asyncio.timeout(delay_ns / 1e9):
                    await self.stop.wait()
            except TimeoutError:
                pass
        return not late and not self.stop.is_set()


@dataclass(frozen=True, slots=True)
class ConversationLoad:
    """A conversation stage: `sessions` says when sessions start, `gate` limits their turns."""

    sessions: LoadSchedule
    gate: TurnGate = field(default_factory=TurnGate)

    @property
    def concurrency(self) -> int:
        """Closed loop: the sessions in progress (0 for an open loop)."""
        return self.sessions.concurrency if isinstance(self.sessions, ClosedLoopSchedule) else 0


def conversation_load(stage: run_pb2.Stage, seed: int = 0) -> ConversationLoad:
    """The stage as sessions: the stage's schedule (see `schedule_for_stage`, which also
    rejects what it cannot run) without its request budget and warmup, which count turns
    and move to the gate. An open loop keeps `requests` as its bound on session arrivals
    (a session has at least one turn)."""
    schedule = schedule_for_stage(stage, seed)
    duration_s = seconds(stage.duration) if stage.HasField("duration") else 0.0
    gate = TurnGate(
        duration_s=duration_s if duration_s > 0 else None,
        max_requests=stage.requests,
        warmup=Warmup(duration_s=max(seconds(stage.warmup_duration), 0.0), requests=stage.warmup_requests),
    )
    sessions: LoadSchedule
    if isinstance(schedule, ClosedLoopSchedule):
        sessions = dataclasses.replace(schedule, max_requests=0, warmup=Warmup())
    else:
        assert isinstance(schedule, OpenLoopSchedule)
        sessions = dataclasses.replace(schedule, warmup=Warmup())
    return ConversationLoad(sessions, gate)


class ConversationEngine:
    """Runs sessions for one assignment: `run(load)` drives the stage's session schedule."""

    def __init__(
        self,
        source: ConversationSource,
        send_turn: SendTurn,
        abandon_turn: AbandonTurn,
        count_tokens: Callable[[str], int] = count_words,
    ) -> None:
        self._source = source
        self._send_turn = send_turn
        self._abandon_turn = abandon_turn
        self._count = count_tokens
        self._gate = TurnGate()
        self._sessions = 0
        self.sessions_in_progress = 0

    @property
    def sessions_started(self) -> int:
        """Sessions begun so far (session ids handed out)."""
        return self._sessions

    async def run(self, load: ConversationLoad) -> None:
        """Run the stage's sessions; return when the last one has ended."""
        self._gate = load.gate
        load.gate.start(time.perf_counter_ns())
        await load.sessions.run(self.run_session, self.abandon_session, load.gate.stop)

    def abandon_session(self, scheduled_ns: int, warmup: bool) -> None:
        """A session arrival the stage ended before it could start."""
        self._sessions += 1
        self._abandon_turn(scheduled_ns, self._gate.abandoned(scheduled_ns), self._sessions)

    async def run_session(self, scheduled_ns: int, _warmup: bool = False) -> None:
        """One session, its first turn due at `scheduled_ns`."""
        self._sessions += 1
        session_id = self._sessions
        plan = self._source.next_session()
        gate = self._gate
        history: list[Message] = list(plan.preamble)
        tokens = plan.preamble_tokens
        due = scheduled_ns
        last = len(plan.turns)
        self.sessions_in_progress += 1
        try:
            for index, turn in enumerate(plan.turns, start=1):
                warmup = gate.admit(due)
                if warmup is None:
                    return
                # The list is sent as it is now (the body is encoded before the send awaits).
                history.append({"role": "user", "content": turn.text})
                prompt = Prompt(
                    text=turn.text, max_tokens=turn.max_tokens, input_tokens=tokens + turn.tokens, messages=history
                )
                sample = await self._send_turn(due, warmup, TurnRequest(session_id, index, index == last, prompt))
                if sample is None or sample.status != run_pb2.REQUEST_STATUS_OK or index == last:
                    return
                reply = "".join(sample.answer_chunks or ())
                history.append({"role": "assistant", "content": reply})
                tokens += turn.tokens + self._count(reply)
                due = sample.done_ns + turn.think_ns
                if not await gate.wait_until(due):
                    return
        finally:
            self.sessions_in_progress -= 1
