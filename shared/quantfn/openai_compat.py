"""The OpenAI embeddings wire format: parse a request body, shape a reply.

Plain dicts in, plain dicts out: the API function, the GPU container and the
CLI share it. Every refusal names the field (``param``) and, for limits, the
setting that sets it.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np

from quantfn.errors import BadRequest, TooLarge

ENCODING_FORMATS = ("float", "base64")
_KNOWN_FIELDS = {"input", "model", "encoding_format", "dimensions", "user"}


@dataclass(frozen=True)
class EmbeddingRequest:
    texts: list[str]
    model: str
    encoding_format: str = "float"
    dimensions: int | None = None


def parse_embeddings_request(body: Any, max_inputs: int | None) -> EmbeddingRequest:
    """Validate a decoded JSON body; raises BadRequest or TooLarge naming the field.

    ``max_inputs=None`` leaves the count to the caller (the API function's router).
    """
    if not isinstance(body, dict):
        raise BadRequest("The request body must be a JSON object.")
    unknown = sorted(set(body) - _KNOWN_FIELDS)
    if unknown:
        raise BadRequest(f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0])
    model = body.get("model")
    if model is None:
        raise BadRequest("'model' is required.", param="model")
    if not isinstance(model, str) or not model.strip():
        raise BadRequest("'model' must be a non-empty string.", param="model")
    texts = _parse_input(body.get("input", None), "input" in body, max_inputs)
    encoding_format = body.get("encoding_format", "float")
    if encoding_format not in ENCODING_FORMATS:
        raise BadRequest(
            f"'encoding_format' must be one of {', '.join(ENCODING_FORMATS)}; got {encoding_format!r}.",
            param="encoding_format",
        )
    dimensions = body.get("dimensions")
    if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)):
        raise BadRequest("'dimensions' must be an integer.", param="dimensions")
    if "user" in body and not isinstance(body["user"], str):
        raise BadRequest("'user' must be a string.", param="user")
    return EmbeddingRequest(texts=texts, model=model, encoding_format=encoding_format, dimensions=dimensions)


def _parse_input(value: Any, present: bool, max_inputs: int | None) -> list[str]:
    if not present or value is None:
        raise BadRequest("'input' is required: a string or an array of strings.", param="input")
    if isinstance(value, str):
        if not value.strip():
            raise BadRequest("'input' is empty; it must contain text.", param="input")
        value = [value]
    elif not isinstance(value, list):
        raise BadRequest("'input' must be a string or an array of strings.", param="input")
    if not value:
        raise BadRequest("'input' must not be an empty array.", param="input")
    if max_inputs is not None and len(value) > max_inputs:
        raise TooLarge(
            f"'input' has {len(value)} items; the limit is {max_inputs} per request (QUANTFN_MAX_INPUTS). "
            "Split the request.",
            param="input",
            code="too_many_inputs",
        )
    for index, item in enumerate(value):
        if isinstance(item, str):
            if not item.strip():
                raise BadRequest(f"'input[{index}]' is empty; every input must contain text.", param=f"input[{index}]")
        elif isinstance(item, list) or all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise BadRequest(
                "Token arrays are not supported by this endpoint; send the text itself.", param=f"input[{index}]"
            )
        else:
            raise BadRequest(f"'input[{index}]' must be a string.", param=f"input[{index}]")
    return value


def embeddings_response(
    vectors: np.ndarray, model: str, prompt_tokens: int, encoding_format: str = "float"
) -> dict[str, Any]:
    """The OpenAI ``list`` reply; base64 is little-endian float32, as OpenAI's clients decode it."""
    if encoding_format == "base64":
        little = vectors.astype("<f4", copy=False)
        items: list[Any] = [base64.b64encode(row.tobytes()).decode("ascii") for row in little]
    else:
        items = list(vectors.astype(np.float32, copy=False))  # float32 rows: serialize.dumps writes them compactly
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": item} for i, item in enumerate(items)],
        "model": model,
        "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens},
    }


def models_response(model_ids: list[str], created: int) -> dict[str, Any]:
    """The OpenAI ``GET /v1/models`` list."""
    return {
        "object": "list",
        "data": [{"id": mid, "object": "model", "created": created, "owned_by": "quantfn"} for mid in model_ids],
    }


def load_json_body(raw: str | bytes | None, max_bytes: int | None) -> Any:
    """Decode a request body: 413 over ``max_bytes`` (QUANTFN_MAX_BODY_BYTES; None: the caller checks), 400 if bad."""
    import json

    data = raw.encode("utf-8") if isinstance(raw, str) else (raw or b"")
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(
            f"The request body has {len(data)} bytes; the limit is {max_bytes} (QUANTFN_MAX_BODY_BYTES).",
            code="body_too_large",
        )
    if not data.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        return json.loads(data)
    except (UnicodeDecodeError, ValueError) as exc:
        position = getattr(exc, "pos", None)
        where = f" at byte {position}" if position is not None else ""
        raise BadRequest(f"The request body is not valid JSON{where}.") from exc
