"""Stage planning: what each agent of a run is given, as pure functions of the spec, the
number of agents and the time the caller passes in (no I/O, no clock of their own).

A stage splits into one share per agent (`stage_shares`), each with its own seed
(`derive_seed`); the agents start together `start_lead_s` after the Assigns go out; a stage
with a duration has a deadline (`stage_deadline_s`); a lost agent's share leaves a rest that
others may take over (`remaining_share`). The texts of the run events that describe these
are here too, so that a plan and its description cannot drift apart.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

from common.durations import seconds
from common.proto.loadtest.v1 import agent_service_pb2, run_pb2

# Beyond a stage's planned duration and request timeout, before it counts as overrun.
STAGE_SLACK_S = 30.0
# Stage starts are set this far ahead so that every Assign arrives (and closed loops open
# their connections) before the common start time.
START_LEAD_S = 0.75
START_LEAD_PER_AGENT_S = 0.025
MAX_START_LEAD_S = 3.0
TAKEOVER_LEAD_S = 0.05
# Less than this left of a stage: a lost share is not worth handing over.
MIN_TAKEOVER_S = 0.25
DEFAULT_WAIT_TIMEOUT_S = 300.0


def split_integer(total: int, parts: int) -> list[int]:
    """`total` split into `parts` integers that differ by at most one and sum to total."""
    base, extra = divmod(total, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def stage_shares(stage: run_pb2.Stage, agents: int) -> list[run_pb2.Stage | None]:
    """Each agent's part of a stage (None: nothing for that agent to do).

    Concurrency, request counts, warmup counts and the concurrency cap split into integers
    that sum to the total; a rate splits into equal shares, each agent drawing its own
    seeded arrival process. A cap smaller than the number of agents gives each agent a
    cap of 1 (at most `agents` in flight instead of the cap).
    """
    requests = split_integer(stage.requests, agents)
    warmups = split_integer(stage.warmup_requests, agents)
    caps = split_integer(stage.max_concurrency, agents)
    load = stage.WhichOneof("load")
    open_loop = load == "request_rate"
    levels = [0] * agents if load in ("request_rate", "trace_replay") else split_integer(stage.concurrency, agents)
    if load == "trace_replay":
        open_loop = True  # no concurrency to split: each agent replays its share (trace_share)
    shares: list[run_pb2.Stage | None] = []
    for i in range(agents):
        if (not open_loop and levels[i] == 0) or (stage.requests and requests[i] == 0):
            shares.append(None)
            continue
        share = run_pb2.Stage()
        share.CopyFrom(stage)
        if load == "trace_replay":
            pass
        elif open_loop:
            share.request_rate = stage.request_rate / agents
            if stage.max_concurrency:
                share.max_concurrency = max(1, caps[i])
        else:
            share.concurrency = levels[i]
        share.requests = requests[i]
        share.warmup_requests = warmups[i]
        shares.append(share)
    return shares


def trace_share(agent_idx: int, agents: int) -> tuple[int, int]:
    """(share_index, share_count) of a trace_replay stage's agent `agent_idx` of `agents`: it
    replays the trace's requests i with i % agents == agent_idx (split_integer of a stage's
    `requests` gives each share exactly its part of the trace's first requests)."""
    return agent_idx, agents


def trace_takeover_shares(
    lost: run_pb2.Stage,
    share_index: int,
    share_count: int,
    requests_sent: int,
    takers: int,
    stage_end_ns: int | None,
    now_ns: int,
) -> list[tuple[run_pb2.Stage, int, int] | None]:
    """Each taker's part of a lost trace replay share (share_index, share_count) that had
    sent `requests_sent` of its requests: (stage, share_index, share_count), or None.

    Taker m replays the lost share's requests from its (requests_sent + m + 1)-th on, every
    `takers`-th (`agent.trace.takeover_share`): together exactly the requests it had not
    sent, at the trace's times (the takeover starts at the stage's own start time, so its
    duration stays the stage's). None for all when nothing worth handing over is left.
    """
    count = max(share_count, 1)
    if stage_end_ns is not None and (stage_end_ns - now_ns - TAKEOVER_LEAD_S * 1e9) / 1e9 < MIN_TAKEOVER_S:
        return [None] * takers
    left = lost.requests - requests_sent if lost.requests else None
    if left is not None and left <= 0:
        return [None] * takers
    out: list[tuple[run_pb2.Stage, int, int] | None] = []
    parts = split_integer(left, takers) if left is not None else [0] * takers
    for m in range(takers):
        if left is not None and parts[m] == 0:
            out.append(None)
            continue
        share = run_pb2.Stage()
        share.CopyFrom(lost)
        share.ClearField("warmup_duration")
        share.ClearField("ramp")
        share.warmup_requests = 0
        share.requests = parts[m]
        out.append((share, share_index + count * (requests_sent + m), count * takers))
    return out


