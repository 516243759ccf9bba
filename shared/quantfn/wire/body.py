"""Request bodies at the edge: whatever a client sends becomes a checked JSON value or a 400/413.

Checked here, once, for every route: the size limit, bytes that are not UTF-8,
JSON syntax, nesting deeper than ``MAX_DEPTH``, and strings (keys included) that
hold lone surrogates, which JSON's ``\\ud800`` escapes allow but no tokenizer or
UTF-8 encoder takes. A refusal names where the problem is.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from quantfn.errors import BadRequest, TooLarge

MAX_DEPTH = 32  # the deepest any request shape needs is 3 (documents[i].text)


def event_body(body: str | None, is_base64: bool) -> bytes:
    """The raw bytes of an API Gateway event's body (base64-decoded when API Gateway says so)."""
    if body is None:
        return b""
    if not is_base64:
        return body.encode("utf-8", "surrogatepass")
    try:
        return base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadRequest("The request body is marked base64 but does not decode.") from exc


def load_json_body(data: bytes, max_bytes: int | None) -> Any:
    """A decoded, checked JSON value: 413 over ``max_bytes`` (QUANTFN_MAX_BODY_BYTES; None: the caller checks)."""
    if max_bytes is not None and len(data) > max_bytes:
        raise TooLarge(
            f"The request body has {len(data)} bytes; the limit is {max_bytes} (QUANTFN_MAX_BODY_BYTES).",
            code="body_too_large",
        )
    if not data.strip():
        raise BadRequest("The request body is empty; send a JSON object.")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRequest(f"The request body is not UTF-8: invalid byte at position {exc.start}.") from exc
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise BadRequest(f"The request body nests deeper than {MAX_DEPTH} levels.", code="too_deep") from exc
    except ValueError as exc:
        position = getattr(exc, "pos", None)
        where = f" at character {position}" if position is not None else ""
        raise BadRequest(f"The request body is not valid JSON{where}.") from exc
    check_value(value)
    return value


def check_value(value: Any) -> None:
    """Refuse nesting over MAX_DEPTH and strings with lone surrogates, naming the place (iterative: no recursion)."""
    stack: list[tuple[Any, str, int]] = [(value, "", 0)]
    while stack:
        item, path, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise BadRequest(f"The request body nests deeper than {MAX_DEPTH} levels.", code="too_deep")
        if isinstance(item, str):
            _check_text(item, path)
        elif isinstance(item, dict):
            for key, child in item.items():
                _check_text(key, path or "body", what="a key")
                name = key[:64]
                stack.append((child, f"{path}.{name}" if path else name, depth + 1))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]", depth + 1) for i, child in enumerate(item))


def _check_text(text: str, path: str, what: str = "text") -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        where = path or "body"
        raise BadRequest(
            f"'{where}' holds {what} with a lone surrogate (\\u{ord(text[exc.start]):04x} at character {exc.start}), "
            "which is not valid Unicode text.",
            param=where if what == "text" else None,
            code="invalid_text",
        ) from exc
