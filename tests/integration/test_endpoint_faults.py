"""EndpointClient against real sockets on loopback: refused, slow, failing, throttling, wrong replies."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from quantfn.config import EndpointSettings, Settings
from quantfn.endpoint import EndpointClient
from quantfn.errors import EndpointUnavailable, TooLarge, UpstreamFailed
from tests.conftest import _free_port, embed_on_endpoint, load_event
from tests.integration.endpoint_stub import DIMENSIONS, Step, StubEndpoint, embeddings_reply, unit_vectors

TEXTS = ["first text", "second text"]


def client_for(url: str, **overrides: int) -> EndpointClient:
    values = {
        "timeout_ms": 300,
        "connect_timeout_ms": 200,
        "max_attempts": 3,
        "backoff_base_ms": 10,
        "backoff_max_ms": 40,
        "breaker_failures": 2,
        "breaker_cooldown_ms": 300,
        **overrides,
    }
    return EndpointClient(Settings(endpoint=EndpointSettings(url=url, **values)))


def embed(client: EndpointClient, within_s: float = 3.0):
    return embed_on_endpoint(
        client,
        TEXTS,
        "all-MiniLM-L6-v2",
        dimensions=DIMENSIONS,
        normalized=True,
        deadline_s=time.monotonic() + within_s,
    )


def test_a_stopped_server_fails_after_retries_then_the_circuit_fails_fast_without_connecting() -> None:
    # Given an endpoint URL where nothing listens
    port = _free_port()
    client = client_for(f"http://127.0.0.1:{port}")
    # When two calls are refused (each after its retries)
    for _ in range(2):
        with pytest.raises(UpstreamFailed) as failed:
            embed(client)
        assert "connection failed" in failed.value.message and "attempt 3" in failed.value.message
    # Then the circuit is open: with a live server on that port now, a call fails fast and never reaches it
    with StubEndpoint(port=port) as stub:
        started = time.monotonic()
        with pytest.raises(EndpointUnavailable) as unavailable:
            embed(client)
        assert time.monotonic() - started < 0.05
        assert unavailable.value.code == "endpoint_circuit_open" and unavailable.value.status == 503
        assert stub.requests == []
        # And after the cool-down one probe goes through, succeeds and closes the circuit
        time.sleep(0.35)
        reply = embed(client)
        assert len(stub.requests) == 1 and client.breaker.state == "closed"
        np.testing.assert_allclose(reply.output, unit_vectors(2), atol=1e-7)


def test_a_server_slower_than_the_timeout_is_abandoned_within_the_deadline() -> None:
    # Given a server that takes 5 s to answer and a 300 ms attempt timeout
    with StubEndpoint(default=Step(delay_s=5)) as stub:
        client = client_for(stub.url, max_attempts=2)
        # When the caller has 1 s left
        started = time.monotonic()
        with pytest.raises(UpstreamFailed, match="no answer within"):
            embed(client, within_s=1.0)
        # Then it gave up after two bounded attempts, well before the server would have answered
        assert time.monotonic() - started < 1.0
        assert len(stub.requests) == 2


def test_the_callers_remaining_time_bounds_an_attempt_below_the_configured_timeout() -> None:
    with StubEndpoint(default=Step(delay_s=5)) as stub:
        client = client_for(stub.url, timeout_ms=5000, max_attempts=1)
        started = time.monotonic()
        with pytest.raises(UpstreamFailed):
            embed(client, within_s=0.4)
        assert 0.3 < time.monotonic() - started < 0.8


def test_5xx_is_retried_then_reported_as_upstream_failed() -> None:
    with StubEndpoint(default=Step(500)) as stub:
        with pytest.raises(UpstreamFailed) as failed:
            embed(client_for(stub.url))
        assert len(stub.requests) == 3
        assert failed.value.status == 502 and "HTTP 500" in failed.value.message
        assert failed.value.to_body()["error"]["message"] == UpstreamFailed.public_message


def test_throttling_is_retried_with_backoff_until_the_server_recovers() -> None:
    # Given a server that throttles twice, then answers
    with StubEndpoint([Step(429), Step(429)]) as stub:
        reply = embed(client_for(stub.url))
        # Then the third attempt's answer comes back whole, and the request had the contract's shape
        assert reply.attempts == 3 and len(stub.requests) == 3
        np.testing.assert_allclose(reply.output, unit_vectors(2), atol=1e-7)
        first = stub.requests[0]
        assert first["path"] == "/invocations"
        assert first["headers"]["Content-Type"] == "application/json"
        assert json.loads(first["body"]) == {"model": "all-MiniLM-L6-v2", "input": TEXTS, "encoding_format": "base64"}


def test_4xx_is_not_retried() -> None:
    with StubEndpoint(default=Step(400)) as stub:
        with pytest.raises(UpstreamFailed, match="HTTP 400"):
            embed(client_for(stub.url))
        assert len(stub.requests) == 1


def test_the_endpoints_own_413_reaches_the_caller_and_does_not_trip_the_circuit() -> None:
    refusal = json.dumps({"error": {"message": "'input' has 5000 items; the limit is 4096."}}).encode()
    with StubEndpoint(default=Step(413, body=refusal)) as stub:
        client = client_for(stub.url, breaker_failures=1)
        with pytest.raises(TooLarge, match="the limit is 4096"):
            embed(client)
        assert len(stub.requests) == 1 and client.breaker.state == "closed"


@pytest.mark.parametrize(
    ("reply", "complaint"),
    [
        ({**embeddings_reply(1)}, "1 embeddings for 2 inputs"),
        ({"data": [{"index": 0, "embedding": [0.1] * 10}, {"index": 1, "embedding": [0.1] * 10}]}, "shape"),
        ({"data": [{"index": 0, "embedding": [0.05] * DIMENSIONS}] * 2}, "repeated index"),
        ({"data": [{"index": i, "embedding": [float("nan")] * DIMENSIONS} for i in (0, 1)]}, "non-finite"),
        ({"data": [{"index": i, "embedding": [0.5] * DIMENSIONS} for i in (0, 1)]}, "not unit length"),
        ({"unexpected": True}, "not an embeddings list"),
    ],
)
def test_a_wrong_reply_is_refused_never_passed_on(reply: dict, complaint: str) -> None:
    with (
        StubEndpoint(default=Step(200, body=json.dumps(reply).encode())) as stub,
        pytest.raises(UpstreamFailed, match=complaint),
    ):
        embed(client_for(stub.url))


@pytest.mark.usefixtures("service_env")
def test_the_api_answers_502_then_503_when_the_endpoint_is_down(monkeypatch, lambda_context) -> None:
    from functions.api.app import lambda_handler
    from quantfn.registry import reset_registry

    # Given an API function whose GPU endpoint does not answer
    monkeypatch.setenv("QUANTFN_ENDPOINT_URL", f"http://127.0.0.1:{_free_port()}")
    monkeypatch.setenv("QUANTFN_ENDPOINT_MAX_ATTEMPTS", "2")
    monkeypatch.setenv("QUANTFN_ENDPOINT_BACKOFF_BASE_MS", "10")
    monkeypatch.setenv("QUANTFN_ENDPOINT_BREAKER_FAILURES", "1")
    reset_registry()
    event = load_event("api-embeddings-oversized.json")
    # When an oversized request comes, twice
    first = lambda_handler(event, lambda_context)
    second = lambda_handler(event, lambda_context)
    # Then the first is a 502 after its retries, the second a 503 from the open circuit; both say where they went
    for reply, status, code in ((first, 502, "upstream_failed"), (second, 503, "endpoint_circuit_open")):
        error = json.loads(reply["body"])["error"]
        assert reply["statusCode"] == status and error["code"] == code
        assert "retry later" in error["message"] and "127.0.0.1" not in error["message"]
        assert reply["headers"]["x-quantfn-route"] == "endpoint; reason=too_many_inputs"


# ---- the fault matrix of issue 14: trickling replies, Retry-After, 4xx and the breaker, resets, bad bodies ----


def test_a_reply_trickling_in_a_byte_at_a_time_is_abandoned_at_the_deadline() -> None:
    # Given an endpoint that sends its (valid) reply one byte every 0.4 s, each read well inside the timeout
    with StubEndpoint(default=Step(trickle_s=0.4)) as stub:
        client = client_for(stub.url, timeout_ms=1000, max_attempts=1)
        started = time.monotonic()
        # When the call has a 1 s deadline
        with pytest.raises(UpstreamFailed, match="no answer within"):
            embed(client, within_s=1.0)
        # Then it ends at the deadline, not after the whole trickle (thousands of bytes)
        assert time.monotonic() - started < 2.0 and len(stub.requests) == 1


def test_retry_after_on_a_429_is_waited_for_before_the_retry() -> None:
    with StubEndpoint([Step(429, headers={"Retry-After": "1"})]) as stub:
        reply = embed(client_for(stub.url, backoff_max_ms=10), within_s=5.0)
        assert reply.attempts == 2
        assert stub.requests[1]["at"] - stub.requests[0]["at"] >= 0.95  # not the 0-10 ms backoff


def test_a_retry_after_past_the_deadline_fails_at_once_instead_of_retrying_early() -> None:
    with StubEndpoint(default=Step(429, headers={"Retry-After": "30"})) as stub:
        started = time.monotonic()
        with pytest.raises(UpstreamFailed, match=r"Retry-After 30\.0 s is past the deadline"):
            embed(client_for(stub.url), within_s=2.0)
        assert time.monotonic() - started < 1.0 and len(stub.requests) == 1


@pytest.mark.parametrize("status", [400, 404, 422, 429])
def test_endpoint_4xx_never_open_the_circuit(status: int) -> None:
    # Given a breaker that opens after 2 failures, and an endpoint that refuses three requests
    with StubEndpoint([Step(status)] * 3) as stub:
        client = client_for(stub.url, max_attempts=1)
        for _ in range(3):
            with pytest.raises(UpstreamFailed, match=f"HTTP {status}"):
                embed(client)
        # Then the circuit is still closed and the next request reaches the endpoint and succeeds
        assert client.breaker.state == "closed"
        assert embed(client).output.shape == (2, DIMENSIONS) and len(stub.requests) == 4


def test_a_4xx_probe_in_half_open_does_not_wedge_the_circuit() -> None:
    with StubEndpoint([Step(500), Step(500), Step(400)]) as stub:
        client = client_for(stub.url, max_attempts=1)
        for _ in range(2):
            with pytest.raises(UpstreamFailed):
                embed(client)
        time.sleep(0.35)  # the cool-down: one probe may go
        with pytest.raises(UpstreamFailed, match="HTTP 400"):
            embed(client)
        assert embed(client).attempts == 1 and len(stub.requests) == 4  # the next probe went out


def test_a_connection_reset_mid_reply_is_retried_and_the_whole_answer_arrives() -> None:
    with StubEndpoint([Step(reset=True), Step(reset=True)]) as stub:
        reply = embed(client_for(stub.url))
        assert reply.attempts == 3 and len(stub.requests) == 3
        np.testing.assert_allclose(reply.output, unit_vectors(2), atol=1e-7)


@pytest.mark.parametrize("body", [b"{not json", b"", b"[1, 2]", b'{"data": "x"}', b'{"data": [7, 8]}'])
def test_a_malformed_reply_is_an_upstream_failure_and_the_next_good_reply_is_served(body: bytes) -> None:
    with StubEndpoint([Step(200, body=body)]) as stub:
        client = client_for(stub.url)
        with pytest.raises(UpstreamFailed):
            embed(client)
        np.testing.assert_allclose(embed(client).output, unit_vectors(2), atol=1e-7)
        assert len(stub.requests) == 2
