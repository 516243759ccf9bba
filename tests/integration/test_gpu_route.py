"""The GPU route end to end: the API handler in-process, the container server as a real process on loopback.

The server runs containers/gpu/serve with the CPU provider (no GPU needed) and the same
model file, so its answers must match the in-Lambda answers to cosine >= 0.999.
"""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quantfn.config import LimitSettings, RuntimeSettings, Settings
from quantfn.inference import Result, run
from quantfn.registry import Registry
from quantfn.tasks import EmbedRequest
from tests.conftest import DEFAULT_MODEL_ID, gpu_container, load_event

MODEL = "all-MiniLM-L6-v2"
LONG = "Quantized encoders answer from small functions while large requests go elsewhere. " * 24


@pytest.fixture(scope="module")
def gpu_server(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """containers/gpu/serve as a separate process on 127.0.0.1 and a free port; its URL."""
    env = {"QUANTFN_MAX_INPUTS": "2048", "QUANTFN_SERVER_BATCH_WAIT_MS": "20"}
    with gpu_container(models_root, tmp_path_factory.mktemp("gpu"), **env) as url:
        yield url


@pytest.fixture(scope="module")
def here(models_root: Path) -> Registry:
    """The in-Lambda answer: the same model in this process (with room for the 300 inputs)."""
    return Registry(
        Settings(
            runtime=RuntimeSettings(
                models=((DEFAULT_MODEL_ID, f"layer:{DEFAULT_MODEL_ID}"),), models_root=models_root, threads=2
            ),
            limits=LimitSettings(max_inputs=2048),
        )
    )


def embed_here(registry: Registry, texts: list[str]) -> Result:
    return run(EmbedRequest(texts, MODEL), registry=registry)


@pytest.fixture
def routed(service_env: None, gpu_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    from quantfn.registry import reset_registry

    monkeypatch.setenv("QUANTFN_ENDPOINT_URL", gpu_server)
    reset_registry()
    return gpu_server


def invoke(event: dict, context) -> tuple[int, dict, dict]:
    from functions.api.app import lambda_handler

    reply = lambda_handler(event, context)
    return reply["statusCode"], reply.get("headers", {}), json.loads(reply["body"])


def with_body(event: dict, body: dict) -> dict:
    return {**event, "body": json.dumps(body)}


def vectors_of(body: dict) -> np.ndarray:
    return np.asarray([item["embedding"] for item in sorted(body["data"], key=lambda i: i["index"])], np.float32)


def server_stats(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/stats", timeout=5) as reply:
        return json.loads(reply.read())


def test_an_oversized_request_is_answered_by_the_endpoint_as_it_would_be_here(routed, lambda_context, here) -> None:
    # Given 300 inputs, over QUANTFN_MAX_INPUTS (256), and an endpoint configured
    event = load_event("api-embeddings-oversized.json")
    texts = json.loads(event["body"])["input"]
    # When the API function gets them
    status, headers, body = invoke(event, lambda_context)
    # Then the endpoint answered, the caller is told so and why, and the answer is the local one
    assert status == 200, body
    assert headers["x-quantfn-route"] == "endpoint; reason=too_many_inputs"
    local = embed_here(here, texts)
    cosines = np.sum(vectors_of(body) * local.output, axis=1)
    assert len(cosines) == 300 and cosines.min() >= 0.999, cosines.min()
    assert body["usage"]["prompt_tokens"] == local.tokens and body["model"] == local.model


def test_a_request_too_slow_for_the_time_left_goes_to_the_endpoint(routed, lambda_context, here) -> None:
    # Given 8 long texts (2,048 tokens after truncation) and 3.3 s left: 0.3 s after the 3 s margin
    lambda_context.remaining_ms = 3_300
    texts = [f"{i}: {LONG}" for i in range(8)]
    event = with_body(load_event("api-embeddings.json"), {"model": MODEL, "input": texts})
    # When the API function gets them
    status, headers, body = invoke(event, lambda_context)
    # Then the cost model sent them to the endpoint, and the answer is the local one
    assert status == 200, body
    assert headers["x-quantfn-route"] == "endpoint; reason=estimated_time"
    assert np.sum(vectors_of(body) * embed_here(here, texts).output, axis=1).min() >= 0.999


def test_small_requests_stay_local(routed, lambda_context) -> None:
    before = server_stats(routed)["requests"]
    status, headers, body = invoke(load_event("api-embeddings.json"), lambda_context)
    assert status == 200 and len(body["data"]) == 3
    assert headers["x-quantfn-route"] == "local; reason=within_limits"
    assert server_stats(routed)["requests"] == before


@pytest.mark.usefixtures("service_env")
def test_without_an_endpoint_an_oversized_request_is_a_413_naming_the_limit(lambda_context) -> None:
    status, headers, body = invoke(load_event("api-embeddings-oversized.json"), lambda_context)
    message = body["error"]["message"]
    assert status == 413 and body["error"]["code"] == "too_many_inputs"
    assert "300 items" in message and "256" in message and "QUANTFN_MAX_INPUTS" in message
    assert "no GPU endpoint is configured" in message
    assert headers["x-quantfn-route"] == "refuse; reason=too_many_inputs"


@pytest.mark.usefixtures("service_env")
def test_an_answer_too_big_to_return_as_floats_is_a_413_pointing_to_base64(monkeypatch, lambda_context) -> None:
    from quantfn.registry import reset_registry

    # Given a function that may return at most 20,000 bytes
    monkeypatch.setenv("QUANTFN_MAX_RESPONSE_BYTES", "20000")
    reset_registry()
    event = load_event("api-embeddings.json")
    # When 3 embeddings are asked for as floats (about 30 kB), then as base64 (about 8 kB)
    status, headers, body = invoke(event, lambda_context)
    sent = json.loads(event["body"])
    b64_reply = invoke(with_body(event, {**sent, "encoding_format": "base64"}), lambda_context)
    # Then floats are refused before any inference, with the way out named; base64 is answered
    assert status == 413 and body["error"]["code"] == "response_too_large"
    assert "encoding_format=base64" in body["error"]["message"]
    assert headers["x-quantfn-route"] == "refuse; reason=response_too_large"
    assert b64_reply[0] == 200 and len(json.dumps(b64_reply[2])) < 20000


def test_concurrent_requests_are_micro_batched_without_changing_answers(gpu_server, here) -> None:
    # Given 8 clients, each with its own 3 texts of different lengths
    requests = [[f"client {c} text {t} " + "word " * (5 + 17 * c + 3 * t) for t in range(3)] for c in range(8)]
    before = server_stats(gpu_server)
    answers: dict[int, np.ndarray] = {}
    start = threading.Barrier(len(requests))

    def client(index: int) -> None:
        body = json.dumps({"model": MODEL, "input": requests[index]}).encode()
        request = urllib.request.Request(f"{gpu_server}/invocations", data=body, method="POST")
        request.add_header("Content-Type", "application/json")
        start.wait()
        with urllib.request.urlopen(request, timeout=30) as reply:
            answers[index] = vectors_of(json.loads(reply.read()))

    # When they all call the server at once
    threads = [threading.Thread(target=client, args=(i,)) for i in range(len(requests))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    # Then batches held more than one request, and every answer is what the texts get alone
    after = server_stats(gpu_server)
    assert after["requests"] - before["requests"] == len(requests)
    assert after["multi_request_batches"] > before["multi_request_batches"]
    assert after["batches"] - before["batches"] < len(requests)
    for index, texts in enumerate(requests):
        alone = np.stack([embed_here(here, [text]).output[0] for text in texts])
        assert np.sum(answers[index] * alone, axis=1).min() >= 0.9999


def test_ping_reports_the_model_choice(gpu_server) -> None:
    with urllib.request.urlopen(f"{gpu_server}/ping", timeout=5) as reply:
        ping = json.loads(reply.read())
    assert ping["status"] == "ok" and ping["providers"] == ["CPUExecutionProvider"]
    assert "QUANTFN_GPU_PROVIDER=cpu" in ping["model_choice"]
