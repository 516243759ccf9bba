"""Decide, before any inference, where a request runs: here, on the GPU endpoint, or nowhere.

A Lambda function has hard walls: the 6 MB it can return, the 29 s API Gateway
waits, the vCPUs its memory buys. Routing looks at what a request asks, whatever
its task (a ``Shape``: inputs, payload bytes, the size of the answer; then the
tokens the task counted with the model's tokenizer, the predicted inference time
against the time left) and returns one frozen ``RoutePlan``: the route, the reason
and the numbers behind it. The same record is logged, metered and sent to the
caller as the ``x-quantfn-route`` header. Pure: no I/O, no inference, no task.

Two steps, so that a request decided by its sizes is never tokenized:
``by_size`` (``response_too_large``, ``body_too_large``, ``too_many_inputs``),
then ``by_tokens`` (``input_too_long``, ``too_many_tokens``, ``estimated_time``,
``within_limits``). A local limit goes to the endpoint when one is configured and
within its own limits; a refusal's message says which limit and what to do.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from quantfn.config import Settings
from quantfn.errors import TooLarge

LOCAL, ENDPOINT, REFUSE = "local", "endpoint", "refuse"
ENDPOINT_RESERVE_MS = 1000  # a call to the endpoint ends this long before the function's time does
_NOT_CONFIGURED = "no GPU endpoint is configured (QUANTFN_ENDPOINT_NAME or QUANTFN_ENDPOINT_URL) to take it"


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

    def refused(self, why: str) -> RoutePlan:
        """This plan as a refusal: the limit it broke, and ``why`` it cannot go where it was routed."""
        message = f"The request is over this function's limit {self.limit}, and {why}. Split the request."
        return replace(self, route=REFUSE, message=message)

    def refusal(self) -> TooLarge:
        """The 413 for a refused plan; the message names the limit and what to do."""
        error = TooLarge(self.message, param="input", code=self.reason)
        error.route = self
        return error


# The fields ``log_fields`` writes besides ``route`` (every request logs them: read once, not per call)
_LOGGED = tuple(f.name for f in fields(RoutePlan) if f.name not in ("route", "message"))


@dataclass(frozen=True)
class Shape:
    """What one request asks of the function before a token is read, in the same terms for every task.

    ``inputs``: texts (or documents to rerank); ``reply_bytes``: an upper bound of the answer as Lambda returns
    it; ``reply_advice``: what the caller is told when that answer is over QUANTFN_MAX_RESPONSE_BYTES;
    ``max_length``: the model's tokens per input (longer inputs are truncated and cost no more).
    """

    inputs: int
    payload_bytes: int
    reply_bytes: int
    max_length: int
    reply_advice: str = "Split the request."


def cpu_speed(settings: Settings) -> float:
    """This function's speed relative to the one vCPU the cost model was measured on.

    Below one vCPU (under 1,769 MB) its single thread runs at the share's speed;
    above, each extra thread adds ``cost_parallel_efficiency`` of a vCPU.
    """
    runtime = settings.runtime
    share = max(runtime.vcpu_share, 0.05)
    extra = min(runtime.threads, share) - 1
    return share if share < 1 else 1 + settings.limits.cost_parallel_efficiency * extra


def estimate_local_ms(token_counts: Sequence[int], max_length: int, settings: Settings, cold: bool) -> float:
    """Predicted tokenize-and-run time here: tokens after truncation, a per-input overhead, the load if cold."""
    limits = settings.limits
    tokens = sum(min(count, max_length) for count in token_counts)
    work = tokens * limits.cost_ms_per_token + len(token_counts) * limits.cost_ms_per_input
    return work / cpu_speed(settings) + (limits.cost_load_ms if cold else 0)


def by_size(shape: Shape, settings: Settings) -> RoutePlan | None:
    """The plan when the request's sizes alone decide it (no token is read), else None."""
    limits = settings.limits
    facts = {"inputs": shape.inputs, "payload_bytes": shape.payload_bytes, "response_bytes": shape.reply_bytes}
    if shape.reply_bytes > limits.max_response_bytes:
        return RoutePlan(
            REFUSE,
            "response_too_large",
            **facts,
            limit="QUANTFN_MAX_RESPONSE_BYTES",
            message=f"The answer would be about {shape.reply_bytes / 2**20:.1f} MB, over the "
            f"{limits.max_response_bytes} bytes a Lambda function can return (QUANTFN_MAX_RESPONSE_BYTES). "
            f"{shape.reply_advice}",
        )
    if shape.payload_bytes > limits.max_body_bytes:
        what = f"The request body has {shape.payload_bytes} bytes; the limit here is {limits.max_body_bytes}"
        return _over_local_limit("body_too_large", "QUANTFN_MAX_BODY_BYTES", what, facts, settings, None)
    if shape.inputs > limits.max_inputs:
        what = f"'input' has {shape.inputs} items; the limit here is {limits.max_inputs} per request"
        return _over_local_limit("too_many_inputs", "QUANTFN_MAX_INPUTS", what, facts, settings, None)
    return None


