"""The one route table: path -> method, task, parse, reply; and ``respond``, where a request becomes a reply.

The API function and the GPU container both answer through ``respond`` (the container's
``/invocations`` through ``invocation``, which picks the route by the body's ``task``), so
a route is added here once. ``respond`` never raises: every failure becomes the error reply
of its ``QuantfnError`` (the one place errors map to a status and body; a bug becomes a 500
with a fixed body and the exception kept in ``Reply.unexpected`` for the caller's log).
Batch jobs run the same tasks and shape their records with the routes' own item shapes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import Any

from quantfn import inference
from quantfn.errors import BadRequest, MethodNotAllowed, QuantfnError, RouteNotFound, safe_reason
from quantfn.inference import Budget, Result
from quantfn.registry import Registry, get_registry
from quantfn.routing import RoutePlan
from quantfn.tasks import Forward, Request
from quantfn.wire import body, classify, cohere, openai, rerank

ROUTE_HEADER = "x-quantfn-route"
#: A served request's step times (``Result.timings_ms``) as the metrics they are emitted as.
TIMING_METRICS = {"model_load_ms": "ModelLoadMs", "tokenize_ms": "TokenizeMs", "inference_ms": "InferenceMs"}
TIMING_METRICS["endpoint_ms"] = "EndpointMs"


@dataclass(frozen=True)
class Route:
    """A POST route runs ``parse(body) -> request``, inference, ``reply(result, request)``; a GET route
    answers ``info(registry) -> (status, body)``."""

    method: str
    task: str = ""
    parse: Callable[[Any], Request] | None = None
    reply: Callable[[Result, Any], dict[str, Any]] | None = None
    info: Callable[[Registry], tuple[int, dict[str, Any]]] | None = None


def _models(registry: Registry) -> tuple[int, dict[str, Any]]:
    return 200, openai.models_response([registry.describe(model) for model in registry.models])


def _health(registry: Registry) -> tuple[int, dict[str, Any]]:
    models = [registry.describe(model) for model in registry.models]
    healthy = all(facts["status"] == "ok" for facts in models)
    return (200 if healthy else 503), {"status": "ok" if healthy else "degraded", "models": models}


@cache
def _openapi_document() -> dict[str, Any]:
    """The API's OpenAPI 3.1 description (package data beside the wire formats), read once, on first use."""
    import json
    from importlib.resources import files  # only GET /openapi.json needs it: ~20 ms off every cold start

    return json.loads(files("quantfn.wire").joinpath("openapi.json").read_text(encoding="utf-8"))


ROUTES: dict[str, Route] = {
    "/v1/embeddings": Route("POST", "embed", openai.parse_embeddings_request, openai.embeddings_response),
    "/v1/embed": Route(
        "POST", "embed", lambda b: cohere.parse_embed_request(b, 1), lambda r, q: cohere.embed_response(r, q, 1)
    ),
    "/v2/embed": Route(
        "POST", "embed", lambda b: cohere.parse_embed_request(b, 2), lambda r, q: cohere.embed_response(r, q, 2)
    ),
    "/v1/rerank": Route(
        "POST", "rerank", lambda b: rerank.parse_rerank_request(b, 1), lambda r, q: rerank.rerank_response(r, q, 1)
    ),
    "/v2/rerank": Route(
        "POST", "rerank", lambda b: rerank.parse_rerank_request(b, 2), lambda r, q: rerank.rerank_response(r, q, 2)
    ),
    "/v1/classify": Route("POST", "classify", classify.parse_classify_request, classify.classify_response),
    "/v1/models": Route("GET", info=_models),
    "/health": Route("GET", info=_health),
    "/openapi.json": Route("GET", info=lambda _registry: (200, _openapi_document())),
}
#: The route of each task where a call names the task instead of a path (the container's ``/invocations``).
TASK_ROUTES = {"embed": "/v1/embeddings", "rerank": "/v1/rerank", "classify": "/v1/classify"}


