"""Drive the real SAM CLI: `sam local invoke`, `start-lambda` and `start-api`, all on 127.0.0.1.

SAM runs with no AWS credentials and no AWS endpoint in its own environment: with credentials it
would call STS on every invoke, and nothing here may leave loopback. The functions get SAM's fake
credentials and, through ``--env-vars``, the moto server's URL.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from tests.integration.test_template import resolve

ROOT = Path(__file__).resolve().parents[2]
SAM = Path(os.environ.get("QUANTFN_SAM", ROOT / ".venv-sam" / "bin" / "sam"))
DOCKER = "/usr/bin/docker" if Path("/usr/bin/docker").exists() else "docker"
LOOPBACK = "127.0.0.1"
# Never handed to SAM: credentials make it call STS, endpoints would be used for its own calls.
SAM_ENV_DROPPED = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE")


def free_port() -> int:
    with closing(socket.socket()) as sock:
        sock.bind((LOOPBACK, 0))
        return sock.getsockname()[1]


def sam_environment(docker_env: dict[str, str], scratch: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SAM_ENV_DROPPED and not k.startswith("AWS_ENDPOINT_URL")}
    env.update(docker_env)
    env.update(
        AWS_DEFAULT_REGION="us-east-1",
        AWS_REGION="us-east-1",
        AWS_EC2_METADATA_DISABLED="true",
        # No profile, no cached credentials from this user's ~/.aws: SAM finds no session and stays local.
        AWS_CONFIG_FILE=str(scratch / "no-aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(scratch / "no-aws-credentials"),
        SAM_CLI_TELEMETRY="0",
        SAM_SKIP_PULL_IMAGE="1",
    )
    return env


def write_e2e_template(built_dir: Path, out: Path) -> Path:
    """The `sam build` output's template, with absolute code paths and AWS_ENDPOINT_URL declared.

    `sam local --env-vars` only sets variables the template declares. AWS_ENDPOINT_URL is declared
    here, empty (botocore ignores an empty one), so the tests can point the functions at moto; and
    QUANTFN_AUTH_CACHE_SECONDS (empty: the default), so the authorizer may read every key afresh.
    """
    template = yaml.safe_load((built_dir / "template.yaml").read_text())  # sam build writes long-form intrinsics
    for resource in template["Resources"].values():
        properties = resource.get("Properties") or {}
        for key in ("CodeUri", "ContentUri"):
            if isinstance(properties.get(key), str) and "://" not in properties[key]:
                properties[key] = str((built_dir / properties[key]).resolve())
    # sam local does not evaluate Fn::If inside an API's DefinitionBody (CloudFormation does, at deploy), and it
    # gives the routes of functions' HttpApi events only the definition's root-level security, not that of the
    # paths. So the definition is resolved for the template's defaults (AuthMode KEY), and the one security every
    # path declares becomes the root's: each request passes the authorizer, as when deployed.
    api = template["Resources"]["HttpApi"]["Properties"]
    definition = api["DefinitionBody"] = resolve(api["DefinitionBody"], template, {})
    securities = {json.dumps(op.get("security")) for path in definition["paths"].values() for op in path.values()}
    assert len(securities) == 1, f"the routes' security differs; sam local cannot apply it: {securities}"
    if securities != {"null"}:
        definition["security"] = json.loads(securities.pop())
    function_globals = template.setdefault("Globals", {}).setdefault("Function", {})
    variables = function_globals.setdefault("Environment", {}).setdefault("Variables", {})
    variables.setdefault("AWS_ENDPOINT_URL", "")
    variables.setdefault("QUANTFN_AUTH_CACHE_SECONDS", "")  # so a test may see a revocation at once
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(template, indent=1))
    return out


def functions_of(template: Path) -> list[str]:
    resources = json.loads(template.read_text())["Resources"]
    return sorted(name for name, res in resources.items() if res["Type"] == "AWS::Serverless::Function")


@dataclass
class SamLocal:
    """One template, one environment, logs under ``logs``."""

    template: Path
    env: dict[str, str]
    logs: Path
    env_vars: dict[str, dict[str, str]] = field(default_factory=dict)
    runs: int = 0

    def _env_vars_file(self, overrides: dict[str, dict[str, str]] | None) -> Path:
        merged = {fn: dict(values) for fn, values in self.env_vars.items()}
        for fn, values in (overrides or {}).items():
            merged.setdefault(fn, {}).update(values)
        self.runs += 1
        path = self.logs / f"env-vars-{self.runs}.json"
        path.write_text(json.dumps(merged))
        return path

    def _common(self, overrides: dict[str, dict[str, str]] | None) -> list[str]:
        return [
            "--template", str(self.template),
            "--env-vars", str(self._env_vars_file(overrides)),
            "--container-host", LOOPBACK,
            "--container-host-interface", LOOPBACK,
            "--skip-pull-image",
        ]  # fmt: skip

    def invoke(
        self, function: str, event: Path, env_vars: dict[str, dict[str, str]] | None = None, timeout_s: float = 240
    ) -> tuple[dict, str]:
        """`sam local invoke FUNCTION -e EVENT`: the function's reply and SAM's stderr (the function's logs)."""
        command = [str(SAM), "local", "invoke", function, "--event", str(event), *self._common(env_vars)]
        done = subprocess.run(command, env=self.env, capture_output=True, text=True, timeout=timeout_s, cwd=ROOT)
        log = self.logs / f"invoke-{function}-{event.stem}-{self.runs}.log"
        log.write_text(done.stderr)
        assert done.returncode == 0, f"sam local invoke failed ({done.returncode}); see {log}:\n{done.stderr[-3000:]}"
        lines = [line for line in done.stdout.splitlines() if line.strip()]
        assert lines, f"sam local invoke printed no reply; see {log}:\n{done.stderr[-3000:]}"
        return json.loads(lines[-1]), done.stderr

    @contextmanager
    def serve(
        self, command: str, env_vars: dict[str, dict[str, str]] | None = None, timeout_s: float = 240
    ) -> Iterator[str]:
        """`sam local start-lambda|start-api` on 127.0.0.1:<free port> with warm containers; yields its URL."""
        port = free_port()
        log = self.logs / f"{command}-{port}.log"
        args = [str(SAM), "local", command, "--host", LOOPBACK, "--port", str(port), *self._common(env_vars)]
        args += ["--warm-containers", "EAGER"]
        with log.open("w") as out:
            process = subprocess.Popen(args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            _wait_for_port(port, process, log, timeout_s)
            yield f"http://{LOOPBACK}:{port}"
        finally:
            # SIGINT is SAM's Ctrl-C: it stops and removes its warm containers.
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            remove_containers_of(process.pid, self.env)


def remove_containers_of(sam_pid: int, env: dict[str, str]) -> None:
    """Warm containers SAM did not remove on exit (it sometimes misses one): found by the proxy's label."""
    docker = [DOCKER, "ps", "--all", "--quiet", "--filter", f"label=io.quantfn.sam-pid={sam_pid}"]
    left = subprocess.run(docker, env=env, capture_output=True, text=True).stdout.split()
    if left:
        subprocess.run([DOCKER, "rm", "--force", *left], env=env, capture_output=True)


def _wait_for_port(port: int, process: subprocess.Popen, log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        with closing(socket.socket()) as sock:
            if sock.connect_ex((LOOPBACK, port)) == 0:
                return
        if process.poll() is not None or time.monotonic() > deadline:
            text = log.read_text() if log.exists() else ""
            raise AssertionError(f"sam did not start listening on {LOOPBACK}:{port}; see {log}:\n{text[-3000:]}")
        time.sleep(0.5)
