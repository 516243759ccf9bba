"""The benchmark sections: cold start, import time, warm latency/throughput, frontier, cost."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np

from bench.measure import (
    REPO,
    TYPICAL,
    Context,
    Isolated,
    api_event,
    corpus_batches,
    pad,
    paired_ratio,
    percentiles,
    timed,
)

# Lambda's published x86 prices (us-east-1): per GB-second and per request. Init is billed (since 2025-08).
USD_PER_GB_S = 0.0000166667
USD_PER_REQUEST = 0.20 / 1_000_000
MB_PER_VCPU = 1769


# -- cold start ------------------------------------------------------------------------------------
def cold_start(mode: str, env: dict[str, str], target: str = "") -> dict[str, Any]:
    """Spawn a fresh interpreter; wall time until it prints its answer, plus its own phase split."""
    started = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, str(REPO / "bench" / "cold_child.py"), mode, target],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
        text=True,
    )
    # The child's own output (logs, EMF) may come first: the answer is the line that starts {"mode"
    line = process.stdout.readline()
    while line and not line.startswith('{"mode"'):
        line = process.stdout.readline()
    wall = time.perf_counter() - started
    process.wait(timeout=120)
    result = json.loads(line)
    result["wall_s"] = wall
    return result


def cold_starts(cases: dict[str, tuple[str, dict[str, str], str]], repeats: int) -> dict[str, Any]:
    """Interleave the cases, rotating their order (noise hits all alike); median wall and phases per case."""
    for mode, env, target in cases.values():  # one unmeasured run each: a warm page cache, as documented
        cold_start(mode, env, target)
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in cases}
    names = list(cases)
    for round_ in range(repeats):
        # rotate the order each round: no case always runs right after the heavy sentence-transformers one
        for name in names[round_ % len(names) :] + names[: round_ % len(names)]:
            mode, env, target = cases[name]
            runs[name].append(cold_start(mode, env, target))
    summary = {}
    for name, results in runs.items():
        phases = {key: statistics.median(r["phases"][key] for r in results) for key in results[0]["phases"]}
        summary[name] = {
            "wall_s": round(statistics.median(r["wall_s"] for r in results), 4),
            "runs": len(results),
            "phases_ms": {k: round(v, 1) for k, v in phases.items()},
        }
    return summary


def import_time_top(env: dict[str, str], count: int = 12) -> dict[str, Any]:
    """``python -X importtime`` of the API handler module: total and the heaviest top-level imports."""
    totals = []
    for _ in range(5):
        output = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", "import functions.api.app"],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stderr
        rows = []
        for line in output.splitlines():
            match = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|(\s*)(\S+)", line)
            if match:
                rows.append((int(match.group(2)), len(match.group(3)), match.group(4)))
        totals.append(rows)
    last = totals[-1]
    # direct imports made while importing the handler module (one indentation level below it)
    top_level = sorted((r for r in last if r[1] == 3), reverse=True)[:count]
    total_us = statistics.median(max(r[0] for r in rows if r[2] == "functions.api.app") for rows in totals)
    return {
        "total_ms": round(total_us / 1000, 1),
        "top": [{"module": m, "cumulative_ms": round(us / 1000, 1)} for us, _, m in top_level],
    }


# -- warm ------------------------------------------------------------------------------------------
ORDERS = (("corpus_order", False), ("length_sorted", True))


class _Quantfn:
    """The real API handler in this process; logs and EMF metrics are written as in Lambda (to a null sink)."""

    def __init__(self, threads: int) -> None:
        from functions.api.app import lambda_handler
        from quantfn.registry import get_registry, reset_registry

        os.environ["QUANTFN_THREADS"] = str(threads)
        reset_registry()
        self.handler, self.reset = lambda_handler, reset_registry
        self.one = api_event(TYPICAL)
        self.handler(self.one, Context())
        self.encoder = get_registry().pipeline(get_registry().default)
        self.events = {label: [api_event(b) for b in corpus_batches(32, sort=sort)] for label, sort in ORDERS}

    def single(self) -> None:
        self.handler(self.one, Context())

    def run(self, label: str) -> None:
        for event in self.events[label]:
            self.handler(event, Context())

    def overhead(self, label: str, count: int, repeats: int) -> dict[str, float]:
        """Wall time with a session.run in flight inside the handler, and the pass's own total (median of passes).

        Pieces of a batch run at once on two threads (``parallelism``): the time counted is while any runs.
        """
        encoder, inside, busy, lock = self.encoder, [0.0], [0, 0.0], threading.Lock()

        class Timed:
            def __init__(self, session: Any) -> None:
                self.session = session

            def run(self, *args: Any, **kwargs: Any) -> Any:
                with lock:
                    busy[0] += 1
                    if busy[0] == 1:
                        busy[1] = time.perf_counter()
                try:
                    return self.session.run(*args, **kwargs)
                finally:
                    with lock:
                        busy[0] -= 1
                        if busy[0] == 0:
                            inside[0] += time.perf_counter() - busy[1]

        self.handler(self.events[label][0], Context())  # the piece session exists before it is wrapped
        sessions = encoder.session, encoder.piece_session
        encoder.session, encoder.piece_session = (Timed(s) if s is not None else None for s in sessions)
        fractions, raws = [], []
        try:
            for _ in range(repeats):
                inside[0] = 0.0
                total = timed(lambda: self.run(label))
                fractions.append(1 - inside[0] / total)
                raws.append(inside[0])
        finally:
            encoder.session, encoder.piece_session = sessions
        return {
            "session_run_inputs_per_s": round(count / statistics.median(raws), 1),
            "handler_overhead": round(statistics.median(fractions), 4),
        }

    def close(self) -> None:
        self.reset()


class _Ort:
    """Plain onnxruntime on the fp32 model folder, tokenization and pooling included, as a user would write it."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import onnxruntime as ort
        from tokenizers import Tokenizer

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(model_dir / "model.onnx"), options, providers=["CPUExecutionProvider"])
        self.tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(256)
        self.batches = {label: corpus_batches(32, sort=sort) for label, sort in ORDERS}
        self.single()

    def embed(self, texts: list[str]) -> np.ndarray:
        ids, mask = pad([e.ids for e in self.tokenizer.encode_batch(texts)])
        hidden = self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    def single(self) -> None:
        self.embed([TYPICAL])

    def run(self, label: str) -> None:
        for batch in self.batches[label]:
            self.embed(batch)


