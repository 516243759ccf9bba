"""Input records, streamed: S3 JSON Lines from a byte offset, or the message's inline list.

Memory stays bounded by one read chunk plus one line, whatever the file's size.
Each record carries the byte offset just past it, which is what a checkpoint
stores, so a follow-up resumes with a ranged GET instead of re-reading the file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from quantfn.batch.jobs import JobMessage

_READ = 1 << 20


@dataclass(frozen=True)
class Record:
    """One input line. ``value`` is the parsed JSON, or None with ``problem`` set."""

    line: int
    value: Any
    end_offset: int
    problem: tuple[str, str] | None = None


def iter_records(job: JobMessage, s3: Any, max_line_bytes: int) -> Iterator[Record]:
    """Records from the job's checkpoint onwards, numbered from 1 across the whole input."""
    start = job.checkpoint
    if job.input_uri is None:
        for index in range(start.offset, len(job.inline)):
            yield Record(start.line + index - start.offset + 1, job.inline[index], index + 1)
        return
    line = start.line
    for raw, end in _iter_lines(s3, job.input_uri.bucket, job.input_uri.key, start.offset, max_line_bytes):
        line += 1
        yield _parse(line, raw, end, max_line_bytes)


def _parse(line: int, raw: bytes | None, end: int, max_line_bytes: int) -> Record:
    if raw is None:
        return Record(line, None, end, ("line_too_long", f"the line is longer than {max_line_bytes} bytes"))
    if not raw.strip():
        return Record(line, None, end, ("blank_line", "the line is empty"))
    try:
        return Record(line, json.loads(raw), end)
    except (UnicodeDecodeError, ValueError):
        return Record(line, None, end, ("bad_json", "the line is not valid JSON"))


def _iter_lines(s3: Any, bucket: str, key: str, offset: int, max_line_bytes: int) -> Iterator[tuple[bytes | None, int]]:
    """(line without its newline or None when over the limit, offset just past it); a final line may lack \\n."""
    from botocore.exceptions import ClientError

    try:
        body = s3.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-")["Body"]
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
