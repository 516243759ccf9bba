"""routing.plan: one decision, with its reason and numbers, from sizes, tokens, time left and the cost model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import FrozenInstanceError, replace

import numpy as np
import pytest

from quantfn.config import EndpointSettings, LimitSettings, RuntimeSettings, Settings
from quantfn.inference import Result
from quantfn.models.manifest import Manifest
from quantfn.routing import RoutePlan, Shape, by_size, estimate_local_ms
from quantfn.routing import plan as plan_work
from quantfn.serialize import dumps
from quantfn.tasks import EmbedRequest
from quantfn.tasks.embed import embedding_advice, estimate_embedding_bytes
from quantfn.wire.openai import embeddings_response

LOCAL = Settings(runtime=RuntimeSettings(threads=1, vcpu_share=1.0))
WITH_ENDPOINT = replace(LOCAL, endpoint=EndpointSettings(name="quantfn-gpu"))


def plan(
    settings: Settings = LOCAL,
    *,
    inputs: int = 3,
    counts: Sequence[int] | None = None,
    payload_bytes: int = 500,
    encoding_format: str = "float",
    remaining_ms: float | None = 29_000,
    cold: bool = False,
) -> RoutePlan:
    counts = list(counts if counts is not None else [12] * inputs)
    shape = embedding_shape(inputs, payload_bytes, encoding_format, settings)
    return plan_work(shape, counts, remaining_ms=remaining_ms, cold=cold, settings=settings)


def embedding_shape(inputs: int, payload_bytes: int, encoding_format: str, settings: Settings) -> Shape:
    """The Shape of an embeddings request to a 384-dimension model of 256 tokens, as the embed task makes it."""
    return Shape(
        inputs=inputs,
        payload_bytes=payload_bytes,
        reply_bytes=estimate_embedding_bytes(inputs, 384, encoding_format),
        max_length=256,
        reply_advice=embedding_advice(inputs, 384, encoding_format, settings),
    )


def test_a_small_request_runs_here() -> None:
    decided = plan()
    assert (decided.route, decided.reason, decided.tokens) == ("local", "within_limits", 36)
    assert decided.header == "local; reason=within_limits"
    assert 0 < decided.estimated_ms < decided.budget_ms == 26_000


def test_too_many_inputs_go_to_the_endpoint_without_tokenizing_first() -> None:
    decided = by_size(embedding_shape(300, 10_000, "float", WITH_ENDPOINT), WITH_ENDPOINT)  # no tokens given
    assert decided is not None
    assert decided.header == "endpoint; reason=too_many_inputs" and decided.limit == "QUANTFN_MAX_INPUTS"


def test_without_an_endpoint_a_local_limit_is_a_413_that_says_so() -> None:
    decided = plan(inputs=300)
    assert decided.route == "refuse"
    error = decided.refusal()
    assert error.status == 413 and error.code == "too_many_inputs" and error.route is decided
    assert "300 items" in error.message and "QUANTFN_MAX_INPUTS" in error.message
    assert "no GPU endpoint is configured" in error.message


def test_over_the_endpoints_own_limit_is_refused_naming_that_limit() -> None:
    decided = plan(WITH_ENDPOINT, inputs=2500, encoding_format="base64")  # the answer itself would fit
    assert decided.route == "refuse" and decided.limit == "QUANTFN_ENDPOINT_MAX_INPUTS"
    assert "2048 inputs" in decided.message


@pytest.mark.parametrize(
    ("counts", "reason", "limit"),
    [
        ([10, 9000, 10], "input_too_long", "QUANTFN_MAX_INPUT_TOKENS"),
        ([8000] * 9, "too_many_tokens", "QUANTFN_MAX_TOTAL_TOKENS"),
    ],
)
def test_token_limits_route_to_the_endpoint(counts: list[int], reason: str, limit: str) -> None:
    assert plan(WITH_ENDPOINT, inputs=len(counts), counts=counts).header == f"endpoint; reason={reason}"
    refused = plan(LOCAL, inputs=len(counts), counts=counts)
    assert refused.route == "refuse" and refused.limit == limit and limit in refused.message


def test_a_body_over_the_local_limit_goes_to_the_endpoint() -> None:
    small_body = replace(WITH_ENDPOINT, limits=LimitSettings(max_body_bytes=1000))
    assert plan(small_body, payload_bytes=5000).header == "endpoint; reason=body_too_large"


def test_little_time_left_sends_a_long_request_to_the_endpoint() -> None:
    # 64 inputs of 256 tokens: about 8 s at 0.5 ms/token on one vCPU
    counts = [256] * 64
    assert plan(WITH_ENDPOINT, inputs=64, counts=counts, remaining_ms=29_000).route == "local"
    decided = plan(WITH_ENDPOINT, inputs=64, counts=counts, remaining_ms=6_000)
    assert decided.header == "endpoint; reason=estimated_time"
    assert decided.estimated_ms > decided.budget_ms == 3_000
    refused = plan(LOCAL, inputs=64, counts=counts, remaining_ms=6_000)
    assert refused.route == "refuse" and "Split the request" in refused.message


def test_the_api_gateway_timeout_caps_a_longer_function_timeout() -> None:
    assert plan(remaining_ms=900_000).budget_ms == 26_000
    assert plan(remaining_ms=None).budget_ms == 26_000


def test_the_estimate_scales_with_the_vcpu_share_and_threads() -> None:
    counts = [256] * 10
    one = estimate_local_ms(counts, 256, LOCAL, cold=False)
    half = estimate_local_ms(
        counts, 256, replace(LOCAL, runtime=RuntimeSettings(vcpu_share=0.5, threads=1)), cold=False
    )
    two = estimate_local_ms(
        counts,
        256,
        Settings(
            runtime=RuntimeSettings(vcpu_share=2.0, threads=2), limits=LimitSettings(cost_parallel_efficiency=0.6)
        ),
        cold=False,
    )
    assert half == pytest.approx(2 * one)
    assert two == pytest.approx(one / 1.6)
    assert estimate_local_ms(counts, 256, LOCAL, cold=True) == pytest.approx(one + LOCAL.limits.cost_load_ms)
    # tokens past the model's maximum are truncated, so they cost nothing
    assert estimate_local_ms([5000], 256, LOCAL, cold=False) == estimate_local_ms([256], 256, LOCAL, cold=False)


def test_an_answer_too_big_as_floats_is_refused_with_base64_named() -> None:
    decided = plan(WITH_ENDPOINT, inputs=1200, counts=[10] * 1200)
    assert decided.header == "refuse; reason=response_too_large"
    assert "encoding_format=base64" in decided.message
    assert plan(WITH_ENDPOINT, inputs=1200, encoding_format="base64").route == "endpoint"


def test_an_answer_too_big_even_as_base64_must_be_split() -> None:
    decided = plan(WITH_ENDPOINT, inputs=4000, encoding_format="base64")
    assert decided.route == "refuse" and "Split the request" in decided.message
    assert "base64 (about" not in decided.message


@pytest.mark.parametrize("encoding_format", ["float", "base64"])
def test_the_response_estimate_bounds_the_real_reply_closely(encoding_format: str) -> None:
    # Given real-looking unit vectors, including tiny values printed with exponents
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((50, 384)).astype(np.float32)
    vectors[:, :20] *= 1e-6
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    manifest = Manifest("all-minilm-l6-v2", "embed", {}, 384, 256, ("input_ids",), "last_hidden_state")
    result = Result("all-minilm-l6-v2", manifest, vectors, token_counts=[20] * 50, ok=list(range(50)))
    request = EmbedRequest(["x"] * 50, "all-minilm-l6-v2", encoding_format=encoding_format)
    body = dumps(embeddings_response(result, request))  # as the API writes it
    # When the reply is wrapped as Lambda's proxy reply is (the body is a JSON string)
    wrapped = len(json.dumps({"statusCode": 200, "headers": {"Content-Type": "application/json"}, "body": body}))
    # Then the estimate is an upper bound, and not a wasteful one
    estimate = estimate_embedding_bytes(50, 384, encoding_format)
    assert wrapped <= estimate < 1.35 * wrapped


def test_the_record_logs_every_number_but_no_message() -> None:
    fields = plan(inputs=300).log_fields()
    assert fields["route"] == "refuse" and fields["route_reason"] == "too_many_inputs"
    assert fields["route_inputs"] == 300 and "route_message" not in fields
    with pytest.raises(FrozenInstanceError):
        plan().route = "endpoint"  # type: ignore[misc]


def test_every_gpu_route_variable_is_read() -> None:
    env = {
        "QUANTFN_ENDPOINT_NAME": "quantfn-gpu",
        "QUANTFN_ENDPOINT_URL": "http://127.0.0.1:8080/",
        "QUANTFN_ENDPOINT_TIMEOUT_MS": "1000",
        "QUANTFN_ENDPOINT_CONNECT_TIMEOUT_MS": "100",
        "QUANTFN_ENDPOINT_MAX_ATTEMPTS": "5",
        "QUANTFN_ENDPOINT_BACKOFF_BASE_MS": "20",
        "QUANTFN_ENDPOINT_BACKOFF_MAX_MS": "200",
        "QUANTFN_ENDPOINT_BREAKER_FAILURES": "4",
        "QUANTFN_ENDPOINT_BREAKER_COOLDOWN_MS": "5000",
        "QUANTFN_ENDPOINT_MAX_INPUTS": "1024",
        "QUANTFN_ENDPOINT_MAX_TOTAL_TOKENS": "99999",
        "QUANTFN_ENDPOINT_MAX_BODY_BYTES": "1000000",
        "QUANTFN_MAX_RESPONSE_BYTES": "2000000",
        "QUANTFN_API_TIMEOUT_MS": "10000",
        "QUANTFN_ROUTE_MARGIN_MS": "500",
        "QUANTFN_COST_MS_PER_TOKEN": "0.25",
        "QUANTFN_COST_MS_PER_INPUT": "2",
        "QUANTFN_COST_PARALLEL_EFFICIENCY": "0.5",
        "QUANTFN_COST_LOAD_MS": "900",
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "3538",
        "QUANTFN_GPU_MODEL": "layer:other-fp16",
        "QUANTFN_GPU_PROVIDER": "CPU",
        "QUANTFN_SERVER_HOST": "127.0.0.1",
        "QUANTFN_SERVER_PORT": "9090",
        "QUANTFN_SERVER_BATCH_WAIT_MS": "2.5",
        "QUANTFN_SERVER_BATCH_MAX_TEXTS": "64",
        "QUANTFN_SERVER_QUEUE_MAX": "8",
    }
    s = Settings.from_env(env)
    assert (s.endpoint.name, s.endpoint.url, s.endpoint.configured) == ("quantfn-gpu", "http://127.0.0.1:8080", True)
    assert (s.endpoint.timeout_ms, s.endpoint.connect_timeout_ms, s.endpoint.max_attempts) == (1000, 100, 5)
    assert (s.endpoint.backoff_base_ms, s.endpoint.backoff_max_ms) == (20, 200)
    assert (s.endpoint.breaker_failures, s.endpoint.breaker_cooldown_ms) == (4, 5000)
    assert (s.endpoint.max_inputs, s.endpoint.max_total_tokens, s.endpoint.max_body_bytes) == (1024, 99999, 10**6)
    assert (s.limits.max_response_bytes, s.limits.api_timeout_ms, s.limits.route_margin_ms) == (2_000_000, 10_000, 500)
    assert (
        s.limits.cost_ms_per_token,
        s.limits.cost_ms_per_input,
        s.limits.cost_parallel_efficiency,
        s.limits.cost_load_ms,
    ) == (0.25, 2, 0.5, 900)
    assert s.runtime.vcpu_share == pytest.approx(2.0)
    assert (s.server.gpu_model, s.server.gpu_provider, s.server.host, s.server.port) == (
        "layer:other-fp16",
        "cpu",
        "127.0.0.1",
        9090,
    )
    assert (s.server.batch_wait_ms, s.server.batch_max_texts, s.server.queue_max) == (2.5, 64, 8)
    assert Settings.from_env({"SAGEMAKER_BIND_TO_PORT": "7070"}).server.port == 7070
    assert Settings.from_env({}).endpoint.configured is False
