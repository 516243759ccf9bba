"""A request refused because of a dependency leaves one ERROR record with its code and a reason without paths."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from quantfn.errors import safe_reason
from tests.conftest import handler_output, load_event


@pytest.mark.parametrize(
    ("message", "safe"),
    [
        ("model m is not in the layer (looked in /opt/models/m)", "model m is not in the layer (looked in <path>)"),
        ("cannot read s3://bucket/models/m/manifest.json: NoSuchKey", "cannot read <s3>: NoSuchKey"),
        ("model m failed verification: sha256 of model.onnx does not match", None),
        ("'dimensions' must be 384, e.g. 1/2 of 768", None),
    ],
)  # fmt: skip
def test_a_safe_reason_names_no_place(message: str, safe: str | None) -> None:
    assert safe_reason(message) == (safe or message)


def test_a_missing_model_is_a_503_logged_once_at_error_without_its_path(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    lambda_context,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    from functions.api import app
    from quantfn.registry import reset_registry

    # Given a function whose model layer does not hold its model
    empty = tmp_path / "an-empty-layer"
    empty.mkdir()
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(empty))
    monkeypatch.delenv("QUANTFN_MODELS", raising=False)
    reset_registry()
    try:
        with handler_output(app.logger.name, capsys) as output:
            # When a request comes
            reply = app.lambda_handler(load_event("api-embeddings.json"), lambda_context)
            printed = output.read()
    finally:
        reset_registry()
    # Then it is a 503 with the fixed public message, one ERROR record says which code and why, with no path,
    # and the 5xx is counted
    assert reply["statusCode"] == 503
    assert json.loads(reply["body"])["error"]["code"] == "model_unavailable"
    (record,) = [r for r in printed.at("ERROR") if r["message"] == "request refused"]
    assert record["code"] == "model_unavailable" and record["status"] == 503
    assert "no manifest for all-minilm-l6-v2" in record["detail"]
    assert "Errors5xx" in printed.metrics
    # And the registry's own record says why the manifest is missing, without the path either
    assert any("not in the model layer (looked in <path>)" in r.getMessage() for r in caplog.records)
    assert str(empty) not in printed.text + caplog.text


def test_a_refused_value_holding_text_is_echoed_by_its_start_only(
    lambda_context, capsys: pytest.CaptureFixture[str]
) -> None:
    from functions.api import app

    # Given a Cohere request whose input_type is a list holding a long text (a client's mistake)
    event = load_event("api-embed-v2.json")
    request = json.loads(event["body"])
    request["input_type"] = ["the start of a text " * 10 + "and its private end"]
    event["body"] = json.dumps(request)
    with handler_output(app.logger.name, capsys) as output:
        # When it comes
        reply = app.lambda_handler(event, lambda_context)
        printed = output.read()
    # Then it is a 400 naming the field; the reply and the log repeat the value's start, never its end
    assert reply["statusCode"] == 400
    error = json.loads(reply["body"])["error"]
    assert error["param"] == "input_type" and "'the start of a text" in error["message"]
    (record,) = [r for r in printed.at("INFO") if r["message"] == "request refused"]
    assert "'the start of a text" in record["detail"]
    assert "private end" not in reply["body"] + printed.text
