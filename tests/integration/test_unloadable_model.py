"""A model that passes its hash checks but cannot load, through the API handler as Lambda calls it.

The manifest lists a file with its true sha256 and size, but onnxruntime or tokenizers
cannot read it. The API must answer 503 (not 500), /health and /v1/models must say so,
the cached folder and in-memory state must be dropped, and a later request must load
the model once it is fixed, in the same warm environment.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from pathlib import Path

import boto3
import pytest

from quantfn.registry import reset_registry as reset_service
from tests.conftest import load_event
from tests.integration.faulty_proxy import FaultyProxy

BUCKET = "quantfn-unloadable"
PREFIX = "models/all-minilm-l6-v2/"


def invoke(event: dict, context) -> tuple[int, dict]:
    from functions.api.app import lambda_handler

    reply = lambda_handler(event, context)
    return reply["statusCode"], json.loads(reply["body"])


def break_file(folder: Path, name: str) -> None:
    """Replace ``name`` with bytes no loader accepts, and record their true sha256 and size in the manifest."""
    junk = b"\x00not a model file\xff" * 64
    (folder / name).write_bytes(junk)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"sha256": hashlib.sha256(junk).hexdigest(), "size": len(junk)}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def assert_unavailable(context) -> None:
    status, body = invoke(load_event("api-embeddings.json"), context)
    assert status == 503 and body["error"]["code"] == "model_unavailable", body
    health_status, health = invoke(load_event("api-health.json"), context)
    assert health_status == 503 and health["status"] == "degraded"
    assert [m["status"] for m in health["models"]] == ["unavailable"]
    assert invoke(load_event("api-models.json"), context)[0] in (200, 503)  # JSON either way, never a 500


def assert_serving(context) -> None:
    status, body = invoke(load_event("api-embeddings.json"), context)
    assert status == 200 and len(body["data"][0]["embedding"]) == 384
    health_status, health = invoke(load_event("api-health.json"), context)
    assert health_status == 200 and health["status"] == "ok" and health["models"][0]["loaded"]
    assert invoke(load_event("api-models.json"), context)[0] == 200


@pytest.mark.parametrize("name", ["model.onnx", "tokenizer.json"])
def test_given_a_layer_model_that_verifies_but_cannot_load_then_503_unhealthy_and_it_recovers_once_fixed(
    monkeypatch, tmp_path: Path, model_dir: Path, lambda_context, name: str
) -> None:
    # Given a layer folder whose file verifies (true sha256) but is not a loadable model file
    folder = tmp_path / "models" / model_dir.name
    shutil.copytree(model_dir, folder)
    break_file(folder, name)
    monkeypatch.setenv("QUANTFN_MODEL", f"layer:{model_dir.name}")
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(tmp_path / "models"))
    monkeypatch.setenv("QUANTFN_THREADS", "1")
    reset_service()
    # When requests come, twice: both are 503 (each retries the load), and health says unhealthy
    assert_unavailable(lambda_context)
    assert_unavailable(lambda_context)
    # Then once the model is fixed, the same warm environment serves it
    shutil.rmtree(folder)
    shutil.copytree(model_dir, folder)
    assert_serving(lambda_context)
    reset_service()


def test_given_an_s3_model_that_cannot_load_then_the_cached_folder_is_dropped_and_the_fixed_model_loads(
    aws, monkeypatch, tmp_path: Path, model_dir: Path, lambda_context
) -> None:
    # Given an S3 model whose model.onnx is junk listed with its true sha256
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    break_file(broken, "model.onnx")
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for path in broken.iterdir():
        s3.upload_file(str(path), BUCKET, PREFIX + path.name)
    cache = tmp_path / "cache"
    monkeypatch.setenv("QUANTFN_MODEL", f"s3://{BUCKET}/{PREFIX}")
    monkeypatch.setenv("QUANTFN_CACHE_DIR", str(cache))
    monkeypatch.setenv("QUANTFN_THREADS", "1")
    reset_service()
    # When a request comes: 503, and no cache entry is left to fail again
    assert_unavailable(lambda_context)
    assert [p.name for p in cache.iterdir() if p.name != ".lock"] == []
    # Then the fixed model, published under the same prefix, loads in the same warm environment
    for path in model_dir.iterdir():
        s3.upload_file(str(path), BUCKET, PREFIX + path.name)
    assert_serving(lambda_context)
    reset_service()


def test_given_s3_stalled_then_the_api_answers_503_before_the_function_times_out(
    aws, monkeypatch, tmp_path: Path, model_dir: Path, lambda_context
) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    for path in model_dir.iterdir():
        s3.upload_file(str(path), BUCKET, PREFIX + path.name)
    with FaultyProxy(aws.url, fault="stall", match="manifest.json") as proxy:
        monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.url)
        monkeypatch.setenv("QUANTFN_MODEL", f"s3://{BUCKET}/{PREFIX}")
        monkeypatch.setenv("QUANTFN_CACHE_DIR", str(tmp_path / "cache"))
        monkeypatch.setenv("QUANTFN_ROUTE_MARGIN_MS", "500")
        reset_service()
        # Given 1.5 s left in the invocation and a route margin of 0.5 s
        lambda_context.remaining_ms = 1500
        started = time.monotonic()
        status, body = invoke(load_event("api-embeddings.json"), lambda_context)
        # Then the caller hears 503 (not a 404: the name may be the stalled model's) while the function still runs
        assert status == 503 and body["error"]["code"] == "model_unavailable", body
        assert time.monotonic() - started < 1.5
        proxy.set(None)
        lambda_context.remaining_ms = 29_000
        assert invoke(load_event("api-embeddings.json"), lambda_context)[0] == 200
    reset_service()
