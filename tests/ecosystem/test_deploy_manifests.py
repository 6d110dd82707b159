"""The Dockerfile, deploy/compose.yaml and deploy/kubernetes/ checked against the real CLI.

Every subcommand, flag and LLM_LOADTEST_* variable they use must appear in the output of
`llm-loadtest <command> --help`, and their values must parse (a renamed flag, a removed
variable or a mistyped value breaks this test); the ports they publish and probe must be the
ones the processes listen on. Docker and kubectl are not needed: the YAML is read with the
npm `yaml` package the project installs.
"""

from __future__ import annotations

import functools
import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from client.cli import _parser
from client.envconfig import apply_env_defaults
from controller.domain.access.destinations import is_loopback_listen
from tests.ecosystem.conftest import ROOT, require_node_tool
from tests.processes import CLI, ENV

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

DEPLOY = ROOT / "deploy"
YAML_TO_JSON = """
const fs = require("fs"), YAML = require("yaml");
const out = {};
for (const p of process.argv.slice(1)) {
  out[p] = YAML.parseAllDocuments(fs.readFileSync(p, "utf8"), { merge: true }).map((d) => {
    if (d.errors.length) throw new Error(p + ": " + d.errors.map(String).join("; "));
    return d.toJS();
  });
}
process.stdout.write(JSON.stringify(out));
"""


@functools.cache
def load_yaml_files() -> dict[str, list[Any]]:
    require_node_tool(ROOT / "node_modules" / "yaml")
    files = [str(p) for p in sorted([*DEPLOY.rglob("*.yaml")])]
    done = subprocess.run(
        ["node", "-e", YAML_TO_JSON, *files], capture_output=True, text=True, timeout=60, cwd=ROOT, env=ENV, check=False
    )
    assert done.returncode == 0, done.stderr
    parsed: dict[str, list[Any]] = json.loads(done.stdout)
    return parsed


@functools.cache
def help_text(command: str) -> str:
    """`llm-loadtest <command> --help`, whitespace collapsed (help wraps long variable names)."""
    done = subprocess.run(
        [CLI, *command.split(), "--help"], capture_output=True, text=True, timeout=60, env=ENV, check=False
    )
    assert done.returncode == 0, f"`llm-loadtest {command}` is not a command: {done.stderr}"
    return " ".join(done.stdout.split())


def check_invocation(where: str, args: list[str], env: dict[str, str]) -> None:
    """`llm-loadtest *args` with `env`: command, flags and variables exist; values parse."""
    command = args[0]
    text = help_text(command)
    for arg in args[1:]:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            pattern = rf"(^|[\s\[,]){re.escape(flag)}([\s\],=]|$)"
            assert re.search(pattern, text), f"{where}: {flag} not in {command} --help"
    for name in env:
        if name.startswith("LLM_LOADTEST_"):
            assert f"[env: {name}]" in text, f"{where}: {name} is not a variable of `llm-loadtest {command}`"
    parser, _ = _parser()
    apply_env_defaults(parser, {k: v for k, v in env.items() if k.startswith("LLM_LOADTEST_")})
    try:
        parser.parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"{where}: `llm-loadtest {' '.join(args)}` does not parse with {env}") from exc


def port_of(listen: str) -> int:
    return int(listen.rsplit(":", 1)[1])


def assert_not_open(where: str, args: list[str], env: dict[str, str]) -> None:
    """A controller on a non-loopback address must be given a key (it refuses to start open)."""
    if is_loopback_listen(env.get("LLM_LOADTEST_LISTEN", "127.0.0.1:50051")) or "--insecure-open" in args:
        return
    key = env.get("LLM_LOADTEST_API_KEY", "")
    # Compose: `${VAR:?message}` makes the key required; `${VAR:-}` would start it without one.
    assert key and ":-" not in key, f"{where}: listens on {env['LLM_LOADTEST_LISTEN']} with no key required"


# --- Dockerfile ----------------------------------------------------------------------------


