"""The preflight check of a run: every agent checks the target before the first stage.

A run's task (`RunExecutor`) calls `check_run_target` once the run has its agents and before
it plans the first stage's start time, so the check's duration never eats into a
synchronized start.
Each agent gets a `Preflight` (the target with its credentials, the workload) and answers
with a `PreflightResult` (agent/preflight.py does the checking); `PreflightAnswers` matches
the answers, which the AgentService servicer hands in, to the waiting check.

The run may start only when every agent's check passed. The first failure, an agent that
goes away, or no answer within the request timeout plus `ANSWER_SLACK_S` fails the run with
a reason naming the agent. A response `model` other than the requested one is a warning
(a run event of kind `preflight_warning`, which the result lists under `warnings`).

Token counts: each answer carries the server's `usage.prompt_tokens` for the check's request
and, with the workload's tokenizer, the check's prompt counted with it. The first answer
with both is kept as a run event of kind `preflight_tokens` (`tokens_event_message`), and
the result's `TokenAccounting` (`token_accounting`) reports their difference as the chat
template's overhead (docs/workloads.md, "Token counts").
"""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from common.proto.loadtest.v1 import agent_service_pb2, run_pb2
from common.spec_defaults import request_timeout_s
from controller.domain.execution.agents import AgentSession

WARNING_EVENT = "preflight_warning"
TOKENS_EVENT = "preflight_tokens"
_TOKENS_MESSAGE = re.compile(r"the check's prompt is (\d+) tokens for the tokenizer; the server counted (\d+)")
# Beyond the check's own request timeout: its GET /models (at most 30 s) and the round trips.
ANSWER_SLACK_S = 40.0
POLL_S = 0.25


class PreflightAnswers:
    """Answers to outstanding Preflight messages, by id and the session that was asked."""

    def __init__(self) -> None:
        self._waiting: dict[str, tuple[str, asyncio.Future[agent_service_pb2.PreflightResult]]] = {}

    def expect(self, preflight_id: str, session_id: str) -> asyncio.Future[agent_service_pb2.PreflightResult]:
        future: asyncio.Future[agent_service_pb2.PreflightResult] = asyncio.get_running_loop().create_future()
        self._waiting[preflight_id] = (session_id, future)
        return future

    def answered(self, session_id: str, result: agent_service_pb2.PreflightResult) -> None:
        """An agent's answer. Unknown or late ones are dropped, and so is an answer from a
        session that was not asked (only the agent that checks the target may say how it went)."""
        waiting = self._waiting.get(result.preflight_id)
        if waiting is None or waiting[0] != session_id:
            return
        del self._waiting[result.preflight_id]
        if not waiting[1].done():
            waiting[1].set_result(result)

    def forget(self, preflight_id: str) -> None:
        waiting = self._waiting.pop(preflight_id, None)
        if waiting is not None:
            waiting[1].cancel()


@dataclass(frozen=True)
class PreflightVerdict:
    """Whether the run may start; why not; what to warn about."""

    ok: bool
    reason: str = ""
    warnings: list[str] = field(default_factory=list)
    # From the first answer with both: the server's usage.prompt_tokens for the check's
    # request, and its prompt counted with the workload's tokenizer (0: unknown).
    usage_prompt_tokens: int = 0
    counted_prompt_tokens: int = 0


