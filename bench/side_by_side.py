"""Side by side, interleaved: texts/s at batch 32 (length-sorted fidelity corpus) and batch-1 p50.

    PYTHONPATH=shared .venv/bin/python bench/side_by_side.py THREADS SYSTEM [SYSTEM ...]

A SYSTEM is a model folder (opened as the runtime opens it: ``quantfn.tasks.open_pipeline``, tokenization
and pooling included), ``plain:FOLDER`` (plain onnxruntime, default SessionOptions, on that folder's
``model.onnx``, mean pooling in numpy: what an ONNX user runs) or ``st`` (sentence-transformers fp32 on the
default model's weights, needs the reference extra). Five rounds, every system once per round; ratios are
medians of per-round ratios against the first system (noise on a shared host hits all alike).
"""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from quantfn.build.reference import load_corpus
from quantfn.models.manifest import Manifest
from quantfn.tasks import open_pipeline

Embed = Callable[[list[str]], object]


def plain(folder: Path, threads: int) -> Embed:
    import onnxruntime as ort
    from tokenizers import Tokenizer

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))

    def embed(texts: list[str]) -> np.ndarray:
        encodings = tokenizer.encode_batch(texts)
        ids = np.array([e.ids for e in encodings], np.int64)
        mask = np.array([e.attention_mask for e in encodings], np.int64)
        hidden = session.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        pooled = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    return embed


def sentence_transformers(threads: int) -> Embed:
    import torch
    from sentence_transformers import SentenceTransformer

    from quantfn.build.source import locate_source

    torch.set_num_threads(threads)
    model = SentenceTransformer(str(locate_source().folder), device="cpu")
    model.max_seq_length = 256
    return lambda texts: model.encode(texts, batch_size=32, normalize_embeddings=True)


def main(argv: list[str]) -> None:
    threads = int(argv[0])
    corpus = sorted(load_corpus(), key=len)
    batches = [corpus[i : i + 32] for i in range(0, len(corpus), 32)]
    systems: dict[str, Embed] = {}
    for arg in argv[1:]:
        if arg == "st":
            systems["sentence-transformers fp32"] = sentence_transformers(threads)
        elif arg.startswith("plain:"):
            systems[f"plain onnxruntime {arg[6:]}"] = plain(Path(arg[6:]), threads)
        else:
            folder = Path(arg)
            systems[str(folder)] = open_pipeline(folder, Manifest.read(folder), threads).embed
    for embed in systems.values():
        embed(corpus[:32])
    rates: dict[str, list[float]] = {k: [] for k in systems}
    latency: dict[str, list[float]] = {k: [] for k in systems}
    for _ in range(5):
        for name, embed in systems.items():
            started = time.perf_counter()
            for batch in batches:
                embed(batch)
            rates[name].append(len(corpus) / (time.perf_counter() - started))
            samples = []
            for text in corpus[::12]:
                started = time.perf_counter()
                embed([text])
                samples.append((time.perf_counter() - started) * 1000)
            latency[name].append(statistics.median(samples))
    base = next(iter(systems))
    for name in systems:
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates[base], strict=True))
        b1 = statistics.median(a / b for a, b in zip(latency[name], latency[base], strict=True))
        print(
            f"{threads} thr  {name:60s} {statistics.median(rates[name]):7.1f}/s  x{ratio:.2f}  "
            f"b1 p50 {statistics.median(latency[name]):.2f} ms ({b1:.2f}x)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
