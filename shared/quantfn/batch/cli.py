"""``quantfn job submit|status``: put a job on the queue, and follow it to its manifest."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from datetime import UTC, datetime
from typing import Any

from quantfn.batch import shards as store
from quantfn.batch.jobs import BadJob, S3Location, parse_job_message
from quantfn.batch.status import job_status

_FINAL = {"complete", "failed", "incomplete", "not_found"}


def add_job_commands(commands: Any) -> None:
    """Register ``job submit`` and ``job status`` under the ``quantfn`` parser's subcommands."""
    job = commands.add_parser("job", help="submit a batch job to the queue, follow its progress")
    sub = job.add_subparsers(dest="job_command", required=True)
    submit = sub.add_parser("submit", help="send one job message (refused if the job_id names another input)")
    submit.add_argument("--input", required=True, help="s3://bucket/key of the JSON Lines input")
    submit.add_argument("--output", required=True, help="s3://bucket/prefix/ that receives <job_id>/")
    submit.add_argument("--queue", required=True, help="the job queue URL (stack output JobQueueUrl)")
    submit.add_argument("--model", default="all-MiniLM-L6-v2")
    submit.add_argument("--task", default="embed", choices=("embed", "classify", "rerank"))
    submit.add_argument("--job-id", default=None, help="default: the input's name and the time")
    submit.add_argument("--shard-bytes", type=int, default=None, help="this job's shard size (default: the setting)")
    submit.add_argument("--max-shards", type=int, default=None, help="at most this many shards")
    submit.add_argument(
        "--format", default="float32", help="embed output: float32 (JSON Lines), or float16, int8, ubinary (.npy)"
    )
    submit.set_defaults(run=_submit)
    status = sub.add_parser("status", help="shards done of total, lines, results, errors")
    status.add_argument("prefix", help="s3://bucket/prefix/<job_id>/")
    status.add_argument("--watch", action="store_true", help="refresh until the job completes or fails")
    status.add_argument("--interval", type=float, default=5.0, help="seconds between refreshes with --watch")
    status.add_argument("--json", action="store_true", help="print the status object as JSON")
    status.set_defaults(run=_status)


def _clients() -> tuple[Any, Any]:
    import boto3

    return boto3.client("s3"), boto3.client("sqs")


def _submit(args: argparse.Namespace) -> int:
    s3, sqs = _clients()
    stem = re.sub(r"[^A-Za-z0-9._-]", "-", args.input.rstrip("/").rsplit("/", 1)[-1])[:80] or "job"
    job_id = args.job_id or f"{stem}-{datetime.now(UTC).strftime('%Y%m%dT%H%M%S')}"
    body: dict[str, Any] = {"job_id": job_id, "model": args.model, "task": args.task}
    body |= {"input": {"s3_uri": args.input}, "output": args.output}
    if args.shard_bytes:
        body["shard_bytes"] = args.shard_bytes
    if args.max_shards:
        body["max_shards"] = args.max_shards
    if args.format != "float32":
        body["format"] = args.format
    try:
        job = parse_job_message(json.dumps(body), max_inline=1)
    except BadJob as exc:
        print(f"quantfn job submit: {exc.message}", file=sys.stderr)
        return 2
    assert job.input_uri is not None
    head = s3.head_object(Bucket=job.input_uri.bucket, Key=job.input_uri.key)
    record = store.read_json(s3, job.output.bucket, job.prefix + "job.json")
    if record is not None and (record["input"], record["etag"], record["task"], record["model"]) != (
        job.input_uri.uri,
        head["ETag"],
        job.task,
        job.model,
    ):
        print(
            f"quantfn job submit: job_id {job_id!r} already names a job over another input, task or model "
            f"({record['input']}, planned {record['created_at']}); choose a new --job-id.",
            file=sys.stderr,
        )
        return 2
    sqs.send_message(QueueUrl=args.queue, MessageBody=json.dumps(body))
    where = f"s3://{job.output.bucket}/{job.prefix}"
    print(f"submitted {job_id} ({head['ContentLength']} bytes); follow it with: quantfn job status {where} --watch")
    return 0


def progress_line(status: dict[str, Any], width: int = 30) -> str:
    """One line: a bar of bytes done, shards done of total, counts and state."""
    if status["state"] == "not_found":
        return f"no job at {status['prefix']}"
    shards, counts = status.get("shards", {}), status["counts"]
    size = status.get("input_size") or 0
    fraction = 1.0 if status["state"] == "complete" else (status.get("bytes_done", 0) / size if size else 0.0)
    filled = round(fraction * width)
    bar = "#" * filled + "." * (width - filled)
    line = (
        f"[{bar}] {fraction * 100:5.1f}%  shards {shards.get('done', '?')}/{shards.get('total', '?')}  "
        f"lines {counts['lines']:,}  results {counts['results']:,}  errors {counts['errors']:,}  {status['state']}"
    )
    for dead in shards.get("dead_lettered", []):
        line += f"\n  shard {dead['shard']} dead-lettered: {dead.get('message', '')}"
    if "error" in status:
        line += f"\n  {status['error']['code']}: {status['error']['message']}"
    return line


def _status(args: argparse.Namespace) -> int:
    s3, _ = _clients()
    location = S3Location.parse(args.prefix, "prefix", prefix=True)
    while True:
        status = job_status(s3, location.bucket, location.key)
        if args.json:
            print(json.dumps(status, indent=2))
        else:
            end = "\n" if status["state"] in _FINAL or not args.watch or "\n" in progress_line(status) else ""
            print("\r" + progress_line(status), end=end, flush=True)
        if not args.watch or status["state"] in _FINAL:
            return {"complete": 0, "running": 0, "planning": 0}.get(status["state"], 1)
        time.sleep(args.interval)