def dockerfile() -> dict[str, Any]:
    text = re.sub(r"\\\n\s*", " ", (ROOT / "Dockerfile").read_text())
    final = text.split("\nFROM ")[-1]  # the runtime stage
    env: dict[str, str] = {}
    for line in re.findall(r"^ENV (.+)$", final, flags=re.M):
        env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return {
        "base": final.split()[0],
        "env": env,
        "user": re.search(r"^USER (\S+)", final, flags=re.M),
        "entrypoint": json.loads(re.search(r"^ENTRYPOINT (.+)$", final, flags=re.M).group(1)),  # type: ignore[union-attr]
        "cmd": json.loads(re.search(r"^CMD (.+)$", final, flags=re.M).group(1)),  # type: ignore[union-attr]
        "healthcheck": json.loads(re.search(r"^HEALTHCHECK .*?CMD (\[.+\])$", final, flags=re.M).group(1)),  # type: ignore[union-attr]
        "expose": [int(p) for line in re.findall(r"^EXPOSE (.+)$", final, flags=re.M) for p in line.split()],
    }


def test_dockerfile_matches_the_cli() -> None:
    d = dockerfile()
    assert d["base"].endswith("-slim")
    assert d["user"] is not None and not d["user"].group(1).startswith(("root", "0"))
    assert d["entrypoint"] == ["llm-loadtest"]
    check_invocation("Dockerfile CMD", d["cmd"], d["env"])
    assert d["healthcheck"][0] == "llm-loadtest"
    assert d["healthcheck"][1] == "health"
    check_invocation("Dockerfile HEALTHCHECK", d["healthcheck"][1:], {})
    assert port_of(d["env"]["LLM_LOADTEST_LISTEN"]) in d["expose"]
    assert d["env"]["LLM_LOADTEST_DB"].startswith("/data/")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert {".git", ".venv", "node_modules"} <= set(ignored)


# --- compose -------------------------------------------------------------------------------


def test_compose_matches_the_cli() -> None:
    [compose] = load_yaml_files()[str(DEPLOY / "compose.yaml")]
    services = compose["services"]
    assert {"controller", "agent", "mock"} <= set(services)
    assert services["agent"]["deploy"]["replicas"] == 2
    for name, svc in services.items():
        env = {k: str(v) for k, v in (svc.get("environment") or {}).items()}
        check_invocation(f"compose {name}", svc["command"], env)
        listening = {port_of(v) for k, v in env.items() if k.endswith("LISTEN")}
        if "--port" in svc["command"]:
            listening.add(int(svc["command"][svc["command"].index("--port") + 1]))
        published = [int(str(p).rsplit(":", 1)[-1]) for p in svc.get("ports", [])]
        published += [int(p) for p in svc.get("expose", [])]
        assert published, f"compose {name} publishes nothing"
        assert set(published) <= listening, f"compose {name}: ports {published} but listens on {listening}"
        test = (svc.get("healthcheck") or {}).get("test")
        if test:
            assert test[:3] == ["CMD", "llm-loadtest", "health"]
            check_invocation(f"compose {name} healthcheck", test[2:], {})
    controller = services["controller"]
    assert_not_open("compose controller", controller["command"], controller["environment"])
    db_dir = str(Path(controller["environment"]["LLM_LOADTEST_DB"]).parent)
    assert any(v.split(":")[1] == db_dir for v in controller["volumes"]), "the database is not on a volume"
    agent_target = services["agent"]["environment"]["LLM_LOADTEST_CONTROLLER"]
    assert port_of(agent_target) == port_of(controller["environment"]["LLM_LOADTEST_LISTEN"])


# --- Kubernetes ----------------------------------------------------------------------------


def k8s_objects() -> list[dict[str, Any]]:
    objects = []
    for path, docs in load_yaml_files().items():
        if "/kubernetes/" in path and not path.endswith("kustomization.yaml"):
            objects += [dict(d, _file=path) for d in docs if d]
    return objects


