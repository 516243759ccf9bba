"""API function: every route of quantfn.wire.routes (OpenAI embeddings, Cohere/Jina rerank, classify, models,
health, OpenAPI) behind an API Gateway HTTP API. One log record and the metrics per request; the rest is quantfn."""

from __future__ import annotations

from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.utilities.typing import LambdaContext

from quantfn.emf import function_metrics
from quantfn.serialize import dumps, log_json
from quantfn.tracing import capture_lambda_handler
from quantfn.warmup import prepare_init
from quantfn.wire import body, routes

logger = Logger(service="quantfn-api", json_serializer=log_json)
metrics = function_metrics("quantfn-api")
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


@capture_lambda_handler  # X-Ray in Lambda with Tracing: Active; a no-op locally
@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics(capture_cold_start_metric=True)
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    metrics.add_metric(name="Requests", unit="Count", value=1)
    key_id = _dig(event, "requestContext", "authorizer", "lambda", "key_id")
    if isinstance(key_id, str):  # the API key's id (never the key) from the authorizer: on the log and the metrics
        logger.append_keys(key_id=key_id)
        metrics.add_metadata(key="key_id", value=key_id)
    method = str(_dig(event, "requestContext", "http", "method") or "")
    raw = lambda: body.event_body(event.get("body"), bool(event.get("isBase64Encoded")))  # noqa: E731
    reply = routes.respond(method, request_path(event), raw, remaining_ms=context.get_remaining_time_in_millis())
    for name, unit, value in reply.measures():
        metrics.add_metric(name=name, unit=unit, value=value)
    if reply.route is not None:
        metrics.add_metadata(key="route_reason", value=reply.route.reason)
    level, message, fields = reply.record()  # the request's one log record
    getattr(logger, level)(message, extra=fields, exc_info=reply.unexpected)
    headers = {"Content-Type": "application/json", **reply.headers}
    return {"statusCode": reply.status, "headers": headers, "body": dumps(reply.body), "isBase64Encoded": False}
