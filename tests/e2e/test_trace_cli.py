"""`llm-loadtest run --trace FILE --tokenizer PATH` with the real processes: the files are
uploaded by the CLI, two agent processes fetch them and replay the trace at speed 4 against
the mock process, and the result says the token counts are exact.

Needs the datasets upload path (`ControllerClient.upload_dataset`, FetchDataset); skipped
before it is merged.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from client.sdk import ControllerClient
from tests.processes import CLI, ENV, Proc, wait_for_agents
from tests.tokenizers_fixture import build_bpe_tokenizer

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(180),
    pytest.mark.skipif(not hasattr(ControllerClient, "upload_dataset"), reason="needs the datasets upload path"),
]

SPEED = 4.0


def cli(*args: str, timeout_s: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout_s, env=ENV, check=False)


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, str]]:
    procs: list[Proc] = []
    try:
        mock = Proc(
            "mock-server",
            "--port",
            "0",
            "--ttft-ms",
            "5",
            "--itl-ms",
            "1",
            "--output-tokens",
            "1000",
            log=tmp_path / "mock.log",
        )
        procs.append(mock)
        target = mock.wait_line("listening on").rsplit(" ", 1)[-1]
        ctl = Proc(
            "controller", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "runs.db"), log=tmp_path / "controller.log"
        )
        procs.append(ctl)
        address = ctl.wait_line("listening on").rsplit(" ", 1)[-1]
        for i in range(2):
            procs.append(Proc("agent", "--controller", address, "--name", f"trace-{i}", log=tmp_path / f"agent{i}.log"))
        wait_for_agents(address, 2)
        yield target, address
    finally:
        codes = [p.stop() for p in reversed(procs)]
        assert codes == [0] * len(procs), f"processes did not exit cleanly: {codes}"


def test_run_trace_replays_every_request_at_its_time(stack: tuple[str, str], tmp_path: Path) -> None:
    target, address = stack
    trace = [
        {"timestamp": t, "input_length": 40 + i, "output_length": 3, "hash_ids": [1, 2, 10 + i]}
        for i, t in enumerate([0, 0, 30, 100, 100, 100, 250, 400, 410, 800, 1200, 1600])
    ]
    trace_file = tmp_path / "trace.jsonl"
    trace_file.write_text("".join(json.dumps(r) + "\n" for r in trace))
    tokenizer = build_bpe_tokenizer(tmp_path / "model" / "tokenizer.json")
    done = cli(
        "run",
        "--controller",
        address,
        "--target",
        target,
        "--model",
        "mock",
        "--agents",
        "2",
        "--trace",
        str(trace_file),
        "--replay-speed",
        str(SPEED),
        "--trace-block-tokens",
        "16",
        "--tokenizer",
        str(tokenizer.parent),
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SUCCEEDED" in done.stdout
    assert "tokens: exact:" in done.stdout, done.stdout
    run_id = next(w for w in done.stdout.split() if w.startswith("run_"))

    exported = cli("runs", "export", run_id, "--controller", address, "--format", "jsonl")
    assert exported.returncode == 0, exported.stderr
    samples = [json.loads(line) for line in exported.stdout.splitlines()]
    # Every request once (the prompt length names it: with the tokenizer's one-token pieces the
    # mock's word count is the token count), from both agents.
    index_of = {r["input_length"]: i for i, r in enumerate(trace)}
    assert sorted(index_of[s["prompt_tokens"]] for s in samples) == list(range(len(trace)))
    assert {s["agent_name"] for s in samples} == {"trace-0", "trace-1"}
    # Scheduled = sent - queue delay: the trace's times over the speed, one origin per agent.
    for agent in ("trace-0", "trace-1"):
        mine = [s for s in samples if s["agent_name"] == agent]
        gaps = [
            s["sent_unix_ns"]
            - s["queue_delay_ms"] * 1e6
            - trace[index_of[s["prompt_tokens"]]]["timestamp"] / SPEED * 1e6
            for s in mine
        ]
        assert max(gaps) - min(gaps) < 0.05e6, gaps
    result = json.loads(cli("runs", "result", run_id, "--controller", address, "--json").stdout)
    assert result["tokens"]["exact"] is True