def env_of(container: dict[str, Any]) -> dict[str, str]:
    """Container env with secret and field references replaced by a placeholder value."""
    return {e["name"]: str(e.get("value", "from-a-reference")) for e in container.get("env", [])}


def test_kubernetes_manifests_match_the_cli() -> None:
    objects = k8s_objects()
    deployments = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Deployment" and "/tls/" not in o["_file"]}
    controller = deployments["llm-loadtest-controller"]["spec"]
    agents = deployments["llm-loadtest-agent"]["spec"]
    assert controller["replicas"] == 1 and controller["strategy"]["type"] == "Recreate"
    assert agents["replicas"] >= 2
    assert agents["template"]["spec"]["affinity"]["nodeAffinity"]

    [ctl] = controller["template"]["spec"]["containers"]
    ctl_env = env_of(ctl)
    check_invocation("k8s controller", ctl["args"], ctl_env)
    assert_not_open("k8s controller", ctl["args"], ctl_env)
    ports = {p["name"]: p["containerPort"] for p in ctl["ports"]}
    assert ports["grpc"] == port_of(ctl_env["LLM_LOADTEST_LISTEN"])
    assert ports["metrics"] == port_of(ctl_env["LLM_LOADTEST_METRICS_LISTEN"])
    assert ctl["readinessProbe"]["grpc"]["port"] == ports["grpc"]
    assert ctl["livenessProbe"]["grpc"]["port"] == ports["grpc"]
    key_ref = next(e for e in ctl["env"] if e["name"] == "LLM_LOADTEST_API_KEY")["valueFrom"]["secretKeyRef"]
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    assert key_ref["key"] in secrets[key_ref["name"]]["stringData"]
    # The database file is on the PersistentVolumeClaim.
    [mount] = [m for m in ctl["volumeMounts"] if ctl_env["LLM_LOADTEST_DB"].startswith(m["mountPath"] + "/")]
    [volume] = [v for v in controller["template"]["spec"]["volumes"] if v["name"] == mount["name"]]
    claims = {o["metadata"]["name"] for o in objects if o["kind"] == "PersistentVolumeClaim"}
    assert volume["persistentVolumeClaim"]["claimName"] in claims
    assert controller["template"]["spec"]["securityContext"]["runAsNonRoot"] is True

    [service] = [o for o in objects if o["kind"] == "Service"]
    for p in service["spec"]["ports"]:
        assert p["targetPort"] in ports and p["port"] == ports[p["targetPort"]]

    [agent] = agents["template"]["spec"]["containers"]
    agent_env = env_of(agent)
    check_invocation("k8s agent", agent["args"], agent_env)
    host, _, port = agent_env["LLM_LOADTEST_CONTROLLER"].rpartition(":")
    assert host == service["metadata"]["name"] and int(port) == ports["grpc"]
    agent_ports = {p["name"]: p["containerPort"] for p in agent["ports"]}
    assert agent_ports["metrics"] == port_of(agent_env["LLM_LOADTEST_METRICS_LISTEN"])
    assert agent["livenessProbe"]["httpGet"]["port"] in agent_ports


def test_kubernetes_tls_patches_match_the_cli() -> None:
    patches = {o["metadata"]["name"]: o for o in k8s_objects() if "/tls/" in o["_file"]}
    commands = {"llm-loadtest-controller": "controller", "llm-loadtest-agent": "agent"}
    assert set(patches) == set(commands)
    for name, patch in patches.items():
        [container] = patch["spec"]["template"]["spec"]["containers"]
        env = env_of(container)
        assert any(k.startswith("LLM_LOADTEST_TLS_") for k in env)
        for variable in env:
            assert f"[env: {variable}]" in help_text(commands[name]), f"{name}: {variable}"
        mounted = [m["mountPath"] for m in container["volumeMounts"]]
        files = [v for v in env.values() if v.startswith("/")]  # certificate and key paths
        assert files and all(any(f.startswith(m + "/") for m in mounted) for f in files), env
