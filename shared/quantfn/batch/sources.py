"""Input records, streamed: one shard's byte range of an S3 JSON Lines object, or the inline list.

Memory stays bounded by one read chunk plus one line, whatever the file's size.
Each record carries the byte offset just past it, which is what a checkpoint
stores, so a follow-up resumes with a ranged GET instead of re-reading the file.
Every GET names the object version the planner recorded (``IfMatch`` on its ETag,
``VersionId`` where the bucket keeps versions): an input overwritten or deleted
under a running job raises InputChanged instead of mixing two files.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from quantfn.batch.jobs import JobMessage, S3Location, Shard
from quantfn.errors import QuantfnError

_READ = 1 << 20
_CHANGED = {"PreconditionFailed", "412", "NoSuchKey", "NoSuchVersion", "404"}


class InputChanged(QuantfnError):
    """The input object is not the version the job was planned on (overwritten or deleted)."""

    code = "input_changed"


@dataclass(frozen=True)
class Record:
    """One input line. ``value`` is the parsed JSON, or None with ``problem`` set; ``line`` counts from 1 per shard."""

    line: int
    value: Any
    end_offset: int
    problem: tuple[str, str] | None = None


def version_args(shard: Shard) -> dict[str, str]:
    """The GetObject arguments that pin a read to the shard's object version."""
    args = {"IfMatch": shard.etag} if shard.etag else {}
    if shard.version_id:
        args["VersionId"] = shard.version_id
    return args


def ranged_get(s3: Any, location: S3Location, shard: Shard, start: int, end: int) -> Any:
    """The body of bytes ``[start, end)`` of the pinned version; InputChanged if it is gone or different."""
    from botocore.exceptions import ClientError

    try:
        return s3.get_object(
            Bucket=location.bucket, Key=location.key, Range=f"bytes={start}-{end - 1}", **version_args(shard)
        )["Body"]
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") in _CHANGED:
            raise InputChanged(
                f"The input {location.uri} changed or was deleted after the job was planned (expected ETag "
                f"{shard.etag or '-'}, version {shard.version_id or '-'}); resubmit it under a new job_id."
            ) from exc
        raise


def iter_records(job: JobMessage, s3: Any, max_line_bytes: int) -> Iterator[Record]:
    """Records of the job's shard from its checkpoint onwards, numbered from 1 within the shard."""
    start = job.checkpoint
    shard = job.shard or Shard(0, 1, 0, len(job.inline) if job.input_uri is None else 1 << 62)
    if job.input_uri is None:
        for index in range(start.offset, min(shard.end, len(job.inline))):
            yield Record(start.line + index - start.offset + 1, job.inline[index], index + 1)
        return
    line = start.line
    for raw, end in _iter_lines(s3, job.input_uri, shard, start.offset, max_line_bytes):
        line += 1
        yield parse_line(line, raw, end, max_line_bytes)


def parse_line(line: int, raw: bytes | None, end: int, max_line_bytes: int) -> Record:
    """One line's record; bytes that are not UTF-8, not JSON or nested too deeply become its problem."""
    if raw is None:
        return Record(line, None, end, ("line_too_long", f"the line is longer than {max_line_bytes} bytes"))
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Record(line, None, end, ("bad_encoding", "the line is not valid UTF-8"))
    if not text.strip():
        return Record(line, None, end, ("blank_line", "the line is empty"))
    try:
        return Record(line, json.loads(text), end)
    except RecursionError:
        return Record(line, None, end, ("bad_json", "the line nests JSON too deeply"))
    except ValueError:
        return Record(line, None, end, ("bad_json", "the line is not valid JSON"))


def _iter_lines(
    s3: Any, location: S3Location, shard: Shard, offset: int, max_line_bytes: int
) -> Iterator[tuple[bytes | None, int]]:
    """(line without its newline or None when over the limit, offset just past it) up to the shard's end."""
    if offset >= shard.end:
        return
    from botocore.exceptions import ClientError

    try:
        body = ranged_get(s3, location, shard, offset, shard.end)
    except ClientError as exc:
        if exc.response.get("Error", {}).get("Code") == "InvalidRange":
            return  # the checkpoint is at the end of the file
        raise
    pending, too_long, position = bytearray(), False, offset
    for chunk in body.iter_chunks(_READ):
        start = 0
        while True:
            newline = chunk.find(b"\n", start)
            piece = chunk[start:] if newline < 0 else chunk[start:newline]
            if not too_long:
                pending += piece
                too_long = len(pending) > max_line_bytes
                if too_long:
                    pending.clear()
            if newline < 0:
                position += len(chunk) - start
                break
            position += newline - start + 1
            yield (None if too_long else bytes(pending).rstrip(b"\r")), position
            pending.clear()
            too_long = False
            start = newline + 1
    if pending or too_long:
        yield (None if too_long else bytes(pending).rstrip(b"\r")), position
