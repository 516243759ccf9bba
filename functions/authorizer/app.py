"""Authorizer function: API Gateway (HTTP API, payload 2.0, simple responses) asks whether a request's key is good.

The caller's ``Authorization: Bearer <key>`` (as the OpenAI and Cohere clients send it) is checked by
quantfn.auth against the key records in SSM. The answer carries the key's id, never the key, as
``context.key_id``; the API function reads it from ``requestContext.authorizer.lambda.key_id``. API Gateway
caches the answer per header value for the template's KeyCacheSeconds.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from aws_lambda_powertools import Logger
from aws_lambda_powertools.metrics import MetricUnit
from aws_lambda_powertools.utilities.typing import LambdaContext

from quantfn.auth.keys import check
from quantfn.auth.store import KeyStore, KeyStoreUnavailable
from quantfn.config import get_settings
from quantfn.emf import function_metrics
from quantfn.serialize import log_json

logger = Logger(service="quantfn-authorizer", json_serializer=log_json)
metrics = function_metrics("quantfn-authorizer")


@lru_cache(maxsize=1)
def get_store() -> KeyStore:
    import boto3

    settings = get_settings().auth
    return KeyStore(boto3.client("ssm"), settings.keys_prefix, settings.cache_seconds)


def authorization_header(event: dict[str, Any]) -> str | None:
    """The Authorization header: the identity source API Gateway passes, else the headers (lower-cased in 2.0)."""
    sources = event.get("identitySource") or []
    if sources and isinstance(sources[0], str):
        return sources[0]
    headers = event.get("headers") or {}
    return next((v for k, v in headers.items() if k.lower() == "authorization" and isinstance(v, str)), None)


@logger.inject_lambda_context(clear_state=True)
@metrics.log_metrics
def lambda_handler(event: dict[str, Any], context: LambdaContext) -> dict[str, Any]:
    try:
        decision = check(authorization_header(event), get_store())
    except KeyStoreUnavailable as error:
        # Raised, not refused: API Gateway answers 500 and caches nothing, where a "no" would be cached.
        logger.error("key store unavailable", extra={"error_code": error.code, "reason": error.message})
        metrics.add_metric(name="KeyStoreErrors", unit=MetricUnit.Count, value=1)
        raise
    fields = {"key_id": decision.key_id, "reason": decision.reason}
    logger.info("key accepted" if decision.authorized else "key refused", extra=fields)
    metrics.add_metric(name="KeysAccepted" if decision.authorized else "KeysRefused", unit=MetricUnit.Count, value=1)
    return {"isAuthorized": decision.authorized, "context": {"key_id": decision.key_id}}
