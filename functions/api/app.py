"""API function: OpenAI-compatible embeddings behind an API Gateway HTTP API (payload v2)."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.event_handler import APIGatewayHttpResolver, Response, content_types
from aws_lambda_powertools.event_handler.exceptions import NotFoundError
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from quantfn.errors import BadRequest, QuantfnError
from quantfn.openai_compat import embeddings_response, load_json_body, models_response, parse_embeddings_request
from quantfn.routing import RoutePlan
from quantfn.serialize import dumps
from quantfn.service import get_service
from quantfn.warmup import prepare_init

logger = Logger(service="quantfn-api")
metrics = Metrics(namespace="quantfn", service="quantfn-api")
app = APIGatewayHttpResolver(serializer=dumps)
ROUTES = {"/v1/embeddings": "POST", "/v1/models": "GET", "/health": "GET"}
TIMING_METRICS = {
    "model_load_ms": "ModelLoadMs",
    "tokenize_ms": "TokenizeMs",
    "inference_ms": "InferenceMs",
    "endpoint_ms": "EndpointMs",
}
ROUTE_HEADER = "x-quantfn-route"
prepare_init()  # loads the model now only with QUANTFN_PRELOAD or under SnapStart


@app.post("/v1/embeddings")
def create_embeddings() -> Response:
    raw = app.current_event.decoded_body or ""
    # No size limits here: the router applies them, so a 413 can say whether the GPU endpoint could take it.
    request = parse_embeddings_request(load_json_body(raw, None), None)
    remaining_ms = app.lambda_context.get_remaining_time_in_millis()
    result = get_service().embed_routed(request, payload_bytes=len(raw.encode()), remaining_ms=remaining_ms)
    _record_route(result.route)
    for name, value in result.timings_ms.items():
        metrics.add_metric(name=TIMING_METRICS[name], unit=MetricUnit.Milliseconds, value=value)
    metrics.add_metric(name="InputTokens", unit=MetricUnit.Count, value=result.prompt_tokens)
    metrics.add_metric(name="Inputs", unit=MetricUnit.Count, value=len(request.texts))
    logger.info("embedded", extra={"inputs": len(request.texts), "tokens": result.prompt_tokens, **result.timings_ms})
    body = embeddings_response(result.vectors, result.model, result.prompt_tokens, request.encoding_format)
    return Response(200, content_types.APPLICATION_JSON, body, headers={ROUTE_HEADER: result.route.header})


@app.get("/v1/models")
def list_models() -> dict[str, Any]:
    manifest = get_service().manifest()
    return models_response([manifest.model_id], created=int(manifest.raw.get("created_unix", 0)))


@app.get("/health")
def health() -> dict[str, Any]:
    return {"status": "ok", **get_service().describe()}


@app.not_found
def not_found(_: NotFoundError) -> Response:
    path, method = app.current_event.path, app.current_event.http_method
    if path in ROUTES:
        error = BadRequest(f"{method} is not allowed on {path}; use {ROUTES[path]}.", code="method_not_allowed")
        return _error_response(error, 405, {"Allow": ROUTES[path]})
    return _error_response(BadRequest(f"No route for {method} {path}.", code="not_found"), 404)


@app.exception_handler(QuantfnError)
def quantfn_error(error: QuantfnError) -> Response:
    log = logger.info if error.status < 500 else logger.error
    log("request refused", extra={"status": error.status, "code": error.code, "detail": error.message})
    metrics.add_metric(name=f"Errors{error.status // 100}xx", unit=MetricUnit.Count, value=1)
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
    return Response(status, content_types.APPLICATION_JSON, error.to_body(), headers=headers)


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="Requests", unit=MetricUnit.Count, value=1)
    return app.resolve(event, context)
