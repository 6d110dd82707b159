"""Validation and defaulting of run specs (what CreateRun accepts), and reading a stored one back.

Every violation names the offending field by its path in the request, so a user of
grpcurl sees `spec.stages[1].concurrency: must be at least 1` rather than a stack trace.
All violations are collected, not just the first.
"""

from __future__ import annotations

import itertools
import math
import random
import re
from collections.abc import Iterable, Iterator
from typing import TypeVar
from urllib.parse import urlsplit

from google.protobuf import duration_pb2, json_format, struct_pb2
from google.protobuf.message import Message

from common.durations import seconds
from common.proto.loadtest.v1 import run_pb2
from common.request_body import PROTECTED_BODY_KEYS
from common.spec_defaults import DEFAULT_REQUEST_TIMEOUT_S, DEFAULT_UNREACHABLE_TIMEOUT_S
from common.target_url import credential_problem
from controller.domain.errors import FieldViolation, InvalidArgument, NotFound
from controller.domain.execution.search import apply_search_defaults
from controller.domain.results.checks import CheckSyntaxError, parse_check
from controller.domain.results.server_metrics import default_server_metrics, validate_server_metrics
from controller.store.repository import RunRecord

MAX_STAGES = 100
MAX_CHECKS = 50
MAX_CONCURRENCY = 100_000
MAX_RATE = 1_000_000.0
MAX_AGENTS = 1_000
MAX_STAGE_SECONDS = 7 * 24 * 3600
MAX_TOKENS = 1_000_000
MAX_TURNS = 1_000  # turns of one conversation
MAX_THINK_SECONDS = 600  # a think time between two turns
MAX_REQUEST_TIMEOUT_S = 3600
MAX_HEADERS = 64
MAX_HEADER_VALUE_CHARS = 8192
MAX_HEADERS_BYTES = 32 * 1024  # names and values together, UTF-8
MAX_LABELS = 64
MAX_LABEL_KEY_CHARS = 128
MAX_LABEL_VALUE_CHARS = 256
MAX_SELECTOR = 16
MAX_SELECTOR_KEY_CHARS = 128
MAX_SELECTOR_VALUE_CHARS = 256
MAX_CHECK_CHARS = 256
MAX_NAME_CHARS = 256  # display_name, stage names, dataset name
# Requests of one stage (and its warmup): far beyond a week at the largest rate a stage may have
# per agent, and well inside SQLite's signed 64-bit integers.
MAX_REQUESTS = 1_000_000_000
# Below this an open-loop stage would wait about 1000 s for its first request; arrival times of
# smaller rates overflow nanosecond offsets.
MIN_RATE = 0.001
MIN_BURSTINESS = 0.01
MAX_BURSTINESS = 1000.0
# The spec as stored (binary, after the API key, credential headers and the dataset's content
# are taken out): what every GetRun, ListRuns and WatchRun message of the run carries.
MAX_STORED_SPEC_BYTES = 128 * 1024
# What one agent process can be asked to sustain (a stage is split across its agents).
MAX_CONCURRENCY_PER_AGENT = 10_000
MAX_RATE_PER_AGENT = 20_000.0
MAX_EXTRA_BODY_BYTES = 64 * 1024
MAX_SLO_SECONDS = 24 * 3600
# protobuf's own range of a valid Duration (about 10,000 years).
_MAX_DURATION_SECONDS = 315_576_000_000
DEFAULT_TOKENS = 128
DEFAULT_TURNS = 3
MAX_PREFIX_GROUPS = 10_000
MAX_ZIPF_EXPONENT = 100.0
DEFAULT_ZIPF_EXPONENT = 1.0
MAX_REPLAY_SPEED = 1000.0
DEFAULT_REPLAY_SPEED = 1.0
MAX_BLOCK_TOKENS = 65_536
DEFAULT_BLOCK_TOKENS = 512
T = TypeVar("T")
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]{1,256}$")
# A series' name (RunSpec.series, the name of its baseline): safe in a URL, a file name, a shell.
SERIES_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
SERIES_NAME_RULE = "letters, digits, '.', '_' and '-' only, 1 to 64 of them"


def series_name_problem(name: str) -> str:
    """Why `name` cannot name a series ("" when it can)."""
    return "" if SERIES_NAME.fullmatch(name) else f"{name[:64]!r} is not a series name: {SERIES_NAME_RULE}"


