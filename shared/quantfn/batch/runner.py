"""Run one job message: embed chunk after chunk, write each chunk's results, continue or finish.

Idempotence: chunk k always covers the same lines (``chunk_lines`` of them), is
embedded in the same batches and so gives the same bytes; its results object
``results/part-<k>.jsonl`` is written last and marks the chunk done (an S3 PUT
is atomic: a reader sees all of it or nothing). A re-delivered message skips
done chunks; a finished job (``manifest.json`` present) is skipped whole.
When the remaining time will not fit another chunk, the runner sends a
follow-up message with a checkpoint and returns: no line is lost or repeated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from quantfn import inference
from quantfn.batch.jobs import Checkpoint, JobMessage
from quantfn.batch.sources import Record, iter_records
from quantfn.registry import Registry
from quantfn.serialize import dumps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """``status``: "complete", "continued" (a follow-up was sent) or "skipped" (already complete)."""

    status: str
    checkpoint: Checkpoint
    chunks_done: int = 0
    embeddings: int = 0


@dataclass(frozen=True)
class ChunkResult:
    lines: int
    results: int
    errors: int
    end_offset: int


class JobRunner:
    """Processes job messages with the model registry and boto3 S3/SQS clients."""

    def __init__(self, registry: Registry, s3: Any, sqs: Any) -> None:
        self.registry = registry
        self.settings = registry.settings
        self.s3 = s3
        self.sqs = sqs

    def run(
        self, job: JobMessage, remaining_ms: Callable[[], int], queue_url: str, where: dict[str, Any]
    ) -> JobOutcome:
        """Process ``job`` from its checkpoint. Raises on failures the message should be retried for."""
        bucket = job.output.bucket
        if self._exists(bucket, job.prefix + "manifest.json"):
            logger.info("job %s is already complete; skipping", job.job_id)
            return JobOutcome("skipped", job.checkpoint)
        manifest = self.registry.manifest(self.registry.resolve(job.model, "embed"))
        checkpoint = replace(job.checkpoint, invocations=job.checkpoint.invocations + 1)
        records = _Peekable(iter_records(job, self.s3, self.settings.batch_max_line_bytes))
        chunks_done = embeddings = 0
        slowest_ms = 0.0
        while True:
            chunk = records.take(self.settings.batch_chunk_lines)
            if not chunk:
                self._finish(job, checkpoint, manifest, where)
                return JobOutcome("complete", checkpoint, chunks_done, embeddings)
            started = time.perf_counter()
            done = self._chunk_done(job, checkpoint.chunk)
            result = done or self._process_chunk(job, checkpoint, chunk, remaining_ms)
            elapsed = (time.perf_counter() - started) * 1000
            checkpoint = checkpoint.advance(
                result.lines, result.results, result.errors, result.end_offset, 0.0 if done else elapsed
            )
            if not done:
                chunks_done += 1
                embeddings += result.results
                slowest_ms = max(slowest_ms, elapsed)
            # Continue only if the next chunk, as slow as the slowest so far, ends before the safety margin.
            if records.has_more() and remaining_ms() - slowest_ms < self.settings.batch_safety_ms:
                self.sqs.send_message(QueueUrl=queue_url, MessageBody=job.follow_up(checkpoint))
                logger.info("job %s continues at chunk %d (line %d)", job.job_id, checkpoint.chunk, checkpoint.line)
                return JobOutcome("continued", checkpoint, chunks_done, embeddings)

    # -- chunks ----------------------------------------------------------------
    def _process_chunk(
        self, job: JobMessage, checkpoint: Checkpoint, chunk: list[Record], remaining_ms: Callable[[], int]
    ) -> ChunkResult:
        errors: list[dict[str, Any]] = []
        texts: list[tuple[Record, Any, str]] = []
        for record in chunk:
            problem_or_text = self._validate(record)
            record_id = record.value.get("id") if isinstance(record.value, dict) else None
            if isinstance(problem_or_text, str):
                texts.append((record, record_id, problem_or_text))
            else:
                errors.append(_error(record, record_id, *problem_or_text))
        good: list[tuple[Record, Any]] = []
        vectors: Any = []
        if texts:
            request = inference.EmbedRequest([text for _, _, text in texts], job.model)
            budget = inference.Budget(remaining_ms(), allow_endpoint=False, per_input_errors=True)
            result = inference.run(request, budget, self.registry)
            for index, (code, message) in result.errors.items():
                record, record_id, _ = texts[index]
                errors.append(_error(record, record_id, code, message))
            good = [texts[index][:2] for index in result.ok]
            vectors = result.output
        errors.sort(key=lambda error: error["line"])
        lines = (
            dumps({"id": record_id, "line": record.line, "embedding": vector})
            for (record, record_id), vector in zip(good, vectors, strict=True)
        )
        part = f"part-{checkpoint.chunk:06d}.jsonl"
        if errors:
            self._put(job.output.bucket, job.prefix + "errors/" + part, "\n".join(map(json.dumps, errors)) + "\n")
        metadata = {"lines": str(len(chunk)), "results": str(len(good)), "errors": str(len(errors))}
        metadata["end-offset"] = str(chunk[-1].end_offset)
        body = "".join(line + "\n" for line in lines)
        self._put(job.output.bucket, job.prefix + "results/" + part, body, metadata)  # last: marks the chunk done
        return ChunkResult(len(chunk), len(good), len(errors), chunk[-1].end_offset)

    def _validate(self, record: Record) -> str | tuple[str, str]:
        if record.problem:
            return record.problem
        value = record.value
        if not isinstance(value, dict):
            return ("bad_record", "each line must be a JSON object with 'id' and 'text'")
        if "id" not in value or not isinstance(value["id"], (str, int)) or isinstance(value["id"], bool):
            return ("missing_id", "'id' must be a string or an integer")
        text = value.get("text")
        if not isinstance(text, str):
            return ("missing_text", "'text' must be a string")
        if not text.strip():
            return ("empty_text", "'text' is empty")
        return text

    def _chunk_done(self, job: JobMessage, chunk: int) -> ChunkResult | None:
        from botocore.exceptions import ClientError

        try:
            head = self.s3.head_object(Bucket=job.output.bucket, Key=f"{job.prefix}results/part-{chunk:06d}.jsonl")
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return None
            raise
        meta = head["Metadata"]
        return ChunkResult(int(meta["lines"]), int(meta["results"]), int(meta["errors"]), int(meta["end-offset"]))

    # -- output ------------------------------------------------------------------
    def _finish(self, job: JobMessage, checkpoint: Checkpoint, manifest: Any, where: dict[str, Any]) -> None:
        summary = {
            "job_id": job.job_id,
            "status": "complete",
            "task": job.task,
            "model": {
                "id": manifest.model_id,
                "sha256": manifest.files["model.onnx"].sha256,
                "recipe": manifest.raw.get("quantization", {}).get("recipe"),
            },
            "input": job.input_uri.uri if job.input_uri else "inline",
            "output": f"s3://{job.output.bucket}/{job.prefix}",
            "counts": {"lines": checkpoint.line, "results": checkpoint.results, "errors": checkpoint.errors},
            "parts": checkpoint.chunk,
            "chunk_lines": self.settings.batch_chunk_lines,
            "timings": {"compute_ms": round(checkpoint.compute_ms, 1), "invocations": checkpoint.invocations},
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "ran_on": where,
        }
        self._put(job.output.bucket, job.prefix + "manifest.json", json.dumps(summary, indent=2) + "\n")

    def _put(self, bucket: str, key: str, body: str, metadata: dict[str, str] | None = None) -> None:
        self.s3.put_object(
            Bucket=bucket,
            Key=key,
            Body=body.encode("utf-8"),
            ContentType="application/x-ndjson",
            Metadata=metadata or {},
        )

    def _exists(self, bucket: str, key: str) -> bool:
        from botocore.exceptions import ClientError

        try:
            self.s3.head_object(Bucket=bucket, Key=key)
            return True
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in {"404", "NoSuchKey", "NotFound"}:
                return False
            raise


class _Peekable:
    """An iterator of records that can tell whether another one follows."""

    def __init__(self, records: Iterator[Record]) -> None:
        self._records = records
        self._next: list[Record] = []

    def has_more(self) -> bool:
        if not self._next:
            self._next = list(islice(self._records, 1))
        return bool(self._next)

    def take(self, count: int) -> list[Record]:
        taken, self._next = self._next, []
        return taken + list(islice(self._records, count - len(taken)))


def _error(record: Record, record_id: Any, code: str, message: str) -> dict[str, Any]:
    return {"line": record.line, "id": record_id, "error": {"code": code, "message": message}}
