"""Embed jobs with a compact output ``format``: .npy vectors beside the records, the API's own codes, 4-32x smaller
than float32 (the real batch handler, SQS and S3 on a moto server on 127.0.0.1)."""

from __future__ import annotations

import io
import json
from pathlib import Path

import boto3
import numpy as np
import pytest

from quantfn.models.manifest import Manifest
from quantfn.tasks import open_pipeline
from quantfn.tasks.embed import typed_embeddings
from tests.conftest import DEFAULT_MODEL_ID, NO_RANGES_MODEL_ID, typed_models_env
from tests.integration.sqs_poller import EventSourceMapping
from tests.integration.test_batch_jobs import CHUNK, TimedContext, batch_env, queues, write_jsonl  # noqa: F401

LINES = CHUNK + 50  # two parts
BAD = {3: b'{"id": "doc-3"}'}


@pytest.fixture
def typed_batch(batch_env, typed_models_root: Path, monkeypatch: pytest.MonkeyPatch):  # noqa: F811
    from quantfn.registry import reset_registry

    for name, value in typed_models_env(typed_models_root).items():
        monkeypatch.setenv(name, value)
    reset_registry()
    batch_env.get_runner.cache_clear()
    return batch_env


def run_job(app, queues, job: dict) -> EventSourceMapping:  # noqa: F811 - the fixture's value, passed on
    sqs, url, arn, _ = queues
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(job))
    mapping = EventSourceMapping(sqs, url, arn, app.lambda_handler, lambda: TimedContext(budget_ms=600_000))
    mapping.drain(timeout_s=120)
    return mapping


def objects(s3, prefix: str) -> dict[str, bytes]:
    listing = s3.list_objects_v2(Bucket="out-bucket", Prefix=prefix).get("Contents", [])
    return {
        item["Key"][len(prefix) :]: s3.get_object(Bucket="out-bucket", Key=item["Key"])["Body"].read()
        for item in listing
    }


@pytest.mark.parametrize(
    ("fmt", "dtype", "width"), [("float16", np.float16, 384), ("int8", np.int8, 384), ("ubinary", np.uint8, 48)]
)
def test_a_compact_job_writes_the_apis_codes_as_npy_beside_its_records(
    typed_batch,
    queues,  # noqa: F811
    typed_models_root: Path,
    fmt: str,
    dtype: type,
    width: int,
) -> None:
    s3 = boto3.client("s3")
    for bucket in ("in-bucket", "out-bucket"):
        s3.create_bucket(Bucket=bucket)
    write_jsonl(s3, "in-bucket", "c.jsonl", LINES, BAD)
    job = {"job_id": fmt, "model": DEFAULT_MODEL_ID, "task": "embed", "format": fmt}
    run_job(typed_batch, queues, job | {"input": {"s3_uri": "s3://in-bucket/c.jsonl"}, "output": "s3://out-bucket/e/"})
    written = objects(s3, f"e/{fmt}/")
    # Then each part has its vectors file, one row per result record, in the record's order
    parts = sorted(key for key in written if key.startswith("results/"))
    assert len(parts) == 2
    folder = typed_models_root / DEFAULT_MODEL_ID
    manifest = Manifest.read(folder)
    pipeline = open_pipeline(folder, manifest, threads=2)
    rows = 0
    for part in parts:
        records = [json.loads(line) for line in written[part].decode().splitlines()]
        array = np.load(io.BytesIO(written["vectors/" + part[len("results/") :].replace(".jsonl", ".npy")]))
        assert array.dtype == dtype and array.shape == (len(records), width)
        assert [r["row"] for r in records] == list(range(len(records))) and "embedding" not in records[0]
        texts = [json.loads(line)["text"] for line in _input_lines(s3, [r["line"] for r in records[:5]])]
        floats = pipeline.embed(texts)
        if fmt == "float16":
            np.testing.assert_allclose(array[:5].astype(np.float32), floats, atol=1e-3)
        else:  # exactly the codes the API's int8 / ubinary types give
            np.testing.assert_array_equal(array[:5], typed_embeddings(floats, [fmt], manifest)[fmt])
        rows += len(records)
    assert rows == LINES - len(BAD)
    # And format.json says how to read them (int8: the manifest's ranges)
    record = json.loads(written["vectors/format.json"])
    assert record["format"] == fmt and record["row_shape"] == [width] and record["model"]["id"] == DEFAULT_MODEL_ID
    if fmt == "int8":
        assert record["ranges"]["low"] == list(manifest.embedding_ranges[384][0])
    # And the vectors are 2 (float16), 4 (int8) or 32 (ubinary) times smaller than float32's 1,536 bytes a row
    vector_bytes = sum(len(body) for key, body in written.items() if key.endswith(".npy"))
    assert vector_bytes <= rows * 1536 / {"float16": 2, "int8": 4, "ubinary": 32}[fmt] + 2 * 128  # + npy headers


def _input_lines(s3, lines: list[int]) -> list[str]:
    body = s3.get_object(Bucket="in-bucket", Key="c.jsonl")["Body"].read().decode().splitlines()
    return [body[line - 1] for line in lines]


@pytest.mark.parametrize(
    "job",
    [
        {"model": NO_RANGES_MODEL_ID, "task": "embed", "format": "int8"},  # a model built before ranges existed
        {"model": DEFAULT_MODEL_ID, "task": "embed", "format": "int4"},
        {"model": DEFAULT_MODEL_ID, "task": "classify", "format": "ubinary"},
    ],
)
def test_a_format_the_job_cannot_have_fails_the_message_with_nothing_written(
    typed_batch,
    queues,  # noqa: F811
    job: dict,
) -> None:
    sqs, url, arn, _ = queues
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="out-bucket")
    body = job | {"job_id": "bad", "input": {"texts": [{"id": 1, "text": "x"}]}, "output": "s3://out-bucket/e/"}
    sqs.send_message(QueueUrl=url, MessageBody=json.dumps(body))
    mapping = EventSourceMapping(sqs, url, arn, typed_batch.lambda_handler, lambda: TimedContext(budget_ms=60_000))
    mapping.poll_once()
    assert mapping.failures
    assert "Contents" not in s3.list_objects_v2(Bucket="out-bucket")
