"""Batch jobs end to end: real SQS semantics (moto server on 127.0.0.1), the real handler, real S3 output."""

from __future__ import annotations

import json
import time
import tracemalloc
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import boto3
import pytest

from quantfn.batch.jobs import Shard, parse_job_message
from quantfn.batch.sources import iter_records
from quantfn.modelbuild.reference import load_corpus
from tests.conftest import DEFAULT_MODEL_ID, EVENTS
from tests.integration.sqs_poller import EventSourceMapping

MODEL = "all-MiniLM-L6-v2"
CHUNK = 400


@dataclass
class TimedContext:
    """A Lambda context whose remaining time really runs down from ``budget_ms``."""

    budget_ms: int
    function_name: str = "quantfn-batch"
    memory_limit_in_mb: int = 3008
    invoked_function_arn: str = "arn:aws:lambda:us-east-1:123456789012:function:quantfn-batch"
    aws_request_id: str = "req"

    def __post_init__(self) -> None:
        self.deadline = time.monotonic() + self.budget_ms / 1000

    def get_remaining_time_in_millis(self) -> int:
        return max(0, int((self.deadline - time.monotonic()) * 1000))


@pytest.fixture
def queues(aws):
    sqs = boto3.client("sqs")
    dlq_url = sqs.create_queue(QueueName="jobs-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": "3"})
    url = sqs.create_queue(QueueName="jobs", Attributes={"VisibilityTimeout": "1", "RedrivePolicy": redrive})[
        "QueueUrl"
    ]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    return sqs, url, arn, dlq_url