def derive_seed(seed: int, stage_idx: int, agent_idx: int) -> int:
    """An independent, reproducible seed for one agent's share of one stage."""
    digest = hashlib.sha256(f"{seed}:{stage_idx}:{agent_idx}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1 or 1


def takeover_seed_index(takeovers: int, taker: int) -> int:
    """The `agent_idx` of a takeover share's seed: apart from every first-round agent's."""
    return 1000 * takeovers + taker


def start_lead_s(agents: int) -> float:
    """How long after its Assigns go out a stage starts: far enough ahead for every Assign
    to arrive and every agent to prepare when several must start together; at once for one."""
    return min(START_LEAD_S + START_LEAD_PER_AGENT_S * agents, MAX_START_LEAD_S) if agents > 1 else 0.0


def stage_deadline_s(planned_s: float, request_timeout_s: float) -> float | None:
    """How long a stage may take from its start plan to its last final report; None for a
    stage without a duration (bounded by its request count)."""
    if planned_s <= 0:
        return None
    return MAX_START_LEAD_S + planned_s + request_timeout_s + STAGE_SLACK_S


def remaining_share(
    share: run_pb2.Stage, requests_sent: int, stage_start_ns: int, stage_end_ns: int | None, now_ns: int
) -> run_pb2.Stage | None:
    """What is left of a lost assignment's share at `now_ns` (controller clock): the rest of
    the stage's time and/or the requests it had not announced; None if nothing worth handing
    over is left. A takeover starts `TAKEOVER_LEAD_S` from now, without warmup or ramp."""
    rest = run_pb2.Stage()
    rest.CopyFrom(share)
    rest.ClearField("warmup_duration")
    rest.ClearField("ramp")
    rest.warmup_requests = 0
    start_ns = now_ns + int(TAKEOVER_LEAD_S * 1e9)
    if stage_end_ns is not None:
        left_s = (stage_end_ns - max(start_ns, stage_start_ns)) / 1e9
        if left_s < MIN_TAKEOVER_S:
            return None
        rest.duration.FromNanoseconds(int(left_s * 1e9))
    if share.requests:
        left = share.requests - requests_sent
        if left <= 0:
            return None
        rest.requests = left
    return rest


def placement_wait_s(placement: run_pb2.Placement) -> float:
    """How long a run may wait for its agents."""
    timeout_s = seconds(placement.wait_timeout) if placement.HasField("wait_timeout") else 0.0
    return timeout_s or DEFAULT_WAIT_TIMEOUT_S


def placement_failure(needed: int, selector: Mapping[str, str], timeout_s: float, connected: int, free: int) -> str:
    """Why a run could not be placed within `timeout_s`, naming what was missing."""
    what = f"agents matching {selector_text(selector)}" if selector else "agents"
    return (
        f"placement: needed {needed} {what}, but after waiting {timeout_s:g} s only {connected} "
        f"{'were' if connected != 1 else 'was'} connected ({free} free)"
    )


def selector_text(selector: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))


def load_text(stage: run_pb2.Stage) -> str:
    """`2 req/s, 12.5 s, 40 requests`: a share's load, for run events."""
    parts = []
    if stage.WhichOneof("load") == "request_rate":
        parts.append(f"{stage.request_rate:g} req/s")
    else:
        parts.append(f"concurrency {stage.concurrency}")
    if stage.HasField("duration"):
        parts.append(f"{seconds(stage.duration):.1f} s")
    if stage.requests:
        parts.append(f"{stage.requests} requests")
    return ", ".join(parts)


def stall_text(stage_idx: int, agent_name: str, stall: agent_service_pb2.Stall) -> str:
    """`stage 0: agent-1: no request could be sent for 11.2 s (...)`."""
    return (
        f"stage {stage_idx}: {agent_name}: no request could be sent for {seconds(stall.length):.1f} s "
        f"(from {seconds(stall.start_offset):.1f} s into the stage; {stall.in_flight} request(s) in flight "
        "and no response data)"
    )
