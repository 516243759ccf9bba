"""The classification API: ``POST /v1/classify``.

Request: ``{model, input: string | [string], top_k?, raw_scores?}``. Reply, per input
in order: ``{"index", "labels": [{"label", "score"}]}`` best first, all labels unless
``top_k``; scores are probabilities (softmax for a single-label model, sigmoid per
label for a multi-label one), or the raw logits with ``raw_scores: true``.
"""

from __future__ import annotations

from typing import Any

from quantfn.inference import ClassifyRequest, Result
from quantfn.wire.openai import optional_flag, optional_model, optional_positive_int, parse_texts, require_object, usage

_FIELDS = {"model", "input", "top_k", "raw_scores"}


def parse_classify_request(body: Any, max_inputs: int | None) -> ClassifyRequest:
    body = require_object(body, _FIELDS)
    model = optional_model(body, required=False)
    texts = parse_texts(body.get("input"), "input" in body, "input", max_inputs)
    return ClassifyRequest(texts, model, optional_positive_int(body, "top_k"), optional_flag(body, "raw_scores"))


def classify_response(result: Result, request: ClassifyRequest) -> dict[str, Any]:
    labels = result.manifest.labels
    data = []
    for index, row in enumerate(result.output):
        order = sorted(range(len(labels)), key=lambda j: (-float(row[j]), j))[: request.top_k or len(labels)]
        data.append({"index": index, "labels": [{"label": labels[j], "score": float(row[j])} for j in order]})
    return {"object": "list", "data": data, "model": result.model, "usage": usage(result)}
