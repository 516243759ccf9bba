"""The OpenAPI description (shared/quantfn/wire/openapi.json) is kept true: routes, template and replies."""

from __future__ import annotations

import base64
import json

import pytest
import yaml
from openapi_spec_validator import validate

from tests.conftest import EVENTS, load_event
from tests.fuzz.support import SPEC, reply_schema, spec, validator
from tests.integration.test_template import TEMPLATE, _CfnLoader, handler_routes


def _operations(paths: dict) -> set[tuple[str, str]]:
    return {(path, method.upper()) for path, operations in paths.items() for method in operations}


def test_the_description_is_a_valid_openapi_3_1_document() -> None:
    validate(spec())
    assert spec()["openapi"].startswith("3.1")


def test_every_route_the_handler_serves_is_described_and_nothing_else() -> None:
    served = {(path, method) for path, method in handler_routes().items()}  # the table the API function serves
    assert _operations(spec()["paths"]) == served


def test_the_template_routes_are_the_described_ones() -> None:
    template = yaml.load(TEMPLATE.read_text(), Loader=_CfnLoader)
    paths = template["Resources"]["HttpApi"]["Properties"]["DefinitionBody"]["paths"]
    assert _operations(paths) == _operations(spec()["paths"])


def test_the_file_ships_as_package_data() -> None:
    import tomllib
    from importlib.resources import files

    pyproject = tomllib.loads((SPEC.parents[3] / "pyproject.toml").read_text())
    assert "wire/openapi.json" in pyproject["tool"]["setuptools"]["package-data"]["quantfn"]
    assert json.loads(files("quantfn.wire").joinpath("openapi.json").read_text()) == spec()


@pytest.mark.usefixtures("service_env")
def test_get_openapi_json_serves_the_file(lambda_context) -> None:
    from functions.api.app import lambda_handler

    reply = lambda_handler(load_event("api-openapi.json"), lambda_context)
    assert reply["statusCode"] == 200
    assert reply["headers"]["Content-Type"].startswith("application/json")
    assert json.loads(reply["body"]) == json.loads(SPEC.read_text())


@pytest.mark.usefixtures("service_env")
@pytest.mark.parametrize("name", sorted(p.name for p in EVENTS.glob("api-*.json")))
def test_every_event_reply_fits_the_schema_the_description_gives_its_status(name: str, lambda_context) -> None:
    from functions.api.app import lambda_handler

    event = load_event(name)
    reply = lambda_handler(event, lambda_context)
    data = reply["body"]
    body = json.loads(base64.b64decode(data) if reply.get("isBase64Encoded") else data)
    status = reply["statusCode"]
    path, method = event["rawPath"], event["requestContext"]["http"]["method"]
    pointer = reply_schema(path, method, status)  # KeyError: a status the description does not declare
    if pointer is None:  # a path or method the API does not serve: the error body, and the 404 or 405
        assert status in (404, 405)
        pointer = "#/components/schemas/Error"
    errors = sorted(validator(pointer).iter_errors(body), key=str)
    assert not errors, [e.message for e in errors[:3]]
    headers = {key.lower() for key in reply.get("headers") or {}}
    if status == 200 and method == "POST":
        assert "x-quantfn-route" in headers
    if status == 405:
        assert "allow" in headers


@pytest.mark.parametrize(
    ("pointer", "value"),
    [
        ("#/components/schemas/Error", {"error": {"message": "m", "type": "invalid_request_error", "param": None}}),
        ("#/components/schemas/EmbeddingsRequest", {"model": "m", "input": [1, 2]}),
        ("#/components/schemas/EmbeddingsRequest", {"model": "m", "input": "  "}),
        ("#/components/schemas/RerankV2Request", {"query": "q", "documents": ["d"]}),
        ("#/components/schemas/ClassifyRequest", {"input": "x", "temperature": 1}),
    ],
)
def test_the_schemas_refuse_what_the_api_refuses(pointer: str, value: dict) -> None:
    # The checks above can fail: a body missing what the schema requires does not validate.
    assert list(validator(pointer).iter_errors(value))
