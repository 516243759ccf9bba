"""Shared by the fuzz tests: the counts, the spec's schemas, what every reply must be, the server's log.

Every generated request is counted (``FUZZED``) and so is every 5xx reply; conftest prints the counts at the
end of the run ("fuzz: N events, M 5xx"). ``QUANTFN_FUZZ_EXAMPLES`` multiplies the examples of each test.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.conftest import ROOT

FUZZED: Counter[str] = Counter()  # "events", "5xx" and each status
EXAMPLES = int(os.environ.get("QUANTFN_FUZZ_EXAMPLES", "1"))
SPEC = ROOT / "shared" / "quantfn" / "wire" / "openapi.json"
_BASE = "urn:quantfn:openapi"


def count(status: int) -> None:
    FUZZED["events"] += 1
    FUZZED[str(status)] += 1
    if status >= 500:
        FUZZED["5xx"] += 1


@dataclass
class LocalApi:
    """``quantfn serve`` as a process on 127.0.0.1; everything it prints (its logs) goes to ``log``."""

    url: str
    log: Path
    _offset: int = 0

    def new_log(self) -> str:
        """What the server printed since the last call (its handler writes each line before it replies)."""
        data = self.log.read_bytes()
        text, self._offset = data[self._offset :].decode("utf-8", "replace"), len(data)
        return text


@cache
def spec() -> dict[str, Any]:
    return json.loads(SPEC.read_text())


@cache
def _registry() -> Registry:
    return Registry().with_resource(_BASE, Resource.from_contents(spec(), default_specification=DRAFT202012))


def validator(pointer: str) -> Draft202012Validator:
    """A validator for the spec's schema at ``pointer`` (e.g. ``#/components/schemas/Error``), refs resolved."""
    return Draft202012Validator({"$ref": f"{_BASE}{pointer}"}, registry=_registry())


def reply_schema(path: str, method: str, status: int) -> str | None:
    """The pointer of the schema the spec gives this reply; None for a path and method it does not describe."""
    operation = spec()["paths"].get(path, {}).get(method.lower())
    if operation is None:
        return None
    response = operation["responses"][str(status)]  # KeyError: a status the spec does not declare
    while "$ref" in response:
        response = spec()["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"]["application/json"]["schema"]
    return schema["$ref"]


def check_reply(path: str, method: str, status: int, headers: dict[str, str], body: bytes) -> Any:
    """No 5xx, a JSON body, OpenAI's error shape on every 4xx, the spec's schema where it describes the reply."""
    assert status < 500, body[:500]
    content_type = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    assert content_type.startswith("application/json"), content_type
    value = json.loads(body)
    if status >= 400:
        errors = sorted(validator("#/components/schemas/Error").iter_errors(value), key=str)
        assert not errors, (status, value, errors[0].message)
    pointer = reply_schema(path, method, status)
    if pointer is None:  # not an operation of the spec: the handler's not_found answers
        assert status in (404, 405), status
    else:
        errors = sorted(validator(pointer).iter_errors(value), key=str)
        assert not errors, (status, errors[0].message)
    return value