class _Torch:
    """sentence-transformers on PyTorch fp32 (it sorts by length inside ``encode``)."""

    def __init__(self, model_dir: Path, threads: int) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.model = SentenceTransformer(str(model_dir), device="cpu")
        self.batches = {label: corpus_batches(32, sort=sort) for label, sort in ORDERS}
        self.single()

    def single(self) -> None:
        self.model.encode([TYPICAL])

    def run(self, label: str) -> None:
        for batch in self.batches[label]:
            self.model.encode(batch, batch_size=32)


B1_ROUNDS, B1_CALLS = 30, 60  # rounds long enough to pass the warm-up after each turn's idle pause


def warm_side_by_side(
    fp32_dir: Path, st_dir: Path, threads: int, repeats: int, function_env: dict[str, str] | None = None
) -> dict[str, dict[str, Any]]:
    """quantfn's handler, plain onnxruntime fp32 and sentence-transformers, interleaved pass by pass.

    Each system runs in its own process (``measure.Isolated``), one at a time. Batch-1 latency comes from
    ``B1_ROUNDS`` short rounds in which each system answers ``B1_CALLS`` single texts, the order rotated every
    round (after each turn's pause the int8 graph needs about ten calls to regain its steady speed, plain fp32
    one or two: QUANTIZATION.md round 11; each round's first call is reported apart, as the sparse-traffic
    case); throughput from ``repeats`` rounds in which each system makes one whole pass over the corpus in
    batches of 32. quantfn's ratio to each baseline is the median of the per-round ratios (of round medians
    for batch 1), so a machine that slows down between rounds slows all three alike. The quantfn child gets
    the template's function environment (``function_env``), the baselines run as a user would run them.
    """
    systems: dict[str, Isolated] = {}
    try:
        with mock.patch.dict(os.environ, function_env or {}):  # what the spawned child inherits
            systems["quantfn"] = Isolated(_Quantfn, threads)
        systems["ort_fp32"] = Isolated(_Ort, fp32_dir, threads)
        systems["torch"] = Isolated(_Torch, st_dir, threads)
        names = list(systems)
        latencies: dict[str, list[float]] = {name: [] for name in systems}
        round_medians: dict[str, list[float]] = {name: [] for name in systems}
        first_calls: dict[str, list[float]] = {name: [] for name in systems}  # each round's first, after the pause
        for turn in range(B1_ROUNDS):
            for name in names[turn % len(names) :] + names[: turn % len(names)]:
                calls = B1_CALLS // 3 if name == "torch" else B1_CALLS
                samples = [s * 1000 for s in systems[name].timed("single", times=calls)]
                latencies[name] += samples
                round_medians[name].append(statistics.median(samples))
                first_calls[name].append(samples[0])
        results: dict[str, dict[str, Any]] = {
            name: {
                "threads": threads,
                "batch1": percentiles(samples)
                | {"first_after_pause_p50_ms": round(statistics.median(first_calls[name]), 3)},
            }
            for name, samples in latencies.items()
        }
        b1 = results["quantfn"]["batch1"]
        for name in ("ort_fp32", "torch"):
            b1[f"ratio_vs_{name}"] = round(paired_ratio(round_medians["quantfn"], round_medians[name]), 3)
        # A request that arrives after the others' turns and a SETTLE_S pause (cold caches, idle threads): the
        # sparse-traffic case, reported beside the steady one.
        b1["first_after_pause_ratio_vs_ort_fp32"] = round(
            paired_ratio(first_calls["quantfn"], first_calls["ort_fp32"]), 3
        )
        for label, sort in ORDERS:
            count = sum(map(len, corpus_batches(32, sort=sort)))
            passes: dict[str, list[float]] = {name: [] for name in systems}
            for system in systems.values():
                system.call("run", label)  # warm-up pass
            for _ in range(repeats):
                for name, system in systems.items():
                    passes[name] += system.timed("run", label)
            for name in systems:
                results[name][label] = {"inputs_per_s": round(count / statistics.median(passes[name]), 1)}
            ours = results["quantfn"][label]
            for name in ("ort_fp32", "torch"):
                ours[f"ratio_vs_{name}"] = round(paired_ratio(passes[name], passes["quantfn"]), 3)
            ours |= systems["quantfn"].call("overhead", label, count, repeats)
    finally:
        for system in systems.values():
            system.close()
    return results


