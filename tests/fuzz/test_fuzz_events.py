"""Hostile API Gateway events (hypothesis) straight into ``lambda_handler``, in process, as Lambda calls it.

Bodies a client can make API Gateway pass on: lone surrogates through JSON escapes and as raw text, NULs,
huge strings and numbers, deep nesting, bytes that are not UTF-8 (``isBase64Encoded``), broken base64,
wrong types, unknown keys, odd methods, paths and Content-Types. For each: no 5xx, a JSON body, OpenAI's
error shape on a 4xx, the spec's schema where it describes the reply, and no request text in anything the
handler wrote (Powertools logger, standard logging, EMF metrics on stdout).
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import logging
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from quantfn.tasks.embed import EMBEDDING_TYPES
from tests.conftest import load_event
from tests.fuzz.support import EXAMPLES, check_reply, count

pytestmark = [pytest.mark.fuzz, pytest.mark.usefixtures("service_env")]
CANARY = "kq7canary"  # inside every text a model reads: must never be logged
TAIL = "kq7tail"  # after the 64th character of other values: error messages echo only what comes before
ROUTES = {
    "/v1/embeddings": "POST",
    "/v1/embed": "POST",
    "/v2/embed": "POST",
    "/v1/rerank": "POST",
    "/v2/rerank": "POST",
    "/v1/classify": "POST",
    "/v1/models": "GET",
    "/health": "GET",
    "/openapi.json": "GET",
}
FUZZ = settings(
    deadline=None,  # a shared CI host: bounded by the count, not by timing
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strings and JSON values ----------------------------------------------------------------------------------
odd = st.sampled_from(
    ["", " ", "\x00", "a\x00b", "\u200b", "\ufeff", "\u202e", "\n\t\r", "\ud800", "\udfff", "x\udc80y", "\U0010ffff"]
)
surrogates = st.text(st.characters(categories=["Cs"]), min_size=1, max_size=3)
huge = st.builds(
    lambda c, n: c * n, st.sampled_from(["a", "é", "😀", "\x00", " ", "\ud800"]), st.sampled_from([70, 5000, 200_000])
)
strings = st.one_of(
    st.text(max_size=40),
    odd,
    surrogates,
    st.builds(lambda a, b: a + b, st.text(max_size=5), surrogates),
    huge,
    st.builds(lambda s: s.ljust(64, "x") + TAIL, st.text(max_size=64)),  # a long value: only its head may be echoed
)
numbers = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from([0, -1, 2**63, 2**64 + 1]), st.floats(), st.just(1.0))
leaves = st.one_of(st.none(), st.booleans(), numbers, strings)
values = st.recursive(
    leaves, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(strings, inner, max_size=3), max_leaves=10
)
text = st.builds(
    lambda a, b: a + CANARY + b, st.text(max_size=20) | odd | surrogates | huge, st.text(max_size=20) | odd
)
many = st.builds(lambda item, n: [item] * n, text, st.sampled_from([257, 300]))  # over QUANTFN_MAX_INPUTS
texts = st.one_of(text, st.lists(text, min_size=1, max_size=4), many, st.lists(text | values, max_size=3))
model = st.sampled_from(["all-minilm-l6-v2", "sentence-transformers/all-MiniLM-L6-v2", "nope"]) | strings
document = text | st.fixed_dictionaries({"text": text}) | values
truncate = st.sampled_from(["NONE", "START", "END"]) | values

# Each field: a good value or anything at all; keys are optional, unknown keys join at times.
FIELDS: dict[str, dict[str, st.SearchStrategy]] = {
    "/v1/embeddings": {
        "input": texts,
        "model": model,
        "encoding_format": st.sampled_from(["float", "base64"]) | values,
        "dimensions": st.sampled_from([384, 1]) | values,
        "user": strings,
        "input_type": st.sampled_from(["query", "document"]) | values,
        "truncate": truncate,
        "max_tokens": st.integers(-1, 300) | values,
    },
    "/v1/embed": {
        "texts": texts,
        "model": model,
        "input_type": st.sampled_from(["search_query", "search_document", "classification", "clustering"]) | values,
        "embedding_types": st.lists(st.sampled_from([*EMBEDDING_TYPES, "int4"]) | values, max_size=7) | values,
        "truncate": truncate,
        "images": st.none() | values,
    },
    "/v1/rerank": {
        "query": text,
        "documents": st.lists(document, max_size=4) | values,
        "model": model,
        "top_n": st.integers(-1, 5) | values,
        "return_documents": st.booleans() | values,
        "rank_fields": st.just(["text"]) | values,
        "max_chunks_per_doc": st.integers(0, 3) | values,
    },
    "/v1/classify": {"input": texts, "model": model, "top_k": st.integers(0, 3) | values, "raw_scores": values},
}
FIELDS["/v2/embed"] = {
    **FIELDS["/v1/embed"],
    "output_dimension": st.sampled_from([384, 256, 8, 0, -1]) | values,
    "max_tokens": st.integers(-1, 300) | values,
    "priority": st.integers(-1, 3) | values,
    "inputs": st.none() | values,
}
FIELDS["/v2/rerank"] = {**FIELDS["/v1/rerank"], "max_tokens_per_doc": st.integers(0, 3) | values}
for name in ("rank_fields", "max_chunks_per_doc"):
    FIELDS["/v2/rerank"].pop(name)


def request_object(path: str) -> st.SearchStrategy[dict[str, Any]]:
    fields = st.fixed_dictionaries({}, optional=FIELDS.get(path, {}))
    unknown = st.dictionaries(strings, values, max_size=2)
    return st.builds(lambda known, extra: {**extra, **known}, fields, unknown | st.just({}))


def encoded(value: Any) -> st.SearchStrategy[str]:
    """The JSON text of ``value``: ASCII with escapes (lone surrogates as \\ud800) or raw (as the str holds it)."""
    return st.sampled_from([True, False]).map(lambda ascii_only: json.dumps(value, ensure_ascii=ascii_only))


def deep(depth: int, kind: str) -> str:
    opened, closed = {"list": ("[", "]"), "object": ('{"a":', "}"), "input": ('{"input":[', "]}")}[kind]
    if kind == "input":
        return '{"model":"all-minilm-l6-v2","input":' + "[" * depth + '"x"' + "]" * depth + "}"
    return opened * depth + "1" + closed * depth


raw_bodies = st.one_of(
    st.builds(deep, st.sampled_from([33, 100, 990, 5000, 100_000]), st.sampled_from(["list", "object", "input"])),
    st.sampled_from(["[" * 50_000, "{", "", " ", "null", "NaN", "1" + "0" * 5000, '{"input": "a"}{', "\x00", "\ud800"]),
    st.sampled_from(['{"input":"\\ud800' + CANARY + '","model":"m"}', '{"\\udfff' + TAIL + '":1}']),
    st.text(max_size=200),
)


@st.composite
def events(draw: st.DrawFn) -> dict[str, Any]:
    """A payload 2.0 event: route, method, headers and a body, each hostile at times."""
    known = draw(st.integers(0, 9)) > 0  # mostly a route the API serves, with its method
    path = draw(
        st.sampled_from(sorted(ROUTES))
        if known
        else st.just("/v1/embeddings/") | st.text(max_size=20).map("/{}".format)
    )
    others = st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "HEAD", "QUERY"])
    method = ROUTES.get(path, "POST") if draw(st.integers(0, 9)) > 0 else draw(others)
    kind = draw(st.sampled_from(["object", "object", "object", "json", "raw", "bytes", "bad-base64", "none"]))
    is_base64 = False
    if kind == "object":
        body = draw(request_object(path).flatmap(encoded))
        is_base64 = draw(st.booleans())
        if is_base64:
            body = base64.b64encode(body.encode("utf-8", "surrogatepass")).decode("ascii")
    elif kind == "json":
        body = draw(values.flatmap(encoded))
    elif kind == "raw":
        body = draw(raw_bodies)
    elif kind == "bytes":  # what API Gateway passes for a body it does not take as text: any bytes at all
        prefix = json.dumps({"model": "all-minilm-l6-v2", "input": CANARY})[:-2].encode()
        body = base64.b64encode(draw(st.sampled_from([b"", prefix])) + draw(st.binary(max_size=64))).decode("ascii")
        is_base64 = True
    elif kind == "bad-base64":
        body, is_base64 = draw(st.sampled_from(["@@@", "YWJj=", "a", "Y" * 4001])), True
    else:
        body = None
    event = load_event("api-embeddings.json")
    event["rawPath"] = event["requestContext"]["http"]["path"] = path
    event["requestContext"]["http"]["method"] = method
    event["routeKey"] = event["requestContext"]["routeKey"] = f"{method} {path}"
    content_type = draw(
        st.sampled_from(["application/json", "text/plain", "application/json; charset=latin-1", "", "*/*", "\x00"])
        | st.none()
    )
    if content_type is None:
        event["headers"].pop("content-type")
    else:
        event["headers"]["content-type"] = content_type
    event["rawQueryString"] = draw(st.sampled_from(["", "a=1", "input=" + CANARY, "%ff%fe"]))
    if body is None:
        event.pop("body")
    else:
        event["body"] = body
    event["isBase64Encoded"] = is_base64
    return event


@contextlib.contextmanager
def captured_output() -> Iterator[io.StringIO]:
    """Everything the handler writes: its Powertools logger, standard logging (any level) and stdout/stderr."""
    from functions.api.app import logger

    buffer = io.StringIO()
    root = logging.getLogger()
    handler = logging.StreamHandler(buffer)
    previous = logger.registered_handler.stream
    logger.registered_handler.stream = buffer  # not setStream(): it flushes the old stream, maybe a closed capture
    levels = (root.level, logger.log_level)
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    logger.setLevel(logging.DEBUG)
    try:
        with contextlib.redirect_stdout(buffer), contextlib.redirect_stderr(buffer):
            yield buffer
    finally:
        root.removeHandler(handler)
        root.setLevel(levels[0])
        logger.setLevel(levels[1])
        logger.registered_handler.stream = previous


def invoke(event: dict[str, Any], context: Any) -> str:
    """Call the handler and check its reply; returns what it wrote meanwhile."""
    from functions.api.app import lambda_handler

    with captured_output() as output:  # per call: pytest puts its own capture back between test phases
        reply = lambda_handler(event, context)
    count(reply["statusCode"])
    data = reply.get("body") or ""
    body = base64.b64decode(data) if reply.get("isBase64Encoded") else data.encode("utf-8")
    path, method = event["rawPath"], event["requestContext"]["http"]["method"]
    check_reply(path.rstrip("/") or "/", method, reply["statusCode"], reply.get("headers") or {}, body)
    return output.getvalue()


@settings(FUZZ, max_examples=1000 * EXAMPLES)
@given(event=events())
def test_given_a_hostile_event_then_a_json_reply_no_5xx_and_no_request_text_in_the_log(event, lambda_context) -> None:
    written = invoke(event, lambda_context)
    assert CANARY not in written and TAIL not in written, written[-2000:]


def test_given_the_canaries_when_an_input_is_logged_then_the_capture_sees_it(lambda_context) -> None:
    # The leak check can fail: whatever the handler's code writes, and however, the capture holds it.
    from functions.api.app import logger

    assert "Requests" in invoke(load_event("api-health.json"), lambda_context)  # the EMF line on stdout
    with captured_output() as output:
        logger.info("leak", extra={"input": CANARY})
        logging.getLogger("quantfn.registry").debug(TAIL)
        print(CANARY, file=sys.stderr)
    assert output.getvalue().count(CANARY) == 2 and TAIL in output.getvalue()
