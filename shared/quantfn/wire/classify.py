"""The classification API: ``POST /v1/classify``.

Request: ``{model, input: string | [string], top_k?, raw_scores?}``. Reply, per input
in order: ``{"index", "labels": [{"label", "score"}]}`` best first, all labels unless
``top_k``; scores are probabilities (softmax for a single-label model, sigmoid per
label for a multi-label one), or the raw logits with ``raw_scores: true``.
"""

from __future__ import annotations

from typing import Any

from quantfn.inference import Result
from quantfn.tasks import ClassifyRequest, ranked
from quantfn.wire.fields import optional_flag, optional_model, optional_positive_int, parse_texts, require_object
from quantfn.wire.openai import usage

_FIELDS = {"model", "input", "top_k", "raw_scores"}


def parse_classify_request(body: Any) -> ClassifyRequest:
    body = require_object(body, _FIELDS)
    model = optional_model(body, required=False)
    texts = parse_texts(body.get("input"), "input" in body, "input")
    return ClassifyRequest(texts, model, optional_positive_int(body, "top_k"), optional_flag(body, "raw_scores"))


def classify_response(result: Result, request: ClassifyRequest) -> dict[str, Any]:
    data = [
        {"index": index, "labels": ranked_labels(result, row, request.top_k)} for index, row in enumerate(result.output)
    ]
    return {"object": "list", "data": data, "model": result.model, "usage": usage(result)}


def ranked_labels(result: Result, scores: Any, top_k: int | None = None) -> list[dict[str, Any]]:
    """One input's ``[{"label", "score"}]``, best first (the API's item and a batch job's record)."""
    labels = result.manifest.labels
    return [{"label": labels[j], "score": float(scores[j])} for j in ranked(scores, top_k)]