def validate_and_default(spec: run_pb2.RunSpec, rng: random.Random | None = None) -> run_pb2.RunSpec:
    """Return a validated copy of `spec` with defaults filled in, or raise InvalidArgument."""
    v: list[FieldViolation] = []
    out = run_pb2.RunSpec()
    out.CopyFrom(spec)

    if not spec.HasField("target"):
        v.append(FieldViolation("spec.target", "required"))
    else:
        _check_target(out.target, v)

    searching = spec.HasField("search")
    if searching:
        _check_search(out, v)
    elif not spec.stages:
        v.append(FieldViolation("spec.stages", "at least one stage is required (or a search)"))
    elif len(spec.stages) > MAX_STAGES:
        v.append(FieldViolation("spec.stages", f"at most {MAX_STAGES} stages"))
    agents = max(out.placement.agents, 1)
    for i, stage in enumerate(_first(out.stages, MAX_STAGES)):
        _check_stage(stage, f"spec.stages[{i}]", v)
        _check_per_agent(stage, f"spec.stages[{i}]", agents, v)

    _check_workload(out.workload, v, chat=out.target.api_kind != run_pb2.API_KIND_COMPLETIONS)
    _check_trace(out, v)
    validate_server_metrics(out.server_metrics, v)

    if len(out.checks) > MAX_CHECKS:
        v.append(FieldViolation("spec.checks", f"at most {MAX_CHECKS} checks"))
    for i, check in enumerate(_first(out.checks, MAX_CHECKS)):
        if len(check.expression) > MAX_CHECK_CHARS:
            v.append(FieldViolation(f"spec.checks[{i}].expression", f"at most {MAX_CHECK_CHARS} characters"))
            continue
        try:
            parsed = parse_check(check.expression, check.abort_on_fail)
        except CheckSyntaxError as exc:
            v.append(FieldViolation(f"spec.checks[{i}].expression", str(exc)))
            continue
        if parsed.run_level and not searching:
            v.append(FieldViolation(f"spec.checks[{i}].expression", f"{parsed.metric} needs a search (spec.search)"))
        elif parsed.run_level and check.abort_on_fail:
            v.append(FieldViolation(f"spec.checks[{i}].abort_on_fail", f"{parsed.metric} is known only at the end"))
    for name in ("ttft", "tpot", "e2e"):
        d = getattr(out.slo, name)
        if out.slo.HasField(name) and not (d.seconds > 0 or (d.seconds == 0 and d.nanos > 0)):
            v.append(FieldViolation(f"spec.slo.{name}", "must be positive"))
        elif out.slo.HasField(name) and seconds(d) > MAX_SLO_SECONDS:
            v.append(FieldViolation(f"spec.slo.{name}", f"at most {MAX_SLO_SECONDS} s"))
    if out.placement.HasField("wait_timeout") and seconds(out.placement.wait_timeout) > MAX_STAGE_SECONDS:
        v.append(FieldViolation("spec.placement.wait_timeout", f"at most {MAX_STAGE_SECONDS} s"))
    if len(out.stages) <= MAX_STAGES and len(out.checks) <= MAX_CHECKS:
        _check_durations(out, "spec", v)

    if out.placement.agents > MAX_AGENTS:
        v.append(FieldViolation("spec.placement.agents", f"at most {MAX_AGENTS}"))
    if len(out.placement.selector) > MAX_SELECTOR:
        v.append(FieldViolation("spec.placement.selector", f"at most {MAX_SELECTOR} pairs"))
    for key, value in _first(out.placement.selector.items(), MAX_SELECTOR):
        if not 1 <= len(key) <= MAX_SELECTOR_KEY_CHARS or not 1 <= len(value) <= MAX_SELECTOR_VALUE_CHARS:
            limits = f"keys 1-{MAX_SELECTOR_KEY_CHARS} and values 1-{MAX_SELECTOR_VALUE_CHARS} chars"
            v.append(FieldViolation(f"spec.placement.selector[{key[:40]!r}]", limits))
    wait = out.placement.wait_timeout
    if out.placement.HasField("wait_timeout") and (wait.seconds < 0 or wait.nanos < 0):
        v.append(FieldViolation("spec.placement.wait_timeout", "must not be negative"))
    if out.placement.on_agent_loss not in run_pb2.AgentLossPolicy.values():
        v.append(FieldViolation("spec.placement.on_agent_loss", f"unknown policy {out.placement.on_agent_loss}"))
    if len(out.display_name) > MAX_NAME_CHARS:
        v.append(FieldViolation("spec.display_name", f"at most {MAX_NAME_CHARS} characters"))
    if len(out.labels) > MAX_LABELS:
        v.append(FieldViolation("spec.labels", f"at most {MAX_LABELS} labels"))
    for key, value in _first(out.labels.items(), MAX_LABELS):
        if not 1 <= len(key) <= MAX_LABEL_KEY_CHARS or len(value) > MAX_LABEL_VALUE_CHARS:
            limits = f"keys 1-{MAX_LABEL_KEY_CHARS}, values up to {MAX_LABEL_VALUE_CHARS} chars"
            v.append(FieldViolation(f"spec.labels[{key[:40]!r}]", limits))
    if out.series and series_name_problem(out.series):
        v.append(FieldViolation("spec.series", series_name_problem(out.series)))

    if v:
        raise InvalidArgument(v)

    if out.placement.agents == 0:
        out.placement.agents = 1
    default_server_metrics(out.server_metrics)
    if out.placement.on_agent_loss == run_pb2.AGENT_LOSS_POLICY_UNSPECIFIED:
        out.placement.on_agent_loss = run_pb2.AGENT_LOSS_POLICY_REDISTRIBUTE
    if out.target.api_kind == run_pb2.API_KIND_UNSPECIFIED:
        out.target.api_kind = run_pb2.API_KIND_CHAT
    if not out.target.HasField("stream"):
        out.target.stream = True
    if not out.target.HasField("request_timeout"):
        out.target.request_timeout.FromSeconds(int(DEFAULT_REQUEST_TIMEOUT_S))
    if not out.target.HasField("unreachable_timeout"):
        out.target.unreachable_timeout.FromSeconds(int(DEFAULT_UNREACHABLE_TIMEOUT_S))
    if out.workload.WhichOneof("source") is None:
        out.workload.synthetic.SetInParent()
    if out.workload.HasField("synthetic"):
        synthetic = out.workload.synthetic
        for lengths in (synthetic.input_tokens, synthetic.output_tokens):
            if lengths.WhichOneof("distribution") is None:
                lengths.fixed = DEFAULT_TOKENS
    if out.workload.HasField("conversation"):
        conversation = out.workload.conversation
        for lengths, default in (
            (conversation.turns, DEFAULT_TURNS),
            (conversation.input_tokens, DEFAULT_TOKENS),
            (conversation.output_tokens, DEFAULT_TOKENS),
        ):
            if lengths.WhichOneof("distribution") is None:
                lengths.fixed = default
    if out.workload.HasField("trace"):
        trace = out.workload.trace
        trace.replay_speed = trace.replay_speed or DEFAULT_REPLAY_SPEED
        trace.block_tokens = trace.block_tokens or DEFAULT_BLOCK_TOKENS
    if out.workload.HasField("synthetic"):
        synthetic = out.workload.synthetic
        if synthetic.prefix_groups > 1 and synthetic.prefix_popularity == run_pb2.PREFIX_POPULARITY_UNSPECIFIED:
            synthetic.prefix_popularity = run_pb2.PREFIX_POPULARITY_UNIFORM
        if synthetic.prefix_popularity == run_pb2.PREFIX_POPULARITY_ZIPF and not synthetic.zipf_exponent:
            synthetic.zipf_exponent = DEFAULT_ZIPF_EXPONENT
    if out.workload.seed == 0:
        out.workload.seed = (rng or random.SystemRandom()).randrange(1, 2**63)
    if searching:
        apply_search_defaults(out.search)
    for stage in out.stages:
        if stage.WhichOneof("load") == "request_rate" and stage.arrival == run_pb2.ARRIVAL_PROCESS_UNSPECIFIED:
            stage.arrival = run_pb2.ARRIVAL_PROCESS_POISSON
        if not stage.name:
            stage.name = describe_stage(stage)
    return out


