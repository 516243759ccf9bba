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
from quantfn.batch.failures import Failure, failure_of
from quantfn.batch.jobs import BadJob, Checkpoint, JobMessage, Shard, job_identity, parse_job_message
from quantfn.batch.planner import head_input, plan_shards, send_shards, shards_as_dicts
from quantfn.batch.records import Item, check_record, error_line
from quantfn.batch.sources import InputChanged, Record, iter_records
from quantfn.registry import Registry
from quantfn.serialize import dumps

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobOutcome:
    """``status``: planned, continued, shard_done, complete (this call wrote the manifest), skipped, failed (the
    job cannot finish; the message is done), retry (the message must come back: report it failed) or
    dead_lettered (sent to the dead-letter queue now; the message is done). ``failure`` says why, for the last three.
    ``lines``, ``results`` and ``errors`` count the lines this call processed."""

    status: str
    checkpoint: Checkpoint
    chunks_done: int = 0
    results: int = 0
    lines: int = 0
    errors: int = 0
    job: JobMessage | None = None
    failure: Failure | None = None
    #: The job id and shard read from a message that could not be parsed (jobs.job_identity).
    named: tuple[str | None, int | None] = (None, None)

    def log_fields(self) -> dict[str, Any]:
        """The job, shard and chunk this outcome is about (ids only: no input text, no path)."""
        job_id, shard = self.named
        if self.job is not None:
            job_id, shard = self.job.job_id, (self.job.shard.index if self.job.shard else None)
        return {"job_id": job_id, "shard": shard, "chunk": self.checkpoint.chunk}


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

    def process(self, body: str, remaining_ms: Callable[[], int], delivery: Delivery) -> JobOutcome:
        """One message body, start to end; never raises. A failure becomes an outcome that says what became of
        the message: ``retry`` (report it failed), ``dead_lettered`` or ``failed`` (acknowledge it)."""
        job = None
        try:
            job = parse_job_message(body, self.settings.limits.max_inputs)
            return self.run(job, remaining_ms, delivery)
        except Exception as exc:
            return self._failed(body, job, failure_of(exc), delivery)

    def run(self, job: JobMessage, remaining_ms: Callable[[], int], delivery: Delivery) -> JobOutcome:
        """Plan ``job`` or process its shard. Raises on failures (``process`` says what becomes of them)."""
        if job.shard is None:
            return self._plan(job, remaining_ms, delivery)
        self._check_against_plan(job)
        return self._run_shard(job, remaining_ms, delivery)

    # -- a message that failed -----------------------------------------------------
    def _failed(self, body: str, job: JobMessage | None, failure: Failure, delivery: Delivery) -> JobOutcome:
        """Dead-letter a message that can never succeed now; otherwise it returns, until the queue's redrive moves
        it after its last receive. A shard that will not come back records why, so its job shows incomplete."""
        status = "dead_lettered" if failure.permanent and self._dead_letter(body, failure, delivery) else "retry"
        final = status == "dead_lettered" or delivery.receive_count >= self.settings.batch.max_receives
        failure = replace(failure, action="dead_lettered" if final else "retry")
        if final and job is not None and job.shard is not None:
            record = {"shard": job.shard.index, "code": failure.code, "reason": failure.reason, "at": _now()}
            record["message"] = (
                f"failed ({failure.code}) on receive {delivery.receive_count}; the shard message is in the "
                "dead-letter queue: redrive it to finish the job"
            )
            try:
                store.put(self.s3, job.output.bucket, f"{job.prefix}failed/{job.shard.name}.json", json.dumps(record))
            except Exception as exc:
                failure = replace(failure, reason=f"{failure.reason}; failed/ not written: {failure_of(exc).reason}")
        checkpoint = job.checkpoint if job else Checkpoint()
        return JobOutcome(status, checkpoint, job=job, failure=failure, named=job_identity(body))

    def _dead_letter(self, body: str, failure: Failure, delivery: Delivery) -> bool:
        """Send ``body`` to the dead-letter queue with the failure as message attributes; False if it cannot go."""
        url = self.settings.batch.dead_letter_url
        if not url:
            return False
        attributes = {"quantfn_error_code": failure.code, "quantfn_reason": failure.reason}
        attributes["quantfn_message_id"] = delivery.message_id
        try:
            self.sqs.send_message(
                QueueUrl=url,
                MessageBody=body,
                MessageAttributes={
                    name: {"DataType": "String", "StringValue": value or "-"} for name, value in attributes.items()
                },
            )
        except Exception:  # the message stays in its queue and comes back: nothing is lost
            return False
        return True

    def _check_against_plan(self, job: JobMessage) -> None:
        """A shard message must name one of the shards its job planned, over the same input, task and model: so
        its byte range lies inside the input's size and its checkpoint (checked against the range) does too."""
        assert job.shard is not None
        record = store.read_json(self.s3, job.output.bucket, job.prefix + "job.json")
        if record is None:
            raise BadJob(f"'shard' names job {job.job_id!r}, which was never planned.", param="shard")
        planned = {Shard(**shard) for shard in record["shards"]}
        same = (record["input"], record["task"], record["model"]) == (job.input_name, job.task, job.model)
        if not same or job.shard not in planned:
            raise BadJob(
                f"'shard' is not one of the {len(planned)} shards job {job.job_id!r} planned over its input, task "
                "and model.",
                param="shard",
            )

    # -- planning ----------------------------------------------------------------
    def _plan(self, job: JobMessage, remaining_ms: Callable[[], int], delivery: Delivery) -> JobOutcome:
        bucket, prefix = job.output.bucket, job.prefix
        record = store.read_json(self.s3, bucket, prefix + "job.json")
        if record is not None:
            self._refuse_reuse(job, record, delivery)  # before anything else: a reused job_id is never acknowledged
        if store.exists(self.s3, bucket, prefix + "manifest.json"):
            logger.info("job %s is already complete; skipping", job.job_id)
            return JobOutcome("skipped", job.checkpoint, job=job)
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
            return JobOutcome("skipped", job.checkpoint, job=job)
        send_shards(self.sqs, delivery.queue_url, job, shards)
        store.put_once(self.s3, bucket, prefix + "dispatched.json", json.dumps({"shards": len(shards), "at": _now()}))
        logger.info("job %s planned into %d shards", job.job_id, len(shards))
        return JobOutcome("planned", job.checkpoint, job=job)

    def _refuse_reuse(self, job: JobMessage, record: dict[str, Any], delivery: Delivery) -> None:
        """A job_id names one input: another input, task or model under it is refused, never acknowledged."""
        same = (record["input"], record["task"], record["model"]) == (job.input_name, job.task, job.model)
        if same and job.input_uri is not None and record.get("message_id") != delivery.message_id:
            # Not a redelivery of the planned message: the same URI must still hold the same object.
            head = head_input(self.s3, job.input_uri)
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
            return JobOutcome("skipped", job.checkpoint, job=job)
        if store.exists(self.s3, bucket, prefix + "failed/input.json"):
            reason = "the job failed earlier: its input changed or was deleted after it was planned"
            failure = Failure("input_changed", reason, permanent=True, action="job_failed")
            return JobOutcome("failed", job.checkpoint, job=job, failure=failure)
        checkpoint = replace(job.checkpoint, invocations=job.checkpoint.invocations + 1)
        records = _Peekable(iter_records(job, self.s3, self.settings.batch.max_line_bytes))
        chunks_done = results = lines = errors = 0
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
                    results, lines, errors = results + result.results, lines + result.lines, errors + result.errors
                    slowest_ms = max(slowest_ms, elapsed)
                    store.put(self.s3, bucket, f"{prefix}progress/{shard.name}.json", json.dumps(asdict(checkpoint)))
                # Continue only if the next chunk, as slow as the slowest so far, ends before the safety margin.
                if records.has_more() and remaining_ms() - slowest_ms < self.settings.batch.safety_ms:
                    self.sqs.send_message(QueueUrl=delivery.queue_url, MessageBody=job.follow_up(checkpoint))
                    logger.info("job %s %s continues at chunk %d", job.job_id, shard.name, checkpoint.chunk)
                    return JobOutcome("continued", checkpoint, chunks_done, results, lines, errors, job)
        except InputChanged as exc:
            record = {"code": exc.code, "message": exc.message, "shard": shard.index, "at": _now()}
            store.put_once(self.s3, bucket, prefix + "failed/input.json", json.dumps(record))
            reason = "the input changed or was deleted after the job was planned; resubmit it under a new job_id"
            failure = Failure(exc.code, reason, permanent=True, action="job_failed")
            return JobOutcome("failed", checkpoint, chunks_done, results, lines, errors, job, failure)
        marker = asdict(shard) | {"lines": checkpoint.line, "results": checkpoint.results, "errors": checkpoint.errors}
        marker |= {"parts": checkpoint.chunk, "compute_ms": round(checkpoint.compute_ms, 1), "finished_at": _now()}
        marker |= {"invocations": checkpoint.invocations, "model": model_record(self.registry, job.model, job.task)}
        store.put_once(self.s3, bucket, f"{prefix}shards/{shard.name}.json", json.dumps(marker))
        wrote = self._finish_if_last(job, delivery)
        return JobOutcome("complete" if wrote else "shard_done", checkpoint, chunks_done, results, lines, errors, job)

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
