"""Side by side, interleaved: texts/s at batch 32 (length-sorted fidelity corpus) and batch-1 p50.

    PYTHONPATH=shared .venv/bin/python bench/side_by_side.py THREADS SYSTEM [SYSTEM ...]

A SYSTEM is a model folder (opened as the runtime opens it: ``quantfn.tasks.open_pipeline``, tokenization
and pooling included), ``plain:FOLDER`` (plain onnxruntime, default SessionOptions, on that folder's
``model.onnx``, mean pooling in numpy: what an ONNX user runs) or ``st`` (sentence-transformers fp32 on the
default model's weights, needs the reference extra). Five rounds, every system once per round; ratios are
medians of per-round ratios against the first system (noise on a shared host hits all alike).

Each system lives in its own process (spawned, so none inherits another's thread pools, allocator arenas
or warmed caches) and only one runs at a time, after a pause in which the last one's spinning workers
park: in one shared process the system measured after another
ran up to 7 % slower than alone (round 6, QUANTIZATION.md), which biased every ratio by its order.
"""

from __future__ import annotations

import multiprocessing
import statistics
import sys
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path

import numpy as np

from quantfn.build.reference import load_corpus
from quantfn.models.manifest import Manifest
from quantfn.tasks import open_pipeline

Embed = Callable[[list[str]], object]
# A pause before each turn: the last system's idle workers (PyTorch's OpenMP threads spin for up to
# 200 ms after a parallel region, onnxruntime's briefly) park before the next one is timed.
SETTLE_S = 0.3


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


def open_system(arg: str, threads: int) -> tuple[str, Embed]:
    """The SYSTEM argument's display name and its embed function."""
    if arg == "st":
        return "sentence-transformers fp32", sentence_transformers(threads)
    if arg.startswith("plain:"):
        return f"plain onnxruntime {arg[6:]}", plain(Path(arg[6:]), threads)
    folder = Path(arg)
    return str(folder), open_pipeline(folder, Manifest.read(folder), threads).embed


def serve(arg: str, threads: int, conn: Connection) -> None:
    """Child process: open one system, then answer "pass" (texts/s at batch 32) and "b1" (p50 ms) until "stop"."""
    corpus = sorted(load_corpus(), key=len)
    batches = [corpus[i : i + 32] for i in range(0, len(corpus), 32)]
    name, embed = open_system(arg, threads)
    embed(corpus[:32])
    conn.send(name)
    while (command := conn.recv()) != "stop":
        if command == "pass":
            started = time.perf_counter()
            for batch in batches:
                embed(batch)
            conn.send(len(corpus) / (time.perf_counter() - started))
        else:
            samples = []
            for text in corpus[::12]:
                started = time.perf_counter()
                embed([text])
                samples.append((time.perf_counter() - started) * 1000)
            conn.send(statistics.median(samples))


def main(argv: list[str]) -> None:
    threads = int(argv[0])
    spawn = multiprocessing.get_context("spawn")
    children: dict[str, tuple[Connection, multiprocessing.process.BaseProcess]] = {}
    for arg in argv[1:]:
        ours, theirs = spawn.Pipe()
        process = spawn.Process(target=serve, args=(arg, threads, theirs), daemon=True)
        process.start()
        children[ours.recv()] = (ours, process)  # opened one at a time: no system's build-up overlaps a run
    rates: dict[str, list[float]] = {k: [] for k in children}
    latency: dict[str, list[float]] = {k: [] for k in children}
    for _ in range(5):
        for name, (conn, _) in children.items():
            time.sleep(SETTLE_S)
            conn.send("pass")
            rates[name].append(conn.recv())
            time.sleep(SETTLE_S)
            conn.send("b1")
            latency[name].append(conn.recv())
    for conn, process in children.values():
        conn.send("stop")
        process.join()
    base = next(iter(children))
    for name in children:
        ratio = statistics.median(a / b for a, b in zip(rates[name], rates[base], strict=True))
        b1 = statistics.median(a / b for a, b in zip(latency[name], latency[base], strict=True))
        print(
            f"{threads} thr  {name:60s} {statistics.median(rates[name]):7.1f}/s  x{ratio:.2f}  "
            f"b1 p50 {statistics.median(latency[name]):.2f} ms ({b1:.2f}x)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
