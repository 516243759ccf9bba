"""The rerank API in Cohere's shape (``/v1/rerank`` for ``cohere.Client``, ``/v2/rerank`` for ``ClientV2``;
Jina's API is the v1 shape).

Request: ``{model, query, documents: [string | {text}], top_n?, return_documents?}``
(v1 also takes ``rank_fields`` naming ``text`` alone and ``max_chunks_per_doc``, accepted and ignored: a
document longer than the model reads is truncated, not chunked; v2 takes ``max_tokens_per_doc``, which cuts
each document to that many tokens before it is paired with the query). Reply:
``{id, results: [{index, relevance_score, document?}], model, usage, meta}``, best first.
"""

from __future__ import annotations

import uuid
from typing import Any

import numpy as np

from quantfn.errors import BadRequest
from quantfn.inference import Result
from quantfn.tasks import RerankRequest, ranked
from quantfn.wire.fields import optional_flag, optional_model, optional_positive_int, parse_texts, require_object

_V1_FIELDS = {"model", "query", "documents", "top_n", "return_documents", "rank_fields", "max_chunks_per_doc"}
_V2_FIELDS = {"model", "query", "documents", "top_n", "return_documents", "max_tokens_per_doc"}


def parse_rerank_request(body: Any, version: int) -> RerankRequest:
    """Validate a decoded body of ``/v{version}/rerank``; raises BadRequest naming the field."""
    body = require_object(body, _V1_FIELDS if version == 1 else _V2_FIELDS)
    model = optional_model(body, required=version == 2)
    query = body.get("query")
    if not isinstance(query, str) or not query.strip():
        raise BadRequest("'query' must be a non-empty string.", param="query")
    documents = body.get("documents")
    if isinstance(documents, list):
        documents = [_document_text(item, i) for i, item in enumerate(documents)]
    texts = parse_texts(documents, "documents" in body, "documents")
    top_n = optional_positive_int(body, "top_n")
    return_documents = optional_flag(body, "return_documents")
    rank_fields = body.get("rank_fields")
    if rank_fields is not None and rank_fields != ["text"]:
        raise BadRequest(
            "'rank_fields' can only be [\"text\"]: documents are ranked by their text.", param="rank_fields"
        )
    optional_positive_int(body, "max_chunks_per_doc")
    return RerankRequest(
        query, texts, model, top_n, return_documents, optional_positive_int(body, "max_tokens_per_doc")
    )


def _document_text(item: Any, index: int) -> Any:
    if isinstance(item, dict):
        text = item.get("text")
        if not isinstance(text, str):
            raise BadRequest(
                f"'documents[{index}]' must be a string or an object with 'text'.", param=f"documents[{index}]"
            )
        return text
    return item


def rerank_response(result: Result, request: RerankRequest, version: int) -> dict[str, Any]:
    """Results best first (ties by index), cut to ``top_n``, with the documents if asked."""
    results = ranked_results(result, request.top_n)
    if request.return_documents:
        for item in results:
            item["document"] = {"text": request.documents[item["index"]]}
    return {
        "id": str(uuid.uuid4()),
        "results": results,
        "model": result.model,
        "usage": {"total_tokens": result.tokens},
        "meta": {"api_version": {"version": str(version)}, "billed_units": {"search_units": 1}},
    }


def ranked_results(result: Result, top_n: int | None = None) -> list[dict[str, Any]]:
    """``[{"index", "relevance_score"}]`` best first, indices into the request's documents (the API's
    results and a batch job's record)."""
    scores = result.output
    return [{"index": result.ok[i], "relevance_score": float(np.float32(scores[i]))} for i in ranked(scores, top_n)]
