"""The shard planner: cut a large JSON Lines object into newline-aligned byte ranges, one message each.

The cuts are found without reading the file: for each of ``count - 1`` evenly
spaced targets a ranged GET reads a little from just before the target
(16 KiB, doubling while no newline turns up) and the cut moves to just past the
first newline. Every read names the version the plan records (the ETag from one
HEAD, and the version id where the bucket keeps versions), so a file overwritten
while it is planned fails the plan instead of cutting a mix of two files.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import asdict
from typing import Any

from quantfn.batch.jobs import BadJob, JobMessage, S3Location, Shard
from quantfn.batch.sources import ranged_get
from quantfn.config import Settings

_PROBE = 16 * 1024  # most lines are shorter; a longer one doubles the probe until a newline turns up


def shard_count(size: int, job: JobMessage, settings: Settings) -> int:
    """How many shards: one below the threshold (unless the message sets shard_bytes), else size / shard size."""
    cap = min(job.max_shards or settings.batch.max_shards, settings.batch.max_shards)
    if job.shard_bytes is None and size <= settings.batch.shard_threshold_bytes:
        return 1
    return max(1, min(cap, math.ceil(size / (job.shard_bytes or settings.batch.shard_bytes))))


def next_boundary(s3: Any, location: S3Location, pinned: Shard, target: int, size: int) -> int:
    """The first line start at or after ``target``: just past the first newline at or after ``target - 1``."""
    start, probe = target - 1, _PROBE
    while start < size:
        end = min(size, start + probe)
        data = ranged_get(s3, location, pinned, start, end).read()
        newline = data.find(b"\n")
        if newline >= 0:
            return start + newline + 1
        start, probe = end, probe * 2
    return size


def head_input(s3: Any, location: S3Location) -> dict[str, Any]:
    """The input's HEAD; BadJob when there is no such object (a retry would find none either)."""
    from botocore.exceptions import ClientError

    try:
        return s3.head_object(Bucket=location.bucket, Key=location.key)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
            raise BadJob("The input object does not exist; upload it, then send the job again.", param="input") from exc
        raise


def plan_shards(s3: Any, job: JobMessage, settings: Settings) -> dict[str, Any]:
    """The job record: the input's identity and its shards (``[start, end)`` bytes, or record indexes inline)."""
    if job.input_uri is None:
        shards = [Shard(0, 1, 0, len(job.inline))]
        return {"input": job.input_name, "etag": "", "version_id": "", "size": len(job.inline), "shards": shards}
    location = job.input_uri
    head = head_input(s3, location)
    size, etag = int(head["ContentLength"]), head["ETag"]
    version = head.get("VersionId") or ""
    version = "" if version == "null" else version
    pinned = Shard(0, 1, 0, size, etag, version)
    count = shard_count(size, job, settings)
    cuts = [0] + [next_boundary(s3, location, pinned, round(i * size / count), size) for i in range(1, count)]
    cuts = sorted(set([*cuts, size]))  # a line longer than a shard makes two cuts meet
    ranges = list(itertools.pairwise(cuts)) or [(0, 0)]
    shards = [Shard(i, len(ranges), a, b, etag, version) for i, (a, b) in enumerate(ranges)]
    return {"input": location.uri, "etag": etag, "version_id": version, "size": size, "shards": shards}


def send_shards(sqs: Any, queue_url: str, job: JobMessage, shards: list[Shard]) -> None:
    """One message per shard, ten per SendMessageBatch call; entries SQS reports failed are sent again."""
    pending = [(str(s.index), job.for_shard(s)) for s in shards]
    for _attempt in range(5):
        failed = []
        for first in range(0, len(pending), 10):
            group = pending[first : first + 10]
            reply = sqs.send_message_batch(
                QueueUrl=queue_url, Entries=[{"Id": key, "MessageBody": body} for key, body in group]
            )
            wanted = {item["Id"] for item in reply.get("Failed", [])}
            failed += [entry for entry in group if entry[0] in wanted]
        if not failed:
            return
        pending = failed
    raise RuntimeError(f"SendMessageBatch kept failing for {len(pending)} shard messages")


def shards_as_dicts(shards: list[Shard]) -> list[dict[str, Any]]:
    return [asdict(s) for s in shards]
