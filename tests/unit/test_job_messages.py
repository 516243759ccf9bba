from __future__ import annotations

import json

import pytest

from quantfn.batch.jobs import BadJob, Checkpoint, parse_job_message

SHARD = {"index": 0, "count": 2, "start": 0, "end": 1000, "etag": '"e"', "version_id": ""}
GOOD = {"job_id": "j-1", "model": "all-MiniLM-L6-v2", "input": {"s3_uri": "s3://in/a.jsonl"}, "output": "s3://out/res"}


def test_a_good_message_parses_and_the_output_becomes_a_prefix() -> None:
    job = parse_job_message(json.dumps(GOOD), max_inline=10)
    assert (job.input_uri.bucket, job.input_uri.key) == ("in", "a.jsonl")
    assert job.prefix == "res/j-1/"
    assert job.checkpoint == Checkpoint()


def test_a_follow_up_round_trips_with_its_checkpoint() -> None:
    job = parse_job_message(json.dumps(GOOD | {"shard": SHARD}), max_inline=10)
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
        (json.dumps({**GOOD, "shard": {"index": 3, "count": 2, "start": 0, "end": 9}}), "shard.index"),
        (json.dumps({**GOOD, "output": "/tmp/out"}), "output"),
        (json.dumps({**GOOD, "input": {"s3_uri": "s3://bucket-only"}}), "input.s3_uri"),
        (json.dumps({**GOOD, "input": {"texts": []}}), "input.texts"),
        (json.dumps({**GOOD, "input": {"texts": [{"id": 1, "text": "a"}] * 11}}), "input.texts"),
        (json.dumps({**GOOD, "input": {"url": "http://x"}}), "input"),
        (json.dumps({**GOOD, "checkpoint": {"chunk": 1, "bogus": 2}}), "checkpoint"),
        (json.dumps({**GOOD, "shard_byte": 4096}), "shard_byte"),  # a typo is refused, not ignored
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


def shard_message(shard: object = None, checkpoint: object = None, **extra: object) -> str:
    body = GOOD | {"shard": SHARD if shard is None else shard} | extra
    return json.dumps(body | ({"checkpoint": checkpoint} if checkpoint is not None else {}))


DONE = {"chunk": 2, "offset": 400, "line": 20, "results": 19, "errors": 1, "invocations": 1, "compute_ms": 5.0}


@pytest.mark.parametrize(
    ("body", "param"),
    [
        # the examples: a checkpoint that was silently ignored and the job restarted
        (shard_message(checkpoint={"chunk": "x"}), "checkpoint"),
        (shard_message(checkpoint=DONE | {"chunk": -1, "offset": -5}), "checkpoint.chunk"),
        (shard_message(checkpoint=DONE | {"chunk": "1"}), "checkpoint.chunk"),
        (shard_message(checkpoint=DONE | {"line": True}), "checkpoint.line"),
        (shard_message(checkpoint=DONE | {"offset": 1001}), "checkpoint.offset"),  # past the shard's end
        (shard_message(SHARD | {"start": 500}, DONE), "checkpoint.offset"),  # before the shard's start
        (shard_message(checkpoint=DONE | {"results": 20}), "checkpoint"),  # more results and errors than lines
        (shard_message(checkpoint=DONE | {"chunk": 0}), "checkpoint"),  # lines done in no chunk
        (shard_message(checkpoint=DONE | {"offset": 0}), "checkpoint"),  # lines done, no byte read
        (shard_message(checkpoint=DONE | {"compute_ms": float("nan")}), "checkpoint.compute_ms"),
        (shard_message(checkpoint=[1, 2]), "checkpoint"),
        (json.dumps(GOOD | {"checkpoint": DONE}), "checkpoint"),  # a checkpoint without its shard
        (shard_message(SHARD | {"end": -1}), "shard.end"),
        (shard_message(SHARD | {"start": 10, "end": 5}), "shard.end"),
        (shard_message(SHARD | {"count": 0}), "shard.count"),
        (shard_message(SHARD | {"index": 1.0}), "shard.index"),
        (shard_message(SHARD | {"etag": 7}), "shard.etag"),
        (shard_message({"index": 0, "count": 1, "start": 0}), "shard"),
        (shard_message(SHARD | {"extra": 1}), "shard"),
        (shard_message("shard-00000"), "shard"),
        (shard_message(SHARD | {"end": 3}, input={"texts": [{"id": 1, "text": "a"}]}), "shard.end"),
        (
            shard_message(SHARD | {"end": 1}, DONE | {"offset": 1}, input={"texts": [{"id": 1, "text": "a"}]}),
            "checkpoint",
        ),
    ],
)
def test_given_a_bad_shard_or_checkpoint_then_it_is_refused_naming_the_field_never_reinterpreted(
    body: str, param: str
) -> None:
    with pytest.raises(BadJob) as caught:
        parse_job_message(body, max_inline=10)
    assert caught.value.param == param, caught.value.message


def test_given_a_checkpoint_inside_its_shard_then_every_field_is_kept() -> None:
    job = parse_job_message(shard_message(checkpoint=DONE), max_inline=10)
    assert job.checkpoint == Checkpoint(**DONE)
    inline = GOOD | {"input": {"texts": [{"id": i, "text": "t"} for i in range(4)]}}
    shard = SHARD | {"end": 4}
    resumed = {"chunk": 1, "offset": 2, "line": 2, "results": 2, "errors": 0, "invocations": 1}
    assert parse_job_message(json.dumps(inline | {"shard": shard, "checkpoint": resumed}), 10).checkpoint.offset == 2
