"""Turning `run` flags into a RunSpec: load shapes (sweeps, open loop, scenarios) or a capacity
search, lengths, datasets and target options. The flags mirror the spec's fields."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from google.protobuf import struct_pb2
from google.protobuf.message import Message

from client.envconfig import not_from_env
from client.scenarios import SCENARIOS, scale
from common.durations import parse_duration
from common.proto.loadtest.v1 import run_pb2
from common.search_outcome import variable_name
from common.target_url import credential_problem

TARGET_API_KEY_ENV = "LLM_LOADTEST_TARGET_API_KEY"
DEFAULT_STAGE_S = 10.0
MAX_THINK_TIME_S = 600
ARRIVALS = {
    "poisson": run_pb2.ARRIVAL_PROCESS_POISSON,
    "constant": run_pb2.ARRIVAL_PROCESS_CONSTANT,
    "gamma": run_pb2.ARRIVAL_PROCESS_GAMMA,
}


SEARCH_VARIABLES = {
    "concurrency": run_pb2.SEARCH_VARIABLE_CONCURRENCY,
    "rate": run_pb2.SEARCH_VARIABLE_RATE,
}
# The flags that describe stages: a search plans its own, so they are refused beside --search
# (flag, attribute, its value when not given).
STAGE_FLAGS = (
    ("--concurrency", "concurrency", None),
    ("--rate", "rate", None),
    ("--scenario", "scenario", None),
    ("--peak-concurrency", "peak_concurrency", None),
    ("--peak-rate", "peak_rate", None),
    ("--duration", "duration", None),
    ("--requests", "requests", 0),
    ("--warmup", "warmup", (0.0, 0)),
    ("--ramp", "ramp", 0.0),
    ("--burstiness", "burstiness", None),
    ("--max-concurrency", "max_concurrency", 0),
)
# What to use instead of a stage flag in a search.
_SEARCH_INSTEAD = {
    "--concurrency": "--search-min/--search-max",
    "--rate": "--search-min/--search-max",
    "--duration": "--probe-duration",
    "--warmup": "--probe-warmup",
    "--requests": "--min-requests",
}


LOSS_POLICIES = {
    "redistribute": run_pb2.AGENT_LOSS_POLICY_REDISTRIBUTE,
    "continue": run_pb2.AGENT_LOSS_POLICY_CONTINUE,
    "fail": run_pb2.AGENT_LOSS_POLICY_FAIL,
}


def selector(text: str) -> dict[str, str]:
    """`zone=a,gpu=h100` -> {"zone": "a", "gpu": "h100"}."""
    out: dict[str, str] = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise argparse.ArgumentTypeError(f"expected KEY=VALUE[,KEY=VALUE...], got {text!r}")
        out[key.strip()] = value.strip()
    return out


def label(text: str) -> tuple[str, str]:
    """`commit=abc123` -> ("commit", "abc123") (the value may be empty, the key not)."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    return key.strip(), value.strip()


def int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def float_list(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from exc
    if not values:
        raise argparse.ArgumentTypeError("expected at least one value")
    return values


def duration(text: str) -> float:
    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _percent_up_to(text: str, highest: float) -> float:
    try:
        value = float(text.strip().removesuffix("%"))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a percentage such as 95% or 5%, got {text!r}") from exc
    if not 0 < value <= highest:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"a percentage above 0 and at most {highest:g}, got {text!r}")
    return value


def percent(text: str) -> float:
    """`95%` or `95`: a share, above 0 and at most 100 percent."""
    return _percent_up_to(text, 100.0)


def tolerance_percent(text: str) -> float:
    """`5%` or `5`: a relative gap, above 0 and at most 1000 percent (SearchSpec's limit)."""
    return _percent_up_to(text, 1000.0)


