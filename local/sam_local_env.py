"""Make `sam local` work with no registry and no bridge network: engine, base image, proxy.

Idempotent; each step is skipped when already done:

1. Docker engine: installs docker.io and mmdebstrap with apt-get when missing (root only), starts
   dockerd in the background without a bridge (``--bridge=none``, no iptables) when it is not
   answering, and waits for it.
2. The Lambda base image SAM asks for (``public.ecr.aws/lambda/python:3.13-x86_64`` for the
   template's python3.13), built offline: Debian trixie's python3.13 extracted by mmdebstrap,
   busybox for the shell tools SAM's image build runs, awslambdaric and boto3 (which the
   managed runtime provides) from PyPI under /var/runtime, then ``docker import``. A label holds
   the recipe's hash, so a changed recipe rebuilds it. SAM adds its own emulator on top.
3. ``local/docker_proxy.py`` on ``build/local-env/docker.sock``: SAM's Lambda containers run on
   the host network, listening on 127.0.0.1 only.

Then use SAM with the printed environment (``eval "$(python local/sam_local_env.py env)"``):
``DOCKER_HOST`` is the proxy and ``SAM_SKIP_PULL_IMAGE=1`` keeps SAM away from the registry.

    python local/sam_local_env.py up|env|down|status

With internet and a normal Docker none of this is needed: SAM pulls the official image.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / "build" / "local-env"
PROXY_SOCKET = STATE / "docker.sock"
PROXY_PID = STATE / "proxy.pid"
DOCKERD_LOG = STATE / "dockerd.log"
DOCKER = shutil.which("docker", path="/usr/bin") or "docker"  # an earlier `docker` on PATH may be client-only
DOCKERD = "/usr/sbin/dockerd"
DOCKERD_ARGS = ["--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-masq=false"]
DEBIAN_MIRROR = os.environ.get("QUANTFN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
# python3.13 as in Lambda; the C++ runtime for onnxruntime and tokenizers; busybox for sh, cp, mv, rm, chmod.
DEBIAN_PACKAGES = ["python3.13", "libstdc++6", "libgcc-s1", "busybox", "ca-certificates"]
BUSYBOX_TOOLS = ["sh", "cp", "mv", "rm", "chmod", "mkdir", "ln", "ls", "cat", "env", "echo", "sleep"]
RUNTIME_PACKAGES = ["awslambdaric==4.2.2", "boto3==1.44.5"]
# Lambda's documented module search order for python3.13 (task, layers, then the runtime's own).
FAR_FUTURE = 4102444800  # 2100-01-01, as SAM's lastVersionCheck
PYTHONPATH = "/var/task:/opt/python/lib/python3.13/site-packages:/opt/python:/var/runtime"

BOOTSTRAP = f"""#!/bin/sh
# Started by the runtime interface emulator: the Python runtime interface client for $_HANDLER.
export AWS_EXECUTION_ENV=AWS_Lambda_python3.13
export PYTHONPATH="{PYTHONPATH}${{PYTHONPATH:+:$PYTHONPATH}}"
exec /var/lang/bin/python3.13 -m awslambdaric "${{_HANDLER:-$AWS_LAMBDA_FUNCTION_HANDLER}}"
"""

ENTRYPOINT = """#!/bin/sh
# As in the official image: `docker run IMAGE handler` starts the emulator around the runtime.
if [ $# -ne 1 ]; then echo "entrypoint requires the handler name to be the first argument" >&2; exit 142; fi
export _HANDLER="$1"
if [ -z "$AWS_LAMBDA_RUNTIME_API" ] && [ -x /usr/local/bin/aws-lambda-rie ]; then
  exec /usr/local/bin/aws-lambda-rie /var/runtime/bootstrap
fi
exec /var/runtime/bootstrap
"""

IMAGE_CHANGES = [
    "ENV PATH=/var/lang/bin:/usr/local/bin:/usr/bin:/bin:/opt/bin",
    "ENV LANG=C.UTF-8",
    "ENV TZ=:/etc/localtime",
    "ENV LAMBDA_TASK_ROOT=/var/task",
    "ENV LAMBDA_RUNTIME_DIR=/var/runtime",
    "WORKDIR /var/task",
    'ENTRYPOINT ["/lambda-entrypoint.sh"]',
]


def log(message: str) -> None:
    print(f"[sam-local-env] {message}", file=sys.stderr, flush=True)


def run(*cmd: str, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, **kwargs)


# ---- 1. the engine -----------------------------------------------------------------------------
def engine_answers() -> bool:
    if not Path(DOCKER).exists() and not shutil.which(DOCKER):
        return False
    probe = subprocess.run([DOCKER, "info", "--format", "{{.ServerVersion}}"], capture_output=True, timeout=20)
    return probe.returncode == 0


def ensure_packages() -> None:
    missing = [
        pkg for pkg, path in (("docker.io", DOCKERD), ("mmdebstrap", "/usr/bin/mmdebstrap")) if not Path(path).exists()
    ]
    if not missing:
        return
    if os.geteuid() != 0:
        raise SystemExit(
            f"missing {' '.join(missing)}: install them (apt-get install {' '.join(missing)}) or run as root"
        )
    log(f"installing {' '.join(missing)} with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    if subprocess.run(["apt-get", "install", "-y", "-q", *missing], env=env, stdout=subprocess.DEVNULL).returncode:
        run("apt-get", "update", "-q", env=env, stdout=subprocess.DEVNULL)
        run("apt-get", "install", "-y", "-q", *missing, env=env, stdout=subprocess.DEVNULL)


def ensure_engine(timeout_s: float = 60) -> None:
    ensure_packages()
    if engine_answers():
        return
    if os.geteuid() != 0:
        raise SystemExit("dockerd is not running and only root can start it here")
    STATE.mkdir(parents=True, exist_ok=True)
    log(f"starting dockerd {' '.join(DOCKERD_ARGS)} (log: {DOCKERD_LOG})")
    with DOCKERD_LOG.open("ab") as out:
        subprocess.Popen(
            [DOCKERD, *DOCKERD_ARGS], stdout=out, stderr=out, stdin=subprocess.DEVNULL, start_new_session=True
        )
    deadline = time.monotonic() + timeout_s
    while not engine_answers():
        if time.monotonic() > deadline:
            raise SystemExit(f"dockerd did not answer within {timeout_s:.0f} s; see {DOCKERD_LOG}")
        time.sleep(0.5)


# ---- 2. the base image -------------------------------------------------------------------------
def template_runtime(template: Path = ROOT / "template.yaml") -> str:
    """The one Lambda runtime the template's functions use (Globals or per function)."""
    runtimes = set(re.findall(r"^\s+Runtime:\s*[\"']?(python3\.\d+)", template.read_text(), flags=re.M))
    if len(runtimes) != 1:
        raise SystemExit(f"expected one python runtime in {template}, found {sorted(runtimes) or 'none'}")
    return runtimes.pop()


def base_image_tag(runtime: str, architecture: str = "x86_64") -> str:
    # SAM's name for it: public.ecr.aws/lambda/<name>:<version>-<arch> (samcli.local.docker.lambda_image).
    name, version = re.fullmatch(r"([a-z]+)([0-9.]+)", runtime).groups()
    return f"public.ecr.aws/lambda/{name}:{version}-{architecture}"


def recipe_hash(runtime: str) -> str:
    recipe = [runtime, DEBIAN_PACKAGES, BUSYBOX_TOOLS, RUNTIME_PACKAGES, BOOTSTRAP, ENTRYPOINT, IMAGE_CHANGES]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def image_recipe(tag: str) -> str | None:
    probe = subprocess.run(
        [DOCKER, "image", "inspect", "--format", '{{index .Config.Labels "io.quantfn.recipe"}}', tag],
        capture_output=True,
        text=True,
    )
    return probe.stdout.strip() if probe.returncode == 0 else None


def ensure_base_image(runtime: str) -> str:
    tag = base_image_tag(runtime)
    wanted = recipe_hash(runtime)
    current = image_recipe(tag)
    # An image of that name without our label is the official one (pulled): leave it alone.
    if current == wanted or current == "":
        return tag
    version = runtime.removeprefix("python")
    log(f"building {tag} offline (Debian trixie python{version} + awslambdaric)")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="lambda-base-") as scratch:
        rootfs = Path(scratch) / "rootfs"
        packages = [p.replace("python3.13", f"python{version}") for p in DEBIAN_PACKAGES]
        run(
            "mmdebstrap", "--quiet", "--variant=extract", f"--include={','.join(packages)}",
            "trixie", str(rootfs), DEBIAN_MIRROR,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        _finish_rootfs(rootfs, version)
        changes = [
            arg for change in [*IMAGE_CHANGES, f"LABEL io.quantfn.recipe={wanted}"] for arg in ("--change", change)
        ]
        tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
        run(DOCKER, "import", *changes, "-", tag, stdin=tar.stdout, stdout=subprocess.DEVNULL)
        if tar.wait():
            raise SystemExit("tar of the base image rootfs failed")
    log(f"built {tag} in {time.monotonic() - started:.0f} s")
    return tag


def _finish_rootfs(rootfs: Path, version: str) -> None:
    # Merged /usr (the ELF interpreter is /lib64/ld-linux-x86-64.so.2), as base-files would make it.
    for link in ("bin", "sbin", "lib", "lib64"):
        if not (rootfs / link).exists() and (rootfs / "usr" / link).exists():
            (rootfs / link).symlink_to(f"usr/{link}")
    for tool in BUSYBOX_TOOLS:
        target = rootfs / "usr" / "bin" / tool
        if not target.exists() and not target.is_symlink():
            target.symlink_to("busybox")
    lang_bin = rootfs / "var" / "lang" / "bin"
    lang_bin.mkdir(parents=True, exist_ok=True)
    for name in (f"python{version}", "python3", "python"):
        (lang_bin / name).symlink_to(f"/usr/bin/python{version}")
    runtime_dir = rootfs / "var" / "runtime"
    pip = [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile"]
    platform = ["--only-binary=:all:", "--implementation", "cp", "--python-version", version]
    platform += ["--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64"]
    run(*pip, *platform, "--target", str(runtime_dir), *RUNTIME_PACKAGES, stdout=subprocess.DEVNULL)
    (runtime_dir / "bootstrap").write_text(BOOTSTRAP)
    (runtime_dir / "bootstrap").chmod(0o755)
    (rootfs / "lambda-entrypoint.sh").write_text(ENTRYPOINT)
    (rootfs / "lambda-entrypoint.sh").chmod(0o755)
    for folder in ("var/task", "opt", "tmp"):
        (rootfs / folder).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)


# ---- 3. the proxy ------------------------------------------------------------------------------
def proxy_code_hash() -> str:
    return hashlib.sha256((ROOT / "local" / "docker_proxy.py").read_bytes()).hexdigest()[:16]


def proxy_pid(current_code_only: bool = False) -> int | None:
    """The running proxy's pid; with ``current_code_only``, None when it runs an older docker_proxy.py."""
    try:
        pid_text, _, code = PROXY_PID.read_text().partition(" ")
        pid = int(pid_text)
        os.kill(pid, 0)
    except (FileNotFoundError, ValueError, ProcessLookupError, PermissionError):
        return None
    return None if current_code_only and code.strip() != proxy_code_hash() else pid


def proxy_answers() -> bool:
    env = {**os.environ, "DOCKER_HOST": f"unix://{PROXY_SOCKET}"}
    probe = subprocess.run(
        [DOCKER, "version", "--format", "{{.Server.Version}}"], env=env, capture_output=True, timeout=20
    )
    return probe.returncode == 0


def ensure_proxy(timeout_s: float = 15) -> None:
    if proxy_pid(current_code_only=True) and PROXY_SOCKET.exists() and proxy_answers():
        return
    stop_proxy()
    STATE.mkdir(parents=True, exist_ok=True)
    with (STATE / "proxy.log").open("ab") as out:
        process = subprocess.Popen(
            [sys.executable, str(ROOT / "local" / "docker_proxy.py"), "--listen", str(PROXY_SOCKET)],
            stdout=out,
            stderr=out,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    PROXY_PID.write_text(f"{process.pid} {proxy_code_hash()}")
    deadline = time.monotonic() + timeout_s
    while not (PROXY_SOCKET.exists() and proxy_answers()):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the Docker proxy did not start; see {STATE / 'proxy.log'}")
        time.sleep(0.2)
    log(f"Docker proxy (host network, loopback only) on {PROXY_SOCKET}, pid {process.pid}")


def stop_proxy() -> None:
    pid = proxy_pid()
    if pid:
        os.kill(pid, signal.SIGTERM)
    PROXY_PID.unlink(missing_ok=True)
    PROXY_SOCKET.unlink(missing_ok=True)


# ---- 4. SAM's own calls home -----------------------------------------------------------------------
def ensure_no_version_check() -> None:
    """SAM checks PyPI for a newer version weekly; a far-future last check (a number: SAM ignores a
    string there) stops it. Telemetry is off through SAM_CLI_TELEMETRY=0 in the environment."""
    metadata = Path(os.environ.get("__SAM_CLI_APP_DIR", Path.home() / ".aws-sam")) / "metadata.json"
    try:
        current = json.loads(metadata.read_text())
    except (FileNotFoundError, ValueError):
        current = {}
    if isinstance(current.get("lastVersionCheck"), (int, float)) and current["lastVersionCheck"] >= FAR_FUTURE:
        return
    metadata.parent.mkdir(parents=True, exist_ok=True)
    metadata.write_text(json.dumps({**current, "lastVersionCheck": FAR_FUTURE}, indent=4))


# ---- the front ---------------------------------------------------------------------------------
def environment() -> dict[str, str]:
    return {"DOCKER_HOST": f"unix://{PROXY_SOCKET}", "SAM_SKIP_PULL_IMAGE": "1", "SAM_CLI_TELEMETRY": "0"}


def up() -> dict[str, str]:
    """Engine, base image and proxy ready; returns the environment SAM needs."""
    ensure_no_version_check()
    ensure_engine()
    tag = ensure_base_image(template_runtime())
    ensure_proxy()
    log(f"ready: {tag}; use DOCKER_HOST=unix://{PROXY_SOCKET} and --skip-pull-image")
    return environment()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "env", "down", "status"])
    command = parser.parse_args().command
    if command in ("up", "env"):
        env = up() if command == "up" else environment()
        print("\n".join(f"export {key}={value}" for key, value in env.items()))
    elif command == "down":
        stop_proxy()
        log("proxy stopped (dockerd is left running)")
    else:
        tag = base_image_tag(template_runtime())
        print(json.dumps({"engine": engine_answers(), "image": tag, "recipe": image_recipe(tag), "proxy": proxy_pid()}))


if __name__ == "__main__":
    main()
