"""User commands: `run` (create, watch, print the table; Ctrl-C cancels; with `--compare-to`,
compare with a series' baseline and gate on it) and
`runs list|get|cancel|delete|result|export|compare|baseline|history` (the read ones also from a
`--db` file; `baseline` and `history` are client/series.py)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, cast

import grpc

from client import exitcodes, formats, live, render, series, spec_builder
from client.envconfig import not_from_env
from client.scenarios import SCENARIOS, describe
from client.sdk import ControllerClient
from client.uploads import upload_run_files
from common.grpc_options import API_KEY_ENV
from common.proto.loadtest.v1 import run_pb2
from common.stats import DEFAULT_CONFIDENCE_PERCENT
from common.tls import add_client_tls_arguments, client_tls_from_args

if TYPE_CHECKING:
    from controller.local import DomainError

CONTROLLER_ENV = "LLM_LOADTEST_CONTROLLER"
DEFAULT_PORT = 50051
# After the first Ctrl-C, how long `run` waits for the cancelled run to end before detaching.
# The controller's CancelRun itself waits up to 10 s for the agents to stop and flush.
CANCEL_WAIT_S = 30.0
INTERRUPT_REASON = "cancelled from the CLI (Ctrl-C)"


def controller_address(text: str) -> str:
    """HOST[:PORT] with the port defaulting to 50051 (gRPC itself would dial 443); a target
    with a scheme (`dns:///...`, `unix:...`) is left as it is."""
    text = text.strip()
    if not text:
        raise argparse.ArgumentTypeError("expected HOST:PORT")
    if "://" in text or text.startswith("unix:"):
        return text
    if text.startswith("["):  # [IPv6] or [IPv6]:PORT
        return text if "]:" in text else f"{text}:{DEFAULT_PORT}"
    if text.count(":") > 1:  # a bare IPv6 address
        return f"[{text}]:{DEFAULT_PORT}"
    return text if ":" in text else f"{text}:{DEFAULT_PORT}"


def add_connection_arguments(parser: argparse.ArgumentParser, *, read_only: bool = False) -> None:
    """The flags that reach a controller; a read-only command also takes `--db`."""
    parser.add_argument(
        "--controller",
        type=controller_address,
        default=os.environ.get(CONTROLLER_ENV, f"127.0.0.1:{DEFAULT_PORT}"),
        help=f"controller HOST[:PORT], port {DEFAULT_PORT} when left out (default: ${CONTROLLER_ENV} or "
        f"127.0.0.1:{DEFAULT_PORT})",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"controller API key (default: ${API_KEY_ENV})"
    )
    parser.add_argument("--timeout", type=float, default=30.0, help="deadline of each call, seconds")
    if read_only:
        not_from_env(
            parser.add_argument(
                "--db",
                type=Path,
                default=None,
                metavar="PATH",
                help="read this controller database file directly (read-only; no controller needed)",
            )
        )
    add_client_tls_arguments(parser)


def open_client(args: argparse.Namespace) -> ControllerClient:
    """A client for the controller the connection flags name (TLS when asked for)."""
    return ControllerClient(args.controller, args.api_key, args.timeout, client_tls_from_args(args))


def open_reader(args: argparse.Namespace) -> ControllerClient:
    """The read calls of the controller named by the flags, or of the `--db` file when given
    (controller/local.py; raises FileNotFoundError for a missing file)."""
    if getattr(args, "db", None) is not None:
        from controller.local import LocalRunReader

        return cast(ControllerClient, LocalRunReader(args.db))
    return open_client(args)


def failure(exc: BaseException, args: argparse.Namespace, code: int = exitcodes.FAILED) -> int:
    """Prints what went wrong and what to do about it; returns the exit code: UNREACHABLE when
    no controller answered, else `code` (the command's own meaning of a refused call)."""
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            print(
                f"error: no controller at {args.controller} — start one with `llm-loadtest controller` or set "
                f"--controller ({exc.details()})",
                file=sys.stderr,
            )
            return exitcodes.UNREACHABLE
        print(render.rpc_error_text(exc), file=sys.stderr)
        return code
    if isinstance(exc, FileNotFoundError):
        print(f"error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    from controller.local import error_text

    print(error_text(cast("DomainError", exc)), file=sys.stderr)
    return code


def failure_types(args: argparse.Namespace) -> tuple[type[BaseException], ...]:
    """What a call may raise that `failure` words: the domain's errors too with `--db` (whose
    reader has loaded the controller's code already; a remote call does not load it)."""
    if getattr(args, "db", None) is None:
        return grpc.aio.AioRpcError, FileNotFoundError
    from controller.local import DomainError

    return grpc.aio.AioRpcError, DomainError, FileNotFoundError


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    add_connection_arguments(parser)
    spec_builder.add_spec_arguments(parser)
    add_output_arguments(parser)
    parser.add_argument(
        "--detach",
        "--no-watch",
        dest="detach",
        action="store_true",
        help="create the run, print its id and return: the run goes on (fire and forget)",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        metavar="N",
        help="run the spec N times (2-100), one run after another with fresh seeds, as one group: "
        "its result's intervals include the variation between runs (docs/user-guide.md, Repeats)",
    )
    parser.add_argument(
        "--compare-to",
        default="",
        metavar="SERIES",
        help="the run joins this series (--series) and, when it ends, is compared with the series' baseline: "
        "the exit code is the worse of the run's and the comparison's (1 regressed, 3 inconclusive)",
    )
    parser.add_argument(
        "--compare-tolerance",
        type=float,
        default=10.0,
        metavar="PERCENT",
        help="with --compare-to: change counted as a regression, percent (default 10)",
    )


def add_output_arguments(parser: argparse.ArgumentParser) -> None:
    """`--json`, `--wide` and `--allow-suspect`, for the commands that print a result."""
    parser.add_argument("--json", action="store_true", help="print the result as JSON (docs/json.md)")
    parser.add_argument("--wide", action="store_true", help="every column of the table, however wide")
    parser.add_argument(
        "--allow-suspect",
        action="store_true",
        help="judge checks on stages flagged as suspect (saturated load generator, lost agents) instead of "
        "calling the verdict INCONCLUSIVE (exit 3)",
    )


async def watch_until_done(client: ControllerClient, run_id: str) -> run_pb2.RunResult:
    """Show live progress until the run ends; returns the final result."""
    return await live.watch_run(client, run_id, sys.stderr)


async def cmd_run(args: argparse.Namespace) -> int:
    try:
        spec = spec_builder.build_spec(args)
        if args.compare_to:
            if spec.series and spec.series != args.compare_to:
                raise argparse.ArgumentTypeError(
                    f"--series {spec.series} and --compare-to {args.compare_to}: a run is compared with the "
                    "baseline of its own series (give one of them)"
                )
            if args.detach:
                raise argparse.ArgumentTypeError("--compare-to compares when the run ends: not with --detach")
            spec.series = args.compare_to
    except (argparse.ArgumentTypeError, ValueError, OSError) as exc:
        print(f"llm-loadtest run: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE
    interrupts = Interrupts()
    try:
        with interrupts.installed():
            return await _run(args, spec, interrupts)
    except grpc.aio.AioRpcError as exc:
        return failure(exc, args, exitcodes.USAGE)
    except argparse.ArgumentTypeError as exc:  # `--resume` of a run that cannot be resumed
        print(f"llm-loadtest run: error: {exc}", file=sys.stderr)
        return exitcodes.USAGE


class Interrupts:
    """Ctrl-C (SIGINT) while `run` waits: counted, and waited for, instead of KeyboardInterrupt."""

    def __init__(self) -> None:
        self.count = 0
        self._event = asyncio.Event()

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGINT, self._interrupted)
        except (NotImplementedError, RuntimeError):  # no signals here (Windows, a thread)
            yield
            return
        try:
            yield
        finally:
            loop.remove_signal_handler(signal.SIGINT)

    def _interrupted(self) -> None:
        self.count += 1
        self._event.set()

    async def next(self) -> None:
        """Returns at the next Ctrl-C."""
        self._event.clear()
        await self._event.wait()


def _cancel_command(args: argparse.Namespace, run_id: str) -> str:
    return f"llm-loadtest runs cancel {run_id} --controller {args.controller}"


async def _run(args: argparse.Namespace, spec: run_pb2.RunSpec, interrupts: Interrupts) -> int:
    async with open_client(args) as client:
        await upload_run_files(client, args, spec)
        if getattr(args, "repeat", 1) > 1:
            from client.repeats import run_group

            return await run_group(args, client, spec, interrupts)
        if spec.search.resume_from_run_id:
            spec_builder.resume_search(spec, await client.get_run(spec.search.resume_from_run_id))
        run = await client.create_run(spec, request_id=uuid.uuid4().hex)
        name = f" ({spec.display_name})" if spec.display_name else ""
        print(f"created run {run.id}{name}", file=sys.stderr, flush=True)
        if args.detach:
            print(run.id)
            print(
                f"watch: llm-loadtest runs get {run.id} --controller {args.controller}; "
                f"cancel: {_cancel_command(args, run.id)}",
                file=sys.stderr,
            )
            return exitcodes.OK
        watch = asyncio.create_task(watch_until_done(client, run.id))
        first = asyncio.create_task(interrupts.next()) if not interrupts.count else None
        try:
            if first is not None:
                await asyncio.wait({watch, first}, return_when=asyncio.FIRST_COMPLETED)
            if not watch.done() and not await _cancel_and_wait(args, client, run.id, watch, interrupts):
                return exitcodes.INTERRUPTED
            result = await watch
        finally:
            for task in (watch, first):
                if task is not None and not task.done():
                    task.cancel()
        run = await client.get_run(run.id)
        code = print_result(args, run, result)
        if args.compare_to and not interrupts.count:
            # With --json the JSON document alone goes to stdout; the comparison to stderr.
            out = sys.stderr if args.json else sys.stdout
            compared = await series.gate_on_baseline(client, args.compare_to, run, args.compare_tolerance, out)
            code = code if compared is None else series.worse_exit_code(code, compared)
    return exitcodes.INTERRUPTED if interrupts.count else code


async def _cancel_and_wait(
    args: argparse.Namespace,
    client: ControllerClient,
    run_id: str,
    watch: asyncio.Task[run_pb2.RunResult],
    interrupts: Interrupts,
) -> bool:
    """After the first Ctrl-C: cancel the run and wait for it to end, counting down; True when
    it ended, False when a second Ctrl-C (or the wait running out) detached."""
    print(
        f"\nCtrl-C: cancelling run {run_id} and waiting for it to end (Ctrl-C again to detach and leave it running)",
        file=sys.stderr,
        flush=True,
    )
    cancel = asyncio.create_task(client.cancel_run(run_id, INTERRUPT_REASON))
    second = asyncio.create_task(interrupts.next())
    deadline = time.monotonic() + CANCEL_WAIT_S
    try:
        while not watch.done():
            left = deadline - time.monotonic()
            if left <= 0 or second.done():
                why = "Ctrl-C again" if second.done() else f"the run did not end within {CANCEL_WAIT_S:.0f} s"
                print(
                    f"detached ({why}): run {run_id} may still be running; to cancel it:\n"
                    f"  {_cancel_command(args, run_id)}",
                    file=sys.stderr,
                    flush=True,
                )
                return False
            print(f"waiting for run {run_id} to end: {left:.0f} s left", file=sys.stderr, flush=True)
            await asyncio.wait({watch, second}, timeout=min(1.0, left), return_when=asyncio.FIRST_COMPLETED)
        return True
    finally:
        second.cancel()
        if not cancel.done():
            cancel.cancel()
        elif not cancel.cancelled():
            cancel.exception()  # retrieved: FAILED_PRECONDITION when the run ended by itself meanwhile


def print_result(
    args: argparse.Namespace, run: run_pb2.Run, result: run_pb2.RunResult, *, details: bool = False
) -> int:
    """Print a result (table or JSON) with its warnings and checks; the exit code from the
    state and the verdict (INCONCLUSIVE when the checks were judged on suspect stages)."""
    allow = getattr(args, "allow_suspect", False)
    verdict = formats.honest_verdict(result, allow)
    warnings = formats.result_warnings(result)
    searched = result.HasField("capacity")
    capacity = formats.capacity_line(result.capacity, run.spec.search) if searched else None
    if args.json:
        cli: dict[str, object] = {"verdict": verdict, "warnings": warnings}
        if capacity is not None:
            cli["capacity"] = capacity
        print(render.to_json(result, cli=cli))
    else:
        wide = getattr(args, "wide", False)
        con = render.console(wide)
        # A search's stages are its probes: the probe table says what the stage table would, and how each was judged.
        con.print(render.probe_table(result, wide) if searched else render.result_table(result, wide))
        for extra in render.result_extras(result, wide):
            con.print(extra)
        if details:
            for part in render.result_details(result):
                con.print(part)
        if capacity is not None:
            print(capacity)
        if searched:  # the result table's caption has it otherwise
            for line in render.token_notes(result):
                con.print(line)
        shown = f" ({run.spec.display_name})" if run.spec.display_name else ""
        if result.HasField("group"):
            counted, repeats = len(result.group.counted_run_ids), len(result.group.run_ids)
            print(f"group id: {run.id}{shown}  state: {render.state_name(run.state)}  counted: {counted} of {repeats}")
        else:
            print(
                f"run id: {run.id}{shown}  state: {render.state_name(run.state)}"
                + (f"  reason: {run.state_reason}" if run.state_reason else "")
            )
    out = sys.stderr if args.json else sys.stdout
    for line in warnings:
        print(f"WARNING {line}", file=out)
    for check in result.checks:
        mark = "PASS" if check.passed else "FAIL"
        where = "run" if check.run_level else f"stage {check.stage_index}"
        print(f"check {mark} {where}: {check.expression} — {check.message}", file=out)
    if verdict not in ("NONE", "UNSPECIFIED"):
        print(f"verdict: {verdict}", file=out)
    if verdict == formats.VERDICT_INCONCLUSIVE:
        suspect = ", ".join(map(str, sorted(formats.suspect_stages(result))))
        print(
            f"  (checks judged on stage(s) {suspect}, whose numbers are suspect; --allow-suspect to accept them)",
            file=out,
        )
    if run.state != run_pb2.RUN_STATE_SUCCEEDED or verdict == "FAIL":
        return exitcodes.FAILED
    return exitcodes.INCONCLUSIVE if verdict == formats.VERDICT_INCONCLUSIVE else exitcodes.OK


def add_runs_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(
        dest="runs_command",
        required=True,
        metavar="{list,get,cancel,delete,result,export,compare,baseline,history}",
    )
    p = sub.add_parser("list", help="list runs, newest first")
    add_connection_arguments(p, read_only=True)
    p.add_argument("--state", choices=[n.removeprefix("RUN_STATE_").lower() for n in run_pb2.RunState.keys()[1:]])
    p.add_argument("--model", default="")
    p.add_argument("--series", default="", help="only the runs of this series (run --series)")
    p.add_argument("--group", default="", metavar="GROUP_ID", help="only the runs of this group of repeats (grp_...)")
    p.add_argument("--limit", type=int, default=50, help="how many runs to show")
    p.add_argument("--json", action="store_true", help="print a JSON array of runs (docs/json.md)")
    p.add_argument("--wide", action="store_true", help="every column (model, stages, reason)")
    for name, text in (
        ("get", "show one run"),
        ("cancel", "cancel a run"),
        ("delete", "delete a finished run"),
        ("result", "show a run's per-stage metrics (or a group's: grp_...)"),
    ):
        p = sub.add_parser(name, help=text)
        add_connection_arguments(p, read_only=name in ("get", "result"))
        p.add_argument("run_id")
        if name == "get":
            p.add_argument("--json", action="store_true", help="print the run as JSON (docs/json.md)")
            p.add_argument("--wide", action="store_true", help="every column (model, stages, reason)")
        if name == "cancel":
            p.add_argument("--reason", default="")
        if name == "result":
            add_output_arguments(p)
            p.add_argument(
                "--format",
                choices=formats.RESULT_FORMATS,
                default=None,
                help="table (default), json, markdown (for a PR) or vllm-json (vLLM bench serve keys)",
            )
            p.add_argument("--output-dir", type=Path, help="vllm-json: write <run>_stage<i>.json files here")
            p.add_argument("--summary", action="store_true", help="table: only the per-stage summary table")
    p = sub.add_parser("export", help="stream a run's per-request samples as CSV or JSON Lines")
    add_connection_arguments(p, read_only=True)
    p.add_argument("run_id")
    p.add_argument("--format", choices=formats.EXPORT_FORMATS, default="csv")
    p.add_argument("-o", "--output", type=Path, help="file to write (default: stdout)")
    p.add_argument("--include-warmup", action="store_true", help="include warmup samples (flagged)")
    p = sub.add_parser(
        "compare",
        help="compare runs with a baseline stage by stage (capacity searches by their "
        "capacity), telling changes from noise; exit 1 on a regression, 3 when the data cannot "
        "tell, 2 when nothing could be compared",
    )
    add_connection_arguments(p, read_only=True)
    p.add_argument("run_id", metavar="BASE", help="the baseline run")
    p.add_argument("others", nargs="+", metavar="OTHER", help="runs to compare with the baseline")
    p.add_argument(
        "--tolerance",
        type=float,
        default=10.0,
        help="change counted as a regression, percent of the baseline (error rate: percentage points)",
    )
    p.add_argument(
        "--confidence",
        type=float,
        default=DEFAULT_CONFIDENCE_PERCENT,
        help="confidence level, percent (80 to 99.9): a run without a real change is reported as "
        "regressed with a chance of at most 100 minus this",
    )
    p.add_argument(
        "--metric",
        action="append",
        default=[],
        dest="metrics",
        metavar="NAME",
        help="judge only this metric (repeatable; names as in the table, e.g. ttft_p99_ms); default: all",
    )
    p.add_argument("--all-metrics", action="store_true", help="show every compared metric, not only the key ones")
    p.add_argument("--json", action="store_true", help="print the comparison as JSON (docs/json.md)")
    series.add_series_parsers(sub, add_connection_arguments)


async def cmd_runs(args: argparse.Namespace) -> int:
    try:
        async with open_reader(args) as client:
            return await _runs(args, client)
    except failure_types(args) as exc:
        # A refused compare is a usage error: 1 means "regressed" there.
        return failure(exc, args, exitcodes.USAGE if args.runs_command == "compare" else exitcodes.FAILED)


async def _runs(args: argparse.Namespace, client: ControllerClient) -> int:
    command = args.runs_command
    if command == "list":
        state = run_pb2.RunState.Value(f"RUN_STATE_{args.state.upper()}") if args.state else 0
        runs: list[run_pb2.Run] = []
        token = ""
        while len(runs) < args.limit:
            page = await client.list_runs(
                min(100, args.limit - len(runs)), token, state, args.model, args.series, args.group
            )
            runs.extend(page.runs)
            token = page.next_page_token
            if not token:
                break
        if args.json:
            print(json.dumps([render.message_dict(r) for r in runs], indent=2, ensure_ascii=False))
        else:
            render.console(args.wide).print(render.runs_table(runs, args.wide))
        return exitcodes.OK
    if command == "get":
        run = await client.get_run(args.run_id)
        if args.json:
            print(render.to_json(run))
        else:
            render.console(args.wide).print(render.runs_table([run], args.wide))
            if run.state_reason:
                print(f"reason: {run.state_reason}")
        return exitcodes.OK
    if command == "cancel":
        run = await client.cancel_run(args.run_id, args.reason)
        print(f"{run.id} {render.state_name(run.state)}")
        return exitcodes.OK
    if command == "delete":
        await client.delete_run(args.run_id)
        print(f"deleted {args.run_id}")
        return exitcodes.OK
    if command == "export":
        return await _export(args, client)
    if command == "compare":
        return await _compare(args, client)
    if command in ("baseline", "history"):
        return await series.run_command(args, client)
    if command == "result" and args.run_id.startswith(formats.GROUP_ID_PREFIX):
        response = await client.get_group_result(args.run_id)
        run, result = formats.group_as_run(response), response.result
    else:
        run = await client.get_run(args.run_id)
        result = await client.get_result(args.run_id)
    fmt = args.format or ("json" if args.json else "table")
    if fmt == "markdown":
        sys.stdout.write(formats.markdown(result, run))
    elif fmt == "vllm-json":
        _write_vllm_json(run, result, args.output_dir)
    else:
        args.json = fmt == "json"
        print_result(args, run, result, details=not args.summary)
    return exitcodes.OK


async def _compare(args: argparse.Namespace, client: ControllerClient) -> int:
    comparison = await client.compare_runs(args.run_id, args.others, args.tolerance, args.confidence, args.metrics)
    if args.json:
        print(render.to_json(comparison))
    else:
        for table in formats.comparison_tables(comparison, args.all_metrics):
            render.console().print(table)
    unmatched = [c for c in comparison.comparisons if not c.stages and not formats.capacity_compared(c)]
    if unmatched:
        # Nothing compared is no pass: say why a capacity was not compared, and which loads each side ran.
        for c in unmatched:
            if c.capacity.note:
                print(f"error: {c.capacity.note}", file=sys.stderr)
        results = {run_id: await client.get_result(run_id) for run_id in [args.run_id, *(c.run_id for c in unmatched)]}
        # Two searches are not matched by load at all (the note said why they were not compared).
        searches = {run_id for run_id, result in results.items() if result.HasField("capacity")}
        by_load = [c.run_id for c in unmatched if not {args.run_id, c.run_id} <= searches]
        if by_load:
            print(
                f"error: no stage of {', '.join(by_load)} matches a stage of {args.run_id} by load; loads:",
                file=sys.stderr,
            )
            for run_id in [args.run_id, *by_load]:
                labels = [formats.load_label(s) for s in results[run_id].stages]
                print(f"  {run_id}: {', '.join(labels) or 'no stages'}", file=sys.stderr)
        return exitcodes.USAGE
    return formats.compare_exit_code(comparison)


def _write_vllm_json(run: run_pb2.Run, result: run_pb2.RunResult, output_dir: Path | None) -> None:
    stages = formats.vllm_results(run, result)
    if output_dir is None:
        print(json.dumps(stages, indent=2))
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    for stage in stages:
        path = output_dir / formats.vllm_file_name(run.id, stage["stage_index"])
        path.write_text(json.dumps(stage, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {path}", file=sys.stderr)


async def _export(args: argparse.Namespace, client: ControllerClient) -> int:
    samples = client.export_samples(args.run_id, include_warmup=args.include_warmup)
    if args.output is None:
        try:
            count = await formats.write_samples(samples, sys.stdout, args.format)
            sys.stdout.flush()
        except BrokenPipeError:  # `... | head`: the reader has seen enough
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141  # as a shell tool killed by SIGPIPE
    else:
        with args.output.open("w", encoding="utf-8", newline="") as out:
            count = await formats.write_samples(samples, out, args.format)
    print(f"exported {count} samples", file=sys.stderr)
    return 0


def add_scenarios_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--peak-concurrency", type=int, help="show the stages for this peak concurrency")


def cmd_scenarios(args: argparse.Namespace) -> int:
    print("use: llm-loadtest run --scenario NAME --peak-concurrency N (closed loop) or --peak-rate R (open loop)")
    for scenario in SCENARIOS.values():
        print(f"{scenario.name:<7} {scenario.description}")
        print(f"        stages: {describe(scenario, args.peak_concurrency)}")
    return exitcodes.OK
