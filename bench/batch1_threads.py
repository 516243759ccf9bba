"""Batch-1 latency of session.run by thread count and thread-pool option: ORT fp32 against the default.

    PYTHONPATH=shared:. OPENBLAS_NUM_THREADS=1 .venv/bin/python bench/batch1_threads.py [VARIANT ...]

150 fidelity-corpus sentences one at a time, five rounds in which every variant takes a turn (one
process); p50 per round, ratios are medians of per-round ratios against the first variant. Session only:
no tokenization or pooling, so it isolates what the thread pool does to one short input.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from bench.measure import REPO, paired_ratio
from quantfn.modelbuild.reference import load_corpus
from quantfn.models.manifest import Manifest
from quantfn.models.session import open_session

MODELS = REPO / "build" / "models"
DEFAULT, FP32 = MODELS / "all-minilm-l6-v2", MODELS / "all-minilm-l6-v2-fp32"


def plain(threads: int, **config: str) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    for key, value in config.items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(FP32 / "model.onnx"), options, providers=["CPUExecutionProvider"])


def default(threads: int, **config: str) -> Any:
    manifest = Manifest.read(DEFAULT)
    session = dataclasses.replace(manifest.session, config={**manifest.session_config, **config})
    manifest = dataclasses.replace(manifest, session=session)
    return open_session(DEFAULT / "model.onnx", manifest, threads)


VARIANTS: dict[str, Callable[[], Any]] = {
    "fp32-2t": lambda: plain(2),
    "fp32-1t": lambda: plain(1),
    "default-2t": lambda: default(2),
    "default-1t": lambda: default(1),
    "default-2t-nospin": lambda: default(2, **{"session.intra_op.allow_spinning": "0"}),
    "default-2t-dynamic-block-4": lambda: default(2, **{"session.dynamic_block_base": "4"}),
    "fp32-2t-dynamic-block-4": lambda: plain(2, **{"session.dynamic_block_base": "4"}),
}


def main(names: list[str]) -> None:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(DEFAULT / "tokenizer.json"))
    feeds = []
    for text in load_corpus()[:150]:
        encoding = tokenizer.encode(text)
        ids, mask = encoding.ids[:256], encoding.attention_mask[:256]
        feeds.append({"input_ids": np.array([ids], np.int64), "attention_mask": np.array([mask], np.int64)})
    sessions = {name: VARIANTS[name]() for name in names}
    p50s: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(5):
        for name, session in sessions.items():
            inputs = {i.name for i in session.get_inputs()}
            samples = []
            for feed in feeds:
                feed = {k: v for k, v in feed.items() if k in inputs}
                if "token_type_ids" in inputs:
                    feed["token_type_ids"] = np.zeros_like(feed["input_ids"])
                started = time.perf_counter()
                session.run(None, feed)
                samples.append(time.perf_counter() - started)
            p50s[name].append(statistics.median(samples) * 1000)
            time.sleep(0.2)
    base = names[0]
    for name in names:
        ratio = paired_ratio(p50s[name], p50s[base])
        print(f"{name:28s} p50 {statistics.median(p50s[name]):6.3f} ms  x {base} {ratio:.3f}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(VARIANTS))
