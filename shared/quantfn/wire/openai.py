"""The OpenAI embeddings and models API: parse a request body, shape a reply.

Every refusal names the field (``param``) and, for limits, the setting that sets
it. Extensions beyond OpenAI's API: ``input_type`` (``query`` | ``document``) for
models whose manifest declares prompts.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from quantfn.errors import BadRequest, TooLarge, echo
from quantfn.inference import EmbedRequest, Result

ENCODING_FORMATS = ("float", "base64")
INPUT_TYPES = ("query", "document")
_KNOWN_FIELDS = {"input", "model", "encoding_format", "dimensions", "user", "input_type"}
_TOKEN_ARRAYS = (
    "Token arrays are not supported: send the text itself. LangChain's OpenAIEmbeddings sends token ids "
    "unless it is created with check_embedding_ctx_length=False."
)


def require_object(body: Any, known: set[str]) -> dict[str, Any]:
    """The body as a JSON object with no field outside ``known`` (400 naming the first unknown one)."""
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    unknown = sorted(set(body) - known)
    if unknown:
        raise BadRequest(f"Unrecognized request argument supplied: {echo(unknown[0])}.", param=unknown[0][:64])
    return body


def optional_model(body: dict[str, Any], required: bool) -> str | None:
    model = body.get("model")
    if model is None:
        if required:
            raise BadRequest("'model' is required.", param="model")
        return None
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("'model' must be a non-empty string.", param="model")
    return model


def optional_positive_int(body: dict[str, Any], name: str) -> int | None:
    """``body[name]`` when it is a positive integer, None when absent; 400 naming the field otherwise."""
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise BadRequest(f"'{name}' must be a positive integer.", param=name)
    return value


def optional_flag(body: dict[str, Any], name: str) -> bool:
    """``body[name]`` as a boolean (absent: false); 400 naming the field for anything else."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false.", param=name)
    return value


def parse_texts(value: Any, present: bool, field: str, max_inputs: int | None) -> list[str]:
    """A string or a non-empty array of non-empty strings; 413 over ``max_inputs`` (None: the router checks)."""
    if not present or value is None:
        raise BadRequest(f"'{field}' is required: a string or an array of strings.", param=field)
    if isinstance(value, str):
        if not value.strip():
            raise BadRequest(f"'{field}' is empty; it must contain text.", param=field)
        value = [value]
    elif not isinstance(value, list):
        raise BadRequest(f"'{field}' must be a string or an array of strings.", param=field)
    if not value:
        raise BadRequest(f"'{field}' must not be an empty array.", param=field)
    if max_inputs is not None and len(value) > max_inputs:
        raise TooLarge(
            f"'{field}' has {len(value)} items; the limit is {max_inputs} per request (QUANTFN_MAX_INPUTS). "
            "Split the request.",
            param=field,
            code="too_many_inputs",
        )
    for index, item in enumerate(value):
        if isinstance(item, str):
            if not item.strip():
                raise BadRequest(
                    f"'{field}[{index}]' is empty; every input must contain text.", param=f"{field}[{index}]"
                )
        elif isinstance(item, list) or all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise BadRequest(_TOKEN_ARRAYS, param=f"{field}[{index}]", code="token_arrays_unsupported")
        else:
            raise BadRequest(f"'{field}[{index}]' must be a string.", param=f"{field}[{index}]")
    return value


def parse_embeddings_request(body: Any, max_inputs: int | None) -> EmbedRequest:
    """Validate a decoded JSON body; raises BadRequest or TooLarge naming the field."""
    body = require_object(body, _KNOWN_FIELDS)
    model = optional_model(body, required=True)
    texts = parse_texts(body.get("input"), "input" in body, "input", max_inputs)
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise BadRequest(
            f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}; got {echo(encoding_format)}.",
            param="encoding_format",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
        raise BadRequest("'dimensions' must be an integer.", param="dimensions")
    if "user" in body and not isinstance(body["user"], str):
        raise BadRequest("'user' must be a string.", param="user")
    input_type = body.get("input_type")
    if input_type is not None and input_type not in INPUT_TYPES:
        raise BadRequest(
            f"'input_type' must be one of {', '.join(INPUT_TYPES)}; got {echo(input_type)}.", param="input_type"
        )
    return EmbedRequest(texts, model, input_type, encoding_format, dimensions)


def embeddings_response(result: Result, encoding_format: str = "float") -> dict[str, Any]:
    """The OpenAI ``list`` reply; base64 is little-endian float32, as OpenAI's clients decode it."""
    vectors = result.output
    if encoding_format == "base64":
        little = vectors.astype("<f4", copy=False)
        items: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        items = list(vectors.astype(np.float32, copy=False))  # float32 rows: serialize.dumps writes them compactly
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
