"""Classification: the graph's logits -> softmax (single-label) or sigmoid (multi-label) scores per label."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from quantfn.tasks.base import Pipeline


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits))


def activate(logits: np.ndarray, scoring: str) -> np.ndarray:
    """Scores from logits as the manifest's ``scoring`` says (``none``: the logits themselves)."""
    if scoring == "softmax":
        return softmax(logits)
    if scoring == "sigmoid":
        return sigmoid(logits)
    return logits


class ClassifyPipeline(Pipeline):
    task = "classify"

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    def classify(self, texts: Sequence[str], raw_scores: bool = False) -> np.ndarray:
        """Scores [n, labels] float32 in label order, for ``texts`` in order (logits with ``raw_scores``)."""
        return self.scores(self.forward(self.encode(texts)), raw_scores)

    def scores(self, logits: np.ndarray, raw_scores: bool = False) -> np.ndarray:
        """Probabilities from logits as the manifest's ``scoring`` says, or the logits themselves."""
        return logits if raw_scores else activate(logits, self.manifest.scoring).astype(np.float32, copy=False)

    def postprocess(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return output.astype(np.float32, copy=False)  # logits: forward() callers choose scores or raw
