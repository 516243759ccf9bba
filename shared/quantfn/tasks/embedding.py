"""Sentence embeddings: tokenize, run the encoder, mean-pool, L2-normalise.

Texts are tokenized once without truncation (the untruncated counts are what
limits and usage report), truncated to the model's maximum the way the
tokenizer's own post-processor would ([CLS] ... [SEP]), sorted by length so each
sub-batch pads only to its own longest text, and returned in request order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from quantfn.models.manifest import Manifest


@dataclass(frozen=True)
class Tokenized:
    """Token ids per text (untruncated, with special tokens)."""

    ids: list[list[int]]

    @property
    def counts(self) -> list[int]:
        return [len(ids) for ids in self.ids]


def load_tokenizer(path: Path) -> Any:
    """A ``tokenizers.Tokenizer`` with the file's padding and truncation turned off."""
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def mean_pool(hidden: np.ndarray, mask: np.ndarray, normalize: bool = True) -> np.ndarray:
    """Mean of ``hidden`` [B, S, D] over positions where ``mask`` [B, S] is 1; optionally L2-normalised."""
    weights = mask.astype(hidden.dtype)
    summed = np.matmul(weights[:, None, :], hidden)[:, 0, :]  # one batched GEMV instead of a [B,S,D] temporary
    pooled = summed / np.clip(weights.sum(axis=1, keepdims=True), 1e-9, None)
    if normalize:
        pooled /= np.clip(np.linalg.norm(pooled, axis=1, keepdims=True), 1e-12, None)
    return pooled.astype(np.float32, copy=False)


class EmbeddingModel:
    """An embedding encoder: a session, its tokenizer and manifest."""

    def __init__(self, session: Any, tokenizer: Any, manifest: Manifest, batch_size: int = 32) -> None:
        self.session = session
        self.tokenizer = tokenizer
        self.manifest = manifest
        self.batch_size = batch_size
        self.max_length = manifest.max_sequence_length
        self._sep_id = tokenizer.token_to_id("[SEP]")

    @property
    def dimensions(self) -> int:
        return self.manifest.dimensions

    def tokenize(self, texts: Sequence[str]) -> Tokenized:
        """Token ids for each text, untruncated."""
        return Tokenized([encoding.ids for encoding in self.tokenizer.encode_batch(list(texts))])

    def embed(self, tokens: Tokenized) -> np.ndarray:
        """Embeddings [n, dimensions] float32, in the order of ``tokens``."""
        ids = [self._truncate(seq) for seq in tokens.ids]
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.empty((len(ids), self.dimensions), dtype=np.float32)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            out[chunk] = self._run([ids[i] for i in chunk])
        return out

    def _truncate(self, ids: list[int]) -> list[int]:
        if len(ids) <= self.max_length:
            return ids
        # Same result as the tokenizer's own truncation: keep [CLS] + head, end with [SEP].
        return [*ids[: self.max_length - 1], self._sep_id]

    def _run(self, batch: list[list[int]]) -> np.ndarray:
        longest = max(len(seq) for seq in batch)
        input_ids = np.zeros((len(batch), longest), dtype=np.int64)
        mask = np.zeros((len(batch), longest), dtype=np.int64)
        for row, seq in enumerate(batch):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feeds = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self.manifest.inputs:
            feeds["token_type_ids"] = np.zeros_like(input_ids)
        feeds = {name: feeds[name] for name in self.manifest.inputs}
        (hidden,) = self.session.run([self.manifest.output], feeds)
        return mean_pool(hidden, mask, normalize=self.manifest.normalize)
