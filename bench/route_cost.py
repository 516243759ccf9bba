"""Measure the per-token cost the router uses to predict local inference time.

Runs the real service (tokenize -> length-sorted batches -> session) on texts of
three lengths at 1 and 2 intra-op threads and prints milliseconds per token
(tokens after truncation to the model's maximum: what the encoder really runs),
the parallel efficiency of the second thread and the cold model load time.

    PYTHONPATH=shared:. .venv/bin/python bench/route_cost.py --models-root build/models

The results set QUANTFN_COST_MS_PER_TOKEN and QUANTFN_COST_MS_PER_INPUT (1 vCPU), QUANTFN_COST_PARALLEL_EFFICIENCY
and QUANTFN_COST_LOAD_MS; see the README's GPU route section.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np

from quantfn.config import RuntimeSettings, Settings
from quantfn.modelbuild.reference import load_corpus
from quantfn.registry import Registry

LENGTHS = {"short": 1, "medium": 4, "long": 16}  # sentences joined per text


def texts_of(length: int, count: int) -> list[str]:
    corpus = load_corpus()
    return [" ".join(corpus[(i + j) % len(corpus)] for j in range(length)) for i in range(count)]


def measure(models_root: Path, model_id: str, threads: int, repeats: int) -> dict[str, float]:
    started = time.perf_counter()
    registry = Registry(
        Settings(
            runtime=RuntimeSettings(models=((model_id, f"layer:{model_id}"),), models_root=models_root, threads=threads)
        )
    )
    encoder = registry.pipeline(registry.default)
    load_ms = (time.perf_counter() - started) * 1000
    out = {"load_ms": load_ms}
    for name, length in LENGTHS.items():
        texts = texts_of(length, 64)
        tokens = encoder.encode(texts)
        run_tokens = sum(min(c, encoder.max_length) for c in tokens.counts)
        encoder.forward(tokens)  # warm-up
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            encoder.forward(tokens)
            times.append((time.perf_counter() - t0) * 1000)
        out[name] = statistics.median(times) / run_tokens
        out[f"{name}_tokens_per_text"] = run_tokens / len(texts)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models-root", default="build/models")
    parser.add_argument("--model-id", default="all-minilm-l6-v2")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    results = {t: measure(Path(args.models_root), args.model_id, t, args.repeats) for t in (1, 2)}
    for threads, r in results.items():
        per = ", ".join(f"{n} ({r[n + '_tokens_per_text']:.0f} tok/text) {r[n]:.4f} ms/token" for n in LENGTHS)
        print(f"threads={threads}: load {r['load_ms']:.0f} ms; {per}")
    # Fit ms per text = a * tokens per text + b on one thread: a is the per-token cost, b the per-input one.
    one = results[1]
    xs = np.array([one[f"{n}_tokens_per_text"] for n in LENGTHS])
    ys = np.array([one[n] * one[f"{n}_tokens_per_text"] for n in LENGTHS])
    per_token, per_input = np.polyfit(xs, ys, 1)
    two = results[2]
    speedup = sum(one[n] * one[f"{n}_tokens_per_text"] for n in LENGTHS) / sum(
        two[n] * two[f"{n}_tokens_per_text"] for n in LENGTHS
    )
    print(f"QUANTFN_COST_MS_PER_TOKEN={per_token:.4f}  (1 vCPU, least-squares over the three lengths)")
    print(f"QUANTFN_COST_MS_PER_INPUT={max(per_input, 0.0):.3f}")
    print(f"QUANTFN_COST_PARALLEL_EFFICIENCY={max(speedup - 1.0, 0.0):.2f}  (speed-up of the 2nd thread: t1/t2 - 1)")
    print(f"QUANTFN_COST_LOAD_MS={results[1]['load_ms']:.0f}")


if __name__ == "__main__":
    main()
