"""The SageMaker path of EndpointClient: real boto3 against moto, and against a stub speaking the runtime's errors.

moto's sagemaker-runtime answers InvokeEndpoint from a queue of canned results (set through
``/moto-api/static/sagemaker/endpoint-results``) and does not model missing endpoints or
throttling, so those replies come from a stub HTTP server that answers as the real service does
(``x-amzn-ErrorType`` header, JSON body), with boto3 pointed at it through AWS_ENDPOINT_URL.
"""

from __future__ import annotations

import json
import time
import urllib.request

import numpy as np
import pytest

from quantfn.config import EndpointSettings, Settings
from quantfn.endpoint import EndpointClient
from quantfn.errors import EndpointUnavailable, UpstreamFailed
from tests.conftest import embed_on_endpoint
from tests.integration.endpoint_stub import DIMENSIONS, Step, StubEndpoint, embeddings_reply, unit_vectors

TEXTS = ["first text", "second text"]
ENDPOINT = "quantfn-gpu"


def client() -> EndpointClient:
    settings = Settings(
        endpoint=EndpointSettings(name=ENDPOINT, timeout_ms=2000, backoff_base_ms=10, backoff_max_ms=40)
    )
    return EndpointClient(settings)


def embed(endpoint: EndpointClient):
    return embed_on_endpoint(
        endpoint, TEXTS, "all-MiniLM-L6-v2", dimensions=DIMENSIONS, normalized=True, deadline_s=time.monotonic() + 5
    )


def queue_moto_results(moto_url: str, *bodies: str) -> None:
    results = [{"Body": body, "ContentType": "application/json"} for body in bodies]
    request = urllib.request.Request(
        f"{moto_url}/moto-api/static/sagemaker/endpoint-results",
        data=json.dumps({"results": results}).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    urllib.request.urlopen(request, timeout=10)


def test_a_moto_endpoint_result_is_parsed_into_vectors(aws) -> None:
    # Given moto holding a base64 embeddings reply for the next invocation
    queue_moto_results(aws.url, json.dumps(embeddings_reply(2, "base64")))
    # When the client invokes the endpoint through boto3
    reply = embed(client())
    # Then the vectors are the ones in the reply, decoded as little-endian float32
    np.testing.assert_array_equal(reply.output, unit_vectors(2))
    assert reply.attempts == 1


def test_motos_default_reply_is_not_embeddings_and_is_refused(aws) -> None:
    # moto answers an unconfigured endpoint with the literal text "body": never pass that on
    with pytest.raises(UpstreamFailed, match="not an embeddings list"):
        embed(client())


def test_the_request_is_an_invoke_endpoint_call_with_the_openai_body(monkeypatch) -> None:
    with StubEndpoint() as stub:
        monkeypatch.setenv("AWS_ENDPOINT_URL", stub.url)
        reply = embed(client())
    sent = stub.requests[0]
    assert sent["path"] == f"/endpoints/{ENDPOINT}/invocations"
    assert sent["headers"]["Content-Type"] == "application/json"
    assert sent["headers"]["Authorization"].startswith("AWS4-HMAC-SHA256")
    assert json.loads(sent["body"]) == {"model": "all-MiniLM-L6-v2", "input": TEXTS, "encoding_format": "base64"}
    np.testing.assert_allclose(reply.output, unit_vectors(2), atol=1e-7)


def test_a_missing_endpoint_is_503_endpoint_missing_and_not_retried(monkeypatch) -> None:
    missing = Step(
        400,
        body=json.dumps({"message": f"Endpoint {ENDPOINT} of account 123456789012 not found."}).encode(),
        headers={"x-amzn-ErrorType": "ValidationError"},
    )
    with StubEndpoint(default=missing) as stub:
        monkeypatch.setenv("AWS_ENDPOINT_URL", stub.url)
        with pytest.raises(EndpointUnavailable) as caught:
            embed(client())
    assert caught.value.code == "endpoint_missing" and caught.value.status == 503
    assert len(stub.requests) == 1


def test_model_not_ready_and_a_container_503_are_retried(monkeypatch) -> None:
    not_ready = Step(
        429, body=b'{"message": "Model not ready"}', headers={"x-amzn-ErrorType": "ModelNotReadyException"}
    )
    busy = Step(
        424,
        body=json.dumps({"Message": "Received server error (503)", "OriginalStatusCode": 503}).encode(),
        headers={"x-amzn-ErrorType": "ModelError"},
    )
    with StubEndpoint([not_ready, busy]) as stub:
        monkeypatch.setenv("AWS_ENDPOINT_URL", stub.url)
        reply = embed(client())
    assert reply.attempts == 3 and len(stub.requests) == 3


def test_a_container_4xx_behind_sagemaker_is_not_retried(monkeypatch) -> None:
    rejected = Step(
        424,
        body=json.dumps({"Message": "Received client error (400)", "OriginalStatusCode": 400}).encode(),
        headers={"x-amzn-ErrorType": "ModelError"},
    )
    with StubEndpoint(default=rejected) as stub:
        monkeypatch.setenv("AWS_ENDPOINT_URL", stub.url)
        with pytest.raises(UpstreamFailed, match="HTTP 400"):
            embed(client())
    assert len(stub.requests) == 1
