"""The HTML report of a real run, opened in headless Chromium: every chart is drawn, the
page raises no script error, the legend script works, and a screenshot is kept in
test-artifacts/ for a person to look at.

The run is real: controller (real SQLite file), one agent over gRPC and the mock model
server on 127.0.0.1, two stages of two seconds on two agents, with an SLO and checks.
"""

from __future__ import annotations

import asyncio
import csv
import fcntl
import io
import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

from client import formats
from client.report.collect import collect
from client.report.page import build_report
from client.sdk import ControllerClient
from common.proto.loadtest.v1 import run_pb2
from controller.server import Controller
from controller.store import repository as repo
from mockserver.config import MockConfig
from mockserver.server import MockServer
from tests.e2e.test_cli import Proc, cli
from tests.integration.test_run_end_to_end import running_agent, spec_for, wait_final
from tests.processes import wait_for_agents

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(420)]

CHROMIUM = Path("/usr/bin/chromium")
INSTALL_LOCK = Path("/tmp/llm-loadtest-chromium-install.lock")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHARTS = {
    "ttft-vs-throughput",
    "tpot-vs-throughput",
    "timeline-throughput",
    "timeline-ttft",
    "timeline-errors",
    "ttft-distribution",
    "tpot-distribution",
}

# Injected into a copy of the report before Chromium opens it: records uncaught errors and
# console.error calls into a DOM node that --dump-dom then shows.
ERROR_PROBE = """<script>
(function () {
  var errors = [];
  function show() {
    var node = document.getElementById("captured-errors");
    if (!node && document.body) {
      node = document.createElement("pre");
      node.id = "captured-errors";
      document.body.appendChild(node);
    }
    if (node) { node.textContent = errors.join("\\n"); }
  }
  window.addEventListener("error", function (e) { errors.push("error: " + e.message); show(); });
  var original = console.error;
  console.error = function () {
    errors.push("console.error: " + Array.prototype.join.call(arguments, " ")); show();
    return original.apply(console, arguments);
  };
  window.addEventListener("load", function () {
    show();
    var toggle = document.querySelector("[data-toggle]");
    if (toggle) { toggle.click(); }
    document.body.setAttribute("data-loaded", "yes");
  });
})();
</script>"""


def ensure_chromium() -> Path:
    """Chromium from Debian's packages, installed once (a lock keeps parallel runs apart)."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        pytest.skip("chromium is not installed and cannot be installed here (needs root and apt-get)")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    with INSTALL_LOCK.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if not CHROMIUM.exists():
                install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
                done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600, check=False)
                if done.returncode != 0:  # stale package lists: update once and try again
                    subprocess.run(["apt-get", "update"], capture_output=True, env=env, timeout=300, check=False)
                    done = subprocess.run(install, capture_output=True, text=True, env=env, timeout=600, check=False)
                assert done.returncode == 0, f"apt-get install chromium failed:\n{done.stdout[-2000:]}{done.stderr}"
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    assert CHROMIUM.exists()
    return CHROMIUM


def chromium_args(profile: Path) -> list[str]:
    return [
        str(CHROMIUM),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        f"--user-data-dir={profile}",
    ]


def dump_dom(page: Path, profile: Path) -> str:
    done = subprocess.run(
        [*chromium_args(profile), "--dump-dom", page.as_uri()], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def screenshot(page: Path, profile: Path, png: Path) -> None:
    done = subprocess.run(
        [*chromium_args(profile), f"--screenshot={png}", "--window-size=1400,2400", page.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0 and png.exists() and png.stat().st_size > 10_000, done.stderr[-3000:]


class RenderedDom(HTMLParser):
    """Per data-chart element: drawn shapes and whether it is a no-data note; the captured
    errors; the body's classes."""

    def __init__(self) -> None:
        super().__init__()
        self.charts: list[dict[str, str | int | bool]] = []
        self.errors: str | None = None
        self.body: dict[str, str | None] = {}
        self._chart: dict[str, str | int | bool] | None = None
        self._figures = 0
        self._in_errors = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "body":
            self.body = a
        if tag == "pre" and a.get("id") == "captured-errors":
            self._in_errors, self.errors = True, ""
        if "data-chart" in a:
            self._chart = {
                "name": a["data-chart"] or "",
                "empty": a.get("data-empty") == "true",
                "shapes": 0,
                "lines": 0,
            }
            self.charts.append(self._chart)
            self._figures = 1
            return
        if self._chart is not None:
            if tag == "figure":
                self._figures += 1
            if tag in ("path", "rect", "circle"):
                self._chart["shapes"] = int(self._chart["shapes"]) + 1
            if tag == "path" and "line" in (a.get("class") or "") and len(a.get("d") or "") > 10:
                self._chart["lines"] = int(self._chart["lines"]) + 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "pre":
            self._in_errors = False
        if tag == "figure" and self._chart is not None:
            self._figures -= 1
            if self._figures == 0:
                self._chart = None

    def handle_data(self, data: str) -> None:
        if self._in_errors:
            self.errors = (self.errors or "") + data


