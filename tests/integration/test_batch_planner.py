"""The shard planner against S3 (moto on 127.0.0.1): newline-aligned cuts from a few small ranged reads."""

from __future__ import annotations

import itertools
import json

import boto3
import pytest

from quantfn.batch.jobs import parse_job_message
from quantfn.batch.planner import plan_shards
from quantfn.batch.sources import InputChanged, iter_records
from quantfn.config import BatchSettings, Settings


class CountingS3:
    """The real client, recording the byte ranges every GetObject asked for."""

    def __init__(self, s3) -> None:
        self.s3, self.ranges = s3, []

    def get_object(self, **kwargs):
        start, _, end = kwargs["Range"].removeprefix("bytes=").partition("-")
        self.ranges.append((int(start), int(end) + 1, kwargs.get("IfMatch")))
        return self.s3.get_object(**kwargs)

    def __getattr__(self, name):
        return getattr(self.s3, name)


def job(shard_bytes: int | None = None, max_shards: int | None = None) -> object:
    body = {"job_id": "p", "model": "m", "input": {"s3_uri": "s3://plan-bucket/in.jsonl"}, "output": "s3://o/"}
    body |= {"shard_bytes": shard_bytes} if shard_bytes else {}
    body |= {"max_shards": max_shards} if max_shards else {}
    return parse_job_message(json.dumps(body), max_inline=10)


@pytest.fixture
def s3(aws):
    client = boto3.client("s3")
    client.create_bucket(Bucket="plan-bucket")
    return client


def test_given_a_large_file_when_planned_then_shards_tile_it_at_line_starts_reading_only_near_the_cuts(s3) -> None:
    lines = [json.dumps({"id": n, "text": "w" * (n % 97)}).encode() for n in range(60_000)]
    lines[5000] = json.dumps({"id": 5000, "text": "x" * 300_000}).encode()  # longer than one probe
    body = b"\n".join(lines)  # no final newline
    s3.put_object(Bucket="plan-bucket", Key="in.jsonl", Body=body)
    counting = CountingS3(s3)
    plan = plan_shards(counting, job(shard_bytes=300_000), Settings())
    shards = plan["shards"]
    assert plan["etag"] == s3.head_object(Bucket="plan-bucket", Key="in.jsonl")["ETag"]
    assert shards[0].start == 0 and shards[-1].end == len(body) and len(shards) > 10
    assert all(a.end == b.start and body[b.start - 1 : b.start] == b"\n" for a, b in itertools.pairwise(shards))
    assert all(etag == plan["etag"] for _, _, etag in counting.ranges)  # every read pinned to the version
    assert sum(end - start for start, end, _ in counting.ranges) < len(body) / 2  # never the whole file
    # reading every shard gives every line exactly once, in order
    ids = []
    for shard in shards:
        shard_job = parse_job_message(job().for_shard(shard), max_inline=10)
        ids += [r.value["id"] for r in iter_records(shard_job, s3, max_line_bytes=1 << 20)]
    assert ids == list(range(60_000))


def test_given_a_small_file_or_a_cap_then_the_shard_count_follows_the_settings(s3) -> None:
    body = b"".join(json.dumps({"id": n, "text": "t"}).encode() + b"\n" for n in range(1000))
    s3.put_object(Bucket="plan-bucket", Key="in.jsonl", Body=body)
    settings = Settings(batch=BatchSettings(shard_threshold_bytes=len(body), shard_bytes=1024))
    assert len(plan_shards(s3, job(), settings)["shards"]) == 1  # at the threshold: one shard, run in place
    assert len(
        plan_shards(s3, job(), Settings(batch=BatchSettings(shard_threshold_bytes=0, shard_bytes=4096)))["shards"]
    ) == (-(-len(body) // 4096))
    assert len(plan_shards(s3, job(shard_bytes=1024, max_shards=3), settings)["shards"]) == 3


def test_given_the_file_overwritten_after_planning_when_a_shard_reads_then_it_refuses(s3) -> None:
    s3.put_object(Bucket="plan-bucket", Key="in.jsonl", Body=b'{"id": 1, "text": "a"}\n' * 200)
    (shard, *_) = plan_shards(s3, job(shard_bytes=1024), Settings())["shards"]
    s3.put_object(Bucket="plan-bucket", Key="in.jsonl", Body=b'{"id": 2, "text": "b"}\n' * 200)
    shard_job = parse_job_message(job().for_shard(shard), max_inline=10)
    with pytest.raises(InputChanged, match=r"in\.jsonl changed"):
        list(iter_records(shard_job, s3, max_line_bytes=1024))