def by_tokens(
    shape: Shape, counts: Sequence[int], *, remaining_ms: float | None, cold: bool, settings: Settings
) -> RoutePlan:
    """The plan from the tokens per input (``counts``, before truncation) and the time left.

    ``remaining_ms`` is the function's remaining time (``None`` outside Lambda: the API timeout alone bounds it).
    """
    limits = settings.limits
    facts = {"inputs": shape.inputs, "payload_bytes": shape.payload_bytes, "response_bytes": shape.reply_bytes}
    facts["tokens"] = total = sum(counts)
    longest = max(counts, default=0)
    if longest > limits.max_input_tokens:
        what = (
            f"'input[{list(counts).index(longest)}]' has {longest} tokens; the limit here is "
            f"{limits.max_input_tokens} per input"
        )
        return _over_local_limit("input_too_long", "QUANTFN_MAX_INPUT_TOKENS", what, facts, settings, total)
    if total > limits.max_total_tokens:
        what = f"The request has {total} tokens in all; the limit here is {limits.max_total_tokens}"
        return _over_local_limit("too_many_tokens", "QUANTFN_MAX_TOTAL_TOKENS", what, facts, settings, total)
    estimated = estimate_local_ms(counts, shape.max_length, settings, cold)
    budget = min(limits.api_timeout_ms, remaining_ms if remaining_ms is not None else math.inf)
    budget -= limits.route_margin_ms
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


def plan(
    shape: Shape, counts: Sequence[int], *, remaining_ms: float | None, cold: bool, settings: Settings
) -> RoutePlan:
    """``by_size``, else ``by_tokens``: the whole decision for a request whose tokens are already counted."""
    return by_size(shape, settings) or by_tokens(shape, counts, remaining_ms=remaining_ms, cold=cold, settings=settings)


def _over_local_limit(
    reason: str, limit: str, what: str, facts: dict[str, int], settings: Settings, tokens: int | None
) -> RoutePlan:
    """A local limit is broken (``what`` says how): to the endpoint if it is configured and can take the request."""
    what = f"{what} ({limit})"
    if not settings.endpoint.configured:
        return RoutePlan(
            REFUSE, reason, **facts, limit=limit, message=f"{what}, and {_NOT_CONFIGURED}. Split the request."
        )
    over = _endpoint_limit(facts, settings, tokens)
    if over:
        endpoint_limit, endpoint_what = over
        message = f"{what}, and {endpoint_what} on the GPU endpoint. Split the request."
        return RoutePlan(REFUSE, reason, **facts, limit=endpoint_limit, message=message)
    return RoutePlan(ENDPOINT, reason, **facts, limit=limit)


def _endpoint_limit(facts: dict[str, int], settings: Settings, tokens: int | None) -> tuple[str, str] | None:
    """The endpoint's own limit the request breaks, as (setting, text), or None."""
    endpoint = settings.endpoint
    if facts["payload_bytes"] > endpoint.max_body_bytes:
        return "QUANTFN_ENDPOINT_MAX_BODY_BYTES", f"{endpoint.max_body_bytes} bytes is the most"
    if facts["inputs"] > endpoint.max_inputs:
        return "QUANTFN_ENDPOINT_MAX_INPUTS", f"{endpoint.max_inputs} inputs is the most"
    if tokens is not None and tokens > endpoint.max_total_tokens:
        return "QUANTFN_ENDPOINT_MAX_TOTAL_TOKENS", f"{endpoint.max_total_tokens} tokens is the most"
    return None
