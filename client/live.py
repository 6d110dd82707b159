"""Live progress of a run while it executes, drawn from WatchRun updates.

On a terminal: a rich Live view with one progress bar per stage (elapsed/planned seconds or
done/planned requests), the run's state, ok/failed counts, the trailing-window TTFT p50/p99
and throughput, with agent events printed above it as they arrive. Anywhere else (a pipe, a
CI log): the events, and a plain progress line at most once every few seconds.
"""

from __future__ import annotations

import sys
import time
from collections.abc import AsyncIterable, Callable
from dataclasses import dataclass, field
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from client import render
from client.sdk import ControllerClient
from common.codes import FINAL_RUN_STATES
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

PLAIN_PROGRESS_EVERY_S = 5.0


def stage_load(stage: run_pb2.Stage) -> str:
    if stage.WhichOneof("load") == "request_rate":
        return f"rate={stage.request_rate:g}/s"
    if stage.WhichOneof("load") == "trace_replay":
        return "trace replay"
    return f"concurrency={stage.concurrency}"


@dataclass
class _StageProgress:
    """What is known of one stage: its last live figures while it ran."""

    fraction: float | None = None  # None: no plan to measure against
    amount: str = ""
    finished: bool = False


@dataclass
class RunProgressView:
    """The rich renderable of a run's progress, updated from each WatchRun message."""

    run: run_pb2.Run | None = None
    live: run_service_pb2.LiveStats = field(default_factory=run_service_pb2.LiveStats)
    stages: list[_StageProgress] = field(default_factory=list)

    def update(self, message: run_service_pb2.WatchRunResponse) -> None:
        run = message.run
        self.run = run
        self.live = message.live
        if len(self.stages) != len(run.spec.stages):
            self.stages = [_StageProgress() for _ in run.spec.stages]
        final = run.state in FINAL_RUN_STATES
        for i, progress in enumerate(self.stages):
            if i < run.current_stage or (final and i == run.current_stage and run.state == run_pb2.RUN_STATE_SUCCEEDED):
                progress.finished = True
                progress.fraction = 1.0
        if run.state == run_pb2.RUN_STATE_RUNNING and run.current_stage < len(self.stages):
            current = self.stages[run.current_stage]
            current.fraction, current.amount = _stage_fraction(message.live)
        # The final message carries the result: show each stage's own totals.
        for stage in message.result.stages:
            if stage.index < len(self.stages):
                done = self.stages[stage.index]
                done.amount = f"{stage.duration_s:.1f} s  {stage.requests_ok + stage.requests_failed} req"

    def __rich__(self) -> RenderableType:
        if self.run is None:
            return Text("waiting for the run…", style="dim")
        run, live = self.run, self.live
        bars = Table.grid(padding=(0, 1))
        bars.add_column(no_wrap=True)
        bars.add_column(no_wrap=True)
        bars.add_column(width=32)
        bars.add_column(no_wrap=True, justify="right")
        for i, (stage, progress) in enumerate(zip(run.spec.stages, self.stages, strict=True)):
            running = i == run.current_stage and run.state == run_pb2.RUN_STATE_RUNNING
            marker = "✓" if progress.finished else ("▶" if running else "·")
            style = "green" if progress.finished else ("bold" if running else "dim")
            name = stage.name or stage_load(stage)
            bar = ProgressBar(
                total=1.0 if progress.fraction is not None or not running else None,
                completed=progress.fraction or 0.0,
                width=32,
                pulse=running and progress.fraction is None,
            )
            bars.add_row(
                Text(f"{marker} stage {i}", style=style),
                Text(name, style=style),
                bar,
                Text(progress.amount, style="dim"),
            )
        status = Text.assemble(
            (f"{render.state_name(run.state):<9}", "bold cyan"),
            f"  ok {run.progress.requests_ok}",
            ("  failed ", ""),
            (str(run.progress.requests_failed), "bold red" if run.progress.requests_failed else ""),
        )
        if run.state == run_pb2.RUN_STATE_RUNNING:  # the live window means nothing once the run ended
            status.append(f"  TTFT p50 {live.ttft_p50_ms:.0f} ms  p99 {live.ttft_p99_ms:.0f} ms")
            status.append(f"  {live.output_token_throughput:.0f} tok/s  {live.request_throughput:.1f} req/s")
            if live.window_s:
                status.append(f"  (last {live.window_s:.0f} s)" if live.window_s >= 1 else "  (just started)", "dim")
        return Group(bars, status)


def _stage_fraction(live: run_service_pb2.LiveStats) -> tuple[float | None, str]:
    """How far the current stage is (the larger of time and request progress, since the
    stage stops at whichever comes first) and the text beside its bar."""
    fractions: list[float] = []
    parts: list[str] = []
    # Tenths of a second matter on short stages only.
    elapsed = f"{live.stage_elapsed_s:.1f}" if live.stage_elapsed_s < 100 else f"{live.stage_elapsed_s:.0f}"
    if live.stage_planned_s:
        fractions.append(live.stage_elapsed_s / live.stage_planned_s)
        parts.append(f"{elapsed}/{live.stage_planned_s:g} s")
    else:
        parts.append(f"{elapsed} s")
    if live.stage_requests_planned:
        fractions.append(live.stage_requests_done / live.stage_requests_planned)
        parts.append(f"{live.stage_requests_done}/{live.stage_requests_planned} req")
    else:
        parts.append(f"{live.stage_requests_done} req")
    return (min(1.0, max(fractions)) if fractions else None), "  ".join(parts)


class PlainProgressLog:
    """Events as they arrive and a progress line at most every `every_s` seconds."""

    def __init__(
        self, out: TextIO, every_s: float = PLAIN_PROGRESS_EVERY_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._out = out
        self._every_s = every_s
        self._clock = clock
        self._last: float | None = None

    def update(self, message: run_service_pb2.WatchRunResponse) -> None:
        for e in message.events:
            print(f"event {e.kind} {e.message}", file=self._out, flush=True)
        if message.HasField("result") or not message.run.spec.stages:
            return
        now = self._clock()
        if self._last is None or now - self._last >= self._every_s:
            self._last = now
            print(render.progress_line(message), file=self._out, flush=True)


async def follow(
    updates: AsyncIterable[run_service_pb2.WatchRunResponse], out: TextIO, interactive: bool
) -> run_pb2.RunResult | None:
    """Shows `updates` on `out` until they end; returns the final result if one came."""
    final: run_pb2.RunResult | None = None
    if interactive:
        view = RunProgressView()
        with Live(view, console=Console(file=out), refresh_per_second=4, transient=False) as live:
            async for update in updates:
                for e in update.events:
                    live.console.print(Text.assemble((f"{e.kind} ", "dim"), e.message))
                view.update(update)
                if update.HasField("result"):
                    final = update.result
                live.refresh()
    else:
        log = PlainProgressLog(out)
        async for update in updates:
            log.update(update)
            if update.HasField("result"):
                final = update.result
    return final


async def watch_run(client: ControllerClient, run_id: str, out: TextIO | None = None) -> run_pb2.RunResult:
    """Live progress until the run ends (a rich view when `out` is a terminal); returns the
    final result."""
    stream = out if out is not None else sys.stderr
    final = await follow(client.watch(run_id), stream, stream.isatty())
    return final if final is not None else await client.get_result(run_id)