async def check_run_target(
    sessions: list[AgentSession],
    run_id: str,
    target: run_pb2.Target,
    workload: run_pb2.Workload,
    answers: PreflightAnswers,
    cancelled: asyncio.Event,
) -> PreflightVerdict:
    """Have every agent check `target` (with its credentials); wait for all the answers."""
    timeout_s = request_timeout_s(target)
    deadline = time.monotonic() + timeout_s + ANSWER_SLACK_S
    pending: dict[str, tuple[AgentSession, asyncio.Future[agent_service_pb2.PreflightResult]]] = {}
    for session in sessions:
        preflight_id = f"pre_{uuid.uuid4().hex[:16]}"
        pending[preflight_id] = (session, answers.expect(preflight_id, session.session_id))
        session.send(
            agent_service_pb2.ConnectResponse(
                preflight=agent_service_pb2.Preflight(
                    preflight_id=preflight_id, run_id=run_id, target=target, workload=workload
                )
            )
        )
    warnings: list[str] = []
    counts = (0, 0)
    cancel_wait = asyncio.ensure_future(cancelled.wait())
    try:
        while pending:
            for preflight_id, (session, future) in list(pending.items()):
                if future.done():
                    del pending[preflight_id]
                    result = future.result()
                    if not result.ok:
                        return PreflightVerdict(False, f"preflight check by {session.name} failed: {result.message}")
                    if not counts[0] and result.usage_prompt_tokens and result.counted_prompt_tokens:
                        counts = (result.usage_prompt_tokens, result.counted_prompt_tokens)
                    if result.response_model and result.response_model != target.model:
                        warnings.append(
                            f"the server answered the preflight request for model {target.model!r} "
                            f"as model {result.response_model!r}"
                        )
                elif session.closed or session.close_reason:
                    return PreflightVerdict(False, f"preflight check: {session.name} disconnected before answering")
            if not pending or cancelled.is_set():
                break
            if time.monotonic() > deadline:
                names = ", ".join(session.name for session, _ in pending.values())
                waited = deadline_s(timeout_s)
                return PreflightVerdict(False, f"preflight check: no answer from {names} within {waited:g} s")
            waits: set[asyncio.Future[Any]] = {future for _, future in pending.values()}
            waits.add(cancel_wait)
            await asyncio.wait(waits, timeout=POLL_S, return_when=asyncio.FIRST_COMPLETED)
    finally:
        cancel_wait.cancel()
        for preflight_id in pending:
            answers.forget(preflight_id)
    return PreflightVerdict(
        True, warnings=sorted(set(warnings)), usage_prompt_tokens=counts[0], counted_prompt_tokens=counts[1]
    )


def deadline_s(timeout_s: float) -> float:
    """How long the controller waits for every answer, for checks with this request timeout."""
    return timeout_s + ANSWER_SLACK_S


def tokens_event_message(usage_prompt_tokens: int, counted_prompt_tokens: int) -> str:
    """The `preflight_tokens` run event's message (`token_accounting` reads it back)."""
    overhead = usage_prompt_tokens - counted_prompt_tokens
    return (
        f"the check's prompt is {counted_prompt_tokens} tokens for the tokenizer; the server counted "
        f"{usage_prompt_tokens} (usage.prompt_tokens): {overhead:+d} tokens of template per request"
    )


def template_overhead(messages: list[str]) -> int | None:
    """The template overhead of the first `preflight_tokens` event message, if any."""
    for message in messages:
        m = _TOKENS_MESSAGE.match(message)
        if m:
            return int(m.group(2)) - int(m.group(1))
    return None


def token_accounting(spec: run_pb2.RunSpec, token_events: list[str]) -> run_pb2.TokenAccounting:
    """How exact the run's token counts are (RunResult.tokens), from its workload and its
    `preflight_tokens` events' messages."""
    w = spec.workload
    out = run_pb2.TokenAccounting(exact=bool(w.tokenizer_id), tokenizer=w.tokenizer_id)
    if not w.tokenizer_id:
        out.note = (
            "approximate: prompts are built from words that are about one token each in common vocabularies "
            "(dataset prompts counted in words); give --tokenizer for exact counts"
        )
        return out
    overhead = template_overhead(token_events)
    lengths = w.synthetic.input_tokens if w.HasField("synthetic") else None
    n = lengths.fixed if lengths is not None and lengths.WhichOneof("distribution") == "fixed" else 0
    what = f"input {n}" if n else "a prompt of N tokens"
    if overhead is None:
        out.note = (
            "exact: prompts are built to (datasets counted in) the tokenizer's tokens; the template overhead is "
            "unknown (the server reported no usage for the preflight request, or the preflight was skipped)"
        )
        return out
    out.template_overhead_tokens = overhead
    total = f"{n + overhead}" if n else f"N {overhead:+d}"
    if overhead == 0:
        out.note = f"exact: {what} reaches the model as {total} tokens (no template overhead)"
    else:
        adds = f"adds {overhead}" if overhead > 0 else f"removes {-overhead}"
        out.note = f"exact: {what} reaches the model as {total} tokens: the chat template {adds}"
    if w.HasField("conversation") or (w.HasField("dataset") and w.dataset.all_turns):
        # The preflight request is one user message; a turn carries the whole history.
        out.note += " (measured on one message: each further message of a conversation adds its own header)"
    return out