def check_stored_size(spec: run_pb2.RunSpec) -> None:
    """The spec as it will be stored (secrets and dataset content taken out) must fit
    MAX_STORED_SPEC_BYTES: every read of the run carries it, and a ListRuns page is sized by it."""
    size = spec.ByteSize()
    if size > MAX_STORED_SPEC_BYTES:
        what = f"is {size} bytes as stored (labels, headers, extra_body, checks...); at most {MAX_STORED_SPEC_BYTES}"
        raise InvalidArgument([FieldViolation("spec", what)])


def parse_spec(record: RunRecord, into: run_pb2.RunSpec | None = None) -> run_pb2.RunSpec:
    """The run's stored spec, decoded into `into` (an empty message, e.g. a Run's `spec`: that
    saves copying it there) or into a new message."""
    spec = run_pb2.RunSpec() if into is None else into
    if record.spec_pb:  # binary since migration 7: ~1 us a run, ~100x cheaper than parsing the JSON
        spec.MergeFromString(record.spec_pb)
    else:
        json_format.Parse(record.spec_json, spec)
    return spec


def spec_json(spec: run_pb2.RunSpec) -> str:
    """The spec as stored in JSON; a value validation let through but JSON cannot hold is still
    the caller's error (INVALID_ARGUMENT), never an internal one."""
    try:
        return json_format.MessageToJson(spec, indent=None, sort_keys=True)
    except (json_format.SerializeToJsonError, ValueError) as exc:
        raise InvalidArgument([FieldViolation("spec", f"cannot be stored: {str(exc)[:200]}")]) from None


