"""The API handler, invoked in-process exactly as Lambda calls it, with every events/ file."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from tests.conftest import DEFAULT_MODEL_ID, EVENTS, INTENT_MODEL_ID, load_event
from tests.events_expected import API_EVENTS

pytestmark = pytest.mark.usefixtures("service_env")


def invoke(event: dict, context) -> tuple[int, dict, dict]:
    from functions.api.app import lambda_handler

    reply = lambda_handler(event, context)
    return reply["statusCode"], reply.get("headers", {}), json.loads(reply["body"])


def test_every_api_event_file_has_an_expectation() -> None:
    assert sorted(p.name for p in EVENTS.glob("api-*.json")) == sorted(API_EVENTS)


@pytest.mark.parametrize("name", sorted(API_EVENTS))
def test_event_gives_its_status_and_shape(name: str, lambda_context) -> None:
    status, headers, body = invoke(load_event(name), lambda_context)
    expected_status, expected_code = API_EVENTS[name]
    assert status == expected_status, body
    assert headers.get("Content-Type", "").startswith("application/json")
    if expected_code:
        error = body["error"]
        assert error["code"] == expected_code
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] and "Traceback" not in error["message"]
    elif name.startswith("api-embeddings"):
        sent = json.loads(_body_text(load_event(name)))
        count = 1 if isinstance(sent["input"], str) else len(sent["input"])
        assert body["object"] == "list" and body["model"] == "all-minilm-l6-v2"
        assert [item["index"] for item in body["data"]] == list(range(count))
        assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > count
        for item in body["data"]:
            vector = _vector(item["embedding"])
            assert vector.shape == (384,)
            assert abs(np.linalg.norm(vector) - 1.0) < 1e-4


def _body_text(event: dict) -> str:
    return base64.b64decode(event["body"]).decode() if event.get("isBase64Encoded") else event["body"]


def _vector(embedding: list[float] | str) -> np.ndarray:
    if isinstance(embedding, str):
        return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
    return np.asarray(embedding, dtype=np.float32)


def test_bad_input_names_the_field(lambda_context) -> None:
    _, _, body = invoke(load_event("api-bad-non-string-item.json"), lambda_context)
    assert body["error"]["param"] == "input[1]"
    _, headers, _ = invoke(load_event("api-bad-method.json"), lambda_context)
    assert headers["Allow"] == "POST"


def test_base64_and_float_replies_carry_the_same_vectors(lambda_context) -> None:
    event = load_event("api-embeddings-base64.json")
    _, _, as_b64 = invoke(event, lambda_context)
    sent = json.loads(event["body"])
    sent.pop("encoding_format")
    event["body"] = json.dumps(sent)
    _, _, as_float = invoke(event, lambda_context)
    for b64_item, float_item in zip(as_b64["data"], as_float["data"], strict=True):
        np.testing.assert_array_equal(_vector(b64_item["embedding"]), _vector(float_item["embedding"]))


def test_models_and_health(lambda_context, models_root) -> None:
    # service_env serves the default embedder and, where `make test` built it, the intent classifier.
    served = [DEFAULT_MODEL_ID] + ([INTENT_MODEL_ID] if (models_root / INTENT_MODEL_ID).is_dir() else [])
    tasks = {DEFAULT_MODEL_ID: "embed", INTENT_MODEL_ID: "classify"}
    _, _, health = invoke(load_event("api-health.json"), lambda_context)
    assert health["status"] == "ok" and [m["name"] for m in health["models"]] == served
    assert [(m["status"], m["task"]) for m in health["models"]] == [("ok", tasks[name]) for name in served]
    _, _, models = invoke(load_event("api-models.json"), lambda_context)
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == served
    entry = models["data"][0]
    assert (entry["task"], entry["dimensions"], entry["status"]) == ("embed", 384, "ok")
    assert all(isinstance(m["loaded"], bool) for m in models["data"])
