"""POST /v1/classify with the real intent classifier: the model's own scores, best first, as asked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from quantfn.models.manifest import Manifest
from quantfn.tasks import open_pipeline
from quantfn.tasks.classify import softmax
from tests.conftest import INTENT_MODEL_ID, load_event

TEXTS = ["book a table for two at an italian place tonight", "what is my checking account balance", "tell a joke"]


@pytest.fixture
def intent_dir(models_root: Path, service_env: None) -> Path:
    folder = models_root / INTENT_MODEL_ID
    if not folder.is_dir():
        pytest.skip("the intent classifier is not built (make test builds it)")
    return folder


def classify(lambda_context, **body: object) -> tuple[int, dict]:
    from functions.api.app import lambda_handler

    event = load_event("api-classify.json")
    event["body"] = json.dumps({"model": INTENT_MODEL_ID, **body})
    reply = lambda_handler(event, lambda_context)
    return reply["statusCode"], json.loads(reply["body"])


def test_classify_returns_the_models_scores_best_first(intent_dir: Path, lambda_context) -> None:
    manifest = Manifest.read(intent_dir)
    expected = open_pipeline(intent_dir, manifest, threads=1).classify(TEXTS)
    status, body = classify(lambda_context, input=TEXTS, top_k=5)
    assert status == 200, body
    assert [item["index"] for item in body["data"]] == [0, 1, 2]
    for item, row in zip(body["data"], expected, strict=True):
        labels = item["labels"]
        assert len(labels) == 5
        scores = [entry["score"] for entry in labels]
        assert scores == sorted(scores, reverse=True)
        assert labels[0]["label"] == manifest.labels[int(np.argmax(row))]
        np.testing.assert_allclose(scores, np.sort(row)[::-1][:5], atol=1e-5)
    assert body["usage"]["prompt_tokens"] > len(TEXTS)


def test_every_label_and_raw_logits_on_request(intent_dir: Path, lambda_context) -> None:
    _, probabilities = classify(lambda_context, input=TEXTS[0])
    _, raw = classify(lambda_context, input=TEXTS[0], raw_scores=True)
    labels = Manifest.read(intent_dir).labels
    assert len(probabilities["data"][0]["labels"]) == len(labels) == 157
    logits = {entry["label"]: entry["score"] for entry in raw["data"][0]["labels"]}
    probs = {entry["label"]: entry["score"] for entry in probabilities["data"][0]["labels"]}
    recomputed = softmax(np.array([logits[label] for label in labels], np.float32))
    np.testing.assert_allclose(recomputed, [probs[label] for label in labels], atol=1e-5)
    assert abs(sum(probs.values()) - 1) < 1e-3


def test_top_k_beyond_the_labels_is_a_400(intent_dir: Path, lambda_context) -> None:
    status, body = classify(lambda_context, input="hi", top_k=1000)
    assert status == 400 and body["error"]["param"] == "top_k"
