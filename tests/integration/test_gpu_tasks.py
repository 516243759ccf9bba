"""The GPU container serves the models it says it serves, for every task, through the same entry point."""

from __future__ import annotations

import json
import shutil
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from quantfn.config import Settings
from quantfn.models.manifest import Manifest
from quantfn.tasks import open_pipeline
from tests.conftest import DEFAULT_MODEL_ID, gpu_container, load_event, load_gpu_server

TEXTS = ["The GPU endpoint answers what Lambda cannot.", "A second sentence."]
QUERY = "What is the capital of France?"
DOCUMENTS = ["Bananas are yellow.", "Paris is the capital of France.", "The Eiffel Tower is in Paris.", "Rust."]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as reply:
        return json.loads(reply.read())


@pytest.fixture
def gpu_variant(tmp_path: Path, model_dir: Path) -> Path:
    """A models root with the default model and a distinguishable 'fp16' build (CLS pooling: other answers)."""
    root = tmp_path / "models"
    shutil.copytree(model_dir, root / DEFAULT_MODEL_ID)
    variant = root / f"{DEFAULT_MODEL_ID}-fp16"
    shutil.copytree(model_dir, variant)
    manifest = json.loads((variant / "manifest.json").read_text())
    manifest.update(model_id=variant.name, pooling="cls")
    (variant / "manifest.json").write_text(json.dumps(manifest))
    return root


def test_on_cuda_the_container_serves_the_gpu_model_it_chose(gpu_variant: Path) -> None:
    server_module = load_gpu_server()
    settings = Settings.from_env(
        {"QUANTFN_MODELS_ROOT": str(gpu_variant), "QUANTFN_SERVER_HOST": "127.0.0.1", "QUANTFN_SERVER_PORT": "0"}
    )
    # Given a machine with CUDA and the fp16 build present, the container chooses the fp16 build
    choice = server_module.choose_model(settings, ["CUDAExecutionProvider", "CPUExecutionProvider"])
    assert choice.models[0] == (DEFAULT_MODEL_ID, f"layer:{DEFAULT_MODEL_ID}-fp16")
    # When it serves that choice (on the CPU provider here: this machine has no GPU)
    cpu_choice = server_module.ModelChoice(choice.models, ("CPUExecutionProvider",), choice.reason)
    server = server_module.EndpointServer(settings, cpu_choice)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        server.load()
        url = f"http://127.0.0.1:{server.server_address[1]}"
        body = _post(f"{url}/invocations", {"model": DEFAULT_MODEL_ID, "input": TEXTS})
    finally:
        server.shutdown()
        server.server_close()
    vectors = np.array([item["embedding"] for item in body["data"]], np.float32)
    # Then the answer is the fp16 build's (CLS-pooled here), not the default model's
    fp16 = gpu_variant / f"{DEFAULT_MODEL_ID}-fp16"
    chosen = open_pipeline(fp16, Manifest.read(fp16), threads=1).embed(TEXTS)
    default = gpu_variant / DEFAULT_MODEL_ID
    other = open_pipeline(default, Manifest.read(default), threads=1).embed(TEXTS)
    assert np.sum(vectors * chosen, axis=1).min() >= 0.9999
    assert np.sum(vectors * other, axis=1).max() < 0.99


@pytest.fixture(scope="module")
def container(models_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """containers/gpu/serve as a process on 127.0.0.1 serving the default model on the CPU provider."""
    with gpu_container(models_root, tmp_path_factory.mktemp("gpu")) as url:
        yield url


def test_a_rerank_over_the_local_limit_is_answered_by_the_endpoint_as_here(
    container: str, service_env: None, monkeypatch: pytest.MonkeyPatch, lambda_context, model_dir: Path
) -> None:
    from quantfn.registry import reset_registry

    monkeypatch.setenv("QUANTFN_ENDPOINT_URL", container)
    monkeypatch.setenv("QUANTFN_MAX_INPUTS", "3")  # four documents: over the local limit, within the endpoint's
    reset_registry()
    from functions.api.app import lambda_handler

    event = load_event("api-rerank-v2.json")
    event["body"] = json.dumps({"model": "all-MiniLM-L6-v2", "query": QUERY, "documents": DOCUMENTS})
    reply = lambda_handler(event, lambda_context)
    body = json.loads(reply["body"])
    assert reply["statusCode"] == 200, body
    assert reply["headers"]["x-quantfn-route"] == "endpoint; reason=too_many_inputs"
    vectors = open_pipeline(model_dir, Manifest.read(model_dir), threads=1).embed([QUERY, *DOCUMENTS])
    expected = vectors[1:] @ vectors[0]
    got = {item["index"]: item["relevance_score"] for item in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], expected, atol=1e-4)
    assert [item["index"] for item in body["results"]] == sorted(range(4), key=lambda i: -expected[i])
