"""The embed API in Cohere's shape: ``/v1/embed`` for ``cohere.Client.embed``, ``/v2/embed`` for ``ClientV2.embed``.

Request: ``{model, texts, input_type?, embedding_types?, truncate?}``; v2 also ``output_dimension``,
``max_tokens`` and ``priority`` (accepted, not used: one function has no queue to order). ``images``
and ``inputs`` are refused: quantfn serves text models. Reply: ``{id, embeddings, texts, meta,
response_type}``; ``embeddings`` is ``{float?, int8?, uint8?, binary?, ubinary?, base64?}`` by type,
except a v1 request without ``embedding_types``, which gets Cohere's v1 ``embeddings_floats`` shape
(a list of float lists). What each type holds is ``quantfn.tasks.embed``'s to say.
"""

from __future__ import annotations

import uuid
from typing import Any

from quantfn.errors import BadRequest, echo
from quantfn.inference import Result
from quantfn.tasks import EmbedRequest
from quantfn.tasks.embed import COHERE_INPUT_TYPES, EMBEDDING_TYPES, TRUNCATE, typed_embeddings
from quantfn.wire.fields import optional_choice, optional_model, optional_positive_int, parse_texts, require_object

_V1_FIELDS = {"model", "texts", "images", "input_type", "embedding_types", "truncate"}
_V2_FIELDS = _V1_FIELDS | {"inputs", "output_dimension", "max_tokens", "priority"}
INPUT_TYPES = tuple(COHERE_INPUT_TYPES)


def parse_embed_request(body: Any, version: int) -> EmbedRequest:
    """Validate a decoded body of ``/v{version}/embed``; raises BadRequest naming the field."""
    body = require_object(body, _V1_FIELDS if version == 1 else _V2_FIELDS)
    model = optional_model(body, required=version == 2)
    for name in ("images", "inputs"):
        if body.get(name) is not None:
            raise BadRequest(f"'{name}' is not supported: quantfn serves text models; send 'texts'.", param=name)
    if isinstance(body.get("texts"), str):
        raise BadRequest("'texts' must be an array of strings.", param="texts")
    texts = parse_texts(body.get("texts"), "texts" in body, "texts")
    input_type = optional_choice(body, "input_type", INPUT_TYPES)
    types = _embedding_types(body.get("embedding_types"))
    if version == 2 and not types:
        types = ("float",)  # v2 answers by type always; float when none is named
    truncate = optional_choice(body, "truncate", TRUNCATE) or "END"
    priority = body.get("priority")
    if priority is not None and (isinstance(priority, bool) or not isinstance(priority, int) or priority < 0):
        raise BadRequest("'priority' must be a non-negative integer.", param="priority")
    return EmbedRequest(
        texts,
        model,
        input_type,
        dimensions=optional_positive_int(body, "output_dimension"),
        types=types,
        truncate=truncate,
        max_tokens=optional_positive_int(body, "max_tokens"),
        shape="cohere",
    )


def _embedding_types(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not value:
        raise BadRequest(
            f"'embedding_types' must be a non-empty array of: {', '.join(EMBEDDING_TYPES)}.", param="embedding_types"
        )
    for index, kind in enumerate(value):
        if kind not in EMBEDDING_TYPES:
            raise BadRequest(
                f"'embedding_types[{index}]' must be one of {', '.join(EMBEDDING_TYPES)}; got {echo(kind)}.",
                param=f"embedding_types[{index}]",
            )
    return tuple(dict.fromkeys(value))  # each type once, in the order asked


def embed_response(result: Result, request: EmbedRequest, version: int) -> dict[str, Any]:
    """Cohere's embed reply: embeddings by type (a v1 request without types: a list of float lists)."""
    meta = {"api_version": {"version": str(version)}, "billed_units": {"input_tokens": result.tokens}}
    reply: dict[str, Any] = {"id": str(uuid.uuid4())}
    if request.types:
        reply["response_type"] = "embeddings_by_type"
        reply["embeddings"] = typed_embeddings(result.output, request.types, result.manifest)
    else:
        reply["response_type"] = "embeddings_floats"
        reply["embeddings"] = typed_embeddings(result.output, ("float",), result.manifest)["float"]
    return reply | {"texts": request.texts, "meta": meta}