def positive_number(text: str) -> float:
    """A number above 0 (a load level, a price)."""
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from exc
    if not value > 0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be above 0, got {text!r}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1 (a count)."""
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text!r}")
    return value


def positive_duration(text: str) -> float:
    """A duration longer than 0, in seconds."""
    seconds = duration(text)
    if not seconds > 0:
        raise argparse.ArgumentTypeError(f"must be longer than 0, got {text!r}")
    return seconds


def header(text: str) -> tuple[str, str]:
    name, sep, value = text.partition(":")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME:VALUE, got {text!r}")
    return name.strip(), value.strip()


def lengths(text: str) -> run_pb2.LengthDistribution:
    """`128` (fixed), `64-256` (uniform) or `normal:MEAN,STD[,MIN,MAX]`."""
    out = run_pb2.LengthDistribution()
    try:
        if text.startswith("normal:"):
            values = [float(v) for v in text.removeprefix("normal:").split(",")]
            mean, std = values[0], values[1]
            low = int(values[2]) if len(values) > 2 else max(1, int(mean - 4 * std))
            high = int(values[3]) if len(values) > 3 else int(mean + 4 * std)
            out.normal.CopyFrom(run_pb2.NormalLength(mean=mean, std=std, min=low, max=high))
        elif "-" in text:
            low_s, high_s = text.split("-", 1)
            out.uniform.CopyFrom(run_pb2.UniformLength(min=int(low_s), max=int(high_s)))
        else:
            out.fixed = int(text)
    except (ValueError, IndexError) as exc:
        raise argparse.ArgumentTypeError(f"expected N, MIN-MAX or normal:MEAN,STD[,MIN,MAX]; got {text!r}") from exc
    return out


def think_time(text: str) -> run_pb2.DurationDistribution:
    """`2s` (fixed), `1s-5s` (uniform) or `exp:3s` (exponential with that mean), each at most
    10 minutes (the controller's limit)."""
    out = run_pb2.DurationDistribution()
    spelled = text.strip().lower()

    def bounded(part: str) -> float:
        value = duration(part)
        if value > MAX_THINK_TIME_S:
            raise argparse.ArgumentTypeError(f"a think time is at most {MAX_THINK_TIME_S // 60} minutes, got {text!r}")
        return value

    if spelled.startswith("exp:"):
        _set_duration(out.exponential_mean, bounded(spelled.removeprefix("exp:")))
    elif "-" in spelled:
        low, high = (bounded(part) for part in spelled.split("-", 1))
        if low > high:
            raise argparse.ArgumentTypeError(f"expected MIN-MAX with MIN <= MAX, got {text!r}")
        _set_duration(out.uniform.min, low)
        _set_duration(out.uniform.max, high)
    else:
        _set_duration(out.fixed, bounded(spelled))
    return out


def prefix_popularity(text: str) -> tuple[run_pb2.PrefixPopularity.ValueType, float]:
    """`uniform`, `zipf` (exponent 1) or `zipf:S`."""
    kind, _, exponent = text.strip().lower().partition(":")
    if kind == "uniform" and not exponent:
        return run_pb2.PREFIX_POPULARITY_UNIFORM, 0.0
    if kind == "zipf":
        try:
            s = float(exponent) if exponent else 1.0
        except ValueError:
            s = float("nan")
        if s > 0 and s != float("inf"):
            return run_pb2.PREFIX_POPULARITY_ZIPF, s
    raise argparse.ArgumentTypeError(f"expected uniform, zipf or zipf:S with S > 0; got {text!r}")


TRACE_FORMATS = {"mooncake": run_pb2.DATASET_FORMAT_MOONCAKE_TRACE, "azure": run_pb2.DATASET_FORMAT_AZURE_TRACE}
# A --trace stage lasts the trace's span at the replay speed plus this, so its last request is sent.
TRACE_GRACE_S = 1.0


def trace_format(path: Path, given: str | None) -> run_pb2.DatasetFormat.ValueType:
    """The format of a --trace file: --trace-format, else .csv is Azure and anything else Mooncake."""
    if given:
        return TRACE_FORMATS[given]
    return (
        run_pb2.DATASET_FORMAT_AZURE_TRACE if path.suffix.lower() == ".csv" else run_pb2.DATASET_FORMAT_MOONCAKE_TRACE
    )


def tokenizer_file(path: Path) -> Path:
    """The tokenizer.json a --tokenizer names (the file, or a model directory holding one)."""
    from common.tokenizer import Tokenizer, TokenizerError

    try:
        Tokenizer.from_path(path)
    except (TokenizerError, OSError) as exc:
        raise argparse.ArgumentTypeError(f"--tokenizer {exc}") from None
    return path / "tokenizer.json" if path.is_dir() else path


def finish_trace_stage(spec: run_pb2.RunSpec, entry_count: int, span_s: float, args: argparse.Namespace) -> None:
    """A --trace run's stage, once the upload told the trace's size: without --duration and
    --requests, the whole trace (its requests, and its span at the replay speed plus
    TRACE_GRACE_S: the stage ends after the last arrival; requests in flight finish)."""
    speed = spec.workload.trace.replay_speed or 1.0
    for stage in spec.stages:
        if stage.WhichOneof("load") != "trace_replay" or args.duration is not None or args.requests:
            continue
        if entry_count:
            stage.requests = entry_count
        if span_s > 0 or entry_count:
            _set_duration(stage.duration, span_s / speed + TRACE_GRACE_S)


def warmup(text: str) -> tuple[float, int]:
    """`10s` (a duration) or `20req` (a request count)."""
    lowered = text.strip().lower()
    for suffix in ("requests", "request", "req"):
        if lowered.endswith(suffix):
            try:
                return 0.0, int(lowered.removesuffix(suffix))
            except ValueError:
                break
    return duration(text), 0


def slo(text: str) -> dict[str, float]:
    """`ttft=500ms,tpot=50ms,e2e=10s` as seconds per metric."""
    out: dict[str, float] = {}
    for part in text.split(","):
        name, sep, value = part.partition("=")
        name = name.strip().lower()
        if not sep or name not in ("ttft", "tpot", "e2e"):
            raise argparse.ArgumentTypeError(f"expected ttft=, tpot= or e2e= with a duration; got {part!r}")
        out[name] = duration(value)
    return out


def add_spec_arguments(parser: argparse.ArgumentParser) -> None:
    target = parser.add_argument_group("target")
    target.add_argument("--target", required=True, help="base URL of the OpenAI API, e.g. http://h:8000/v1")
    target.add_argument("--model", required=True, help="model name sent with each request")
    target.add_argument("--api-kind", choices=["chat", "completions"], default="chat")
    target.add_argument("--no-stream", action="store_true", help="non-streaming requests (no TTFT then)")
    target.add_argument("--header", type=header, action="append", default=[], help="extra HTTP header NAME:VALUE")
    target.add_argument(
        "--target-api-key",
        default=os.environ.get(TARGET_API_KEY_ENV, ""),
        help=f"API key of the model server (default: ${TARGET_API_KEY_ENV}); never shown again",
    )
    target.add_argument("--request-timeout", type=duration, default=None, help="per-request timeout (default 300s)")
    target.add_argument("--insecure", action="store_true", help="skip TLS certificate verification of the target")
    target.add_argument(
        "--unreachable-timeout",
        type=duration,
        default=None,
        help="fail the stage when no connection to the target could be opened for this long (default 10s)",
    )
    target.add_argument(
        "--skip-preflight",
        action="store_true",
        help="start the load without first checking the target (GET /models and one small request)",
    )
    target.add_argument(
        "--extra-body", default="", help="JSON merged into each request body, e.g. '{\"cache_prompt\": false}'"
    )

    load = parser.add_argument_group("load (one stage per value of --concurrency or --rate)")
    shape = load.add_mutually_exclusive_group()
    shape.add_argument(
        "--concurrency",
        type=int_list,
        help="closed loop: requests in flight, e.g. 1,8,32 (conversations: sessions in progress)",
    )
    shape.add_argument(
        "--rate", type=float_list, help="open loop: requests per second, e.g. 2,4,8,16 (conversations: sessions/s)"
    )
    shape.add_argument(
        "--scenario",
        choices=sorted(SCENARIOS),
        help="named scenario (`llm-loadtest scenarios`); needs --peak-concurrency or --peak-rate",
    )
    load.add_argument("--peak-concurrency", type=int, help="peak of a --scenario, closed loop")
    load.add_argument("--peak-rate", type=float, help="peak of a --scenario, open loop (requests/s)")
    load.add_argument("--arrival", choices=sorted(ARRIVALS), help="open loop arrivals (default poisson)")
    load.add_argument("--burstiness", type=float, help="gamma shape for --arrival gamma (1 = Poisson, <1 burstier)")
    load.add_argument(
        "--max-concurrency",
        type=int,
        default=0,
        help="open loop: cap on requests in flight (conversations: on sessions in progress)",
    )
    load.add_argument(
        "--duration",
        type=duration,
        default=None,
        help="duration of each stage, e.g. 30s (default 10s, none with --requests; overrides scenarios)",
    )
    load.add_argument(
        "--requests",
        type=int,
        default=0,
        help="requests per stage (with --duration: whichever first; conversations: turns)",
    )
    load.add_argument(
        "--warmup",
        type=warmup,
        default=(0.0, 0),
        help="excluded from metrics: 10s or 20req per stage; part of the stage, not added to it (--duration 30s "
        "--warmup 10s measures 20 s; --requests counts warmup requests too)",
    )
    load.add_argument("--ramp", type=duration, default=0.0, help="linear ramp of the load at the start of each stage")
    load.add_argument("--agents", type=int, default=1, help="agents sharing each stage")
    load.add_argument(
        "--agent-selector",
        type=selector,
        default={},
        metavar="K=V[,K=V]",
        help="only agents with these labels, e.g. zone=a,gpu=h100",
    )
    load.add_argument(
        "--agent-wait",
        type=duration,
        default=None,
        metavar="DURATION",
        help="how long the run may wait for enough matching agents before it fails (default 5m)",
    )
    load.add_argument(
        "--on-agent-loss",
        choices=sorted(LOSS_POLICIES),
        default="redistribute",
        help="when an agent is lost mid-stage: others take over its share (default), continue with "
        "less load (flagged), or fail the run",
    )

    work = parser.add_argument_group("workload")
    work.add_argument("--input-tokens", type=lengths, default=None, help="prompt length: 128, 64-256 or normal:200,50")
    work.add_argument("--output-tokens", type=lengths, default=None, help="max_tokens: 128, 64-256 or normal:200,50")
    work.add_argument("--shared-prefix", type=int, default=0, help="tokens of prefix shared by every prompt")
    work.add_argument(
        "--dataset",
        type=Path,
        help="prompts from a .jsonl, ShareGPT .json or .csv file of any size, uploaded to the controller "
        "(once: content-addressed) and referred to by id",
    )
    work.add_argument("--dataset-format", choices=["jsonl", "sharegpt", "csv"], help="default: from the file extension")
    work.add_argument(
        "--prefix-groups", type=int, default=0, help="with --shared-prefix: K different prefixes, each prompt draws one"
    )
    work.add_argument(
        "--prefix-popularity",
        type=prefix_popularity,
        default=None,
        help="how prompts draw a prefix group: uniform (default), zipf or zipf:S (weight 1/k^S)",
    )
    work.add_argument(
        "--tokenizer",
        type=Path,
        default=None,
        help="the model's tokenizer.json (or a model directory): exact prompt lengths and counts (uploaded)",
    )
    work.add_argument(
        "--trace", type=Path, help="replay a trace's arrivals and lengths: Mooncake .jsonl or Azure .csv (uploaded)"
    )
    work.add_argument("--trace-format", choices=sorted(TRACE_FORMATS), help="default: .csv is azure, else mooncake")
    work.add_argument("--replay-speed", type=float, default=None, help="trace time scale: 2.0 replays twice as fast")
    work.add_argument(
        "--trace-block-tokens", type=int, default=None, help="tokens per Mooncake hash_ids block (default 512)"
    )
    work.add_argument("--min-prompt-words", type=int, default=0, help="dataset filter")
    work.add_argument("--max-prompt-words", type=int, default=0, help="dataset filter")
    work.add_argument(
        "--turns",
        type=lengths,
        default=None,
        help="conversations: turns per session, 3, 2-6 or normal:4,1 (each turn sends the whole history "
        "with the server's replies; --concurrency then counts sessions in progress, --rate session starts "
        "per second; --input-tokens / --output-tokens are each turn's new prompt and max_tokens)",
    )
    work.add_argument(
        "--think-time",
        type=think_time,
        default=None,
        help="conversations: pause between a reply and the next turn, 2s, 1s-5s (uniform) or exp:3s "
        "(exponential mean); default none",
    )
    work.add_argument(
        "--system-prompt-tokens",
        type=int,
        default=0,
        help="conversations: a system prompt of this many tokens, the same in every session",
    )
    work.add_argument(
        "--all-turns",
        action="store_true",
        help="with --dataset: replay every user turn of each entry as a conversation (the server's replies "
        "in place of the dataset's; --concurrency counts sessions)",
    )
    work.add_argument("--ignore-eos", action="store_true", help="send ignore_eos so outputs have exactly max_tokens")
    work.add_argument("--min-tokens", action="store_true", help="send min_tokens = max_tokens (vLLM)")
    work.add_argument("--seed", type=int, default=0, help="seed of every random choice (0: random, shown in the spec)")
    verdict = parser.add_argument_group("SLOs and checks (the run's verdict and exit code)")
    verdict.add_argument("--slo", type=slo, default=None, help="goodput objectives, e.g. ttft=500ms,tpot=50ms,e2e=10s")
    verdict.add_argument(
        "--check",
        action="append",
        default=[],
        metavar="EXPR",
        help="pass/fail per stage, e.g. 'p99(ttft) < 500ms', 'error_rate < 1%%' (repeatable)",
    )
    verdict.add_argument(
        "--abort-on-fail",
        action="append",
        default=[],
        metavar="EXPR",
        help="a check that stops the run (FAILED) as soon as it is lost over the last 10 s",
    )
    _add_search_arguments(parser)
    server = parser.add_argument_group("server metrics (the model server's own view, docs/server-metrics.md)")
    server.add_argument(
        "--server-metrics",
        action="append",
        default=[],
        metavar="URL",
        help="Prometheus endpoint of the model server to scrape during each stage, e.g. "
        "http://model:8000/metrics (repeatable)",
    )
    server.add_argument("--scrape-interval", type=duration, default=None, help="time between scrapes (default 1s)")
    server.add_argument(
        "--metric-filter",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only keep server metrics matching this pattern, e.g. 'vllm:*' (repeatable; default: all)",
    )
    server.add_argument(
        "--mismatch-tolerance",
        type=float,
        default=None,
        metavar="PERCENT",
        help="client vs server token/request counts may differ by this much (default 2)",
    )
    parser.add_argument("--name", default="", help="display name of the run (shown by run, runs list and reports)")
    parser.add_argument(
        "--series",
        default="",
        metavar="NAME",
        help="the benchmark series the run belongs to (its baseline and history: runs baseline, runs history)",
    )
    parser.add_argument(
        "--label",
        type=label,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a label of the run, e.g. commit=$GIT_SHA (repeatable); runs history --label KEY names runs by it",
    )


def _add_search_arguments(parser: argparse.ArgumentParser) -> None:
    search = parser.add_argument_group(
        "capacity search (docs/capacity.md): instead of stages, probes planned one at a time until the highest "
        "load within --slo is found"
    )
    search.add_argument(
        "--search",
        choices=sorted(SEARCH_VARIABLES),
        default=None,
        help="search the capacity by concurrency (closed loop) or request rate (open loop); needs --slo, no "
        "stage flags",
    )
    search.add_argument(
        "--goodput-target",
        type=percent,
        default=None,
        metavar="PERCENT",
        help="a probe passes when this share of its requests meets every SLO (default 95%%)",
    )
    search.add_argument(
        "--search-min",
        type=positive_number,
        default=None,
        metavar="N",
        help="lowest load probed, the first probe (default 1)",
    )
    search.add_argument(
        "--search-max",
        type=positive_number,
        default=None,
        metavar="N",
        help="highest load probed (default 1024 concurrency, 1000 req/s)",
    )
    search.add_argument(
        "--search-tolerance",
        type=tolerance_percent,
        default=None,
        metavar="PERCENT",
        help="converged when the lowest failing load is within this much above the highest passing (default 5%%)",
    )
    search.add_argument(
        "--probe-duration",
        type=positive_duration,
        default=None,
        metavar="DURATION",
        help="how long each probe sends load, warmup included (default 30s)",
    )
    search.add_argument(
        "--probe-warmup",
        type=duration,
        default=None,
        metavar="DURATION",
        help="first part of each probe left out of its judgement (default a sixth of the probe)",
    )
    search.add_argument(
        "--min-requests",
        type=positive_int,
        default=None,
        metavar="N",
        help="a probe with fewer counted requests is repeated at the same load (default 100)",
    )
    search.add_argument(
        "--max-probes", type=positive_int, default=None, metavar="N", help="stop after this many probes (default 16)"
    )
    search.add_argument(
        "--cost-per-hour",
        type=positive_number,
        default=None,
        metavar="USD",
        help="the deployment's cost per hour: the cost per 1M output tokens at capacity",
    )
    not_from_env(
        search.add_argument(
            "--resume",
            default=None,
            metavar="RUN_ID",
            help="continue the search of this earlier run (after a controller restart): its probes count, and its "
            "search settings and SLO are used where not given",
        )
    )


def _search_given(args: argparse.Namespace) -> list[str]:
    """The search flags given (other than --search and --resume)."""
    names = (
        "goodput_target",
        "search_min",
        "search_max",
        "search_tolerance",
        "probe_duration",
        "probe_warmup",
        "min_requests",
        "max_probes",
        "cost_per_hour",
    )
    return ["--" + n.replace("_", "-") for n in names if getattr(args, n, None) is not None]


def _search_spec(args: argparse.Namespace) -> run_pb2.SearchSpec | None:
    """The SearchSpec the search flags describe; None without --search or --resume. Fields not
    given stay unset (the controller's defaults, or the resumed run's: `resume_search`)."""
    if getattr(args, "search", None) is None and getattr(args, "resume", None) is None:
        given = _search_given(args)
        if given:
            raise argparse.ArgumentTypeError(f"{given[0]} needs --search concurrency|rate")
        return None
    for flag, attr, unset in STAGE_FLAGS:
        if getattr(args, attr, unset) != unset:
            instead = _SEARCH_INSTEAD.get(flag)
            hint = f" (use {instead})" if instead else ""
            raise argparse.ArgumentTypeError(f"--search plans its own stages: {flag} cannot be given with it{hint}")
    if args.arrival is not None and args.search == "concurrency":
        raise argparse.ArgumentTypeError("--arrival applies to a rate search only (--search rate)")
    if args.arrival == "gamma":
        raise argparse.ArgumentTypeError("--search rate takes --arrival poisson or constant")
    if args.slo is None and args.resume is None:
        raise argparse.ArgumentTypeError("--search needs --slo, e.g. --slo ttft=500ms,tpot=50ms")
    search = run_pb2.SearchSpec(resume_from_run_id=args.resume or "")
    if args.search is not None:
        search.variable = SEARCH_VARIABLES[args.search]
    if args.arrival is not None:
        search.arrival = ARRIVALS[args.arrival]
    if args.goodput_target is not None:
        search.goodput_target_percent = args.goodput_target
    for flag, attr in (("--search-min", "search_min"), ("--search-max", "search_max")):
        value = getattr(args, attr)
        if value is not None and args.search == "concurrency" and value != int(value):
            raise argparse.ArgumentTypeError(f"{flag}: a concurrency is a whole number, got {value:g}")
    if args.search_min is not None:
        search.min = args.search_min
    if args.search_max is not None:
        search.max = args.search_max
    if args.search_min is not None and args.search_max is not None and args.search_min > args.search_max:
        raise argparse.ArgumentTypeError(f"--search-min {args.search_min:g} is above --search-max {args.search_max:g}")
    if args.search_tolerance is not None:
        search.tolerance_percent = args.search_tolerance
    if args.probe_duration is not None:
        _set_duration(search.probe_duration, args.probe_duration)
    if args.probe_warmup is not None:
        if args.probe_duration is not None and args.probe_warmup >= args.probe_duration:
            raise argparse.ArgumentTypeError("--probe-warmup must be shorter than --probe-duration")
        _set_duration(search.probe_warmup, args.probe_warmup)
    if args.min_requests is not None:
        search.min_requests = args.min_requests
    if args.max_probes is not None:
        search.max_probes = args.max_probes
    if args.cost_per_hour is not None:
        search.cost_per_hour_usd = args.cost_per_hour
    return search


def resume_search(spec: run_pb2.RunSpec, earlier: run_pb2.Run) -> None:
    """Completes `spec` (from `run --resume`) with the earlier run's search settings and SLO
    where the command line left them out; raises ArgumentTypeError when the earlier run was no
    search or searched the other variable."""
    if not earlier.spec.HasField("search"):
        raise argparse.ArgumentTypeError(f"--resume: run {earlier.id} is not a capacity search")
    # As plain messages: the field names below come from the descriptor, not from literals.
    mine: Message = spec.search
    theirs: Message = earlier.spec.search
    if spec.search.variable and spec.search.variable != earlier.spec.search.variable:
        raise argparse.ArgumentTypeError(
            f"--resume: run {earlier.id} searched {variable_name(earlier.spec.search.variable)}, not "
            f"{variable_name(spec.search.variable)}"
        )
    for field in run_pb2.SearchSpec.DESCRIPTOR.fields:
        if field.name == "resume_from_run_id":
            continue
        given = mine.HasField(field.name) if field.has_presence else bool(getattr(mine, field.name))
        known = theirs.HasField(field.name) if field.has_presence else bool(getattr(theirs, field.name))
        if given or not known:
            continue
        if field.message_type is not None:
            getattr(mine, field.name).CopyFrom(getattr(theirs, field.name))
        else:
            setattr(mine, field.name, getattr(theirs, field.name))
    if not spec.HasField("slo"):
        spec.slo.CopyFrom(earlier.spec.slo)


def _set_duration(field: object, seconds: float) -> None:
    field.FromNanoseconds(int(seconds * 1e9))  # type: ignore[attr-defined]


def _stages(args: argparse.Namespace) -> list[run_pb2.Stage]:
    stage_s = args.duration if args.duration is not None else (0.0 if args.requests else DEFAULT_STAGE_S)
    stages: list[run_pb2.Stage] = []
    if args.scenario:
        if (args.peak_concurrency is None) == (args.peak_rate is None):
            raise argparse.ArgumentTypeError("--scenario needs exactly one of --peak-concurrency and --peak-rate")
        for st in SCENARIOS[args.scenario].stages:
            stage = run_pb2.Stage()
            if args.peak_concurrency is not None:
                stage.concurrency = int(scale(args.peak_concurrency, st.fraction, True))
            else:
                stage.request_rate = scale(args.peak_rate, st.fraction, False)
            stage.requests = st.requests or args.requests
            _set_duration(stage.duration, args.duration if args.duration is not None else st.duration_s)
            if st.ramp_s and not args.ramp:
                _set_duration(stage.ramp, min(st.ramp_s, args.duration or st.ramp_s))
            stages.append(stage)
    elif args.rate:
        stages = [run_pb2.Stage(request_rate=r) for r in args.rate]
    else:
        stages = [run_pb2.Stage(concurrency=c) for c in (args.concurrency or [1])]
    for stage in stages:
        if not args.scenario:
            stage.requests = args.requests
            if stage_s:
                _set_duration(stage.duration, stage_s)
        if stage.WhichOneof("load") == "request_rate":
            if args.arrival or args.burstiness is not None:
                stage.arrival = ARRIVALS[args.arrival or "gamma"]
            if args.burstiness is not None:
                stage.burstiness = args.burstiness
            stage.max_concurrency = args.max_concurrency
        warm_s, warm_n = args.warmup
        if warm_s:
            _set_duration(stage.warmup_duration, warm_s)
        stage.warmup_requests = warm_n
        if args.ramp:
            _set_duration(stage.ramp, args.ramp)
    return stages


_UINT32, _UINT64 = 2**32 - 1, 2**64 - 1


def _check_integers(args: argparse.Namespace) -> None:
    """Integer flags the spec's fields cannot hold are usage errors, not a protobuf ValueError's
    traceback (the controller's own limits, smaller, come back as INVALID_ARGUMENT)."""
    flags = [
        ("--requests", args.requests, _UINT64),
        ("--warmup", args.warmup[1], _UINT64),
        ("--seed", args.seed, _UINT64),
        ("--max-concurrency", args.max_concurrency, _UINT32),
        ("--shared-prefix", args.shared_prefix, _UINT32),
        ("--system-prompt-tokens", getattr(args, "system_prompt_tokens", 0), _UINT32),
        ("--prefix-groups", getattr(args, "prefix_groups", 0), _UINT32),
        ("--trace-block-tokens", getattr(args, "trace_block_tokens", None) or 0, _UINT32),
        ("--agents", args.agents, _UINT32),
        ("--min-prompt-words", args.min_prompt_words, _UINT32),
        ("--max-prompt-words", args.max_prompt_words, _UINT32),
    ]
    flags += [("--concurrency", c, _UINT32) for c in args.concurrency or ()]
    for flag, value, high in flags:
        if not 0 <= value <= high:
            raise argparse.ArgumentTypeError(f"{flag}: must be between 0 and {high}, got {value}")


_PROMPT_FORMATS = {
    "jsonl": run_pb2.DATASET_FORMAT_JSONL,
    "sharegpt": run_pb2.DATASET_FORMAT_SHAREGPT,
    "csv": run_pb2.DATASET_FORMAT_CSV,
}


def dataset_file_format(path: Path, given: str | None) -> int:
    """`--dataset-format`, else from the extension: .jsonl, .csv, otherwise ShareGPT JSON."""
    if given:
        return _PROMPT_FORMATS[given]
    suffix = path.suffix.lower()
    return _PROMPT_FORMATS["jsonl" if suffix == ".jsonl" else "csv" if suffix == ".csv" else "sharegpt"]


def build_spec(args: argparse.Namespace) -> run_pb2.RunSpec:
    """The RunSpec the `run` flags describe (raises ArgumentTypeError for bad combinations)."""
    _check_integers(args)
    spec = run_pb2.RunSpec(display_name=args.name, series=getattr(args, "series", ""))
    spec.labels.update(dict(getattr(args, "label", ())))
    t = spec.target
    problem = credential_problem(args.target)
    if problem:
        raise argparse.ArgumentTypeError(f"--target {problem}")  # never repeats the URL: it holds the secret
    t.base_url, t.model = args.target, args.model
    t.api_kind = run_pb2.API_KIND_COMPLETIONS if args.api_kind == "completions" else run_pb2.API_KIND_CHAT
    t.api_key = args.target_api_key
    t.stream = not args.no_stream
    t.insecure_skip_verify = args.insecure
    for name, value in args.header:
        t.headers[name] = value
    if args.request_timeout:
        _set_duration(t.request_timeout, args.request_timeout)
    if args.unreachable_timeout:
        _set_duration(t.unreachable_timeout, args.unreachable_timeout)
    spec.skip_preflight = args.skip_preflight
    if args.extra_body:
        try:
            body = json.loads(args.extra_body)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"--extra-body is not JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise argparse.ArgumentTypeError("--extra-body must be a JSON object")
        t.extra_body.CopyFrom(struct_pb2.Struct())
        t.extra_body.update(body)

    w = spec.workload
    w.seed, w.ignore_eos, w.pin_min_tokens = args.seed, args.ignore_eos, args.min_tokens
    _conversation_flags(args)
    if getattr(args, "think_time", None) is not None:
        w.think_time.CopyFrom(args.think_time)
    trace = getattr(args, "trace", None)
    if getattr(args, "tokenizer", None) is not None:
        tokenizer_file(args.tokenizer)  # a usage error now rather than after connecting
    if trace is None and (
        getattr(args, "replay_speed", None) is not None or getattr(args, "trace_block_tokens", None) is not None
    ):
        raise argparse.ArgumentTypeError("--replay-speed and --trace-block-tokens apply to --trace")
    if trace is not None:
        if not trace.is_file():
            raise argparse.ArgumentTypeError(f"--trace {trace}: no such file")
        _trace_workload(spec, args)  # the trace is the workload: no prompts of its own
    elif args.dataset is not None:
        # The file itself is uploaded by `run` (client/commands.py), which sets `dataset_id`.
        w.dataset.format = dataset_file_format(args.dataset, args.dataset_format)  # type: ignore[assignment]
        w.dataset.name = args.dataset.name[-200:]
        w.dataset.min_prompt_words = args.min_prompt_words
        w.dataset.max_prompt_words = args.max_prompt_words
        w.dataset.all_turns = getattr(args, "all_turns", False)
    elif _conversation(args):
        c = w.conversation
        c.SetInParent()
        if args.turns is not None:
            c.turns.CopyFrom(args.turns)
        if args.input_tokens is not None:
            c.input_tokens.CopyFrom(args.input_tokens)
        if args.output_tokens is not None:
            c.output_tokens.CopyFrom(args.output_tokens)
        c.system_prompt_tokens = args.system_prompt_tokens
    else:
        w.synthetic.SetInParent()
        if args.input_tokens is not None:
            w.synthetic.input_tokens.CopyFrom(args.input_tokens)
        if args.output_tokens is not None:
            w.synthetic.output_tokens.CopyFrom(args.output_tokens)
        w.synthetic.shared_prefix_tokens = args.shared_prefix
        w.synthetic.prefix_groups = getattr(args, "prefix_groups", 0)
        if getattr(args, "prefix_popularity", None) is not None:
            w.synthetic.prefix_popularity, w.synthetic.zipf_exponent = args.prefix_popularity
    spec.placement.agents = args.agents
    spec.placement.selector.update(getattr(args, "agent_selector", {}))
    if getattr(args, "agent_wait", None) is not None:
        _set_duration(spec.placement.wait_timeout, args.agent_wait)
    spec.placement.on_agent_loss = LOSS_POLICIES[getattr(args, "on_agent_loss", "redistribute")]
    search = _search_spec(args)
    if search is not None:
        spec.search.CopyFrom(search)
    elif trace is None:
        spec.stages.extend(_stages(args))
    for name, seconds in (args.slo or {}).items():
        _set_duration(getattr(spec.slo, name), seconds)
    spec.checks.extend(run_pb2.Check(expression=e) for e in args.check)
    spec.checks.extend(run_pb2.Check(expression=e, abort_on_fail=True) for e in args.abort_on_fail)
    _server_metrics(spec.server_metrics, args)
    return spec


def _conversation(args: argparse.Namespace) -> bool:
    """Whether the flags ask for synthetic conversations."""
    return (
        getattr(args, "turns", None) is not None
        or getattr(args, "think_time", None) is not None
        or bool(getattr(args, "system_prompt_tokens", 0))
    )


def _conversation_flags(args: argparse.Namespace) -> None:
    """Refuse conversation flags that contradict the rest."""
    dataset = args.dataset is not None
    all_turns = getattr(args, "all_turns", False)
    if all_turns and not dataset:
        raise argparse.ArgumentTypeError("--all-turns needs --dataset")
    if dataset:
        for flag, given in (
            ("--turns", getattr(args, "turns", None) is not None),
            ("--system-prompt-tokens", bool(getattr(args, "system_prompt_tokens", 0))),
        ):
            if given:
                raise argparse.ArgumentTypeError(f"{flag} is for synthetic conversations, not --dataset")
        if getattr(args, "think_time", None) is not None and not all_turns:
            raise argparse.ArgumentTypeError("--think-time with --dataset needs --all-turns")
    elif _conversation(args) and args.shared_prefix:
        raise argparse.ArgumentTypeError(
            "--shared-prefix does not apply to conversations: their shared part is --system-prompt-tokens"
        )


def _trace_workload(spec: run_pb2.RunSpec, args: argparse.Namespace) -> None:
    """`--trace`: one trace_replay stage; the file's dataset id and the stage's length are
    filled in after the upload (`finish_trace_stage`)."""
    given = [
        flag
        for flag, value in (
            ("--dataset", args.dataset),
            ("--concurrency", args.concurrency),
            ("--rate", args.rate),
            ("--scenario", args.scenario),
            ("--input-tokens", args.input_tokens),
            ("--output-tokens", args.output_tokens),
            ("--shared-prefix", args.shared_prefix),
            ("--prefix-groups", getattr(args, "prefix_groups", 0)),
            ("--max-concurrency", args.max_concurrency),
            ("--ramp", args.ramp),
            ("--turns", getattr(args, "turns", None)),
            ("--think-time", getattr(args, "think_time", None)),
            ("--system-prompt-tokens", getattr(args, "system_prompt_tokens", 0)),
        )
        if value
    ]
    if _search_spec(args) is not None:
        given.append("--search")
    if given:
        raise argparse.ArgumentTypeError(f"--trace replays the trace's own requests and times: not with {given[0]}")
    trace = spec.workload.trace
    if args.replay_speed is not None:
        if not 0 < args.replay_speed <= 1000:  # also NaN
            raise argparse.ArgumentTypeError(f"--replay-speed must be > 0 and at most 1000, got {args.replay_speed}")
        trace.replay_speed = args.replay_speed
    else:
        trace.replay_speed = 1.0
    if args.trace_block_tokens is not None:
        trace.block_tokens = args.trace_block_tokens
    stage = run_pb2.Stage(trace_replay=True, requests=args.requests)
    if args.duration is not None:
        _set_duration(stage.duration, args.duration)
    warm_s, warm_n = args.warmup
    if warm_s:
        _set_duration(stage.warmup_duration, warm_s)
    stage.warmup_requests = warm_n
    spec.stages.append(stage)


def _server_metrics(sm: run_pb2.ServerMetricsSpec, args: argparse.Namespace) -> None:
    # Touched only when a flag is given, so a spec without them has no server_metrics at all.
    if getattr(args, "server_metrics", None):
        sm.endpoints.extend(args.server_metrics)
    if getattr(args, "metric_filter", None):
        sm.metric_filters.extend(args.metric_filter)
    if getattr(args, "scrape_interval", None) is not None:
        _set_duration(sm.scrape_interval, args.scrape_interval)
    if getattr(args, "mismatch_tolerance", None) is not None:
        sm.mismatch_tolerance_percent = args.mismatch_tolerance


def spec_parser() -> argparse.ArgumentParser:
    """A parser of just the spec flags (for building specs from code, e.g. quickstart)."""
    parser = argparse.ArgumentParser(add_help=False)
    add_spec_arguments(parser)
    return parser
