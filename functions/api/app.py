"""API function: embeddings (OpenAI), rerank (Cohere/Jina) and classification behind an API Gateway HTTP API."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from quantfn import inference
from quantfn.errors import BadRequest, QuantfnError
from quantfn.registry import get_registry
from quantfn.routing import RoutePlan
from quantfn.serialize import dumps
from quantfn.tracing import capture_lambda_handler
from quantfn.warmup import prepare_init
from quantfn.wire import body, classify, openai, rerank

logger = Logger(service="quantfn-api")
metrics = Metrics(namespace="quantfn", service="quantfn-api")
app = APIGatewayHttpResolver(serializer=dumps)
ROUTES = {
    "/v1/embeddings": "POST",
    "/v1/rerank": "POST",
    "/v2/rerank": "POST",
    "/v1/classify": "POST",
    "/v1/models": "GET",
    "/health": "GET",
}
TIMING_METRICS = {"model_load_ms": "ModelLoadMs", "tokenize_ms": "TokenizeMs", "inference_ms": "InferenceMs"}
TIMING_METRICS["endpoint_ms"] = "EndpointMs"
ROUTE_HEADER = "x-quantfn-route"
prepare_init()  # loads the default model now only with QUANTFN_PRELOAD or under SnapStart


def _serve(parse: Callable[[Any], inference.Request], reply: Callable[[inference.Result, Any], dict]) -> Response:
    """Decode and check the body, run the request where the router says, shape the reply."""
    event = app.current_event
    raw = body.event_body(event.get("body"), bool(event.get("isBase64Encoded")))
    # No size limits here: the router applies them, so a 413 can say whether the GPU endpoint could take it.
    request = parse(body.load_json_body(raw, None))
    budget = inference.Budget(app.lambda_context.get_remaining_time_in_millis(), len(raw))
    result = inference.run(request, budget)
    _record_route(result.route)
    for name, value in result.timings_ms.items():
        metrics.add_metric(name=TIMING_METRICS[name], unit=MetricUnit.Milliseconds, value=value)
    metrics.add_metric(name="InputTokens", unit=MetricUnit.Count, value=result.tokens)
    metrics.add_metric(name="Inputs", unit=MetricUnit.Count, value=len(result.token_counts))
    logger.info("served", extra={"task": request.task, "inputs": len(result.token_counts), **result.timings_ms})
    return Response(200, content_types.APPLICATION_JSON, reply(result, request), {ROUTE_HEADER: result.route.header})


@app.post("/v1/embeddings")
def embeddings() -> Response:
    return _serve(
        lambda b: openai.parse_embeddings_request(b, None),
        lambda r, q: openai.embeddings_response(r, q.encoding_format),
    )


@app.post("/v1/rerank")
def rerank_v1() -> Response:
    return _serve(lambda b: rerank.parse_rerank_request(b, 1, None), lambda r, q: rerank.rerank_response(r, q, 1))


@app.post("/v2/rerank")
def rerank_v2() -> Response:
    return _serve(lambda b: rerank.parse_rerank_request(b, 2, None), lambda r, q: rerank.rerank_response(r, q, 2))


@app.post("/v1/classify")
def classify_texts() -> Response:
    return _serve(lambda b: classify.parse_classify_request(b, None), classify.classify_response)


@app.get("/v1/models")
def list_models() -> dict[str, Any]:
    registry = get_registry()
    return openai.models_response([registry.describe(model) for model in registry.models])


@app.get("/health")
def health() -> Response:
    registry = get_registry()
    models = [registry.describe(model) for model in registry.models]
    healthy = all(facts["status"] == "ok" for facts in models)
    status = {"status": "ok" if healthy else "degraded", "models": models}
    return Response(200 if healthy else 503, content_types.APPLICATION_JSON, status)


@app.not_found
def not_found(_: NotFoundError) -> Response:
    path, method = app.current_event.path, app.current_event.http_method
    if path in ROUTES:
        error = BadRequest(f"{method} is not allowed on {path}; use {ROUTES[path]}.", code="method_not_allowed")
        return _error_response(error, 405, {"Allow": ROUTES[path]})
    return _error_response(BadRequest("No such route; see GET /v1/models and the README.", code="not_found"), 404)


@app.exception_handler(QuantfnError)
def quantfn_error(error: QuantfnError) -> Response:
    log = logger.info if error.status < 500 else logger.error
    log("request refused", extra={"status": error.status, "code": error.code, "detail": error.message[:500]})
    if isinstance(error.route, RoutePlan):
        _record_route(error.route)
        return _error_response(error, error.status, {ROUTE_HEADER: error.route.header})
    return _error_response(error, error.status)


@app.exception_handler(Exception)
def unexpected_error(error: Exception) -> Response:
    logger.exception("unexpected error")
    return _error_response(QuantfnError("unexpected"), 500)


def _record_route(plan: RoutePlan) -> None:
    logger.info("routed", extra=plan.log_fields())
    # One count per route (RoutedLocal, RoutedEndpoint, RoutedRefuse); the reason rides along in the EMF record.
    metrics.add_metric(name=f"Routed{plan.route.title()}", unit=MetricUnit.Count, value=1)
    metrics.add_metadata(key="route_reason", value=plan.reason)


def _error_response(error: QuantfnError, status: int, headers: dict[str, str] | None = None) -> Response:
    # Every refusal is counted here, the one place replies with an error are made (404 and 405 included).
    metrics.add_metric(name=f"Errors{status // 100}xx", unit=MetricUnit.Count, value=1)
    return Response(status, content_types.APPLICATION_JSON, error.to_body(), headers=headers)


@capture_lambda_handler  # X-Ray in Lambda with Tracing: Active; a no-op locally
@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="Requests", unit=MetricUnit.Count, value=1)
    return app.resolve(event, context)
