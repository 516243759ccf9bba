"""One function, several models: chosen by the request, loaded lazily, kept within a memory budget."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from quantfn.models.manifest import Manifest
from quantfn.registry import estimate_memory_bytes, get_registry
from quantfn.tasks import open_pipeline
from tests.conftest import DEFAULT_MODEL_ID, load_event

TEXTS = ["A quantized model answers from a Lambda function.", "The cat sat on the warm windowsill."]


def _variant(root: Path, source: Path, model_id: str, **changes: object) -> Path:
    """A copy of the default model folder under another id, its manifest changed (same files, same hashes)."""
    folder = root / model_id
    shutil.copytree(source, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest.update(model_id=model_id, **changes)
    manifest["source"] = {**manifest["source"], "upstream": f"example/{model_id}"}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


@pytest.fixture
def three_models(tmp_path: Path, model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The default embedder and two variants that answer differently (CLS pooling; no normalisation)."""
    root = tmp_path / "models"
    root.mkdir()
    folders = {
        "mini": _variant(root, model_dir, DEFAULT_MODEL_ID),
        "mini-cls": _variant(root, model_dir, "mini-cls", pooling="cls"),
        "mini-raw": _variant(root, model_dir, "mini-raw", normalize=False),
    }
    need = estimate_memory_bytes(Manifest.read(folders["mini"]))
    budget_mb = int(need * 2.5) // 2**20 + 1  # room for two loaded models, not three
    from quantfn.registry import reset_registry

    monkeypatch.setenv("QUANTFN_MODELS", ",".join(f"{name}=layer:{f.name}" for name, f in folders.items()))
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(root))
    monkeypatch.setenv("QUANTFN_MODEL_MEMORY_MB", str(budget_mb))
    monkeypatch.setenv("QUANTFN_THREADS", "1")
    reset_registry()
    yield folders
    reset_registry()


def _embed(handler, lambda_context, model: str) -> tuple[int, dict]:
    event = load_event("api-embeddings.json")
    event["body"] = json.dumps({"model": model, "input": TEXTS})
    reply = handler(event, lambda_context)
    return reply["statusCode"], json.loads(reply["body"])


def test_three_models_alternate_under_a_budget_that_fits_two(three_models, lambda_context) -> None:
    from functions.api.app import lambda_handler

    expected = {
        name: open_pipeline(folder, Manifest.read(folder), threads=1).embed(TEXTS)
        for name, folder in three_models.items()
    }
    registry = get_registry()
    loaded_counts = []
    # When requests alternate among the three models, by name and by upstream name
    for name in ["mini", "mini-cls", "mini-raw", "mini", "example/mini-cls", "mini-raw", "mini-cls", "mini"]:
        status, body = _embed(lambda_handler, lambda_context, name)
        served = name.removeprefix("example/")
        # Then every answer is the named model's own
        assert status == 200, body
        assert body["model"] == served
        vectors = np.array([item["embedding"] for item in body["data"]], dtype=np.float32)
        np.testing.assert_allclose(vectors, expected[served], rtol=1e-4, atol=1e-5)
        loaded_counts.append(sum(model.loaded for model in registry.models))
        # And the loaded sessions never exceed the budget
        assert registry.loaded_bytes <= registry.settings.runtime.model_memory_bytes
    assert max(loaded_counts) == 2  # never three at once: the least recently used was dropped
    # The variants really differ (the test would pass trivially otherwise)
    assert not np.allclose(expected["mini"], expected["mini-cls"], atol=1e-3)
    assert np.abs(np.linalg.norm(expected["mini-raw"], axis=1) - 1).max() > 0.01


def test_models_list_shows_every_model_without_loading_any(three_models, lambda_context) -> None:
    from functions.api.app import lambda_handler

    event = load_event("api-models.json")
    reply = lambda_handler(event, lambda_context)
    body = json.loads(reply["body"])
    assert reply["statusCode"] == 200
    assert [m["id"] for m in body["data"]] == ["mini", "mini-cls", "mini-raw"]
    assert all(m["task"] == "embed" and m["dimensions"] == 384 and m["max_tokens"] == 256 for m in body["data"])
    assert not any(m["loaded"] for m in body["data"])
    assert all(model.pipeline is None for model in get_registry().models)


def test_unknown_model_is_404_and_wrong_task_is_400_without_a_session(three_models, lambda_context) -> None:
    from functions.api.app import lambda_handler

    status, body = _embed(lambda_handler, lambda_context, "no-such-model")
    assert status == 404 and body["error"]["code"] == "model_not_found"
    event = load_event("api-embeddings.json")
    event["rawPath"] = event["requestContext"]["http"]["path"] = "/v1/classify"
    event["body"] = json.dumps({"model": "mini", "input": "hello"})
    reply = lambda_handler(event, lambda_context)
    body = json.loads(reply["body"])
    assert reply["statusCode"] == 400 and body["error"]["code"] == "wrong_model_task"
    assert all(model.pipeline is None for model in get_registry().models)
