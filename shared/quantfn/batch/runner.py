"""Run one job message: plan a job into shards, or process one shard chunk after chunk and maybe finish the job.

Idempotence: chunk k of shard s always covers the same lines (``chunk_lines`` of
them, from the shard's start), is run in the same batches and so gives the same
bytes; its results object ``results/shard-s/part-k.jsonl`` is written last, once
(``If-None-Match: *``), and marks the chunk done. A redelivered or concurrently
delivered shard skips done chunks and rewrites nothing. A finished shard writes
its completion marker once; the shard that sees every marker writes
``manifest.json`` once (shards.py says why that is exactly once). When the
remaining time will not fit another chunk, the runner sends a follow-up message
with a checkpoint and returns: no line is lost or repeated.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from itertools import islice
from typing import Any

from quantfn.batch import shards as store
from quantfn.batch import vectors
from quantfn.batch.compute import check_model, infer_chunk, model_record
from quantfn.batch.jobs import BadJob, Checkpoint, JobMessage, Shard
from quantfn.batch.planner import plan_shards, send_shards, shards_as_dicts
from quantfn.batch.records import Item, check_record, error_line
from quantfn.batch.sources import InputChanged, Record, iter_records
from quantfn.registry import Registry
from quantfn.serialize import dumps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """``status``: planned, continued, shard_done, complete (this call wrote the manifest), skipped, failed."""

    status: str
    checkpoint: Checkpoint
    chunks_done: int = 0
    results: int = 0


@dataclass(frozen=True)
class ChunkResult:
    lines: int
    results: int
    errors: int
    end_offset: int


@dataclass(frozen=True)
class Delivery:
    """What the trigger knows about the message: its queue, id and receive count, and where this runs."""

    queue_url: str
    message_id: str = ""
    receive_count: int = 1
    where: dict[str, Any] | None = None


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobRunner:
    """Processes job messages with the model registry and boto3 S3/SQS clients."""

    def __init__(self, registry: Registry, s3: Any, sqs: Any) -> None:
        self.registry = registry
        self.settings = registry.settings
        self.s3 = s3
        self.sqs = sqs

    def run(self, job: JobMessage, remaining_ms: Callable[[], int], delivery: Delivery) -> JobOutcome:
        """Plan ``job`` or process its shard. Raises on failures the message should be retried for."""
        try:
            if job.shard is None:
                return self._plan(job, remaining_ms, delivery)
            return self._run_shard(job, remaining_ms, delivery)
        except Exception as exc:
            if job.shard is not None and delivery.receive_count >= self.settings.batch.max_receives:
                # Its last allowed receive: the message goes to the dead-letter queue, the job stays incomplete.
                record = {"shard": job.shard.index, "code": getattr(exc, "code", "shard_failed"), "at": _now()}
                record |= {
                    "message": f"failed {delivery.receive_count} receives ({type(exc).__name__}); the "
                    "shard message is in the dead-letter queue: redrive it to finish the job"
                }
                store.put(self.s3, job.output.bucket, f"{job.prefix}failed/{job.shard.name}.json", json.dumps(record))
            raise

    # -- planning ----------------------------------------------------------------
    def _plan(self, job: JobMessage, remaining_ms: Callable[[], int], delivery: Delivery) -> JobOutcome:
        bucket, prefix = job.output.bucket, job.prefix
        record = store.read_json(self.s3, bucket, prefix + "job.json")
        if record is not None:
            self._refuse_reuse(job, record, delivery)  # before anything else: a reused job_id is never acknowledged
        if store.exists(self.s3, bucket, prefix + "manifest.json"):
            logger.info("job %s is already complete; skipping", job.job_id)
            return JobOutcome("skipped", job.checkpoint)
        check_model(self.registry, job.model, job.task)  # a wrong model or task fails before anything is written
        vectors.check_format(self.registry, job)
        if record is None:
            plan = plan_shards(self.s3, job, self.settings)
            record = {"job_id": job.job_id, "task": job.task, "model": job.model, "message_id": delivery.message_id}
            record |= plan | {"shards": shards_as_dicts(plan["shards"]), "created_at": _now()}
            if not store.put_once(self.s3, bucket, prefix + "job.json", json.dumps(record, indent=1)):
                record = store.read_json(self.s3, bucket, prefix + "job.json") or record  # a duplicate planned first
                self._refuse_reuse(job, record, delivery)
        shards = [Shard(**s) for s in record["shards"]]
        if len(shards) == 1:  # a small job runs here and now, as one shard
            return self._run_shard(
                replace(job, shard=shards[0], checkpoint=Checkpoint(offset=shards[0].start)), remaining_ms, delivery
            )
        if store.exists(self.s3, bucket, prefix + "dispatched.json"):
            return JobOutcome("skipped", job.checkpoint)
        send_shards(self.sqs, delivery.queue_url, job, shards)
        store.put_once(self.s3, bucket, prefix + "dispatched.json", json.dumps({"shards": len(shards), "at": _now()}))
        logger.info("job %s planned into %d shards", job.job_id, len(shards))
        return JobOutcome("planned", job.checkpoint)

    def _refuse_reuse(self, job: JobMessage, record: dict[str, Any], delivery: Delivery) -> None:
        """A job_id names one input: another input, task or model under it is refused, never acknowledged."""
        same = (record["input"], record["task"], record["model"]) == (job.input_name, job.task, job.model)
        if same and job.input_uri is not None and record.get("message_id") != delivery.message_id:
            # Not a redelivery of the planned message: the same URI must still hold the same object.
            head = self.s3.head_object(Bucket=job.input_uri.bucket, Key=job.input_uri.key)
            same = head["ETag"] == record["etag"]
        if not same:
            raise BadJob(
                f"'job_id' {job.job_id!r} already names a job with another input, task or model "
                f"(planned {record['created_at']}); choose a new job_id.",
                param="job_id",
            )

    # -- one shard ---------------------------------------------------------------
    def _run_shard(self, job: JobMessage, remaining_ms: Callable[[], int], delivery: Delivery) -> JobOutcome:
        shard, bucket, prefix = job.shard, job.output.bucket, job.prefix
        assert shard is not None
        if store.exists(self.s3, bucket, f"{prefix}shards/{shard.name}.json"):
            self._finish_if_last(job, delivery)  # the marker may have been written just before a crash
            return JobOutcome("skipped", job.checkpoint)
        if store.exists(self.s3, bucket, prefix + "failed/input.json"):
            return JobOutcome("failed", job.checkpoint)
        checkpoint = replace(job.checkpoint, invocations=job.checkpoint.invocations + 1)
        records = _Peekable(iter_records(job, self.s3, self.settings.batch.max_line_bytes))
        chunks_done = results = 0
        slowest_ms = 0.0
        try:
            while True:
                chunk = records.take(self.settings.batch.chunk_lines)
                if not chunk:
                    break
                started = time.perf_counter()
                done = self._chunk_done(job, checkpoint.chunk)
                result = done or self._process_chunk(job, checkpoint, chunk)
                elapsed = (time.perf_counter() - started) * 1000
                checkpoint = checkpoint.advance(
                    result.lines, result.results, result.errors, result.end_offset, 0.0 if done else elapsed
                )
                if not done:
                    chunks_done += 1
                    results += result.results
                    slowest_ms = max(slowest_ms, elapsed)
                    store.put(self.s3, bucket, f"{prefix}progress/{shard.name}.json", json.dumps(asdict(checkpoint)))
                # Continue only if the next chunk, as slow as the slowest so far, ends before the safety margin.
                if records.has_more() and remaining_ms() - slowest_ms < self.settings.batch.safety_ms:
                    self.sqs.send_message(QueueUrl=delivery.queue_url, MessageBody=job.follow_up(checkpoint))
                    logger.info("job %s %s continues at chunk %d", job.job_id, shard.name, checkpoint.chunk)
                    return JobOutcome("continued", checkpoint, chunks_done, results)
        except InputChanged as exc:
            failure = {"code": exc.code, "message": exc.message, "shard": shard.index, "at": _now()}
            store.put_once(self.s3, bucket, prefix + "failed/input.json", json.dumps(failure))
            logger.error("job %s failed: its input changed under it (%s)", job.job_id, shard.name)
            return JobOutcome("failed", checkpoint, chunks_done, results)
        marker = asdict(shard) | {"lines": checkpoint.line, "results": checkpoint.results, "errors": checkpoint.errors}
        marker |= {"parts": checkpoint.chunk, "compute_ms": round(checkpoint.compute_ms, 1), "finished_at": _now()}
        marker |= {"invocations": checkpoint.invocations, "model": model_record(self.registry, job.model, job.task)}
        store.put_once(self.s3, bucket, f"{prefix}shards/{shard.name}.json", json.dumps(marker))
        wrote = self._finish_if_last(job, delivery)
        return JobOutcome("complete" if wrote else "shard_done", checkpoint, chunks_done, results)

    def _process_chunk(self, job: JobMessage, checkpoint: Checkpoint, chunk: list[Record]) -> ChunkResult:
        errors: list[str] = []
        checked = [check_record(record, job.task) for record in chunk]
        items = [c for c in checked if isinstance(c, Item)]
        errors += [error_line(record, *c) for record, c in zip(chunk, checked, strict=True) if isinstance(c, tuple)]
        lines = []
        part = self._part(job, checkpoint.chunk)
        outputs = vectors.write_part(
            self.registry, self.s3, job, part, infer_chunk(self.registry, job.task, job.model, items)
        )
        for item, output in zip(items, outputs, strict=True):
            if isinstance(output, tuple):
                errors.append(error_line(item.record, *output))
                continue
            try:
                lines.append(dumps({"id": item.id, "line": item.record.line, **output}))
            except (TypeError, ValueError):  # orjson: what the checks let through must still not fail the chunk
                errors.append(error_line(item.record, "bad_record", "the line's id cannot be written as JSON"))
        bucket = job.output.bucket
        if errors:
            errors.sort(key=lambda text: json.loads(text)["line"])
            store.put_once(self.s3, bucket, job.prefix + "errors/" + part, "\n".join(errors) + "\n")
        end = chunk[-1].end_offset
        metadata = {"lines": str(len(chunk)), "results": str(len(lines)), "errors": str(len(errors))}
        metadata["end-offset"] = str(end)
        body = "".join(line + "\n" for line in lines)
        # Last, and once: the results object marks the chunk done.
        if not store.put_once(self.s3, bucket, job.prefix + "results/" + part, body, metadata):
            return self._chunk_done(job, checkpoint.chunk) or ChunkResult(len(chunk), len(lines), len(errors), end)
        return ChunkResult(len(chunk), len(lines), len(errors), end)

    @staticmethod
    def _part(job: JobMessage, chunk: int) -> str:
        assert job.shard is not None
        return f"{job.shard.name}/part-{chunk:06d}.jsonl"

    def _chunk_done(self, job: JobMessage, chunk: int) -> ChunkResult | None:
        meta = store.head_metadata(self.s3, job.output.bucket, job.prefix + "results/" + self._part(job, chunk))
        if meta is None:
            return None
        return ChunkResult(int(meta["lines"]), int(meta["results"]), int(meta["errors"]), int(meta["end-offset"]))

    # -- the job's end -------------------------------------------------------------
    def _finish_if_last(self, job: JobMessage, delivery: Delivery) -> bool:
        """Write manifest.json if every shard's marker exists; True if this call wrote it."""
        assert job.shard is not None
        bucket, prefix = job.output.bucket, job.prefix
        keys = list(store.list_keys(self.s3, bucket, prefix + "shards/"))
        if len(keys) < job.shard.count or store.exists(self.s3, bucket, prefix + "manifest.json"):
            return False
        if store.exists(self.s3, bucket, prefix + "failed/input.json"):
            return False
        markers = store.read_markers(self.s3, bucket, prefix)
        record = store.read_json(self.s3, bucket, prefix + "job.json") or {}
        summary = build_manifest(job, record, markers, self.settings.batch.chunk_lines, delivery.where or {})
        wrote = store.put_once(self.s3, bucket, prefix + "manifest.json", json.dumps(summary, indent=2) + "\n")
        if wrote:
            logger.info("job %s complete: %s", job.job_id, summary["counts"])
        return wrote


