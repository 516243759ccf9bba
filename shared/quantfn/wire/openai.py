"""The OpenAI embeddings and models API: parse a request body, shape a reply.

Every refusal names the field (``param``) and, for limits, the setting that sets
it. Extensions beyond OpenAI's API: ``input_type`` (``query`` | ``document``) for
models whose manifest declares prompts; ``truncate`` (``END``, the default, | ``START`` |
``NONE``) and ``max_tokens``, as Cohere's embed takes them. ``dimensions`` is one of the
model's Matryoshka sizes (its manifest's ``matryoshka_dimensions``) or its own.
"""

from __future__ import annotations

from typing import Any

from quantfn.errors import BadRequest, echo
from quantfn.inference import Result
from quantfn.tasks import EmbedRequest
from quantfn.tasks.embed import TRUNCATE, typed_embeddings
from quantfn.wire.fields import optional_choice, optional_model, optional_positive_int, parse_texts, require_object

ENCODING_FORMATS = ("float", "base64")
INPUT_TYPES = ("query", "document")
_KNOWN_FIELDS = {"input", "model", "encoding_format", "dimensions", "user", "input_type", "truncate", "max_tokens"}


def parse_embeddings_request(body: Any) -> EmbedRequest:
    """Validate a decoded JSON body; raises BadRequest naming the field."""
    body = require_object(body, _KNOWN_FIELDS)
    model = optional_model(body, required=True)
    texts = parse_texts(body.get("input"), "input" in body, "input")
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise BadRequest(
            f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}; got {echo(encoding_format)}.",
            param="encoding_format",
        )
    dimensions = optional_positive_int(body, "dimensions")
    if "user" in body and not isinstance(body["user"], str):
        raise BadRequest("'user' must be a string.", param="user")
    input_type = body.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise BadRequest(
            f"'input_type' must be one of {', '.join(INPUT_TYPES)}; got {echo(input_type)}.", param="input_type"
        )
    truncate = optional_choice(body, "truncate", TRUNCATE) or "END"
    max_tokens = optional_positive_int(body, "max_tokens")
    return EmbedRequest(texts, model, input_type, encoding_format, dimensions, truncate=truncate, max_tokens=max_tokens)


def embeddings_response(result: Result, request: EmbedRequest) -> dict[str, Any]:
    """The OpenAI ``list`` reply; base64 is little-endian float32, as OpenAI's clients decode it."""
    # float32 rows (serialize.dumps writes them compactly), or base64 strings
    items = list(typed_embeddings(result.output, request.wanted, result.manifest)[request.encoding_format])
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": item} for i, item in enumerate(items)],
        "model": result.model,
        "usage": usage(result),
    }


def usage(result: Result) -> dict[str, int]:
    """Tokens the request held, before truncation (OpenAI's clients read prompt_tokens and total_tokens)."""
    return {"prompt_tokens": result.tokens, "total_tokens": result.tokens}


def models_response(models: list[dict[str, Any]], created: int = 0) -> dict[str, Any]:
    """The OpenAI ``GET /v1/models`` list, each entry with quantfn's facts (task, dimensions or labels, ...)."""
    return {
        "object": "list",
        "data": [
            {"id": facts["name"], "object": "model", "created": created, "owned_by": "quantfn", **facts}
            for facts in models
        ],
    }
