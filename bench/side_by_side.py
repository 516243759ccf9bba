"""Side by side, interleaved: texts/s at batch 32 (length-sorted fidelity corpus) and batch-1 p50.

    PYTHONPATH=shared:. .venv/bin/python bench/side_by_side.py THREADS SYSTEM [SYSTEM ...]

A SYSTEM is a model folder (opened as the runtime opens it: ``quantfn.tasks.open_pipeline``, tokenization
and pooling included), ``plain:FOLDER`` (plain onnxruntime, default SessionOptions, on that folder's
``model.onnx``, mean pooling in numpy: what an ONNX user runs), ``intra:FOLDER`` or ``data:FOLDER`` (the
runtime with that ``parallelism``; a bare FOLDER gets the runtime's default, ``auto``; a classifier's folder
is timed classifying) or ``st``
(sentence-transformers fp32 on the default model's weights, needs the reference extra). Five rounds,
every system once per round; ratios are medians of per-round ratios against the first system (noise on a
shared host hits all alike).

Each system lives in its own spawned process (``bench.measure.Isolated``) and only one runs at a time.
"""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np

from bench.measure import Isolated, corpus_batches, paired_ratio, timed
from quantfn.models.manifest import Manifest
from quantfn.tasks import ClassifyPipeline, open_pipeline

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

    from quantfn.modelbuild.source import locate_source

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
    parallelism, _, path = arg.partition(":") if arg.startswith(("intra:", "data:")) else ("auto", "", arg)
    folder = Path(path)
    name = str(folder) if parallelism == "auto" else arg
    pipeline = open_pipeline(folder, Manifest.read(folder), threads, parallelism=parallelism)
    return name, pipeline.classify if isinstance(pipeline, ClassifyPipeline) else pipeline.embed


class System:
    """One SYSTEM argument, opened in an ``Isolated`` child: a pass over the corpus and batch-1 latency."""

    def __init__(self, arg: str, threads: int) -> None:
        self.batches = corpus_batches(32, sort=True)
        self.name, self.embed = open_system(arg, threads)
        self.embed(self.batches[0])

    def label(self) -> str:
        return self.name

    def rate(self) -> float:
        """Texts/s of one pass over the length-sorted corpus in batches of 32."""
        return sum(map(len, self.batches)) / timed(lambda: [self.embed(batch) for batch in self.batches])

    def b1(self) -> float:
        """Median ms of one text at a time, over every 12th text."""
        texts = [text for batch in self.batches for text in batch][::12]
        return statistics.median(timed(lambda t=text: self.embed([t])) * 1000 for text in texts)


def main(argv: list[str]) -> None:
    threads = int(argv[0])
    children: dict[str, Isolated] = {}
    try:
        for arg in argv[1:]:
            child = Isolated(System, arg, threads)
            children[child.call("label")] = child
        rates: dict[str, list[float]] = {k: [] for k in children}
        latency: dict[str, list[float]] = {k: [] for k in children}
        for _ in range(5):
            for name, child in children.items():
                rates[name].append(child.call("rate"))
                latency[name].append(child.call("b1"))
    finally:
        for child in children.values():
            child.close()
    base = next(iter(children))
    for name in children:
        ratio = paired_ratio(rates[name], rates[base])
        b1 = paired_ratio(latency[name], latency[base])
        print(
            f"{threads} thr  {name:60s} {statistics.median(rates[name]):7.1f}/s  x{ratio:.2f}  "
            f"b1 p50 {statistics.median(latency[name]):.2f} ms ({b1:.2f}x)"
        )


if __name__ == "__main__":
    main(sys.argv[1:])
