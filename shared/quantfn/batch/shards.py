"""The job's control objects in S3, and the conditional writes that make its accounting exactly-once.

Under ``<output><job_id>/``::

    job.json                    the plan: input, its ETag/version, shards and their byte ranges (written once)
    dispatched.json             every shard message was sent (written once)
    results/shard-NNNNN/part-CCCCCC.jsonl, errors/...   one object per chunk, written once each
    progress/shard-NNNNN.json   the shard's running totals, after each chunk (advisory, for status)
    shards/shard-NNNNN.json     the shard's completion marker with its counts (written once)
    failed/input.json           the input changed under the job: it can never complete (written once)
    failed/shard-NNNNN.json     the shard failed its last allowed receive and went to the dead-letter queue
    manifest.json               the job is complete (written once, by whichever shard finished last)

"Written once" is S3's conditional PUT, ``If-None-Match: *``: the PUT succeeds
only if no object has the key, atomically, so two shards racing to write the same
key cannot both succeed, and a redelivered shard cannot overwrite what an
earlier delivery wrote. S3 lists are strongly consistent, so the shard whose
marker is the last one written sees every marker when it lists them afterwards.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

_MISSING = {"404", "NoSuchKey", "NotFound"}
_TAKEN = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


_CONTENT_TYPES = {"json": "application/json", "npy": "application/octet-stream"}


def _code(exc: Exception) -> str:
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def put_once(s3: Any, bucket: str, key: str, body: str | bytes, metadata: dict[str, str] | None = None) -> bool:
    """Create ``key`` unless it exists (If-None-Match: *). True if this call wrote it. Text is stored as UTF-8."""
    from botocore.exceptions import ClientError

    try:
        s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=body.encode("utf-8") if isinstance(body, str) else body,
            ContentType=_CONTENT_TYPES.get(key.rsplit(".", 1)[-1], "application/x-ndjson"),
            Metadata=metadata or {},
            IfNoneMatch="*",
        )
        return True
    except ClientError as exc:
        if _code(exc) in _TAKEN:
            return False
        raise


def put(s3: Any, bucket: str, key: str, body: str) -> None:
    """Overwrite ``key`` (advisory objects only: progress)."""
    s3.put_object(Bucket=bucket, Key=key, Body=body.encode("utf-8"), ContentType="application/json")


def read_json(s3: Any, bucket: str, key: str) -> dict[str, Any] | None:
    """The object parsed as JSON, or None if it does not exist."""
    from botocore.exceptions import ClientError

    try:
        return json.loads(s3.get_object(Bucket=bucket, Key=key)["Body"].read())
    except ClientError as exc:
        if _code(exc) in _MISSING:
            return None
        raise


def head_metadata(s3: Any, bucket: str, key: str) -> dict[str, str] | None:
    """The object's user metadata, or None if it does not exist."""
    from botocore.exceptions import ClientError

    try:
        return s3.head_object(Bucket=bucket, Key=key)["Metadata"]
    except ClientError as exc:
        if _code(exc) in _MISSING:
            return None
        raise


def exists(s3: Any, bucket: str, key: str) -> bool:
    return head_metadata(s3, bucket, key) is not None


def list_keys(s3: Any, bucket: str, prefix: str) -> Iterator[str]:
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for item in page.get("Contents", []):
            yield item["Key"]


def index_of(key: str) -> int:
    """The shard index in a key ending ``shard-NNNNN.json``."""
    return int(key.rsplit("shard-", 1)[1].split(".", 1)[0])


def read_markers(s3: Any, bucket: str, prefix: str) -> dict[int, dict[str, Any]]:
    """The completion markers written so far, by shard index."""
    markers = {}
    for key in list_keys(s3, bucket, prefix + "shards/"):
        marker = read_json(s3, bucket, key)
        if marker is not None:
            markers[index_of(key)] = marker
    return markers