def _first(items: Iterable[T], n: int) -> Iterator[T]:
    """The first `n` of `items`: a map with a million entries is refused by its count once, not
    also entry by entry."""
    return itertools.islice(items, n)


def describe_stage(stage: run_pb2.Stage) -> str:
    """A short label for a stage's load, e.g. `concurrency=8`."""
    kind = stage.WhichOneof("load")
    if kind == "request_rate":
        return f"rate={stage.request_rate:g}/s"
    if kind == "trace_replay":
        return "trace replay"
    return f"{kind}={getattr(stage, kind)}" if kind else "stage"


def _check_search(spec: run_pb2.RunSpec, v: list[FieldViolation]) -> None:
    """A search plans its own stages, judged against the SLO; its limits are checked with the
    defaults filled in (a default min above a given max is the caller's mistake too)."""
    path = "spec.search"
    if spec.stages:
        v.append(FieldViolation("spec.stages", "a search plans its own stages: give either stages or a search"))
    if slo_objectives(spec.slo) == 0:
        v.append(FieldViolation("spec.slo", "a search needs at least one objective (ttft, tpot or e2e)"))
    s = run_pb2.SearchSpec()
    s.CopyFrom(spec.search)
    if s.variable not in (run_pb2.SEARCH_VARIABLE_CONCURRENCY, run_pb2.SEARCH_VARIABLE_RATE):
        v.append(FieldViolation(f"{path}.variable", "required: SEARCH_VARIABLE_CONCURRENCY or SEARCH_VARIABLE_RATE"))
        return
    given = {name: getattr(s, name) for name in ("min", "max")}
    apply_search_defaults(s)
    concurrency = s.variable == run_pb2.SEARCH_VARIABLE_CONCURRENCY
    agents = max(spec.placement.agents, 1)
    low, high = (1.0, float(MAX_CONCURRENCY)) if concurrency else (MIN_RATE, MAX_RATE)
    per_agent = MAX_CONCURRENCY_PER_AGENT if concurrency else MAX_RATE_PER_AGENT
    for name in ("min", "max"):
        value = getattr(s, name)
        if not math.isfinite(value) or not low <= value <= high:  # also refuses NaN and negatives
            v.append(FieldViolation(f"{path}.{name}", f"must be between {low:g} and {high:g}"))
        elif concurrency and value != int(value):
            v.append(FieldViolation(f"{path}.{name}", "a concurrency must be a whole number"))
        elif name == "max" and value > per_agent * agents:
            v.append(FieldViolation(f"{path}.max", f"at most {per_agent:g} per agent ({agents} agent(s))"))
    if math.isfinite(s.min) and math.isfinite(s.max) and s.min > s.max:
        which = "min" if given["min"] else "max"
        v.append(FieldViolation(f"{path}.{which}", f"min ({s.min:g}) must not be above max ({s.max:g})"))
    if not 0 < s.goodput_target_percent <= 100:  # also refuses NaN
        v.append(FieldViolation(f"{path}.goodput_target_percent", "must be in (0, 100]"))
    if not 0 < s.tolerance_percent <= 1000:
        v.append(FieldViolation(f"{path}.tolerance_percent", "must be in (0, 1000]"))
    probe_s, warmup_s = seconds(s.probe_duration), seconds(s.probe_warmup)
    if not 0 < probe_s <= MAX_STAGE_SECONDS:
        v.append(FieldViolation(f"{path}.probe_duration", f"must be in (0, {MAX_STAGE_SECONDS}] s"))
    if warmup_s < 0 or s.probe_warmup.seconds < 0 or s.probe_warmup.nanos < 0:
        v.append(FieldViolation(f"{path}.probe_warmup", "must not be negative"))
    elif warmup_s >= probe_s:
        v.append(FieldViolation(f"{path}.probe_warmup", "must be shorter than probe_duration"))
    if s.min_requests > MAX_REQUESTS:
        v.append(FieldViolation(f"{path}.min_requests", f"at most {MAX_REQUESTS}"))
    if s.max_probes > MAX_STAGES:
        v.append(FieldViolation(f"{path}.max_probes", f"at most {MAX_STAGES} (each probe is a stage)"))
    if s.HasField("cost_per_hour_usd") and not (math.isfinite(s.cost_per_hour_usd) and s.cost_per_hour_usd > 0):
        v.append(FieldViolation(f"{path}.cost_per_hour_usd", "must be a positive number"))
    if s.arrival not in run_pb2.ArrivalProcess.values():
        v.append(FieldViolation(f"{path}.arrival", f"unknown arrival process {s.arrival}"))
    elif s.arrival != run_pb2.ARRIVAL_PROCESS_UNSPECIFIED and concurrency:
        v.append(FieldViolation(f"{path}.arrival", "only applies to a rate search"))
    elif s.arrival == run_pb2.ARRIVAL_PROCESS_GAMMA:
        # A search has no burstiness to give the gamma process its shape.
        v.append(FieldViolation(f"{path}.arrival", "a rate search takes poisson or constant arrivals"))
    if len(s.resume_from_run_id) > 128:
        v.append(FieldViolation(f"{path}.resume_from_run_id", "at most 128 characters"))


