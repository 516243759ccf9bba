"""API function: every route of quantfn.wire.routes (OpenAI embeddings, Cohere/Jina rerank, classify, models,
health, OpenAPI) behind an API Gateway HTTP API. One log record and the metrics per request; the rest is quantfn."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger, Metrics
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from quantfn.errors import safe_reason
from quantfn.serialize import dumps, log_json
from quantfn.tracing import capture_lambda_handler
from quantfn.warmup import prepare_init
from quantfn.wire import body, routes

logger = Logger(service="quantfn-api", json_serializer=log_json)
metrics = Metrics(namespace="quantfn", service="quantfn-api")
TIMING_METRICS = {"model_load_ms": "ModelLoadMs", "tokenize_ms": "TokenizeMs", "inference_ms": "InferenceMs"}
TIMING_METRICS["endpoint_ms"] = "EndpointMs"
prepare_init()  # loads the default model now only with QUANTFN_PRELOAD or under SnapStart


def request_path(event: dict[str, Any]) -> str:
    """The route's path: a stage name API Gateway puts in front (``/prod/v1/...``) is not part of it."""
    path = str(event.get("rawPath") or _dig(event, "requestContext", "http", "path") or "")
    stage = str(_dig(event, "requestContext", "stage") or "")
    return path[len(stage) + 1 :] if stage not in ("", "$default") and path.startswith(f"/{stage}/") else path


def _dig(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...``, or None where a level is missing or not an object."""
    for key in keys:
        value = value.get(key) if isinstance(value, dict) else None
    return value


def record(reply: routes.Reply) -> None:
    """The request's one log record and its metrics: what was served or why not, the route and its numbers."""
    plan, result = reply.route, reply.result
    if plan is not None:  # one count per route (RoutedLocal, RoutedEndpoint, RoutedRefuse), the reason beside it
        metrics.add_metric(name=f"Routed{plan.route.title()}", unit=MetricUnit.Count, value=1)
        metrics.add_metadata(key="route_reason", value=plan.reason)
    route_fields = plan.log_fields() if plan is not None else {}
    if result is not None:
        for name, value in result.timings_ms.items():
            metrics.add_metric(name=TIMING_METRICS[name], unit=MetricUnit.Milliseconds, value=value)
        metrics.add_metric(name="InputTokens", unit=MetricUnit.Count, value=result.tokens)
        metrics.add_metric(name="Inputs", unit=MetricUnit.Count, value=len(result.token_counts))
        served = {"task": reply.task, "inputs": len(result.token_counts), **result.timings_ms}
        logger.info("served", extra=served | route_fields)
        return
    if reply.status >= 400:  # every error reply is counted here, 404 and 405 included
        metrics.add_metric(name=f"Errors{reply.status // 100}xx", unit=MetricUnit.Count, value=1)
    if reply.unexpected is not None:
        logger.error("unexpected error", exc_info=reply.unexpected)
    elif reply.error is not None:
        error = reply.error
        detail = error.message[:500] if error.status < 500 else safe_reason(error.message)  # a dependency's: no paths
        refused = {"status": error.status, "code": error.code, "detail": detail}
        (logger.info if error.status < 500 else logger.error)("request refused", extra=refused | route_fields)


@capture_lambda_handler  # X-Ray in Lambda with Tracing: Active; a no-op locally
@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="Requests", unit=MetricUnit.Count, value=1)
    key_id = _dig(event, "requestContext", "authorizer", "lambda", "key_id")
    if isinstance(key_id, str):  # the API key's id (never the key) from the authorizer: on the log and the metrics
        logger.append_keys(key_id=key_id)
        metrics.add_metadata(key="key_id", value=key_id)
    method = str(_dig(event, "requestContext", "http", "method") or "")
    raw = lambda: body.event_body(event.get("body"), bool(event.get("isBase64Encoded")))  # noqa: E731
    reply = routes.respond(method, request_path(event), raw, remaining_ms=context.get_remaining_time_in_millis())
    record(reply)
    headers = {"Content-Type": "application/json", **reply.headers}
    return {"statusCode": reply.status, "headers": headers, "body": dumps(reply.body), "isBase64Encoded": False}
