"""The one inference entry point: ``run(request, budget) -> Result``, for every task and every trigger.

The API function, batch jobs and the GPU container all call ``run``. It resolves
the model (registry: 404/400 from the manifest alone), tokenizes with the
model's tokenizer (no session yet), plans the route from the real token counts,
the payload, the reply's size and the time left (``routing.plan``: the same
rules for every task), then runs the task here or on the GPU endpoint. Every
error raised after the plan carries it in ``error.route``.

A batch job passes ``Budget(per_input_errors=True)``: an input over the token
limit then becomes an entry of ``Result.errors`` instead of failing the request,
and ``Result.output`` has rows for ``Result.ok`` only.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from quantfn.errors import BadRequest, QuantfnError
from quantfn.models.manifest import Manifest
from quantfn.models.store import fetch_deadline
from quantfn.registry import Registry, ServedModel, get_registry
from quantfn.routing import (
    ENDPOINT,
    ENDPOINT_RESERVE_MS,
    REFUSE,
    RoutePlan,
    Work,
    embedding_advice,
    estimate_embedding_bytes,
    plan,
)
from quantfn.tasks import Encoded, Pipeline
from quantfn.tasks.base import encode_with
from quantfn.tasks.classify import ClassifyPipeline
from quantfn.tasks.embed import EmbedPipeline, apply_prompt
from quantfn.tasks.rerank import RerankPipeline, cosine_scores
from quantfn.tracing import subsegment

_RERANK_ITEM_BYTES = 64  # {"index": N, "relevance_score": 0.123456789}
_LABEL_ITEM_BYTES = 48  # {"label": "...", "score": 0.123456789} less the label


@dataclass(frozen=True)
class EmbedRequest:
    texts: list[str]
    model: str | None = None
    input_type: str | None = None  # "query" | "document": the manifest's prompt goes in front
    encoding_format: str = "float"
    dimensions: int | None = None
    task = "embed"


@dataclass(frozen=True)
class RerankRequest:
    query: str
    documents: list[str]
    model: str | None = None
    top_n: int | None = None
    return_documents: bool = False
    task = "rerank"


@dataclass(frozen=True)
class ClassifyRequest:
    texts: list[str]
    model: str | None = None
    top_k: int | None = None
    raw_scores: bool = False
    task = "classify"


Request = EmbedRequest | RerankRequest | ClassifyRequest


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


Forward = Callable[[Pipeline, Encoded], np.ndarray]


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
    if budget.remaining_ms is None:
        return _run(request, budget, registry, forward, started)
    # A model fetched on the way (S3 stalled or slow) must answer 503 while the caller still listens.
    margin_ms = registry.settings.limits.route_margin_ms
    with fetch_deadline(started + max(0.0, budget.remaining_ms - margin_ms) / 1000):
        return _run(request, budget, registry, forward, started)


def _run(request: Request, budget: Budget, registry: Registry, forward: Forward | None, started: float) -> Result:
    served = registry.resolve(request.model, request.task)
    manifest = registry.manifest(served)
    _check(request, manifest)
    cold = not served.loaded
    timings: dict[str, float] = {}
    encoded: list[Encoded] = []

    def token_counts() -> list[int]:
        tokenizer = registry.tokenizer(served)
        before = time.perf_counter()
        with subsegment("tokenize", task=request.task):
            encoded.append(_encode(tokenizer, request, manifest))
        timings["tokenize_ms"] = (time.perf_counter() - before) * 1000
        return _per_input_counts(request, manifest, encoded[0].counts)

    settings = registry.settings
    work = Work(
        inputs=_inputs(request),
        payload_bytes=budget.payload_bytes,
        response_bytes=_response_bytes(request, manifest),
        max_length=manifest.max_sequence_length,
        token_counts=token_counts,
        response_advice=_advice(request, manifest, settings),
    )
    remaining_ms = budget.remaining_ms
    if budget.per_input_errors:  # batch: each input is checked alone below; the runner keeps its own time
        settings, remaining_ms = _per_input_settings(settings), None
    route = plan(work, remaining_ms=remaining_ms, cold=cold, settings=settings)
    if route.route == ENDPOINT and not budget.allow_endpoint:
        route = RoutePlan(REFUSE, route.reason, route.inputs, route.tokens, limit=route.limit, message=route.message)
    try:
        if route.route == REFUSE:
            raise route.refusal()
        tokens = encoded[0] if encoded else _encode(registry.tokenizer(served), request, manifest)
        counts = _per_input_counts(request, manifest, tokens.counts)
        ok, errors = _screen(request, manifest, tokens, counts, registry.settings.limits.max_input_tokens, budget)
        if route.route == ENDPOINT:
            output = _on_endpoint(request, served, manifest, registry, budget, started, timings)
        else:
            pipeline = registry.pipeline(served)
            before = time.perf_counter()
            with subsegment("inference", task=request.task, model=served.name):
                output = _here(request, pipeline, tokens, ok, forward or _forward)
            timings["inference_ms"] = (time.perf_counter() - before) * 1000
            if cold:
                timings["model_load_ms"] = registry.load_ms(served)
        return Result(served.name, manifest, output, counts, ok, errors, timings, route)
    except QuantfnError as error:
        error.route = route
        raise


# -- the task-specific pieces, each small ------------------------------------------------------------------
def _check(request: Request, manifest: Manifest) -> None:
    if isinstance(request, EmbedRequest):
        if request.dimensions is not None and request.dimensions != manifest.dimensions:
            raise BadRequest(
                f"'dimensions' must be {manifest.dimensions} for model {manifest.model_id}; "
                "this model cannot shorten its embeddings.",
                param="dimensions",
            )
        apply_prompt(manifest.prompts, [], request.input_type, manifest.model_id)  # 400 for an undeclared type
    elif isinstance(request, ClassifyRequest) and request.top_k is not None and request.top_k > len(manifest.labels):
        raise BadRequest(
            f"'top_k' is {request.top_k}; model {manifest.model_id} has {len(manifest.labels)} labels.", param="top_k"
        )


def _inputs(request: Request) -> int:
    return len(request.documents) if isinstance(request, RerankRequest) else len(request.texts)


def _encode(tokenizer: Any, request: Request, manifest: Manifest) -> Encoded:
    """Untruncated encodings of what the model will read: prompted texts, pairs, or query then documents."""
    if isinstance(request, EmbedRequest):
        inputs: list[Any] = apply_prompt(manifest.prompts, request.texts, request.input_type, manifest.model_id)
    elif isinstance(request, RerankRequest) and manifest.task == "rerank":
        inputs = [(request.query, document) for document in request.documents]
    elif isinstance(request, RerankRequest):  # an embedding model reranks by cosine
        prompts = manifest.prompts
        inputs = apply_prompt(prompts, [request.query], "query" if "query" in prompts else None, "")
        inputs += apply_prompt(prompts, request.documents, "document" if "document" in prompts else None, "")
    else:
        inputs = list(request.texts)
    return encode_with(tokenizer, inputs)


def _per_input_counts(request: Request, manifest: Manifest, counts: list[int]) -> list[int]:
    """Tokens per input the limits apply to: for cosine reranking, the query's tokens join each document's."""
    if isinstance(request, RerankRequest) and manifest.task == "embed":
        return [counts[0] + count for count in counts[1:]]
    return counts


def _screen(
    request: Request, manifest: Manifest, tokens: Encoded, counts: list[int], limit: int, budget: Budget
) -> tuple[list[int], dict[int, tuple[str, str]]]:
    """Indices that go on, and (batch only) those set aside: over the token limit, or nothing to read.

    An input that tokenizes to special tokens alone (a zero-width space, NULs, control characters) would get
    an embedding of no text: the API refuses it with a 400 naming the input, a batch job records an error.
    """
    content = tokens.content or [1] * len(tokens.ids)
    if isinstance(request, RerankRequest) and manifest.task == "embed":
        content = [min(content[0], c) for c in content[1:]]
    errors: dict[int, tuple[str, str]] = {}
    for i, (count, readable) in enumerate(zip(counts, content, strict=True)):
        if readable == 0:
            errors[i] = ("empty_text", "the text has nothing the model can read (only spaces or control characters)")
        elif budget.per_input_errors and count > limit:
            errors[i] = ("text_too_long", f"{count} tokens, limit {limit} (QUANTFN_MAX_INPUT_TOKENS)")
    if errors and not budget.per_input_errors:
        index, (code, message) = next(iter(errors.items()))
        field_name = "documents" if isinstance(request, RerankRequest) else "input"
        raise BadRequest(f"'{field_name}[{index}]': {message}.", param=f"{field_name}[{index}]", code=code)
    return [i for i in range(len(counts)) if i not in errors], errors


def _per_input_settings(settings: Any) -> Any:
    """Settings for a batch call: the per-input token limit is applied per input, not to the whole call.

    A chunk writes its output to S3, not into a reply, and the runner checkpoints before its time runs out:
    neither the reply's size nor the API's time limits apply (refusing a chunk would fail it on every retry).
    """
    from dataclasses import replace

    big = 1 << 40
    limits = replace(
        settings.limits,
        max_inputs=big,
        max_input_tokens=big,
        max_total_tokens=big,
        max_body_bytes=big,
        max_response_bytes=big,
        api_timeout_ms=big,
        route_margin_ms=0,
    )
    return replace(settings, limits=limits)


def _response_bytes(request: Request, manifest: Manifest) -> int:
    if isinstance(request, EmbedRequest):
        return estimate_embedding_bytes(len(request.texts), manifest.dimensions, request.encoding_format)
    if isinstance(request, RerankRequest):
        shown = len(request.documents) if request.top_n is None else min(request.top_n, len(request.documents))
        texts = sum(len(d.encode("utf-8")) * 2 for d in request.documents) if request.return_documents else 0
        return 4096 + shown * _RERANK_ITEM_BYTES + texts
    labels = manifest.labels[: request.top_k] if request.top_k else manifest.labels
    per_input = sum(len(label.encode("utf-8")) * 2 + _LABEL_ITEM_BYTES for label in labels) + 64
    return 4096 + len(request.texts) * per_input


def _advice(request: Request, manifest: Manifest, settings: Any) -> Callable[[], str]:
    if isinstance(request, EmbedRequest):
        return lambda: embedding_advice(len(request.texts), manifest.dimensions, request.encoding_format, settings)
    if isinstance(request, RerankRequest):
        return lambda: "Ask for fewer documents back (top_n, return_documents=false) or split the documents."
    return lambda: "Ask for fewer labels (top_k) or split the request."


def _forward(pipeline: Pipeline, encoded: Encoded) -> np.ndarray:
    return pipeline.forward(encoded)


def _here(request: Request, pipeline: Pipeline, tokens: Encoded, ok: list[int], forward: Forward) -> np.ndarray:
    if isinstance(request, RerankRequest) and not isinstance(pipeline, RerankPipeline):
        assert isinstance(pipeline, EmbedPipeline)
        vectors = forward(pipeline, tokens)
        return cosine_scores(pipeline, vectors[0], vectors[1:])[ok]
    output = forward(pipeline, tokens if len(ok) == len(tokens.ids) else tokens.subset(ok))
    if isinstance(pipeline, ClassifyPipeline):
        return pipeline.scores(output, request.raw_scores)
    return output


def _on_endpoint(
    request: Request,
    served: ServedModel,
    manifest: Manifest,
    registry: Registry,
    budget: Budget,
    started: float,
    timings: dict[str, float],
) -> np.ndarray:
    """The same answer from the GPU endpoint, which serves the model under its upstream name."""
    settings = registry.settings
    remaining = budget.remaining_ms if budget.remaining_ms is not None else 1e12
    deadline = started + (min(settings.limits.api_timeout_ms, remaining) - ENDPOINT_RESERVE_MS) / 1000
    client = endpoint_client(registry)
    name = manifest.upstream or manifest.model_id  # the name every container serving this model answers to
    if isinstance(request, EmbedRequest):
        texts = apply_prompt(manifest.prompts, request.texts, request.input_type, manifest.model_id)
        reply = client.embed(
            texts, name, dimensions=manifest.dimensions, normalized=manifest.normalize, deadline_s=deadline
        )
    elif isinstance(request, RerankRequest):
        reply = client.rerank(request.query, request.documents, name, deadline_s=deadline)
    else:
        reply = client.classify(request.texts, name, manifest.labels, request.raw_scores, deadline_s=deadline)
    timings["endpoint_ms"] = reply.elapsed_ms
    return reply.output


def endpoint_client(registry: Registry) -> Any:
    """The GPU endpoint client, one per registry (its circuit breaker lives as long as the environment)."""
    if registry.endpoint is None:
        from quantfn.endpoint import EndpointClient

        registry.endpoint = EndpointClient(registry.settings)
    return registry.endpoint
