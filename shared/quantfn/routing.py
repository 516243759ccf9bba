"""Decide, before any inference, where a request runs: here, on the GPU endpoint, or nowhere.

A Lambda function has hard walls: the 6 MB it can return, the 29 s API Gateway
waits, the vCPUs its memory buys. ``plan`` looks at what a request needs, whatever
its task (a ``Work``: inputs, tokens from the real tokenizer, payload bytes, the
size of the answer, the predicted inference time against the time left) and
returns one frozen ``RoutePlan``: the route, the reason and the numbers behind it. The same record
is logged, metered and sent to the caller as the ``x-quantfn-route`` header.

Reasons, in the order they are checked:

* ``response_too_large``: the answer cannot be returned by any route (refuse; the
  message says what would fit, e.g. ``encoding_format=base64``, or how to split);
* ``body_too_large``, ``too_many_inputs``, ``input_too_long``, ``too_many_tokens``:
  a local limit; the endpoint takes it when configured and within its own limits;
* ``estimated_time``: the cost model predicts local inference would not finish in time;
* ``within_limits``: runs here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields

from quantfn.config import Settings
from quantfn.errors import TooLarge

LOCAL, ENDPOINT, REFUSE = "local", "endpoint", "refuse"
ENDPOINT_RESERVE_MS = 1000  # a call to the endpoint ends this long before the function's time does
_NOT_CONFIGURED = "no GPU endpoint is configured (QUANTFN_ENDPOINT_NAME or QUANTFN_ENDPOINT_URL) to take it"
# Upper bounds for the JSON the function returns, escaped once more inside Lambda's proxy reply:
# quantfn.serialize writes a float32 in its shortest form, at most 14 characters ("-1.2345678e-05"), plus ",".
_FLOAT_CHARS = 15
_ITEM_OVERHEAD = 96  # {"object": "embedding", "index": N, "embedding": ...}, with its quotes escaped
_ENVELOPE = 4096  # status, headers, "model", "usage"


@dataclass(frozen=True)
class RoutePlan:
    """Where a request runs and why; every number the decision used."""

    route: str
    reason: str
    inputs: int
    tokens: int = 0
    payload_bytes: int = 0
    response_bytes: int = 0
    estimated_ms: float = 0.0
    budget_ms: float = 0.0
    limit: str = ""  # the setting that decided, e.g. QUANTFN_MAX_INPUTS
    message: str = ""  # for a refusal: what the caller is told

    @property
    def header(self) -> str:
        """The ``x-quantfn-route`` header value, e.g. ``endpoint; reason=estimated_time``."""
        return f"{self.route}; reason={self.reason}"

    def log_fields(self) -> dict[str, object]:
        """The record as flat log keys (``route``, ``route_reason``, ``route_tokens`` ...); no message text."""
        return {"route": self.route, **{f"route_{key}": getattr(self, key) for key in _LOGGED}}

    def refusal(self) -> TooLarge:
        """The 413 for a refused plan; the message names the limit and what to do."""
        error = TooLarge(self.message, param="input", code=self.reason)
        error.route = self
        return error


# The fields ``log_fields`` writes besides ``route`` (every request logs them: read once, not per call)
_LOGGED = tuple(f.name for f in fields(RoutePlan) if f.name not in ("route", "message"))


def estimate_embedding_bytes(inputs: int, dimensions: int, encoding_format: str) -> int:
    """An upper bound of the bytes Lambda returns for ``inputs`` embeddings of ``dimensions``."""
    base64_chars = 4 * math.ceil(4 * dimensions / 3) + 4
    per_item = base64_chars if encoding_format == "base64" else dimensions * _FLOAT_CHARS
    return _ENVELOPE + inputs * (per_item + _ITEM_OVERHEAD)


@dataclass(frozen=True)
class Work:
    """What one request asks of the function, in the terms routing needs; the same for every task.

    ``inputs``: texts (or documents to rerank); ``token_counts`` is called at most once, only when the plan
    needs tokens; ``response_bytes``: an upper bound of the reply; ``response_advice``: what the caller is told
    when that reply is over ``QUANTFN_MAX_RESPONSE_BYTES``.
    """

    inputs: int
    payload_bytes: int
    response_bytes: int
    max_length: int
    token_counts: Callable[[], Sequence[int]]
    response_advice: Callable[[], str] = lambda: "Split the request."


def cpu_speed(settings: Settings) -> float:
    """This function's speed relative to the one vCPU the cost model was measured on.

    Below one vCPU (under 1,769 MB) its single thread runs at the share's speed;
    above, each extra thread adds ``cost_parallel_efficiency`` of a vCPU.
    """
    share = max(settings.runtime.vcpu_share, 0.05)
    return (
        share
        if share < 1
        else 1 + settings.limits.cost_parallel_efficiency * (min(settings.runtime.threads, share) - 1)
    )


def estimate_local_ms(token_counts: Sequence[int], max_length: int, settings: Settings, cold: bool) -> float:
    """Predicted tokenize-and-run time here: tokens after truncation, a per-input overhead, the load if cold."""
    tokens = sum(min(count, max_length) for count in token_counts)
    work = tokens * settings.limits.cost_ms_per_token + len(token_counts) * settings.limits.cost_ms_per_input
    return work / cpu_speed(settings) + (settings.limits.cost_load_ms if cold else 0)


def plan(work: Work, *, remaining_ms: float | None, cold: bool, settings: Settings) -> RoutePlan:
    """The plan for one request. Pure: no I/O, no inference.

    ``remaining_ms`` is the function's remaining time (``None`` outside Lambda: the API
    timeout alone bounds the budget).
    """
    inputs, payload_bytes, response, token_counts = (
        work.inputs,
        work.payload_bytes,
        work.response_bytes,
        work.token_counts,
    )
    max_length = work.max_length
    facts = {"inputs": inputs, "payload_bytes": payload_bytes, "response_bytes": response}
    if response > settings.limits.max_response_bytes:
        return RoutePlan(
            REFUSE,
            "response_too_large",
            **facts,
            limit="QUANTFN_MAX_RESPONSE_BYTES",
            message=f"The answer would be about {response / 2**20:.1f} MB, over the "
            f"{settings.limits.max_response_bytes} bytes a Lambda function can return "
            f"(QUANTFN_MAX_RESPONSE_BYTES). {work.response_advice()}",
        )
    if payload_bytes > settings.limits.max_body_bytes:
        return _over_local_limit(
            "body_too_large",
            "QUANTFN_MAX_BODY_BYTES",
            f"The request body has {payload_bytes} bytes; the limit here is {settings.limits.max_body_bytes} "
            "(QUANTFN_MAX_BODY_BYTES)",
            facts,
            settings,
            token_counts=None,
        )
    if inputs > settings.limits.max_inputs:
        return _over_local_limit(
            "too_many_inputs",
            "QUANTFN_MAX_INPUTS",
            f"'input' has {inputs} items; the limit here is {settings.limits.max_inputs} per request "
            "(QUANTFN_MAX_INPUTS)",
            facts,
            settings,
            token_counts=None,
        )
    counts = list(token_counts())
    facts["tokens"] = total = sum(counts)
    longest = max(counts, default=0)
    if longest > settings.limits.max_input_tokens:
        index = counts.index(longest)
        return _over_local_limit(
            "input_too_long",
            "QUANTFN_MAX_INPUT_TOKENS",
            f"'input[{index}]' has {longest} tokens; the limit here is {settings.limits.max_input_tokens} per input "
            "(QUANTFN_MAX_INPUT_TOKENS)",
            facts,
            settings,
            token_counts=counts,
        )
    if total > settings.limits.max_total_tokens:
        return _over_local_limit(
            "too_many_tokens",
            "QUANTFN_MAX_TOTAL_TOKENS",
            f"The request has {total} tokens in all; the limit here is {settings.limits.max_total_tokens} "
            "(QUANTFN_MAX_TOTAL_TOKENS)",
            facts,
            settings,
            token_counts=counts,
        )
    estimated = estimate_local_ms(counts, max_length, settings, cold)
    budget = min(settings.limits.api_timeout_ms, remaining_ms if remaining_ms is not None else math.inf)
    budget -= settings.limits.route_margin_ms
    timing = {**facts, "estimated_ms": round(estimated, 1), "budget_ms": round(budget, 1)}
    if estimated <= budget:
        return RoutePlan(LOCAL, "within_limits", **timing)
    if settings.endpoint.configured:
        return RoutePlan(ENDPOINT, "estimated_time", **timing, limit="QUANTFN_COST_MS_PER_TOKEN")
    return RoutePlan(
        REFUSE,
        "estimated_time",
        **timing,
        limit="QUANTFN_COST_MS_PER_TOKEN",
        message=f"The request has {total} tokens; this function would need about {estimated / 1000:.1f} s to run "
        f"them and has about {max(budget, 0) / 1000:.1f} s to answer in, and {_NOT_CONFIGURED}. "
        "Split the request into smaller ones.",
    )


def _over_local_limit(
    reason: str, limit: str, what: str, facts: dict[str, int], settings: Settings, token_counts: list[int] | None
) -> RoutePlan:
    """A local limit is broken: route to the endpoint if it is configured and can take the request."""
    if not settings.endpoint.configured:
        return RoutePlan(
            REFUSE, reason, **facts, limit=limit, message=f"{what}, and {_NOT_CONFIGURED}. Split the request."
        )
    over = _endpoint_limit(facts, settings, token_counts)
    if over:
        endpoint_limit, endpoint_what = over
        return RoutePlan(
            REFUSE,
            reason,
            **facts,
            limit=endpoint_limit,
            message=f"{what}, and {endpoint_what} on the GPU endpoint. Split the request.",
        )
    return RoutePlan(ENDPOINT, reason, **facts, limit=limit)


def _endpoint_limit(
    facts: dict[str, int], settings: Settings, token_counts: list[int] | None
) -> tuple[str, str] | None:
    """The endpoint's own limit the request breaks, as (setting, text), or None."""
    if facts["payload_bytes"] > settings.endpoint.max_body_bytes:
        return "QUANTFN_ENDPOINT_MAX_BODY_BYTES", f"{settings.endpoint.max_body_bytes} bytes is the most"
    if facts["inputs"] > settings.endpoint.max_inputs:
        return "QUANTFN_ENDPOINT_MAX_INPUTS", f"{settings.endpoint.max_inputs} inputs is the most"
    if token_counts is not None and sum(token_counts) > settings.endpoint.max_total_tokens:
        return "QUANTFN_ENDPOINT_MAX_TOTAL_TOKENS", f"{settings.endpoint.max_total_tokens} tokens is the most"
    return None


def embedding_advice(inputs: int, dimensions: int, encoding_format: str, settings: Settings) -> str:
    """What to do when ``inputs`` embeddings would not fit the reply: base64 if it would fit, else how to split."""
    limit = settings.limits.max_response_bytes
    per_item = estimate_embedding_bytes(1, dimensions, encoding_format) - _ENVELOPE
    fits = max(1, (limit - _ENVELOPE) // per_item)
    if encoding_format != "base64":
        as_base64 = estimate_embedding_bytes(inputs, dimensions, "base64")
        if as_base64 <= limit:
            return (
                f"Ask for encoding_format=base64 (about {as_base64 / 2**20:.1f} MB) "
                f"or split the request into parts of at most {fits} inputs."
            )
    return f"Split the request into parts of at most {fits} inputs."