def slo_objectives(slo: run_pb2.Slo) -> int:
    """How many latency objectives the SLO sets."""
    return sum(slo.HasField(name) for name in ("ttft", "tpot", "e2e"))


def check_resume(spec: run_pb2.RunSpec, earlier: RunRecord | None) -> None:
    """`spec.search.resume_from_run_id` must name a stored run whose spec has a search of the
    same variable: NotFound or InvalidArgument (the caller looked the run up)."""
    run_id = spec.search.resume_from_run_id
    if earlier is None:
        raise NotFound(f"spec.search.resume_from_run_id: run {run_id!r} not found")
    other = parse_spec(earlier)
    if not other.HasField("search"):
        raise InvalidArgument([FieldViolation("spec.search.resume_from_run_id", f"run {run_id} has no search")])
    if other.search.variable != spec.search.variable:
        name = run_pb2.SearchVariable.Name(other.search.variable)
        raise InvalidArgument([FieldViolation("spec.search.resume_from_run_id", f"run {run_id} searched {name}")])


def _check_target(t: run_pb2.Target, v: list[FieldViolation]) -> None:
    url = t.base_url
    if not url:
        v.append(FieldViolation("spec.target.base_url", "required"))
    else:
        try:
            parts = urlsplit(url)
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            parts, port_ok = None, False
        if parts is None or parts.scheme not in ("http", "https"):
            v.append(FieldViolation("spec.target.base_url", "must be an http:// or https:// URL"))
        elif not parts.hostname or not port_ok:
            v.append(FieldViolation("spec.target.base_url", "must name a host (and a valid port)"))
        elif len(url) > 2048 or any(c.isspace() for c in url):
            v.append(FieldViolation("spec.target.base_url", "must be at most 2048 chars, no spaces"))
        elif problem := credential_problem(url):
            v.append(FieldViolation("spec.target.base_url", problem))
    if not t.model:
        v.append(FieldViolation("spec.target.model", "required"))
    elif len(t.model) > 512:
        v.append(FieldViolation("spec.target.model", "at most 512 characters"))
    if t.api_kind not in run_pb2.ApiKind.values():
        v.append(FieldViolation("spec.target.api_kind", f"unknown API kind {t.api_kind}"))
    for name in ("request_timeout", "unreachable_timeout"):
        if t.HasField(name) and not 0 < seconds(getattr(t, name)) <= MAX_REQUEST_TIMEOUT_S:
            v.append(FieldViolation(f"spec.target.{name}", f"must be in (0, {MAX_REQUEST_TIMEOUT_S}] s"))
    if len(t.headers) > MAX_HEADERS:
        v.append(FieldViolation("spec.target.headers", f"at most {MAX_HEADERS} headers"))
    elif sum(len(n.encode()) + len(x.encode()) for n, x in t.headers.items()) > MAX_HEADERS_BYTES:
        v.append(FieldViolation("spec.target.headers", f"at most {MAX_HEADERS_BYTES} bytes of names and values"))
    for name, value in _first(t.headers.items(), MAX_HEADERS):
        if not _HEADER_NAME.match(name):
            v.append(FieldViolation(f"spec.target.headers[{name[:40]!r}]", "invalid header name"))
        elif any(c in value for c in "\r\n\0") or len(value) > MAX_HEADER_VALUE_CHARS:
            problem = f"invalid header value (at most {MAX_HEADER_VALUE_CHARS} chars, no CR/LF/NUL)"
            v.append(FieldViolation(f"spec.target.headers[{name!r}]", problem))
    for key in t.extra_body.fields:
        if key in PROTECTED_BODY_KEYS:
            v.append(FieldViolation(f"spec.target.extra_body.{key}", "set by llm-loadtest; cannot be overridden"))
    _check_extra_body(t, v)
    if any(c in t.api_key for c in "\r\n\0") or len(t.api_key) > 8192:
        # The message never repeats the key itself.
        v.append(FieldViolation("spec.target.api_key", "invalid characters or too long"))