@pytest.fixture
def batch_env(monkeypatch: pytest.MonkeyPatch, models_root: Path, tmp_path: Path, queues):
    from functions.batch import app
    from quantfn.registry import reset_registry

    _, url, _, _ = queues
    monkeypatch.setenv("QUANTFN_MODEL", f"layer:{DEFAULT_MODEL_ID}")
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(models_root))
    monkeypatch.setenv("QUANTFN_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("QUANTFN_BATCH_QUEUE_URL", url)
    monkeypatch.setenv("QUANTFN_BATCH_CHUNK_LINES", str(CHUNK))
    monkeypatch.setenv("QUANTFN_BATCH_SAFETY_MS", "1500")
    monkeypatch.setenv("QUANTFN_MAX_INPUT_TOKENS", "300")
    monkeypatch.setenv("QUANTFN_THREADS", "2")
    reset_registry()
    app.get_runner.cache_clear()
    yield app
    app.get_runner.cache_clear()
    reset_registry()


def write_jsonl(s3, bucket: str, key: str, count: int, bad: dict[int, bytes]) -> None:
    corpus = load_corpus()
    lines = []
    for line in range(1, count + 1):
        if line in bad:
            lines.append(bad[line])
        else:
            lines.append(json.dumps({"id": f"doc-{line}", "text": corpus[line % len(corpus)]}).encode())
    s3.put_object(Bucket=bucket, Key=key, Body=b"\n".join(lines) + b"\n")


def read_outputs(s3, bucket: str, prefix: str) -> tuple[list[dict], list[dict], dict | None]:
    results, errors, manifest = [], [], None
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            body = s3.get_object(Bucket=bucket, Key=item["Key"])["Body"].read().decode()
            if item["Key"].endswith("/manifest.json"):
                manifest = json.loads(body)
            elif "/results/" in item["Key"] or "/errors/" in item["Key"]:
                target = results if "/results/" in item["Key"] else errors
                target += [json.loads(line) for line in body.splitlines()]
    return results, errors, manifest


def job_message(job_id: str, source: dict, output: str = "s3://out-bucket/embeddings/") -> str:
    return json.dumps({"job_id": job_id, "model": MODEL, "task": "embedding", "input": source, "output": output})


def test_a_mixed_queue_completes_with_every_line_accounted_for(batch_env, queues) -> None:
    sqs, url, arn, dlq_url = queues
    s3 = boto3.client("s3")
    for bucket in ("in-bucket", "out-bucket"):
        s3.create_bucket(Bucket=bucket)
    bad = {
        7: b'{"id": "doc-7", "text": "unterminated',
        50: b'{"id": "doc-50"}',
        51: b'{"id": "doc-51", "text": "   "}',
        52: json.dumps({"id": "doc-52", "text": "word " * 400}).encode(),
        401: b"",
        900: b'["not", "an", "object"]',
    }
    total = 1000
    write_jsonl(s3, "in-bucket", "corpus.jsonl", total, bad)
    # Given a large file, an inline job, a poison message and a job whose output bucket is missing at first
    sqs.send_message(QueueUrl=url, MessageBody=job_message("big", {"s3_uri": "s3://in-bucket/corpus.jsonl"}))
    sqs.send_message(
        QueueUrl=url, MessageBody=job_message("inline", {"texts": [{"id": 1, "text": "one"}, {"id": 2, "text": "two"}]})
    )
    sqs.send_message(QueueUrl=url, MessageBody="this is not a job")
    late_output = "s3://late-bucket/x/"
    sqs.send_message(
        QueueUrl=url, MessageBody=job_message("late", {"texts": [{"id": "a", "text": "late"}]}, late_output)
    )

    # 1.6 s against the fixture's 1.5 s safety margin: after any chunk slower than 50 ms the runner must hand the
    # rest of the file to a follow-up message (2.5 s let a fast host finish all 1,000 lines in one invocation)
    mapping = EventSourceMapping(sqs, url, arn, batch_env.lambda_handler, lambda: TimedContext(budget_ms=1600))

    def create_late_bucket_after_a_failure() -> None:
        if mapping.failures and "late-bucket" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
            s3.create_bucket(Bucket="late-bucket")

    # When the event source mapping drains the queue
    mapping.drain(timeout_s=180, between=create_late_bucket_after_a_failure)

    # Then every input line has exactly one result or one error record
    results, errors, manifest = read_outputs(s3, "out-bucket", "embeddings/big/")
    lines = Counter([r["line"] for r in results] + [e["line"] for e in errors])
    assert sorted(lines) == list(range(1, total + 1)) and set(lines.values()) == {1}
    assert {e["line"]: e["error"]["code"] for e in errors} == {
        7: "bad_json",
        50: "missing_text",
        51: "empty_text",
        52: "text_too_long",
        401: "blank_line",
        900: "bad_record",
    }
    assert all(r["id"] == f"doc-{r['line']}" and len(r["embedding"]) == 384 for r in results)
    assert manifest["counts"] == {"lines": total, "results": total - len(bad), "errors": len(bad)}
    assert manifest["parts"] == -(-total // CHUNK)
    assert manifest["timings"]["invocations"] >= 2  # it ran out of time mid-file and continued
    assert manifest["model"]["id"] == DEFAULT_MODEL_ID and len(manifest["model"]["sha256"]) == 64
    # the inline job and the late job completed; the late one only after a retry
    assert read_outputs(s3, "out-bucket", "embeddings/inline/")[2]["counts"]["results"] == 2
    assert read_outputs(s3, "late-bucket", "x/late/")[2]["counts"]["results"] == 1
    # and the poison message sits in the dead-letter queue, body intact
    dead = sqs.receive_message(QueueUrl=dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    assert [m["Body"] for m in dead] == ["this is not a job"]


def test_a_missing_model_fails_the_message_and_the_retry_succeeds_once_it_is_published(
    batch_env, queues, monkeypatch: pytest.MonkeyPatch, models_root: Path, tmp_path: Path
) -> None:
    sqs, url, arn, dlq_url = queues
    monkeypatch.setenv("QUANTFN_MODELS_ROOT", str(tmp_path / "layer"))  # nothing there yet
    batch_env.get_runner.cache_clear()
    from quantfn.registry import reset_registry

    reset_registry()
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="out-bucket")
    sqs.send_message(QueueUrl=url, MessageBody=job_message("m", {"texts": [{"id": 1, "text": "hello"}]}))
    mapping = EventSourceMapping(sqs, url, arn, batch_env.lambda_handler, lambda: TimedContext(budget_ms=60_000))
    mapping.poll_once()
    assert len(mapping.failures) == 1
    assert "Contents" not in s3.list_objects_v2(Bucket="out-bucket")  # nothing half-written

    (tmp_path / "layer").symlink_to(models_root, target_is_directory=True)  # the model is published
    mapping.drain(timeout_s=30)
    assert read_outputs(s3, "out-bucket", "embeddings/m/")[2]["counts"]["results"] == 1
    assert sqs.receive_message(QueueUrl=dlq_url, WaitTimeSeconds=0).get("Messages") is None


def test_redelivery_and_reruns_never_duplicate_or_rewrite_results(batch_env, queues) -> None:
    sqs, url, arn, _ = queues
    s3 = boto3.client("s3")
    for bucket in ("in-bucket", "out-bucket"):
        s3.create_bucket(Bucket=bucket)
    write_jsonl(s3, "in-bucket", "c.jsonl", 2 * CHUNK + 10, {})
    body = job_message("again", {"s3_uri": "s3://in-bucket/c.jsonl"})
    mapping = EventSourceMapping(sqs, url, arn, batch_env.lambda_handler, lambda: TimedContext(budget_ms=600_000))
    sqs.send_message(QueueUrl=url, MessageBody=body)
    mapping.drain(timeout_s=60)
    listing = s3.list_objects_v2(Bucket="out-bucket", Prefix="embeddings/again/")["Contents"]
    etags = {item["Key"]: item["ETag"] for item in listing}

    # A re-delivered original after the job finished is recognised and skipped
    sqs.send_message(QueueUrl=url, MessageBody=body)
    mapping.drain(timeout_s=30)
    assert {
        i["Key"]: i["ETag"] for i in s3.list_objects_v2(Bucket="out-bucket", Prefix="embeddings/again/")["Contents"]
    } == etags

    # A re-delivery that finds some chunks done (the manifest not yet written) redoes only the rest,
    # and a chunk written twice has the same bytes: deterministic keys, deterministic content.
    s3.delete_object(Bucket="out-bucket", Key="embeddings/again/manifest.json")
    s3.delete_object(Bucket="out-bucket", Key="embeddings/again/results/shard-00000/part-000001.jsonl")
    s3.delete_object(Bucket="out-bucket", Key="embeddings/again/shards/shard-00000.json")  # died before its marker
    sqs.send_message(QueueUrl=url, MessageBody=body)
    mapping.drain(timeout_s=60)
    after = {
        i["Key"]: i["ETag"] for i in s3.list_objects_v2(Bucket="out-bucket", Prefix="embeddings/again/")["Contents"]
    }

    def outputs(listing: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in listing.items() if "/results/" in k or "/errors/" in k}

    assert outputs(after) == outputs(etags) and len(outputs(after)) == 3
    results, errors, manifest = read_outputs(s3, "out-bucket", "embeddings/again/")
    assert len(results) == len({r["line"] for r in results}) == 2 * CHUNK + 10 and not errors
    assert manifest["counts"]["results"] == 2 * CHUNK + 10


def test_streaming_a_large_file_keeps_memory_bounded(aws) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="big")
    line = json.dumps({"id": 0, "text": "x" * 200}).encode()
    s3.put_object(Bucket="big", Key="f.jsonl", Body=b"\n".join([line] * 100_000))  # ~22 MB, no final newline
    job = parse_job_message(job_message("mem", {"s3_uri": "s3://big/f.jsonl"}), max_inline=10)
    tracemalloc.start()
    count = last_end = 0
    for record in iter_records(job, s3, max_line_bytes=4096):
        count += 1
        last_end = record.end_offset
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert count == 100_000 and last_end == 100_000 * (len(line) + 1) - 1
    assert peak < 8 * 2**20, peak  # the file is ~22 MB; records are not accumulated


def test_a_checkpoint_resumes_at_exactly_the_next_line(aws) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="resume-bucket")
    body = b'{"id":1,"text":"a"}\r\n\n' + b"x" * 100 + b'\n{"id":4,"text":"d"}'
    s3.put_object(Bucket="resume-bucket", Key="f.jsonl", Body=body)
    job = parse_job_message(job_message("r", {"s3_uri": "s3://resume-bucket/f.jsonl"}), max_inline=10)
    job = replace(job, shard=Shard(0, 1, 0, len(body)))  # a follow-up continues a shard
    records = list(iter_records(job, s3, max_line_bytes=50))
    assert [(r.line, r.problem[0] if r.problem else r.value["id"]) for r in records] == [
        (1, 1),
        (2, "blank_line"),
        (3, "line_too_long"),
        (4, 4),
    ]
    resumed = job.checkpoint.advance(lines=2, results=1, errors=1, offset=records[1].end_offset, compute_ms=0)
    again = list(iter_records(parse_job_message(job.follow_up(resumed), max_inline=10), s3, max_line_bytes=50))
    assert [r.line for r in again] == [3, 4] and again[-1].value == {"id": 4, "text": "d"}


