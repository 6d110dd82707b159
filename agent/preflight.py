"""The preflight check: can this agent use the run's target at all, before any load?

An unreachable target, a server that does not implement the endpoint, or a model name the
server does not serve would otherwise turn a whole stage into thousands of identical
failures (or, against a server that answers any model name, into numbers for the wrong
model). `check_target` does what vLLM's benchmark does before its load, in two steps:

1. `GET {base_url}/models`. A connection failure ends the check (the target is unreachable).
   When the server answers with a model list, the run's model must be in it; the failure
   names the models listed. A server without the endpoint (404, or an answer that is no
   model list) is not a failure: the second step decides.
2. One small real request of the run's kind (chat or completions, streamed or not, with the
   target's headers, `extra_body` and the workload's output-length controls): a short prompt
   and `max_tokens` 4. It must succeed as a stage's request would (HTTP 2xx, a well-formed
   answer). The `model` of its answer is reported, so a server that answers as another model
   can be warned about.

Every message is redacted like the agent's request errors: the target's API key and header
values never appear, and URLs are shown without their user-info. The check's requests go
to no stage's samples.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import orjson

from agent.datasets import DatasetFetchError
from agent.sample import MAX_ERROR_CHARS, RequestSample
from agent.sse import StreamParser, parse_json_body
from agent.target_client import TargetClient, TargetConfigError
from agent.tokens import DatasetSource, load_tokenizer
from agent.trace import fetch_trace
from agent.wire_errors import transport_error
from common.proto.loadtest.v1 import run_pb2

# Completion requests one agent's check sends (a server's request counters include them).
PREFLIGHT_REQUESTS = 1
PREFLIGHT_PROMPT = "Reply with one word: hello."
PREFLIGHT_MAX_TOKENS = 4
MODELS_TIMEOUT_S = 30.0
# An answer to a 4-token request is small; more is not read.
MAX_BODY_BYTES = 1 << 20
MAX_LISTED = 20


@dataclass(frozen=True)
class PreflightOutcome:
    """What the check found."""

    ok: bool
    message: str = ""
    served_models: list[str] = field(default_factory=list)
    response_model: str = ""
    usage_prompt_tokens: int = 0
    counted_prompt_tokens: int = 0


def display_url(url: str) -> str:
    """`url` without user-info (a base URL may carry credentials there)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


async def check_target(
    target: run_pb2.Target, workload: run_pb2.Workload, datasets: DatasetSource | None = None
) -> PreflightOutcome:
    """Check the target as described in the module docstring; never raises for the target's faults.

    With the workload's tokenizer (fetched through `datasets`), the check's prompt is also
    counted with it (`counted_prompt_tokens`: for chat, the message's content), beside the
    server's `usage.prompt_tokens` for it: their difference is what the chat template (or a
    BOS token) adds to every request. A trace workload's trace is fetched and parsed here
    too: a trace the agent cannot read fails the check, and the stages find it parsed.
    """
    try:
        client = TargetClient(target, ignore_eos=workload.ignore_eos, pin_min_tokens=workload.pin_min_tokens)
    except TargetConfigError as exc:
        return PreflightOutcome(False, str(exc))
    try:
        tokenizer = await load_tokenizer(workload, datasets)
        if workload.HasField("trace") and workload.trace.dataset_id:
            await fetch_trace(datasets, workload.trace.dataset_id)  # a bad trace fails here; stages reuse it
    except DatasetFetchError as exc:
        await client.close()
        return PreflightOutcome(False, str(exc))
    async with client:
        outcome = await _check(client)
    return PreflightOutcome(
        outcome.ok,
        client.redact(outcome.message)[:1000],
        outcome.served_models,
        outcome.response_model,
        usage_prompt_tokens=outcome.usage_prompt_tokens,
        counted_prompt_tokens=tokenizer.count(PREFLIGHT_PROMPT) if tokenizer is not None and outcome.ok else 0,
    )


async def _check(client: TargetClient) -> PreflightOutcome:
    where = display_url(client.base_url)
    listed, unreachable = await _list_models(client)
    if unreachable:
        return PreflightOutcome(False, f"cannot connect to {where}: {unreachable}")
    if listed is not None and client.model not in listed:
        shown = ", ".join(listed[:MAX_LISTED])
        if len(listed) > MAX_LISTED:
            shown += f" (and {len(listed) - MAX_LISTED} more)"
        return PreflightOutcome(
            False,
            f"model {client.model!r} is not served by {where}; the server lists: {shown or 'no models'}",
            listed,
        )
    sample, response_model = await _one_request(client)
    models = listed or []
    if sample.status != run_pb2.REQUEST_STATUS_OK:
        endpoint = display_url(client.url)
        message = f"the check request (POST {endpoint}) failed: {sample.error or 'no answer'}{_hint(sample)}"
        return PreflightOutcome(False, message, models, response_model)
    usage = sample.prompt_tokens if sample.usage_from_server else 0
    return PreflightOutcome(True, "", models, response_model, usage_prompt_tokens=usage)


