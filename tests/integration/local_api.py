"""The API handler behind a real HTTP server process on 127.0.0.1 (`quantfn serve`), for client libraries."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


@contextmanager
def local_api(env: dict[str, str]) -> Iterator[str]:
    """Start ``quantfn serve --port 0`` with ``env`` added; yield its base URL; stop it."""
    process = subprocess.Popen(
        [sys.executable, "-m", "quantfn.cli", "serve", "--port", "0", "--repo", str(ROOT)],
        env={**os.environ, "POWERTOOLS_METRICS_DISABLED": "true", "POWERTOOLS_LOG_LEVEL": "ERROR", **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        match = re.search(r"http://127\.0\.0\.1:(\d+)", line)
        if not match:
            raise RuntimeError(f"quantfn serve did not start: {line!r}")
        yield f"http://127.0.0.1:{match.group(1)}"
    finally:
        process.terminate()
        process.wait(timeout=10)
