"""Fidelity metrics of quantized embeddings against the fp32 reference.

The metric functions are pure numpy and take L2-normalised ``[n, d]`` arrays:
the gate, the tests and the benchmarks all use them. ``measure_fidelity`` runs
a model on the corpus with a small private embedding helper (tokenize, sort by
length, pad to longest, run, mean-pool, normalise) that mirrors the runtime.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from tokenizers import Tokenizer

MAX_SEQUENCE_LENGTH = 256


def _normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosine_stats(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean and minimum of the row-wise cosine between two ``[n, d]`` arrays."""
    if candidate.shape != reference.shape:
        raise ValueError(f"shape mismatch: {candidate.shape} vs {reference.shape}")
    cos = (_normalize(candidate) * _normalize(reference)).sum(axis=1)
    return float(cos.mean()), float(cos.min())


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks starting at 0, ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    uniq, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    if len(uniq) < len(values):
        sums = np.zeros(len(uniq))
        np.add.at(sums, inverse, ranks)
        ranks = (sums / counts)[inverse]
    return ranks


def spearman_pairwise(candidate: np.ndarray, reference: np.ndarray) -> float:
    """Spearman correlation between the two sets of pairwise cosine similarities.

    Compares the ``n*(n-1)/2`` off-diagonal similarities, which is what a
    search index sees. Requires ``n >= 3``.
    """
    if candidate.shape != reference.shape or len(candidate) < 3:
        raise ValueError("need two arrays of the same shape with at least 3 rows")
    upper = np.triu_indices(len(candidate), k=1)
    a = _ranks((_normalize(candidate) @ _normalize(candidate).T)[upper])
    b = _ranks((_normalize(reference) @ _normalize(reference).T)[upper])
    a -= a.mean()
    b -= b.mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


def nearest_neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[n, k]`` of each row's k most cosine-similar other rows (itself excluded)."""
    sims = _normalize(vectors) @ _normalize(vectors).T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def recall_at_k(candidate: np.ndarray, reference: np.ndarray, k: int = 5) -> float:
    """Mean over rows of |kNN(candidate) & kNN(reference)| / k, excluding each row itself."""
    if candidate.shape != reference.shape or len(candidate) <= k:
        raise ValueError(f"need two arrays of the same shape with more than k={k} rows")
    got, want = nearest_neighbours(candidate, k), nearest_neighbours(reference, k)
    overlap = [len(set(g).intersection(w)) for g, w in zip(got, want, strict=True)]
    return float(np.mean(overlap) / k)


@dataclass(frozen=True)
class Fidelity:
    cosine_mean: float
    cosine_min: float
    spearman: float
    recall_at_5: float
    batch_invariance_min_cosine: float

    def as_dict(self) -> dict[str, float]:
        return {k: round(v, 6) for k, v in asdict(self).items()}


def load_tokenizer(path: Path) -> Tokenizer:
    """The tokenizer with the runtime's settings: truncate at 256, pad to the longest in a batch."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.enable_truncation(MAX_SEQUENCE_LENGTH)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    return tokenizer


def _run_batch(session: Any, tokenizer: Tokenizer, texts: list[str]) -> np.ndarray:
    names = {i.name for i in session.get_inputs()}
    encodings = tokenizer.encode_batch(texts)
    ids = np.array([e.ids for e in encodings], dtype=np.int64)
    mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
    feed = {"input_ids": ids, "attention_mask": mask}
    if "token_type_ids" in names:
        feed["token_type_ids"] = np.zeros_like(ids)
    hidden = session.run(None, {k: v for k, v in feed.items() if k in names})[0]
    summed = (hidden * mask[..., None]).sum(axis=1)
    pooled = summed / np.maximum(mask.sum(axis=1, keepdims=True), 1)
    return (pooled / np.maximum(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def length_sorted_batches(tokenizer: Tokenizer, texts: list[str], batch_size: int) -> list[list[int]]:
    """Indices of ``texts`` grouped into batches of similar token length (what the runtime does)."""
    lengths = [sum(e.attention_mask) for e in tokenizer.encode_batch(texts)]
    order = np.argsort(lengths, kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


def _embed(session: Any, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Normalised mean-pooled embeddings of ``texts`` in input order."""
    out = np.zeros((len(texts), 0), dtype=np.float32)
    for batch in length_sorted_batches(tokenizer, texts, batch_size):
        vectors = _run_batch(session, tokenizer, [texts[i] for i in batch])
        if out.shape[1] == 0:
            out = np.zeros((len(texts), vectors.shape[1]), dtype=np.float32)
        out[batch] = vectors
    return out


def batch_invariance(session: Any, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32) -> float:
    """Min cosine between a text embedded inside a mixed-length batch and embedded alone.

    Uses consecutive corpus texts (unsorted, so batches mix short and long).
    """
    worst = 1.0
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        together = _run_batch(session, tokenizer, chunk)
        alone = np.concatenate([_run_batch(session, tokenizer, [t]) for t in chunk])
        worst = min(worst, float((together * alone).sum(axis=1).min()))
    return worst


def measure_fidelity(
    session: Any, tokenizer: Tokenizer, texts: list[str], reference: np.ndarray, invariance_texts: int = 64
) -> Fidelity:
    """All gate metrics of one model on ``texts`` against ``reference`` (same order)."""
    vectors = _embed(session, tokenizer, texts)
    mean, low = cosine_stats(vectors, reference)
    return Fidelity(
        cosine_mean=mean,
        cosine_min=low,
        spearman=spearman_pairwise(vectors, reference),
        recall_at_5=recall_at_k(vectors, reference, 5),
        batch_invariance_min_cosine=batch_invariance(session, tokenizer, texts[:invariance_texts]),
    )


def throughput(session: Any, tokenizer: Tokenizer, texts: list[str], batch_size: int = 32, repeats: int = 5) -> float:
    """Median sentences per second over ``repeats`` passes of length-sorted batches."""
    batches = [[texts[i] for i in b] for b in length_sorted_batches(tokenizer, texts, batch_size)]
    _run_batch(session, tokenizer, batches[-1])  # warm up
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for batch in batches:
            _run_batch(session, tokenizer, batch)
        rates.append(len(texts) / (time.perf_counter() - start))
    return float(np.median(rates))


def latency_ms(session: Any, tokenizer: Tokenizer, texts: list[str], repeats: int = 3) -> float:
    """Median batch-1 latency in milliseconds over ``texts`` (each run ``repeats`` times)."""
    _run_batch(session, tokenizer, texts[:1])
    times = []
    for _ in range(repeats):
        for text in texts:
            start = time.perf_counter()
            _run_batch(session, tokenizer, [text])
            times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)
