"""Measurements shared by the benchmark sections: timing helpers and workloads."""

from __future__ import annotations

import json
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

from quantfn.build.reference import load_corpus

REPO = Path(__file__).resolve().parents[1]
TYPICAL = "Quantized embedding models answer quickly from a small serverless function on AWS."  # ~20 tokens


def median_of(repeats: int, run: Callable[[], float]) -> float:
    return statistics.median(run() for _ in range(repeats))


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