# -- cost ------------------------------------------------------------------------------------------
def lambda_cost(
    per_request_s: dict[int, float], per_embedding_s: dict[int, float], init_s: float, cold_rate: float
) -> list[dict[str, Any]]:
    """$ per 1M requests and per 1M embeddings for memory sizes 512-3008 MB.

    ``per_request_s``/``per_embedding_s`` are measured at 1 and 2 threads with a whole core each.
    A function gets ``memory / 1769`` vCPUs: below one vCPU the time stretches by the share;
    from 1,770 MB it runs two threads on its share of two cores.
    """
    rows = []
    for memory in (512, 1024, 1536, 1769, 2048, 2560, 3008):
        share = memory / MB_PER_VCPU
        threads = 1 if share <= 1 else 2
        stretch = max(1.0, threads / share)
        request_s = per_request_s[threads] * stretch
        embedding_s = per_embedding_s[threads] * stretch
        gb = memory / 1024
        init = cold_rate * init_s * max(1.0, 1 / share) * gb * USD_PER_GB_S
        rows.append(
            {
                "memory_mb": memory,
                "vcpus": round(share, 2),
                "threads": threads,
                "request_ms": round(request_s * 1000, 2),
                "usd_per_million_requests": round(1e6 * (request_s * gb * USD_PER_GB_S + USD_PER_REQUEST + init), 4),
                # batch jobs: one invocation carries many embeddings, so per-request charges vanish
                "usd_per_million_embeddings": round(1e6 * embedding_s * gb * USD_PER_GB_S, 4),
            }
        )
    return rows
