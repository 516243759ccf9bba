"""A task: everything about one request that differs by task, in one class per task module.

``quantfn.inference.run`` names no task. It asks the request's task to check the request
against the model's manifest, to describe the request for routing (``shape``), to
tokenize and count it once (``encode``), and then to run it here (``run``) or on the GPU
endpoint (``on_endpoint``: the task's own call shape and reply check). Ranking a result
(documents by relevance, labels by score) is ``ranked``, the one rule both use. A new task
is a new module here (request, task, pipeline) plus its wire shape.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from quantfn.errors import UpstreamFailed
from quantfn.routing import Shape
from quantfn.tasks.base import Encoded, Pipeline, encode_with

if TYPE_CHECKING:
    from quantfn.config import Settings
    from quantfn.endpoint import EndpointClient, EndpointReply
    from quantfn.models.manifest import Manifest

Forward = Callable[[Pipeline, Encoded], np.ndarray]


@dataclass(frozen=True)
class Tokens:
    """A request tokenized once: what the model reads, and per input what the limits and ``usage`` count.

    ``counts``: tokens per input before truncation; ``readable``: tokens per input that are not special
    tokens (0: the text holds nothing the model can read).
    """

    encoded: Encoded
    counts: list[int]
    readable: list[int]

    @classmethod
    def of(cls, encoded: Encoded) -> Tokens:
        """One input per encoding (every task but cosine reranking)."""
        return cls(encoded, encoded.counts, encoded.content if encoded.content is not None else [1] * len(encoded.ids))


def ranked(scores: Sequence[float] | np.ndarray, limit: int | None = None) -> list[int]:
    """Indices of ``scores`` best first, ties by index, the first ``limit`` (all with None).

    The one ranking rule: rerank orders documents by relevance with it, classify labels by score.
    """
    values = np.asarray(scores, dtype=np.float64)
    order = np.lexsort((np.arange(len(values)), -values)).tolist()
    return order if limit is None else order[:limit]


class Task:
    """The request-level work of one task; stateless, one instance per task (``quantfn.tasks.TASKS``)."""

    #: The route's task name: ``embed``, ``rerank`` or ``classify``.
    name: ClassVar[str] = ""
    #: The manifest tasks of the models that can serve it (an embedding model can rerank, by cosine).
    serves: ClassVar[tuple[str, ...]] = ()
    #: The request field that holds the inputs (named in a refusal of one of them), unless the request says.
    field: ClassVar[str] = "input"

    def check(self, request: Any, manifest: Manifest) -> None:
        """Refuse (400) what this model cannot do for the request; nothing is tokenized yet."""

    def inputs_field(self, request: Any) -> str:
        """The name of the request field that holds the inputs, as the client sent it (a refusal names it)."""
        return self.field

    def texts(self, request: Any) -> Sequence[str]:
        """The inputs the limits count (texts, or documents to rerank)."""
        return request.texts

    def shape(self, request: Any, manifest: Manifest, payload_bytes: int, settings: Settings) -> Shape:
        """What routing needs before tokens: inputs, payload, the reply's size bound and what to do if it is over."""
        reply_bytes = self.reply_bytes(request, manifest)
        advice = (
            self.reply_advice(request, manifest, settings) if reply_bytes > settings.limits.max_response_bytes else ""
        )
        return Shape(len(self.texts(request)), payload_bytes, reply_bytes, manifest.max_sequence_length, advice)

    def reply_bytes(self, request: Any, manifest: Manifest) -> int:
        """An upper bound of the reply's bytes as Lambda returns it."""
        raise NotImplementedError

    def reply_advice(self, request: Any, manifest: Manifest, settings: Settings) -> str:
        """What the caller is told when the reply would be over QUANTFN_MAX_RESPONSE_BYTES."""
        return "Split the request."

    def encode(self, request: Any, manifest: Manifest, tokenizer: Any) -> Tokens:
        """The request tokenized once, untruncated, as the model will read it."""
        return Tokens.of(encode_with(tokenizer, list(self.texts(request))))

    def run(self, request: Any, pipeline: Pipeline, tokens: Tokens, ok: list[int], forward: Forward) -> np.ndarray:
        """The output for inputs ``ok`` (rows in that order), computed here."""
        encoded = tokens.encoded if len(ok) == len(tokens.counts) else tokens.encoded.subset(ok)
        return forward(pipeline, encoded)

    def endpoint_request(self, request: Any, manifest: Manifest) -> dict[str, Any]:
        """The body the GPU endpoint takes for this request, less ``model`` (the container's contract)."""
        raise NotImplementedError

    def endpoint_output(self, data: bytes, request: Any, manifest: Manifest) -> np.ndarray:
        """The endpoint's reply checked and read into ``run``'s output; UpstreamFailed if anything is off."""
        raise NotImplementedError

    def on_endpoint(self, request: Any, manifest: Manifest, client: EndpointClient, deadline_s: float) -> EndpointReply:
        """The same output from the GPU endpoint, which serves the model under its upstream name."""
        body = {"model": manifest.upstream or manifest.model_id, **self.endpoint_request(request, manifest)}
        return client.call(body, deadline_s, lambda data: self.endpoint_output(data, request, manifest))


def reply_list(data: bytes, key: str, what: str) -> list[Any]:
    """``key``'s list in an endpoint's JSON reply; UpstreamFailed when the reply is not that shape."""
    try:
        items = json.loads(data)[key]
        if not isinstance(items, list):
            raise TypeError(f"'{key}' is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise UpstreamFailed(f"GPU endpoint reply is not a {what} reply: {exc.__class__.__name__}") from exc
    return items


def reply_score(value: Any, where: str) -> float:
    """A finite number from an endpoint's reply; UpstreamFailed naming ``where`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UpstreamFailed(f"GPU endpoint returned a bad score at {where}")
    return float(value)
