"""Reranking: score each (query, document) pair.

A cross-encoder (manifest task ``rerank``, ``pair: true``) reads the pair as one
input built by the tokenizer's own pair template, token types included, and its
one logit becomes the score through a sigmoid (a relevance probability in 0..1).
An embedding model can rerank too: the score is then the cosine of the query's
and the document's embeddings (-1..1), with the model's query/document prompts;
the limits then count the query's tokens with each document's. Results are
ranked by ``quantfn.tasks.task.ranked``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from quantfn.errors import UpstreamFailed
from quantfn.tasks.base import Encoded, Pipeline, encode_with
from quantfn.tasks.classify import activate
from quantfn.tasks.embed import EmbedPipeline, prompt_for
from quantfn.tasks.task import Forward, Task, Tokens, reply_list, reply_score

if TYPE_CHECKING:
    from quantfn.models.manifest import Manifest

_ITEM_BYTES = 64  # {"index": N, "relevance_score": 0.123456789}
_ENVELOPE = 4096


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    max_tokens_per_doc: int | None = None  # Cohere v2: each document is cut to this many tokens first
    task = "rerank"


class RerankTask(Task):
    """Relevance of each document to the query, by a cross-encoder or an embedder's cosine."""

    name = "rerank"
    serves = ("rerank", "embed")
    field = "documents"

    def texts(self, request: RerankRequest) -> Sequence[str]:
        return request.documents

    def reply_bytes(self, request: RerankRequest, manifest: Manifest) -> int:
        documents = request.documents
        shown = len(documents) if request.top_n is None else min(request.top_n, len(documents))
        texts = sum(len(d.encode("utf-8")) * 2 for d in documents) if request.return_documents else 0
        return _ENVELOPE + shown * _ITEM_BYTES + texts

    def reply_advice(self, request: RerankRequest, manifest: Manifest, settings: Any) -> str:
        return "Ask for fewer documents back (top_n, return_documents=false) or split the documents."

    def encode(self, request: RerankRequest, manifest: Manifest, tokenizer: Any) -> Tokens:
        documents = request.documents
        if request.max_tokens_per_doc is not None:
            documents = cut_to_tokens(tokenizer, documents, request.max_tokens_per_doc)
        if manifest.task == "rerank":
            return Tokens.of(encode_with(tokenizer, [(request.query, d) for d in documents]))
        # An embedder: the query, then the documents, each with its prompt where the model declares one.
        document = prompt_for(manifest, "search_document")
        inputs = [prompt_for(manifest, "search_query") + request.query, *(document + d for d in documents)]
        encoded = encode_with(tokenizer, inputs)
        counts, readable = encoded.counts, encoded.content or [1] * len(inputs)
        return Tokens(
            encoded,
            [counts[0] + count for count in counts[1:]],
            [min(readable[0], count) for count in readable[1:]],
        )

    def run(
        self, request: RerankRequest, pipeline: Pipeline, tokens: Tokens, ok: list[int], forward: Forward
    ) -> np.ndarray:
        if isinstance(pipeline, EmbedPipeline):
            vectors = forward(pipeline, tokens.encoded)
            return cosine_scores(pipeline, vectors[0], vectors[1:])[ok]
        return super().run(request, pipeline, tokens, ok, forward)

    def endpoint_request(self, request: RerankRequest, manifest: Manifest) -> dict[str, Any]:
        return {"task": "rerank", "query": request.query, "documents": list(request.documents)}

    def endpoint_output(self, data: bytes, request: RerankRequest, manifest: Manifest) -> np.ndarray:
        """Scores in document order from a rerank reply that ranks every document."""
        count = len(request.documents)
        items = reply_list(data, "results", "rerank")
        out = np.full(count, np.nan, dtype=np.float32)
        for item in items:
            index = item.get("index") if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < count or not np.isnan(out[index]):
                raise UpstreamFailed(f"GPU endpoint rerank reply has a bad or repeated index: {index!r}")
            out[index] = reply_score(item.get("relevance_score"), f"results[{index}]")
        if np.isnan(out).any():
            raise UpstreamFailed(f"GPU endpoint ranked {len(items)} of {count} documents")
        return out


class RerankPipeline(Pipeline):
    """A cross-encoder."""

    task = "rerank"

    def encode_pairs(self, query: str, documents: Sequence[str]) -> Encoded:
        return self.encode([(query, document) for document in documents])

    def score(self, query: str, documents: Sequence[str]) -> np.ndarray:
        """Relevance of each document to ``query`` [n] float32, in document order."""
        return self.forward(self.encode_pairs(query, documents))

    def postprocess(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return activate(output[:, 0].astype(np.float32, copy=False), self.manifest.scoring).astype(np.float32)


def cut_to_tokens(tokenizer: Any, documents: Sequence[str], limit: int) -> list[str]:
    """Each document cut after its first ``limit`` tokens (by the tokenizer's own offsets, so the text kept is
    exactly what those tokens cover); shorter documents unchanged."""
    encodings = tokenizer.encode_batch(list(documents), add_special_tokens=False)
    return [
        text if len(encoding.offsets) <= limit else text[: encoding.offsets[limit - 1][1]]
        for text, encoding in zip(documents, encodings, strict=True)
    ]


def cosine_scores(embedder: EmbedPipeline, query_vector: np.ndarray, document_vectors: np.ndarray) -> np.ndarray:
    """Cosine of the query's embedding with each document's (normalised here if the model does not)."""
    vectors = np.vstack([query_vector[None, :], document_vectors]).astype(np.float32)
    if not embedder.manifest.normalize:
        vectors /= np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)
    return (vectors[1:] @ vectors[0]).astype(np.float32)