def _check_stage(stage: run_pb2.Stage, path: str, v: list[FieldViolation]) -> None:
    kind = stage.WhichOneof("load")
    if kind is None:
        v.append(FieldViolation(f"{path}.concurrency", "a load is required: concurrency, request_rate or trace_replay"))
    elif kind == "trace_replay" and not stage.trace_replay:
        v.append(FieldViolation(f"{path}.trace_replay", "must be true when set"))
    elif kind == "concurrency" and not 1 <= stage.concurrency <= MAX_CONCURRENCY:
        v.append(FieldViolation(f"{path}.concurrency", f"must be between 1 and {MAX_CONCURRENCY}"))
    elif kind == "request_rate" and not (MIN_RATE <= stage.request_rate <= MAX_RATE):  # also rejects NaN
        v.append(FieldViolation(f"{path}.request_rate", f"must be between {MIN_RATE:g} and {MAX_RATE:g} requests/s"))
    open_loop = kind == "request_rate"
    if stage.arrival not in run_pb2.ArrivalProcess.values():
        v.append(FieldViolation(f"{path}.arrival", f"unknown arrival process {stage.arrival}"))
    elif stage.arrival != run_pb2.ARRIVAL_PROCESS_UNSPECIFIED and not open_loop:
        v.append(FieldViolation(f"{path}.arrival", "only applies to request_rate stages"))
    if stage.arrival == run_pb2.ARRIVAL_PROCESS_GAMMA:
        if not MIN_BURSTINESS <= stage.burstiness <= MAX_BURSTINESS:  # also rejects NaN
            v.append(
                FieldViolation(
                    f"{path}.burstiness",
                    f"gamma arrivals need burstiness between {MIN_BURSTINESS:g} and {MAX_BURSTINESS:g} (1 = Poisson)",
                )
            )
    elif stage.burstiness != 0:
        v.append(FieldViolation(f"{path}.burstiness", "only applies to ARRIVAL_PROCESS_GAMMA"))
    if stage.max_concurrency and not open_loop:
        v.append(FieldViolation(f"{path}.max_concurrency", "only applies to request_rate stages"))
    elif stage.max_concurrency > MAX_CONCURRENCY:
        v.append(FieldViolation(f"{path}.max_concurrency", f"at most {MAX_CONCURRENCY}"))

    stage_s = seconds(stage.duration)
    for name in ("duration", "warmup_duration", "ramp"):
        d = getattr(stage, name)
        if d.seconds < 0 or d.nanos < 0:
            v.append(FieldViolation(f"{path}.{name}", "must not be negative"))
        elif seconds(d) > MAX_STAGE_SECONDS:
            v.append(FieldViolation(f"{path}.{name}", f"at most {MAX_STAGE_SECONDS} s"))
    if stage.duration.seconds >= 0 and stage.duration.nanos >= 0 and stage_s == 0 and stage.requests == 0:
        v.append(FieldViolation(f"{path}.duration", "set a duration or a request count (or both)"))
    if stage_s and seconds(stage.warmup_duration) >= stage_s:
        v.append(FieldViolation(f"{path}.warmup_duration", "must be shorter than the stage"))
    if stage_s and seconds(stage.ramp) > stage_s:
        v.append(FieldViolation(f"{path}.ramp", "must not be longer than the stage"))
    for name in ("requests", "warmup_requests"):
        if getattr(stage, name) > MAX_REQUESTS:
            v.append(FieldViolation(f"{path}.{name}", f"at most {MAX_REQUESTS}"))
    if stage.requests and stage.warmup_requests >= stage.requests:
        v.append(FieldViolation(f"{path}.warmup_requests", "must be fewer than the stage's requests"))
    if len(stage.name) > MAX_NAME_CHARS:
        v.append(FieldViolation(f"{path}.name", f"at most {MAX_NAME_CHARS} characters"))


def _check_lengths(lengths: run_pb2.LengthDistribution, path: str, high: int, v: list[FieldViolation]) -> None:
    """A length distribution within 1..`high`."""
    kind = lengths.WhichOneof("distribution")
    if kind == "fixed" and not 1 <= lengths.fixed <= high:
        v.append(FieldViolation(f"{path}.fixed", f"must be between 1 and {high}"))
    elif kind == "uniform":
        u = lengths.uniform
        if not 1 <= u.min <= u.max <= high:
            v.append(FieldViolation(f"{path}.uniform", f"need 1 <= min <= max <= {high}"))
    elif kind == "normal":
        n = lengths.normal
        if not (0 < n.std <= high and 1 <= n.min <= n.max <= high and n.min <= n.mean <= n.max):
            v.append(FieldViolation(f"{path}.normal", f"need 0 < std <= {high} and 1 <= min <= mean <= max <= {high}"))


