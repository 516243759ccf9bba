"""Reranking: score each (query, document) pair.

A cross-encoder (manifest task ``rerank``, ``pair: true``) reads the pair as one
input built by the tokenizer's own pair template, token types included, and its
one logit becomes the score through a sigmoid (a relevance probability in 0..1).
An embedding model can rerank too: the score is then the cosine of the query's
and the document's embeddings (-1..1), with the model's query/document prompts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quantfn.tasks.base import Encoded, Pipeline
from quantfn.tasks.classify import activate
from quantfn.tasks.embed import EmbedPipeline


class RerankPipeline(Pipeline):
    """A cross-encoder."""

    task = "rerank"

    def pairs(self, query: str, documents: Sequence[str]) -> list[tuple[str, str]]:
        return [(query, document) for document in documents]

    def encode_pairs(self, query: str, documents: Sequence[str]) -> Encoded:
        return self.encode(self.pairs(query, documents))

    def score(self, query: str, documents: Sequence[str]) -> np.ndarray:
        """Relevance of each document to ``query`` [n] float32, in document order."""
        return self.forward(self.encode_pairs(query, documents))

    def postprocess(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return activate(output[:, 0].astype(np.float32, copy=False), self.manifest.scoring).astype(np.float32)


def cosine_scores(embedder: EmbedPipeline, query_vector: np.ndarray, document_vectors: np.ndarray) -> np.ndarray:
    """Cosine of the query's embedding with each document's (normalised here if the model does not)."""
    vectors = np.vstack([query_vector[None, :], document_vectors]).astype(np.float32)
    if not embedder.manifest.normalize:
        vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return (vectors[1:] @ vectors[0]).astype(np.float32)
