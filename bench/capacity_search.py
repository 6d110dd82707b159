"""A whole capacity search in one run, next to the same probes as separate runs.

Real processes: the controller (`bench/_controller_proc.py`, fresh SQLite file), one agent
(`llm-loadtest agent`) and the mock (`llm-loadtest mock-server --max-running N`, so it has a
capacity: `--max-running` at concurrency, docs/capacity.md). First one run with a
concurrency search (`--probe-s` probes, 0.5 s warmup each); then, for each probe that search
ran, a new run with one stage at that probe's load and length, one after the other, as a
tool without a search has to do it; with `--fresh-agent` each of those runs also gets a new
agent process (as vLLM's serve_sla starts a new benchmark a probe), its start counted. Each
side is timed from the first CreateRun to the last run's final state; requests are what the
mock served (its `/stats`, preflight checks included).

    .venv/bin/python bench/capacity_search.py                 # ~1 minute
    .venv/bin/python bench/capacity_search.py --max-running 8 --slo-ms 25 --fresh-agent
"""

from __future__ import annotations

import argparse
import asyncio
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _harness import CLI, ROOT, http_json, machine, pin, table
from controller_queries import start_controller, stop_controller

sys.path.insert(0, str(ROOT))

from client.sdk import ControllerClient
from common.codes import FINAL_RUN_STATES
from common.proto.loadtest.v1 import run_pb2


def base_spec(url: str, args: argparse.Namespace) -> run_pb2.RunSpec:
    spec = run_pb2.RunSpec(display_name="capacity bench")
    spec.target.base_url = url
    spec.target.model = "mock"
    spec.workload.synthetic.input_tokens.fixed = 16
    spec.workload.synthetic.output_tokens.fixed = args.output_tokens
    spec.slo.ttft.FromMilliseconds(args.slo_ms)
    return spec


async def wait_final(client: ControllerClient, run_id: str) -> run_pb2.Run:
    while True:
        run = await client.get_run(run_id)
        if run.state in FINAL_RUN_STATES:
            return run
        await asyncio.sleep(0.2)


def served(url: str) -> int:
    return int(http_json(url.removesuffix("/v1") + "/stats")["requests_total"])


async def until_agent(client: ControllerClient, name: str) -> None:
    """Polls ListAgents until the agent of that name is connected."""
    while True:
        if any(a.name == name for a in await client.list_agents()):
            return
        await asyncio.sleep(0.05)


class Agents:
    """The one agent process, or a new one per run."""

    def __init__(self, address: str) -> None:
        self._address = address
        self._count = 0
        self.proc = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        self._count += 1
        return subprocess.Popen(
            [CLI, "agent", "--controller", self._address, "--name", f"bench-{self._count}"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    async def restart(self, client: ControllerClient) -> None:
        self.stop()
        self.proc = self._start()
        name = f"bench-{self._count}"
        await until_agent(client, name)

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


async def bench(address: str, url: str, args: argparse.Namespace, agents: Agents) -> None:
    async with ControllerClient(address, timeout_s=30) as client:
        await client.wait_ready(30)
        await until_agent(client, "bench-1")
        spec = base_spec(url, args)
        s = spec.search
        s.variable = run_pb2.SEARCH_VARIABLE_CONCURRENCY
        s.min, s.max, s.goodput_target_percent = 1, args.max, args.target
        s.probe_duration.FromMilliseconds(int(args.probe_s * 1000))
        s.probe_warmup.FromMilliseconds(500)
        s.min_requests = 15
        before, started = served(url), time.perf_counter()
        run = await client.create_run(spec)
        final = await wait_final(client, run.id)
        search_s, search_requests = time.perf_counter() - started, served(url) - before
        cap = (await client.get_result(run.id)).capacity
        loads = [int(stage.concurrency) for stage in final.spec.stages]

        before, started = served(url), time.perf_counter()
        for load in loads:
            if args.fresh_agent:
                await agents.restart(client)
            one = base_spec(url, args)
            stage = one.stages.add(concurrency=load)
            stage.duration.FromMilliseconds(int(args.probe_s * 1000))
            stage.warmup_duration.FromMilliseconds(500)
            await wait_final(client, (await client.create_run(one)).id)
        separate_s, separate_requests = time.perf_counter() - started, served(url) - before

    print(machine())
    print(
        f"mock: ttft {args.ttft_ms} ms, itl {args.itl_ms} ms, {args.output_tokens} tokens, "
        f"--max-running {args.max_running}; SLO ttft {args.slo_ms} ms, target {args.target:g} %"
    )
    stop = run_pb2.SearchStopReason.Name(cap.stop_reason).removeprefix("SEARCH_STOP_REASON_")
    print(
        f"search: {final.state_reason or run_pb2.RunState.Name(final.state)}; capacity "
        f"{cap.highest_passing:g} (failing {cap.lowest_failing:g}), {stop}; probes {loads}"
    )
    for probe in cap.probes:
        outcome = run_pb2.ProbeOutcome.Name(probe.outcome).removeprefix("PROBE_OUTCOME_")
        print(f"  probe {probe.stage_index}: {probe.load:g} {outcome}: {probe.reason}")
    rows = [
        ["one run with a search", len(loads), search_s, search_requests, 1],
        [
            "a run per probe" + (", a new agent each" if args.fresh_agent else ""),
            len(loads),
            separate_s,
            separate_requests,
            len(loads),
        ],
        ["ratio (per probe / search)", "", separate_s / search_s, f"{separate_requests / search_requests:.2f}", ""],
    ]
    print(table(["how", "probes", "seconds", "requests served", "runs"], rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ttft-ms", type=float, default=10.0)
    parser.add_argument("--itl-ms", type=float, default=5.0)
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--max-running", type=int, default=2)
    parser.add_argument("--slo-ms", type=int, default=35)
    parser.add_argument("--target", type=float, default=80.0)
    parser.add_argument("--max", type=float, default=64)
    parser.add_argument("--probe-s", type=float, default=3.0)
    parser.add_argument("--fresh-agent", action="store_true", help="a new agent process for each separate run")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        mock = subprocess.Popen(
            [
                CLI,
                "mock-server",
                "--port",
                "0",
                "--ttft-ms",
                str(args.ttft_ms),
                "--itl-ms",
                str(args.itl_ms),
                "--output-tokens",
                str(args.output_tokens),
                "--max-running",
                str(args.max_running),
            ],
            stdout=subprocess.PIPE,
            text=True,
            preexec_fn=pin(0),  # noqa: PLW1509
        )
        controller, address = start_controller(str(Path(tmp) / "runs.db"), tmp)
        agents = Agents(address)
        try:
            assert mock.stdout is not None
            url = mock.stdout.readline().rsplit(" ", 1)[-1].strip()
            asyncio.run(bench(address, url, args, agents))
        finally:
            agents.stop()
            stop_controller(controller)
            mock.terminate()
            mock.wait(15)


if __name__ == "__main__":
    main()
