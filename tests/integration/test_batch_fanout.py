"""One job fanned out over shards and drained by concurrent poller processes, with faults (moto on 127.0.0.1).

Each poller is a separate process running the real batch handler, as Lambda's
execution environments are. After every scenario: each input line has exactly
one result or error record, the manifest exists once with the right counts (the
output bucket keeps versions, so "once" means one version of the object, and no
chunk object was ever rewritten), and a failed or killed shard never completes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest

from quantfn.batch.status import job_status
from tests.conftest import DEFAULT_MODEL_ID, ROOT

MODEL = "all-MiniLM-L6-v2"
CHUNK = 25
VISIBILITY_S = 6
MAX_RECEIVES = 4
POISON = {  # line -> (raw bytes, the error code it must become); issue 14, item 1
    3: (b'{"id": "doc-3", "text": "\\ud800 lone surrogate"}', "bad_text"),
    4: (b'{"id": "\\udfff", "text": "surrogate id"}', "bad_id"),
    5: (b'{"id": 36893488147419103232, "text": "2**65"}', "bad_id"),
    6: (b"[" * 5000 + b"]" * 5000, "bad_json"),
    7: (b'{"id": "doc-7", "text": "caf\xe9 latin-1"}', "bad_encoding"),
    8: (b'{"id": "doc-8", "text": ' + b"[" * 5000 + b"]" * 5000 + b"}", "bad_json"),
    9: (b"", "blank_line"),
}


@pytest.fixture
def fanout(aws, models_root: Path, tmp_path: Path):
    """Buckets (output versioned), a queue with a dead-letter queue, and the pollers' environment."""
    s3, sqs = boto3.client("s3"), boto3.client("sqs")
    for bucket in ("in-bucket", "out-bucket"):
        s3.create_bucket(Bucket=bucket)
    s3.put_bucket_versioning(Bucket="out-bucket", VersioningConfiguration={"Status": "Enabled"})
    dlq_url = sqs.create_queue(QueueName="fanout-dlq")["QueueUrl"]
    dlq_arn = sqs.get_queue_attributes(QueueUrl=dlq_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    redrive = json.dumps({"deadLetterTargetArn": dlq_arn, "maxReceiveCount": str(MAX_RECEIVES)})
    attributes = {"VisibilityTimeout": str(VISIBILITY_S), "RedrivePolicy": redrive}
    url = sqs.create_queue(QueueName="fanout", Attributes=attributes)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    env = os.environ | {
        "PYTHONPATH": f"{ROOT / 'shared'}:{ROOT}",
        "QUANTFN_MODEL": f"layer:{DEFAULT_MODEL_ID}",
        "QUANTFN_MODELS_ROOT": str(models_root),
        "QUANTFN_CACHE_DIR": str(tmp_path / "cache"),
        "QUANTFN_BATCH_QUEUE_URL": url,
        "QUANTFN_BATCH_CHUNK_LINES": str(CHUNK),
        "QUANTFN_BATCH_SAFETY_MS": "800",
        "QUANTFN_BATCH_SHARD_THRESHOLD_BYTES": "4096",
        "QUANTFN_BATCH_MAX_RECEIVES": str(MAX_RECEIVES),
        "QUANTFN_THREADS": "1",
        "OMP_NUM_THREADS": "1",
        "POWERTOOLS_LOG_LEVEL": "WARNING",
    }
    return Fanout(s3, sqs, url, arn, dlq_url, env, tmp_path)


class Fanout:
    def __init__(self, s3, sqs, url, arn, dlq_url, env, tmp_path) -> None:
        self.s3, self.sqs, self.url, self.arn, self.dlq_url, self.env, self.tmp = (
            s3,
            sqs,
            url,
            arn,
            dlq_url,
            env,
            tmp_path,
        )
        self.started: list[subprocess.Popen] = []

    def write_input(
        self, count: int, poison: bool = False, key: str = "in.jsonl", bucket: str = "in-bucket", id_prefix: str = "doc"
    ) -> int:
        lines = [
            json.dumps({"id": f"{id_prefix}-{n}", "text": f"passage {n} on topic {n % 13}"}).encode()
            for n in range(1, count + 1)
        ]
        for line, (raw, _) in POISON.items() if poison else ():
            lines[line - 1] = raw
        body = b"\n".join(lines) + b"\n"
        self.s3.put_object(Bucket=bucket, Key=key, Body=body)
        return len(body)

    def submit(self, job_id: str, shard_bytes: int, key: str = "in.jsonl", bucket: str = "in-bucket") -> str:
        body = json.dumps(
            {
                "job_id": job_id,
                "model": MODEL,
                "task": "embed",
                "input": {"s3_uri": f"s3://{bucket}/{key}"},
                "output": "s3://out-bucket/jobs/",
                "shard_bytes": shard_bytes,
            }
        )
        self.sqs.send_message(QueueUrl=self.url, MessageBody=body)
        return body

    def pollers(self, count: int, *flags: str) -> list[subprocess.Popen]:
        command = [
            sys.executable,
            "-m",
            "tests.integration.sqs_poller",
            "--queue-url",
            self.url,
            "--queue-arn",
            self.arn,
            "--budget-ms",
            "4000",
            "--idle-s",
            "2",
            *flags,
        ]
        procs = []
        for i in range(count):
            with open(self.tmp / f"poller-{len(self.started) + i}.log", "w") as log:  # the child keeps its copy
                procs.append(subprocess.Popen(command, cwd=ROOT, env=self.env, stdout=subprocess.DEVNULL, stderr=log))
        self.started += procs
        return procs

    def wait(self, procs: list[subprocess.Popen], timeout_s: float = 240) -> list[int]:
        deadline = time.monotonic() + timeout_s
        for proc in procs:
            try:
                proc.wait(timeout=max(1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise AssertionError(
                    f"pollers did not drain the queue within {timeout_s}s; logs in {self.tmp}"
                ) from None
        return [p.returncode for p in procs]

    def status(self, job_id: str) -> dict:
        return job_status(self.s3, "out-bucket", f"jobs/{job_id}/")

    def read(self, job_id: str) -> tuple[list[tuple[int, int, dict]], list[tuple[int, int, dict]]]:
        """(shard, line in shard, record) of every result and error record."""
        results, errors = [], []
        for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket="out-bucket", Prefix=f"jobs/{job_id}/"):
            for item in page.get("Contents", []):
                kind, _, rest = item["Key"][len(f"jobs/{job_id}/") :].partition("/")
                if kind not in ("results", "errors"):
                    continue
                shard = int(rest.split("/")[0].removeprefix("shard-"))
                body = self.s3.get_object(Bucket="out-bucket", Key=item["Key"])["Body"].read().decode()
                target = results if kind == "results" else errors
                target += [(shard, r["line"], r) for r in map(json.loads, body.splitlines())]
        return results, errors

    def rewritten(self, job_id: str) -> dict[str, int]:
        """Keys of the job written more than once (versions), except the advisory progress objects."""
        versions = Counter()
        for page in self.s3.get_paginator("list_object_versions").paginate(
            Bucket="out-bucket", Prefix=f"jobs/{job_id}/"
        ):
            for version in page.get("Versions", []):
                versions[version["Key"]] += 1
        return {k: n for k, n in versions.items() if n > 1 and "/progress/" not in k and "/failed/" not in k}

    def manifest(self, job_id: str) -> dict | None:
        try:
            return json.loads(
                self.s3.get_object(Bucket="out-bucket", Key=f"jobs/{job_id}/manifest.json")["Body"].read()
            )
        except self.s3.exceptions.NoSuchKey:
            return None

    def assert_complete_exactly_once(self, job_id: str, total: int, poison: bool = False) -> dict:
        manifest = self.manifest(job_id)
        assert manifest is not None and manifest["status"] == "complete", self.status(job_id)
        first_line = {s["index"]: s["first_line"] for s in manifest["shards"]}
        results, errors = self.read(job_id)
        lines = Counter(first_line[shard] + line - 1 for shard, line, _ in results + errors)
        assert sorted(lines) == list(range(1, total + 1)) and set(lines.values()) == {1}
        assert all(r["id"] == f"doc-{first_line[s] + line - 1}" for s, line, r in results)
        expected_errors = {line: code for line, (_, code) in POISON.items()} if poison else {}
        assert {first_line[s] + line - 1: r["error"]["code"] for s, line, r in errors} == expected_errors
        assert manifest["counts"] == {
            "lines": total,
            "results": total - len(expected_errors),
            "errors": len(expected_errors),
        }
        assert (
            len(manifest["shards"])
            == len(self.s3.list_objects_v2(Bucket="out-bucket", Prefix=f"jobs/{job_id}/shards/")["Contents"])
            > 1
        )
        assert self.rewritten(job_id) == {}  # manifest, markers, chunk objects: each written exactly once
        assert self.status(job_id)["state"] == "complete"
        print(
            f"{job_id}: {total} lines, {len(results)} results, {len(errors)} errors, {len(manifest['shards'])} shards, "
            f"{manifest['timings']['invocations']} shard invocations, 1 manifest, 0 objects rewritten"
        )
        return manifest


TOTAL = 320
SHARD_BYTES = 4000  # 4 shards of ~80 lines, 3-4 chunks each


def test_given_a_large_job_with_poison_lines_when_three_pollers_drain_it_then_each_line_has_one_record(fanout) -> None:
    size = fanout.write_input(TOTAL, poison=True)
    fanout.submit("big", SHARD_BYTES)
    assert fanout.wait(fanout.pollers(3)) == [0, 0, 0]
    manifest = fanout.assert_complete_exactly_once("big", TOTAL, poison=True)
    assert manifest["shards"][0]["start"] == 0 and manifest["shards"][-1]["end"] == size
    assert all(a["end"] == b["start"] for a, b in zip(manifest["shards"], manifest["shards"][1:], strict=False))
    assert fanout.sqs.receive_message(QueueUrl=fanout.dlq_url, WaitTimeSeconds=0).get("Messages") is None


def test_given_a_shard_that_fails_twice_when_it_is_retried_then_the_job_completes_once(fanout) -> None:
    fanout.write_input(TOTAL)
    fanout.submit("flaky", SHARD_BYTES)
    assert fanout.wait(fanout.pollers(2, "--fail-shard", "2", "--fail-times", "2")) == [0, 0]
    manifest = fanout.assert_complete_exactly_once("flaky", TOTAL)
    marker = json.loads(
        fanout.s3.get_object(Bucket="out-bucket", Key="jobs/flaky/shards/shard-00002.json")["Body"].read()
    )
    assert marker["finished_at"] <= manifest["finished_at"]


def test_given_a_shard_that_always_fails_when_it_is_dead_lettered_then_the_job_stays_visibly_incomplete(fanout) -> None:
    fanout.write_input(TOTAL)
    fanout.submit("stuck", SHARD_BYTES)
    assert fanout.wait(fanout.pollers(2, "--fail-shard", "1", "--fail-times", "99", "--fail-before-chunk")) == [0, 0]
    status = fanout.status("stuck")
    assert fanout.manifest("stuck") is None and status["state"] == "incomplete"
    assert [d["shard"] for d in status["shards"]["dead_lettered"]] == [1]
    assert status["shards"]["done"] == status["shards"]["total"] - 1
    (dead,) = fanout.sqs.receive_message(QueueUrl=fanout.dlq_url, WaitTimeSeconds=1)["Messages"]
    assert json.loads(dead["Body"])["shard"]["index"] == 1
    # Redriven once the fault is gone, the shard finishes the job, and nothing written before is rewritten.
    fanout.sqs.send_message(QueueUrl=fanout.url, MessageBody=dead["Body"])
    assert fanout.wait(fanout.pollers(1)) == [0]
    fanout.assert_complete_exactly_once("stuck", TOTAL)


def test_given_one_shard_delivered_to_two_pollers_at_once_then_nothing_is_written_twice(fanout) -> None:
    fanout.write_input(TOTAL)
    fanout.submit("twice", SHARD_BYTES)
    once = str(fanout.tmp / "duplicated")
    assert fanout.wait(fanout.pollers(3, "--duplicate-shard", "1", "--once-file", once)) == [0, 0, 0]
    assert Path(once).exists()  # the duplicate was really sent
    fanout.assert_complete_exactly_once("twice", TOTAL)


def test_given_a_poller_killed_mid_shard_when_the_message_returns_then_the_job_completes_once(fanout) -> None:
    fanout.write_input(TOTAL)
    fanout.submit("killed", SHARD_BYTES)
    (doomed,) = fanout.pollers(1, "--kill-at-chunk", "2")
    assert fanout.wait([doomed]) == [137]
    status = fanout.status("killed")
    assert fanout.manifest("killed") is None and status["state"] in ("planning", "running")
    assert status["shards"]["done"] < status["shards"]["total"]
    assert fanout.wait(fanout.pollers(2)) == [0, 0]
    fanout.assert_complete_exactly_once("killed", TOTAL)


def test_given_the_job_message_redelivered_after_planning_then_no_shard_is_sent_twice(fanout) -> None:
    fanout.write_input(TOTAL)
    body = fanout.submit("replan", SHARD_BYTES)
    fanout.write_input(50, key="other.jsonl")
    reuse = json.loads(body) | {"input": {"s3_uri": "s3://in-bucket/other.jsonl"}}
    procs = fanout.pollers(2, "--redeliver-plan")
    deadline = time.monotonic() + 60
    while "Contents" not in fanout.s3.list_objects_v2(Bucket="out-bucket", Prefix="jobs/replan/dispatched.json"):
        assert time.monotonic() < deadline, "the job was not planned"
        time.sleep(0.2)
    fanout.sqs.send_message(QueueUrl=fanout.url, MessageBody=body)  # the same job submitted again
    fanout.sqs.send_message(QueueUrl=fanout.url, MessageBody=json.dumps(reuse))  # its job_id, another input
    assert fanout.wait(procs) == [0, 0]
    manifest = fanout.assert_complete_exactly_once("replan", TOTAL)
    assert manifest["input"] == "s3://in-bucket/in.jsonl"
    # each shard ran from one message chain: one invocation chain per shard, none repeated
    assert fanout.rewritten("replan") == {}
    dead = fanout.sqs.receive_message(QueueUrl=fanout.dlq_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)["Messages"]
    assert [json.loads(m["Body"])["input"]["s3_uri"] for m in dead] == ["s3://in-bucket/other.jsonl"]


@pytest.mark.parametrize("versioned", [False, True], ids=["plain-bucket", "versioned-bucket"])
def test_given_the_input_overwritten_mid_job_then_it_never_mixes_two_files(fanout, versioned: bool) -> None:
    if versioned:
        fanout.s3.put_bucket_versioning(Bucket="in-bucket", VersioningConfiguration={"Status": "Enabled"})
    fanout.write_input(TOTAL)
    fanout.submit("moved", SHARD_BYTES)
    procs = fanout.pollers(1)
    deadline = time.monotonic() + 120
    while fanout.status("moved").get("shards", {}).get("done", 0) < 1:
        assert time.monotonic() < deadline and procs[0].poll() is None, "no shard finished"
        time.sleep(0.1)
    fanout.write_input(TOTAL, id_prefix="new")  # same key, other content
    assert fanout.wait(procs) == [0]
    if versioned:  # every read names the planned version: the job completes over the original file
        fanout.assert_complete_exactly_once("moved", TOTAL)
        return
    status = fanout.status("moved")
    assert fanout.manifest("moved") is None and status["state"] == "failed"
    assert status["error"]["code"] == "input_changed" and "in.jsonl" in status["error"]["message"]
    results, errors = fanout.read("moved")
    assert len({(s, line) for s, line, _ in results + errors}) == len(results + errors)  # no line twice
    assert results and all(r["id"].startswith("doc-") for _, _, r in results)  # only the original file's lines
    assert not errors and fanout.rewritten("moved") == {}


def test_given_the_cli_when_a_job_is_submitted_and_followed_then_status_shows_it_complete(fanout, capsys) -> None:
    from quantfn.cli import main

    fanout.write_input(TOTAL)
    args = [
        "job",
        "submit",
        "--input",
        "s3://in-bucket/in.jsonl",
        "--output",
        "s3://out-bucket/jobs/",
        "--queue",
        fanout.url,
        "--job-id",
        "cli",
        "--shard-bytes",
        str(SHARD_BYTES),
    ]
    assert main(args) == 0
    assert "quantfn job status s3://out-bucket/jobs/cli/ --watch" in capsys.readouterr().out
    assert fanout.wait(fanout.pollers(2)) == [0, 0]
    assert main(["job", "status", "s3://out-bucket/jobs/cli/", "--watch", "--interval", "0.1"]) == 0
    bar = capsys.readouterr().out
    assert "100.0%" in bar and f"lines {TOTAL:,}" in bar and "complete" in bar
    assert main(["job", "status", "s3://out-bucket/jobs/cli/", "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["shards"]["done"] == status["shards"]["total"] > 1 and status["counts"]["results"] == TOTAL
    # the same job_id over a changed input is refused before anything is sent
    fanout.write_input(TOTAL, id_prefix="new")
    assert main(args) == 2
    assert "already names a job" in capsys.readouterr().err
    assert fanout.sqs.receive_message(QueueUrl=fanout.url, WaitTimeSeconds=0).get("Messages") is None
