"""Cohere v2 rerank's ``max_tokens_per_doc``: each document is cut to that many tokens before it is scored."""

from __future__ import annotations

import json

import pytest

from tests.conftest import load_event

QUERY = "Which city is the capital of France?"
LEAD = "Bananas are rich in potassium and grow in warm places"  # 10+ tokens about something else
DOCUMENT = f"{LEAD}, while Paris is the capital and largest city of France."


def rerank(lambda_context, **body: object) -> dict:
    from functions.api.app import lambda_handler

    event = load_event("api-rerank-v2.json")
    event["body"] = json.dumps({"model": "all-MiniLM-L6-v2", "query": QUERY, **body})
    reply = lambda_handler(event, lambda_context)
    assert reply["statusCode"] == 200, reply["body"]
    return json.loads(reply["body"])


@pytest.mark.usefixtures("service_env")
def test_a_document_is_scored_on_its_first_tokens_only(lambda_context) -> None:
    # Given a document whose relevant part comes after its first 8 tokens
    full = rerank(lambda_context, documents=[DOCUMENT])["results"][0]["relevance_score"]
    # When it is reranked with max_tokens_per_doc=8
    cut = rerank(lambda_context, documents=[DOCUMENT], max_tokens_per_doc=8, return_documents=True)["results"][0]
    # Then it scores as its first 8 tokens' text alone does (the reply still returns the whole document)
    from quantfn.registry import get_registry

    tokenizer = get_registry().tokenizer(get_registry().default)
    first = tokenizer.encode(DOCUMENT, add_special_tokens=False)
    prefix = DOCUMENT[: first.offsets[7][1]]
    alone = rerank(lambda_context, documents=[prefix])["results"][0]["relevance_score"]
    assert prefix.startswith("Bananas") and "Paris" not in prefix
    assert cut["relevance_score"] == pytest.approx(alone, abs=1e-6)
    assert cut["relevance_score"] < full - 0.1  # the part about Paris no longer counts
    assert cut["document"]["text"] == DOCUMENT
    # And a limit longer than the document changes nothing
    assert rerank(lambda_context, documents=[DOCUMENT], max_tokens_per_doc=4096)["results"][0][
        "relevance_score"
    ] == pytest.approx(full, abs=1e-6)