def with_probe(html: str) -> str:
    return html.replace("<head>", "<head>" + ERROR_PROBE, 1)


@pytest.fixture(scope="module")
def chromium() -> Path:
    return ensure_chromium()


async def test_report_of_a_real_run_renders_in_chromium(
    chromium: Path, controller: Controller, client: ControllerClient, tmp_path: Path
) -> None:
    async with (
        MockServer(MockConfig(ttft_ms=20, itl_ms=4, jitter_ms=3, output_tokens=16, error_rate=0.03, seed=3)) as mock,
        running_agent(f"127.0.0.1:{controller.port}", name="browser-agent-1"),
        running_agent(f"127.0.0.1:{controller.port}", name="browser-agent-2"),
    ):
        spec = spec_for(mock, [(2, 2.0), (8, 2.0)], output_tokens=16)
        spec.placement.agents = 2  # per-agent rows exist when a stage ran on several agents
        spec.display_name = "report <browser> & test"
        spec.slo.ttft.FromMilliseconds(40)
        spec.checks.add(expression="p99(ttft) < 500ms")
        spec.checks.add(expression="error_rate < 1%")
        run = await client.create_run(spec)
        final = await wait_final(client, run.id)
    assert final.state == run_pb2.RUN_STATE_SUCCEEDED, final.state_reason
    data = await collect(client, run.id)
    assert data.samples is not None, data.samples_note

    # The export holds exactly the stored samples, and the report used all of them.
    record = await controller.db.read(repo.get_run, run.id)
    assert record is not None
    stored = await controller.db.read(repo.count_samples, record.pk)
    csv_out = io.StringIO()
    exported = await formats.write_samples(client.export_samples(run.id), csv_out, "csv")
    assert exported == stored == data.samples.count == final.progress.requests_ok + final.progress.requests_failed
    assert len(csv_out.getvalue().splitlines()) == stored + 1
    # What the page will show came from a real result with time series, checks and agents.
    result = data.result
    assert [s.index for s in result.stages] == [0, 1]
    assert all(s.time_series for s in result.stages)
    assert all(sorted(a.agent_name for a in s.agents) == ["browser-agent-1", "browser-agent-2"] for s in result.stages)
    assert len(result.checks) == 4 and result.verdict in (run_pb2.VERDICT_PASS, run_pb2.VERDICT_FAIL)
    vllm = formats.vllm_results(data.run, result)
    assert [v["mean_ttft_ms"] for v in vllm] == [s.ttft.mean_ms for s in result.stages]

    html = build_report([data])
    ARTIFACTS.mkdir(exist_ok=True)
    page = ARTIFACTS / "report_browser.html"
    page.write_text(html, encoding="utf-8")
    probed = tmp_path / "probed.html"
    probed.write_text(with_probe(html), encoding="utf-8")
    broken = tmp_path / "broken.html"
    broken.write_text(with_probe("<html><head></head><body><script>notDefined();</script></body></html>"))

    profile = tmp_path / "chromium-profile"
    dom = await asyncio.to_thread(dump_dom, probed, profile)
    control = await asyncio.to_thread(dump_dom, broken, profile)
    png = ARTIFACTS / "report_browser.png"
    await asyncio.to_thread(screenshot, page, profile, png)

    # The probe works: a page with an error shows it ...
    control_dom = RenderedDom()
    control_dom.feed(control)
    assert control_dom.errors is not None and "notDefined" in control_dom.errors
    # ... and the report has none, ran its load handlers, and its legend toggle works.
    rendered = RenderedDom()
    rendered.feed(dom)
    assert rendered.body.get("data-loaded") == "yes"
    assert rendered.errors == "", rendered.errors
    assert "hide-run-0" in (rendered.body.get("class") or "")
    # Every chart is there and drawn: lines through data, not a no-data note.
    assert {str(c["name"]) for c in rendered.charts} == CHARTS
    assert [c["name"] for c in rendered.charts].count("ttft-distribution") == 2
    assert [c["name"] for c in rendered.charts].count("tpot-distribution") == 2
    for chart in rendered.charts:
        assert not chart["empty"], chart
        assert int(chart["shapes"]) >= 2 and int(chart["lines"]) >= 1, chart
    assert dom.count("browser-agent-1") == 2 and dom.count("browser-agent-2") == 2  # per-agent table
    # The run's name is shown as text, never as markup.
    assert "report &lt;browser&gt; &amp; test" in dom


@pytest.fixture
def two_targets(tmp_path: Path) -> Iterator[tuple[str, str, str]]:
    """A fast and a slow mock (TTFT 20 ms vs 60 ms), a controller and an agent, as processes."""
    procs: list[Proc] = []
    try:
        targets = []
        for name, ttft in (("fast", "20"), ("slow", "60")):
            mock = Proc(
                "mock-server",
                "--port",
                "0",
                "--ttft-ms",
                ttft,
                "--itl-ms",
                "4",
                "--output-tokens",
                "16",
                log=tmp_path / f"mock-{name}.log",
            )
            procs.append(mock)
            targets.append(mock.wait_line("listening on").rsplit(" ", 1)[-1])
        ctl = Proc(
            "controller", "--listen", "127.0.0.1:0", "--db", str(tmp_path / "runs.db"), log=tmp_path / "controller.log"
        )
        procs.append(ctl)
        address = ctl.wait_line("listening on").rsplit(" ", 1)[-1]
        procs.append(Proc("agent", "--controller", address, "--name", "cli-agent", log=tmp_path / "agent.log"))
        wait_for_agents(address)
        yield targets[0], targets[1], address
    finally:
        codes = [p.stop() for p in reversed(procs)]
        assert codes == [0, 0, 0, 0], f"processes did not exit cleanly: {codes}"