def _check_think_time(think: run_pb2.DurationDistribution, v: list[FieldViolation]) -> None:
    """Each duration of the think time non-negative and at most MAX_THINK_SECONDS."""
    path = "spec.workload.think_time"
    kind = think.WhichOneof("distribution")
    parts: list[tuple[str, duration_pb2.Duration]] = []
    if kind == "fixed":
        parts = [("fixed", think.fixed)]
    elif kind == "uniform":
        parts = [("uniform.min", think.uniform.min), ("uniform.max", think.uniform.max)]
    elif kind == "exponential_mean":
        parts = [("exponential_mean", think.exponential_mean)]
    bad = False
    for name, d in parts:
        if d.seconds < 0 or d.nanos < 0:
            v.append(FieldViolation(f"{path}.{name}", "must not be negative"))
            bad = True
        elif seconds(d) > MAX_THINK_SECONDS:
            v.append(FieldViolation(f"{path}.{name}", f"at most {MAX_THINK_SECONDS} s"))
            bad = True
    if kind == "uniform" and not bad and seconds(think.uniform.min) > seconds(think.uniform.max):
        v.append(FieldViolation(f"{path}.uniform", "need min <= max"))


def _check_conversation(w: run_pb2.Workload, chat: bool, v: list[FieldViolation]) -> None:
    """Conversations (`conversation`, or a dataset with `all_turns`) and their think time."""
    conversation = w.WhichOneof("source") == "conversation"
    all_turns = w.HasField("dataset") and w.dataset.all_turns
    if conversation:
        c = w.conversation
        _check_lengths(c.turns, "spec.workload.conversation.turns", MAX_TURNS, v)
        for name in ("input_tokens", "output_tokens"):
            _check_lengths(getattr(c, name), f"spec.workload.conversation.{name}", MAX_TOKENS, v)
        if c.system_prompt_tokens > MAX_TOKENS:
            v.append(FieldViolation("spec.workload.conversation.system_prompt_tokens", f"at most {MAX_TOKENS}"))
    if (conversation or all_turns) and not chat:
        # A history of messages has no faithful rendering as one completions prompt: that
        # is the model's chat template, which the server applies and we do not know.
        v.append(FieldViolation("spec.target.api_kind", "conversations need the chat API, not completions"))
    if w.HasField("think_time"):
        if not (conversation or all_turns):
            v.append(
                FieldViolation("spec.workload.think_time", "only applies to conversations (or datasets with all_turns)")
            )
        _check_think_time(w.think_time, v)


def _check_workload(w: run_pb2.Workload, v: list[FieldViolation], chat: bool = True) -> None:
    if w.HasField("dataset") and len(w.dataset.name) > MAX_NAME_CHARS:
        v.append(FieldViolation("spec.workload.dataset.name", f"at most {MAX_NAME_CHARS} characters"))
    _check_conversation(w, chat, v)
    if not w.HasField("synthetic"):
        return
    for name in ("input_tokens", "output_tokens"):
        _check_lengths(getattr(w.synthetic, name), f"spec.workload.synthetic.{name}", MAX_TOKENS, v)
    if w.synthetic.shared_prefix_tokens > MAX_TOKENS:
        v.append(FieldViolation("spec.workload.synthetic.shared_prefix_tokens", f"at most {MAX_TOKENS}"))
    _check_prefix_groups(w.synthetic, v)


def _check_prefix_groups(s: run_pb2.SyntheticWorkload, v: list[FieldViolation]) -> None:
    path = "spec.workload.synthetic"
    if s.prefix_groups > MAX_PREFIX_GROUPS:
        v.append(FieldViolation(f"{path}.prefix_groups", f"at most {MAX_PREFIX_GROUPS}"))
    elif s.prefix_groups > 1 and not s.shared_prefix_tokens:
        v.append(FieldViolation(f"{path}.prefix_groups", "needs shared_prefix_tokens (the length of each prefix)"))
    if s.prefix_popularity not in run_pb2.PrefixPopularity.values():
        v.append(FieldViolation(f"{path}.prefix_popularity", f"unknown popularity {s.prefix_popularity}"))
    zipf = s.prefix_popularity == run_pb2.PREFIX_POPULARITY_ZIPF
    if s.zipf_exponent and not zipf:
        v.append(FieldViolation(f"{path}.zipf_exponent", "only applies to PREFIX_POPULARITY_ZIPF"))
    elif zipf and not (s.zipf_exponent == 0 or 0 < s.zipf_exponent <= MAX_ZIPF_EXPONENT):  # also rejects NaN
        v.append(FieldViolation(f"{path}.zipf_exponent", f"must be > 0 and at most {MAX_ZIPF_EXPONENT:g}"))


