"""Classification: the graph's logits -> softmax (single-label) or sigmoid (multi-label) scores per label.

``activate`` is the one place scores are made from logits (a cross-encoder's relevance too). A model with
a ``cascade`` (manifest) runs its int8 graph on every input and its second graph on the few whose logits are
within the cascade's margin of another decision (``near_ties``): int8 arithmetic where it cannot change the
answer, the weight-only graph where it could.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from quantfn.errors import BadRequest, UpstreamFailed
from quantfn.tasks.base import Encoded, Pipeline
from quantfn.tasks.task import Forward, Task, Tokens, reply_list, reply_score

if TYPE_CHECKING:
    from quantfn.models.manifest import Manifest

_LABEL_ITEM_BYTES = 48  # {"label": "...", "score": 0.123456789} less the label
_ENVELOPE = 4096


@dataclass(frozen=True)
class ClassifyRequest:
    texts: list[str]
    model: str | None = None
    top_k: int | None = None
    raw_scores: bool = False
    task = "classify"


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


def near_ties(logits: np.ndarray, scoring: str, margin: float) -> np.ndarray:
    """Rows [n] bool whose decision ``margin`` could change: top-1 minus top-2 logit below it (softmax), any
    logit within it of 0, the 0.5 probability (sigmoid, or a single logit)."""
    if scoring == "sigmoid" or logits.shape[1] == 1:
        return np.abs(logits).min(axis=1) < margin
    top = np.partition(logits, -2, axis=1)[:, -2:]  # the two largest, the largest last
    return top[:, 1] - top[:, 0] < margin


def label_scores(logits: np.ndarray, scoring: str, raw_scores: bool = False) -> np.ndarray:
    """A classifier's scores per label: probabilities as ``scoring`` says, or the logits with ``raw_scores``."""
    return logits if raw_scores else activate(logits, scoring).astype(np.float32, copy=False)


class ClassifyTask(Task):
    """Scores per label for each text (probabilities, or the logits with ``raw_scores``)."""

    name = "classify"
    serves = ("classify",)

    def check(self, request: ClassifyRequest, manifest: Manifest) -> None:
        if request.top_k is not None and request.top_k > len(manifest.labels):
            raise BadRequest(
                f"'top_k' is {request.top_k}; model {manifest.model_id} has {len(manifest.labels)} labels.",
                param="top_k",
            )

    def reply_bytes(self, request: ClassifyRequest, manifest: Manifest) -> int:
        labels = manifest.labels[: request.top_k] if request.top_k else manifest.labels
        per_input = sum(len(label.encode("utf-8")) * 2 + _LABEL_ITEM_BYTES for label in labels) + 64
        return _ENVELOPE + len(request.texts) * per_input

    def reply_advice(self, request: ClassifyRequest, manifest: Manifest, settings: Any) -> str:
        return "Ask for fewer labels (top_k) or split the request."

    def run(
        self, request: ClassifyRequest, pipeline: Pipeline, tokens: Tokens, ok: list[int], forward: Forward
    ) -> np.ndarray:
        logits = super().run(request, pipeline, tokens, ok, forward)
        return label_scores(logits, pipeline.manifest.scoring, request.raw_scores)

    def endpoint_request(self, request: ClassifyRequest, manifest: Manifest) -> dict[str, Any]:
        return {"task": "classify", "input": list(request.texts), "raw_scores": request.raw_scores}

    def endpoint_output(self, data: bytes, request: ClassifyRequest, manifest: Manifest) -> np.ndarray:
        """Scores [texts, labels] in label order from a classify reply that lists every label of every input."""
        count, labels = len(request.texts), manifest.labels
        items = reply_list(data, "data", "classify")
        column = {label: i for i, label in enumerate(labels)}
        out = np.full((count, len(labels)), np.nan, dtype=np.float32)
        if len(items) != count:
            raise UpstreamFailed(f"GPU endpoint classified {len(items)} of {count} inputs")
        for item in items:
            index = item.get("index") if isinstance(item, dict) else None
            if not isinstance(index, int) or not 0 <= index < count or not np.isnan(out[index]).all():
                raise UpstreamFailed(f"GPU endpoint classify reply has a bad or repeated index: {index!r}")
            for entry in item.get("labels") or ():
                label = entry.get("label") if isinstance(entry, dict) else None
                if label not in column:
                    raise UpstreamFailed(f"GPU endpoint returned an unknown label for input {index}")
                out[index, column[label]] = reply_score(entry.get("score"), f"data[{index}]")
        if np.isnan(out).any():
            raise UpstreamFailed("GPU endpoint did not score every label")
        return out


class ClassifyPipeline(Pipeline):
    task = "classify"
    #: Opens the cascade's second pipeline (``open_pipeline`` sets it for a manifest with a ``cascade``).
    open_cascade: Callable[[], Pipeline] | None = None
    _cascade: Pipeline | None = None

    def forward(self, encoded: Encoded) -> np.ndarray:
        logits = super().forward(encoded)
        cascade = self.manifest.cascade
        if cascade is None or self.open_cascade is None or not len(logits):
            return logits
        rows = np.flatnonzero(near_ties(logits, self.manifest.scoring, cascade.margin))
        if rows.size:
            logits[rows] = self._second().forward(encoded.subset(rows.tolist()))
        return logits

    def _second(self) -> Pipeline:
        # Opened on the first near tie (a cold start that meets none never loads it).
        with self._lock:
            if self._cascade is None and self.open_cascade is not None:
                self._cascade = self.open_cascade()
        assert self._cascade is not None
        return self._cascade

    def open_sessions(self) -> None:
        super().open_sessions()
        if self.manifest.cascade is not None and self.open_cascade is not None:
            self._second().open_sessions()

    @property
    def labels(self) -> tuple[str, ...]:
        return self.manifest.labels

    def classify(self, texts: Sequence[str], raw_scores: bool = False) -> np.ndarray:
        """Scores [n, labels] float32 in label order, for ``texts`` in order (logits with ``raw_scores``)."""
        return label_scores(self.forward(self.encode(texts)), self.manifest.scoring, raw_scores)

    def postprocess(self, output: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return output.astype(np.float32, copy=False)  # logits: forward() callers choose scores or raw