async def _list_models(client: TargetClient) -> tuple[list[str] | None, str]:
    """(model ids the server lists or None, connection error or "")."""
    try:
        async with client.session.get(
            client.base_url + "/models",
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=MODELS_TIMEOUT_S),
        ) as resp:
            body = await _read_body(resp)
            if resp.status != 200:
                return None, ""
    except aiohttp.ClientConnectorError as exc:
        return None, transport_error(exc)
    except (aiohttp.ClientError, OSError, TimeoutError):
        return None, ""  # the completion request will tell what is wrong
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return None, ""
    if not isinstance(data, list):
        return None, ""
    return [str(m["id"]) for m in data if isinstance(m, dict) and "id" in m], ""


async def _one_request(client: TargetClient) -> tuple[RequestSample, str]:
    """One small real request; its sample (status, error) and the answer's `model`."""
    sample = RequestSample()
    parser = StreamParser(sample, chat=client.chat) if client.streaming else None
    body = client.encode_body(PREFLIGHT_PROMPT, PREFLIGHT_MAX_TOKENS)
    clock = time.perf_counter_ns
    sample.sent_ns = clock()
    try:
        # On a connection of its own: a pooled one (the GET's) may have been closed by a server
        # that closes after every response, and the check's request is never sent twice.
        async with client.fresh_session().post(client.url, data=body, allow_redirects=False) as resp:
            raw = await _read_body(resp)
            now = clock()
            if resp.status >= 300:
                sample.fail(_status_kind(resp.status), f"HTTP {resp.status}: {_detail(raw)}".rstrip(": "))
                sample.error = sample.error[:MAX_ERROR_CHARS]
                return sample, ""
    except TimeoutError:
        sample.fail(run_pb2.REQUEST_STATUS_TIMEOUT, "timed out")
        return sample, ""
    except (aiohttp.ClientError, OSError) as exc:
        sample.fail(run_pb2.REQUEST_STATUS_CONNECTION, transport_error(exc))
        return sample, ""
    if parser is not None:
        parser.feed(raw, now)
        parser.finish(now)
        return sample, _stream_model(raw)
    parse_json_body(sample, raw, chat=client.chat)
    return sample, _json_model(raw)


async def _read_body(resp: aiohttp.ClientResponse) -> bytes:
    """The body, up to `MAX_BODY_BYTES`."""
    body = bytearray()
    while len(body) < MAX_BODY_BYTES:
        chunk = await resp.content.read(MAX_BODY_BYTES - len(body))
        if not chunk:
            break
        body += chunk
    return bytes(body)


def _status_kind(code: int) -> run_pb2.RequestStatus.ValueType:
    if 400 <= code < 500:
        return run_pb2.REQUEST_STATUS_HTTP_4XX
    if code >= 500:
        return run_pb2.REQUEST_STATUS_HTTP_5XX
    return run_pb2.REQUEST_STATUS_PROTOCOL


def _detail(raw: bytes) -> str:
    text = raw[:1024].decode("utf-8", errors="replace").strip()
    try:
        parsed = json.loads(text)
    except ValueError:
        return " ".join(text.split())[:MAX_ERROR_CHARS]
    error = parsed.get("error", parsed) if isinstance(parsed, dict) else parsed
    if isinstance(error, dict):
        error = error.get("message") or error.get("detail") or error
    return str(error)[:MAX_ERROR_CHARS]


def _hint(sample: RequestSample) -> str:
    error = sample.error
    if error.startswith(("HTTP 404", "HTTP 405", "HTTP 501")):
        return " (does the server implement this endpoint? check the base URL and the API kind)"
    if error.startswith(("HTTP 401", "HTTP 403")):
        return " (check the target's API key)"
    return ""


def _json_model(raw: bytes) -> str:
    try:
        answer: Any = orjson.loads(raw)
    except ValueError:
        return ""
    model = answer.get("model") if isinstance(answer, dict) else None
    return model if isinstance(model, str) else ""


def _stream_model(raw: bytes) -> str:
    """The `model` of the first SSE event that has one."""
    for line in raw.splitlines():
        payload = line[5:].strip() if line.startswith(b"data:") else b""
        if payload.startswith(b"{"):
            model = _json_model(payload)
            if model:
                return model
    return ""