def _check_trace(spec: run_pb2.RunSpec, v: list[FieldViolation]) -> None:
    """A trace workload is replayed by trace_replay stages, and only those need one."""
    w = spec.workload
    replaying = [i for i, stage in enumerate(spec.stages) if stage.WhichOneof("load") == "trace_replay"]
    if not w.HasField("trace"):
        for i in replaying[:MAX_STAGES]:
            v.append(FieldViolation(f"spec.stages[{i}].trace_replay", "needs a trace workload (spec.workload.trace)"))
        return
    path = "spec.workload.trace"
    trace = w.trace
    if not trace.dataset_id:
        v.append(FieldViolation(f"{path}.dataset_id", "required: an uploaded trace (llm-loadtest datasets upload)"))
    elif len(trace.dataset_id) > MAX_NAME_CHARS:
        v.append(FieldViolation(f"{path}.dataset_id", f"at most {MAX_NAME_CHARS} characters"))
    if not (trace.replay_speed == 0 or 0 < trace.replay_speed <= MAX_REPLAY_SPEED):  # also rejects NaN
        v.append(FieldViolation(f"{path}.replay_speed", f"must be > 0 and at most {MAX_REPLAY_SPEED:g}"))
    if trace.block_tokens > MAX_BLOCK_TOKENS:
        v.append(FieldViolation(f"{path}.block_tokens", f"must be between 1 and {MAX_BLOCK_TOKENS}"))
    if spec.HasField("search"):
        v.append(FieldViolation("spec.search", "a trace workload replays the trace's own times: no search"))
    for i, stage in enumerate(spec.stages[:MAX_STAGES]):
        if stage.WhichOneof("load") != "trace_replay":
            v.append(
                FieldViolation(
                    f"spec.stages[{i}].trace_replay", "a trace workload's stages replay it: set trace_replay"
                )
            )
        elif stage.HasField("ramp") and seconds(stage.ramp) > 0:
            v.append(FieldViolation(f"spec.stages[{i}].ramp", "a trace replay keeps the trace's times: no ramp"))


def _check_per_agent(stage: run_pb2.Stage, path: str, agents: int, v: list[FieldViolation]) -> None:
    """Each agent's share of a stage must be something one agent process can generate."""
    kind = stage.WhichOneof("load")
    if kind == "concurrency" and stage.concurrency > MAX_CONCURRENCY_PER_AGENT * agents:
        v.append(
            FieldViolation(
                f"{path}.concurrency",
                f"at most {MAX_CONCURRENCY_PER_AGENT} per agent ({agents} agent(s)): use more agents",
            )
        )
    elif kind == "request_rate" and stage.request_rate > MAX_RATE_PER_AGENT * agents:
        v.append(
            FieldViolation(
                f"{path}.request_rate",
                f"at most {MAX_RATE_PER_AGENT:g}/s per agent ({agents} agent(s)): use more agents",
            )
        )
    if stage.max_concurrency > MAX_CONCURRENCY_PER_AGENT * agents:
        v.append(FieldViolation(f"{path}.max_concurrency", f"at most {MAX_CONCURRENCY_PER_AGENT} per agent"))


def _check_extra_body(t: run_pb2.Target, v: list[FieldViolation]) -> None:
    """extra_body is stored and sent as JSON: finite numbers only, and a bounded size."""
    if not t.HasField("extra_body"):
        return
    if t.extra_body.ByteSize() > MAX_EXTRA_BODY_BYTES:
        v.append(FieldViolation("spec.target.extra_body", f"at most {MAX_EXTRA_BODY_BYTES} bytes"))
        return
    stack: list[object] = [t.extra_body]
    while stack:
        item = stack.pop()
        if isinstance(item, struct_pb2.Struct):
            stack.extend(item.fields.values())
        elif isinstance(item, struct_pb2.ListValue):
            stack.extend(item.values)
        elif isinstance(item, struct_pb2.Value):
            kind = item.WhichOneof("kind")
            if kind == "number_value" and not math.isfinite(item.number_value):
                v.append(FieldViolation("spec.target.extra_body", "numbers must be finite (no NaN or Infinity)"))
                return
            if kind in ("struct_value", "list_value"):
                stack.append(getattr(item, kind))


def _check_durations(message: Message, path: str, v: list[FieldViolation]) -> None:
    """Every Duration anywhere in the spec must be one protobuf can represent (sign-consistent,
    in range), or storing the spec as JSON would fail."""
    for field, value in message.ListFields():
        if field.message_type is None or field.message_type.GetOptions().map_entry:
            continue
        items = value if field.is_repeated else [value]
        for i, item in enumerate(items):
            sub = f"{path}.{field.name}" + (f"[{i}]" if field.is_repeated else "")
            if isinstance(item, duration_pb2.Duration):
                ok = (
                    abs(item.seconds) <= _MAX_DURATION_SECONDS
                    and abs(item.nanos) < 1_000_000_000
                    and not (item.seconds > 0 > item.nanos or item.seconds < 0 < item.nanos)
                )
                if not ok:
                    v.append(FieldViolation(sub, "not a valid duration"))
            elif isinstance(item, Message) and not isinstance(item, struct_pb2.Struct):
                _check_durations(item, sub, v)
