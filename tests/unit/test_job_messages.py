from __future__ import annotations

import json

import pytest

from quantfn.batch.jobs import BadJob, Checkpoint, parse_job_message

GOOD = {"job_id": "j-1", "model": "all-MiniLM-L6-v2", "input": {"s3_uri": "s3://in/a.jsonl"}, "output": "s3://out/res"}


def test_a_good_message_parses_and_the_output_becomes_a_prefix() -> None:
    job = parse_job_message(json.dumps(GOOD), max_inline=10)
    assert (job.input_uri.bucket, job.input_uri.key) == ("in", "a.jsonl")
    assert job.prefix == "res/j-1/"
    assert job.checkpoint == Checkpoint()


def test_a_follow_up_round_trips_with_its_checkpoint() -> None:
    job = parse_job_message(json.dumps(GOOD), max_inline=10)
    checkpoint = job.checkpoint.advance(lines=5, results=4, errors=1, offset=300, compute_ms=12.5)
    again = parse_job_message(job.follow_up(checkpoint), max_inline=10)
    assert again.checkpoint == checkpoint and again.checkpoint.chunk == 1
    assert (again.job_id, again.model, again.input_uri, again.output) == (
        job.job_id,
        job.model,
        job.input_uri,
        job.output,
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ("not json", None),
        ("[1]", None),
        (json.dumps({**GOOD, "job_id": "../etc"}), "job_id"),
        (json.dumps({**GOOD, "model": ""}), "model"),
        (json.dumps({**GOOD, "task": "translate"}), "task"),
        (json.dumps({**GOOD, "shard_bytes": 10}), "shard_bytes"),
        (json.dumps({**GOOD, "max_shards": 0}), "max_shards"),
        (json.dumps({**GOOD, "shard": {"index": 3, "count": 2, "start": 0, "end": 9}}), "shard"),
        (json.dumps({**GOOD, "output": "/tmp/out"}), "output"),
        (json.dumps({**GOOD, "input": {"s3_uri": "s3://bucket-only"}}), "input.s3_uri"),
        (json.dumps({**GOOD, "input": {"texts": []}}), "input.texts"),
        (json.dumps({**GOOD, "input": {"texts": [{"id": 1, "text": "a"}] * 11}}), "input.texts"),
        (json.dumps({**GOOD, "input": {"url": "http://x"}}), "input"),
        (json.dumps({**GOOD, "checkpoint": {"chunk": 1, "bogus": 2}}), "checkpoint"),
    ],
)
def test_unusable_messages_are_refused_naming_the_field(body: str, param: str | None) -> None:
    with pytest.raises(BadJob) as caught:
        parse_job_message(body, max_inline=10)
    assert caught.value.param == param


def test_given_a_shard_message_when_it_continues_then_shard_and_checkpoint_round_trip() -> None:
    from quantfn.batch.jobs import Shard

    job = parse_job_message(json.dumps(GOOD | {"shard_bytes": 4096, "max_shards": 8}), max_inline=10)
    assert (job.shard_bytes, job.max_shards, job.shard) == (4096, 8, None)
    shard = Shard(index=2, count=5, start=1000, end=2000, etag='"abc"', version_id="v1")
    first = parse_job_message(job.for_shard(shard), max_inline=10)
    assert first.shard == shard and first.checkpoint == Checkpoint(offset=1000)
    later = first.checkpoint.advance(lines=3, results=3, errors=0, offset=1200, compute_ms=1.0)
    again = parse_job_message(first.follow_up(later), max_inline=10)
    assert (again.shard, again.checkpoint) == (shard, later)


def test_the_old_task_name_still_reads_as_embed() -> None:
    assert parse_job_message(json.dumps(GOOD | {"task": "embedding"}), max_inline=10).task == "embed"