SQS_EVENTS = {  # file -> message ids the handler must report as failed
    "sqs-batch-job.json": [],
    "sqs-batch-job-inline.json": [],
    "sqs-batch-bad-message.json": ["6c8f3b1e-2f0a-4c7b-9d1e-8a5b4c3d2e1f"],
}


def test_every_sqs_event_file_has_an_expectation() -> None:
    assert sorted(p.name for p in EVENTS.glob("sqs-*.json")) == sorted(SQS_EVENTS)


@pytest.mark.parametrize("name", sorted(SQS_EVENTS))
def test_sample_sqs_events_give_their_partial_batch_response(name: str, batch_env) -> None:
    s3 = boto3.client("s3")
    for bucket in ("quantfn-example-input", "quantfn-example-output"):
        s3.create_bucket(Bucket=bucket)
    write_jsonl(s3, "quantfn-example-input", "corpus/sentences.jsonl", 20, {})
    event = json.loads((EVENTS / name).read_text())
    reply = batch_env.lambda_handler(event, TimedContext(budget_ms=60_000))
    assert [item["itemIdentifier"] for item in reply["batchItemFailures"]] == SQS_EVENTS[name]
    for record in event["Records"]:
        if record["messageId"] not in SQS_EVENTS[name]:
            job = parse_job_message(record["body"], max_inline=256)
            manifest = read_outputs(s3, job.output.bucket, job.prefix)[2]
            assert manifest["status"] == "complete" and manifest["counts"]["errors"] == 0


