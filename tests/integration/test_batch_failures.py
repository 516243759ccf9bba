"""Every way a job message can fail writes one structured WARNING/ERROR record and a metric (moto on 127.0.0.1).

Each case drives the real batch handler with one SQS record and reads what it printed: exactly one record at
WARNING or ERROR with the job id, shard, message id, error code, a reason and what became of the message, and
the EMF metric MessagesFailed. No record holds the input's text or an S3 key: the inputs carry a marker that
must never appear in the output, and the keys are named so that a leaked one would be seen.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest

from tests.conftest import HandlerOutput, handler_output
from tests.integration.test_batch_jobs import MODEL, TimedContext, batch_env, queues  # noqa: F401 (fixtures)

SECRET = "Zanzibar-7734"  # in every input text: never in a log record
IN_KEY = "private-folder-q9/corpus.jsonl"
OUTPUT = "s3://out-bucket/secret-prefix-k4/"


def job(job_id: str = "j1", **fields: Any) -> dict[str, Any]:
    body = {"job_id": job_id, "model": MODEL, "task": "embed", "input": {"s3_uri": f"s3://in-bucket/{IN_KEY}"}}
    return body | {"output": OUTPUT} | fields


def event(body: str, message_id: str = "msg-1", receives: int = 1) -> dict[str, Any]:
    record = {"messageId": message_id, "receiptHandle": "r", "body": body, "messageAttributes": {}}
    record |= {"attributes": {"ApproximateReceiveCount": str(receives)}, "md5OfBody": "-", "eventSource": "aws:sqs"}
    record |= {"eventSourceARN": "arn:aws:sqs:us-east-1:123456789012:jobs", "awsRegion": "us-east-1"}
    return {"Records": [record]}


@pytest.fixture
def world(batch_env):  # noqa: F811
    s3 = boto3.client("s3")
    for bucket in ("in-bucket", "out-bucket"):
        s3.create_bucket(Bucket=bucket)
    lines = [json.dumps({"id": n, "text": f"{SECRET} line {n}"}) for n in range(30)]
    s3.put_object(Bucket="in-bucket", Key=IN_KEY, Body="\n".join(lines).encode())
    return batch_env, s3


@pytest.fixture
def output(world, capsys: pytest.CaptureFixture[str]) -> Iterator[HandlerOutput]:
    with handler_output(world[0].logger.name, capsys) as printed:
        yield printed


def run(app, body: str, receives: int = 1) -> dict:
    return app.lambda_handler(event(body, receives=receives), TimedContext(budget_ms=60_000))


def planned_shard_message(app, s3, **checkpoint: int) -> str:
    """The job planned (one shard, run to its end), then a message for that shard as the planner would send it."""
    assert run(app, json.dumps(job())) == {"batchItemFailures": []}
    plan = json.loads(s3.get_object(Bucket="out-bucket", Key="secret-prefix-k4/j1/job.json")["Body"].read())
    body = job() | {"shard": plan["shards"][0]}
    return json.dumps(body | ({"checkpoint": checkpoint} if checkpoint else {}))


def forged_shard(app, s3) -> str:
    body = json.loads(planned_shard_message(app, s3))
    body["shard"]["end"] += 100  # past the input's size
    return json.dumps(body)


def reused_job_id(app, s3) -> str:
    assert run(app, json.dumps(job())) == {"batchItemFailures": []}
    return json.dumps(job(task="classify"))


def missing_output_bucket(app, s3) -> str:
    return json.dumps(job(output="s3://no-such-bucket-z/out/"))


def input_changed(app, s3) -> str:
    body = planned_shard_message(app, s3)
    s3.delete_object(Bucket="out-bucket", Key="secret-prefix-k4/j1/shards/shard-00000.json")  # not yet done
    s3.put_object(Bucket="in-bucket", Key=IN_KEY, Body=b'{"id": 1, "text": "replaced"}\n')  # an unversioned bucket
    return body


# name -> (the message, made in the world; error code; job_id and shard in the record; action; level)
CASES: dict[str, tuple[Callable[[Any, Any], str], str, str | None, int | None, str, str]] = {
    "not-json": (lambda a, s: "this is not a job", "bad_job", None, None, "retry", "WARNING"),
    "not-an-object": (lambda a, s: "[1, 2]", "bad_job", None, None, "retry", "WARNING"),
    "bad-job-id": (lambda a, s: json.dumps(job("../x")), "bad_job", None, None, "retry", "WARNING"),
    "unknown-field": (lambda a, s: json.dumps(job(shard_byte=4096)), "bad_job", "j1", None, "retry", "WARNING"),
    "output-not-s3": (lambda a, s: json.dumps(job(output="/tmp/out")), "bad_job", "j1", None, "retry", "WARNING"),
    "no-input": (lambda a, s: json.dumps({"job_id": "j1", "model": MODEL}), "bad_job", "j1", None, "retry", "WARNING"),
    "unknown-model": (lambda a, s: json.dumps(job(model="gpt-17")), "model_not_found", "j1", None, "retry", "WARNING"),
    "input-missing": (
        lambda a, s: json.dumps(job(input={"s3_uri": "s3://in-bucket/private-folder-q9/gone.jsonl"})),
        "bad_job",
        "j1",
        None,
        "retry",
        "WARNING",
    ),
    "reused-job-id": (reused_job_id, "bad_job", "j1", None, "retry", "WARNING"),
    "checkpoint-not-a-number": (
        lambda a, s: json.dumps(job(shard={"index": 0, "count": 1, "start": 0, "end": 9}, checkpoint={"chunk": "x"})),
        "bad_job",
        "j1",
        0,
        "retry",
        "WARNING",
    ),
    "checkpoint-negative": (
        lambda a, s: planned_shard_message(a, s, chunk=-1, offset=-5, line=0, results=0, errors=0, invocations=0),
        "bad_job",
        "j1",
        0,
        "retry",
        "WARNING",
    ),
    "shard-not-planned": (forged_shard, "bad_job", "j1", 0, "retry", "WARNING"),
    "output-bucket-missing": (missing_output_bucket, "dependency_failed", "j1", None, "retry", "WARNING"),
    "input-changed": (input_changed, "input_changed", "j1", 0, "job_failed", "ERROR"),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_given_a_failing_message_then_one_record_says_which_job_and_why_and_a_metric_counts_it(
    name: str, world, output: HandlerOutput
) -> None:
    app, s3 = world
    make, code, job_id, shard, action, level = CASES[name]
    body = make(app, s3)
    output.read()  # only what the failing message prints
    # When the handler gets the message
    reply = run(app, body)
    # Then a message that may succeed later is reported failed (SQS returns it); one whose job failed is not
    assert reply["batchItemFailures"] == ([{"itemIdentifier": "msg-1"}] if action == "retry" else [])
    printed = output.read()
    (failure,) = printed.at("WARNING", "ERROR")
    assert (failure["level"], failure["error_code"], failure["action"]) == (level, code, action), failure
    # (Powertools leaves out a key whose value is None: a job id that could not be read, a job without a shard)
    assert (failure.get("job_id"), failure.get("shard"), failure["message_id"]) == (job_id, shard, "msg-1")
    assert failure["reason"] and failure["message"] == "job message failed"
    assert printed.metrics["MessagesFailed"] == [{"namespace": "quantfn", "service": "quantfn-batch"}]
    # and nothing printed holds the input's text or the input's or output's key
    for leaked in (SECRET, "private-folder-q9", "secret-prefix-k4"):
        assert leaked not in printed.text, (leaked, printed.text)


def test_given_a_shard_failing_its_last_receive_then_the_record_says_dead_lettered_and_the_job_names_it(
    world, output: HandlerOutput, monkeypatch: pytest.MonkeyPatch
) -> None:
    app, s3 = world
    body = planned_shard_message(app, s3)
    s3.delete_object(Bucket="out-bucket", Key="secret-prefix-k4/j1/shards/shard-00000.json")
    s3.delete_object(Bucket="out-bucket", Key="secret-prefix-k4/j1/manifest.json")
    from quantfn.batch import runner

    def disk_gone(*args: Any) -> dict:
        raise OSError("/opt/models/x: disk gone")

    monkeypatch.setattr(runner, "model_record", disk_gone)  # fails as the shard writes its marker
    output.read()
    reply = run(app, body, receives=3)  # MaxReceiveCount 3: the queue's redrive moves it after this receive
    assert reply["batchItemFailures"] == [{"itemIdentifier": "msg-1"}]
    printed = output.read()
    (failure,) = printed.at("WARNING", "ERROR")
    assert (failure["level"], failure["error_code"], failure["action"]) == ("ERROR", "internal_error", "dead_lettered")
    assert failure["reason"] == "OSError" and failure["shard"] == 0 and "MessagesFailed" in printed.metrics
    assert "/opt/models" not in printed.text  # the exception's message held a path: the reason is its class
    dead = json.loads(
        s3.get_object(Bucket="out-bucket", Key="secret-prefix-k4/j1/failed/shard-00000.json")["Body"].read()
    )
    assert dead["code"] == "internal_error" and "redrive" in dead["message"]


def test_given_a_dead_letter_queue_then_a_bad_message_goes_there_at_once_with_its_reason(
    world,
    queues,  # noqa: F811
    output: HandlerOutput,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app, _ = world
    sqs, _, _, dlq_url = queues
    monkeypatch.setenv("QUANTFN_BATCH_DEAD_LETTER_URL", dlq_url)
    from quantfn.registry import reset_registry

    reset_registry()
    app.get_runner.cache_clear()
    # When a message that can never succeed arrives for the first time
    reply = run(app, json.dumps(job(model="gpt-17")))
    # Then it is acknowledged, not retried for hours, and waits in the dead-letter queue with why
    assert reply == {"batchItemFailures": []}
    (dead,) = sqs.receive_message(QueueUrl=dlq_url, MessageAttributeNames=["All"], WaitTimeSeconds=1)["Messages"]
    assert json.loads(dead["Body"])["model"] == "gpt-17"
    attributes = {k: v["StringValue"] for k, v in dead["MessageAttributes"].items()}
    assert attributes["quantfn_error_code"] == "model_not_found" and attributes["quantfn_message_id"] == "msg-1"
    (failure,) = output.read().at("WARNING", "ERROR")
    assert (failure["level"], failure["action"], failure["status"]) == ("ERROR", "dead_lettered", "dead_lettered")
    # and a message that may succeed later is still retried, not dead-lettered
    assert run(app, json.dumps(job(output="s3://no-such-bucket-z/out/"))) == {
        "batchItemFailures": [{"itemIdentifier": "msg-1"}]
    }


def test_given_the_dead_letter_queue_refuses_then_the_bad_message_stays_in_its_queue(world, monkeypatch) -> None:
    app, _ = world
    monkeypatch.setenv("QUANTFN_BATCH_DEAD_LETTER_URL", "http://127.0.0.1:9/123456789012/none")
    app.get_runner.cache_clear()
    from quantfn.registry import reset_registry

    reset_registry()
    assert run(app, "not a job") == {"batchItemFailures": [{"itemIdentifier": "msg-1"}]}
