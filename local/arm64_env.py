"""Run arm64 (Graviton) Python here without an arm64 machine: qemu user-mode emulation, called directly.

There is no binfmt_misc here, so nothing runs an aarch64 binary by itself: the emulator is invoked
by path, with ``-L`` naming an arm64 root that holds the dynamic loader, libc and python3.13. Idempotent;
``up`` sets up, under ``build/arm64-env/`` (a marker holds the recipe's hash, so a changed recipe
redoes it):

1. ``qemu-aarch64`` from Debian trixie's qemu-user (10.0, a static binary; only it is kept). Bookworm's
   qemu-user-static 7.2 segfaults importing onnxruntime, so the host's own package would not do.
2. ``sysroot/``: Debian trixie's python3.13 and the C/C++ runtime for arm64, unpacked by mmdebstrap
   (``--variant=extract``: no maintainer scripts run, so nothing needs emulating while it is made).

mmdebstrap is installed with apt-get when missing (root only). The layer to test on arm64 is built by
the Makefile (``make runtime-layer ARCH=arm64``); put it on PYTHONPATH as Lambda would (/opt/python).

    python local/arm64_env.py up             set up; prints the paths, the size and the seconds it took
    python local/arm64_env.py python ARGS    python3.13 for arm64 under the emulator (PYTHONPATH is passed on)
    python local/arm64_env.py status
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATE = ROOT / "build" / "arm64-env"
MARKER = STATE / ".ready"
DEBIAN_MIRROR = os.environ.get("QUANTFN_DEBIAN_MIRROR", "http://deb.debian.org/debian")
SUITE = "trixie"
EMULATOR_PACKAGES = ["qemu-user"]
# python3.13 as in Lambda; libstdc++/libgcc for onnxruntime's and tokenizers' native code.
SYSROOT_PACKAGES = ["python3.13", "libpython3.13-stdlib", "libstdc++6", "libgcc-s1"]
# Left out of the sysroot: documentation and translations (about a tenth of it), never read here.
SYSROOT_PRUNE = ["usr/share/doc", "usr/share/man", "usr/share/locale", "usr/share/lintian", "var/cache", "var/lib/apt"]


class SetupError(RuntimeError):
    """The emulator could not be set up on this machine (no mmdebstrap and no root, no mirror, ...)."""


@dataclass(frozen=True)
class Arm64Env:
    """The emulator and the arm64 root it runs binaries against."""

    qemu: Path
    sysroot: Path

    @property
    def python(self) -> Path:
        return self.sysroot / "usr" / "bin" / "python3.13"

    def python_command(self, *args: str) -> list[str]:
        """argv that runs arm64 python3.13 with ``args`` (the environment, PYTHONPATH included, passes through)."""
        return [str(self.qemu), "-L", str(self.sysroot), str(self.python), *args]


def log(message: str) -> None:
    print(f"[arm64-env] {message}", file=sys.stderr, flush=True)


def recipe_hash() -> str:
    recipe = [SUITE, EMULATOR_PACKAGES, SYSROOT_PACKAGES, SYSROOT_PRUNE]
    return hashlib.sha256(json.dumps(recipe).encode()).hexdigest()[:16]


def current(state: Path = STATE) -> Arm64Env | None:
    """The environment under ``state`` when it is set up from the current recipe, else None."""
    marker = state / ".ready"
    if not marker.is_file() or json.loads(marker.read_text()).get("recipe") != recipe_hash():
        return None
    return Arm64Env(qemu=state / "qemu-aarch64", sysroot=state / "sysroot")


def ensure_mmdebstrap() -> str:
    found = shutil.which("mmdebstrap")
    if found:
        return found
    if os.geteuid() != 0:
        raise SetupError("mmdebstrap is missing and only root may install it here (apt-get install mmdebstrap)")
    log("installing mmdebstrap with apt-get")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "-q", "mmdebstrap"]
    if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode:
        # A fresh machine may hold no package lists yet: one update, then once more.
        subprocess.run(["apt-get", "update", "-q"], env=env, stdout=subprocess.DEVNULL, check=False)
        if subprocess.run(install, env=env, stdout=subprocess.DEVNULL).returncode:
            raise SetupError("apt-get install mmdebstrap failed")
    return shutil.which("mmdebstrap") or "/usr/bin/mmdebstrap"


def _extract(mmdebstrap: str, arch: str, packages: list[str], target: Path) -> None:
    command = [
        mmdebstrap, "--quiet", "--variant=extract", f"--arch={arch}", f"--include={','.join(packages)}",
        SUITE, str(target), DEBIAN_MIRROR,
    ]  # fmt: skip
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if done.returncode:
        raise SetupError(f"mmdebstrap --arch={arch} {SUITE} failed: {done.stderr.strip()[-800:]}")


def _finish_sysroot(sysroot: Path) -> None:
    # Merged /usr as base-files would make it (the extract variant runs no scripts): the aarch64
    # ELF interpreter is /lib/ld-linux-aarch64.so.1, which qemu looks up under -L.
    for link in ("bin", "sbin", "lib"):
        if not (sysroot / link).exists() and (sysroot / "usr" / link).exists():
            (sysroot / link).symlink_to(f"usr/{link}")
    for relative in SYSROOT_PRUNE:
        shutil.rmtree(sysroot / relative, ignore_errors=True)


def du_bytes(path: Path) -> int:
    return sum(p.lstat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def up(state: Path = STATE) -> Arm64Env:
    """Set up the emulator and the arm64 root under ``state`` (nothing to do when already done).

    Raises SetupError when this machine cannot (mmdebstrap missing without root, mirror unreachable),
    or when the result cannot run arm64 python3.13.
    """
    ready = current(state)
    if ready is not None:
        return ready
    started = time.monotonic()
    mmdebstrap = ensure_mmdebstrap()
    state.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="scratch-", dir=state) as scratch:
        host = Path(scratch) / "qemu"
        _extract(mmdebstrap, "amd64", EMULATOR_PACKAGES, host)
        sysroot = Path(scratch) / "sysroot"
        _extract(mmdebstrap, "arm64", SYSROOT_PACKAGES, sysroot)
        _finish_sysroot(sysroot)
        for name in ("qemu-aarch64", "sysroot"):
            target = state / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
        shutil.move(host / "usr" / "bin" / "qemu-aarch64", state / "qemu-aarch64")
        shutil.move(sysroot, state / "sysroot")
    env = Arm64Env(qemu=state / "qemu-aarch64", sysroot=state / "sysroot")
    probe = subprocess.run(
        env.python_command("-S", "-c", "import platform, sys; print(platform.machine(), sys.version.split()[0])"),
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    if probe.returncode or not probe.stdout.startswith("aarch64"):
        raise SetupError(f"arm64 python3.13 does not run under {env.qemu}: {probe.stdout}{probe.stderr}"[-800:])
    version = subprocess.run([str(env.qemu), "--version"], capture_output=True, text=True).stdout.splitlines()[0]
    facts = {
        "recipe": recipe_hash(),
        "qemu_version": version,
        "python": probe.stdout.split()[1],
        "seconds": round(time.monotonic() - started, 1),
        "bytes": du_bytes(env.qemu.parent),
    }
    (state / ".ready").write_text(json.dumps(facts, indent=2) + "\n")
    log(f"set up in {facts['seconds']} s, {facts['bytes'] / 2**20:.0f} MiB: {version}, python {facts['python']}")
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("command", choices=["up", "python", "status"])
    parser.add_argument("args", nargs=argparse.REMAINDER, help="for `python`: its arguments")
    options = parser.parse_args()
    if options.command == "status":
        ready = current()
        print((STATE / ".ready").read_text() if ready else f"not set up under {STATE}")
        raise SystemExit(0 if ready else 1)
    try:
        env = up()
    except SetupError as exc:
        raise SystemExit(f"[arm64-env] cannot set up the emulator: {exc}") from exc
    if options.command == "up":
        print(json.dumps({"qemu": str(env.qemu), "sysroot": str(env.sysroot), **json.loads(MARKER.read_text())}))
        return
    command = env.python_command(*options.args)
    os.execv(command[0], command)


if __name__ == "__main__":
    main()
