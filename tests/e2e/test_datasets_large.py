"""A dataset far beyond the 8 MiB inline limit (>= 200 MB of JSONL) through the real processes:
uploaded with the real CLI to a real controller, a second time for free (content-addressed),
then used by `run --dataset` with a real agent against the real mock server. The controller's
resident peak stays well under the file's size: the upload is streamed to SQLite, never held."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.processes import CLI, ENV, Proc, wait_for_agents

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

MIN_BYTES = 200 * 1000 * 1000
WORDS = 3000  # words per prompt besides "entry N": ~12 KB per line, ~17k lines


def write_dataset(path: Path) -> tuple[int, int]:
    """A JSONL file of at least MIN_BYTES; (bytes, lines). Each line's max_tokens is 2..5."""
    words = " ".join(f"w{i % 97}" for i in range(WORDS))
    size = lines = 0
    with path.open("w", encoding="utf-8") as f:
        while size < MIN_BYTES:
            line = json.dumps({"prompt": f"entry {lines} {words}", "max_tokens": 2 + lines % 4}) + "\n"
            f.write(line)
            size += len(line)
            lines += 1
    return size, lines


def cli(*args: str, timeout_s: float = 150) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CLI, *args], capture_output=True, text=True, timeout=timeout_s, env=ENV, check=False)


def status_mb(pid: int, field: str) -> float:
    """A field of /proc/PID/status (VmHWM: the resident peak; RssAnon: heap now), MB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def peak_mb(pid: int) -> float:
    return status_mb(pid, "VmHWM")


class HeapPeak:
    """The largest RssAnon (the heap: what the process holds itself, not the file pages SQLite
    maps) of a process, sampled every 20 ms on a thread until stopped."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_mb = status_mb(pid, "RssAnon")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_mb = max(self.peak_mb, status_mb(self.pid, "RssAnon"))

    def stop(self) -> float:
        self._stop.set()
        self._thread.join()
        return self.peak_mb


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[tuple[str, str, Proc]]:
    procs: list[Proc] = []
    try:
        mock = Proc("mock-server", "--port", "0", "--ttft-ms", "2", "--itl-ms", "1", log=tmp_path / "mock.log")
        procs.append(mock)
        target = mock.wait_line("listening on").rsplit(" ", 1)[-1]
        ctl = Proc(
            "controller", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "runs.db"), log=tmp_path / "controller.log"
        )
        procs.append(ctl)
        address = ctl.wait_line("listening on").rsplit(" ", 1)[-1]
        procs.append(Proc("agent", "--controller", address, "--name", "big", log=tmp_path / "agent.log"))
        wait_for_agents(address)
        yield target, address, ctl
    finally:
        codes = [p.stop() for p in reversed(procs)]
        assert codes == [0, 0, 0], f"processes did not exit cleanly: {codes}"


def test_a_200_mb_dataset_is_uploaded_once_and_used_by_a_run(stack: tuple[str, str, Proc], tmp_path: Path) -> None:
    target, address, ctl = stack
    path = tmp_path / "big.jsonl"
    size, lines = write_dataset(path)
    before_mb = peak_mb(ctl.p.pid)
    before_anon_mb = status_mb(ctl.p.pid, "RssAnon")
    heap = HeapPeak(ctl.p.pid)

    started = time.monotonic()
    up = cli("datasets", "upload", str(path), "--controller", address, "--json")
    first_s = time.monotonic() - started
    assert up.returncode == 0, up.stderr
    reply = json.loads(up.stdout)
    info = reply["dataset"]
    assert not reply["already_present"]
    assert (info["size_bytes"], info["entry_count"], info["format"]) == (size, lines, "DATASET_FORMAT_JSONL")
    upload_peak_mb = peak_mb(ctl.p.pid)

    started = time.monotonic()
    again = cli("datasets", "upload", str(path), "--controller", address)
    again_s = time.monotonic() - started
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == info["id"] and "already present" in again.stderr
    assert again_s < first_s, (again_s, first_s)  # nothing was sent the second time

    listed = cli("datasets", "list", "--controller", address, "--json")
    assert [d["id"] for d in json.loads(listed.stdout)] == [info["id"]]

    run = cli(
        "run",
        "--controller",
        address,
        "--target",
        target,
        "--model",
        "mock",
        "--dataset",
        str(path),
        "--concurrency",
        "4",
        "--requests",
        "40",
        "--json",
        timeout_s=200,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"dataset {info['id']} ({lines} entries) already stored" in run.stderr
    result = json.loads(run.stdout)
    stage = result["stages"][0]
    assert stage["requests_ok"] == 40 and stage["requests_failed"] == 0
    # The dataset's prompts and lengths were used, not synthetic ones (128 tokens in and out).
    assert stage["mean_input_tokens"] > WORDS
    assert 2 <= stage["mean_output_tokens"] <= 5
    run_peak_mb = peak_mb(ctl.p.pid)

    shown = cli("datasets", "get", info["id"], "--controller", address, "--json")
    assert json.loads(shown.stdout)["sha256"] == info["sha256"]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,max_tokens\nfine,3\nnot fine,many\n")
    refused = cli("datasets", "upload", str(bad), "--controller", address)
    assert refused.returncode == 2 and 'line 3: field "max_tokens"' in refused.stderr, refused.stderr
    deleted = cli("datasets", "delete", info["id"], "--controller", address)
    assert deleted.returncode == 0, deleted.stderr
    assert json.loads(cli("datasets", "list", "--controller", address, "--json").stdout) == []

    heap_peak_mb = heap.stop()

    # The controller never held the file: its heap's peak over the upload, the second upload and
    # the run (the agent fetching the whole file) grew by well under the file's size. Its
    # resident peak (VmHWM) also counts SQLite's memory-mapped file pages (the OS's cache of
    # the database file, which the agent's fetch reads through): printed, not judged.
    size_mb = size / 2**20
    print(
        f"file {size_mb:.0f} MB; controller heap {before_anon_mb:.0f} -> peak {heap_peak_mb:.0f} MB; "
        f"resident peak {before_mb:.0f} -> upload {upload_peak_mb:.0f} -> run {run_peak_mb:.0f} MB"
    )
    assert heap_peak_mb - before_anon_mb < 0.75 * size_mb, (before_anon_mb, heap_peak_mb)
