"""buf.gen.yaml: documents generation for Go, Java, TypeScript and Python, and is valid.

The remote plugins need the Buf Schema Registry, so the test runs `buf generate` with the
same template restricted to its local plugin (mypy-protobuf, installed by the dev setup):
buf parses the whole file's schema (inputs, managed mode, plugin options) on the way.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from tests.ecosystem.conftest import BUF, ROOT, require_node_tool
from tests.processes import ENV

pytestmark = [pytest.mark.timeout(120)]


def read_template() -> dict[str, object]:
    require_node_tool(ROOT / "node_modules" / "yaml")
    script = (
        'const text = require("fs").readFileSync("buf.gen.yaml", "utf8");'
        'process.stdout.write(JSON.stringify(require("yaml").parse(text)));'
    )
    done = subprocess.run(
        ["node", "-e", script], capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    template: dict[str, object] = json.loads(done.stdout)
    return template


def test_template_covers_go_java_typescript_python() -> None:
    template = read_template()
    assert template["version"] == "v2"
    plugins = template["plugins"]
    assert isinstance(plugins, list)
    outs = {p["out"] for p in plugins}
    assert {"gen/go", "gen/java", "gen/ts", "gen/python"} <= outs
    names = " ".join(str(p.get("remote") or p.get("local")) for p in plugins)
    for plugin in ("grpc/go", "grpc/java", "ts-proto", "grpc/python"):
        assert plugin in names


def test_buf_generate_runs_the_local_plugin(tmp_path: Path) -> None:
    require_node_tool(BUF)
    template = read_template()
    plugins = template["plugins"]
    assert isinstance(plugins, list)
    local = [dict(p, local=str(ROOT / p["local"])) for p in plugins if "local" in p]
    assert local, "buf.gen.yaml has no plugin that runs offline"
    template = dict(template, plugins=local, clean=False)
    (tmp_path / "buf.gen.json").write_text(json.dumps(template))
    done = subprocess.run(
        [str(BUF), "generate", "--template", str(tmp_path / "buf.gen.json"), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=ENV,
        timeout=90,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    stub = tmp_path / "out" / "gen" / "python" / "loadtest" / "v1" / "run_service_pb2.pyi"
    assert stub.exists(), sorted(str(p) for p in (tmp_path / "out").rglob("*"))
    assert "class CreateRunRequest" in stub.read_text()