def test_cli_result_formats_export_compare_and_report(
    chromium: Path, two_targets: tuple[str, str, str], tmp_path: Path
) -> None:
    fast, slow, address = two_targets
    ids = []
    for name, target in (("fast", fast), ("slow", slow)):
        done = cli(
            "run",
            "--controller",
            address,
            "--target",
            target,
            "--model",
            "mock",
            "--name",
            name,
            "--concurrency",
            "1,4",
            "--duration",
            "1s",
            "--output-tokens",
            "16",
            "--slo",
            "ttft=200ms",
            "--check",
            "p99(ttft) < 1s",
        )
        assert done.returncode == 0, done.stderr[-3000:]
        ids.append(next(w for w in done.stdout.split() if w.startswith("run_")))
    base, other = ids
    conn = ("--controller", address)

    md = cli("runs", "result", base, *conn, "--format", "markdown")
    assert md.returncode == 0, md.stderr
    assert "| Stage | Load | Requests |" in md.stdout and "**Verdict: PASS**" in md.stdout
    assert "| `p99(ttft) < 1s` | 0 |" in md.stdout

    listed = cli("runs", "result", base, *conn, "--format", "vllm-json")
    assert listed.returncode == 0, listed.stderr
    stages = json.loads(listed.stdout)
    assert [s["max_concurrency"] for s in stages] == [1, 4] and all(s["request_rate"] == "inf" for s in stages)
    written = cli("runs", "result", base, *conn, "--format", "vllm-json", "--output-dir", str(tmp_path / "vllm"))
    assert written.returncode == 0, written.stderr
    files = sorted(p.name for p in (tmp_path / "vllm").iterdir())
    assert files == [f"{base}_stage0.json", f"{base}_stage1.json"]
    assert json.loads((tmp_path / "vllm" / files[1]).read_text()) == stages[1]
    as_json = json.loads(cli("runs", "result", base, *conn, "--json").stdout)
    ok = [int(s["requests_ok"]) for s in as_json["stages"]]
    failed = [int(s.get("requests_failed", 0)) for s in as_json["stages"]]
    assert [s["completed"] for s in stages] == ok
    assert [s["mean_ttft_ms"] for s in stages] == [s["ttft"]["mean_ms"] for s in as_json["stages"]]

    csv_file = tmp_path / "samples.csv"
    exported = cli("runs", "export", base, *conn, "--format", "csv", "-o", str(csv_file))
    assert exported.returncode == 0, exported.stderr
    rows = list(csv.DictReader(csv_file.open()))
    assert len(rows) == sum(ok) + sum(failed)  # every stored sample, warmup excluded (there is none)
    assert {r["status"] for r in rows} == {"ok"} and {r["stage_index"] for r in rows} == {"0", "1"}
    jsonl = cli("runs", "export", base, *conn, "--format", "jsonl")
    assert jsonl.returncode == 0 and len(jsonl.stdout.splitlines()) == len(rows)

    regressed = cli("runs", "compare", base, other, *conn)
    assert regressed.returncode == 1, regressed.stdout + regressed.stderr
    ttft_line = next(line for line in regressed.stdout.splitlines() if "ttft_p50_ms" in line)
    assert "▲ regressed" in ttft_line  # 20 ms -> 60 ms, far beyond the noise
    # Judged on the median alone: a p99 of these few requests cannot be bounded (inconclusive).
    # A tolerance wide enough for the interval of these few requests on a loaded machine.
    same = cli("runs", "compare", base, base, *conn, "--metric", "ttft_p50_ms", "--tolerance", "30")
    assert same.returncode == 0 and "no regression" in same.stdout, same.stdout + same.stderr
    assert cli("runs", "compare", base, "run_nope", *conn).returncode == 2

    out = tmp_path / "two.html"
    made = cli("report", base, other, *conn, "-o", str(out))
    assert made.returncode == 0, made.stderr
    html = out.read_text()
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(out, ARTIFACTS / "report_two_runs.html")
    probed = tmp_path / "probed.html"
    probed.write_text(with_probe(html), encoding="utf-8")
    rendered = RenderedDom()
    rendered.feed(dump_dom(probed, tmp_path / "profile"))
    assert rendered.errors == "", rendered.errors
    assert {str(c["name"]) for c in rendered.charts} == CHARTS
    assert all(not c["empty"] and int(c["lines"]) >= 2 for c in rendered.charts)  # a line per run
    assert 'data-toggle="run-0"' in html and 'data-toggle="run-1"' in html
