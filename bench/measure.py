"""Measurements shared by the benchmark sections: timing helpers and workloads."""

from __future__ import annotations

import contextlib
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from quantfn.modelbuild.reference import load_corpus

REPO = Path(__file__).resolve().parents[1]
TYPICAL = "Quantized embedding models answer quickly from a small serverless function on AWS."  # ~20 tokens


def median_of(repeats: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeats))


def paired_ratio(numerators: list[float], denominators: list[float]) -> float:
    """The median of per-round ratios of two systems measured round by round, side by side."""
    return statistics.median(a / b for a, b in zip(numerators, denominators, strict=True))


def timed(call: Callable[[], Any]) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def percentiles(samples_ms: list[float]) -> dict[str, float]:
    ordered = sorted(samples_ms)
    return {
        "p50_ms": round(float(np.percentile(ordered, 50)), 3),
        "p99_ms": round(float(np.percentile(ordered, 99)), 3),
    }


def corpus_batches(size: int = 32, sort: bool = False) -> list[list[str]]:
    """The fidelity corpus in requests of ``size``; ``sort`` orders the whole corpus by length first."""
    corpus = load_corpus()
    if sort:
        corpus = sorted(corpus, key=len)
    return [corpus[i : i + size] for i in range(0, len(corpus), size)]


class Context:
    function_name, memory_limit_in_mb, aws_request_id = "bench", 2048, "bench"
    invoked_function_arn = "arn:aws:lambda:us-east-1:123456789012:function:bench"

    def get_remaining_time_in_millis(self) -> int:
        return 29_000


def api_event(texts: list[str] | str) -> dict[str, Any]:
    event = json.loads((REPO / "events" / "api-embeddings.json").read_text())
    event["body"] = json.dumps({"model": "all-MiniLM-L6-v2", "input": texts})
    return event


def pad(batch: list[list[int]]) -> tuple[np.ndarray, np.ndarray]:
    longest = max(len(ids) for ids in batch)
    input_ids = np.zeros((len(batch), longest), dtype=np.int64)
    mask = np.zeros_like(input_ids)
    for row, ids in enumerate(batch):
        input_ids[row, : len(ids)] = ids
        mask[row, : len(ids)] = 1
    return input_ids, mask


def start_moto() -> tuple[subprocess.Popen, str]:
    """moto in server mode, a separate process on 127.0.0.1 and a free port; returns it and its URL."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            urllib.request.urlopen(url + "/moto-api/", timeout=1)
            break
        except OSError:
            time.sleep(0.1)
    return process, url


# A pause before each timed turn of an ``Isolated`` system: the last system's idle workers (PyTorch's OpenMP
# threads spin for up to 200 ms after a parallel region, onnxruntime's briefly) park before the next one runs.
SETTLE_S = 0.3


def _serve(factory: Callable[..., Any], args: tuple[Any, ...], conn: Any) -> None:
    """Child process of ``Isolated``: build the system, then answer calls until "close" (stdout muted)."""
    with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink):
        system = factory(*args)
        conn.send(None)
        while (request := conn.recv()) is not None:
            method, call_args, times = request
            call = functools.partial(getattr(system, method), *call_args)
            # timed here, not across the pipe: a round trip is a tenth of a batch-1 call
            conn.send([timed(call) for _ in range(times)] if times else call())
        if hasattr(system, "close"):
            system.close()
        conn.send(None)


class Isolated:
    """``factory(*args)`` built in its own spawned process and driven over a pipe, one call at a time.

    In one shared process the system measured after another ran up to 7 % slower than alone (its thread
    pool, allocator arenas and caches after the other's; QUANTIZATION.md, round 6), which tilted each
    ratio by the order the systems took turns in. ``factory`` must be importable by the child (spawn).
    """

    def __init__(self, factory: Callable[..., Any], *args: Any) -> None:
        import multiprocessing

        spawn = multiprocessing.get_context("spawn")
        self.conn, theirs = spawn.Pipe()
        self.process = spawn.Process(target=_serve, args=(factory, args, theirs), daemon=True)
        self.process.start()
        theirs.close()  # the child holds the only other end: if it dies, the next recv raises EOFError
        self._answer()  # built before the next system starts: no start-up overlaps another's run

    def _answer(self) -> Any:
        if not self.conn.poll(600):
            raise TimeoutError("benchmark child did not answer in 600 s")
        return self.conn.recv()

    def call(self, method: str, *args: Any) -> Any:
        """``system.method(*args)``'s result, after ``SETTLE_S``."""
        time.sleep(SETTLE_S)
        self.conn.send((method, args, 0))
        return self._answer()

    def timed(self, method: str, *args: Any, times: int = 1) -> list[float]:
        """Seconds of each of ``times`` calls of ``system.method(*args)``, timed in the child."""
        time.sleep(SETTLE_S)
        self.conn.send((method, args, times))
        return self._answer()

    def close(self) -> None:
        if self.process.is_alive():
            self.conn.send(None)
            self._answer()
        self.process.join(30)
