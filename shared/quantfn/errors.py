"""The one exception hierarchy of quantfn.

Every error carries what a caller needs to build a safe reply: an HTTP status,
an OpenAI-style ``type`` and ``code``, the request field it concerns (``param``)
and a message written for the caller. Messages never contain paths, stack
traces or input text. Handlers map these to responses in exactly one place.
"""

from __future__ import annotations

import reprlib

_ECHO = 64  # characters of a client's value repeated in an error message or a log line


def echo(value: object) -> str:
    """A client's value, quoted, cut to 64 characters and safe to print (lone surrogates escaped).

    Only the start of a value is repeated, inside a list or an object too (``reprlib`` alone shortens a
    long string to its head and its tail, and the tail of a text is text no log may hold)."""
    text = value if isinstance(value, str) else _HEAD_REPR.repr(value)
    text = text[: _ECHO + 1].encode("utf-8", "backslashreplace").decode("utf-8")
    return repr(text[:_ECHO] + ("..." if len(text) > _ECHO else ""))


class _HeadRepr(reprlib.Repr):
    """``reprlib.Repr`` that shortens a string by cutting its end: what is shown comes from its start."""

    def repr_str(self, x: str, level: int) -> str:
        return repr(x[: self.maxstring]) + ("..." if len(x) > self.maxstring else "")


_HEAD_REPR = _HeadRepr()


_PLACES = None


def safe_reason(message: str, limit: int = 300) -> str:
    """An error's message fit for a log record: S3 URIs and file paths replaced by ``<s3>`` and ``<path>``
    (a file or model name stays), cut to ``limit`` characters."""
    global _PLACES
    if _PLACES is None:
        import re

        _PLACES = re.compile(r"s3://\S+|(?<![\w.])/(?:[^\s/'\"()]+/)+[^\s/'\"()]*")

    def hide(match: object) -> str:
        place = match.group()  # type: ignore[attr-defined]
        return ("<s3>" if place.startswith("s3://") else "<path>") + (":" if place.endswith(":") else "")

    return _PLACES.sub(hide, message)[:limit]


def dependency_reason(exc: BaseException) -> str:
    """Why a call to AWS failed, in words safe to log: the operation and the error code the service answered, or
    the exception's class when nothing answered. Never the message, which may quote a key, a path or a name."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict) and "Error" in response:  # botocore's ClientError: the service answered
        code = str(response["Error"].get("Code", "?"))[:64]
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
        return f"{getattr(exc, 'operation_name', 'the call')} answered {code} (HTTP {status})"
    return type(exc).__name__


class QuantfnError(Exception):
    """Base class. ``status`` is the HTTP status this error maps to."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"
    #: What a caller sees for a 5xx: fixed text, so no path or internal detail leaks.
    public_message: str = "The server failed to process the request."
    #: The routing record (quantfn.routing.RoutePlan) when the error came after, or from, the routing decision.
    route: object | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code

    def to_body(self) -> dict[str, object]:
        """The OpenAI error shape: ``{"error": {message, type, param, code}}``.

        4xx bodies carry the message written for the caller; 5xx bodies carry the
        class's fixed ``public_message`` (the detailed message goes to the log only).
        """
        message = self.message if self.status < 500 else self.public_message
        return {"error": {"message": message, "type": self.type, "param": self.param, "code": self.code}}


class BadRequest(QuantfnError):
    """The request is malformed or asks for something invalid (400)."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_request"


class RouteNotFound(BadRequest):
    """No route has the request's path (404)."""

    status = 404
    code = "not_found"


class MethodNotAllowed(BadRequest):
    """The route exists but not for the request's method (405; the reply names the one allowed)."""

    status = 405
    code = "method_not_allowed"


class ModelNotFound(QuantfnError):
    """The request names a model this deployment does not serve (404)."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class TooLarge(QuantfnError):
    """The request exceeds a configured limit (413); the message names the limit."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class ModelUnavailable(QuantfnError):
    """The model cannot be loaded: missing, incomplete or failing verification (503)."""

    status = 503
    type = "server_error"
    code = "model_unavailable"
    public_message = "The model is unavailable right now; retry later. The function's log has the cause."


class IntegrityError(ModelUnavailable):
    """A model file does not match the sha256 or size recorded in its manifest."""

    code = "model_integrity"


class UpstreamFailed(QuantfnError):
    """The GPU endpoint failed or is unreachable (502/503 decided by the caller)."""

    status = 502
    type = "server_error"
    code = "upstream_failed"
    public_message = "The GPU endpoint failed to answer; retry later."


class EndpointUnavailable(QuantfnError):
    """No GPU endpoint is configured, or its circuit is open (503)."""

    status = 503
    type = "server_error"
    code = "endpoint_unavailable"
    public_message = (
        "The request needs the GPU endpoint, which is unavailable right now; retry later or send a smaller request."
    )