def build_manifest(
    job: JobMessage, record: dict[str, Any], markers: dict[int, dict[str, Any]], chunk_lines: int, where: dict
) -> dict[str, Any]:
    """The job's manifest from its shards' markers; ``first_line`` maps a shard's line numbers to the input's."""
    shards, first_line = [], 1
    for index in sorted(markers):
        marker = markers[index]
        shards.append({k: marker[k] for k in ("index", "start", "end", "lines", "results", "errors", "parts")})
        shards[-1]["first_line"] = first_line
        first_line += marker["lines"]
    counts = {name: sum(m[name] for m in markers.values()) for name in ("lines", "results", "errors")}
    return {
        "job_id": job.job_id,
        "status": "complete",
        "task": job.task,
        "model": markers[min(markers)]["model"],
        "input": job.input_uri.uri if job.input_uri else "inline",
        "input_version": {"etag": record.get("etag", ""), "version_id": record.get("version_id", "")},
        "output": f"s3://{job.output.bucket}/{job.prefix}",
        "counts": counts,
        "parts": sum(m["parts"] for m in markers.values()),
        "chunk_lines": chunk_lines,
        "shards": shards,
        "timings": {
            "compute_ms": round(sum(m["compute_ms"] for m in markers.values()), 1),
            "invocations": sum(m["invocations"] for m in markers.values()),
        },
        "created_at": record.get("created_at"),
        "finished_at": _now(),
        "ran_on": where,
    }


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
