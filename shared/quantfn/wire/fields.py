"""Request fields every route checks the same way; each refusal is a 400 naming the field."""

from __future__ import annotations

from typing import Any

from quantfn.errors import BadRequest, echo

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


def optional_choice(body: dict[str, Any], name: str, choices: tuple[str, ...]) -> str | None:
    """``body[name]`` when it is one of ``choices``, None when absent; 400 naming the field and the choices."""
    value = body.get(name)
    if value is not None and value not in choices:
        raise BadRequest(f"'{name}' must be one of {', '.join(choices)}; got {echo(value)}.", param=name)
    return value


def optional_flag(body: dict[str, Any], name: str) -> bool:
    """``body[name]`` as a boolean (absent: false); 400 naming the field for anything else."""
    value = body.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"'{name}' must be true or false.", param=name)
    return value


def parse_texts(value: Any, present: bool, field: str) -> list[str]:
    """A string or a non-empty array of non-empty strings (how many is the router's to judge: a 413 can then
    say whether the GPU endpoint could take them)."""
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
