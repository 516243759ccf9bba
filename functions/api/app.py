"""API function: embeddings (OpenAI), rerank (Cohere/Jina) and classification behind an API Gateway HTTP API."""

from __future__ import annotations

import json
from collections.abc import Callable
from functools import cache
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from quantfn import inference
from quantfn.errors import BadRequest, QuantfnError
from quantfn.registry import get_registry
from quantfn.routing import RoutePlan
from quantfn.serialize import dumps, log_json
from quantfn.tracing import capture_lambda_handler
from quantfn.warmup import prepare_init
from quantfn.wire import body, classify, openai, rerank

logger = Logger(service="quantfn-api", json_serializer=log_json)
metrics = Metrics(namespace="quantfn", service="quantfn-api")
TIMING_METRICS = {"model_load_ms": "ModelLoadMs", "tokenize_ms": "TokenizeMs", "inference_ms": "InferenceMs"}
TIMING_METRICS["endpoint_ms"] = "EndpointMs"
ROUTE_HEADER = "x-quantfn-route"
Reply = tuple[int, Any, dict[str, str]]
prepare_init()  # loads the default model now only with QUANTFN_PRELOAD or under SnapStart


def _serve(event: dict, context: Any, parse: Callable[[Any], Any], reply: Callable[[Any, Any], dict]) -> Reply:
    """Decode and check the body, run the request where the router says, shape the reply."""
    raw = body.event_body(event.get("body"), bool(event.get("isBase64Encoded")))
    # No size limits here: the router applies them, so a 413 can say whether the GPU endpoint could take it.
    request = parse(body.load_json_body(raw, None))
    result = inference.run(request, inference.Budget(context.get_remaining_time_in_millis(), len(raw)))
    _count_route(result.route)
    for name, value in result.timings_ms.items():
        metrics.add_metric(name=TIMING_METRICS[name], unit=MetricUnit.Milliseconds, value=value)
    metrics.add_metric(name="InputTokens", unit=MetricUnit.Count, value=result.tokens)
    metrics.add_metric(name="Inputs", unit=MetricUnit.Count, value=len(result.token_counts))
    # One record per request: what was served, how long each step took, and the route with its numbers.
    fields = {"task": request.task, "inputs": len(result.token_counts), **result.timings_ms}
    logger.info("served", extra=fields | result.route.log_fields())
    return 200, reply(result, request), {ROUTE_HEADER: result.route.header}


def embeddings(event: dict, context: Any) -> Reply:
    return _serve(
        event,
        context,
        lambda b: openai.parse_embeddings_request(b, None),
        lambda r, q: openai.embeddings_response(r, q.encoding_format),
    )


def rerank_v1(event: dict, context: Any) -> Reply:
    return _serve(
        event, context, lambda b: rerank.parse_rerank_request(b, 1, None), lambda r, q: rerank.rerank_response(r, q, 1)
    )


def rerank_v2(event: dict, context: Any) -> Reply:
    return _serve(
        event, context, lambda b: rerank.parse_rerank_request(b, 2, None), lambda r, q: rerank.rerank_response(r, q, 2)
    )


def classify_texts(event: dict, context: Any) -> Reply:
    return _serve(event, context, lambda b: classify.parse_classify_request(b, None), classify.classify_response)


def list_models(event: dict, context: Any) -> Reply:
    registry = get_registry()
    return 200, openai.models_response([registry.describe(model) for model in registry.models]), {}


def health(event: dict, context: Any) -> Reply:
    registry = get_registry()
    models = [registry.describe(model) for model in registry.models]
    healthy = all(facts["status"] == "ok" for facts in models)
    return (200 if healthy else 503), {"status": "ok" if healthy else "degraded", "models": models}, {}


def openapi_document(event: dict, context: Any) -> Reply:
    return 200, _openapi(), {}


@cache
def _openapi() -> dict[str, Any]:
    """The API's OpenAPI 3.1 description (package data beside the wire formats), read once, on first use."""
    from importlib.resources import files  # only GET /openapi.json needs it: ~20 ms off every cold start

    return json.loads(files("quantfn.wire").joinpath("openapi.json").read_text(encoding="utf-8"))


# A dict, not Powertools' resolver: importing aws_lambda_powertools.event_handler cost about 100 ms of every
# cold start (it pulls in asyncio and every other resolver) for routing this table does.
ROUTES: dict[str, tuple[str, Callable[[dict, Any], Reply]]] = {
    "/v1/embeddings": ("POST", embeddings),
    "/v1/rerank": ("POST", rerank_v1),
    "/v2/rerank": ("POST", rerank_v2),
    "/v1/classify": ("POST", classify_texts),
    "/v1/models": ("GET", list_models),
    "/health": ("GET", health),
    "/openapi.json": ("GET", openapi_document),
}


def route(event: dict, context: Any) -> Reply:
    """The route's reply, or the error reply for any failure (never an exception out of here)."""
    context_http = event.get("requestContext", {}).get("http", {})
    method, path = str(context_http.get("method", "")), str(event.get("rawPath") or context_http.get("path", ""))
    stage = event.get("requestContext", {}).get("stage", "$default")
    if stage != "$default" and path.startswith(f"/{stage}/"):
        path = path[len(stage) + 1 :]
    try:
        if path not in ROUTES:
            return _error_reply(BadRequest("No such route; see GET /v1/models and the README.", code="not_found"), 404)
        allowed, handler = ROUTES[path]
        if method != allowed:
            error = BadRequest(f"{method[:16]} is not allowed on {path}; use {allowed}.", code="method_not_allowed")
            return _error_reply(error, 405, {"Allow": allowed})
        return handler(event, context)
    except QuantfnError as error:
        log = logger.info if error.status < 500 else logger.error
        fields = {"status": error.status, "code": error.code, "detail": error.message[:500]}
        if isinstance(error.route, RoutePlan):
            log("request refused", extra=fields | error.route.log_fields())
            _count_route(error.route)
            return _error_reply(error, error.status, {ROUTE_HEADER: error.route.header})
        log("request refused", extra=fields)
        return _error_reply(error, error.status)
    except Exception:
        logger.exception("unexpected error")
        return _error_reply(QuantfnError("unexpected"), 500)


def _count_route(plan: RoutePlan) -> None:
    # One count per route (RoutedLocal, RoutedEndpoint, RoutedRefuse); the reason rides along in the EMF record.
    metrics.add_metric(name=f"Routed{plan.route.title()}", unit=MetricUnit.Count, value=1)
    metrics.add_metadata(key="route_reason", value=plan.reason)


def _error_reply(error: QuantfnError, status: int, headers: dict[str, str] | None = None) -> Reply:
    # Every refusal is counted here, the one place replies with an error are made (404 and 405 included).
    metrics.add_metric(name=f"Errors{status // 100}xx", unit=MetricUnit.Count, value=1)
    return status, error.to_body(), headers or {}


@capture_lambda_handler  # X-Ray in Lambda with Tracing: Active; a no-op locally
@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="Requests", unit=MetricUnit.Count, value=1)
    status, payload, headers = route(event, context)
    return {
        "statusCode": status,
        "headers": {"Content-Type": "application/json", **headers},
        "body": dumps(payload),
        "isBase64Encoded": False,
    }
