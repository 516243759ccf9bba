"""Schema-driven fuzzing (schemathesis) of the real handler behind ``quantfn serve``, from the OpenAPI description.

Schemathesis generates requests that fit each operation's schema and requests that break it, and checks every
reply against the spec: no 5xx, declared statuses, content types, headers and bodies, schema-breaking requests
refused, other methods answered 405. Its positive-data check is off: a request can fit the schema and still be
refused for what only the deployment knows (a model's task or dimensions, an input that tokenizes to nothing, a
limit setting). On top, every reply is JSON with OpenAI's error shape on a 4xx, and no request text reaches the
server's log.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.fuzz.support import EXAMPLES, SPEC, LocalApi, check_reply, count

pytestmark = pytest.mark.fuzz
schema = schemathesis.openapi.from_path(SPEC)
TEXT_FIELDS = {"input", "query", "documents", "text"}  # what the models read: never logged
ECHO = 64  # characters of any other client value an error message (and so the log) may repeat


def _strings(value: Any, field: str = "") -> list[tuple[str, str]]:
    """(field, string) for every string and key in a JSON value; items of an array belong to its field."""
    if isinstance(value, str):
        return [(field, value)]
    if isinstance(value, list):
        return [pair for item in value for pair in _strings(item, field)]
    if isinstance(value, dict):
        return [("key", key) for key in value] + [p for k, v in value.items() for p in _strings(v, k)]
    return []


def assert_not_logged(sent: Any, log: str) -> None:
    """Texts never appear in the log; other values only as their first 64 characters."""
    strings = _strings(sent)
    echoable = [text[:ECHO] for field, text in strings if field not in TEXT_FIELDS]
    for field, text in strings:
        secret = text if field in TEXT_FIELDS else text[ECHO:]
        if len(secret.strip()) < 12:  # shorter strings occur in any log by chance
            continue
        if any(secret in head for head in echoable):  # the same characters sent as, say, the model's name
            continue
        for form in {secret, json.dumps(secret)[1:-1], json.dumps(secret, ensure_ascii=False)[1:-1]}:
            assert form not in log, (field, secret[:80])


@schema.parametrize()
@settings(
    max_examples=40 * EXAMPLES,
    deadline=None,  # a shared CI host: bounded by the count, not by timing
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
)
def test_given_any_request_the_spec_generates_then_the_reply_is_what_the_spec_says(case, fuzz_api: LocalApi):
    fuzz_api.new_log()
    response = case.call(base_url=fuzz_api.url, timeout=60)
    count(response.status_code)
    case.validate_response(response, excluded_checks=[positive_data_acceptance])
    headers = {name: values[-1] for name, values in response.headers.items()}
    check_reply(case.operation.path, case.method, response.status_code, headers, response.content)
    assert_not_logged(case.body if isinstance(case.body, (dict, list, str)) else None, fuzz_api.new_log())
