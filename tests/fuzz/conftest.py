"""The fuzz tier: generated requests against the real handler, bounded in count so it runs in CI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import DEFAULT_MODEL_ID, ROOT
from tests.fuzz.support import FUZZED, LocalApi


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if FUZZED:
        statuses = ", ".join(f"{key}: {n}" for key, n in sorted(FUZZED.items()) if key.isdigit())
        terminalreporter.write_line(f"fuzz: {FUZZED['events']} events, {FUZZED['5xx']} 5xx ({statuses})")


@pytest.fixture(scope="session")
def fuzz_api(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalApi]:
    log = tmp_path_factory.mktemp("fuzz") / "server.log"
    env = {
        **os.environ,
        "QUANTFN_MODELS": f"layer:{DEFAULT_MODEL_ID}",
        "QUANTFN_MODELS_ROOT": str(models_root),
        "QUANTFN_THREADS": "1",
        "QUANTFN_PRELOAD": "true",
        "POWERTOOLS_LOG_LEVEL": "DEBUG",
        "PYTHONUNBUFFERED": "1",
        # This checkout's quantfn, as pytest's pythonpath gives the tests (not an installed copy elsewhere)
        "PYTHONPATH": os.pathsep.join([str(ROOT / "shared"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "quantfn.cli", "serve", "--port", "0", "--repo", str(ROOT)],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
    try:
        deadline = time.monotonic() + 60
        while not (match := re.search(r"http://127\.0\.0\.1:(\d+)", log.read_text(errors="replace"))):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"quantfn serve did not start: {log.read_text(errors='replace')[-2000:]}")
            time.sleep(0.1)
        yield LocalApi(f"http://127.0.0.1:{match.group(1)}", log)
    finally:
        process.terminate()
        process.wait(timeout=10)
