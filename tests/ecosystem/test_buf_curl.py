"""grpcurl-style control of a live controller with `buf curl` (server reflection, no .proto).

The README's grpcurl examples and their `buf curl` equivalents are run here as written
(addresses, the target URL and the run id substituted): the README shows calls that work.
"""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
from typing import Any

import pytest
from google.protobuf import descriptor_pb2

from tests.ecosystem.conftest import BUF, ROOT, Stack, require_node_tool
from tests.processes import ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

README_ADDRESS = "127.0.0.1:50051"
README_TARGET = "http://127.0.0.1:8000/v1"
RUN_ID_PLACEHOLDER = "RUN_ID"
GRPC = ["--protocol", "grpc", "--http2-prior-knowledge"]


def buf_curl(*args: str, timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    require_node_tool(BUF)
    return subprocess.run(
        [str(BUF), "curl", *args], capture_output=True, text=True, timeout=timeout_s, env=ENV, check=False
    )


def json_stream(text: str) -> list[dict[str, Any]]:
    """The JSON objects buf curl prints one after another (one per streamed message)."""
    decoder, out, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i].isspace():
            i += 1
        if i >= len(text):
            return out
        obj, i = decoder.raw_decode(text, i)
        out.append(obj)


def readme_commands(tool: str) -> list[list[str]]:
    """Every command of the README's shell blocks that starts with `tool` (continuations joined)."""
    readme = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```sh\n(.*?)```", readme, flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for raw in joined.splitlines():
            line = raw.split("  #")[0].strip()
            if line.startswith(tool + " "):
                commands.append(shlex.split(line))
    return commands


def _substitute(args: list[str], stack: Stack, run_id: str) -> list[str]:
    swaps = ((README_TARGET, stack.target), (README_ADDRESS, stack.address), (RUN_ID_PLACEHOLDER, run_id))
    out = []
    for arg in args:
        text = arg
        for old, new in swaps:
            text = text.replace(old, new)
        out.append(text)
    return out


def test_list_services_and_describe_run_service(stack: Stack) -> None:
    listed = buf_curl(*GRPC, "--list-services", f"http://{stack.address}")
    assert listed.returncode == 0, listed.stderr
    services = set(listed.stdout.split())
    assert {"loadtest.v1.RunService", "loadtest.v1.AgentService", "grpc.health.v1.Health"} <= services

    # "describe" is what grpcurl does through reflection: fetch the file defining the symbol.
    reflection = f"http://{stack.address}/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
    described = buf_curl(*GRPC, "-d", '{"file_containing_symbol": "loadtest.v1.RunService"}', reflection)
    assert described.returncode == 0, described.stderr
    [reply] = json_stream(described.stdout)
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(base64.b64decode(b))
        for b in reply["fileDescriptorResponse"]["fileDescriptorProto"]
    ]
    service = next(s for f in files for s in f.service if s.name == "RunService")
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.method}
    assert methods["CreateRun"] == (False, False)
    assert methods["WatchRun"] == (False, True)
    assert {"GetRun", "ListRuns", "CancelRun", "DeleteRun", "GetRunResult", "ListAgents"} <= set(methods)


def test_create_list_and_watch_a_run_with_buf_curl(stack: Stack) -> None:
    spec = {
        "spec": {
            "display_name": "buf curl",
            "target": {"base_url": stack.target, "model": "mock"},
            "workload": {"synthetic": {"input_tokens": {"fixed": 64}, "output_tokens": {"fixed": 8}}},
            "stages": [{"concurrency": 2, "requests": "20"}],
        }
    }
    created = buf_curl(*GRPC, "-d", json.dumps(spec), f"http://{stack.address}/loadtest.v1.RunService/CreateRun")
    assert created.returncode == 0, created.stderr
    run_id = json.loads(created.stdout)["run"]["id"]

    watched = buf_curl(
        *GRPC,
        "-d",
        json.dumps({"run_id": run_id}),
        f"http://{stack.address}/loadtest.v1.RunService/WatchRun",
        timeout_s=90,
    )
    assert watched.returncode == 0, watched.stderr
    updates = json_stream(watched.stdout)
    final = updates[-1]
    assert final["run"]["state"] == "RUN_STATE_SUCCEEDED"
    assert all("result" not in u for u in updates[:-1])  # only the last message carries the result
    [stage] = final["result"]["stages"]
    assert int(stage["requestsOk"]) == 20

    listed = buf_curl(
        *GRPC,
        "-d",
        '{"page_size": 100, "state": "RUN_STATE_SUCCEEDED"}',
        f"http://{stack.address}/loadtest.v1.RunService/ListRuns",
    )
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)["runs"]
    assert run_id in [r["id"] for r in runs]
    assert all(r["state"] == "RUN_STATE_SUCCEEDED" for r in runs)

    bad = buf_curl(
        *GRPC, "-d", '{"run_id": "run_does_not_exist"}', f"http://{stack.address}/loadtest.v1.RunService/GetRun"
    )
    assert bad.returncode != 0
    assert "not_found" in bad.stderr.lower()


def _grpcurl_call(args: list[str]) -> str:
    """`list`, `describe` or the method a grpcurl command calls."""
    if args[-1] == "list":
        return "list"
    return "describe" if args[-2] == "describe" else args[-1]


def _buf_call(args: list[str]) -> str:
    """`list`, `describe` or the method a buf curl command calls."""
    if "--list-services" in args:
        return "list"
    if "--list-methods" in args:
        return "describe"
    return args[-1].split("/", 3)[3]


def test_readme_grpcurl_examples_work_as_buf_curl_calls(stack: Stack) -> None:
    """Every README grpcurl call, translated flag for flag to buf curl, succeeds; the README's
    own buf curl block makes the same calls in the same order."""
    grpcurl = readme_commands("grpcurl")
    buf = readme_commands("buf")
    assert len(grpcurl) >= 6, "README lost its grpcurl examples"
    assert [_grpcurl_call(c) for c in grpcurl] == [_buf_call(c) for c in buf]

    run_id = ""
    for command in grpcurl:
        args = _substitute(command[1:], stack, run_id)
        translated: list[str] = [*GRPC]
        i = 0
        while i < len(args):
            if args[i] == "-plaintext":
                i += 1
            elif args[i] in ("-d", "-H"):
                translated += [args[i], args[i + 1]]
                i += 2
            else:
                break
        address, rest = args[i], args[i + 1 :]
        if rest == ["list"]:
            translated += ["--list-services", f"http://{address}"]
        elif rest[0] == "describe":
            translated += ["--list-methods", f"http://{address}"]
        else:
            translated.append(f"http://{address}/{rest[0]}")
        done = buf_curl(*translated, timeout_s=120)
        assert done.returncode == 0, f"{shlex.join(command)}\n-> buf curl {shlex.join(translated)}\n{done.stderr}"
        if rest and rest[0] == "describe":
            assert f"{rest[1]}/CreateRun" in done.stdout
        if rest and rest[0].endswith("/CreateRun"):
            run_id = json.loads(done.stdout)["run"]["id"]
        if rest and rest[0].endswith("/WatchRun"):
            assert json_stream(done.stdout)[-1]["run"]["state"] == "RUN_STATE_SUCCEEDED"
    assert run_id, "the README's examples create no run"

    for command in buf:
        assert command[:2] == ["buf", "curl"], command
        done = buf_curl(*_substitute(command[2:], stack, run_id), timeout_s=120)
        assert done.returncode == 0, f"{shlex.join(command)}\n{done.stderr}"
