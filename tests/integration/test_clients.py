"""The official openai and cohere clients work unchanged against quantfn's API (a real server on loopback)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quantfn.config import Settings
from quantfn.models.manifest import Manifest
from quantfn.tasks import open_pipeline
from tests.integration.local_api import local_api

MODEL = "all-MiniLM-L6-v2"
DOCUMENTS = [
    "Bananas are rich in potassium.",
    "Paris is the capital and largest city of France.",
    "The Eiffel Tower stands in Paris.",
    "Rust is a systems programming language.",
]
QUERY = "What is the capital of France?"


@pytest.fixture(scope="module")
def api(models_root: Path) -> Iterator[str]:
    with local_api({"QUANTFN_MODELS_ROOT": str(models_root), "QUANTFN_THREADS": "2"}) as url:
        yield url


@pytest.fixture(scope="module")
def embedder(model_dir: Path):
    manifest = Manifest.read(model_dir)
    return open_pipeline(model_dir, manifest, threads=2, batch_size=Settings().runtime.batch_size)


def test_openai_client_embeddings_match_the_model(api: str, embedder) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    # Given two texts; when the official client embeds them (it asks for base64 and decodes it)
    reply = client.embeddings.create(model=MODEL, input=["first text", "a second, longer text"])
    # Then each vector is the model's own, in order, with usage counted
    vectors = np.array([item.embedding for item in reply.data], dtype=np.float32)
    expected = embedder.embed(["first text", "a second, longer text"])
    assert vectors.shape == (2, 384)
    assert np.sum(vectors * expected, axis=1).min() >= 0.9999
    assert reply.usage.prompt_tokens == sum(
        len(e.ids) for e in embedder.tokenizer.encode_batch(["first text", "a second, longer text"])
    )


def test_openai_client_gets_a_clear_400_for_token_arrays(api: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.embeddings.create(model=MODEL, input=[[101, 2023, 102]])
    assert "check_embedding_ctx_length=False" in str(caught.value)


def test_openai_client_unknown_model_is_404(api: str) -> None:
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{api}/v1", api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="text-embedding-3-small", input="x")


def _cosine_ranking(embedder) -> tuple[list[int], np.ndarray]:
    vectors = embedder.embed([QUERY, *DOCUMENTS])
    scores = vectors[1:] @ vectors[0]
    return sorted(range(len(DOCUMENTS)), key=lambda i: -scores[i]), scores


def test_cohere_client_v1_rerank(api: str, embedder) -> None:
    cohere = pytest.importorskip("cohere")
    client = cohere.Client(api_key="unused", base_url=api)
    # When cohere.Client.rerank asks for the top 2 with their documents
    reply = client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS, top_n=2, return_documents=True)
    order, scores = _cosine_ranking(embedder)
    # Then the results are the two best by the embedding model's cosine, best first, with their texts
    assert [r.index for r in reply.results] == order[:2]
    assert [r.document.text for r in reply.results] == [DOCUMENTS[i] for i in order[:2]]
    np.testing.assert_allclose([r.relevance_score for r in reply.results], scores[order[:2]], atol=1e-4)


def test_cohere_client_v2_rerank(api: str, embedder) -> None:
    cohere = pytest.importorskip("cohere")
    client = cohere.ClientV2(api_key="unused", base_url=api)
    reply = client.rerank(model=MODEL, query=QUERY, documents=DOCUMENTS)
    order, scores = _cosine_ranking(embedder)
    assert [r.index for r in reply.results] == order
    np.testing.assert_allclose([r.relevance_score for r in reply.results], scores[order], atol=1e-4)


def test_cohere_client_sees_the_error_of_a_bad_request(api: str) -> None:
    cohere = pytest.importorskip("cohere")
    client = cohere.ClientV2(api_key="unused", base_url=api)
    with pytest.raises(cohere.core.api_error.ApiError) as caught:
        client.rerank(model=MODEL, query=QUERY, documents=[])
    assert caught.value.status_code == 400
    assert caught.value.body["error"]["param"] == "documents"
