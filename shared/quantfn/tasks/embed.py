"""Embeddings: pool the graph's token states (mean, CLS, max, mean/sqrt(length), last token; or take the graph's
own pooled output), L2-normalise.

An ``input_type`` (``query`` or ``document``) puts the manifest's prompt for it in
front of each text, as e5 and bge models expect; a model without prompts
refuses one with a 400 rather than ignoring it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quantfn.errors import BadRequest
from quantfn.tasks.base import Encoded, Pipeline


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mean of ``hidden`` [B, S, D] over the positions where ``mask`` [B, S] is 1."""
    weights = mask.astype(hidden.dtype)
    summed = np.matmul(weights[:, None, :], hidden)[:, 0, :]  # one batched GEMV instead of a [B,S,D] temporary
    return summed / np.clip(weights.sum(axis=1, keepdims=True), 1e-9, None)


def pool(hidden: np.ndarray, mask: np.ndarray, mode: str) -> np.ndarray:
    """``hidden`` [B, S, D] pooled over the real tokens as sentence-transformers pools (right padding)."""
    if mode == "none":
        return hidden
    if mode == "cls":
        return hidden[:, 0, :]
    if mode == "max":
        return np.where(mask[:, :, None].astype(bool), hidden, np.float32(-1e9)).max(axis=1)
    if mode == "lasttoken":
        return hidden[np.arange(len(hidden)), np.maximum(mask.sum(axis=1) - 1, 0)]
    pooled = mean_pool(hidden, mask)
    if mode == "mean_sqrt_len_tokens":  # the sum over sqrt(length)
        pooled *= np.sqrt(np.clip(mask.sum(axis=1, keepdims=True), 1e-9, None)).astype(pooled.dtype)
    return pooled


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    return vectors / np.clip(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12, None)


class EmbedPipeline(Pipeline):
    task = "embed"

    @property
    def dimensions(self) -> int:
        return self.manifest.dimensions

    def prompted(self, texts: Sequence[str], input_type: str | None) -> list[str]:
        """``texts`` with the manifest's prompt for ``input_type`` in front (none given: its default prompt, if any)."""
        if input_type is None and self.manifest.raw.get("default_prompt"):
            return [str(self.manifest.raw["default_prompt"]) + text for text in texts]
        return apply_prompt(self.manifest.prompts, texts, input_type, self.manifest.model_id)

    def encode_texts(self, texts: Sequence[str], input_type: str | None = None) -> Encoded:
        return self.encode(self.prompted(texts, input_type))

    def embed(self, texts: Sequence[str], input_type: str | None = None) -> np.ndarray:
        """Embeddings [n, dimensions] float32, in the order of ``texts``."""
        return self.forward(self.encode_texts(texts, input_type))

    def postprocess(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        pooled = pool(output, mask, self.manifest.pooling)
        if self.manifest.normalize:
            pooled = l2_normalize(pooled)
        return pooled.astype(np.float32, copy=False)


def apply_prompt(prompts: dict[str, str], texts: Sequence[str], input_type: str | None, model_id: str) -> list[str]:
    """Prefix each text with ``prompts[input_type]``; 400 for an input type the model does not declare."""
    if input_type is None:
        return list(texts)
    if input_type not in prompts:
        declared = ", ".join(sorted(prompts)) or "none"
        raise BadRequest(
            f"'input_type' {input_type!r} is not supported by model {model_id}; its input types: {declared}.",
            param="input_type",
        )
    prefix = prompts[input_type]
    return [prefix + text for text in texts]