@dataclass
class Reply:
    """What a request got: status, JSON body, headers, and the facts a caller logs and meters."""

    status: int
    body: dict[str, Any]
    headers: dict[str, str] = field(default_factory=dict)
    task: str = ""
    result: Result | None = None
    error: QuantfnError | None = None
    unexpected: BaseException | None = None

    @property
    def route(self) -> RoutePlan | None:
        """The routing decision, when the request got as far as one (served or refused)."""
        if self.result is not None:
            return self.result.route
        plan = getattr(self.error, "route", None)
        return plan if isinstance(plan, RoutePlan) else None

    def measures(self) -> list[tuple[str, str, float]]:
        """The request's metrics as ``(name, unit, value)``: its route (one count per route: RoutedLocal,
        RoutedEndpoint, RoutedRefuse), its steps' times, tokens and inputs when served, its error class if not."""
        plan, result = self.route, self.result
        out = [(f"Routed{plan.route.title()}", "Count", 1.0)] if plan is not None else []
        if result is not None:
            out += [(TIMING_METRICS[name], "Milliseconds", value) for name, value in result.timings_ms.items()]
            out += [("InputTokens", "Count", result.tokens), ("Inputs", "Count", len(result.token_counts))]
        elif self.status >= 400:  # every error reply is counted, 404 and 405 included
            out.append((f"Errors{self.status // 100}xx", "Count", 1.0))
        return out

    def record(self) -> tuple[str, str, dict[str, Any]]:
        """The request's one log record as ``(level, message, fields)``: what was served or why not (a
        dependency's failure at ERROR, its reason without places), with the route and its numbers."""
        plan = self.route
        fields: dict[str, Any] = plan.log_fields() if plan is not None else {}
        if self.result is not None:
            served = {"task": self.task, "inputs": len(self.result.token_counts), **self.result.timings_ms}
            return "info", "served", served | fields
        if self.error is None:
            return "error", "unexpected error", fields
        error = self.error
        detail = error.message[:500] if error.status < 500 else safe_reason(error.message)
        refused = {"status": error.status, "code": error.code, "detail": detail}
        return ("info" if error.status < 500 else "error"), "request refused", refused | fields


def respond(
    method: str,
    path: str,
    raw: Callable[[], bytes],
    *,
    remaining_ms: float | None,
    allow_endpoint: bool = True,
    registry: Registry | None = None,
    forward: Forward | None = None,
) -> Reply:
    """The reply to ``method path`` with the body ``raw()`` returns (decoded here, so a body that cannot be
    read is an error reply too); never raises."""
    route = ROUTES.get(path)
    try:
        if route is None:
            raise RouteNotFound("No such route; see GET /v1/models and the README.")
        if method != route.method:
            error = MethodNotAllowed(f"{method[:16]} is not allowed on {path}; use {route.method}.")
            return _error(error, route.task, {"Allow": route.method})
        if route.info is not None:
            status, payload = route.info(registry or get_registry())
            return Reply(status, payload)
        data = raw()
        # No size limits here: the router applies them, so a 413 can say whether the GPU endpoint could take it.
        budget = Budget(remaining_ms, len(data), allow_endpoint)
        return _answer(route, body.load_json_body(data, None), budget, registry, forward)
    except QuantfnError as error:
        return _error(error, route.task if route else "")
    except Exception as exc:
        return Reply(500, QuantfnError("unexpected").to_body(), task=route.task if route else "", unexpected=exc)


def invocation(
    raw: bytes, *, remaining_ms: float | None, registry: Registry | None = None, forward: Forward | None = None
) -> Reply:
    """The container's ``POST /invocations``: any route's body, its ``task`` field (default ``embed``) naming
    the route; the endpoint route is never taken from here (this is the endpoint)."""
    try:
        data = body.load_json_body(raw, None)
        task = data.pop("task", "embed") if isinstance(data, dict) else "embed"
        if task not in TASK_ROUTES:
            raise BadRequest(f"'task' must be one of {', '.join(TASK_ROUTES)}.", param="task")
        budget = Budget(remaining_ms, len(raw), allow_endpoint=False)
        return _answer(ROUTES[TASK_ROUTES[task]], data, budget, registry, forward)
    except QuantfnError as error:
        return _error(error, "")
    except Exception as exc:
        return Reply(500, QuantfnError("unexpected").to_body(), unexpected=exc)


def _answer(route: Route, data: Any, budget: Budget, registry: Registry | None, forward: Forward | None) -> Reply:
    assert route.parse is not None and route.reply is not None
    try:
        request = route.parse(data)
        result = inference.run(request, budget, registry, forward)
    except QuantfnError as error:
        return _error(error, route.task)
    assert result.route is not None
    payload = route.reply(result, request)
    return Reply(200, payload, {ROUTE_HEADER: result.route.header}, route.task, result)


def _error(error: QuantfnError, task: str, headers: dict[str, str] | None = None) -> Reply:
    headers = dict(headers or {})
    plan = getattr(error, "route", None)
    if isinstance(plan, RoutePlan):
        headers[ROUTE_HEADER] = plan.header
    return Reply(error.status, error.to_body(), headers, task, error=error)
