"""The live progress view: per-stage bars and live figures on a terminal, throttled plain
lines plus every event elsewhere."""

from __future__ import annotations

import io
from collections.abc import AsyncIterator

import pytest
from rich.console import Console

from client import live, render
from common.proto.loadtest.v1 import run_pb2, run_service_pb2

pytestmark = pytest.mark.timeout(30)


def update(
    stage: int,
    elapsed: float,
    state: int = run_pb2.RUN_STATE_RUNNING,
    events: tuple[str, ...] = (),
    result: bool = False,
) -> run_service_pb2.WatchRunResponse:
    msg = run_service_pb2.WatchRunResponse()
    msg.run.id = "run_1"
    msg.run.state = state  # type: ignore[assignment]
    msg.run.current_stage = stage
    s0 = msg.run.spec.stages.add(concurrency=1)
    s0.duration.FromSeconds(30)
    msg.run.spec.stages.add(concurrency=8, requests=200)
    msg.run.progress.requests_ok = 120
    msg.run.progress.requests_failed = 3
    msg.live.window_s = 10
    msg.live.ttft_p50_ms = 52.4
    msg.live.ttft_p99_ms = 81.0
    msg.live.output_token_throughput = 1234
    msg.live.request_throughput = 9.5
    msg.live.stage_elapsed_s = elapsed
    if stage == 0:
        msg.live.stage_planned_s = 30
        msg.live.stage_requests_done = 40
    else:
        msg.live.stage_requests_done = 50
        msg.live.stage_requests_planned = 200
    for kind in events:
        msg.events.add(kind=kind, message=f"{kind} happened")
    if result:
        msg.result.run_id = "run_1"
    return msg


def rendered(view: live.RunProgressView) -> str:
    console = Console(file=io.StringIO(), width=140, no_color=True)
    console.print(view)
    text = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(text, str)
    return text


def test_view_shows_a_bar_per_stage_and_live_figures() -> None:
    view = live.RunProgressView()
    assert "waiting" in rendered(view)
    view.update(update(0, 12))
    text = rendered(view)
    assert "▶ stage 0" in text and "concurrency=1" in text and "12.0/30 s" in text and "40 req" in text
    assert "· stage 1" in text and "concurrency=8" in text
    assert "RUNNING" in text and "ok 120" in text and "failed 3" in text
    assert "TTFT p50 52 ms  p99 81 ms" in text and "1234 tok/s" in text and "(last 10 s)" in text
    assert view.stages[0].fraction == pytest.approx(0.4)

    view.update(update(1, 3))
    text = rendered(view)
    assert "✓ stage 0" in text and "▶ stage 1" in text and "50/200 req" in text
    assert view.stages[0].fraction == 1.0 and view.stages[1].fraction == pytest.approx(0.25)

    final = update(1, 20, state=run_pb2.RUN_STATE_SUCCEEDED, result=True)
    final.live.Clear()  # the last message's live window is empty
    final.result.stages.add(index=0, duration_s=30.0, requests_ok=200, requests_failed=2)
    final.result.stages.add(index=1, duration_s=4.25, requests_ok=200)
    view.update(final)
    text = rendered(view)
    assert "✓ stage 1" in text and "SUCCEEDED" in text
    assert "30.0 s  202 req" in text and "4.2 s  200 req" in text  # the stages' own totals
    assert "TTFT" not in text and "tok/s" not in text  # no zeroed live figures once the run ended


def test_plain_log_prints_every_event_and_throttles_progress() -> None:
    now = [100.0]
    out = io.StringIO()
    log = live.PlainProgressLog(out, every_s=5.0, clock=lambda: now[0])
    log.update(update(0, 1, events=("run_created", "stage_started")))
    for t in (101.0, 102.0, 104.9):
        now[0] = t
        log.update(update(0, t - 99))
    now[0] = 105.0
    log.update(update(0, 6, events=("agent_lost",)))
    now[0] = 106.0
    log.update(update(1, 0, state=run_pb2.RUN_STATE_SUCCEEDED, events=("run_succeeded",), result=True))
    lines = out.getvalue().splitlines()
    assert [line for line in lines if line.startswith("event ")] == [
        "event run_created run_created happened",
        "event stage_started stage_started happened",
        "event agent_lost agent_lost happened",
        "event run_succeeded run_succeeded happened",
    ]
    progress = [line for line in lines if not line.startswith("event ")]
    assert len(progress) == 2  # at t=100 and t=105; none in between, none for the final message
    # Stages counted from 0 as in the tables, with the count beside.
    assert all("stage 0 (1 of 2)" in line and "ok=120 failed=3" in line for line in progress)
    assert all("TTFT p50/p99=52/81ms" in line for line in progress)


def test_plain_progress_shows_a_dash_before_the_first_response() -> None:
    message = update(0, 1)
    message.live.ttft_p50_ms = message.live.ttft_p99_ms = 0.0
    assert "TTFT p50/p99=\u2013 " in render.progress_line(message)


async def _updates(items: list[run_service_pb2.WatchRunResponse]) -> AsyncIterator[run_service_pb2.WatchRunResponse]:
    for item in items:
        yield item


@pytest.mark.parametrize("interactive", [True, False])
async def test_follow_returns_the_final_result(interactive: bool) -> None:
    out = io.StringIO()
    items = [
        update(0, 1, events=("run_created",)),
        update(1, 2),
        update(1, 3, state=run_pb2.RUN_STATE_SUCCEEDED, events=("run_succeeded",), result=True),
    ]
    final = await live.follow(_updates(items), out, interactive)
    assert final is not None and final.run_id == "run_1"
    text = out.getvalue()
    assert "run_created happened" in text and "run_succeeded happened" in text
    assert await live.follow(_updates(items[:2]), io.StringIO(), interactive) is None