def test_given_one_message_per_invocation_when_it_fails_then_the_reply_names_it_instead_of_raising(batch_env) -> None:
    # issue 14, item 10: with BatchSize 1 every record of the batch failing is the normal case, not an exception
    event = json.loads((EVENTS / "sqs-batch-job.json").read_text())
    event["Records"][0]["body"] = json.dumps({"job_id": "x", "model": MODEL})  # no input, no output
    reply = batch_env.lambda_handler(event, TimedContext(budget_ms=10_000))
    assert reply == {"batchItemFailures": [{"itemIdentifier": event["Records"][0]["messageId"]}]}


def test_given_a_rerank_job_then_each_line_gets_its_documents_ranked_or_an_error(batch_env) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="out-bucket")
    lines = [
        {"id": "q1", "query": "a cat on a mat", "documents": ["stock prices fell", "the cat sat on the mat"]},
        {"id": "q2", "query": "no documents", "documents": []},
    ]
    body = json.dumps({"job_id": "rr", "model": MODEL, "task": "rerank", "input": {"texts": lines}})
    event = json.loads((EVENTS / "sqs-batch-job.json").read_text())
    event["Records"][0]["body"] = body[:-1] + ', "output": "s3://out-bucket/embeddings/"}'
    assert batch_env.lambda_handler(event, TimedContext(budget_ms=60_000)) == {"batchItemFailures": []}
    results, errors, manifest = read_outputs(s3, "out-bucket", "embeddings/rr/")
    (result,) = results
    assert result["id"] == "q1" and [r["index"] for r in result["results"]] == [1, 0]  # best first
    assert [(e["line"], e["error"]["code"]) for e in errors] == [(2, "missing_documents")]
    assert manifest["task"] == "rerank" and manifest["counts"] == {"lines": 2, "results": 1, "errors": 1}
