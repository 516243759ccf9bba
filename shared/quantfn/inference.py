"""The one inference entry point: ``run(request, budget) -> Result``, for every task and every trigger.

The API function, batch jobs and the GPU container all call ``run``. It resolves the
model (registry: 404/400 from the manifest alone), asks the request's task
(``quantfn.tasks``) for what differs by task, asks routing for the plan, and runs
here or on the GPU endpoint. Data flows one way: sizes decide first
(``routing.by_size``); only a request they do not decide is tokenized, once, with
the model's tokenizer alone (an S3 model's ``tokenizer.json``, not its weights);
the session is loaded only for a request that runs here. Every error raised after
the plan carries it in ``error.route``.

A batch job passes ``Budget(per_input_errors=True)``: its limits are per input (an
input over the token limit becomes an entry of ``Result.errors`` instead of failing
the request), and ``Result.output`` has rows for ``Result.ok`` only.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from quantfn import routing
from quantfn.errors import BadRequest, QuantfnError
from quantfn.models.manifest import Manifest
from quantfn.models.store import fetch_deadline
from quantfn.registry import Registry, get_registry
from quantfn.routing import RoutePlan
from quantfn.tasks import TASKS, Encoded, Forward, Pipeline, Request, Tokens
from quantfn.tracing import subsegment


@dataclass(frozen=True)
class Budget:
    """What bounds one call: the caller's time left, the request's size, and where it may run."""

    remaining_ms: float | None = None
    payload_bytes: int = 0
    allow_endpoint: bool = True
    per_input_errors: bool = False


@dataclass
class Result:
    """``output``: embeddings [n, d], rerank scores [n] (document order) or label scores [n, labels].

    Rows are for the inputs in ``ok`` (all of them, unless ``per_input_errors`` set some aside in ``errors``).
    ``token_counts``: tokens per input before truncation (what ``usage`` reports).
    """

    model: str
    manifest: Manifest
    output: np.ndarray
    token_counts: list[int]
    ok: list[int]
    errors: dict[int, tuple[str, str]] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)
    route: RoutePlan | None = None

    @property
    def tokens(self) -> int:
        return sum(self.token_counts)


def run(
    request: Request, budget: Budget | None = None, registry: Registry | None = None, forward: Forward | None = None
) -> Result:
    """Run ``request`` within ``budget``; raises QuantfnError subclasses (see the module docstring).

    ``forward`` runs a pipeline on encodings (default ``pipeline.forward``); the GPU container passes one that
    micro-batches concurrent requests.
    """
    budget = budget or Budget()
    registry = registry or get_registry()
    started = time.monotonic()
    deadline_s = None
    if budget.remaining_ms is not None:
        # A model fetched on the way (S3 stalled or slow) must answer 503 while the caller still listens.
        deadline_s = started + max(0.0, budget.remaining_ms - registry.settings.limits.route_margin_ms) / 1000
    with fetch_deadline(deadline_s):  # and an S3 model's manifest and tokenizer are read once in this request
        return _run(request, budget, registry, forward or _forward, started)


def _run(request: Request, budget: Budget, registry: Registry, forward: Forward, started: float) -> Result:
    task = TASKS[request.task]
    served = registry.resolve(request.model, task)
    manifest = registry.manifest(served)
    task.check(request, manifest)
    settings = registry.settings
    cold = not served.loaded
    timings: dict[str, float] = {}
    shape = task.shape(request, manifest, budget.payload_bytes, settings)
    if budget.per_input_errors:  # a batch chunk writes to S3 and its runner keeps its own time: per-input limits
        route: RoutePlan | None = RoutePlan(routing.LOCAL, "per_input_limits", shape.inputs)
    else:
        route = _allowed(routing.by_size(shape, settings), budget)
    tokens: Tokens | None = None
    if route is None or route.route != routing.REFUSE:
        before = time.perf_counter()
        tokenizer = registry.tokenizer(served)
        with subsegment("tokenize", task=task.name):
            tokens = task.encode(request, manifest, tokenizer)
        timings["tokenize_ms"] = (time.perf_counter() - before) * 1000
    if route is None:
        assert tokens is not None
        by_tokens = routing.by_tokens(
            shape, tokens.counts, remaining_ms=budget.remaining_ms, cold=cold, settings=settings
        )
        route = _allowed(by_tokens, budget)
    assert route is not None
    try:
        if route.route == routing.REFUSE:
            raise route.refusal()
        assert tokens is not None
        field = task.inputs_field(request)
        ok, errors = _screen(field, tokens, settings.limits.max_input_tokens, budget.per_input_errors)
        if route.route == routing.ENDPOINT:
            deadline = _endpoint_deadline(budget, settings.limits.api_timeout_ms, started)
            reply = task.on_endpoint(request, manifest, registry.endpoint_client(), deadline)
            output, timings["endpoint_ms"] = reply.output, reply.elapsed_ms
        else:
            pipeline = registry.pipeline(served)
            before = time.perf_counter()
            with subsegment("inference", task=task.name, model=served.name):
                output = task.run(request, pipeline, tokens, ok, forward)
            timings["inference_ms"] = (time.perf_counter() - before) * 1000
            if cold:
                timings["model_load_ms"] = registry.load_ms(served)
        return Result(served.name, manifest, output, tokens.counts, ok, errors, timings, route)
    except QuantfnError as error:
        error.route = route
        raise


def _allowed(route: RoutePlan | None, budget: Budget) -> RoutePlan | None:
    """``route``, refused where it names the endpoint and this caller may not use it (the GPU container)."""
    if route is not None and route.route == routing.ENDPOINT and not budget.allow_endpoint:
        return route.refused("the GPU endpoint does not take requests from here")
    return route


def _screen(field: str, tokens: Tokens, limit: int, per_input: bool) -> tuple[list[int], dict[int, tuple[str, str]]]:
    """Indices that go on, and (batch only) those set aside: over the token limit, or nothing to read.

    An input that tokenizes to special tokens alone (a zero-width space, NULs, control characters) would get
    an output of no text: the API refuses it with a 400 naming the input, a batch job records an error.
    """
    errors: dict[int, tuple[str, str]] = {}
    for i, (count, readable) in enumerate(zip(tokens.counts, tokens.readable, strict=True)):
        if readable == 0:
            errors[i] = ("empty_text", "the text has nothing the model can read (only spaces or control characters)")
        elif per_input and count > limit:
            errors[i] = ("text_too_long", f"{count} tokens, limit {limit} (QUANTFN_MAX_INPUT_TOKENS)")
    if errors and not per_input:
        index, (code, message) = next(iter(errors.items()))
        where = f"{field}[{index}]"
        raise BadRequest(f"'{where}': {message}.", param=where, code=code)
    if not errors:
        return list(range(len(tokens.counts))), errors
    return [i for i in range(len(tokens.counts)) if i not in errors], errors


def _endpoint_deadline(budget: Budget, api_timeout_ms: int, started: float) -> float:
    """When an endpoint call must end (time.monotonic): before the caller's time or API Gateway's runs out."""
    remaining = budget.remaining_ms if budget.remaining_ms is not None else 1e12
    return started + (min(api_timeout_ms, remaining) - routing.ENDPOINT_RESERVE_MS) / 1000


def _forward(pipeline: Pipeline, encoded: Encoded) -> np.ndarray:
    return pipeline.forward(encoded)
