"""What a reply to each events/ file must look like, however it travelled (invoke, start-lambda, HTTP)."""

from __future__ import annotations

import base64
import json

import numpy as np

from tests.conftest import load_event
from tests.events_expected import API_EVENTS

# Which function each events/ file is for, by its name's prefix.
EVENT_PREFIXES = {"api-": "ApiFunction", "sqs-": "BatchFunction", "authorizer-": "AuthorizerFunction"}


def function_for(event_name: str) -> str | None:
    return next((fn for prefix, fn in EVENT_PREFIXES.items() if event_name.startswith(prefix)), None)


def request_body(event: dict) -> bytes:
    body = event.get("body") or ""
    return base64.b64decode(body) if event.get("isBase64Encoded") else body.encode()


def vectors(reply_body: dict) -> np.ndarray:
    def one(embedding: list[float] | str) -> np.ndarray:
        if isinstance(embedding, str):
            return np.frombuffer(base64.b64decode(embedding), dtype="<f4")
        return np.asarray(embedding, dtype=np.float32)

    return np.stack([one(item["embedding"]) for item in reply_body["data"]])


def check_api_reply(name: str, status: int, headers: dict[str, str], body_text: str) -> dict:
    """Assert the status and body ``name`` must give (tests/events_expected.py); returns the parsed body."""
    expected_status, expected_code = API_EVENTS[name]
    assert status == expected_status, body_text[:2000]
    content_type = {k.lower(): v for k, v in headers.items()}.get("content-type", "")
    assert content_type.startswith("application/json"), headers
    body = json.loads(body_text)
    if expected_code:
        error = body["error"]
        assert error["code"] == expected_code
        assert set(error) == {"message", "type", "param", "code"}
        assert error["message"] and "Traceback" not in error["message"] and "/var/task" not in error["message"]
    elif name.startswith("api-embeddings"):
        sent = json.loads(request_body(load_event(name)))
        count = 1 if isinstance(sent["input"], str) else len(sent["input"])
        assert body["object"] == "list" and body["model"] == "all-minilm-l6-v2"
        assert [item["index"] for item in body["data"]] == list(range(count))
        found = vectors(body)
        assert found.shape == (count, 384)
        np.testing.assert_allclose(np.linalg.norm(found, axis=1), 1.0, atol=1e-4)
    return body


def check_lambda_reply(name: str, reply: dict) -> dict:
    """An API Gateway (payload 2.0) proxy reply, as the function returned it."""
    body = reply["body"]
    if reply.get("isBase64Encoded"):
        body = base64.b64decode(body).decode()
    return check_api_reply(name, reply["statusCode"], reply.get("headers") or {}, body)
