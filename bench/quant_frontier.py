"""Measure the quantization frontier: every recipe's size, fidelity and speed on this machine.

Usage (from the repo root):
    HF_HUB_OFFLINE=1 PYTHONPATH=shared .venv/bin/python bench/quant_frontier.py [--out /tmp/quantfn-frontier] \
        [--recipes default,fp32,...] [--repeats 5] [--no-torch] [--reuse]

Builds each recipe with ``quantfn.modelbuild.build_model`` (gates overridden so every
point is reported), then measures throughput through the runtime's task pipeline (sentences/s,
length-sorted batches of 32 of the 600-sentence corpus, 2 intra-op threads,
median of ``--repeats`` passes) and batch-1 latency (median ms over 50 texts x 3),
and PyTorch fp32 sentence-transformers throughput at 2 threads for comparison.
Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from quantfn.modelbuild import DEFAULT_MODEL_ID, RECIPES, Gate, build_model
from quantfn.modelbuild.reference import load_corpus
from quantfn.models.manifest import Manifest
from quantfn.tasks import Pipeline, open_pipeline

# Every figure measured and recorded, none enforced: a frontier shows each recipe as it builds.
OPEN_GATE = Gate(
    task_retention=None,
    top1_agreement=None,
    cosine_mean=-1.0,
    cosine_p1=None,
    cosine_min=None,
    recall_at_5=None,
    batch_invariance_min_cosine=None,
    max_size_ratio=None,
)


def torch_throughput(texts: list[str], repeats: int) -> float:
    import torch
    from sentence_transformers import SentenceTransformer

    from quantfn.modelbuild.source import locate_source

    torch.set_num_threads(2)
    model = SentenceTransformer(str(locate_source().folder), device="cpu")
    model.max_seq_length = 256
    model.encode(texts[:32], batch_size=32)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        model.encode(texts, batch_size=32, normalize_embeddings=True)
        rates.append(len(texts) / (time.perf_counter() - start))
    return float(np.median(rates))


def throughput(pipeline: Pipeline, texts: list[str]) -> float:
    """Sentences per second of one pass over ``texts`` (the pipeline sorts them into batches of 32)."""
    start = time.perf_counter()
    pipeline.embed(texts)
    return len(texts) / (time.perf_counter() - start)


def latency_ms(pipeline: Pipeline, texts: list[str]) -> float:
    """Median batch-1 latency in milliseconds over ``texts``."""
    times = []
    for text in texts:
        start = time.perf_counter()
        pipeline.embed([text])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/quantfn-frontier"))
    parser.add_argument("--recipes", default="fp32,default,int8-weight,int8-mixed,int8-token,int8-dynamic,int4,fp16")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no-torch", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="time models already built in --out instead of rebuilding")
    args = parser.parse_args()
    texts = load_corpus()
    rows, pipelines = [], []
    for name in args.recipes.split(","):
        model_id = DEFAULT_MODEL_ID if name == "default" else f"{DEFAULT_MODEL_ID}-{name}"
        if args.reuse and (args.out / model_id / "manifest.json").is_file():
            manifest = json.loads((args.out / model_id / "manifest.json").read_text(encoding="utf-8"))
        else:
            manifest = build_model(args.out, recipe=name, gate=OPEN_GATE)
        folder = args.out / manifest["model_id"]
        pipeline = open_pipeline(folder, Manifest.from_dict(manifest), threads=2, parallelism="intra")
        pipeline.embed(texts[:32])  # warm up
        pipelines.append(pipeline)
        rows.append(
            {
                "recipe": name,
                "mb": Manifest.from_dict(manifest).weights_size / 1e6,
                "ratio": manifest["size_ratio_vs_fp32"],
                **manifest["fidelity"],
                "gate": RECIPES[name].gate.as_dict(),
            }
        )
    # Interleave the timed passes (round-robin over models) so drift in machine load hits all alike.
    rates: list[list[float]] = [[] for _ in rows]
    latencies: list[list[float]] = [[] for _ in rows]
    for _ in range(args.repeats):
        for i, pipeline in enumerate(pipelines):
            rates[i].append(throughput(pipeline, texts))
            latencies[i].append(latency_ms(pipeline, texts[:50]))
    for row, rate, latency in zip(rows, rates, latencies, strict=True):
        row["throughput"] = float(np.median(rate))
        row["latency_ms"] = float(np.median(latency))
        print(json.dumps(row), flush=True)
    base = next((r["throughput"] for r in rows if r["recipe"] == "fp32"), None)
    torch_rate = None if args.no_torch else torch_throughput(texts, args.repeats)
    print(f"\nPyTorch fp32 sentence-transformers: {torch_rate and round(torch_rate)} sentences/s\n")
    print(
        "| recipe | file MB | size ratio | cosine mean | cosine min | spearman | recall@5 | batch inv. min cos "
        "| sent/s (b32, 2 thr) | vs ORT fp32 | vs PyTorch fp32 | b1 latency ms |"
    )
    print("|" + "---|" * 12)
    for r in rows:
        vs_ort = f"{r['throughput'] / base:.2f}x" if base else "-"
        vs_torch = f"{r['throughput'] / torch_rate:.2f}x" if torch_rate else "-"
        print(
            f"| {r['recipe']} | {r['mb']:.1f} | {r['ratio']:.3f} | {r['cosine_mean']:.6f} | {r['cosine_min']:.6f} "
            f"| {r['spearman']:.6f} | {r['recall_at_5']:.4f} | {r['batch_invariance_min_cosine']:.6f} "
            f"| {r['throughput']:.0f} | {vs_ort} | {vs_torch} | {r['latency_ms']:.2f} |"
        )


if __name__ == "__main__":
    main()
