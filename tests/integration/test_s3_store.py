"""The S3 model source through a moto server on 127.0.0.1: real HTTP, real boto3."""

from __future__ import annotations

import json
import threading
from collections import Counter
from pathlib import Path

import boto3
import numpy as np
import pytest

from quantfn.config import RuntimeSettings, Settings
from quantfn.errors import IntegrityError, ModelUnavailable
from quantfn.inference import run
from quantfn.models.reference import parse_model_ref
from quantfn.models.store import ModelStore
from quantfn.registry import Registry
from quantfn.tasks import EmbedRequest

BUCKET = "quantfn-models-test"
PREFIX = "models/all-minilm-l6-v2/"
REF = f"s3://{BUCKET}/{PREFIX}"


@pytest.fixture
def s3(aws, model_dir: Path):
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    for path in model_dir.iterdir():
        if path.is_file():
            client.upload_file(str(path), BUCKET, PREFIX + path.name)
    return client


def counted_client(counter: Counter):
    client = boto3.client("s3")

    def count(params, **_):
        counter[params["Key"].rsplit("/", 1)[-1]] += 1

    client.meta.events.register("provide-client-params.s3.GetObject", count)
    return client


def test_download_is_verified_then_reused_from_the_cache(s3, tmp_path: Path) -> None:
    settings = Settings(runtime=RuntimeSettings(cache_dir=tmp_path))
    first = ModelStore(settings).fetch(parse_model_ref(REF))
    assert first.source == "s3" and (first.path / "model.onnx").is_file()
    counter: Counter = Counter()
    again = ModelStore(settings, s3_client=counted_client(counter)).fetch(parse_model_ref(REF))
    assert again.source == "cache" and again.path == first.path
    assert counter == Counter({"manifest.json": 1})  # only the manifest is read again


def test_two_threads_asking_at_once_download_once(s3, tmp_path: Path) -> None:
    settings = Settings(runtime=RuntimeSettings(cache_dir=tmp_path))
    counter: Counter = Counter()
    stores = [ModelStore(settings, s3_client=counted_client(counter)) for _ in range(2)]
    results, barrier = [], threading.Barrier(2)

    def fetch(store: ModelStore) -> None:
        barrier.wait()
        results.append(store.fetch(parse_model_ref(REF)))

    threads = [threading.Thread(target=fetch, args=(store,)) for store in stores]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(results) == 2 and results[0].path == results[1].path
    assert counter["model.onnx"] == 1 and counter["tokenizer.json"] == 1
    assert sorted(r.source for r in results) == ["cache", "s3"]


def test_a_tampered_object_is_refused_and_nothing_is_cached(s3, tmp_path: Path, model_dir: Path) -> None:
    data = bytearray((model_dir / "tokenizer.json").read_bytes())
    data[10] ^= 0x01
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "tokenizer.json", Body=bytes(data))
    with pytest.raises(IntegrityError, match=r"sha256 of tokenizer\.json"):
        ModelStore(Settings(runtime=RuntimeSettings(cache_dir=tmp_path))).fetch(parse_model_ref(REF))
    assert [p.name for p in tmp_path.iterdir()] == [".lock"]


def test_an_incomplete_upload_is_refused(s3, tmp_path: Path) -> None:
    s3.delete_object(Bucket=BUCKET, Key=PREFIX + "model.onnx")
    with pytest.raises(ModelUnavailable, match="incomplete"):
        ModelStore(Settings(runtime=RuntimeSettings(cache_dir=tmp_path))).fetch(parse_model_ref(REF))


def test_a_truncated_object_is_refused(s3, tmp_path: Path, model_dir: Path) -> None:
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "model.onnx", Body=(model_dir / "model.onnx").read_bytes()[:1000])
    with pytest.raises(IntegrityError, match="incomplete or altered"):
        ModelStore(Settings(runtime=RuntimeSettings(cache_dir=tmp_path))).fetch(parse_model_ref(REF))


def test_a_missing_bucket_is_model_unavailable(aws, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="NoSuchBucket"):
        ModelStore(Settings(runtime=RuntimeSettings(cache_dir=tmp_path))).fetch(
            parse_model_ref("s3://no-such-bucket-here/m/x/")
        )


def test_old_versions_are_evicted_when_the_cache_budget_is_short(s3, tmp_path: Path, model_dir: Path) -> None:
    size = sum(p.stat().st_size for p in model_dir.iterdir() if p.is_file())
    settings = Settings(runtime=RuntimeSettings(cache_dir=tmp_path, cache_max_bytes=int(size * 1.5)))
    first = ModelStore(settings).fetch(parse_model_ref(REF))
    # Publish a new version under the same prefix: a different manifest is a different cache entry.
    manifest = json.loads((model_dir / "manifest.json").read_text())
    manifest["note"] = "version 2"
    s3.put_object(Bucket=BUCKET, Key=PREFIX + "manifest.json", Body=json.dumps(manifest).encode())
    second = ModelStore(settings).fetch(parse_model_ref(REF))
    assert second.path != first.path and second.source == "s3"
    assert not first.path.exists()
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith(".")) == [second.path.name]


def test_a_model_over_the_cache_budget_is_refused_with_the_setting_named(s3, tmp_path: Path) -> None:
    with pytest.raises(ModelUnavailable, match="QUANTFN_CACHE_MAX_MB"):
        ModelStore(Settings(runtime=RuntimeSettings(cache_dir=tmp_path, cache_max_bytes=1024))).fetch(
            parse_model_ref(REF)
        )


def test_the_s3_model_embeds_exactly_like_the_layer_model(s3, tmp_path: Path, models_root: Path) -> None:
    texts = ["Models can live in S3.", "Or in a Lambda layer."]
    request = EmbedRequest(texts, "all-MiniLM-L6-v2")
    from_s3 = run(
        request,
        registry=Registry(Settings(runtime=RuntimeSettings(models=(("m", REF),), cache_dir=tmp_path, threads=1))),
    )
    from_layer = run(request, registry=Registry(Settings(runtime=RuntimeSettings(models_root=models_root, threads=1))))
    np.testing.assert_array_equal(from_s3.output, from_layer.output)


def test_a_cold_s3_model_reads_each_object_once_per_request(s3, tmp_path: Path) -> None:
    # Given a function serving an S3 model it has not loaded yet
    counter: Counter = Counter()
    settings = Settings(runtime=RuntimeSettings(models=(("m", REF),), cache_dir=tmp_path, threads=1))
    registry = Registry(settings, ModelStore(settings, s3_client=counted_client(counter)))
    request = EmbedRequest(["A cold start reads the manifest once."], "m")
    # When its first request comes (the model named, the tokenizer checked, the files fetched and verified)
    assert run(request, registry=registry).output.shape == (1, 384)
    # Then every object was read once: the manifest (for the name, the tokenizer and the files) and the
    # tokenizer (for the router, then into the cache folder)
    assert counter == Counter({name: 1 for name in ("manifest.json", "model.onnx", "tokenizer.json")}), counter
    assert sorted(path.name for path in registry.store.fetch(parse_model_ref(REF)).path.iterdir()) == [
        "manifest.json",
        "model.onnx",
        "tokenizer.json",
    ]
    # And a new registry's first request in the same process (a fresh environment, the cache warm) reads it once more
    counter.clear()
    again = Registry(settings, ModelStore(settings, s3_client=counted_client(counter)))
    assert run(request, registry=again).output.shape == (1, 384)
    assert counter["manifest.json"] == 1
