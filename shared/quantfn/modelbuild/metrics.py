"""Pure metrics: how close a model's outputs are to a reference's (cosine, Spearman, recall@k).

Plain numpy on arrays; the gate (``evaluate``), the quality suite, the tests and the
benchmarks all use these, and nothing here runs a model.
"""

from __future__ import annotations

import numpy as np


def normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def cosines(candidate: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """The row-wise cosine between two ``[n, d]`` arrays."""
    if candidate.shape != reference.shape:
        raise ValueError(f"shape mismatch: {candidate.shape} vs {reference.shape}")
    return (normalize(candidate) * normalize(reference)).sum(axis=1)


def cosine_stats(candidate: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """Mean and minimum of the row-wise cosine between two ``[n, d]`` arrays."""
    cos = cosines(candidate, reference)
    return float(cos.mean()), float(cos.min())


def ranks(values: np.ndarray) -> np.ndarray:
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
    return spearman(
        (normalize(candidate) @ normalize(candidate).T)[upper], (normalize(reference) @ normalize(reference).T)[upper]
    )


def nearest_neighbours(vectors: np.ndarray, k: int) -> np.ndarray:
    """Indices ``[n, k]`` of each row's k most cosine-similar other rows (itself excluded)."""
    sims = normalize(vectors) @ normalize(vectors).T
    np.fill_diagonal(sims, -np.inf)
    return np.argsort(-sims, axis=1, kind="stable")[:, :k]


def recall_at_k(candidate: np.ndarray, reference: np.ndarray, k: int = 5) -> float:
    """Mean over rows of |kNN(candidate) & kNN(reference)| / k, excluding each row itself."""
    if candidate.shape != reference.shape or len(candidate) <= k:
        raise ValueError(f"need two arrays of the same shape with more than k={k} rows")
    got, want = nearest_neighbours(candidate, k), nearest_neighbours(reference, k)
    overlap = [len(set(g).intersection(w)) for g, w in zip(got, want, strict=True)]
    return float(np.mean(overlap) / k)


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation of two 1-d arrays (ties get their average rank)."""
    x, y = ranks(np.asarray(a, np.float64)), ranks(np.asarray(b, np.float64))
    x -= x.mean()
    y -= y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))
